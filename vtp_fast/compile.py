"""Transforms of a built model's transformer blocks (a VTP, a DiT: each names them, `transformer_blocks()`), in
place, state-dict keys unchanged.

`apply_compile`: torch.compile every block. Per-block compilation keeps compile times short and graphs reusable
across blocks of one shape, and, done with `nn.Module.compile` (in place), keeps keys free of `_orig_mod.`.
`compile_whole` (run.compile_scope=whole) compiles a job's whole training forward the same way.

`apply_inference`: a tokenizer for encode / decode only (the CPU fast path): weights cast once to bf16 ("bf16"; the
input cast at the call, the pixel statistics kept in fp32) and, with `compile`, encode and decode each one
torch.compile'd graph with inductor's freezing (weights folded in as constants and prepacked for oneDNN).

`apply_activation_checkpointing`: trade compute for activation memory (`run.activation_checkpointing`):
  per_block  keep only each block's input; its forward runs again in the backward (one more forward of the blocks)
  selective  per block, keep the outputs of matmuls and attention (the costly ops) and recompute the rest (norms,
             activations, RoPE, residual adds): most of the memory saved for little recomputation
Gradients are those of the plain model (recomputation replays the same ops with the same RNG state). Apply it
before compile and before DDP / FSDP2 wrap the model.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Protocol, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from vtp_fast.constants import DTYPES


class BlockModel(Protocol):
    """A model that names its transformer blocks (vtp_fast.models.vtp.VTP, vtp_fast.models.dit.DiT)."""

    def transformer_blocks(self) -> list[nn.Module]: ...


Model = TypeVar("Model", bound=BlockModel)


def apply_compile(model: Model, **options) -> Model:
    for block in model.transformer_blocks():
        block.compile(**options)
    return model


def compile_whole(*modules: nn.Module | None) -> None:
    """run.compile_scope=whole: each module's forward (those not None) as one torch.compile'd graph, in place. The
    graph also spans what lies between and after the blocks (embeddings, norms, heads, losses) and fuses across
    them; it costs one long compile, and a second, with dynamic shapes, once a size changes between steps (the
    iBOT mask count)."""
    for module in modules:
        if module is not None:
            module.compile()


_aten = torch.ops.aten
# The ops whose outputs `selective` keeps: matmuls and every attention kernel (PyTorch's and the fused backends').
_KEEP = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
         _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
         _aten._scaled_dot_product_cudnn_attention.default,
         _aten._scaled_dot_product_flash_attention_for_cpu.default}


def _keep_costly(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    costly = op in _KEEP or op.name().startswith("vtp_fast::attention")
    return CheckpointPolicy.MUST_SAVE if costly else CheckpointPolicy.PREFER_RECOMPUTE


# run.activation_checkpointing -> the checkpoint context ("none": no checkpointing)
_CONTEXTS = {"per_block": noop_context_fn,
             "selective": functools.partial(create_selective_checkpoint_contexts, _keep_costly)}


def _checkpointed(forward, context_fn, *args, **kwargs):
    modes = [] if torch.compiler.is_compiling() else torch.overrides._get_current_function_mode_stack()
    if modes:  # torch-function modes of the forward (the planner's emulated autocast) hold in the recompute too
        inner = context_fn

        def context_fn():
            forward_context, recompute_context = inner()
            return forward_context, _within(recompute_context, modes)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


@contextlib.contextmanager
def _within(context, modes):
    with context, contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        yield


def apply_activation_checkpointing(model: Model, mode: str) -> Model:
    if mode != "none":
        context_fn = _CONTEXTS[mode]
        for block in model.transformer_blocks():
            block.forward = functools.partial(_checkpointed, block.forward, context_fn)
    return model


def transform_blocks(model: Model, activation_checkpointing: str = "none", compile: str | None = None,
                     whole: tuple[nn.Module | None, ...] | None = None) -> Model:
    """A training job's transforms (run.activation_checkpointing, run.compile at run.compile_scope: `compile` is
    RunConfig.compile_as) in the order they need: checkpointing first, so the compiled forward is the checkpointed
    one; before DDP / FSDP2 wrap the model. "blocks" compiles every block, "whole" each of `whole` (default: the
    model) as one graph, None nothing."""
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile == "blocks":
        apply_compile(model)
    elif compile == "whole":
        compile_whole(*(whole or (model,)))
    elif compile is not None:
        raise ValueError(f"compile scope {compile!r} (choices: blocks, whole)")
    return model


Tokenizer = TypeVar("Tokenizer", bound=nn.Module)  # a vtp_fast.models.vtp.VTP: encode and decode


def apply_inference(model: Tokenizer, precision: str = "fp32", compile: bool = False) -> Tokenizer:
    """In place: `model` (a VTP) for inference only, eval mode and no gradients. "fp32" keeps the weights (the exact
    path, bit for bit that of the plain model when `compile` is off); "bf16" casts every parameter to bfloat16 once
    (buffers keep their dtype: the pixel mean/std stay fp32, the RoPE periods are bf16 already), and encode / decode
    cast their input to it and return bf16. `compile`: torch.compile encode and decode with freezing (a VTP-S graph
    took 25 s to build on 2 CPU cores and ran no faster there in fp32: docs/performance.md)."""
    if precision not in DTYPES:
        raise ValueError(f"inference precision {precision!r} (choices: {', '.join(DTYPES)})")
    dtype = DTYPES[precision]
    model.eval().requires_grad_(False)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    encode, decode = type(model).encode.__get__(model), type(model).decode.__get__(model)
    if compile:
        encode, decode = (torch.compile(f, options={"freezing": True}) for f in (encode, decode))
    model.encode = lambda images: encode(images.to(dtype))  # (B, 3, H, W) -> (B, C, H / p, W / p)
    model.decode = lambda latents: decode(latents.to(dtype))  # (B, C, h, w) -> (B, 3, p h, p w)
    return model

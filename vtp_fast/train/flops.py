"""Model FLOPs of a pretraining step and the device's peak: what the training log's MFU is made of.

A step's FLOPs are counted with torch.utils.flop_counter (matmuls, convolutions, attention) on the meta device:
the trainer and one rank's batch are built there (`meta_step`), so nothing runs and host memory does not grow with
the batch or the model. Training logs its MFU with `step_flops` and `peak_tflops`; the planner, the profiler and
the study's GPU plan (vtp_fast.measure) count with the same functions. The trainer is imported where a step is
built: the training loop (vtp_fast.train.loop, through its stall accounting) imports this module for the peak.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode

from vtp_fast import distributed as dist
from vtp_fast.data.batch import Batch, BatchShape
from vtp_fast.data.views import ViewConfig
from vtp_fast.ops.registry import building_for
from vtp_fast.train.config import PretrainConfig

if TYPE_CHECKING:
    from vtp_fast.train.trainer import Schedule, Trainer

# Dense bf16 peak (TFLOP/s) by GPU name fragment, for MFU.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1,
               "B200": 2250.0, "GH200": 989.4}


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, for MFU; None for a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def flops_of(fn) -> int:
    """Model FLOPs of calling fn() (torch.utils.flop_counter: matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _deterministic_masks(batch: Batch, views) -> None:
    """Every global crop masked at the expected count: mask_probability x mean(mask_ratio) of its tokens."""
    fixed = torch.zeros_like(batch.masks)
    fixed[:, :_masked_tokens(batch.masks.shape[1], views)] = True
    batch.set_masks(fixed)


def _masked_tokens(tokens: int, views: ViewConfig) -> int:
    """The expected iBOT mask of a global crop of `tokens` tokens: mask_probability x mean(mask_ratio) of them."""
    return round(tokens * views.mask_probability * sum(views.mask_ratio) / 2)


def meta_batch(shape: BatchShape, views: ViewConfig, image_size: int, context: int) -> Batch:
    """One rank's batch of `shape` as StepBatches builds it from synthetic pairs (shapes, dtypes and layouts; iBOT
    masks at their expected count, see `_deterministic_masks`), allocated on the meta device: nothing of batch size
    exists on the host."""
    meta = torch.device("meta")
    empty = lambda *size, dtype=torch.float32: torch.empty(size, dtype=dtype, device=meta)  # noqa: E731
    n, k = shape.size, shape.ssl
    batch = Batch(images=empty(n, image_size, image_size, 3).permute(0, 3, 1, 2),  # normalize_u8's (n, 3, S, S)
                  tokens=empty(n, context, dtype=torch.long), ids=empty(n, dtype=torch.long),
                  bad_ids=empty(0, dtype=torch.long), bad_kinds=empty(0, dtype=torch.long))
    if k:
        tokens = (views.global_size // shape.patch) ** 2
        masked = 2 * k * _masked_tokens(tokens, views)
        batch.global_crops = empty(2 * k, 3, views.global_size, views.global_size)  # view-major
        batch.local_crops = (empty(views.local_crops * k, 3, views.local_size, views.local_size)
                             if views.local_crops else empty(0, 3, 1, 1))
        batch.masks = empty(2 * k, tokens, dtype=torch.bool)
        batch.mask_index, batch.mask_weight = empty(masked, dtype=torch.long), empty(masked)
    return batch


def meta_step(cfg: PretrainConfig) -> tuple[Trainer, Batch]:
    """The trainer of `cfg` built on the meta device as one process at cfg.batch (parameters without storage; the CPU
    backends, i.e. the reference maths) and its batch there (`meta_batch`), to trace a step (FLOPs, memory) without
    running it: host memory and time do not grow with the batch or the model. The RNG streams are left as they
    were."""
    from vtp_fast.train.trainer import _build_trainer

    meta = torch.device("meta")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with building_for("cpu"), meta:
            t = _build_trainer(cfg, meta, local=True)
    return t, meta_batch(t.shape, cfg.ssl.views, cfg.data.image_size, t.model.config.text_context_length)


def count_step_flops(cfg: PretrainConfig) -> tuple[int, Trainer, tuple[int, int] | None]:
    """FLOPs of one forward + backward of the pretraining step at cfg.batch as one process's micro-batch, counted on
    the meta device (`meta_step`: nothing runs), the trainer built there, and the (rows, feature width) the CLIP loss
    saw (None without CLIP)."""
    from vtp_fast.train.trainer import forward_backward, schedules

    t, batch = meta_step(cfg)
    seen: list[tuple[int, int]] = []
    hook = (t.student.clip_loss.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
            if t.student.uses_clip else None)
    flops = flops_of(lambda: forward_backward(t, [batch], schedules(cfg, 0)))
    if hook is not None:
        hook.remove()
    return flops, t, (seen[0] if seen else None)


def micro_config(cfg: PretrainConfig, world: int, accumulation: int, model_config=None) -> PretrainConfig:
    """`cfg` as one rank's micro-batch on `world` ranks at `accumulation` micro-steps, for tracing on the meta device:
    fp32, not compiled, without LPIPS (its VGG weights may be absent); the architecture `model_config` (a VTPConfig)
    when given (a checkpoint's own when the run continues one)."""
    c = copy.deepcopy(cfg)
    if model_config is not None:
        c.model.init, c.model.overrides = None, dataclasses.asdict(model_config)
    c.batch.accumulation = accumulation
    per_rank = c.batch.per_rank(world, c.model.patch_size)
    c.batch.size, c.batch.ssl, c.batch.rec, c.batch.accumulation = per_rank.size, per_rank.ssl, per_rank.rec, 1
    c.objective.perceptual, c.run.compile, c.run.precision, c.data.synthetic = 0.0, False, "fp32", True
    return c


def step_flops(cfg: PretrainConfig, model_config) -> float:
    """Model FLOPs of one optimizer step of the run `cfg` over all ranks (forward + backward, teacher included),
    with the architecture `model_config` (a VTPConfig: a checkpoint's own when the run continues one)."""
    world, accumulation = dist.world_size(), cfg.batch.accumulation
    return float(count_step_flops(micro_config(cfg, world, accumulation, model_config))[0]) * accumulation * world


def count_flops(t: Trainer, batch: Batch, sched: Schedule) -> int:
    """FLOPs of one step's forward + backward (teacher included)."""
    from vtp_fast.train.trainer import forward_backward

    flops = flops_of(lambda: forward_backward(t, [batch], sched))
    t.optimizer.zero_grad(set_to_none=True)
    return flops

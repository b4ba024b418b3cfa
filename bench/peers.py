"""Benchmark: vtp_fast against the peer code it replaces, same weights and shapes, timed in interleaved rounds.

    python bench/peers.py --vtp-repo PATH --lightningdit-repo PATH [--dinov2-repo PATH] [--cases CASE ...]
                          [--models NAME ...] [--out rows.jsonl] [--quick] [--rounds N] [--device cuda]

Cases (each skipped, with a printed line saying why, when its peer is not given or cannot be imported):

  codec      tokenizer encode + decode, no grad: VTP-S and VTP-B, 256 px, batch 4 (--quick: vtp-nano, 64 px,
             batch 2). Peer: `vtp.models.vtp_hf.VTPModel` of the MiniMax VTP checkout (--vtp-repo), built from its
             VTPConfig with a seeded random init, written with its own `save_pretrained` (the published layout) and
             read back by `vtp_fast.load_pretrained`, so both run the same weights; the outputs are compared before
             anything is timed.
  dit_step   one DiT training step, velocity MSE + backward + AdamW, 16x16x64 latents: DiT-B/1 batch 8, DiT-XL/1
             batch 8 (batch 4 on a CPU) (--quick: dit-tiny on 4x4x64, batch 2). Peer: LightningDiT's
             models/lightningdit.py (--lightningdit-repo), as its recipe builds it (SwiGLU, RoPE, RMSNorm, no
             QK-norm). The two architectures encode positions differently (LightningDiT adds a sin-cos table to
             EVA RoPE; vtp_fast has 2-D RoPE only), so weights are NOT matched: same shapes, same loss on the same
             x0 / noise / t / labels, parameter counts recorded. A case whose two models and AdamW states would not
             fit in the free memory is skipped.
  clip_loss  contrastive loss forward + backward (gradients of both feature sets and the logit scale) at batch
             256 x dim 512 and 1024 x 768 (--quick: 32 x 64). Peer: open_clip.loss.ClipLoss (installed; no path).
  dino_loss  DINO (CLS, 2 global + 8 local crops) + iBOT (masked patches) losses including the prototype layer,
             forward + backward, from the teacher's head embeddings to the gradients of the student's embeddings
             and prototypes. Peer: dinov2/loss of a facebookresearch/dinov2 checkout (--dinov2-repo); its losses
             take logits, so its timed region computes them with plain matmuls (the head's last layer).
             CPU sizes are cut to run in seconds (see SHAPES; recorded in each row).

Peers import their own dependencies (VTP: transformers, omegaconf; LightningDiT: timm, einops, fairscale); put
them on PYTHONPATH if the environment lacks them. A peer is imported from the path given, never copied.

Timing: every (implementation, variant) of a case is warmed up, then timed once per round, rounds interleaved
(A B C ... then ... C B A, so neither side always runs first); a row's median and quartiles are over rounds.
One JSONL row per (case, implementation, variant), with the peer's path and commit, the case's FLOPs (counted
once, with FlopCounterMode, on vtp_fast's eager fp32 run: the matmuls it makes on the backends it resolved,
recomputation included, nothing inside an opaque custom kernel), achieved GFLOP/s (those FLOPs over each row's
median, the peer's rows included), and on vtp_fast rows `ratio_vs_peer` = peer median / vtp_fast median (> 1:
vtp_fast is faster) against the first peer variant of the same precision in VARIANTS, i.e. the peer as it ships
(`ratio_peer_variant`).
bf16 rows carry `max_abs_err_vs_fp32` (output against the same implementation's fp32 output); fp32 vtp_fast rows
of a case whose weights are matched carry `max_abs_diff_vs_peer`. The compared output: codec the reconstructed
images; dit_step the velocity prediction (eval mode, no label dropout; the zero-initialised adaLN layers are
perturbed so it is not identically zero); clip_loss / dino_loss the loss and every gradient, concatenated.

Variants: `VARIANTS` below, per case and implementation; add a fast path there (e.g. another compiled or bf16
configuration). vtp_fast "compiled" is `vtp_fast.compile.apply_compile` (per-block torch.compile); variants not
marked compiled run the same model under torch.compiler.set_stance("force_eager"). For a peer, "compiled" means
"its own torch.compile decorators, as shipped" (LightningDiT's blocks), and an eager peer variant runs them under
force_eager.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import math
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtp_fast.measure.rows import Emit, RowLog, bench_cli, resolved_backends
from vtp_fast.measure.timing import time_interleaved
from vtp_fast.train.flops import flops_of

CASES = ("codec", "dit_step", "clip_loss", "dino_loss")
TABLE_COLUMNS = ["case", "model", "impl", "variant", "median_ms", "gflop_per_s", "ratio_vs_peer", "ratio_vs_peer_fp32",
                 "max_abs_diff_vs_peer", "max_abs_err_vs_fp32"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one implementation runs: under bf16 autocast or not; compiled or eager (see the module docstring)."""

    name: str
    bf16: bool = False
    compiled: bool = False
    fast: bool = False  # vtp_fast's fast path: codec apply_inference(precision, compile=compiled); dit_step its own
    # compiled copy of the model (apply_compile when compiled) with fused AdamW

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"


EAGER = Variant("eager_fp32")
BF16 = Variant("bf16", bf16=True)
COMPILED = Variant("compiled", compiled=True)
SHIPPED = Variant("shipped_fp32", compiled=True)  # a peer with its own torch.compile decorators, as it ships
SHIPPED_BF16 = Variant("shipped_bf16", bf16=True, compiled=True)
FAST_FP32 = Variant("fast_fp32", compiled=True, fast=True)  # codec: compiled with frozen weights; DiT: + fused AdamW
FAST_BF16 = Variant("fast_bf16", bf16=True, fast=True)  # codec: weights cast to bf16 once
FAST_BF16_COMPILED = Variant("fast_bf16", bf16=True, compiled=True, fast=True)  # DiT: compiled, bf16, fused AdamW

# case -> implementation -> variants; the first fp32 peer variant is what fp32 vtp_fast rows are compared with
VARIANTS: dict[str, dict[str, list[Variant]]] = {
    "codec": {"vtp_fast": [EAGER, BF16, FAST_FP32, FAST_BF16], "peer": [EAGER, BF16]},
    "dit_step": {"vtp_fast": [EAGER, COMPILED, BF16, FAST_FP32, FAST_BF16_COMPILED],
                 "peer": [SHIPPED, SHIPPED_BF16, EAGER]},
    "clip_loss": {"vtp_fast": [EAGER], "peer": [EAGER]},
    "dino_loss": {"vtp_fast": [EAGER], "peer": [EAGER]},
}

# Shapes per case; "quick" for --quick. codec: (preset, batch, image size); dit_step: (preset, batch per device,
# latent grid); clip_loss: (batch, dim); dino_loss: per device, the tuple described below.
SHAPES: dict[str, dict[str, list]] = {
    "codec": {"full": [("vtp-s", 4, 256), ("vtp-b", 4, 256)], "quick": [("vtp-nano", 2, 64)]},
    "dit_step": {"full": [("dit-b/1", {"cpu": 8, "cuda": 8}, 16), ("dit-xl/1", {"cpu": 4, "cuda": 8}, 16)],
                 "quick": [("dit-tiny", {"cpu": 2, "cuda": 2}, 4)]},
    "clip_loss": {"full": [(256, 512), (1024, 768)], "quick": [(32, 64)]},
    # (images per view B, local crops, prototypes K, head dim d, masked patch rows M, patches per global crop)
    "dino_loss": {"full": [{"cpu": (8, 8, 65536, 256, 512, 256), "cuda": (64, 8, 65536, 256, 8192, 256)}],
                  "quick": [{"cpu": (2, 2, 1024, 64, 32, 16), "cuda": (2, 2, 1024, 64, 32, 16)}]},
}
LIGHTNINGDIT_NAMES = {"dit-b/1": "LightningDiT-B/1", "dit-xl/1": "LightningDiT-XL/1"}
TEACHER_TEMP, STUDENT_TEMP = 0.04, 0.1  # DINOv2's final teacher and student temperatures


class Skip(Exception):
    """A case (or one shape of it) that cannot run here; the message says why."""


# ----------------------------------------------------------------------------------------------- peers
def peer_commit(path: Path) -> str:
    """`git -C path rev-parse HEAD`, or "unknown" (not a git checkout, no git, or a path that its enclosing
    repository ignores: a package installed in a virtual environment inside some other checkout)."""
    try:
        git = ["git", "-C", str(path)]
        if subprocess.run([*git, "check-ignore", "-q", "."], capture_output=True, timeout=10).returncode == 0:
            return "unknown"
        r = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


def import_peer(root: Path, module: str, flag: str):
    """Import `module` from the checkout at `root` (put first on sys.path). Raises Skip when the path is not a
    directory, the module cannot be imported (a missing dependency is named), or a package of the same top-level
    name is already imported from elsewhere."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise Skip(f"{flag} {root} is not a directory")
    top = module.split(".")[0]
    loaded = sys.modules.get(top)
    if loaded is not None:
        where = [Path(p).resolve() for p in getattr(loaded, "__path__", [])] or [
            Path(getattr(loaded, "__file__", "") or ".").resolve()]
        if not any(p == root / top or root in p.parents for p in where):
            raise Skip(f"a different '{top}' package is already imported (from {where[0]}); run the peer from "
                       "a fresh process")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"cannot import {module} from {flag} {root}: {e} (install the peer's requirements, or put "
                   "them on PYTHONPATH)") from None


def peer_info(path: Path, name: str, version: str | None = None) -> dict:
    info = {"peer": name, "peer_path": str(path), "peer_commit": peer_commit(path)}
    if version:
        info["peer_version"] = version
    return info


# ----------------------------------------------------------------------------------------------- harness
@dataclasses.dataclass
class Runner:
    """One (implementation, variant): `step` is the timed call; `output` (untimed) is what is compared."""

    impl: str
    variant: Variant
    backend: str
    step: Callable[[], object]
    output: Callable[[], Tensor]


def variant_context(variant: Variant, device: str, stack: ExitStack) -> None:
    """Enter the variant's autocast and compile stance on `stack`."""
    if variant.bf16:
        stack.enter_context(torch.autocast(torch.device(device).type, dtype=torch.bfloat16))
    if not variant.compiled:
        stack.enter_context(torch.compiler.set_stance("force_eager"))


def under(variant: Variant, device: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with ExitStack() as stack:
            variant_context(variant, device, stack)
            return fn()
    return call


def max_abs(a: Tensor, b: Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def loss_and_grads(loss: Tensor, leaves: list[Tensor]) -> Tensor:
    """Backward into fresh .grad of `leaves` -> (1 + sum of leaf sizes,): the loss, then every gradient.
    (.backward, not autograd.grad: FlopCounterMode's module hooks cannot follow autograd.grad to leaves.)"""
    for leaf in leaves:
        leaf.grad = None
    loss.backward()
    return torch.cat([loss.detach().reshape(1), *(leaf.grad.flatten() for leaf in leaves)])


def interleave(ours: list[Runner], theirs: list[Runner]) -> list[Runner]:
    """v0 p0 v1 p1 ...: neighbours in a round alternate between the implementations."""
    out = []
    for i in range(max(len(ours), len(theirs))):
        out += ours[i:i + 1] + theirs[i:i + 1]
    return out


def run_case(rows: RowLog, device: str, meta: dict, flops: int, ours: list[Runner], theirs: list[Runner],
             info: dict, rounds: int, warmup: int, weights_matched: bool) -> None:
    """Check outputs, time the runners interleaved, add one row per runner."""
    outputs = {(r.impl, r.variant.name): r.output() for r in ours + theirs}
    fp32 = {impl: next((r for r in group if not r.variant.bf16), None) for impl, group in
            (("vtp_fast", ours), ("peer", theirs))}
    runners = interleave(ours, theirs)
    timed = time_interleaved([r.step for r in runners], device, rounds=rounds, warmup=warmup)
    by_key = {(r.impl, r.variant.name): timed[i] for i, r in enumerate(runners)}
    for r in runners:
        t = by_key[(r.impl, r.variant.name)]
        out = outputs[(r.impl, r.variant.name)]
        row = {"bench": "peers", **meta, "impl": r.impl, "variant": r.variant.name,
               "precision": r.variant.precision, "compiled": r.variant.compiled, "device": device,
               "backend": r.backend, **info, "weights_matched": weights_matched, **t, "flops": flops,
               "gflop_per_s": flops / (t["median_ms"] / 1e3) / 1e9, "output_max_abs": out.detach().abs().max().item()}
        own_fp32 = fp32[r.impl]
        if r.variant.bf16 and own_fp32 is not None:
            row["max_abs_err_vs_fp32"] = max_abs(out, outputs[(r.impl, own_fp32.variant.name)])
        if r.impl == "vtp_fast":
            peer = next((p for p in theirs if p.variant.bf16 == r.variant.bf16), None)
            if peer is not None:
                row["ratio_vs_peer"] = by_key[("peer", peer.variant.name)]["median_ms"] / t["median_ms"]
                row["ratio_peer_variant"] = peer.variant.name
            if r.variant.bf16 and fp32["peer"] is not None:  # the bf16 fast path against the peer's exact path
                row["ratio_vs_peer_fp32"] = by_key[("peer", fp32["peer"].variant.name)]["median_ms"] / t["median_ms"]
            if weights_matched and not r.variant.bf16 and fp32["peer"] is not None:
                row["max_abs_diff_vs_peer"] = max_abs(out, outputs[("peer", fp32["peer"].variant.name)])
        rows.add(row)


def compile_shared(base: nn.Module, variants: list[Variant]) -> None:
    """Compile `base` in place (vtp_fast's apply_compile) when a variant other than the fast ones runs it compiled;
    those all run `base`, the eager ones under force_eager."""
    from vtp_fast.compile import apply_compile

    if any(v.compiled and not v.fast for v in variants):
        apply_compile(base)


# ----------------------------------------------------------------------------------------------- codec
def reference_vtp(hf, preset: str, size: int) -> nn.Module:
    """The reference implementation's VTPModel (module `hf`: vtp.models.vtp_hf) of `preset` at `size` px without
    the text tower, its own init seeded with 0, in eval mode."""
    from vtp_fast import vtp_config

    fields = dataclasses.asdict(vtp_config(preset, image_size=size, train_clip=False))
    torch.manual_seed(0)
    return hf.VTPModel(hf.VTPConfig(**fields)).eval()


@torch.no_grad()
def reference_codec(model: nn.Module, x: Tensor) -> Tensor:
    """The reference's encode + decode, as its own scripts call it."""
    return model.get_latents_decoded_images(model.get_reconstruction_latents(x))


def codec_case(rows: RowLog, device: str, quick: bool, rounds: int, warmup: int, vtp_repo: Path | None,
               models: set[str] | None) -> None:
    from vtp_fast import load_pretrained
    from vtp_fast.compile import apply_inference

    if vtp_repo is None:
        raise Skip("no --vtp-repo given (a checkout of the reference VTP implementation)")
    hf = import_peer(vtp_repo, "vtp.models.vtp_hf", "--vtp-repo")
    info = peer_info(Path(vtp_repo), "vtp (vtp.models.vtp_hf.VTPModel)")
    for preset, batch, size in SHAPES["codec"]["quick" if quick else "full"]:
        if models and preset not in models:
            continue
        peer = reference_vtp(hf, preset, size)
        with tempfile.TemporaryDirectory() as tmp:
            peer.save_pretrained(tmp)  # the published layout: config.json + model.safetensors
            ours = load_pretrained(tmp, device=device)
        peer = peer.to(device)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)

        @torch.no_grad()
        def ours_call(model=ours):
            return model.decode(model.encode(x))

        def peer_call(model=peer):
            return reference_codec(model, x)

        variants = VARIANTS["codec"]
        compile_shared(ours, variants["vtp_fast"])
        per_variant = {v.name: apply_inference(copy.deepcopy(ours), v.precision, compile=v.compiled) if v.fast else ours
                       for v in variants["vtp_fast"]}
        ours_runners = [Runner("vtp_fast", v, resolved_backends(per_variant[v.name]),
                               under(v, device, lambda m=per_variant[v.name]: ours_call(m)),
                               under(v, device, lambda m=per_variant[v.name]: ours_call(m)))
                        for v in variants["vtp_fast"]]
        peer_runners = [Runner("peer", v, "vtp.VTPModel", under(v, device, peer_call), under(v, device, peer_call))
                        for v in variants["peer"]]
        flops = flops_of(under(EAGER, device, ours_call))
        meta = {"case": "codec", "model": preset, "batch": batch, "image_size": size,
                "params": sum(p.numel() for p in ours.parameters()),
                "peer_params": sum(p.numel() for p in peer.parameters()),
                "weights": "peer seeded random init -> VTPModel.save_pretrained -> vtp_fast.load_pretrained"}
        run_case(rows, device, meta, flops, ours_runners, peer_runners, info, rounds, warmup, weights_matched=True)
        del ours, peer, per_variant, ours_runners, peer_runners


# ----------------------------------------------------------------------------------------------- dit_step
@torch.no_grad()
def perturb_zeros(model: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Add seeded N(0, std) noise to every trainable parameter that is all zeros (adaLN-Zero modulation, the final
    projection, zero biases), so the model's output is not identically zero."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad and not p.any():
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * std)
    return model


def free_memory_bytes(device: str) -> int | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_lightningdit(module, preset: str, config) -> tuple[nn.Module, str]:
    """The peer DiT as LightningDiT's recipe builds it (configs/*.yaml: SwiGLU, RoPE, RMSNorm, no QK-norm)."""
    kw = dict(input_size=config.input_size, num_classes=config.num_classes, in_channels=config.in_channels,
              use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False,
              class_dropout_prob=config.class_dropout, mlp_ratio=config.mlp_ratio)
    name = LIGHTNINGDIT_NAMES.get(preset)
    if name is not None:
        return module.LightningDiT_models[name](**kw), name
    kw.update(patch_size=config.patch_size, hidden_size=config.hidden, depth=config.depth, num_heads=config.heads)
    return module.LightningDiT(**kw), f"LightningDiT(hidden_size={config.hidden}, depth={config.depth})"


def dit_case(rows: RowLog, device: str, quick: bool, rounds: int, warmup: int, lightningdit_repo: Path | None,
             models: set[str] | None) -> None:
    from vtp_fast.compile import apply_compile
    from vtp_fast.models.dit import DiT, dit_config
    from vtp_fast.ops import building_for

    if lightningdit_repo is None:
        raise Skip("no --lightningdit-repo given (a checkout of hustvl/LightningDiT)")
    module = import_peer(lightningdit_repo, "models.lightningdit", "--lightningdit-repo")
    info = peer_info(Path(lightningdit_repo), "LightningDiT (models/lightningdit.py)")
    kind = torch.device(device).type
    for preset, batches, grid in SHAPES["dit_step"]["quick" if quick else "full"]:
        if models and preset not in models:
            continue
        batch = batches[kind]
        config = dit_config(preset, in_channels=64, input_size=grid)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in DiT(config).parameters())
        need, free = 2 * 16 * n_params * 1.25, free_memory_bytes(device)  # 2 models: fp32 weights, grads, AdamW
        if free is not None and need > free:
            print(f"skip dit_step {preset}: two models with AdamW need about {need / 2**30:.1f} GiB, "
                  f"{free / 2**30:.1f} GiB free on {device}", flush=True)
            continue
        torch.manual_seed(0)
        with building_for(device):
            ours = perturb_zeros(DiT(config), seed=1).to(device).train()
        torch.manual_seed(0)
        peer, peer_name = build_lightningdit(module, preset, config)
        peer = perturb_zeros(peer, seed=1).to(device).train()
        g = torch.Generator().manual_seed(2)
        x0 = torch.randn(batch, 64, grid, grid, generator=g)
        noise = torch.randn(batch, 64, grid, grid, generator=g)
        t = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal, in (0, 1)
        y = torch.randint(0, config.num_classes, (batch,), generator=g)
        x0, noise, t, y = (v.to(device) for v in (x0, noise, t, y))
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise  # (B, 64, grid, grid)
        target = noise - x0  # the velocity

        def make_step(model: nn.Module, fused: bool = False) -> Callable[[], Tensor]:
            params = [p for p in model.parameters() if p.requires_grad]  # LightningDiT's pos_embed is frozen
            opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                                    fused=True if kind == "cuda" or fused else None)

            def step():
                loss = (model(x_t, t, y).float() - target).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return loss
            return step

        def make_output(model: nn.Module) -> Callable[[], Tensor]:
            @torch.no_grad()
            def output():
                model.eval()
                try:
                    return model(x_t, t, y).float()
                finally:
                    model.train()
            return output

        variants = VARIANTS["dit_step"]
        backend = resolved_backends(ours)
        flops = flops_of(under(EAGER, device, make_step(ours)))  # fwd + bwd (AdamW adds no matmul)
        fast = {v.name: copy.deepcopy(ours) for v in variants["vtp_fast"] if v.fast}  # before ours is compiled
        compile_shared(ours, variants["vtp_fast"])
        per_variant, steps, ours_step = {}, {}, make_step(ours)  # the variants that share `ours` share its step
        for v in variants["vtp_fast"]:
            if v.fast:
                model = apply_compile(fast[v.name]) if v.compiled else fast[v.name]
                per_variant[v.name], steps[v.name] = model, make_step(model, fused=True)
            else:
                per_variant[v.name], steps[v.name] = ours, ours_step
        ours_runners = [Runner("vtp_fast", v, backend, under(v, device, steps[v.name]),
                               under(v, device, make_output(per_variant[v.name]))) for v in variants["vtp_fast"]]
        peer_step, peer_output = make_step(peer), make_output(peer)
        peer_runners = [Runner("peer", v, peer_name, under(v, device, peer_step), under(v, device, peer_output))
                        for v in variants["peer"]]
        meta = {"case": "dit_step", "model": preset, "peer_model": peer_name, "batch": batch, "grid": grid,
                "params": n_params, "peer_params": sum(p.numel() for p in peer.parameters()),
                "weights": "not matched: the architectures encode positions differently; same shapes, same loss "
                           "on the same x0/noise/t/y; zero-initialised layers perturbed (seed 1)"}
        run_case(rows, device, meta, flops, ours_runners, peer_runners, info, rounds, warmup, weights_matched=False)
        del ours, peer, per_variant, steps, ours_runners, peer_runners


# ----------------------------------------------------------------------------------------------- clip_loss
def clip_case(rows: RowLog, device: str, quick: bool, rounds: int, warmup: int, models: set[str] | None) -> None:
    from vtp_fast.losses.clip import ClipLoss

    try:
        import open_clip
        from open_clip.loss import ClipLoss as OpenClipLoss
    except ImportError as e:
        raise Skip(f"open_clip is not installed ({e})") from None
    info = peer_info(Path(open_clip.__file__).parent, "open_clip.loss.ClipLoss",
                     getattr(open_clip, "__version__", None))
    for batch, dim in SHAPES["clip_loss"]["quick" if quick else "full"]:
        name = f"clip-{batch}x{dim}"
        if models and name not in models:
            continue
        g = torch.Generator().manual_seed(0)
        image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
        text = F.normalize(image + torch.randn(batch, dim, generator=g), dim=-1)
        image, text = (v.to(device).requires_grad_() for v in (image, text))
        log_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
        leaves = [image, text, log_scale]
        ours_loss = ClipLoss()
        theirs_loss = OpenClipLoss(cache_labels=True)  # as open_clip's training builds it (world size 1)

        def ours_call():
            return loss_and_grads(ours_loss(image, text, log_scale), leaves)

        def peer_call():
            # open_clip takes the exponentiated scale
            return loss_and_grads(theirs_loss(image, text, log_scale.exp()), leaves)

        variants = VARIANTS["clip_loss"]
        ours_runners = [Runner("vtp_fast", v, ours_loss.backend.name, under(v, device, ours_call),
                               under(v, device, ours_call)) for v in variants["vtp_fast"]]
        peer_runners = [Runner("peer", v, "open_clip", under(v, device, peer_call), under(v, device, peer_call))
                        for v in variants["peer"]]
        meta = {"case": "clip_loss", "model": name, "batch": batch, "dim": dim,
                "weights": "same inputs: L2-normalised features, logit scale log(1 / 0.07)"}
        run_case(rows, device, meta, flops_of(under(EAGER, device, ours_call)), ours_runners, peer_runners, info,
                 rounds, warmup, weights_matched=True)


# ----------------------------------------------------------------------------------------------- dino_loss
def dino_case(rows: RowLog, device: str, quick: bool, rounds: int, warmup: int, dinov2_repo: Path | None,
              models: set[str] | None) -> None:
    from vtp_fast.losses.dino import DINOLoss, IBOTPatchLoss

    if dinov2_repo is None:
        raise Skip("no --dinov2-repo given (a checkout of facebookresearch/dinov2; the VTP checkout ships no "
                   "DINO/iBOT losses)")
    peer_loss = import_peer(dinov2_repo, "dinov2.loss", "--dinov2-repo")
    info = peer_info(Path(dinov2_repo), "dinov2.loss (DINOLoss, iBOTPatchLoss)")
    kind = torch.device(device).type
    for shapes in SHAPES["dino_loss"]["quick" if quick else "full"]:
        b, n_local, k, d, m, patches = shapes[kind]
        name = f"dino-K{k}-d{d}"
        if models and name not in models:
            continue
        g = torch.Generator().manual_seed(0)

        def rows_of(n: int) -> Tensor:  # head embeddings (n, d), L2-normalised as DINOHead's output
            return F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device)

        s_global, s_local, t_global = rows_of(2 * b), rows_of(n_local * b), rows_of(2 * b)
        s_patch, t_patch = rows_of(m), rows_of(m)
        w_teacher = F.normalize(torch.randn(k, d, generator=g), dim=-1)  # weight-normalised prototypes (K, d)
        w_student = F.normalize(w_teacher + 0.01 * torch.randn(k, d, generator=g), dim=-1)
        w_teacher, w_student = w_teacher.to(device), w_student.to(device)
        n_images = 2 * b  # global crops; the first m patch slots of the crops are the masked ones
        per_image = torch.full((n_images,), m // n_images)
        per_image[: m % n_images] += 1
        masks = torch.arange(patches)[None] < per_image[:, None]  # (2B, patches) bool, M true
        masks = masks.to(device)
        weights = (1 / per_image.clamp_min(1).float()).repeat_interleave(per_image).to(device)  # (M,)
        leaves = [v.clone().requires_grad_() for v in (s_global, s_local, s_patch, w_student)]

        ours_dino, ours_ibot = DINOLoss(k).to(device), IBOTPatchLoss(k).to(device)

        def ours_call():
            sg, sl, sp, ws = leaves
            teacher = ours_dino.teacher_targets(t_global, w_teacher, TEACHER_TEMP).chunk(2)
            dino = ours_dino(list(sg.chunk(2)), list(sl.chunk(n_local)), teacher, ws)
            patch_targets = ours_ibot.teacher_targets(t_patch, w_teacher, TEACHER_TEMP)
            return loss_and_grads(dino + ours_ibot(sp, patch_targets, ws, weights, n_images), leaves)

        theirs_dino = peer_loss.DINOLoss(k, student_temp=STUDENT_TEMP).to(device)
        theirs_ibot = peer_loss.iBOTPatchLoss(k, student_temp=STUDENT_TEMP).to(device)

        def peer_call():
            """DINOv2's ssl_meta_arch use of its losses, on logits from the prototype layer."""
            sg, sl, sp, ws = leaves
            with torch.no_grad():
                t_logits = t_global @ w_teacher.T  # (2B, K)
                t_soft = theirs_dino.softmax_center_teacher(t_logits, TEACHER_TEMP).view(2, b, k)
                theirs_dino.update_center(t_logits)
                tp_logits = (t_patch @ w_teacher.T).unsqueeze(0)  # (1, M, K)
                tp_soft = theirs_ibot.softmax_center_teacher(tp_logits, TEACHER_TEMP).squeeze(0)
                theirs_ibot.update_center(tp_logits)
            local = theirs_dino((sl @ ws.T).chunk(n_local), list(t_soft.unbind(0)))
            # each student global view against the other teacher view: teacher views swapped
            glob = theirs_dino([sg @ ws.T], [t_soft.flip(0).flatten(0, 1)]) * 2
            dino = (local + glob) / (2 + 2 * n_local)
            ibot = theirs_ibot.forward_masked(sp @ ws.T, tp_soft, student_masks_flat=masks, n_masked_patches=m,
                                              masks_weight=weights)
            return loss_and_grads(dino + ibot, leaves)

        def fresh(call: Callable[[], Tensor], *losses: nn.Module) -> Callable[[], Tensor]:
            """The compared output with the centres at zero (as on the first step), for both implementations."""
            def output():
                saved = [(mod, {k: v for k, v in vars(mod).items() if k in ("updated", "async_batch_center",
                                                                             "len_teacher_output",
                                                                             "len_teacher_patch_tokens")},
                          mod.center.clone()) for mod in losses]
                for mod in losses:
                    mod.center = torch.zeros_like(mod.center)
                    if hasattr(mod, "updated"):
                        mod.updated = True
                try:
                    return call()
                finally:
                    for mod, attrs, center in saved:
                        mod.center = center
                        vars(mod).update(attrs)
            return output

        variants = VARIANTS["dino_loss"]
        ours_runners = [Runner("vtp_fast", v, ours_dino.ce.name, under(v, device, ours_call),
                               under(v, device, fresh(ours_call, ours_dino, ours_ibot))) for v in variants["vtp_fast"]]
        peer_runners = [Runner("peer", v, "dinov2", under(v, device, peer_call),
                               under(v, device, fresh(peer_call, theirs_dino, theirs_ibot))) for v in variants["peer"]]
        meta = {"case": "dino_loss", "model": name, "images_per_view": b, "global_crops": 2,
                "local_crops": n_local, "prototypes": k, "head_dim": d, "masked_patches": m,
                "patches_per_crop": patches, "teacher_temp": TEACHER_TEMP, "student_temp": STUDENT_TEMP,
                "weights": "same head embeddings and prototypes; centring mode"}
        run_case(rows, device, meta, flops_of(under(EAGER, device, ours_call)), ours_runners, peer_runners, info,
                 rounds, warmup, weights_matched=True)


# ----------------------------------------------------------------------------------------------- entry
def run(device: str = "cpu", quick: bool = False, vtp_repo: str | None = None, lightningdit_repo: str | None = None,
        dinov2_repo: str | None = None, cases: list[str] | None = None, rounds: int | None = None,
        models: list[str] | None = None, warmup: int | None = None, emit: Emit | None = None) -> list[dict]:
    """Rows of every requested case (default: all); a case that cannot run prints "skip <case>: <why>"."""
    rows = RowLog(emit)
    rounds = rounds or (3 if quick else 5)
    warmup = warmup or (1 if quick else 2)
    wanted = set(models) if models else None
    path = lambda p: Path(p) if p else None  # noqa: E731
    jobs = {"codec": lambda: codec_case(rows, device, quick, rounds, warmup, path(vtp_repo), wanted),
            "dit_step": lambda: dit_case(rows, device, quick, rounds, warmup, path(lightningdit_repo), wanted),
            "clip_loss": lambda: clip_case(rows, device, quick, rounds, warmup, wanted),
            "dino_loss": lambda: dino_case(rows, device, quick, rounds, warmup, path(dinov2_repo), wanted)}
    for case in cases or CASES:
        if case not in jobs:
            raise ValueError(f"unknown case {case!r} (choices: {', '.join(CASES)})")
        try:
            jobs[case]()
        except Skip as why:
            print(f"skip {case}: {why}", flush=True)
    return rows.rows


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vtp-repo", help="checkout of the reference VTP implementation (MiniMax-AI/VTP)")
    p.add_argument("--lightningdit-repo", help="checkout of hustvl/LightningDiT")
    p.add_argument("--dinov2-repo", help="checkout of facebookresearch/dinov2")
    p.add_argument("--cases", nargs="+", choices=CASES, help="cases to run (default: all)")
    p.add_argument("--models", nargs="+", help="only these shapes, by the rows' model name (e.g. vtp-s dit-b/1)")
    p.add_argument("--rounds", type=int, help="timed rounds per implementation (default 5, --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed calls per implementation first (default 2, --quick 1)")


def main() -> None:
    bench_cli(run, TABLE_COLUMNS, __doc__, extra=options,
              run_args=("vtp_repo", "lightningdit_repo", "dinov2_repo", "cases", "rounds", "models", "warmup"))


if __name__ == "__main__":
    main()

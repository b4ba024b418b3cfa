"""The planned H200 GPU-hours of a scaling study, from model FLOPs and the performance model's peak.

    plan = gpu_plan(load_study("configs/study/vtp_s.yaml"))
    print(plan_markdown(plan))

Every figure is model FLOPs / (PEAK_FLOPS x MFU) for the FULL study a StudyConfig describes (never its dry run):

  tokenizer    one pretraining step's forward + backward (EMA teacher's forward included), counted with
               FlopCounterMode on the meta device (shapes only: seconds on a CPU at any size) with the real
               trainer at the real image size, views, heads and prototypes, at a small batch that keeps the
               config's clip : ssl : rec ratio, then scaled to the configured batch as a * B + q * B^2: the
               linear part (trunk, heads, teacher, text tower, pixel decoder) scales with the batch; the quadratic
               part is the CLIP logits (each rank builds local x global logits: N x N x E summed over the ranks,
               per accumulation micro-step), whose q is counted on the CLIP loss alone at two batch sizes with the
               feature width the step's count saw (a hook on the loss). iBOT masks are made
               deterministic at their expected size (mask_probability x mean mask_ratio of every global crop's
               tokens) so the count is exactly linear. LPIPS (VGG16 on the reconstruction and its target, the
               input gradient only) is counted separately on a meta VGG16 (its weights are never needed).
               x steps, per (mix, budget, channels) run; each distinct (mix, channels) is counted once.
  scoring      encode + decode of `samples` held-out images per tokenizer (rFID); the linear probe's and zero-
               shot's encoder passes over the labelled and held-out sets.
  latents      encoder forward x labelled images x 2 (each image and its flip) per tokenizer.
  dit_train    DiT forward + backward (flow loss) at the configured batch x dit_steps x seeds per tokenizer
               (counted at batch 2 on the meta device, scaled linearly: every token's work is per sample).
  sampling     DiT forward x sample_steps x samples at every curve point of every seed, + the decoder per sample;
               the ceilings' decoder on `samples` Gaussian latents per tokenizer.
  inception    torch-fidelity's InceptionV3 at 299 x 299 (counted once on the meta device) x every image scored
               by ADM's suite (sFID's features come from the same forward): the reference once (ADM's batch,
               ADM_REFERENCE_IMAGES, or `samples` labelled images), the floor (samples), rFID (samples reconstructions
               per tokenizer + the held-out originals once), ceilings, every DiT seed at every curve point.

MFU: measured whole-step rows on the H200 (bench/results/h200/*.jsonl, written by bench/device_check.sh) are used
where they exist; otherwise ASSUMED_MFU, labelled "assumed until bench/device_check.sh measures it".
"""

from __future__ import annotations

import math
import time
from functools import cache
from pathlib import Path

import torch

from vtp_fast.perf_model import PEAK_FLOPS
from vtp_fast.study.config import MIXES, StudyConfig, resolve
from vtp_fast.study.mfu import measured_mfu
from vtp_fast.train.profile import flops_of

DEFAULT_IMAGES = 1_281_167  # ImageNet-1k train, when neither cfg.max_images nor `images` says
DEFAULT_HELD_OUT = 50_000  # ImageNet-1k val, when `held_out_images` does not say
ADM_REFERENCE_IMAGES = 10_000  # the images of guided-diffusion's VIRTUAL_imagenet256_labeled.npz (adm_reference)
ASSUMED = "assumed until bench/device_check.sh measures it"

# Fraction of PEAK_FLOPS (790 TFLOP/s, bf16 dense matmul measured on the H200) each kind of work reaches.
ASSUMED_MFU: dict[str, tuple[float, str]] = {
    "tokenizer": (0.40, "bf16 transformer training at a large global batch (ViT + text tower + SSL heads)"),
    "dit_train": (0.40, "bf16 DiT training at batch >= 256, 256 tokens a sample"),
    "latents": (0.30, "bf16 encoder inference, large batches, no backward"),
    "scoring": (0.25, "bf16 encoder/decoder inference at batch 64, plus the probe's encoder passes"),
    "sampling": (0.25, "bf16 DiT forward at sampling batch 64 (one Euler step a call) + decoder"),
    "inception": (0.03, "torch-fidelity's InceptionV3 runs in fp32 (non-tensor-core, ~67 TFLOP/s peak)"),
}
KINDS = ("tokenizer", "scoring", "latents", "dit_train", "sampling", "inception")
KIND_NAMES = {"tokenizer": "tokenizer pretraining", "scoring": "tokenizer scoring (rFID recon, probe, zero-shot)",
              "latents": "latent extraction (+ flips)", "dit_train": "DiT training",
              "sampling": "sampling (DiT Euler steps + decoder; ceilings)", "inception": "Inception features"}
MAX_BASE = 64  # the counted batch's largest size before the ratio is rounded
_CACHE: dict[str, object] = {}  # counts by config (a plan of the same shapes counts once per process)


# ---------------------------------------------------------------------------------------------------- counting
def base_batch(size: int, ssl: int, rec: int) -> tuple[int, int, int]:
    """The smallest (size, ssl, rec) with the same ratio; rounded (non-zero parts kept >= 1) when that is over
    MAX_BASE pairs."""
    g = math.gcd(size, math.gcd(ssl, rec))
    b = (size // g, ssl // g, rec // g)
    if b[0] <= MAX_BASE:
        return b
    f = MAX_BASE / size
    return MAX_BASE, max(1, round(ssl * f)) if ssl else 0, max(1, round(rec * f)) if rec else 0


def _trainer_flops(pcfg, size: int, ssl: int, rec: int) -> tuple[int, object, tuple[int, int] | None]:
    """FLOPs of one forward + backward of the pretraining step at this batch (meta device), the trainer, and the
    (rows, feature width) the CLIP loss saw (None without CLIP)."""
    from vtp_fast.train.profile import count_step_flops

    pcfg.batch.size, pcfg.batch.ssl, pcfg.batch.rec, pcfg.batch.accumulation = size, ssl, rec, 1
    return count_step_flops(pcfg)


def clip_logits_coefficient(width: int, n: int = 4) -> float:
    """q in FLOPs(ClipLoss forward + backward over n pairs) = linear(n) + q n^2: the logits' part, counted at n
    and 2n pairs of `width`-wide features (meta device, one process: local = global batch)."""
    from vtp_fast.losses.clip import ClipLoss
    from vtp_fast.ops.registry import building_for

    with building_for("cpu"):
        loss = ClipLoss()

    def count(rows: int) -> int:
        with torch.device("meta"):
            img, txt = torch.empty(rows, width, requires_grad=True), torch.empty(rows, width, requires_grad=True)
            scale = torch.zeros((), requires_grad=True)
        return flops_of(lambda: loss(img, txt, scale).backward())

    return (count(2 * n) - 2 * count(n)) / (2 * n * n)


@cache
def lpips_flops_per_image(size: int) -> int:
    """LPIPS-VGG forward on the reconstruction and its target (2 images) + the backward to the reconstruction
    (VGG frozen: input gradients only), per reconstructed image, at size x size."""
    import torchvision

    ends, starts = (4, 9, 16, 23, 30), (0, 4, 9, 16, 23)
    with torch.device("meta"):
        feats = torchvision.models.vgg16(weights=None).features.requires_grad_(False)
        stages = [feats[a:b] for a, b in zip(starts, ends, strict=True)]
        heads = [torch.empty(1, [m for m in s if isinstance(m, torch.nn.Conv2d)][-1].out_channels, 1, 1)
                 for s in stages]
        x = torch.empty(1, 3, size, size, requires_grad=True)
        y = torch.empty(1, 3, size, size)

    def run():
        h, total = torch.cat([x, y]), 0
        for stage, head in zip(stages, heads, strict=True):
            h = stage(h)
            fx, fy = torch.nn.functional.normalize(h, dim=1).chunk(2)
            total = total + torch.nn.functional.conv2d((fx - fy) ** 2, head).mean()
        total.backward()

    return flops_of(run)


def tokenizer_step(cfg: StudyConfig, mix: str, channels: int) -> dict:
    """Model FLOPs of one pretraining step of this (mix, channels) at the configured global batch."""
    from vtp_fast.study.run import pretrain_config

    pcfg = pretrain_config(cfg, Path("/nonexistent/plan"), mix, 1, channels)
    size, ssl, rec, accum = pcfg.batch.size, pcfg.batch.ssl, pcfg.batch.rec, pcfg.batch.accumulation
    perceptual = pcfg.objective.perceptual if pcfg.objective.rec else 0.0
    pcfg.objective.perceptual = 0.0  # LPIPS counted apart (no VGG weights needed)
    pcfg.model.init = None  # the preset's architecture (a checkpoint to continue from has the same shapes)
    pcfg.run.compile, pcfg.run.precision, pcfg.data.synthetic = False, "fp32", True
    b = base_batch(size, ssl, rec)
    key = repr(pcfg) + repr(b)
    if key not in _CACHE:
        f1, t, clip_shape = _trainer_flops(pcfg, *b)
        q = clip_logits_coefficient(clip_shape[1]) if clip_shape else 0.0
        _CACHE[key] = (f1, q, clip_shape, _codec_flops(t.model, pcfg.data.image_size),
                       t.model.config.vision_patch_size)
    f1, q, clip_shape, (enc_flops, dec_flops, latent_shape), patch = _CACHE[key]
    # FLOPs(B) = a B + q B^2: the CLIP logits are the quadratic part, everything else (trunk, text tower, heads,
    # teacher, pixel decoder) is per sample
    a = (f1 - q * b[0] ** 2) / b[0]
    linear = a * size
    quadratic = q * (size / accum) ** 2 * accum  # each micro-step: local x global logits of its own global batch
    lpips = lpips_flops_per_image(pcfg.data.image_size) * rec if perceptual and rec else 0
    return {"mix": mix, "channels": channels, "batch": {"size": size, "ssl": ssl, "rec": rec, "accumulation": accum},
            "counted_at": {"size": b[0], "ssl": b[1], "rec": b[2], "flops": f1},
            "clip_logits_coefficient": q, "clip_width": clip_shape[1] if clip_shape else None,
            "image_size": pcfg.data.image_size, "preset": pcfg.model.preset,
            "linear_flops": linear, "clip_logits_flops": quadratic, "lpips_flops": lpips,
            "step_flops": linear + quadratic + lpips, "perceptual": perceptual,
            "encoder_flops_per_image": enc_flops, "decoder_flops_per_image": dec_flops,
            "latent_shape": latent_shape, "patch": patch}


def _codec_flops(model, size: int) -> tuple[int, int, list[int]]:
    """Encoder and decoder forward FLOPs of one image (meta device), and the latent shape (C, h, w)."""
    with torch.no_grad():
        x = torch.empty(1, 3, size, size, device="meta")
        z = []
        enc = flops_of(lambda: z.append(model.encode(x)))
        dec = flops_of(lambda: model.decode(torch.empty_like(z[0])))
    return enc, dec, list(z[0].shape[1:])


def dit_flops(cfg: StudyConfig, latent_shape: list[int], count_batch: int = 2) -> dict:
    """DiT training step FLOPs at the configured batch and forward FLOPs of one sample, for these latents."""
    from vtp_fast.config import load_config
    from vtp_fast.models.dit import DiT, dit_config
    from vtp_fast.ops.registry import building_for
    from vtp_fast.train.config import DiTTrainConfig
    from vtp_fast.train.flow import flow_loss

    dcfg = load_config(DiTTrainConfig, [resolve(cfg.dit)] if cfg.dit else [],
                       [*cfg.dit_overrides, "latents=/plan", f"run.steps={cfg.dit_steps}"])
    c, h, w = latent_shape
    key = repr(dcfg) + repr(latent_shape) + repr(count_batch)
    if key in _CACHE:
        return _CACHE[key]
    config = dit_config(dcfg.preset, **{"in_channels": c, "input_size": h, **dcfg.overrides})
    meta = torch.device("meta")
    torch.manual_seed(0)
    with building_for("cpu"), meta:
        model = DiT(config)
        x0 = torch.empty(count_batch, c, h, w)
        y = torch.zeros(count_batch, dtype=torch.long)
        tt = torch.empty(count_batch)
    train = flops_of(lambda: flow_loss(model, x0, y, mu=dcfg.mu, sigma=dcfg.sigma, cos_weight=dcfg.cos_weight,
                                     cos_over=dcfg.cos_over)["total"].backward())
    with torch.no_grad():
        forward = flops_of(lambda: model(x0, tt, y))
    _CACHE[key] = {"preset": dcfg.preset, "batch": dcfg.batch, "latents": latent_shape,
                   "step_flops": train / count_batch * dcfg.batch, "forward_flops_per_sample": forward / count_batch}
    return _CACHE[key]


@cache
def inception_flops_per_image() -> int:
    """torch-fidelity's InceptionV3 (FID's pool features) on one image, resized to 299 x 299 inside."""
    from vtp_fast.eval.inception import meta_inception

    model = meta_inception()
    x = torch.empty(1, 3, 299, 299, dtype=torch.uint8, device="meta")
    with torch.no_grad():
        return flops_of(lambda: model(x))


# ---------------------------------------------------------------------------------------------------- the plan
def gpu_plan(cfg: StudyConfig, mfu: float | None = None, *, images: int | None = None,
             held_out_images: int | None = None, measured: str | Path | None = None) -> dict:
    """The GPU-hours of the full study `cfg` on H200s, per stage kind and in total (a JSON-serialisable dict).

    mfu: one MFU for every kind (default: measured H200 rows where present, else ASSUMED_MFU per kind).
    images: the labelled set's size when cfg.max_images is 0 (default DEFAULT_IMAGES, an assumption);
    held_out_images: the held-out set's size for the probe / zero-shot passes (default DEFAULT_HELD_OUT).
    """
    cfg.validate()
    t0 = time.perf_counter()
    assumptions, notes = [], []
    if cfg.max_images:
        n_images, images_source = cfg.max_images, "cfg.max_images"
        if images is not None:
            notes.append(f"images={images} ignored: cfg.max_images={cfg.max_images} bounds the labelled set")
    elif images is not None:
        n_images, images_source = images, "the images argument"
    else:
        n_images, images_source = DEFAULT_IMAGES, "assumed (ImageNet-1k train); pass images= for another set"
        assumptions.append(f"labelled set ({cfg.data}): {n_images} images, {images_source}")
    n_held = held_out_images if held_out_images is not None else DEFAULT_HELD_OUT
    n_held = min(n_held, cfg.max_images or n_held)  # max_images cuts both sets
    if held_out_images is None:
        assumptions.append(f"held-out set ({cfg.held_out}): {n_held} images (ImageNet-1k val) for the linear probe "
                           "and zero-shot encoder passes; pass held_out_images= for another set")

    # MFU per kind
    found = {} if mfu is not None else measured_mfu(measured)
    mfus: dict[str, dict] = {}
    for kind in KINDS:
        if mfu is not None:
            mfus[kind] = {"value": float(mfu), "source": "given (gpu_plan(mfu=...))"}
        elif kind in found:
            mfus[kind] = {"value": found[kind][0], "source": found[kind][1]}
        else:
            value, why = ASSUMED_MFU[kind]
            mfus[kind] = {"value": value, "source": f"{ASSUMED}: {why}"}

    # per-unit FLOPs, each distinct (mix, channels) and each channel count counted once
    steps: dict[tuple[str, int], dict] = {}
    for mix, _, channels in cfg.runs:
        if (mix, channels) not in steps:
            steps[(mix, channels)] = tokenizer_step(cfg, mix, channels)
    by_channels = {ch: s for (_, ch), s in steps.items()}  # encoder / decoder / latents depend on channels only
    dits = {ch: dit_flops(cfg, s["latent_shape"]) for ch, s in by_channels.items()}
    inception = inception_flops_per_image()

    for s in steps.values():
        c, bt = s["counted_at"], s["batch"]
        if c["ssl"] * bt["size"] != bt["ssl"] * c["size"] or c["rec"] * bt["size"] != bt["rec"] * c["size"]:
            notes.append(f"{s['mix']}/c{s['channels']}: batch {bt['size']}:{bt['ssl']}:{bt['rec']} has no same-ratio "
                         f"batch under {MAX_BASE} pairs; counted at {c['size']}:{c['ssl']}:{c['rec']} (rounded) and "
                         "scaled by batch.size")

    n, seeds = cfg.samples, cfg.dit_seeds
    rows: list[dict] = []

    def add(kind: str, name: str, count: float, unit_flops: float) -> None:
        rows.append({"kind": kind, "name": name, "count": count, "unit_flops": unit_flops,
                     "flops": count * unit_flops})

    n_ref = ADM_REFERENCE_IMAGES if cfg.adm_reference else n
    add("inception", f"the reference ({n_ref} images, once) and the floor ({n} real images)", n_ref + n, inception)
    add("inception", "rFID originals (held-out, cached after the first tokenizer)", n, inception)
    for mix, budget, channels in cfg.runs:
        name = f"{mix}-{budget}-c{channels}"
        s, d = steps[(mix, channels)], dits[channels]
        enc, dec = s["encoder_flops_per_image"], s["decoder_flops_per_image"]
        add("tokenizer", f"{name}: pretrain", budget, s["step_flops"])
        add("scoring", f"{name}: rFID reconstructions (encode + decode)", n, enc + dec)
        zero_shot = n_held if MIXES[mix]["clip"] else 0
        add("scoring", f"{name}: probe (labelled + held-out) and zero-shot encoder passes",
            n_images + n_held + zero_shot, enc)
        add("inception", f"{name}: rFID reconstructions", n, inception)
        add("latents", f"{name}: latents of {n_images} images and their flips", 2 * n_images, enc)
        add("sampling", f"{name}: ceiling (decode Gaussian latents)", n, dec)
        add("inception", f"{name}: ceiling", n, inception)
        points = len(cfg.curve_for(budget))
        add("dit_train", f"{name}: DiT {seeds} seed(s) x {cfg.dit_steps} steps", seeds * cfg.dit_steps,
            d["step_flops"])
        add("sampling", f"{name}: {seeds} seed(s) x {points} point(s) x {n} samples x {cfg.sample_steps} Euler steps",
            seeds * points * n * cfg.sample_steps, d["forward_flops_per_sample"])
        add("sampling", f"{name}: decode {seeds} x {points} x {n} samples", seeds * points * n, dec)
        add("inception", f"{name}: {seeds} x {points} x {n} samples", seeds * points * n, inception)

    for r in rows:
        m = mfus[r["kind"]]["value"]
        r["gpu_hours"] = r["flops"] / (PEAK_FLOPS * m) / 3600
    kinds = {}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        kinds[kind] = {"name": KIND_NAMES[kind], "count": sum(r["count"] for r in mine),
                       "tflop": sum(r["flops"] for r in mine) / 1e12,
                       "gpu_hours": sum(r["gpu_hours"] for r in mine), "mfu": mfus[kind]["value"]}
    total_h = sum(k["gpu_hours"] for k in kinds.values())

    any_assumed = any(m["source"].startswith(ASSUMED) for m in mfus.values())
    assumptions += [f"MFU {kind} {m['value']:.2f}: {m['source']}" for kind, m in mfus.items()]
    assumptions.append(f"peak {PEAK_FLOPS / 1e12:.0f} TFLOP/s: bf16 dense matmul measured on the H200 "
                       "(vtp_fast.perf_model.PEAK_FLOPS); GPU-hours = FLOPs / (peak x MFU)")
    notes += [
        "model FLOPs only (torch.utils.flop_counter: matmuls, convolutions, attention); elementwise work, norms, "
        "the optimizer, the EMA update and data loading are in the MFU, not the FLOPs",
        "tokenizer steps: counted on the meta device at the smallest batch b of the config's clip:ssl:rec "
        "ratio, scaled as a B + q B^2; q is the CLIP logits, counted on the CLIP loss alone (each rank builds "
        "local x global logits: N^2 x E over the ranks, per accumulation micro-step, so this term grows with the "
        "global batch, not linearly); KoLeo's pairwise distances are quadratic in the per-rank SSL batch: scaled "
        "linearly here (negligible: a few GFLOP a step)",
        "iBOT masks at their expected size (mask_probability x mean mask_ratio of each global crop); the text "
        "tower at the full context length (no trimming to the longest caption: an upper bound for short captions)",
        "LPIPS-VGG counted apart: forward of reconstruction + target, backward to the reconstruction only",
        "DiT training: dit_steps x seeds per tokenizer (curve points are checkpoints of one run per seed); "
        "sampling without guidance: one DiT forward per Euler step",
        "Inception: the reference's and the rFID originals' features are computed once; k-NN precision / recall "
        "(float64 distances: samples x (samples + reference) x 2048 per scored set) are left out: seconds a set",
        "scoring: linear probe and zero-shot encoder passes over the labelled and held-out sets counted as "
        "encoder forwards; the probe's classifier training is not counted",
    ]
    return {
        "device": "H200", "peak_flops": PEAK_FLOPS,
        "mfu_label": ASSUMED if any_assumed else "measured",
        "study": {"tokenizer": cfg.tokenizer, "tokenizer_overrides": list(cfg.tokenizer_overrides),
                  "mixes": list(cfg.mixes), "budgets": list(cfg.budgets), "channels": cfg.channels,
                  "wide_channels": cfg.wide_channels, "runs": [list(r) for r in cfg.runs], "dit": cfg.dit,
                  "dit_steps": cfg.dit_steps, "dit_curve": list(cfg.dit_curve), "dit_seeds": cfg.dit_seeds,
                  "sample_steps": cfg.sample_steps, "samples": cfg.samples},
        "images": {"labelled": n_images, "labelled_source": images_source, "held_out": n_held},
        "per_unit": {
            "tokenizer_step": {f"{m}/c{c}": s for (m, c), s in steps.items()},
            "dit": {f"c{c}": d for c, d in dits.items()},
            "inception_flops_per_image": inception,
        },
        "mfu": mfus,
        "stages": rows,
        "kinds": kinds,
        "total": {"tflop": sum(k["tflop"] for k in kinds.values()), "gpu_hours": total_h,
                  "gpu_days": total_h / 24},
        "assumptions": assumptions,
        "notes": notes,
        "counted_in_s": time.perf_counter() - t0,
    }


def _num(x: float) -> str:
    """4 significant digits, thousands separated ("1,234", "12.35", "0.0004321")."""
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def plan_markdown(plan: dict) -> str:
    """A table: stage kind, count, TFLOP, MFU, GPU-hours; the total; the assumptions and notes."""
    label = plan.get("mfu_label", ASSUMED)
    lines = [f"## Planned GPU-hours on {plan['device']} ({label})", "",
             "| stage kind | count | TFLOP | MFU | GPU-hours |", "|---|---:|---:|---:|---:|"]
    for kind, k in plan["kinds"].items():
        lines.append(f"| {kind}: {k['name']} | {k['count']:,.0f} | {_num(k['tflop'])} | {k['mfu']:.2f} | "
                     f"{_num(k['gpu_hours'])} |")
    t = plan["total"]
    lines += [f"| **total** | | {_num(t['tflop'])} | | **{_num(t['gpu_hours'])}** ({_num(t['gpu_days'])} GPU-days) |",
              "", "Tokenizer runs:", ""]
    for r in plan["stages"]:
        if r["kind"] == "tokenizer":
            lines.append(f"- {r['name']}: {r['count']} steps x {_num(r['unit_flops'] / 1e12)} TFLOP/step = "
                         f"{_num(r['gpu_hours'])} GPU-hours")
    lines += ["", "Assumptions:", ""] + [f"- {a}" for a in plan["assumptions"]]
    lines += ["", "Notes:", ""] + [f"- {x}" for x in plan["notes"]]
    return "\n".join(lines) + "\n"

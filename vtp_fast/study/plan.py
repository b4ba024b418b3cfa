"""The planned H200 GPU-hours of a scaling study, from model FLOPs and the performance model's peak.

    plan = gpu_plan(load_study("configs/study/vtp_s.yaml"))
    print(plan_markdown(plan))

Every figure is model FLOPs / (PEAK_FLOPS x MFU) for the FULL study a StudyConfig describes (never its dry run).
The FLOPs of each unit of work are counted on the meta device by vtp_fast.measure.study_flops (how: there); this
module says how many units of each the study runs:

  tokenizer    one pretraining step at the configured batch (LPIPS included) x steps, per (mix, budget, channels)
               run; each distinct (mix, channels) is counted once.
  scoring      encode + decode of `samples` held-out images per tokenizer (rFID); the linear probe's and zero-
               shot's encoder passes over the labelled and held-out sets.
  latents      encoder forward x labelled images x 2 (each image and its flip) per tokenizer.
  dit_train    DiT forward + backward (flow loss) at the configured batch x dit_steps x seeds per tokenizer.
  sampling     DiT forward x sample_steps x samples at every curve point of every seed, + the decoder per sample;
               the ceilings' decoder on `samples` Gaussian latents per tokenizer.
  inception    torch-fidelity's InceptionV3 at 299 x 299 x every image scored by ADM's suite (sFID's features come
               from the same forward): the reference once (ADM's batch, ADM_REFERENCE_IMAGES, or `samples` labelled
               images), the floor (samples), rFID (samples reconstructions per tokenizer + the held-out originals
               once), ceilings, every DiT seed at every curve point.

MFU: measured whole-step rows on the H200 (bench/results/h200/*.jsonl, written by bench/device_check.sh) are used
where they exist; otherwise ASSUMED_MFU, labelled "assumed until bench/device_check.sh measures it".
"""

from __future__ import annotations

import time
from pathlib import Path

from vtp_fast.config import load_config
from vtp_fast.measure.perf_model import PEAK_FLOPS
from vtp_fast.measure.study_flops import MAX_BASE, count_dit_step, inception_flops_per_image
from vtp_fast.study.config import MIXES, StudyConfig, resolve
from vtp_fast.study.mfu import measured_mfu
from vtp_fast.study.run import tokenizer_step
from vtp_fast.train.config import DiTTrainConfig

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
# What every plan leaves out or counts in a particular way (after the notes on its own counts).
NOTES = [
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


def _image_counts(cfg: StudyConfig, images: int | None,
                  held_out_images: int | None) -> tuple[int, str, int, list[str], list[str]]:
    """(labelled images, where that count came from, held-out images, assumptions, notes) of the study."""
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
    return n_images, images_source, n_held, assumptions, notes


def _mfu_per_kind(mfu: float | None, measured: str | Path | None) -> dict[str, dict]:
    """kind -> {"value", "source"}: `mfu` for every kind when given, else measured H200 rows, else ASSUMED_MFU."""
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
    return mfus


def _dit_config(cfg: StudyConfig) -> DiTTrainConfig:
    """The DiT training config every tokenizer of the study trains (no latent set: its shape is the tokenizer's)."""
    return load_config(DiTTrainConfig, [resolve(cfg.dit)] if cfg.dit else [],
                       [*cfg.dit_overrides, "latents=/plan", f"run.steps={cfg.dit_steps}"])


def _unit_flops(cfg: StudyConfig) -> tuple[dict[tuple[str, int], dict], dict[int, dict], int, list[str]]:
    """(tokenizer step FLOPs per (mix, channels), DiT FLOPs per channel count, Inception FLOPs per image, notes on
    batches counted at a rounded ratio): each distinct (mix, channels) and each channel count counted once."""
    steps: dict[tuple[str, int], dict] = {}
    for mix, _, channels in cfg.runs:
        if (mix, channels) not in steps:
            steps[(mix, channels)] = tokenizer_step(cfg, mix, channels)
    by_channels = {ch: s for (_, ch), s in steps.items()}  # encoder / decoder / latents depend on channels only
    dits = {ch: count_dit_step(_dit_config(cfg), s["latent_shape"]) for ch, s in by_channels.items()}
    inception = inception_flops_per_image()
    notes = []
    for s in steps.values():
        c, bt = s["counted_at"], s["batch"]
        if c["ssl"] * bt["size"] != bt["ssl"] * c["size"] or c["rec"] * bt["size"] != bt["rec"] * c["size"]:
            notes.append(f"{s['mix']}/c{s['channels']}: batch {bt['size']}:{bt['ssl']}:{bt['rec']} has no same-ratio "
                         f"batch under {MAX_BASE} pairs; counted at {c['size']}:{c['ssl']}:{c['rec']} (rounded) and "
                         "scaled by batch.size")
    return steps, dits, inception, notes


def _stage_rows(cfg: StudyConfig, steps: dict[tuple[str, int], dict], dits: dict[int, dict], inception: int,
                n_images: int, n_held: int) -> list[dict]:
    """One row per stage of the study: its kind, name, count of units, FLOPs per unit and FLOPs."""
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
    return rows


def _kinds(rows: list[dict], mfus: dict[str, dict]) -> dict[str, dict]:
    """Each row's GPU-hours at its kind's MFU (set on the row), and the rows summed per kind."""
    for r in rows:
        m = mfus[r["kind"]]["value"]
        r["gpu_hours"] = r["flops"] / (PEAK_FLOPS * m) / 3600
    kinds = {}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        kinds[kind] = {"name": KIND_NAMES[kind], "count": sum(r["count"] for r in mine),
                       "tflop": sum(r["flops"] for r in mine) / 1e12,
                       "gpu_hours": sum(r["gpu_hours"] for r in mine), "mfu": mfus[kind]["value"]}
    return kinds


def gpu_plan(cfg: StudyConfig, mfu: float | None = None, *, images: int | None = None,
             held_out_images: int | None = None, measured: str | Path | None = None) -> dict:
    """The GPU-hours of the full study `cfg` on H200s, per stage kind and in total (a JSON-serialisable dict).

    mfu: one MFU for every kind (default: measured H200 rows where present, else ASSUMED_MFU per kind).
    images: the labelled set's size when cfg.max_images is 0 (default DEFAULT_IMAGES, an assumption);
    held_out_images: the held-out set's size for the probe / zero-shot passes (default DEFAULT_HELD_OUT).
    """
    cfg.validate()
    t0 = time.perf_counter()
    n_images, images_source, n_held, assumptions, notes = _image_counts(cfg, images, held_out_images)
    mfus = _mfu_per_kind(mfu, measured)
    steps, dits, inception, rounded = _unit_flops(cfg)
    rows = _stage_rows(cfg, steps, dits, inception, n_images, n_held)
    kinds = _kinds(rows, mfus)
    total_h = sum(k["gpu_hours"] for k in kinds.values())
    any_assumed = any(m["source"].startswith(ASSUMED) for m in mfus.values())
    assumptions += [f"MFU {kind} {m['value']:.2f}: {m['source']}" for kind, m in mfus.items()]
    assumptions.append(f"peak {PEAK_FLOPS / 1e12:.0f} TFLOP/s: bf16 dense matmul measured on the H200 "
                       "(vtp_fast.measure.perf_model.PEAK_FLOPS); GPU-hours = FLOPs / (peak x MFU)")
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
        "notes": notes + rounded + NOTES,
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

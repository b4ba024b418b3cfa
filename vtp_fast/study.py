"""`vtp-fast study`: the paper's scaling study at a scale that fits a 2-core CPU.

Tokenizers are pretrained on the emoji set (three styles; OpenMoji held out) with four objective mixes —
reconstruction only, CLIP + AE, SSL + AE, CLIP + SSL + AE — at each compute budget, plus the full objective with
256 latent channels instead of 64 at the largest budget. Each is scored (held-out rFID, PSNR, zero-shot over the
held-out emoji names, linear probe of the 9 categories trained on the three styles and tested on the held-out
one), then the same DiT is trained on its latents (class-conditional on the categories) and judged by gFID of
its samples against the training images, at several DiT training lengths for the largest budget.

Every stage writes its result under `out/` and is skipped when that result exists, so an interrupted study
continues where it stopped. `--quick` shrinks everything to check that each stage runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vtp_fast.config import load_config

MIXES = {  # objective weights (published 0.1 rec + 1 ssl + 1 clip for the full objective)
    "rec": {"rec": 1.0, "clip": 0.0, "ssl": 0.0},
    "clip+ae": {"rec": 0.1, "clip": 1.0, "ssl": 0.0},
    "ssl+ae": {"rec": 0.1, "clip": 0.0, "ssl": 1.0},
    "clip+ssl+ae": {"rec": 0.1, "clip": 1.0, "ssl": 1.0},
}


@dataclass
class StudyConfig:
    budgets: tuple[int, ...] = (150, 450)  # tokenizer training steps (batch 64 pairs)
    dit_steps: int = 1500
    dit_curve: tuple[int, ...] = (375, 750, 1500)  # gFID along DiT training (largest budget)
    fid_samples: int = 300  # FID/KID images (CPU Inception: a few per second)
    sample_steps: int = 50  # Euler steps
    wide_channels: int = 256  # the 64-vs-256 comparison (full objective, largest budget)
    extra: list[str] = field(default_factory=list)  # overrides for every tokenizer run


QUICK = StudyConfig(budgets=(3,), dit_steps=6, dit_curve=(3, 6), fid_samples=12, sample_steps=2,
                    extra=["run.eval_every=3", "data.eval_images=16", "batch.size=16", "batch.ssl=4", "batch.rec=8"])


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _save(path: Path, result: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def train_tokenizer(out: Path, mix: str, steps: int, channels: int, cfg: StudyConfig) -> dict:
    from vtp_fast.train.pretrain import PretrainConfig, build_trainer, pretrain, to_device
    from vtp_fast.train.profile import count_flops

    result_file = out / "result.json"
    if (r := _done(result_file)) is not None:
        return r
    w = MIXES[mix]
    overrides = [f"objective.rec={w['rec']}", f"objective.clip={w['clip']}", f"objective.ssl={w['ssl']}",
                 f"run.steps={steps}", f"run.out_dir={out}", "run.checkpoint_every=1000000", "run.resume=auto",
                 "run.tensorboard=false", f"model.overrides={{vision_feature_bottleneck: {channels}}}",
                 "run.log_every=10", *cfg.extra]
    if w["ssl"] == 0:
        overrides.append("batch.ssl=0")
    pcfg = load_config(PretrainConfig, [Path(__file__).resolve().parents[1] / "configs/tokenizer/tiny.yaml"],
                       overrides)
    t0 = time.perf_counter()
    pretrain(pcfg)
    seconds = time.perf_counter() - t0
    # compute: model FLOPs of one step (forward + backward, teacher included) times the steps
    from vtp_fast.data.pairs import StepBatches
    from vtp_fast.train.pretrain import load_pairs, schedules

    torch.manual_seed(0)
    t = build_trainer(pcfg, torch.device("cpu"))
    pairs, _ = load_pairs(pcfg, t.model.config.text_context_length)
    batch = StepBatches(pairs, t.shape, pcfg.ssl.views, seed=0, trim_text=t.causal_text)[0]
    flops = count_flops(t, to_device(batch, torch.device("cpu")), schedules(pcfg, 0))
    return _save(result_file, {"mix": mix, "steps": steps, "channels": channels, "seconds": seconds,
                               "tokenizer_gflops": flops * steps / 1e9, "checkpoint": str(out / "checkpoint")})


def score_tokenizer(out: Path, checkpoint: str, cfg: StudyConfig, held_out, train_set) -> dict:
    from vtp_fast.eval import evaluate
    from vtp_fast.eval.probe import zero_shot_names
    from vtp_fast.models.pretrained import load_pretrained

    if (r := _done(out / "scores.json")) is not None:
        return r
    model = load_pretrained(checkpoint)
    scores = evaluate.reconstruction_scores(model, held_out, cfg.fid_samples, progress=False)
    scores = {k: v for k, v in scores.items() if k != "n"}
    if model.config.train_clip:
        from vtp_fast.data.pairs import normalize_u8

        zs = zero_shot_names(model, normalize_u8(held_out.images), held_out.captions)
        scores |= {"zero_shot_top1": zs["top1"], "zero_shot_top5": zs["top5"], "zero_shot_chance": zs["chance"]}
    scores |= evaluate.linear_probe_scores(model, train_set, held_out, epochs=60)
    return _save(out / "scores.json", scores)


def generative_scores(out: Path, checkpoint: str, cfg: StudyConfig, train_set, curve: tuple[int, ...]) -> dict:
    """Latents of the training images, the same DiT trained on them, gFID at the DiT steps in `curve` (each
    point's score is kept, so an interrupted study resumes at the next point)."""
    from vtp_fast.eval.latents import extract_latents
    from vtp_fast.models.pretrained import load_pretrained

    if (r := _done(out / "generation.json")) is not None:
        return r
    tokenizer = load_pretrained(checkpoint)
    if not (out / "latents" / "meta.json").exists():
        extract_latents(tokenizer, train_set, out / "latents", tokenizer=checkpoint, progress=False)
    per_class = max(1, cfg.fid_samples // len(train_set.class_names))
    labels = torch.arange(len(train_set.class_names)).repeat_interleave(per_class)
    result = {"dit_steps": [], "gfid": [], "gkid": []}
    previous = 0
    for stop in curve:  # one DiT run resumed to each curve point, exported and sampled there
        if (g := _done(out / f"dit-{stop}" / "scores.json")) is None:
            g = _score_dit_at(out, stop, previous, cfg, tokenizer, train_set, labels)
        result["dit_steps"].append(stop)
        result["gfid"].append(g["gfid"])
        result["gkid"].append(g["gkid"])
        previous = stop
    return _save(out / "generation.json", result)


def _score_dit_at(out: Path, stop: int, previous: int, cfg: StudyConfig, tokenizer, train_set, labels) -> dict:
    from vtp_fast.eval import evaluate
    from vtp_fast.train.dit import DiTTrainConfig, export_dit, generate, load_dit, train_dit

    dcfg = load_config(DiTTrainConfig, [], [
        f"latents={out / 'latents'}", f"steps={cfg.dit_steps}", f"stop_at={stop}", f"out_dir={out / 'dit'}",
        f"checkpoint_every={max(1, stop - previous)}", "resume=auto", "log_every=50",
        f"warmup_steps={min(100, cfg.dit_steps // 10 + 1)}"])
    train_dit(dcfg)
    dit, meta = load_dit(out / "dit" / "dit")
    images = generate(dit, meta, tokenizer, labels, steps=cfg.sample_steps, seed=0)
    g = evaluate.generation_scores(images, train_set, len(labels), progress=False)
    export_dit(dit, meta, out / f"dit-{stop}")
    return _save(out / f"dit-{stop}" / "scores.json", {"gfid": g["gfid"], "gkid": g["gkid"]})


def run_study(out: str | Path, quick: bool = False) -> Path:
    from vtp_fast.eval.latents import load_images

    cfg = QUICK if quick else StudyConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_set = load_images("emoji:google,twitter,fluent")
    held_out = load_images("emoji:openmoji")
    runs = [(mix, b, 64) for b in cfg.budgets for mix in MIXES] + [("clip+ssl+ae", cfg.budgets[-1],
                                                                     cfg.wide_channels)]
    rows = []
    for i, (mix, budget, channels) in enumerate(runs):
        name = f"{mix}-{budget}-c{channels}"
        print(f"\n=== study [{i + 1}/{len(runs)}] {name} ({(time.perf_counter() - t0) / 60:.1f} min elapsed)")
        run_dir = out / name
        tok = train_tokenizer(run_dir / "tokenizer", mix, budget, channels, cfg)
        scores = score_tokenizer(run_dir, tok["checkpoint"], cfg, held_out, train_set)
        curve = cfg.dit_curve if budget == cfg.budgets[-1] else (cfg.dit_steps,)
        gen = generative_scores(run_dir, tok["checkpoint"], cfg, train_set, curve)
        rows.append({"name": name, **tok, **scores, "gfid": gen["gfid"][-1], "gkid": gen["gkid"][-1],
                     "gfid_curve": list(zip(gen["dit_steps"], gen["gfid"], strict=True))})
    report(rows, cfg, out, time.perf_counter() - t0)
    return out


def report(rows: list[dict], cfg: StudyConfig, out: Path, seconds: float) -> None:
    from vtp_fast.benchmark import env_info, markdown_table
    from vtp_fast.eval.plots import plt

    (out / "study.json").write_text(json.dumps({"rows": rows, "config": cfg.__dict__, "seconds": seconds,
                                                "env": env_info()}, indent=1, default=list))
    columns = ["name", "tokenizer_gflops", "rfid", "psnr", "zero_shot_top1", "probe_cls_meanpatch", "probe_latent",
               "gfid", "gkid"]
    table = markdown_table(rows, columns)
    note = (f"FID/KID from {cfg.fid_samples} images (CPU; noisy at this count), DiT {cfg.dit_steps} steps, "
            f"{cfg.sample_steps} Euler steps; this invocation took {seconds / 60:.1f} min (stages already done are "
            "skipped)")
    (out / "study.md").write_text(f"# scaling study\n\n{note}\n\n{table}\n")
    print(table)
    print(note)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for mix in MIXES:
        pts = sorted((r["tokenizer_gflops"], r["gfid"]) for r in rows if r["mix"] == mix and r["channels"] == 64)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mix)
    ax.set(xscale="log", xlabel="tokenizer training compute (GFLOP)", ylabel=f"gFID ({cfg.fid_samples} samples)",
           title="generation from each tokenizer's latents vs its training compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gfid_vs_compute.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in rows:
        if r["steps"] == cfg.budgets[-1] and len(r["gfid_curve"]) > 1:
            ax.plot([p[0] for p in r["gfid_curve"]], [p[1] for p in r["gfid_curve"]], marker="o",
                    label=f"{r['mix']} ({r['channels']} ch)")
    ax.set(xlabel="DiT training steps", ylabel="gFID", title="DiT convergence on each tokenizer's latents")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gfid_vs_dit_steps.png")
    plt.close(fig)

    wide = [r for r in rows if r["mix"] == "clip+ssl+ae" and r["steps"] == cfg.budgets[-1]]
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2), dpi=120)
    for ax, key in zip(axes, ("rfid", "gfid"), strict=True):
        ax.bar([str(r["channels"]) for r in wide], [r[key] for r in wide], color=["#4c72b0", "#dd8452"])
        ax.set(title=key, xlabel="latent channels")
    fig.suptitle("full objective: 64 vs 256 latent channels")
    fig.tight_layout()
    fig.savefig(out / "channels.png")
    plt.close(fig)
    print(f"  table {out / 'study.md'}\n  plots {out / 'gfid_vs_compute.png'}, {out / 'gfid_vs_dit_steps.png'}, "
          f"{out / 'channels.png'}")

"""The generative probe: a tokenizer's generative value, measured while it trains.

Encode a fixed set of images with the current tokenizer, train a small DiT on those latents for a fixed budget,
sample as many images as the set holds and report gFID against it. Cheap enough to run every few thousand steps
on a GPU (and every few hundred on a CPU with the tiny defaults); the numbers compare checkpoints of one run.
It trains (vtp_fast.train.dit) and scores (vtp_fast.eval), so it sits in the layer above both.
"""

from __future__ import annotations

from pathlib import Path

from vtp_fast.data.labelled import LabelledImages
from vtp_fast.eval.evaluate import generation_scores
from vtp_fast.eval.latents import extract_latents
from vtp_fast.models.vtp import VTP
from vtp_fast.train.config import DiTOptimConfig, DiTRunConfig, DiTTrainConfig
from vtp_fast.train.dit import generate, load_dit, train_dit


def generative_probe(model: VTP, data: LabelledImages, workdir: str | Path, *, dit_preset: str = "dit-tiny",
                     dit_steps: int = 300, batch: int = 64, sample_steps: int = 25, seed: int = 0) -> dict:
    """-> {"gen_probe_gfid", "gen_probe_kid"} of len(data) samples against `data`."""
    workdir = Path(workdir)
    was_training = model.training
    model.eval()
    try:
        extract_latents(model, data, workdir / "latents", flip=False, tokenizer="(in training)", progress=False)
        run = DiTRunConfig(steps=dit_steps, out_dir=str(workdir / "dit"), log_every=max(1, dit_steps // 4), seed=seed,
                           checkpoint_every=dit_steps)
        train_dit(DiTTrainConfig(latents=str(workdir / "latents"), preset=dit_preset, batch=batch,
                                 optim=DiTOptimConfig(warmup_steps=min(50, dit_steps // 5 + 1)), run=run))
        dit, meta = load_dit(workdir / "dit" / "dit", device=next(model.parameters()).device)
        images = generate(dit, meta, model, data.labels, steps=sample_steps, seed=seed)
        scores = generation_scores(images, data, len(data), progress=False)
    finally:
        model.train(was_training)
    return {"gen_probe_gfid": scores["gfid"], "gen_probe_kid": scores["gkid"]}

"""Benchmark: the whole multi-objective pretraining step, eager against per-block torch.compile, side by side.

    python bench/bench_step.py [--device cuda] [--preset vtp-b] [--out rows.jsonl] [--quick]

Synthetic pairs (random pixels, short captions) so it needs no data set; reports steps/s and images/s (median
step time after warm-up) for the same config eager and compiled, with the objective and batch recorded.
"""

from __future__ import annotations

import torch

from vtp_fast.benchmark import Emit, RowLog, bench_cli, measure, resolved_backends
from vtp_fast.config import load_config
from vtp_fast.data.pairs import StepBatches, synthetic_pairs
from vtp_fast.train.config import PretrainConfig
from vtp_fast.train.trainer import build_trainer, schedules, train_step

TABLE_COLUMNS = ["mode", "preset", "batch", "median_ms", "steps_per_s", "images_per_s", "speedup_vs_eager"]
CPU = ["model.preset=vtp-tiny", "batch.size=32", "batch.ssl=8", "batch.rec=16", "objective.perceptual=0"]
QUICK = ["model.preset=vtp-nano", "data.image_size=32", "batch.size=4", "batch.ssl=2", "batch.rec=2",
         "ssl.views.global_size=32", "ssl.views.local_size=16", "ssl.views.local_crops=2", "ssl.prototypes=64",
         "ssl.hidden=32", "ssl.bottleneck=16", "objective.perceptual=0"]
GPU = ["model.preset=vtp-b", "data.image_size=256", "batch.size=256", "batch.ssl=64", "batch.rec=32",
       "ssl.views.global_size=256", "ssl.views.local_size=96", "ssl.views.local_crops=8", "ssl.prototypes=65536",
       "ssl.hidden=2048", "ssl.bottleneck=256", "objective.perceptual=0", "run.precision=bf16"]


def run(device: str = "cpu", quick: bool = False, overrides: list[str] | None = None,
        emit: Emit | None = None) -> list[dict]:
    """Eager, then compiled; each row is emitted when its mode is measured ("speedup_vs_eager" against the eager
    row). "backend": the op backends the built trainer's layers and losses resolved to."""
    base = overrides or (QUICK if quick else GPU if device == "cuda" else CPU)
    rows = RowLog(emit)
    for mode in ("eager", "compiled"):
        cfg = load_config(PretrainConfig, [], [*base, f"run.compile={str(mode == 'compiled').lower()}",
                                               f"run.device={device}"])
        torch.manual_seed(0)
        t = build_trainer(cfg, torch.device(device))
        pairs = synthetic_pairs(max(64, cfg.batch.size * 4), cfg.data.image_size, t.model.config.text_context_length)
        data = StepBatches(pairs, t.shape, cfg.ssl.views, seed=0, trim_text=t.causal_text)
        batches = [data[i].to(device) for i in range(4)]
        step = iter(range(1 << 30))

        def one_step():
            i = next(step)
            train_step(t, [batches[i % len(batches)]], schedules(cfg, i))

        timing = measure(one_step, device, warmup=2 if quick else 3, repeat=2 if quick else 10)
        eager_ms = rows.rows[0]["median_ms"] if rows.rows else timing["median_ms"]
        rows.add({"bench": "step", "mode": mode, "device": device, "backend": resolved_backends(t.student),
                  "preset": cfg.model.preset, "batch": cfg.batch.size, "ssl": cfg.batch.ssl, "rec": cfg.batch.rec,
                  "image_size": cfg.data.image_size, "objective": t.objective.weights, **timing,
                  "steps_per_s": 1e3 / timing["median_ms"], "images_per_s": cfg.batch.size * 1e3 / timing["median_ms"],
                  "speedup_vs_eager": eager_ms / timing["median_ms"]})
    return rows.rows


def main() -> None:
    bench_cli(run, TABLE_COLUMNS, __doc__, lambda p: p.add_argument(
        "overrides", nargs="*", help="config overrides replacing the default shapes"), run_args=("overrides",))


if __name__ == "__main__":
    main()

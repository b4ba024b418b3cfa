"""Benchmark: the whole multi-objective pretraining step, eager, per-block torch.compile, bf16 autocast and both,
fused AdamW, and fused AdamW compiled per block or as one graph (run.compile_scope), side by side (interleaved
rounds), with its FLOPs and, on the CPU, its share of the measured matmul ceiling.

    python bench/bench_step.py [--device cuda] [--preset vtp-b] [--out rows.jsonl] [--quick]

Synthetic pairs (random pixels, short captions) so it needs no data set; reports steps/s and images/s (median
step time after warm-up) for the same config in every mode, with the objective and batch recorded. CPU: the
shapes of `make train` (configs/tokenizer/tiny.yaml: vtp-tiny, 64 pairs, SSL 16, reconstruction 32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vtp_fast.config import load_config
from vtp_fast.data.batch import Batch
from vtp_fast.data.pairs import synthetic_pairs
from vtp_fast.data.step_batches import StepBatches
from vtp_fast.measure.rows import Emit, RowLog, bench_cli, resolved_backends
from vtp_fast.measure.timing import time_interleaved
from vtp_fast.train.config import PretrainConfig
from vtp_fast.train.flops import count_flops
from vtp_fast.train.trainer import Trainer, build_trainer, schedules, train_step

TABLE_COLUMNS = ["mode", "preset", "batch", "median_ms", "images_per_s", "tflop_per_s", "ceiling_share",
                 "speedup_vs_eager"]
CPU = ["model.preset=vtp-tiny", "batch.size=64", "batch.ssl=16", "batch.rec=32", "objective.perceptual=0"]  # make train
QUICK = ["model.preset=vtp-nano", "data.image_size=32", "batch.size=4", "batch.ssl=2", "batch.rec=2",
         "ssl.views.global_size=32", "ssl.views.local_size=16", "ssl.views.local_crops=2", "ssl.prototypes=64",
         "ssl.hidden=32", "ssl.bottleneck=16", "objective.perceptual=0"]
GPU = ["model.preset=vtp-b", "data.image_size=256", "batch.size=256", "batch.ssl=64", "batch.rec=32",
       "ssl.views.global_size=256", "ssl.views.local_size=96", "ssl.views.local_crops=8", "ssl.prototypes=65536",
       "ssl.hidden=2048", "ssl.bottleneck=256", "objective.perceptual=0"]


MODES = {  # mode -> its overrides
    "eager": [], "compiled": ["run.compile=true"], "bf16": ["run.precision=bf16"],
    "compiled_bf16": ["run.compile=true", "run.precision=bf16"], "fused_adamw": ["optim.fused=true"],
    "compiled_fused_adamw": ["run.compile=true", "optim.fused=true"],
    "compiled_whole_fused_adamw": ["run.compile=true", "run.compile_scope=whole", "optim.fused=true"]}
BRIEF = ("eager", "compiled")  # --quick, and CUDA (where "auto" precision is bf16 already)


def step_setup(overrides: list[str], device: str) -> tuple[PretrainConfig, Trainer, list[Batch], Callable[[], None]]:
    """The config of `overrides`, its trainer (seed 0), four synthetic batches on `device`, and a call that trains
    one step on the next of them."""
    cfg = load_config(PretrainConfig, [], [*overrides, f"run.device={device}"])
    torch.manual_seed(0)
    t = build_trainer(cfg, torch.device(device))
    pairs = synthetic_pairs(max(64, cfg.batch.size * 4), cfg.data.image_size, t.model.config.text_context_length)
    data = StepBatches(pairs, t.shape, cfg.ssl.views, seed=0, trim_text=t.causal_text)
    batches = [data[i].to(device) for i in range(4)]
    counter = iter(range(1 << 30))

    def step() -> None:
        i = next(counter)
        train_step(t, [batches[i % len(batches)]], schedules(cfg, i))
    return cfg, t, batches, step


def run(device: str = "cpu", quick: bool = False, overrides: list[str] | None = None,
        emit: Emit | None = None) -> list[dict]:
    """The same step in every mode of MODES (BRIEF under --quick and on CUDA; each its own trainer, same seed),
    warmed up, then timed one step per mode per round, rounds interleaved (A B C D, then D C B A); one row per mode
    with the median over rounds, the step's FLOPs (forward + backward, teacher included, counted once in eager) and
    "speedup_vs_eager"."""
    base = overrides or (QUICK if quick else GPU if device == "cuda" else CPU)
    rounds, warmup = (2, 2) if quick else (9, 3)
    modes = {m: MODES[m] for m in (BRIEF if quick or device == "cuda" else MODES)}
    runs = {mode: step_setup([*base, *extra], device) for mode, extra in modes.items()}
    cfg, t, batches, _ = runs["eager"]
    flops = count_flops(t, batches[0], schedules(cfg, 0))
    timed = dict(zip(modes, time_interleaved([runs[mode][3] for mode in modes], device, rounds=rounds,
                                             warmup=warmup), strict=True))
    rows = RowLog(emit)
    for mode, timing in timed.items():
        cfg, t, _, _ = runs[mode]
        ms = timing["median_ms"]
        rows.add({"bench": "step", "mode": mode, "device": device, "backend": resolved_backends(t.student),
                  "preset": cfg.model.preset, "batch": cfg.batch.size, "ssl": cfg.batch.ssl, "rec": cfg.batch.rec,
                  "image_size": cfg.data.image_size, "objective": t.objective.weights, **timing, "flops": flops,
                  # run.precision "auto" is bf16 on CUDA
                  "dtype": "bfloat16" if cfg.run.precision == "bf16" or device == "cuda" else "float32",
                  "tflop_per_s": flops / (ms / 1e3) / 1e12,
                  "steps_per_s": 1e3 / ms, "images_per_s": cfg.batch.size * 1e3 / ms,
                  "speedup_vs_eager": timed["eager"]["median_ms"] / ms})
    return rows.rows


def main() -> None:
    bench_cli(run, TABLE_COLUMNS, __doc__, lambda p: p.add_argument(
        "overrides", nargs="*", help="config overrides replacing the default shapes"), run_args=("overrides",))


if __name__ == "__main__":
    main()

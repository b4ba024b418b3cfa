"""Two pretraining jobs on the same cores: seconds per step alone and side by side, under each OpenMP wait setting.

    python bench/contention.py [--steps 40] [--out bench/results/cpu/contention.jsonl]

Each job is `vtp-fast pretrain` of the tiny config on synthetic data (the step `make train` runs) with the thread
budget's torch threads, fixed for the run (vtp_fast.threads: every CPU of the process), logging every 2 steps; the
figure is the median logged seconds per step after the first 6 steps. The settings differ only in the OpenMP
runtime and how its idle threads wait, which changes no result:
    the budget          what the command line does: Intel's runtime, its wait following the load (OpenMPWait)
    Intel's, fixed      the same runtime with its default wait held (KMP_BLOCKTIME=200)
    libgomp, spin       torch's own libgomp with GOMP_SPINCOUNT=vtp_fast.threads.SPIN_COUNT (the budget before)
    libgomp's default   GOMP_SPINCOUNT=300000, libgomp's own value (about 3 ms of spinning), what a job did before
    passive             libgomp with OMP_WAIT_POLICY=PASSIVE: sleep at once
Alone and side by side are interleaved per setting (alone, pair, alone, pair, ...: `--rounds`), so a drift in the
machine's speed touches every setting alike; the row keeps every measurement and reports medians. The load average
at the start is recorded: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/tokenizer/tiny.yaml", "data.synthetic=true", "run.log_every=2", "run.eval_every=100000",
        "run.checkpoint_every=100000", "run.tensorboard=false"]
WAIT_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "VTP_FAST_OPENMP")


def jobs(n: int, steps: int, env_extra: dict[str, str]) -> list[float]:
    """Median seconds per step (after step 6) of each of `n` simultaneous pretraining runs."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**{k: v for k, v in os.environ.items() if k not in WAIT_VARS}, **env_extra}
        procs = [subprocess.Popen([sys.executable, "-m", "vtp_fast.cli", "pretrain", *ARGS, f"run.steps={steps}",
                                   f"run.out_dir={tmp}/{i}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for i in range(n)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode:
                raise SystemExit(err[-2000:])
        medians = []
        for i in range(n):
            rows = [json.loads(line) for line in Path(f"{tmp}/{i}/metrics.jsonl").read_text().splitlines()]
            medians.append(statistics.median(r["step_s"] for r in rows if "step_s" in r and r["step"] > 6))
        return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps per job")
    parser.add_argument("--rounds", type=int, default=2, help="alone + pair measurements per setting, interleaved")
    parser.add_argument("--out", help="append the JSON row to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from vtp_fast.threads import prepare_openmp
    prepare_openmp()  # so that the row's budget describes what the command line does
    from vtp_fast.measure.rows import write_rows
    from vtp_fast.measure.timing import env_info
    from vtp_fast.threads import SPIN_COUNT, OpenMPWait, budget, intel_openmp_path

    gnu = {"VTP_FAST_OPENMP": "gnu"}
    settings = {"the budget": {}, "Intel's, fixed": {"KMP_BLOCKTIME": str(OpenMPWait.ALONE_MS)},
                f"libgomp, spin {SPIN_COUNT}": {**gnu, "GOMP_SPINCOUNT": str(SPIN_COUNT)},
                "libgomp's default": {**gnu, "GOMP_SPINCOUNT": "300000"},
                "passive": {**gnu, "OMP_WAIT_POLICY": "PASSIVE"}}
    row = {"bench": "contention", "config": " ".join(ARGS), "steps": args.steps, "budget": budget().describe(),
           "intel_openmp": intel_openmp_path() is not None,
           "load_average_at_start": os.getloadavg()[0], **env_info("cpu")}
    runs = {name: {"alone_s": [], "side_by_side_s": []} for name in settings}
    for _ in range(args.rounds):
        for name, env in settings.items():
            runs[name]["alone_s"] += jobs(1, args.steps, env)
            runs[name]["side_by_side_s"] += jobs(2, args.steps, env)
            print(f"{name}: alone {runs[name]['alone_s'][-1]:.3f} s/step, two at once "
                  f"{runs[name]['side_by_side_s'][-2]:.3f} and {runs[name]['side_by_side_s'][-1]:.3f}", flush=True)
    base = statistics.median(runs["libgomp's default"]["alone_s"])
    for name, r in runs.items():
        alone, pair = statistics.median(r["alone_s"]), statistics.median(r["side_by_side_s"])
        row[name] = {**r, "alone_median_s": alone, "side_by_side_median_s": pair, "slowdown": pair / alone,
                     "alone_vs_libgomp_default": alone / base, "side_by_side_vs_libgomp_default_alone": pair / base}
        print(f"{name}: alone {alone:.3f} s/step ({alone / base:.2f}x libgomp's default alone); two at once "
              f"{pair:.3f} s/step each ({pair / alone:.2f}x alone, {pair / base:.2f}x libgomp's default alone)",
              flush=True)
    write_rows([row], args.out)


if __name__ == "__main__":
    main()

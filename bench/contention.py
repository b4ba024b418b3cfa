"""Two pretraining jobs on the same cores: seconds per step alone and side by side, with the thread budget's
rebalancing (vtp_fast.threads: torch threads fitted to the CPUs other processes leave free, checked at every logged
step) and with torch's threads fixed at the CPU count (what a job did before the budget).

    python bench/contention.py [--steps 80] [--out bench/results/cpu/contention.jsonl]

Each job is `vtp-fast pretrain` of the tiny config on synthetic data (the step `make train` runs), logging every 5
steps; the figure is the median logged seconds per step after the first 20 steps (the rebalancing needs a logged
window to see the other job). Run it on an otherwise idle machine.
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
ARGS = ["--config", "configs/tokenizer/tiny.yaml", "data.synthetic=true", "run.log_every=5", "run.eval_every=100000",
        "run.checkpoint_every=100000", "run.tensorboard=false"]


def jobs(n: int, steps: int, *extra: str) -> list[float]:
    """Median seconds per step (after step 20) of each of `n` simultaneous pretraining runs."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        procs = [subprocess.Popen([sys.executable, "-m", "vtp_fast.cli", "pretrain", *ARGS, f"run.steps={steps}",
                                   f"run.out_dir={tmp}/{i}", *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for i in range(n)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode:
                raise SystemExit(err[-2000:])
        medians = []
        for i in range(n):
            rows = [json.loads(line) for line in Path(f"{tmp}/{i}/metrics.jsonl").read_text().splitlines()]
            medians.append(statistics.median(r["step_s"] for r in rows if "step_s" in r and r["step"] > 20))
        return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80, help="steps per job")
    parser.add_argument("--out", help="append the JSON row to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from vtp_fast.benchmark import env_info
    from vtp_fast.threads import budget, process_cpus

    row = {"bench": "contention", "config": " ".join(ARGS), "steps": args.steps, "budget": budget().describe(),
           **env_info("cpu")}
    alone = jobs(1, args.steps)[0]
    row["alone_s"] = alone
    print(f"one job alone: {alone:.3f} s/step", flush=True)
    for name, extra in (("rebalanced (the budget)", ()), ("fixed threads", (f"run.threads={process_cpus()}",))):
        pair = jobs(2, args.steps, *extra)
        row[name] = {"side_by_side_s": pair, "slowdown": statistics.mean(pair) / alone}
        print(f"two at once, {name}: {pair[0]:.3f} and {pair[1]:.3f} s/step ({row[name]['slowdown']:.2f}x one job "
              "alone)", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

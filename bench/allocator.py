"""What keeping freed memory (vtp_fast.allocator) is worth: each CPU workload with the engine's malloc setting and
with glibc's default, each in its own process (the setting is process-wide), interleaved.

    python bench/allocator.py [--workloads codec-s,codec-b,tiny-step,dit-b] [--rounds 3] [--out rows.jsonl]

Workloads: bench/matmul_bound.py's, fp32, eager, random weights (VTP-S / VTP-B encode + decode at 256 px, batch 4;
the tiny pretraining step of `make train`; a DiT-B/1 training step, batch 8). Per round and setting one process
builds the workload, calls it `--warmup` times, then times `--repeats` calls: the median, and per call the system
CPU time and the page faults (getrusage), most of which the kernel's zeroing of fresh pages costs. Rounds run the
settings in alternating order (engine, default, default, engine, ...); the row reports the medians over rounds and
the ratio default / engine. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"engine": {}, "glibc_default": {"VTP_FAST_MALLOC": "default"}}


def child(workload: str, warmup: int, repeats: int) -> None:
    """In a fresh process: set malloc as the command line does (unless VTP_FAST_MALLOC=default), time the
    workload, print one JSON line."""
    from vtp_fast.allocator import prepare_allocator

    setting = prepare_allocator()
    sys.path.insert(0, str(ROOT))
    from bench.matmul_bound import WORKLOADS

    call = WORKLOADS[workload]()
    for _ in range(warmup):
        call()
    times, before = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"median_ms": statistics.median(times) * 1e3, "malloc": setting,
                      "sys_ms_per_call": (after.ru_stime - before.ru_stime) / repeats * 1e3,
                      "faults_per_call": (after.ru_minflt - before.ru_minflt) / repeats}))


def measure(workload: str, setting: str, warmup: int, repeats: int) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "VTP_FAST_MALLOC"}, **SETTINGS[setting]}
    out = subprocess.run([sys.executable, __file__, "--child", workload, "--warmup", str(warmup), "--repeats",
                          str(repeats)], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="codec-s,codec-b,tiny-step,dit-b")
    p.add_argument("--rounds", type=int, default=3, help="processes per setting, in alternating order")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help="append the JSON rows to this file")
    args = p.parse_args()
    if args.child:
        return child(args.child, args.warmup, args.repeats)
    from vtp_fast.measure.rows import write_rows
    from vtp_fast.measure.timing import env_info

    load = os.getloadavg()[0]
    for workload in args.workloads.split(","):
        runs = {s: [] for s in SETTINGS}
        for r in range(args.rounds):
            for s in (SETTINGS if r % 2 == 0 else reversed(SETTINGS)):
                runs[s].append(measure(workload, s, args.warmup, args.repeats))
        row = {"bench": "allocator", "workload": workload, "rounds": args.rounds, "repeats": args.repeats,
               "load_average_at_start": load, **env_info("cpu")}
        for s, measured in runs.items():
            for key in ("median_ms", "sys_ms_per_call", "faults_per_call"):
                row[f"{s}_{key}"] = statistics.median(m[key] for m in measured)
            row[f"{s}_malloc"] = measured[0]["malloc"]
            row[f"{s}_runs_ms"] = [m["median_ms"] for m in measured]
        row["speedup"] = row["glibc_default_median_ms"] / row["engine_median_ms"]
        del row["malloc"]  # this process's setting, not the workloads'
        print(f"{workload}: {row['engine_median_ms']:.0f} ms kept against {row['glibc_default_median_ms']:.0f} ms "
              f"glibc's default ({row['speedup']:.2f}x); system time {row['engine_sys_ms_per_call']:.0f} against "
              f"{row['glibc_default_sys_ms_per_call']:.0f} ms, page faults {row['engine_faults_per_call']:.0f} "
              f"against {row['glibc_default_faults_per_call']:.0f} a call", flush=True)
        write_rows([row], args.out)


if __name__ == "__main__":
    main()

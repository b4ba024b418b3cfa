"""What keeping freed memory (vtp_fast.allocator) is worth: each CPU workload with the engine's malloc setting and
with glibc's default, each run in its own process (the setting is process-wide), interleaved; with --vtp-repo, the
reference implementation's encode + decode beside vtp_fast's, under both settings.

    python bench/allocator.py [--workloads codec-s,codec-b,tiny-step,dit-b] [--vtp-repo PATH] [--rounds 3]
                              [--out rows.jsonl]

Workloads: bench/matmul_bound.py's, fp32, eager, random weights (VTP-S / VTP-B encode + decode at 256 px, batch 4;
the tiny pretraining step of `make train`; a DiT-B/1 training step, batch 8); the reference's codec at the same
shapes is the peer of bench/peers.py (MiniMax-AI/VTP's VTPModel, its own seeded init; its dependencies on
PYTHONPATH). Per round and run one process builds the workload, calls it `--warmup` times, then times `--repeats`
calls: the median, and per call the system CPU time and the page faults (getrusage), most of which is the
kernel zeroing fresh pages. Rounds take the runs in alternating order; the row reports the medians over rounds and
the ratios. bench/peers.py runs both implementations in one process, with the engine's setting, so its ratios
leave the setting out; `vs_reference_as_shipped` here puts vtp_fast as its command line runs against the reference
as its own scripts run (glibc's default). Run it on an otherwise idle machine.
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
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"engine": {}, "glibc_default": {"VTP_FAST_MALLOC": "default"}}
CODECS = {"codec-s": "vtp-s", "codec-b": "vtp-b"}


def reference_codec(preset: str, vtp_repo: str) -> Callable[[], object]:
    """The reference implementation's encode + decode at bench/peers.py's codec shape (batch 4, 256 px)."""
    from bench import peers

    model = peers.reference_vtp(peers.import_peer(Path(vtp_repo), "vtp.models.vtp_hf", "--vtp-repo"), preset, 256)
    x = torch.randn(4, 3, 256, 256)
    return lambda: peers.reference_codec(model, x)


def child(workload: str, impl: str, vtp_repo: str | None, warmup: int, repeats: int) -> None:
    """In a fresh process: set malloc as the command line does (unless VTP_FAST_MALLOC=default), time the
    workload, print one JSON line."""
    from vtp_fast.allocator import prepare_allocator

    setting = prepare_allocator()
    sys.path.insert(0, str(ROOT))
    from bench.matmul_bound import WORKLOADS

    call = reference_codec(CODECS[workload], vtp_repo) if impl == "reference" else WORKLOADS[workload]()
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


def measure(workload: str, impl: str, setting: str, args: argparse.Namespace) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "VTP_FAST_MALLOC"}, **SETTINGS[setting]}
    cmd = [sys.executable, __file__, "--child", workload, "--impl", impl, "--warmup", str(args.warmup),
           "--repeats", str(args.repeats)] + (["--vtp-repo", args.vtp_repo] if args.vtp_repo else [])
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="codec-s,codec-b,tiny-step,dit-b")
    p.add_argument("--vtp-repo", help="checkout of the reference VTP implementation: its codec beside ours")
    p.add_argument("--rounds", type=int, default=3, help="processes per run, in alternating order")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="vtp_fast", help=argparse.SUPPRESS)
    p.add_argument("--out", help="append the JSON rows to this file")
    args = p.parse_args()
    if args.child:
        return child(args.child, args.impl, args.vtp_repo, args.warmup, args.repeats)
    sys.path.insert(0, str(ROOT))
    from bench.peers import peer_info
    from vtp_fast.measure.rows import write_rows
    from vtp_fast.measure.timing import alternating, env_info

    load = os.getloadavg()[0]
    for workload in args.workloads.split(","):
        impls = ["vtp_fast"] + (["reference"] if args.vtp_repo and workload in CODECS else [])
        runs = [(impl, s) for impl in impls for s in SETTINGS]
        measured = {run: [] for run in runs}
        for _, run in alternating(runs, args.rounds):
            measured[run].append(measure(workload, *run, args))
        row = {"bench": "allocator", "workload": workload, "rounds": args.rounds, "repeats": args.repeats,
               "load_average_at_start": load, **env_info("cpu")}
        del row["malloc"]  # this process's setting, not the runs'
        if "reference" in impls:
            row.update(peer_info(Path(args.vtp_repo), "vtp (vtp.models.vtp_hf.VTPModel)"))
        for (impl, s), ms in measured.items():
            for key in ("median_ms", "sys_ms_per_call", "faults_per_call"):
                row[f"{impl}_{s}_{key}"] = statistics.median(m[key] for m in ms)
            row[f"{impl}_{s}_malloc"] = ms[0]["malloc"]
            row[f"{impl}_{s}_runs_ms"] = [m["median_ms"] for m in ms]
        engine, default = row["vtp_fast_engine_median_ms"], row["vtp_fast_glibc_default_median_ms"]
        row["speedup"] = default / engine
        line = (f"{workload}: vtp_fast {engine:.0f} ms kept against {default:.0f} ms glibc's default "
                f"({row['speedup']:.2f}x); system time {row['vtp_fast_engine_sys_ms_per_call']:.0f} against "
                f"{row['vtp_fast_glibc_default_sys_ms_per_call']:.0f} ms a call")
        if "reference" in impls:
            shipped = row["reference_glibc_default_median_ms"]
            row["vs_reference_as_shipped"] = shipped / engine
            row["vs_reference_same_setting"] = {s: row[f"reference_{s}_median_ms"] / row[f"vtp_fast_{s}_median_ms"]
                                                for s in SETTINGS}
            same = ", ".join(f"{k} {v:.2f}x" for k, v in row["vs_reference_same_setting"].items())
            line += (f"; the reference as shipped {shipped:.0f} ms: {row['vs_reference_as_shipped']:.2f}x "
                     f"(same setting: {same})")
        print(line, flush=True)
        write_rows([row], args.out)


if __name__ == "__main__":
    main()

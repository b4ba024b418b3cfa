"""Tools around the engine: `study` (the paper's scaling study), `bench` (the benchmarks of bench/, and the
performance model beside their rows) and `kernels check` (the ahead-of-time compile gate of the Triton kernels)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vtp_fast.cli.common import POSITIVE, Commands
from vtp_fast.config import InputError

STUDY_STAGES = """

Per objective mix and budget a tokenizer is pretrained and scored on the held-out set (rFID, PSNR, zero-shot,
probe); its latents of the labelled set are extracted (sharded over torchrun's ranks, resumable); a DiT is trained
per seed on the memory-mapped latents; `samples` images (class-balanced, or in the labelled set's class
frequencies) are drawn by the distributed sampler and scored by FID, KID and ADM's suite (sFID, Inception Score,
precision, recall) against adm_reference (ADM's reference batch) or, without one, real images of the labelled set,
beside the floor (real images) and each tokenizer's ceiling (decoded Gaussian latents). Data sets are streamed,
never held in memory. configs/study/vtp_s.yaml is the GPU protocol: all of ImageNet train, FID-50K (50 samples a
class) against VIRTUAL_imagenet256_labeled.npz. Under torchrun every stage runs on every rank."""


def cmd_study(args: argparse.Namespace) -> int:
    import json

    from vtp_fast.study import dry_run, load_study, run_study
    from vtp_fast.study.plan import gpu_plan, plan_markdown

    cfg = load_study(args.config, args.overrides)
    if not args.dry_run:
        run_study(cfg, args.out or "runs/study")
        return 0
    plan = gpu_plan(cfg)
    out = run_study(dry_run(cfg), args.out or "runs/study-dry-run",
                    note="A dry run: every stage at tiny shapes (the numbers mean nothing).")
    print(f"\n{plan_markdown(plan)}")
    (out / "gpu_plan.json").write_text(json.dumps(plan, indent=1))
    return 0


def bench_dir() -> Path:
    """bench/ of the source tree this package runs from (benchmarks are not installed with the package)."""
    path = Path(__file__).resolve().parents[2] / "bench"
    if not path.is_dir():
        raise InputError(f"{path}: the benchmarks live in the source tree's bench/; run from a checkout")
    return path


def cmd_bench(args: argparse.Namespace) -> int:
    if getattr(args, "model", False):  # the performance model beside measured rows (--report, else the newest h200)
        from vtp_fast.measure.perf_report import report

        print(report(args.report, bench_dir() / "results" / "h200"))
        return 0
    import importlib.util

    import torch

    from vtp_fast.measure.ceilings import cpu_ceilings
    from vtp_fast.measure.rows import markdown_table, read_rows, row_writer

    if args.report:
        rows, broken = read_rows(args.report)
        columns = [c for c in ("bench", "op", "case", "pass", "mode", "device", "backend", "shape", "dtype",
                               "median_ms", "gb_per_s", "tflop_per_s", "ceiling_share", "images_per_s", "peak_mem_mb",
                               "error", "device_name", "git")
                   if any(c in r for r in rows)]
        print(markdown_table(rows, columns))
        if broken:
            print(f"\n({broken} unreadable line(s) skipped)")
        return 0
    names = sorted(p.stem.removeprefix("bench_") for p in bench_dir().glob("bench_*.py"))
    chosen = args.names or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise InputError(f"unknown benchmark(s) {unknown}; choices: {', '.join(names)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    modules = {}
    for name in chosen:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", bench_dir() / f"bench_{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    if torch.device(device).type == "cpu" and any("ceiling_share" in m.TABLE_COLUMNS for m in modules.values()):
        print(cpu_ceilings().describe(), flush=True)  # the roofline of the rows' ceiling_share, measured once
    for name, module in modules.items():
        print(f"\n## {name} ({device})\n", flush=True)
        rows = module.run(device, args.quick, emit=row_writer(args.out, module.TABLE_COLUMNS))  # each row as measured
        print()
        print(markdown_table(rows, module.TABLE_COLUMNS))
    if args.out:
        print(f"\nrows appended to {args.out}")
    return 0


def cmd_kernels_check(args: argparse.Namespace) -> int:
    from vtp_fast.measure import gate

    return gate.main(args)


def add_commands(sub: Commands) -> None:
    p = sub.add_parser("study", help="the paper's scaling study (default: the CPU study on the emoji set, about "
                                     "100 min on 2 cores)")
    p.description += STUDY_STAGES
    p.add_argument("--config", help="a study config (configs/study/*.yaml, e.g. configs/study/vtp_s.yaml: the GPU "
                                    "study); default: the CPU study")
    p.add_argument("--out", help="results folder (default: runs/study, or runs/study-dry-run); a second run "
                                 "continues where the first stopped")
    p.add_argument("--dry-run", "--quick", dest="dry_run", action="store_true",
                   help="every stage at tiny shapes on this machine, the same code (streamed sets, sharded latents, "
                        "the sampler, ADM's suite; the config's data sets and adm_reference where they are on this "
                        "machine, else the emoji set and no reference; about a minute once the data is prepared), "
                        "then the planned GPU-hours of the real run")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the study config, e.g. dit_seeds=5")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("bench", help="benchmarks of bench/: every backend vs the reference and torch.compile")
    p.add_argument("names", nargs="*", help="benchmarks to run (bench/bench_<name>.py; default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    p.add_argument("--out", help="append JSONL rows (device, versions, git revision) to this file")
    p.add_argument("--report", nargs="+", metavar="JSONL", help="render rows of earlier runs as a markdown table")
    p.add_argument("--model", action="store_true", help="the H200 performance model of the fast ops (FLOPs, bytes, "
                   "bound, expected %%) beside the --report rows, else the newest bench/results/h200/ rows")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("kernels", help="kernel tools: the ahead-of-time compile gate")
    kernels_sub = Commands(p.add_subparsers(dest="tool", required=True, metavar="TOOL", title="tools"))
    q = kernels_sub.add_parser("check", help="compile every Triton kernel configuration for GPU targets (no GPU "
                                             "needed): registers, spills, shared memory, MMA kind, warnings")
    q.add_argument("--arch", default="90,80", help="compute capabilities, or 'native' for the visible GPU")
    q.add_argument("--dtypes", default="bfloat16,float16,float32", help="input dtypes, where an op accepts them")
    q.add_argument("--ops", help="comma-separated ops (default: all; 'csrc' for the CUDA sources only)")
    q.add_argument("--subset", action="store_true", help="the CI subset: one or two shapes per op")
    q.add_argument("--cuda", action="store_true", help="also compile csrc/*.cu with nvcc -Xptxas -v")
    q.add_argument("--markdown", help="write the table here")
    q.add_argument("--json", help="write one JSON row per kernel configuration here")
    q.add_argument("--jobs", type=POSITIVE, default=os.cpu_count() or 1, help="compile in this many processes")
    q.add_argument("-v", "--verbose", action="store_true", help="name each case as it compiles")
    q.set_defaults(func=cmd_kernels_check)

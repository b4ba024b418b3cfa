"""The study's wall time at two git revisions of this project (before and after a change), same study config, each
invocation in its own process and results folder, rounds in alternating order.

    python bench/study_time.py --before REV [--after HEAD] [--rounds 2] [--out rows.jsonl] [overrides ...]

Each revision is exported (git archive) into a temporary folder and its `vtp-fast study` runs from there, on the
same Python environment and the same prepared data (the emoji set and the Inception weights in their caches): what
changes between the runs is the project's code and configs. `overrides` are the study's dotted overrides, e.g. a
reduced study `budgets=[100] wide_channels=0 dit_seeds=1 dit_curve=[600]`; a row records, per revision and round,
the invocation's wall time and the study's own stage times (stage_seconds.json, summed by what they do), so a full
study's time can be projected from its stage counts. The compile cache is left as it is: a revision's first round
may build graphs that its later rounds read. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from vtp_fast.cli import main; sys.argv[0] = 'vtp-fast'; sys.exit(main())"


def export(rev: str, into: Path) -> str:
    """The revision's tree in `into`; returns its full commit hash."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    if into.exists():
        raise SystemExit(f"{into} exists: give --work a new folder (a study there would resume, not run)")
    into.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", commit], cwd=ROOT, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait():
        raise SystemExit(f"git archive {rev} failed")
    return commit


def stage_kinds(stage_seconds: dict[str, float]) -> dict[str, float]:
    """The study's stage seconds summed by what the stage does: its name's first word after the run's name
    ("rec-100: pretrain 100 steps" -> pretrain, "floor: real vs the reference" -> floor)."""
    kinds: dict[str, float] = {}
    for name, seconds in stage_seconds.items():
        run, what = name.split(": ", 1)
        kind = "floor" if run == "floor" else what.split(" ")[0].rstrip(",")
        kinds[kind] = kinds.get(kind, 0.0) + seconds
    return kinds


def timed_study(tree: Path, out: Path, overrides: list[str], log: Path) -> dict:
    """`vtp-fast study` of the exported tree into `out`, its output in `log`: wall seconds and stage seconds by kind."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-c", CLI, "study", "--out", str(out), *overrides], cwd=tree, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"the study at {tree} failed ({done.returncode}); its log: {log}")
    return {"seconds": seconds, "stage_seconds": stage_kinds(json.loads((out / "stage_seconds.json").read_text()))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision before the change")
    p.add_argument("--after", default="HEAD", help="git revision after it (default: HEAD)")
    p.add_argument("--rounds", type=int, default=2, help="invocations per revision, in alternating order")
    p.add_argument("--work", help="folder for the exported trees, results and logs (default: a temporary one)")
    p.add_argument("--out", help="append the JSON row to this file")
    p.add_argument("overrides", nargs="*", help="the study's dotted overrides")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from vtp_fast.measure.rows import write_rows
    from vtp_fast.measure.timing import alternating, env_info

    work = Path(args.work or tempfile.mkdtemp(prefix="study-time-"))
    revs = {"before": args.before, "after": args.after}
    commits = {side: export(rev, work / side) for side, rev in revs.items()}
    print(f"before {commits['before'][:8]}, after {commits['after'][:8]}: trees, results and each invocation's log "
          f"in {work}", flush=True)
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {side: [] for side in revs}
    for r, side in alternating(list(revs), args.rounds):
        tag = f"{side}-{r}"
        m = timed_study(work / side, work / f"study-{tag}", args.overrides, work / f"{tag}.log")
        runs[side].append(m)
        print(f"round {r}, {side} ({commits[side][:8]}): {m['seconds'] / 60:.1f} min", flush=True)
    row = {"bench": "study_time", "overrides": args.overrides, "rounds": args.rounds,
           "load_average_at_start": load, **env_info("cpu")}
    for side in revs:
        row[f"{side}_git"] = commits[side]
        row[f"{side}_seconds"] = [m["seconds"] for m in runs[side]]
        row[f"{side}_median_s"] = statistics.median(row[f"{side}_seconds"])
        row[f"{side}_stage_seconds"] = [m["stage_seconds"] for m in runs[side]]
    row["speedup"] = row["before_median_s"] / row["after_median_s"]
    print(f"study: before {row['before_median_s'] / 60:.1f} min, after {row['after_median_s'] / 60:.1f} min: "
          f"{row['speedup']:.2f}x", flush=True)
    write_rows([row], args.out)


if __name__ == "__main__":
    main()

"""The study's report: study.json, study.md (the table, the instrument's range, the paper's claims tested against the
noise) and the plots, all read back from the stages' result files."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

from vtp_fast.study.config import StudyConfig


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _seeds(run_dir: Path, stop: int) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob(f"dit-s*/at-{stop}.json"))]


FIGURES = ("gkid", "gfid", "sfid", "inception_score", "precision", "recall")  # of a generated set (scoring.py)


def over_seeds(seeds: list[dict], key: str) -> dict:
    """{key: mean, key_std: standard deviation, key_seeds: values} over the seeds; None where a seed has none (a
    figure its run could not compute, e.g. the Inception Score without the network's head)."""
    values = [s.get(key) for s in seeds]
    if not values or any(v is None for v in values):
        return {key: None, f"{key}_std": None, f"{key}_seeds": values}
    m, sd = mean_std(values)
    return {key: m, f"{key}_std": sd, f"{key}_seeds": values}


def collect(cfg: StudyConfig, out: Path) -> list[dict]:
    """One row per tokenizer: its training, its scores, its ceiling, and the DiT samples' figures over the seeds
    (mean and standard deviation: gKID, gFID and ADM's sFID, Inception Score, precision, recall) at the end of DiT
    training and along it."""
    rows = []
    for mix, budget, channels in cfg.runs:
        run_dir = out / f"{mix}-{budget}-c{channels}"
        row = {"name": run_dir.name, **json.loads((run_dir / "tokenizer" / "result.json").read_text()),
               **json.loads((run_dir / "scores.json").read_text())}
        ceiling = json.loads((run_dir / "ceiling.json").read_text())
        row |= {f"ceiling_{k}": ceiling.get(k) for k in FIGURES}
        curve = []
        for stop in cfg.curve_for(budget):
            seeds = _seeds(run_dir, stop)
            point = {"dit_steps": stop, "seeds": len(seeds)}
            for key in FIGURES:
                point |= over_seeds(seeds, key)
            why = next((s["inception_score_unavailable"] for s in seeds if "inception_score_unavailable" in s), None)
            if why:
                point["inception_score_unavailable"] = why
            curve.append(point)
        row |= {k: v for k, v in curve[-1].items() if k != "dit_steps"}
        row["curve"] = curve
        rows.append(row)
    return rows


def compare(a: dict, b: dict, key: str = "gkid") -> dict:
    """b - a with its noise band: twice the standard error of a difference of two means over seeds (None for a
    figure measured once on each side, e.g. a tokenizer's PSNR: no band, the sign is all there is)."""
    diff = b[key] - a[key]
    if f"{key}_std" not in a or f"{key}_std" not in b:
        return {"from": a[key], "to": b[key], "diff": diff, "band": None, "beyond_noise": None}
    band = 2 * math.sqrt(a[f"{key}_std"] ** 2 / a["seeds"] + b[f"{key}_std"] ** 2 / b["seeds"])
    return {"from": a[key], "to": b[key], "diff": diff, "band": band, "beyond_noise": abs(diff) > band}


def claims(cfg: StudyConfig, rows: list[dict]) -> list[dict]:
    """The paper's claims (and the instrument's own check) as measured differences against their noise bands."""
    by = {(r["mix"], r["steps"], r["channels"]): r for r in rows}
    lo, hi, c = cfg.budgets[0], cfg.budgets[-1], cfg.channels
    out = []

    def add(claim: str, measure: str, a: dict | None, b: dict | None, key: str, better: str) -> None:
        if a is None or b is None:
            return
        d = compare(a, b, key)
        good = d["diff"] < 0 if better == "lower" else d["diff"] > 0
        if d["band"] is None:
            verdict = ("held" if good else "did not hold") + " (one run each, no band)"
        else:
            verdict = ("held" if good else "did not hold") if d["beyond_noise"] else "within the noise"
        out.append({"claim": claim, "measure": measure, **d, "verdict": verdict})

    rec_lo, rec_hi = by.get(("rec", lo, c)), by.get(("rec", hi, c))
    add("reconstruction-only scaling improves reconstruction", f"rec PSNR, {lo} -> {hi} steps", rec_lo, rec_hi,
        "psnr", "higher")
    add("reconstruction-only scaling improves generation", f"rec gKID, {lo} -> {hi} steps", rec_lo, rec_hi, "gkid",
        "lower")
    for mix in cfg.mixes:
        if mix != "rec":
            add(f"{mix} generates better than reconstruction only", f"gKID rec -> {mix} at {hi} steps", rec_hi,
                by.get((mix, hi, c)), "gkid", "lower")
            add(f"{mix} improves generation with tokenizer compute", f"{mix} gKID, {lo} -> {hi} steps",
                by.get((mix, lo, c)), by.get((mix, hi, c)), "gkid", "lower")
    if cfg.wide_channels:
        wb = cfg.wide_budget or hi
        add(f"{c} latent channels generate better than {cfg.wide_channels}",
            f"clip+ssl+ae gKID {cfg.wide_channels} -> {c} channels at {wb} steps",
            by.get(("clip+ssl+ae", wb, cfg.wide_channels)), by.get(("clip+ssl+ae", wb, c)), "gkid", "lower")
    curves = [r for r in rows if len(r["curve"]) > 1]
    if curves:
        best = min(curves, key=lambda r: r["gkid"])
        first, last = best["curve"][0], best["curve"][-1]
        add("(instrument) the best tokenizer's DiT improves along its training",
            f"{best['name']} gKID, {first['dit_steps']} -> {last['dit_steps']} DiT steps", first, last, "gkid",
            "lower")
    return out


def _pm(m: float | None, s: float | None, digits: int = 4) -> str:
    return "" if m is None else f"{m:.{digits}g} ± {s:.2g}" if s is not None else f"{m:.{digits}g}"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def reference_words(cfg: StudyConfig, floor: dict) -> str:
    if cfg.adm_reference:
        return (f"ADM's reference batch {cfg.adm_reference} (FID / sFID against its precomputed statistics where it "
                f"holds them; KID, precision and recall against its {floor['n_real']} images)")
    return f"{floor['n_real']} real images of the labelled set"


def markdown(cfg: StudyConfig, rows: list[dict], floor: dict, found: list[dict], note: str) -> str:
    from vtp_fast.measure.rows import markdown_table

    def table_of(cells: list[dict]) -> str:
        return markdown_table(cells, list(cells[0])) if cells else "(none)"

    table = table_of([{
        "tokenizer": r["name"], "GFLOP": f"{r['tokenizer_gflops']:.3g}", "s/step": f"{r['seconds_per_step']:.2f}",
        "PSNR": f"{r['psnr']:.2f}", "rFID": f"{r['rfid']:.1f}", "rKID": _pm(r["rkid"], r.get("rkid_std"), 3),
        "zero-shot": f"{r['zero_shot_top1']:.3f}" if "zero_shot_top1" in r else "",
        "probe": f"{r['probe_cls_meanpatch']:.3f}" if "probe_cls_meanpatch" in r else "",
        f"gKID ({r['seeds']} seeds)": _pm(r["gkid"], r["gkid_std"], 3), "gFID": _pm(r["gfid"], r["gfid_std"]),
        "sFID": _pm(r.get("sfid"), r.get("sfid_std")), "IS": _pm(r.get("inception_score"),
                                                                 r.get("inception_score_std")) or "n/a",
        "precision": _pm(r.get("precision"), r.get("precision_std"), 3),
        "recall": _pm(r.get("recall"), r.get("recall_std"), 3),
        "ceiling gKID": _num(r["ceiling_gkid"], 3), "ceiling gFID": _num(r["ceiling_gfid"]),
        "ceiling sFID": _num(r.get("ceiling_sfid")), "ceiling precision": _num(r.get("ceiling_precision"), 3),
        "ceiling recall": _num(r.get("ceiling_recall"), 3)} for r in rows])
    claims_table = table_of([{"claim": c["claim"], "measured": c["measure"],
                                    "from -> to": f"{c['from']:.4g} -> {c['to']:.4g}",
                                    "difference ± band": f"{c['diff']:+.3g}" + (
                                        "" if c["band"] is None else f" ± {c['band']:.2g}"),
                                    "verdict": c["verdict"]} for c in found])
    n = cfg.samples
    classes = ("samples class-balanced over the labelled set's classes" if cfg.sample_classes == "balanced" else
               "samples in the labelled set's class frequencies (one per reference image's class)")
    no_is = next((r["inception_score_unavailable"] for r in rows if "inception_score_unavailable" in r),
                 floor.get("inception_score_unavailable"))
    return (f"# scaling study\n\n"
            f"Every generative figure from {n} images against {reference_words(cfg, floor)}: gFID / gKID (KID: "
            f"unbiased, {cfg.kid_subsets} subsets of {floor.get('kid_subset_size', cfg.kid_subset_size)}) and ADM's "
            f"suite (sFID, Inception Score, k-NN precision / recall, k = 3), Inception {cfg.inception_precision}; "
            f"rFID / rKID from {n} held-out reconstructions against their originals. ± is the standard deviation "
            f"over DiT seeds for the DiT's figures and over KID subsets for rKID. "
            f"Floor ({n} real images against the reference): gKID {_pm(floor['gkid'], floor.get('gkid_std'))}, "
            f"gFID {_num(floor['gfid'])}, sFID {_num(floor.get('sfid'))}, precision {_num(floor.get('precision'), 3)},"
            f" recall {_num(floor.get('recall'), 3)}. Ceiling: each tokenizer's decoder on Gaussian latents (an "
            f"untrained DiT). DiT: {cfg.dit_steps} steps, {cfg.dit_seeds} seeds, {cfg.sample_steps} Euler steps, "
            f"{classes}. "
            + (f"Inception Score: n/a ({no_is}). " if no_is else "") + f"{note}\n\n{table}\n\n"
            f"## the paper's claims at this scale\n\n"
            f"A difference counts when it is larger than its band: twice the standard error of the difference of "
            f"the two means over DiT seeds (PSNR: one tokenizer run each, no band).\n\n{claims_table}\n")


def report(cfg: StudyConfig, out: Path, stage_seconds: dict[str, float], invocation: float, note: str = "") -> None:
    """study.json, study.md and the plots of the study in `out`; `stage_seconds`: each stage's measured seconds over
    every invocation (their sum is the study's time), `invocation`: this invocation's seconds."""
    from vtp_fast.config import to_dict
    from vtp_fast.measure.timing import env_info

    rows = collect(cfg, out)
    floor = json.loads((out / "floor.json").read_text())
    found = claims(cfg, rows)
    spans = {m: max(r["tokenizer_gflops"] for r in rows if r["mix"] == m and r["channels"] == cfg.channels)
             / min(r["tokenizer_gflops"] for r in rows if r["mix"] == m and r["channels"] == cfg.channels)
             for m in cfg.mixes}
    seconds = sum(stage_seconds.values())
    note = (f"The study's stages took {seconds / 60:.1f} min in all, over every invocation (this one: "
            f"{invocation / 60:.1f} min; stages already done are skipped). {note}").strip()
    (out / "study.json").write_text(json.dumps({"rows": rows, "floor": floor, "claims": found, "compute_span": spans,
                                                "config": to_dict(cfg), "seconds": seconds,
                                                "stage_seconds": stage_seconds, "env": env_info()},
                                               indent=1))
    md = markdown(cfg, rows, floor, found, note)
    (out / "study.md").write_text(md)
    print(md)
    plots(cfg, rows, floor, out)
    print(f"  table  {out / 'study.md'}\n  plots  {out}/{{gkid_vs_compute,gkid_vs_dit_steps,channels,"
          f"reconstructions}}.png")


def plots(cfg: StudyConfig, rows: list[dict], floor: dict, out: Path) -> None:
    from vtp_fast.plots import plt

    def floor_line(ax):
        ax.axhline(floor["gkid"], color="k", linestyle="--", linewidth=1, label="floor: real vs the reference")
        ax.axhspan(floor["gkid"] - floor["gkid_std"], floor["gkid"] + floor["gkid_std"], color="k", alpha=0.08)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for i, mix in enumerate(cfg.mixes):
        rs = sorted((r for r in rows if r["mix"] == mix and r["channels"] == cfg.channels),
                    key=lambda r: r["tokenizer_gflops"])
        x = [r["tokenizer_gflops"] for r in rs]
        m, s = [r["gkid"] for r in rs], [r["gkid_std"] for r in rs]
        ax.plot(x, m, marker="o", color=f"C{i}", label=mix)
        ax.fill_between(x, [a - b for a, b in zip(m, s, strict=True)], [a + b for a, b in zip(m, s, strict=True)],
                        color=f"C{i}", alpha=0.2)
        ax.scatter(x, [r["ceiling_gkid"] for r in rs], marker="x", color=f"C{i}", alpha=0.6)
        bx.plot(x, [r["psnr"] for r in rs], marker="o", color=f"C{i}", label=mix)
    floor_line(ax)
    ax.set(xscale="log", xlabel="tokenizer training compute (GFLOP)",
           ylabel=f"gKID ({cfg.samples} samples; mean ± std over {cfg.dit_seeds} DiT seeds)",
           title="generation from each tokenizer's latents (x: its ceiling)")
    bx.set(xscale="log", xlabel="tokenizer training compute (GFLOP)", ylabel="held-out PSNR (dB)",
           title="reconstruction")
    for a in (ax, bx):
        a.xaxis.set_minor_formatter(plt.NullFormatter())  # decades only: the minor labels overlap
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gkid_vs_compute.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, r in enumerate(r for r in rows if len(r["curve"]) > 1):
        x = [p["dit_steps"] for p in r["curve"]]
        m, s = [p["gkid"] for p in r["curve"]], [p["gkid_std"] for p in r["curve"]]
        ax.errorbar(x, m, yerr=s, marker="o", capsize=3, color=f"C{i}", label=f"{r['mix']} ({r['channels']} ch)")
    floor_line(ax)
    ax.set(xlabel="DiT training steps", ylabel="gKID (mean ± std over seeds)",
           title=f"DiT convergence on the latents of the {cfg.budgets[-1]}-step tokenizers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gkid_vs_dit_steps.png")
    plt.close(fig)

    wide = [r for r in rows if r["mix"] == "clip+ssl+ae" and r["steps"] == (cfg.wide_budget or cfg.budgets[-1])]
    if cfg.wide_channels and len(wide) == 2:
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), dpi=120)
        for a, (key, err, title) in zip(axes, (("psnr", None, "held-out PSNR (dB)"), ("rkid", "rkid_std", "rKID"),
                                               ("gkid", "gkid_std", "gKID")), strict=True):
            a.bar([str(r["channels"]) for r in wide], [r[key] for r in wide],
                  yerr=[r[err] for r in wide] if err else None, capsize=4, color=["#4c72b0", "#dd8452"])
            a.set(title=title, xlabel="latent channels")
        fig.suptitle(f"full objective at {wide[0]['steps']} steps: {cfg.channels} vs {cfg.wide_channels} channels")
        fig.tight_layout()
        fig.savefig(out / "channels.png")
        plt.close(fig)

    shown = [torch.load(out / r["name"] / "recon_examples.pt") for r in rows]
    grids = [("held-out original", shown[0]["original"])] + [(r["name"], s["recon"]) for r, s in zip(rows, shown,
                                                                                                      strict=True)]
    fig, axes = plt.subplots(len(grids), 1, figsize=(8, 1.1 * len(grids) + 0.3), dpi=120, squeeze=False)
    for a, (name, x) in zip(axes[:, 0], grids, strict=True):
        a.imshow(torch.cat(list(x), dim=2).permute(1, 2, 0).numpy())  # (3, H, 8 W) -> (H, 8 W, 3)
        a.set_xticks([])
        a.set_yticks([])
        a.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("held-out reconstructions (the same 8 images for every tokenizer)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "reconstructions.png")
    plt.close(fig)

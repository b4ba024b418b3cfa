"""Benchmark: the FID/KID Inception feature pass (vtp_fast.eval.inception), images/s per variant, with each variant's
accuracy cost against the exact fp32 reference (torch-fidelity's own forward) on real 64x64 emoji.

    python bench/bench_inception.py [--device cpu] [--out bench/results/cpu/inception.jsonl] [--quick]
                                    [--n-images 1000] [--compile]

Two kinds of rows, all on the same images, all variants interleaved batch by batch in one process (so a
background load hits them alike), warm-up excluded, medians over batches:

- "full" variants (the reference and the library's precisions "fp32-fused" / "bf16") extract features of all
  ``--n-images`` images (two disjoint halves, A and B). Each row has images/s, the feature deviation from the
  reference (max abs, max abs / max |ref|, relative L2) and FID(A, B) / KID(A, B) computed from that variant's
  features next to the reference's (``fid_rel_diff``, ``kid_diff``; KID with subsets of half a half, so its
  subset std ``kid_std`` means something).
- "timing" variants (batch size, channels_last, inference_mode, autocast, torch.compile, and the resize and the
  network alone) run a few batches; their rows have images/s and the feature deviation on those batches.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from vtp_fast.measure.rows import Emit, RowLog, bench_cli

TABLE_COLUMNS = ["variant", "kind", "batch", "images_per_s", "speedup_vs_current", "feat_max_abs", "feat_max_rel",
                 "feat_rel_l2", "fid", "fid_rel_diff", "kid_mean", "kid_diff", "kid_std"]


def _images(n: int) -> torch.Tensor:
    """n uint8 (3, 64, 64) emoji (Google style; fixed order, repeated if n exceeds the set)."""
    from vtp_fast.data.labelled import load_images

    x = load_images("emoji:google").images  # (N, 64, 64, 3) uint8
    x = x.permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(x.shape[0], generator=g)
    idx = idx.repeat((n + len(idx) - 1) // len(idx))[:n]
    return x[idx].contiguous()


def _deviation(f: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (f.double() - ref.double())
    return {"feat_max_abs": d.abs().max().item(), "feat_max_rel": (d.abs().max() / ref.abs().max()).item(),
            "feat_rel_l2": (d.norm() / ref.double().norm()).item()}


def _fid_kid(fa: torch.Tensor, fb: torch.Tensor, subset: int) -> dict:
    from torch_fidelity.metric_kid import kid_features_to_metric

    from vtp_fast.eval.fid import features_to_stats, fid_from_stats

    kid = kid_features_to_metric(fa, fb, kid_subsets=100, kid_subset_size=subset, rng_seed=2020, verbose=False)
    return {"fid": fid_from_stats(*features_to_stats(fa), *features_to_stats(fb)),
            "kid_mean": kid["kernel_inception_distance_mean"], "kid_std": kid["kernel_inception_distance_std"]}


def _timed(fn, x):
    t0 = time.perf_counter()
    (f,) = fn(x)
    return time.perf_counter() - t0, f.float()


def _stats(times: list[float], batch: int) -> dict:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    med = statistics.median(times)
    return {"median_ms": med * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3, "repeats": len(times),
            "images_per_s": batch / med}


def run(device: str = "cpu", quick: bool = False, n_images: int | None = None, compile_: bool | None = None,
        emit: Emit | None = None) -> list[dict]:
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from vtp_fast.eval.inception import feature_extractor

    n = n_images or (8 if quick else 1000)
    bs = 4 if quick else 50
    x = _images(n)
    ref_model = feature_extractor(device, progress=False, precision="fp32")
    fused = feature_extractor(device, progress=False, precision="fp32-fused")
    bf16 = feature_extractor(device, progress=False, precision="bf16")
    base = {"bench": "inception", "device": device, "image_size": 64, "n_images": n}
    rows = RowLog(emit)

    # ---- full variants: every batch through each, interleaved (rotating order), features kept
    full = {"current: torch-fidelity fp32, no_grad": ("torch-fidelity", "fp32", ref_model),
            "fp32-fused (BN folded, channels_last, matmul resize)": ("fused", "fp32-fused", fused),
            "bf16 (fused, bf16 weights+activations)": ("fused", "bf16", bf16)}
    names = list(full)
    feats = {k: [] for k in names}
    times = {k: [] for k in names}
    with torch.no_grad():
        for i, s in enumerate(range(0, n, bs)):
            chunk = x[s:s + bs].to(device)
            for k in names[i % len(names):] + names[:i % len(names)]:
                t, f = _timed(full[k][2], chunk)
                feats[k].append(f.cpu())
                if i > 0 and chunk.shape[0] == bs:  # the first batch is the warm-up
                    times[k].append(t)
    feats = {k: torch.cat(v) for k, v in feats.items()}
    ref_name = names[0]
    half = n // 2
    subset = max(2, half // 2)
    ref_fk = _fid_kid(feats[ref_name][:half], feats[ref_name][half:2 * half], subset)
    ref_ips = None
    for k in names:
        backend, precision, _ = full[k]
        fk = _fid_kid(feats[k][:half], feats[k][half:2 * half], subset) if k != ref_name else ref_fk
        st = _stats(times[k] or [float("nan")], bs)
        ref_ips = ref_ips or st["images_per_s"]
        rows.add({**base, "variant": k, "kind": "full", "backend": backend, "precision": precision, "batch": bs,
                  **st, "speedup_vs_current": st["images_per_s"] / ref_ips,
                  **_deviation(feats[k], feats[ref_name]), **fk, "fid_ref": ref_fk["fid"],
                  "fid_rel_diff": (fk["fid"] - ref_fk["fid"]) / ref_fk["fid"], "kid_ref": ref_fk["kid_mean"],
                  "kid_diff": fk["kid_mean"] - ref_fk["kid_mean"], "kid_subset_size": subset, "kid_subsets": 100})

    # ---- timing variants: a few batches each, interleaved round by round, one warm-up call each
    tf_cl = copy.deepcopy(ref_model).to(memory_format=torch.channels_last)

    def autocast_bf16(chunk):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return tf_cl(chunk)

    def resize_tf(chunk):
        return (interpolate_bilinear_2d_like_tensorflow1x(chunk.float(), size=(299, 299), align_corners=False),)

    def resize_matmul(chunk):
        return (fused.resize(chunk),)

    pre = resize_tf(x[:bs].to(device))[0]

    def network_only(chunk):  # torch-fidelity's network on an already resized batch (299x299 uint8 -> no-op resize)
        return ref_model(chunk)

    pre_u8 = pre.round().clamp(0, 255).to(torch.uint8)  # only its time matters
    timing = {  # name: (backend, precision, fn, batch size, grad mode, inputs override)
        "current, inference_mode": ("torch-fidelity", "fp32", ref_model, bs, torch.inference_mode, None),
        "torch-fidelity fp32, channels_last": ("torch-fidelity", "fp32", tf_cl, bs, torch.no_grad, None),
        "torch-fidelity, autocast bf16, channels_last": ("torch-fidelity", "autocast-bf16", autocast_bf16, bs,
                                                         torch.no_grad, None),
        "fp32-fused, inference_mode": ("fused", "fp32-fused", fused, bs, torch.inference_mode, None),
        "bf16, inference_mode": ("fused", "bf16", bf16, bs, torch.inference_mode, None),
        "resize only: torch-fidelity": ("torch-fidelity", "fp32", resize_tf, bs, torch.no_grad, None),
        "resize only: matmul": ("fused", "fp32", resize_matmul, bs, torch.no_grad, None),
        "network only (299x299 input, resize a no-op)": ("torch-fidelity", "fp32", network_only, bs, torch.no_grad,
                                                         pre_u8),
    }
    for b in ((2, 8) if quick else (25, 100, 200)):
        timing[f"fp32-fused, batch {b}"] = ("fused", "fp32-fused", fused, b, torch.no_grad, None)
        timing[f"bf16, batch {b}"] = ("fused", "bf16", bf16, b, torch.no_grad, None)
    if compile_:
        for prec, model in (("fp32-fused", fused), ("bf16", bf16)):
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            cm = torch.compile(copy.deepcopy(model))
            t0 = time.perf_counter()
            with torch.no_grad():
                cm(x[:bs].to(device))
            compile_s = time.perf_counter() - t0
            timing[f"{prec}, torch.compile (inductor, freezing)"] = ("inductor", prec, cm, bs, torch.no_grad, None)
            base_c = base | {f"compile_s_{prec}": compile_s}
            print(f"compile {prec}: {compile_s:.1f} s (first call, batch {bs})", flush=True)
            base = base_c
    rounds = 1 if quick else 3
    ttimes = {k: [] for k in timing}
    tdev = {}
    for _k, (_, _, fn, b, mode, inp) in timing.items():  # warm-up (excluded): one small call each
        with mode():
            fn((inp if inp is not None else x)[:min(b, 4)].to(device))
    for r in range(rounds):
        for k, (_, _, fn, b, mode, inp) in timing.items():
            src = inp if inp is not None else x
            off = (r * b) % max(1, n - b + 1) if inp is None else 0
            chunk = src[off:off + b].to(device)
            with mode():
                t, f = _timed(fn, chunk)
            ttimes[k].append(t)
            if inp is None and f.shape[-1] == 2048:
                tdev.setdefault(k, []).append((f.cpu().clone(), feats[ref_name][off:off + b]))
    for k, (backend, precision, _, b, mode, _inp) in timing.items():
        st = _stats(ttimes[k], b)
        dev = {}
        if k in tdev:
            dev = _deviation(torch.cat([a for a, _ in tdev[k]]), torch.cat([r for _, r in tdev[k]]))
        rows.add({**base, "variant": k, "kind": "timing", "backend": backend, "precision": precision, "batch": b,
                  "grad_mode": mode.__name__, **st, "speedup_vs_current": st["images_per_s"] / ref_ips, **dev})
    return rows.rows


def main() -> None:
    def extra(p):
        p.add_argument("--n-images", type=int, help="images for the full variants (two halves for FID/KID)")
        p.add_argument("--compile", dest="compile_", action="store_true",
                       help="also time torch.compile (inductor, freezing) of the fused models")

    bench_cli(run, TABLE_COLUMNS, __doc__, extra, run_args=("n_images", "compile_"))


if __name__ == "__main__":
    main()

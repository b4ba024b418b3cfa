"""Benchmark: attention backends, forward and forward + backward, against the reference, torch.compile of it
and every PyTorch SDPA backend (flash, efficient, cuDNN, math) on a GPU.

    python bench/bench_attention.py [--device cuda] [--out rows.jsonl] [--quick] [--plot attention.png]

Cases: "plain" (no RoPE), "rope" (ViT attention with 2-D RoPE: the fused Triton kernel against RoPE applied in
PyTorch before each other backend), "multicrop" (2 global + 8 local views of different lengths: the Triton varlen
kernel in one launch against one call per view). TFLOP/s counts 4 * B * H * N^2 * D per forward (2.5x that
more for the backward), summed over views.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from vtp_fast.measure.rows import Emit, RowLog, bench_cli, plot_scaling, timed_backends
from vtp_fast.measure.timing import measure
from vtp_fast.nn.rope import Rope2D
from vtp_fast.ops.attention import OP, attention_ref

TABLE_COLUMNS = ["case", "pass", "backend", "shape", "dtype", "median_ms", "tflop_per_s", "ceiling_share",
                 "peak_mem_mb"]
# (B, H, grid side, D): N = side^2 + 1 tokens (CLS + patches)
DENSE = {"cpu": [(2, 4, 8, 64)], "cuda": [(64, 16, 16, 64), (256, 16, 4, 64), (16, 16, 32, 64), (4, 16, 64, 64),
                                          (32, 8, 16, 128)]}
QUICK = {"cpu": [(1, 2, 2, 32)], "cuda": [(8, 16, 16, 64)]}
CROPS = {"cpu": (2, 4, (4, 2), 64), "cuda": (32, 16, (16, 6), 64)}  # (B, H, (global, local) grid sides, D)
QUICK_CROPS = {"cpu": (2, [(1, 4), (2, 2)], 32), "cuda": (16, [(2, 16), (4, 6)], 64)}  # (H, [(views, side)], D)


def _sdpa_backends(device: str) -> dict[str, object]:
    """SDPA pinned to each of its kernels (GPU), besides the registry's auto SDPA."""
    if device != "cuda":
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return {f"sdpa_{b.name.lower()}": sdpa_kernel(b) for b in
            (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)}


def _timed(fn, device: str, quick: bool) -> dict | None:
    try:
        return measure(fn, device, warmup=1 if quick else 3, repeat=2 if quick else 10)
    except RuntimeError as e:  # an SDPA kernel that does not support this shape/dtype
        return {"error": str(e).splitlines()[0][:120]}


def run(device: str = "cpu", quick: bool = False, emit: Emit | None = None) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backends = {b.name: (label, b.impl) for label, b in timed_backends(OP, device)}  # name -> (row label, impl)
    compiled = torch.compile(attention_ref)
    rows = RowLog(emit)
    for b, h, side, d in (QUICK if quick else DENSE)[device]:
        n = side * side + 1
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(b, h, n, d, device=device, dtype=dtype)
        sin, cos = Rope2D(d)(side, side)
        rope = (sin.to(device), cos.to(device))
        flops = 4 * b * h * n * n * d
        calls = {label: (impl.attention, nullcontext()) for label, impl in backends.values()}
        calls["compiled_reference"] = (compiled, nullcontext())
        for name, ctx in _sdpa_backends(device).items():
            calls[name] = (backends["sdpa"][1].attention, ctx)
        for case, r in (("plain", None), ("rope", rope)):
            for name, (fn, ctx) in calls.items():
                for pass_name, f in (("fwd", flops), ("fwd+bwd", 3.5 * flops)):
                    def call(fn=fn, ctx=ctx, pass_name=pass_name, r=r):
                        with ctx:
                            out = fn(q, k, v, rope=r)
                            if pass_name == "fwd+bwd":
                                out.backward(grad)
                    t = _timed(call, device, quick)
                    rows.add({"bench": "attention", "case": case, "pass": pass_name, "device": device,
                              "backend": name, "shape": [b, h, n, d], "seq_len": n,
                              "dtype": str(dtype).removeprefix("torch."),
                              **t, "tflop_per_s": f / t["median_ms"] / 1e9 if "median_ms" in t else None})
    _multicrop(device, dtype, backends, quick, rows)
    return rows.rows


def _multicrop(device: str, dtype: torch.dtype, backends: dict, quick: bool, rows: RowLog) -> None:
    """2 global + 8 local views per image: packed varlen (one launch) vs one dense call per view."""
    if quick:
        h, views, d = QUICK_CROPS[device]
    else:
        b, h, (g_side, l_side), d = CROPS[device]
        views = [(2 * b, g_side), (8 * b, l_side)]
    qkv = [tuple(torch.randn(nb, h, s * s + 1, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
           for nb, s in views]
    ropes = [tuple(t.to(device) for t in Rope2D(d)(s, s)) for _, s in views]
    flops = sum(4 * nb * h * (s * s + 1) ** 2 * d for nb, s in views)

    def per_view(impl):
        return lambda: [impl.attention(*t, rope=r) for t, r in zip(qkv, ropes, strict=True)]

    calls = {f"{label} (per view)": per_view(impl) for label, impl in backends.values()}
    if "triton" in backends:
        from vtp_fast.ops.attention import PackedViews

        packed = PackedViews.build([(nb, s * s + 1) for nb, s in views], ropes, torch.device(device))
        flat = [torch.cat([t[j].transpose(1, 2).reshape(-1, h, d) for t in qkv]).detach().requires_grad_()
                for j in range(3)]
        label, triton = backends["triton"]
        calls[f"{label} (packed varlen)"] = lambda: [triton.attention_varlen(*flat, *packed)]
    for name, fn in calls.items():
        for pass_name, f in (("fwd", flops), ("fwd+bwd", 3.5 * flops)):
            def call(fn=fn, pass_name=pass_name):
                outs = fn()
                if pass_name == "fwd+bwd":
                    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            t = _timed(call, device, quick)
            rows.add({"bench": "attention", "case": "multicrop", "pass": pass_name, "device": device,
                      "backend": name, "shape": [[nb, h, s * s + 1, d] for nb, s in views],
                      "dtype": str(dtype).removeprefix("torch."),
                      **t, "tflop_per_s": f / t["median_ms"] / 1e9 if "median_ms" in t else None})


def main() -> None:
    rows, args = bench_cli(run, TABLE_COLUMNS, __doc__, lambda p: p.add_argument(
        "--plot", help="PNG: fwd+bwd TFLOP/s against sequence length per backend (rope case)"))
    if args.plot:
        picked = [r for r in rows if r.get("case") == "rope" and r["pass"] == "fwd+bwd" and r.get("tflop_per_s")]
        plot_scaling(picked, "seq_len", "tflop_per_s", "backend", args.plot,
                     title="attention with 2-D RoPE, fwd+bwd", xlabel="tokens per sequence", ylabel="TFLOP/s")


if __name__ == "__main__":
    main()

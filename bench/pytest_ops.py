"""The row-level ops under pytest-benchmark, every runnable backend at the CLI benchmarks' shapes:

    pytest bench/pytest_ops.py --benchmark-only [--benchmark-json rows.json]

`vtp-fast bench` is the main tool (JSONL rows with versions, GB/s, torch.compile of the reference); this file is
for pytest-benchmark users (its comparison and histogram options). CI runs it once with --benchmark-disable.
"""

from __future__ import annotations

import pytest
import torch

from bench import bench_masked_gather, bench_pixel_shuffle_l1
from vtp_fast.data.views import mask_to_index
from vtp_fast.ops import masked_gather, pixel_shuffle_l1

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _backends(op):
    return pytest.mark.parametrize("backend", op.timed(DEVICE), ids=lambda b: b.name)


@pytest.mark.parametrize("shape", bench_masked_gather.SHAPES[DEVICE], ids=str)
@pytest.mark.parametrize("direction", ["gather", "scatter"])
@_backends(masked_gather.OP)
def test_masked_gather(benchmark, backend, direction, shape):
    b, n, d = shape
    impl = backend.impl
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(b, n, d, device=DEVICE, generator=gen).to(DTYPE)
    index = mask_to_index(torch.rand(b, n, device=DEVICE, generator=gen) < 0.4)
    if direction == "gather":
        out = benchmark(lambda: _synced(impl.masked_gather(x, index)))
        torch.testing.assert_close(out, masked_gather.masked_gather_ref(x, index), rtol=0, atol=0)
    else:
        packed, fill = x.reshape(-1, d)[index], x[0, 0]
        out = benchmark(lambda: _synced(impl.masked_scatter(packed, index, fill, (b, n))))
        torch.testing.assert_close(out, masked_gather.masked_scatter_ref(packed, index, fill, (b, n)), rtol=0, atol=0)


@pytest.mark.parametrize("shape", bench_pixel_shuffle_l1.SHAPES[DEVICE][:1], ids=str)
@_backends(pixel_shuffle_l1.OP)
def test_pixel_shuffle_l1_fwd_bwd(benchmark, backend, shape):
    b, h, w, p, _ = shape
    impl = backend.impl
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    tokens = torch.randn(b, h * w, 3 * p * p, device=DEVICE, generator=gen).to(DTYPE).requires_grad_()
    target = torch.randn(b, 3, h * p, w * p, device=DEVICE, generator=gen).to(DTYPE)
    (grad,) = benchmark(lambda: _synced(torch.autograd.grad(impl.pixel_shuffle_l1(tokens, target, p), tokens)))
    (want,) = torch.autograd.grad(pixel_shuffle_l1.pixel_shuffle_l1_ref(tokens, target, p), tokens)
    torch.testing.assert_close(grad, want)


def _synced(out):
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out

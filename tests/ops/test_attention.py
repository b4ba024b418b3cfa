"""Attention backends against the fp32 reference (float64 for the error bound)."""

import pytest
import torch

from vtp_fast.ops.attention import OP, attention_ref


@pytest.mark.parametrize("name", [b.name for b in OP.runnable("cpu")])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 17, 32), (1, 2, 257, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_backends_match_float64(name, shape, causal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, requires_grad=True) for _ in range(3))
    out = OP.backends[name].impl.attention(q, k, v, causal=causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(q64, k64, v64, causal=causal)
    assert out.shape == shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(shape, generator=gen)
    out.backward(g)
    ref.backward(g.double())
    for a, b in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)


def test_causal_ignores_the_future():
    q, k, v = (torch.randn(1, 1, 5, 8) for _ in range(3))
    out = attention_ref(q, k, v, causal=True)
    v2 = v.clone()
    v2[..., 3:, :] += 100
    assert torch.allclose(attention_ref(q, k, v2, causal=True)[..., :3, :], out[..., :3, :])


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="\\(B, H, N, head_dim\\)"):
        attention_ref(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 3, 4))

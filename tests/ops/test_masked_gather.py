"""Every backend of the masked-token gather/scatter against the reference, forward and backward."""

import pytest
import torch

from tests.helpers import cpu_backend, dtypes_for
from vtp_fast.data.views import mask_to_index
from vtp_fast.ops.masked_gather import OP, masked_gather_ref, masked_scatter_ref

BACKENDS = ["reference", "native", pytest.param("triton", marks=pytest.mark.triton)]
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Gather/scatter move values: forward and the x/src gradients are exact. Only the fill gradient is a sum;
# its tolerance per dtype is against a float64 computation of the same sum.
FILL_GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_mask(kind: str, b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.rand(b, n, generator=gen) < 0.4
    if kind == "all":
        return torch.ones(b, n, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(b, n, dtype=torch.bool)
    mask = torch.zeros(b, n, dtype=torch.bool)  # "rows": first sample fully masked, last sample untouched
    mask[0] = True
    return mask


SHAPES = [(1, 1, 1), (3, 7, 5), (2, 17, 64), (4, 9, 33), (1, 257, 12)]
MASKS = ["random", "all", "none", "rows"]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_forward_backward_match_reference(name, shape, mask_kind):
    impl = cpu_backend(OP, name)
    gen = torch.Generator().manual_seed(hash((shape, mask_kind)) % 2**31)
    b, n, d = shape
    index = mask_to_index(make_mask(mask_kind, b, n, gen))
    for dtype in dtypes_for(name, DTYPES):
        x = torch.randn(b, n, d, generator=gen).to(dtype).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        packed, packed_ref = impl.masked_gather(x, index), masked_gather_ref(x_ref, index)
        assert packed.shape == (index.numel(), d) and packed.dtype == dtype
        assert torch.equal(packed, packed_ref)
        g = torch.randn(packed.shape, generator=gen).to(dtype)
        packed.backward(g)
        packed_ref.backward(g)
        assert torch.equal(x.grad, x_ref.grad)

        src = torch.randn(index.numel(), d, generator=gen).to(dtype).requires_grad_()
        fill = torch.randn(d, generator=gen).to(dtype).requires_grad_()
        src_ref, fill_ref = (t.detach().clone().requires_grad_() for t in (src, fill))
        for use_fill in (True, False):
            out = impl.masked_scatter(src, index, fill if use_fill else None, (b, n))
            out_ref = masked_scatter_ref(src_ref, index, fill_ref if use_fill else None, (b, n))
            assert out.shape == (b, n, d) and torch.equal(out, out_ref)
            go = torch.randn(out.shape, generator=gen).to(dtype)
            out.backward(go)
            out_ref.backward(go)
            assert torch.equal(src.grad, src_ref.grad)
        # fill gradient (from the use_fill pass): a sum over the rows not in `index`
        tol = FILL_GRAD_TOL[dtype]
        torch.testing.assert_close(fill.grad.double(), fill_ref.grad.double(), rtol=tol, atol=tol)
        if mask_kind == "all":
            assert torch.count_nonzero(fill.grad) == 0, "no token took the fill value"


@pytest.mark.parametrize("name", BACKENDS)
def test_fill_gradient_against_float64_formula(name):
    impl = cpu_backend(OP, name)
    gen = torch.Generator().manual_seed(3)
    b, n, d = 3, 11, 7
    index = mask_to_index(torch.rand(b, n, generator=gen) < 0.3)
    src = torch.randn(index.numel(), d, generator=gen)
    fill = torch.randn(d, generator=gen, requires_grad=True)
    go = torch.randn(b, n, d, generator=gen)
    impl.masked_scatter(src, index, fill, (b, n)).backward(go)
    kept = torch.ones(b * n, dtype=torch.bool)
    kept[index] = False
    expect = go.double().reshape(-1, d)[kept].sum(0)
    torch.testing.assert_close(fill.grad.double(), expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", BACKENDS)
def test_non_contiguous_inputs_give_the_right_answer(name):
    impl = cpu_backend(OP, name)
    x = torch.randn(4, 6, 10)[:, :, ::2]  # (4, 6, 5), strided
    index = torch.tensor([0, 5, 13, 23])
    assert torch.equal(impl.masked_gather(x, index), masked_gather_ref(x.contiguous(), index))


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_arguments_raise(name):
    impl = cpu_backend(OP, name)
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="int64"):
        impl.masked_gather(x, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="\\(B, N, D\\)"):
        impl.masked_gather(x[0], torch.tensor([0]))
    with pytest.raises(ValueError, match="fill must be"):
        impl.masked_scatter(torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(5), (2, 3))
    with pytest.raises(ValueError, match="src must be"):
        impl.masked_scatter(torch.randn(3, 4), torch.tensor([0, 1]), None, (2, 3))


@pytest.mark.parametrize("name", ["reference", "native"])
def test_out_of_range_index_raises_on_cpu(name):
    impl = cpu_backend(OP, name)
    with pytest.raises((IndexError, RuntimeError), match="out of range"):
        impl.masked_gather(torch.randn(2, 3, 4), torch.tensor([0, 6]))


def test_mask_to_index_orders_by_sample_then_token():
    mask = torch.tensor([[False, True, True], [True, False, False]])
    assert mask_to_index(mask).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="bool"):
        mask_to_index(mask.int())


@pytest.mark.parametrize("name", ["native", pytest.param("triton", marks=pytest.mark.triton)])
def test_custom_op_registrations(name):
    """torch.library's own checks: schema, fake (meta) implementation, autograd registration."""
    cpu_backend(OP, name)
    ops = {"native": (torch.ops.vtp_fast.masked_gather, torch.ops.vtp_fast.masked_scatter),
           "triton": (torch.ops.vtp_fast.masked_gather_triton, torch.ops.vtp_fast.masked_scatter_triton)}[name]
    x = torch.randn(12, 5, requires_grad=True)
    index = torch.tensor([1, 4, 7])
    torch.library.opcheck(ops[0], (x, index))
    src = torch.randn(3, 5, requires_grad=True)
    torch.library.opcheck(ops[1], (src, index, torch.randn(5, requires_grad=True), 12))
    torch.library.opcheck(ops[1], (src, index, None, 12))


def test_native_passes_through_torch_compile_fullgraph():
    impl = cpu_backend(OP, "native")

    def f(x, index, fill):
        packed = impl.masked_gather(x, index) * 2
        return impl.masked_scatter(packed, index, fill, (x.shape[0], x.shape[1])).sum()

    x, fill = torch.randn(2, 5, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    index = torch.tensor([0, 3, 9])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, index, fill)
    out.backward()
    x2, fill2 = x.detach().clone().requires_grad_(), fill.detach().clone().requires_grad_()
    f(x2, index, fill2).backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(fill.grad, fill2.grad)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_backends_match_reference(name, dtype):
    impl = OP.backends[name].impl
    gen = torch.Generator(device="cuda").manual_seed(0)
    for b, n, d in [(64, 257, 1024), (3, 7, 5), (8, 196, 768)]:
        x = torch.randn(b, n, d, device="cuda", generator=gen).to(dtype).requires_grad_()
        index = mask_to_index(torch.rand(b, n, device="cuda", generator=gen) < 0.4)
        out = impl.masked_gather(x, index)
        assert torch.equal(out, masked_gather_ref(x, index))
        out.backward(torch.ones_like(out))
        assert torch.equal(x.grad, masked_scatter_ref(torch.ones_like(out), index, None, (b, n)))
        fill = torch.randn(d, device="cuda", dtype=dtype)
        assert torch.equal(impl.masked_scatter(out.detach(), index, fill, (b, n)),
                           masked_scatter_ref(out.detach(), index, fill, (b, n)))

"""Pixel-shuffle and the fused pixel-shuffle + L1 loss: the reference against independent formulas, every
backend against the reference and float64, forward and both gradients."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import cpu_backend, dtypes_for
from vtp_fast.ops.pixel_shuffle_l1 import OP, pixel_shuffle_l1_ref, pixel_shuffle_ref

BACKENDS = ["reference", "native", pytest.param("triton", marks=pytest.mark.triton)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATCHES = [1, 2, 16]
GRIDS = [(1, 1), (3, 5), (4, 4)]
# The loss is a reduction: flash-attention rule, |kernel - float64| <= 2 |reference - float64| + LOSS_FLOOR.
# The floor (~8 fp32 ulps at the loss's size, ~1) absorbs the case where the fp32 reference happens to land on the
# float64 value exactly while a different (equally valid) summation order does not.
LOSS_FLOOR = 1e-6
# Gradients are elementwise, +-grad/numel or 0: vs float64, one rounding to the dtype (atol 0: zeros are exact).
GRAD_RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def pixel_index(b: int, grid: tuple[int, int], p: int):
    """For every image pixel (n, c, Y, X): the (sample, token, channel) it comes from, written out from the
    definition (token (Y // p, X // p), channel c*p*p + (Y % p)*p + X % p), independently of any permute."""
    h, w = grid
    n, c, yy, xx = torch.meshgrid(torch.arange(b), torch.arange(3), torch.arange(h * p), torch.arange(w * p),
                                  indexing="ij")
    return n, (yy // p) * w + xx // p, c * p * p + (yy % p) * p + xx % p


def float64_formula(tokens, target, grid, p, g):
    """(image, loss, grad_tokens, grad_target) in float64 for upstream gradient g."""
    b = tokens.shape[0]
    idx = pixel_index(b, grid, p)
    image = tokens.double()[idx]  # (B, 3, h*p, w*p)
    diff = image - target.double()
    loss = diff.abs().mean()
    grad_image = torch.sign(diff) * g / diff.numel()
    grad_tokens = torch.zeros(tokens.shape, dtype=torch.float64).index_put(idx, grad_image)
    return image, loss, grad_tokens, -grad_image


def make_inputs(b, grid, p, dtype, gen, target_dtype=None):
    h, w = grid
    tokens = torch.randn(b, h * w, 3 * p * p, generator=gen).to(dtype).requires_grad_()
    target = torch.randn(b, 3, h * p, w * p, generator=gen).to(target_dtype or dtype).requires_grad_()
    return tokens, target


def check_loss_and_grads(impl, tokens, target, grid, p, g=0.75):
    """Forward (flash-attention rule) and both gradients (exactly the reference's, and float64's) of impl."""
    loss = impl.pixel_shuffle_l1(tokens, target, p)
    loss_ref = pixel_shuffle_l1_ref(tokens, target, p)
    _, loss64, grad_tok64, grad_tgt64 = float64_formula(tokens.detach(), target.detach(), grid, p, g)
    assert loss.shape == () and loss.dtype == loss_ref.dtype == torch.float32
    err, err_ref = (loss.double() - loss64).abs().item(), (loss_ref.double() - loss64).abs().item()
    assert err <= 2 * err_ref + LOSS_FLOOR, f"loss error {err:.3g} vs reference's {err_ref:.3g}"
    upstream = torch.tensor(g)
    grads = torch.autograd.grad(loss, (tokens, target), upstream)
    grads_ref = torch.autograd.grad(loss_ref, (tokens, target), upstream)
    for got, ref, want in zip(grads, grads_ref, (grad_tok64, grad_tgt64), strict=True):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got, ref), "gradient differs from autograd of the reference"
        torch.testing.assert_close(got.double(), want, rtol=GRAD_RTOL[got.dtype], atol=0)


def test_reference_shuffle_matches_torch_pixel_shuffle():
    gen = torch.Generator().manual_seed(0)
    for p in PATCHES:
        for h, w in GRIDS:
            tokens = torch.randn(2, h * w, 3 * p * p, generator=gen)
            nchw = tokens.transpose(1, 2).reshape(2, 3 * p * p, h, w)  # (B, 3p², h, w), the conv layout
            image = pixel_shuffle_ref(tokens, (h, w), p)
            assert image.shape == (2, 3, h * p, w * p)
            assert torch.equal(image, F.pixel_shuffle(nchw, p))
            assert torch.equal(image, tokens[pixel_index(2, (h, w), p)])


def test_reference_against_an_explicit_loop():
    gen = torch.Generator().manual_seed(1)
    b, (h, w), p = 2, (3, 5), 2
    tokens = torch.randn(b, h * w, 3 * p * p, generator=gen, dtype=torch.float64)
    target = torch.randn(b, 3, h * p, w * p, generator=gen, dtype=torch.float64)
    image = torch.empty(b, 3, h * p, w * p, dtype=torch.float64)
    total = 0.0
    for n in range(b):
        for y in range(h):
            for x in range(w):
                for c in range(3):
                    for i in range(p):
                        for j in range(p):
                            v = tokens[n, y * w + x, c * p * p + i * p + j].item()
                            image[n, c, y * p + i, x * p + j] = v
                            total += abs(v - target[n, c, y * p + i, x * p + j].item())
    assert torch.equal(pixel_shuffle_ref(tokens, (h, w), p), image)
    loss = pixel_shuffle_l1_ref(tokens, target, p)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - total / image.numel()) < 1e-14


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("p", PATCHES)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_backends_match_reference_and_float64(name, p, grid):
    impl = cpu_backend(OP, name)
    gen = torch.Generator().manual_seed(p * 100 + grid[0] * 10 + grid[1])
    for b in (1, 2):
        for dtype in dtypes_for(name, DTYPES):
            tokens, target = make_inputs(b, grid, p, dtype, gen)
            image = impl.pixel_shuffle(tokens, grid, p)
            assert image.dtype == dtype and torch.equal(image, pixel_shuffle_ref(tokens, grid, p))
            check_loss_and_grads(impl, tokens, target, grid, p)


@pytest.mark.parametrize("name", BACKENDS)
def test_shuffle_gradient_is_the_unshuffle(name):
    impl = cpu_backend(OP, name)
    gen = torch.Generator().manual_seed(2)
    grid, p = (3, 5), 2
    tokens = torch.randn(2, 15, 12, generator=gen, requires_grad=True)
    go = torch.randn(2, 3, 6, 10, generator=gen)
    (got,) = torch.autograd.grad(impl.pixel_shuffle(tokens, grid, p), tokens, go)
    want = torch.zeros(2, 15, 12).index_put(pixel_index(2, grid, p), go)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", BACKENDS)
def test_half_tokens_against_a_float32_target(name):
    """The training case: a bf16 (fp16 in the interpreter) decoder output against the fp32 image; and a mix the
    kernels do not take directly (fp16 tokens, bf16 target), promoted first."""
    impl = cpu_backend(OP, name)
    gen = torch.Generator().manual_seed(3)
    half = torch.float16 if name == "triton" else torch.bfloat16
    tokens, target = make_inputs(2, (3, 5), 16, half, gen, target_dtype=torch.float32)
    check_loss_and_grads(impl, tokens, target, (3, 5), 16)
    if name != "triton":
        tokens, target = make_inputs(1, (3, 5), 2, torch.float16, gen, target_dtype=torch.bfloat16)
        check_loss_and_grads(impl, tokens, target, (3, 5), 2)


@pytest.mark.parametrize("name", BACKENDS)
def test_float64(name):
    impl = cpu_backend(OP, name)
    gen = torch.Generator().manual_seed(4)
    tokens, target = make_inputs(2, (3, 5), 2, torch.float64, gen)
    loss = impl.pixel_shuffle_l1(tokens, target, 2)
    _, loss64, grad_tok64, grad_tgt64 = float64_formula(tokens.detach(), target.detach(), (3, 5), 2, 1.0)
    assert loss.dtype == torch.float64 and abs(loss.item() - loss64.item()) < 1e-12
    grads = torch.autograd.grad(loss, (tokens, target))
    torch.testing.assert_close(grads[0], grad_tok64, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[1], grad_tgt64, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", BACKENDS)
def test_ties_give_zero_gradient(name):
    impl = cpu_backend(OP, name)
    gen = torch.Generator().manual_seed(5)
    grid, p = (3, 5), 2
    for dtype in dtypes_for(name, DTYPES):
        tokens = torch.randn(2, 15, 12, generator=gen).to(dtype).requires_grad_()
        target = pixel_shuffle_ref(tokens.detach(), grid, p).clone()
        target[:, 1] += 1  # channel 1 differs by exactly 1 (below the target), the others tie
        target.requires_grad_()
        loss = impl.pixel_shuffle_l1(tokens, target, p)
        exact = (pixel_shuffle_ref(tokens.detach(), grid, p).float() - target.detach().float()).abs().mean()
        assert loss.item() == pytest.approx(exact.item(), abs=1e-6)
        g_tok, g_tgt = torch.autograd.grad(loss, (tokens, target))
        g_img = pixel_shuffle_ref(g_tok, grid, p)
        ties = torch.ones(3, dtype=torch.bool)
        ties[1] = False
        assert torch.count_nonzero(g_img[:, ties]) == 0 and torch.count_nonzero(g_tgt[:, ties]) == 0
        step = torch.tensor(1 / target.numel()).to(dtype)  # d|t - (t + 1)| / dt = -1, over numel pixels
        assert torch.all(g_img[:, 1] == -step) and torch.all(g_tgt[:, 1] == step)
        # a perfect reconstruction: zero loss, zero gradients
        target = pixel_shuffle_ref(tokens.detach(), grid, p).clone().requires_grad_()
        loss = impl.pixel_shuffle_l1(tokens, target, p)
        assert loss.item() == 0
        assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(loss, (tokens, target)))


@pytest.mark.parametrize("name", BACKENDS)
def test_gradient_for_only_one_input(name):
    impl = cpu_backend(OP, name)
    gen = torch.Generator().manual_seed(6)
    tokens, target = make_inputs(2, (3, 5), 2, torch.float32, gen)
    (g_tok,) = torch.autograd.grad(impl.pixel_shuffle_l1(tokens, target.detach(), 2), tokens)
    (g_tgt,) = torch.autograd.grad(impl.pixel_shuffle_l1(tokens.detach(), target, 2), target)
    ref_tok, ref_tgt = torch.autograd.grad(pixel_shuffle_l1_ref(tokens, target, 2), (tokens, target))
    assert torch.equal(g_tok, ref_tok) and torch.equal(g_tgt, ref_tgt)


@pytest.mark.parametrize("name", BACKENDS)
def test_non_contiguous_and_misaligned_inputs_give_the_right_answer(name):
    impl = cpu_backend(OP, name)
    gen = torch.Generator().manual_seed(7)
    grid, p = (3, 5), 16
    tokens = torch.randn(2, 3 * p * p, 15, generator=gen).transpose(1, 2)  # (2, 15, 768), strided
    target = torch.randn(2, 3, 48, 80, generator=gen).contiguous(memory_format=torch.channels_last)
    assert torch.equal(impl.pixel_shuffle(tokens, grid, p), pixel_shuffle_ref(tokens, grid, p))
    assert impl.pixel_shuffle_l1(tokens, target, p).item() == pytest.approx(
        pixel_shuffle_l1_ref(tokens, target, p).item(), abs=1e-6)
    # storage offset of one element: no 16-byte alignment, the kernels must take their unvectorised path
    tokens = torch.randn(2 * 15 * 768 + 1, generator=gen)[1:].view(2, 15, 768).requires_grad_()
    target = torch.randn(2 * 3 * 48 * 80 + 1, generator=gen)[1:].view(2, 3, 48, 80).requires_grad_()
    assert torch.equal(impl.pixel_shuffle(tokens, grid, p), pixel_shuffle_ref(tokens, grid, p))
    check_loss_and_grads(impl, tokens, target, grid, p)


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_arguments_raise(name):
    impl = cpu_backend(OP, name)
    tokens, target = torch.randn(2, 6, 12), torch.randn(2, 3, 4, 6)  # p = 2, grid 2x3
    with pytest.raises(ValueError, match="3\\*p\\*p = 12"):
        impl.pixel_shuffle_l1(torch.randn(2, 6, 11), target, 2)
    with pytest.raises(ValueError, match="3\\*p\\*p = 27"):
        impl.pixel_shuffle(tokens, (2, 3), 3)
    with pytest.raises(ValueError, match="target must be"):
        impl.pixel_shuffle_l1(tokens, torch.randn(2, 3, 4, 8), 2)  # 2x4 tokens, not 6
    with pytest.raises(ValueError, match="target must be"):
        impl.pixel_shuffle_l1(tokens, torch.randn(1, 3, 4, 6), 2)  # batch
    with pytest.raises(ValueError, match="target must be"):
        impl.pixel_shuffle_l1(tokens, torch.randn(2, 4, 4, 6), 2)  # channels
    with pytest.raises(ValueError, match="target must be"):
        impl.pixel_shuffle_l1(torch.randn(2, 4, 12), torch.randn(2, 3, 5, 6), 2)  # 5 rows: not whole patches
    with pytest.raises(ValueError, match="target must be"):
        impl.pixel_shuffle_l1(tokens, target[0], 2)  # wrong dims
    with pytest.raises(ValueError, match="tokens must be"):
        impl.pixel_shuffle_l1(tokens[0], target, 2)
    with pytest.raises(ValueError, match="tokens must be"):
        impl.pixel_shuffle(tokens[..., None], (2, 3), 2)
    with pytest.raises(ValueError, match="grid 3x3"):
        impl.pixel_shuffle(tokens, (3, 3), 2)
    with pytest.raises(ValueError, match="patch must be"):
        impl.pixel_shuffle(tokens, (2, 3), 0)
    with pytest.raises(ValueError, match="float"):
        impl.pixel_shuffle_l1(tokens, target.long(), 2)


@pytest.mark.parametrize("name", ["native", pytest.param("triton", marks=pytest.mark.triton)])
def test_custom_op_registrations(name):
    """torch.library's own checks: schema, fake (meta) implementation, autograd registration."""
    cpu_backend(OP, name)
    ns = torch.ops.vtp_fast
    suffix = "" if name == "native" else "_triton"
    shuffle = getattr(ns, f"pixel_shuffle{suffix}")
    l1 = getattr(ns, f"pixel_shuffle_l1{suffix}")
    l1_backward = getattr(ns, f"pixel_shuffle_l1_backward{suffix}")
    tokens = torch.randn(2, 6, 12, requires_grad=True)
    target = torch.randn(2, 3, 4, 6, requires_grad=True)
    torch.library.opcheck(shuffle, (tokens, 2, 3, 2))
    torch.library.opcheck(l1, (tokens, target, 2))
    torch.library.opcheck(l1, (tokens.detach().half().requires_grad_(), target, 2))
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(l1_backward, (torch.tensor(0.5), tokens.detach(), target.detach(), 2, *need))


def test_native_passes_through_torch_compile_fullgraph():
    impl = cpu_backend(OP, "native")

    def f(tokens, target):
        image = impl.pixel_shuffle(tokens * 2, (3, 5), 2)
        return impl.pixel_shuffle_l1(tokens, target, 2) + image.square().mean()

    gen = torch.Generator().manual_seed(8)
    tokens, target = make_inputs(2, (3, 5), 2, torch.float32, gen)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(tokens, target), (tokens, target))
    want = torch.autograd.grad(f(tokens, target), (tokens, target))
    assert all(torch.equal(a, b) for a, b in zip(grads, want, strict=True))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_backends_match_reference(name, dtype):
    impl = OP.backends[name].impl
    gen = torch.Generator(device="cuda").manual_seed(0)
    for b, grid, p, target_dtype in [(64, (16, 16), 16, dtype), (8, (16, 16), 16, torch.float32),
                                     (3, (3, 5), 2, dtype), (2, (1, 1), 1, dtype), (4, (7, 9), 8, dtype)]:
        tokens = torch.randn(b, grid[0] * grid[1], 3 * p * p, device="cuda", generator=gen).to(dtype)
        target = torch.randn(b, 3, grid[0] * p, grid[1] * p, device="cuda", generator=gen).to(target_dtype)
        tokens.requires_grad_()
        target.requires_grad_()
        assert torch.equal(impl.pixel_shuffle(tokens, grid, p), pixel_shuffle_ref(tokens, grid, p))
        loss, loss_ref = impl.pixel_shuffle_l1(tokens, target, p), pixel_shuffle_l1_ref(tokens, target, p)
        loss64 = pixel_shuffle_l1_ref(tokens.double(), target.double(), p)
        err, err_ref = (loss.double() - loss64).abs().item(), (loss_ref.double() - loss64).abs().item()
        assert err <= 2 * err_ref + LOSS_FLOOR, f"loss error {err:.3g} vs reference's {err_ref:.3g}"
        grads = torch.autograd.grad(loss, (tokens, target))
        grads_ref = torch.autograd.grad(loss_ref, (tokens, target))
        assert all(torch.equal(a, r) for a, r in zip(grads, grads_ref, strict=True))
        assert impl.pixel_shuffle_l1(tokens, target, p).item() == loss.item(), "the loss must be deterministic"

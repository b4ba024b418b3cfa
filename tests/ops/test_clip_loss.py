"""The tiled CLIP loss: every backend against the reference and a float64 formula, loss and all five gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from vtp_fast import optional
from vtp_fast.losses.clip import clip_loss_global
from vtp_fast.ops.clip_loss import OP, clip_loss_ref
from vtp_fast.ops.registry import use_backend

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]
# (n, N, offset, E, scale): batches of one, odd primes, this rank's rows in the middle or at the end of the
# global batch; scale 100 is the clamp's maximum, where logits (and an unstable log-sum-exp) are largest. Under
# the interpreter the kernels use 16-row tiles, 32-wide E-chunks and at most 2 column splits, so N = 67 walks
# several column tiles per split (the online rescaling) and E = 33 or 64 several E-chunks.
CASES = [(1, 1, 0, 4, 14.3), (3, 7, 2, 33, 14.3), (5, 5, 0, 64, 14.3), (17, 31, 9, 64, 100.0),
         (3, 7, 2, 4, 100.0), (7, 67, 60, 16, 14.3)]
NAMES = ("image", "text", "all_image", "all_text", "scale")


def impl(name: str):
    b = OP.backends[name]
    assert b.available and "cpu" in b.devices, f"{name} does not run on cpu here"
    return b.impl.clip_loss


def features(n, big_n, offset, dim, dtype, device="cpu", seed=0):
    """L2-normalised (image, text, all_image, all_text) where this rank's rows of all_* are image/text and each
    text is a noisy copy of its image (so targets win, as in training); all leaves needing grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    all_image = F.normalize(torch.randn(big_n, dim, generator=gen, device=device), dim=-1)
    all_text = F.normalize(all_image + 0.7 * torch.randn(big_n, dim, generator=gen, device=device), dim=-1)
    all_image, all_text = all_image.to(dtype), all_text.to(dtype)
    image, text = all_image[offset:offset + n].clone(), all_text[offset:offset + n].clone()
    return [t.requires_grad_() for t in (image, text, all_image, all_text)]


def formula64(image, text, all_image, all_text, scale, offset):
    """Loss and closed-form gradients (image, text, all_image, all_text, scale), written out in float64."""
    i, t, ai, at = (x.detach().double() for x in (image, text, all_image, all_text))
    s = scale.detach().double()
    n, big_n = i.shape[0], ai.shape[0]
    onehot = torch.zeros(n, big_n, dtype=torch.float64, device=i.device)
    rows = torch.arange(n, device=i.device)
    onehot[rows, offset + rows] = 1

    def direction(q, k):
        u = q @ k.T  # (n, N)
        z = s * u
        z = z - z.max(1, keepdim=True).values
        log_p = z - z.exp().sum(1, keepdim=True).log()
        d = (log_p.exp() - onehot) / (2 * n)  # dloss / dlogits of the two-direction mean
        return -(log_p * onehot).sum() / n, s * d @ k, s * d.T @ q, (d * u).sum()

    loss_a, g_image, g_all_text, gs_a = direction(i, at)
    loss_b, g_text, g_all_image, gs_b = direction(t, ai)
    return (loss_a + loss_b) / 2, (g_image, g_text, g_all_image, g_all_text, gs_a + gs_b)


def run(fn, tensors, scale, offset):
    scale = scale.detach().clone().requires_grad_()
    loss = fn(*tensors, scale, offset)
    return loss, torch.autograd.grad(loss, (*tensors, scale))


def assert_flash_rule(what, got, ref, exact):
    """The kernel's max error vs float64 is at most 2x the reference's in the same dtype, plus a floor of 1e-6
    relative to the largest exact value (about 8 fp32 ulps): on these tiny tensors both fp32 errors are a few ulps
    and their ratio is noise; fp16 errors are far above the floor."""
    err = (got.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    floor = 1e-6 * max(1.0, exact.abs().max().item())
    assert err <= 2 * ref_err + floor, f"{what}: error {err:.3g} vs the reference's {ref_err:.3g}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_float64_formula(case, dtype):
    n, big_n, offset, dim, s = case
    tensors = features(n, big_n, offset, dim, dtype)
    loss, grads = run(clip_loss_ref, tensors, torch.tensor(s), offset)
    exact_loss, exact_grads = formula64(*tensors, torch.tensor(s), offset)
    assert loss.dtype == torch.float32 and loss.shape == ()
    tol = 1e-5 if dtype == torch.float32 else 1e-6  # the reference's cross-entropy runs in fp32 either way
    torch.testing.assert_close(loss.double(), exact_loss, rtol=tol, atol=tol)
    for name, g, e in zip(NAMES, grads, exact_grads, strict=True):
        assert g.dtype == (torch.float32 if name == "scale" else dtype), name
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * max(1.0, s / 10), msg=name)


@pytest.mark.triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference_and_float64(case, dtype):
    n, big_n, offset, dim, s = case
    tensors = features(n, big_n, offset, dim, dtype, seed=n * 1000 + dim)
    scale = torch.tensor(s)
    loss, grads = run(impl("triton"), tensors, scale, offset)
    ref_loss, ref_grads = run(clip_loss_ref, tensors, scale, offset)
    exact_loss, exact_grads = formula64(*tensors, scale, offset)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_flash_rule("loss", loss, ref_loss, exact_loss)
    for name, g, r, e in zip(NAMES, grads, ref_grads, exact_grads, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert_flash_rule(name, g, r, e)
    if dtype == torch.float32:  # and close to the reference outright
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("target_wins", [False, True])
def test_extreme_logits(name, target_wins):
    """Scale 100 and features at cosine +-1. Either every logit is -100, where exp(-logit) overflows fp32 (the
    softmax is uniform, the loss log N); or the target's logit is +100 and the 66 others, spread over column
    tiles, are -100, where a running max that forgot an earlier tile would overflow (the loss is ~0)."""
    fn = impl(name)
    v = F.normalize(torch.randn(1, 24, generator=torch.Generator().manual_seed(1)), dim=-1)
    n, big_n, offset = (1, 67, 0) if target_wins else (3, 5, 1)
    others = -v.expand(big_n, 24).clone()
    if target_wins:
        others[0] = v[0]
    tensors = [t.clone().requires_grad_() for t in (v.expand(n, 24), v.expand(n, 24), others, others)]
    loss, grads = run(fn, tensors, torch.tensor(100.0), offset)
    exact_loss, exact_grads = formula64(*tensors, torch.tensor(100.0), offset)
    assert abs(loss.item() - (0.0 if target_wins else math.log(big_n))) < 1e-5
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-5)
    for what, g, e in zip(NAMES, grads, exact_grads, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5, msg=what)


@pytest.mark.parametrize("name", BACKENDS)
def test_one_process_matches_clip_loss_global(name):
    """all_image is image, all_text is text, offset 0: autograd sums both paths, as clip_loss_global's does."""
    fn = impl(name)
    image, text = (t.detach() for t in features(13, 13, 0, 33, torch.float32)[:2])
    logit_scale = torch.tensor(math.log(1 / 0.07))
    leaves = [t.clone().requires_grad_() for t in (image, text, logit_scale)]
    loss = fn(leaves[0], leaves[1], leaves[0], leaves[1], leaves[2].exp(), 0)
    grads = torch.autograd.grad(loss, leaves)
    expect_leaves = [t.clone().requires_grad_() for t in (image, text, logit_scale)]
    expect = clip_loss_global(expect_leaves[0], expect_leaves[1], expect_leaves[2].exp())
    expect_grads = torch.autograd.grad(expect, expect_leaves)
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    for what, g, e in zip(("image", "text", "logit_scale"), grads, expect_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=what)


@pytest.mark.parametrize("name", BACKENDS)
def test_non_contiguous_inputs_give_the_right_answer(name):
    fn = impl(name)
    image, text, all_image, all_text = (t.detach() for t in features(5, 9, 4, 17, torch.float32))
    strided = [torch.stack([t, torch.zeros_like(t)], -1)[..., 0] for t in (image, text, all_image, all_text)]
    assert not strided[0].is_contiguous()
    scale = torch.tensor(14.3)
    torch.testing.assert_close(fn(*strided, scale, 4), clip_loss_ref(image, text, all_image, all_text, scale, 4))


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_arguments_raise(name):
    fn = impl(name)
    image, text, all_image, all_text = (torch.randn(s, 8) for s in (3, 3, 7, 7))
    scale = torch.tensor(10.0)
    bad = [
        ("2-D", (image[0], text, all_image, all_text, scale, 0)),
        ("2-D", (image, text, all_image, all_text.unsqueeze(0), scale, 0)),
        ("image and text", (image, text[:2], all_image, all_text, scale, 0)),
        ("E >= 1", (image[:, :0], text[:, :0], all_image[:, :0], all_text[:, :0], scale, 0)),
        ("all_image and all_text", (image, text, all_image, all_text[:6], scale, 0)),
        ("E=5", (image[:, :5], text[:, :5], all_image, all_text, scale, 0)),  # local and global E differ
        ("scale must be a 0-dim", (image, text, all_image, all_text, scale.reshape(1), 0)),
        ("scale must be a 0-dim", (image, text, all_image, all_text, 10.0, 0)),
        ("offset", (image, text, all_image, all_text, scale, 5)),  # offset + n > N
        ("offset", (image, text, all_image, all_text, scale, -1)),
        ("offset", (image, text, all_image[:2], all_text[:2], scale, 0)),  # n > N
        ("offset", (image, text, all_image, all_text, scale, 1.0)),
        ("text is torch.float64", (image, text.double(), all_image, all_text, scale, 0)),
    ]
    for match, args in bad:
        with pytest.raises(ValueError, match=match):
            fn(*args)


@pytest.mark.triton
def test_triton_rejects_float64():
    tensors = (torch.randn(s, 8, dtype=torch.float64) for s in (3, 3, 7, 7))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        impl("triton")(*tensors, torch.tensor(10.0), 0)


@pytest.mark.triton
def test_custom_op_registrations():
    """torch.library's own checks: schema, fake (meta) implementation, autograd registration."""
    impl("triton")
    tensors = features(3, 5, 1, 8, torch.float32)
    scale = torch.tensor(14.3, requires_grad=True)
    torch.library.opcheck(torch.ops.vtp_fast.clip_loss_triton, (*tensors, scale, 1))
    _, norm, _ = torch.ops.vtp_fast.clip_loss_triton(*(t.detach() for t in tensors), scale.detach(), 1)
    torch.library.opcheck(torch.ops.vtp_fast.clip_loss_triton_backward,
                          (torch.tensor(1.0), *(t.detach() for t in tensors), scale.detach(), norm, 1))


@pytest.mark.parametrize("name", BACKENDS)
def test_passes_through_torch_compile_fullgraph(name):
    """Dynamic shapes make the offset a SymInt, as when the caller computes n * rank."""
    fn = impl(name)

    def last_rank_loss(image, text, all_image, all_text, scale):
        return fn(image, text, all_image, all_text, scale, all_image.shape[0] - image.shape[0])

    compiled = torch.compile(last_rank_loss, backend="aot_eager", fullgraph=True, dynamic=True)
    for n, big_n in ((3, 7), (4, 9)):
        tensors = features(n, big_n, big_n - n, 17, torch.float32)
        loss, grads = run(lambda *args: compiled(*args[:5]), tensors, torch.tensor(14.3), None)  # no offset
        eager_loss, eager_grads = run(fn, tensors, torch.tensor(14.3), big_n - n)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-7)
        for g, e in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


@pytest.mark.triton
def test_interpreted_triton_is_opt_in_on_cpu():
    if not optional.triton_interpreter():
        pytest.skip("the interpreter's registration")
    assert OP.backends["triton"].devices == ("cpu",) and OP.resolve("cpu").name == "reference"
    with use_backend("clip_loss", "triton"):
        assert OP.resolve("cpu").name == "triton"


@pytest.mark.cuda
@pytest.mark.parametrize(("case", "dtype"), [
    ((4096, 32768, 3 * 4096, 768, 100.0), torch.bfloat16),  # the shape: 8 ranks of 4096 pairs
    ((17, 31, 9, 33, 14.3), torch.bfloat16),  # odd sizes, E not a multiple of 16 (unaligned rows)
    ((300, 1000, 0, 512, 14.3), torch.float16),
    ((300, 1000, 700, 96, 100.0), torch.float32),  # fp32 takes the exact (non-tf32) dot
])
def test_cuda_triton_matches_reference(case, dtype):
    n, big_n, offset, dim, s = case
    fn = OP.backends["triton"].impl.clip_loss
    tensors = features(n, big_n, offset, dim, dtype, device="cuda")
    scale = torch.tensor(s, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, grads = run(fn, tensors, scale, offset)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ref_loss, ref_grads = run(clip_loss_ref, tensors, scale, offset)
    torch.cuda.synchronize()
    ref_peak = torch.cuda.max_memory_allocated() - base
    if n * big_n >= 2**24:  # the target; the gradients themselves are O((n + N) E)
        assert peak * 8 <= ref_peak, f"peak {peak / 2**20:.1f} MiB vs the reference's {ref_peak / 2**20:.1f} MiB"
    exact_loss, exact_grads = formula64(*tensors, scale, offset)
    assert_flash_rule("loss", loss, ref_loss, exact_loss)
    for name, g, r, e in zip(NAMES, grads, ref_grads, exact_grads, strict=True):
        assert g.dtype == r.dtype, name
        assert_flash_rule(name, g, r, e)


@pytest.mark.cuda
def test_cuda_triton_backward_is_deterministic():
    """No atomics: two backward passes agree bitwise, at 8 ranks of 4096 pairs (8 column chunks) and at 512 pairs
    against 16k (one chunk, dq's contraction split over the SMs)."""
    fn = OP.backends["triton"].impl.clip_loss
    for n, big_n in ((4096, 32768), (512, 16384)):
        tensors = features(n, big_n, big_n - n, 768, torch.bfloat16, device="cuda")
        scale = torch.tensor(100.0, device="cuda")
        (loss_a, grads_a), (loss_b, grads_b) = (run(fn, tensors, scale, big_n - n) for _ in range(2))
        assert torch.equal(loss_a, loss_b)
        for a, b in zip(grads_a, grads_b, strict=True):
            assert torch.equal(a, b)

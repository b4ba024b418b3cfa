"""Attention backends against the reference and a float64 computation: plain, causal, with the fused 2-D RoPE
(published bf16 rounding emulated; fp16 stands in for bf16 under the CPU interpreter), and the packed varlen
mode for multi-crop views."""

import pytest
import torch

from vtp_fast.nn.rope import Rope2D, apply_rope
from vtp_fast.ops.attention import OP, attention_ref, attention_varlen_ref, full_rope
from vtp_fast.ops.registry import use_backend

# the reference itself is not in this list: compared with itself it could not fail; it is checked against float64
# in test_reference_against_float64
CPU_BACKENDS = [b.name for b in OP.runnable("cpu") if b.name not in ("triton", "reference")]
TRITON = pytest.param("triton", marks=pytest.mark.triton)
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3}  # absolute floor of the flash-attention error rule


def impl(name):
    backend = OP.backends[name]
    assert backend.available and "cpu" in backend.devices, f"{name} cannot run on the CPU here"
    return backend.impl


def rope_tables(h: int, w: int, head_dim: int, dtype: str = "fp32"):
    return Rope2D(head_dim, dtype=dtype)(h, w)


def assert_flash_rule(got, ref, truth, dtype, what):
    """The kernel's error against float64 is at most twice the reference's error in the same dtype."""
    err, ref_err = (got.double() - truth).abs().max().item(), (ref.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + FLOOR[dtype], f"{what}: kernel error {err:.3g} vs reference {ref_err:.3g}"


def run(fn, q, k, v, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


CASES = [  # (B, H, N, D, causal, rope grid or None); the interpreter's tiles are 32 wide, ragged ends 16
    (1, 1, 1, 32, False, None),
    (2, 2, 17, 32, False, None),
    (1, 2, 33, 64, True, None),
    (1, 1, 82, 32, True, None),  # full tiles, then ragged pieces on both sides of the diagonal
    (2, 1, 17, 32, False, (4, 4)),  # CLS + 4x4 patches
    (1, 2, 16, 32, False, (2, 8)),  # no prefix token, non-square grid
    (1, 1, 257, 64, False, (16, 16)),
]


def _inputs_and_reference(case: tuple, dtype: torch.dtype):
    """q, k, v (fp32), the rope tables, and the reference's (out, dq, dk, dv) in float64 (truth) and in dtype."""
    b, h, n, d, causal, grid = case
    gen = torch.Generator().manual_seed(n * 31 + d)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    rope = rope_tables(*grid, d, "fp32") if grid else None
    truth = run(attention_ref, q.double(), k.double(), v.double(), causal=causal,
                rope=(rope[0].double(), rope[1].double()) if rope else None)
    ref = run(attention_ref, q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, rope=rope)
    return q, k, v, rope, truth, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_against_float64(dtype):
    """The pure-PyTorch reference (the yardstick of every backend) against the same formula in float64: outputs and
    gradients within 1e-5 (fp32) / 5e-3 (fp16) of each tensor's largest entry (at least 1; measured: 7e-7 and 1e-3
    over CASES)."""
    tol = {torch.float32: 1e-5, torch.float16: 5e-3}[dtype]
    for case in CASES:
        _, _, _, _, truth, ref = _inputs_and_reference(case, dtype)
        for what, r, t in zip(("out", "dq", "dk", "dv"), ref, truth, strict=True):
            err = ((r.double() - t).abs().max() / t.abs().max().clamp_min(1.0)).item()  # dq is 0 at one token
            assert err <= tol, f"{case} {what}: relative error {err:.3g}"


@pytest.mark.parametrize("name", CPU_BACKENDS + [TRITON])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[:4]}-causal{c[4]}-rope{c[5]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_outputs_and_gradients(name, case, dtype):
    causal = case[4]
    if name == "sdpa" and dtype == torch.float16:
        pytest.skip("CPU SDPA fp16 is not a supported configuration")
    q, k, v, rope, truth, ref = _inputs_and_reference(case, dtype)
    got = run(impl(name).attention, q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, rope=rope)
    for what, g, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth, strict=True):
        assert g.shape == r.shape and g.dtype == dtype
        assert_flash_rule(g, r, t, dtype, what)


@pytest.mark.triton
def test_fused_rope_reproduces_the_reference_rounding():
    """The published numerics round q/k through the rope dtype (bf16) at every step. The kernel emulates each
    rounding; the interpreter has no bf16 arithmetic, so fp16 tables exercise the same code here (bf16 runs in
    the cuda test)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 17, 32, generator=gen) for _ in range(3))
    sin, cos = rope_tables(4, 4, 32, "fp32")
    rope = (sin.half(), cos.half())
    ref = attention_ref(q, k, v, rope=rope)
    got = impl("triton").attention(q, k, v, rope=rope)
    # rounding reproduced: what remains is fp32 summation order in the matmuls
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # and the rounding matters: the fp32 rotation differs by about an fp16 ulp
    assert (attention_ref(q, k, v, rope=(sin, cos)) - ref).abs().max() > 1e-4


def packed(shapes, d, gen, grids=None):
    """Views (B_i, N_i) -> packed q, k, v (T, H, D), seq_start, seq_len, per-token rope."""
    h = 2
    lens = [n for b, n in shapes for _ in range(b)]
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=gen) for _ in range(3))
    seq_len = torch.tensor(lens, dtype=torch.int32)
    seq_start = torch.cumsum(seq_len, 0, dtype=torch.int32) - seq_len
    rope = None
    if grids:
        tabs = [full_rope(rope_tables(*g, d), n) for g, (_, n) in zip(grids, shapes, strict=True)]
        rope = tuple(torch.cat([tb[j].repeat(b, 1) for tb, (b, _) in zip(tabs, shapes, strict=True)]) for j in (0, 1))
    return q, k, v, seq_start, seq_len, max(lens), rope


@pytest.mark.triton
@pytest.mark.parametrize("rope", [False, True])
def test_varlen_packs_views_of_different_sizes(rope):
    gen = torch.Generator().manual_seed(3)
    if rope:  # CLS + 6x6 (a full 32-wide tile and a ragged end), CLS + 4x4 and CLS + 2x2 grids
        q, k, v, starts, lens, max_len, tables = packed([(1, 37), (2, 17), (3, 5)], 32, gen,
                                                        [(6, 6), (4, 4), (2, 2)])
    else:  # a one-token sequence too
        q, k, v, starts, lens, max_len, tables = packed([(1, 37), (2, 17), (3, 5), (1, 1)], 32, gen)

    def call(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*xs, starts, lens, max_len, rope=tables)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        return (out, *torch.autograd.grad(out, xs, g))

    ref, got = call(attention_varlen_ref, q, k, v), call(impl("triton").attention_varlen, q, k, v)
    truth = call(lambda *a, **kw: attention_varlen_ref(*[x.double() for x in a[:3]], *a[3:],
                                                      rope=tuple(t.double() for t in kw["rope"]) if kw["rope"]
                                                      else None), q, k, v)
    for what, g, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth, strict=True):
        assert_flash_rule(g, r, t, torch.float32, what)


@pytest.mark.triton
def test_deterministic_backward_sums_dq_in_a_fixed_order():
    """With deterministic algorithms on, the backward runs one key block column per launch, so dQ's additions land
    in a fixed order: the gradients repeat bit for bit and agree with the parallel (atomic) path."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 65, 32, generator=gen) for _ in range(3))  # CLS + 8x8: 2 full key blocks + 1
    rope = rope_tables(8, 8, 32)
    parallel = run(impl("triton").attention, q, k, v, rope=rope)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (run(impl("triton").attention, q, k, v, rope=rope) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(previous)
    ref, truth = run(attention_ref, q, k, v, rope=rope), run(attention_ref, q.double(), k.double(), v.double(),
                                                            rope=tuple(t.double() for t in rope))
    for what, a, b, p, r, t in zip(("out", "dq", "dk", "dv"), first, second, parallel, ref, truth, strict=True):
        assert torch.equal(a, b), what
        torch.testing.assert_close(a, p, rtol=1e-5, atol=1e-6)
        assert_flash_rule(a, r, t, torch.float32, what)


@pytest.mark.triton
def test_launch_plan_for_a_gpu_without_one():
    """On a planned sm_90 target (meta tensors, nothing runs): bf16 plans the RoPE pre-pass, the forward, and the
    backward's delta, main and dq passes, the main one over every key block at once (or one launch per key block
    column when deterministic); fp32 is not offered (the op sends it to SDPA)."""
    from vtp_fast.kernels import attention as kern
    from vtp_fast.kernels import offline

    def plan(dtype, deterministic=False):
        q = torch.empty(4, 12, 257, 64, dtype=dtype, device="meta")
        sin = torch.empty(257, 64, dtype=torch.bfloat16, device="meta")
        lens = torch.empty(4, dtype=torch.int32, device="meta")
        args = dict(seq_start=lens, seq_len=lens, lmax=257, causal=False, layout="dense")
        with offline(90, 132) as state:
            out, lse, qs, ks = kern.forward(q, q, q, sin, sin, **args)
            kern.backward(torch.empty_like(out), qs, ks, q, out, lse, sin, sin, **args, deterministic=deterministic)
        return [(launch.kernel.fn.__name__, launch.grid) for launch in state.launches]

    names = [name for name, _ in plan(torch.bfloat16)]
    assert names == ["_rope", "_attn_fwd", "_delta", "_attn_bwd", "_rope"]
    blocks, programs = dict(plan(torch.bfloat16))["_attn_bwd"]
    assert programs == 4 * 12 and blocks > 1
    serial = [grid for name, grid in plan(torch.bfloat16, deterministic=True) if name == "_attn_bwd"]
    assert serial == [(1, 4 * 12)] * blocks
    with pytest.raises(NotImplementedError, match="fp32"):
        plan(torch.float32)


@pytest.mark.triton
def test_trunk_list_forward_packs_views_in_one_launch():
    """With the Triton backend the trunk's multi-crop list forward runs one varlen launch per block and gives
    what per-view SDPA attention gives."""
    from vtp_fast import VTP, vtp_config

    torch.manual_seed(0)
    ref_model = VTP(vtp_config("vtp-nano"), rope_dtype="fp32").eval()
    with use_backend("attention", "triton"):
        packed_model = VTP(vtp_config("vtp-nano"), rope_dtype="fp32").eval()
    packed_model.load_state_dict(ref_model.state_dict())
    assert packed_model.trunk.packs_views and not ref_model.trunk.packs_views
    views = [torch.randn(2, 3, 64, 64), torch.randn(3, 3, 32, 32)]
    masks = [torch.rand(2, 16) < 0.3, None]
    with torch.no_grad():
        for a, b in zip(ref_model.trunk(views, masks), packed_model.trunk(views, masks), strict=True):
            torch.testing.assert_close(a.patch, b.patch, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(a.cls, b.cls, rtol=1e-4, atol=1e-4)


@pytest.mark.triton
def test_triton_custom_op_registration():
    q, k, v = (torch.randn(1, 2, 5, 32, requires_grad=True) for _ in range(3))
    sin, cos = full_rope(rope_tables(2, 2, 32), 5)
    args = (q, k, v, sin, cos, torch.zeros(1, dtype=torch.int32), torch.full((1,), 5, dtype=torch.int32), 5,
            False, False)
    torch.library.opcheck(torch.ops.vtp_fast.attention_triton, args)


@pytest.mark.triton
def test_triton_rejects_what_it_cannot_run():
    a = impl("triton").attention
    with pytest.raises(ValueError, match="power of two"):
        a(*(torch.randn(1, 1, 4, 24) for _ in range(3)))
    with pytest.raises(ValueError, match="share one"):
        a(torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 32).double(), torch.randn(1, 1, 4, 32))


def test_causal_ignores_the_future():
    q, k, v = (torch.randn(1, 1, 5, 8) for _ in range(3))
    out = attention_ref(q, k, v, causal=True)
    v2 = v.clone()
    v2[..., 3:, :] += 100
    assert torch.allclose(attention_ref(q, k, v2, causal=True)[..., :3, :], out[..., :3, :])


def test_shape_and_rope_mismatch_raise():
    with pytest.raises(ValueError, match="\\(B, H, N, head_dim\\)"):
        attention_ref(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 3, 4))
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="rope sin/cos"):
        attention_ref(q, q, q, rope=(torch.randn(4, 8), torch.randn(4, 8)))


def test_rope_prefix_tokens_pass_through_the_rope_dtype():
    """apply_rope casts all tokens (CLS included) through the rope dtype; full_rope's identity rows do the
    same, so dense and packed paths agree on the prefix."""
    q = torch.randn(1, 1, 5, 8)
    sin, cos = rope_tables(2, 2, 8, "bf16")
    rq, _ = apply_rope(q, q, sin, cos)
    assert torch.equal(rq[0, 0, 0], q[0, 0, 0].to(torch.bfloat16).float())
    fs, fc = full_rope((sin, cos), 5)
    assert torch.equal(fs[0], torch.zeros(8, dtype=torch.bfloat16)) and torch.equal(fc[0], torch.ones(8).bfloat16())


@pytest.mark.cuda
def test_cuda_triton_sends_fp32_to_sdpa():
    q, k, v = (torch.randn(2, 4, 65, 64, device="cuda") for _ in range(3))
    rope = tuple(t.cuda() for t in rope_tables(8, 8, 64, "fp32"))
    got = OP.backends["triton"].impl.attention(q, k, v, rope=rope)
    assert torch.equal(got, OP.backends["sdpa"].impl.attention(q, k, v, rope=rope))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, d", [(257, 64), (1024, 128), (16, 64)])
def test_cuda_triton_vs_reference(dtype, n, d):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, 8, n, d, device="cuda", generator=gen) for _ in range(3))
    side = int((n - 1) ** 0.5)
    rope = rope_tables(side, side, d, "bf16") if side * side == n - 1 else None
    rope = tuple(t.cuda() for t in rope) if rope else None
    truth = run(attention_ref, q.double(), k.double(), v.double(),
                rope=tuple(t.double() for t in rope) if rope else None)
    ref = run(attention_ref, q.to(dtype), k.to(dtype), v.to(dtype), rope=rope)
    got = run(OP.backends["triton"].impl.attention, q.to(dtype), k.to(dtype), v.to(dtype), rope=rope)
    for what, g, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth, strict=True):
        err, ref_err = (g.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 2 * ref_err + 1e-3, f"{what}: {err} vs {ref_err}"

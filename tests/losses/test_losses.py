"""Each loss against its formula written out independently here (float64 loops), values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from vtp_fast.config import ConfigError
from vtp_fast.data.views import mask_weights
from vtp_fast.losses.clip import MAX_LOGIT_SCALE, ClipLoss, clamp_logit_scale_, clip_loss_global
from vtp_fast.losses.dino import DINOLoss, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from vtp_fast.losses.objective import Objective, ObjectiveConfig
from vtp_fast.losses.reconstruction import LPIPS, ReconstructionLoss


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def log_softmax_row(row):
    m = max(row)
    return [v - m - math.log(sum(math.exp(u - m) for u in row)) for v in row]


def test_clip_loss_matches_written_out_cross_entropy():
    g = gen()
    img = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    loss = ClipLoss()(img, txt, logit_scale)
    s = math.exp(logit_scale.item())
    sim = [[s * float(img[i].detach() @ txt[j].detach()) for j in range(5)] for i in range(5)]
    i2t = -sum(log_softmax_row(sim[i])[i] for i in range(5)) / 5
    t2i = -sum(log_softmax_row([sim[j][i] for j in range(5)])[i] for i in range(5)) / 5
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)  # the op reports the loss in fp32
    # gradients equal those of the plain global formula
    loss.backward()
    grads = [t.grad.clone() for t in (img, txt, logit_scale)]
    for t in (img, txt, logit_scale):
        t.grad = None
    clip_loss_global(img, txt, logit_scale.exp()).backward()
    for a, t in zip(grads, (img, txt, logit_scale), strict=True):
        torch.testing.assert_close(a, t.grad)


def test_clip_logit_scale_at_the_cap_keeps_its_gradient_and_matches_open_clip():
    g = gen(1)
    img, txt = (F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    cap = torch.tensor(math.log(MAX_LOGIT_SCALE), dtype=torch.float64, requires_grad=True)
    loss = ClipLoss()(img, txt, cap)
    loss.backward()
    assert cap.grad.item() != 0.0  # a clamp inside the graph would make this exactly zero
    # analytic: d/dl of the symmetric CE at scale s = e^l is s * mean over both directions of (E_p[sim] - sim_ii)
    sim = img @ txt.T
    s = MAX_LOGIT_SCALE
    expect = s * ((torch.softmax(s * sim, 1) * sim).sum(1) - sim.diag()).mean() / 2
    expect = expect + s * ((torch.softmax(s * sim.T, 1) * sim.T).sum(1) - sim.diag()).mean() / 2
    # rel 1e-6: the op may reduce in another order or in fp32 (observed 3e-9); a cut-off gradient is off by 100%
    assert cap.grad.item() == pytest.approx(expect.item(), rel=1e-6)
    open_clip = pytest.importorskip("open_clip")  # open_clip: model.logit_scale.exp() handed to its ClipLoss
    theirs = torch.tensor(math.log(MAX_LOGIT_SCALE), dtype=torch.float64, requires_grad=True)
    open_clip.ClipLoss()(img, txt, theirs.exp()).backward()
    assert cap.grad.item() == pytest.approx(theirs.grad.item(), rel=1e-6)
    assert loss.item() == pytest.approx(clip_loss_global(img, txt, torch.tensor(s, dtype=torch.float64)).item())


def test_clamp_logit_scale_after_the_step_lets_a_capped_scale_come_back_down():
    for direction, expect in ((1.0, math.log(MAX_LOGIT_SCALE) - 0.5), (-1.0, math.log(MAX_LOGIT_SCALE))):
        p = torch.nn.Parameter(torch.tensor(math.log(MAX_LOGIT_SCALE)))
        opt = torch.optim.SGD([p], lr=0.5)
        p.grad = torch.tensor(direction)  # positive gradient: the step lowers the scale; negative: raises it
        opt.step()
        clamp_logit_scale_(p)
        assert p.item() == pytest.approx(expect)
    low = torch.nn.Parameter(torch.tensor(-3.0))
    clamp_logit_scale_(low)
    assert low.item() == 0.0  # open_clip's lower bound: the scale never drops below 1


def ce(t_row, s_row, temp):
    ls = log_softmax_row([v / temp for v in s_row])
    return -sum(p * l for p, l in zip(t_row, ls, strict=True))


def head_inputs(g, n, d, k):
    """Unit-norm head embeddings and unit-norm prototype rows, float64."""
    emb = lambda m: F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    return emb, F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=-1)


def test_dino_loss_cross_view_pairing():
    g = gen(2)
    n, d, k, ts, tt = 3, 5, 7, 0.1, 0.04
    emb, w = head_inputs(g, n, d, k)
    w_teacher = F.normalize(w + 0.2 * torch.randn(k, d, generator=g, dtype=torch.float64), dim=-1)
    sg, sl = [emb(n) for _ in range(2)], [emb(n) for _ in range(3)]
    tg = torch.cat([emb(n), emb(n)])
    loss_fn = DINOLoss(k, student_temp=ts)
    loss_fn.center.copy_(0.3 * torch.randn(1, k, generator=g))
    center = loss_fn.center[0].double().clone()
    targets = loss_fn.teacher_targets(tg, w_teacher, tt).chunk(2)
    loss = loss_fn(sg, sl, targets, w)
    t_probs = [torch.softmax((t @ w_teacher.T - center) / tt, -1) for t in tg.chunk(2)]  # the teacher's own W
    pairs = [(s, t_probs[1 - i]) for i, s in enumerate(sg)] + [(s, t) for s in sl for t in t_probs]
    expect = sum(sum(ce(t[b].tolist(), (s @ w.T)[b].tolist(), ts) for b in range(n)) / n for s, t in pairs)
    assert len(pairs) == 2 + 2 * 3
    assert loss.item() == pytest.approx(expect / len(pairs), rel=1e-6)


def test_dino_loss_same_with_materialised_and_streamed_targets():
    """The reference backend's path (teacher probabilities made once, each student view's log-softmax once) and the
    fused op's (head embeddings to the prototype cross-entropy, pair by pair): the same loss and gradients."""
    g = gen(12)
    n, d, k = 3, 5, 9
    emb, w = head_inputs(g, n, d, k)
    views, tg = [emb(n) for _ in range(2 + 3)], torch.cat([emb(n), emb(n)])
    results = []
    for streams in (False, True):
        loss_fn = DINOLoss(k)
        loss_fn.streams = streams
        loss_fn.center.copy_(0.3 * torch.randn(1, k, generator=gen(13)))
        leaves = [v.clone().requires_grad_() for v in [*views, w]]
        loss = loss_fn(leaves[:2], leaves[2:5], loss_fn.teacher_targets(tg, w, 0.04).chunk(2), leaves[5])
        results.append([loss, *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("streams", [False, True])
def test_teacher_centring_and_center_ema(streams):
    g = gen(3)
    n, d, k, temp = 4, 6, 5, 0.04
    emb, w = head_inputs(g, n, d, k)
    loss = DINOLoss(k, center_momentum=0.9)
    loss.streams = streams  # as with a backend that streams the logits (Triton) or one that materialises them
    loss.center.copy_(torch.randn(1, k, generator=g))
    c0 = loss.center.clone()
    t = emb(n).float()
    logits = t @ w.float().T

    def made_with(targets, center):  # the centre in force for this batch
        assert torch.equal(targets.center, center)
        if streams:  # what the fused cross-entropy needs to make the targets
            assert targets.probs is None and torch.equal(targets.emb, t)
        else:  # the targets themselves
            assert targets.emb is None
            torch.testing.assert_close(targets.probs, torch.softmax((logits - center) / temp, -1))

    targets = loss.teacher_targets(t, w.float(), temp)
    made_with(targets, c0[0])
    assert torch.equal(loss.center, c0)  # moved only by the caller, once the step is taken
    c1 = 0.9 * c0[0] + 0.1 * logits.mean(0)  # the EMA of the mean teacher logits
    torch.testing.assert_close(targets.next_center, c1)
    again = loss.teacher_targets(t, w.float(), temp, center=c1)  # the next micro-batch, with the moved centre
    made_with(again, c1)
    torch.testing.assert_close(again.next_center, 0.9 * c1 + 0.1 * logits.mean(0))
    empty = loss.teacher_targets(t[:0], w.float(), temp, center=c1)  # no rows (iBOT, nothing masked): it stays
    assert torch.equal(empty.next_center, c1)


def test_sinkhorn_knopp_balances_prototypes():
    g = gen(4)
    b, k = 64, 8
    logits = torch.randn(b, k, generator=g)
    q = sinkhorn_knopp(logits, 0.5, iterations=50)
    torch.testing.assert_close(q.sum(1), torch.ones(b), rtol=1e-5, atol=1e-5)  # each row a distribution
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k), rtol=1e-3, atol=1e-3)  # prototypes equally used
    loss = DINOLoss(k, centering="sinkhorn_knopp")
    emb, w = head_inputs(g, b, 4, k)
    targets = loss.teacher_targets(emb(b).float(), w.float(), 0.1)
    assert torch.allclose(targets.probs.sum(1), torch.ones(b), atol=1e-5)
    assert torch.count_nonzero(loss.center) == 0, "sinkhorn mode keeps no centre"
    # the student side against explicit probabilities: -sum p log softmax(s W^T / T)
    s = emb(b).float()
    expect = -(targets.probs * torch.log_softmax(s @ w.float().T / 0.1, -1)).sum(-1)
    torch.testing.assert_close(loss.cross_entropy(s, w.float(), targets), expect)


def dinov2_sinkhorn(teacher_output, teacher_temp, n_iterations=3):
    """DINOv2's SinkhornKnopp teacher (dinov2/loss/dino_clstoken_loss.py, one process), written out: exp in the
    dtype given (DINOv2 uses fp32)."""
    q = torch.exp(teacher_output / teacher_temp).t()  # (K, B)
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(n_iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def test_sinkhorn_knopp_equals_dinov2_where_finite_and_stays_finite_where_it_overflows():
    g = gen(14)
    logits = torch.randn(24, 40, generator=g)
    # small logits: DINOv2's fp32 version is finite, ours gives the same numbers
    ours = sinkhorn_knopp(logits, 0.05)
    theirs = dinov2_sinkhorn(logits.float(), 0.05)
    assert torch.isfinite(theirs).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours, dinov2_sinkhorn(logits.double(), 0.05).float(), rtol=1e-4, atol=1e-6)
    # logits of ~5-15 units at temperature 0.05: exp(100+) overflows fp32 and DINOv2's targets are NaN; ours are
    # finite and equal DINOv2's algorithm carried out in float64 (where exp(350) is still finite)
    big = logits * 5
    assert torch.isnan(dinov2_sinkhorn(big.float(), 0.05)).any()
    ours = sinkhorn_knopp(big, 0.05)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, dinov2_sinkhorn(big.double(), 0.05).float(), rtol=1e-4, atol=1e-6)
    # any scale (float64 overflows too): still finite, each row a distribution
    huge = sinkhorn_knopp(logits * 1e4, 0.05)
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge.sum(1), torch.ones(24), rtol=1e-5, atol=1e-5)
    # an empty batch (iBOT with nothing masked) gives an empty, not a failing, result
    assert sinkhorn_knopp(logits[:0], 0.05).shape == (0, 40)


def test_centring_teacher_softmax_is_finite_at_any_logit_scale():
    g = gen(15)
    n, d, k = 6, 8, 12
    loss = DINOLoss(k)
    t = torch.randn(n, d, generator=g) * 100  # teacher logits in the thousands: exp would overflow fp32
    w = torch.randn(k, d, generator=g)
    s = torch.randn(n, d, generator=g)
    targets = loss.teacher_targets(t, w, 0.04)
    got = loss.cross_entropy(s, w, targets)
    assert torch.isfinite(got).all()
    logits = t.double() @ w.double().T  # the centre in force was zero
    expect = -(torch.softmax(logits / 0.04, -1) * torch.log_softmax(s.double() @ w.double().T / 0.1, -1)).sum(-1)
    torch.testing.assert_close(got, expect.float(), rtol=1e-4, atol=1e-4)


def test_ibot_loss_weights_and_normalisation():
    g = gen(5)
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)  # 3 crops, one unmasked
    wts = mask_weights(masks)
    assert wts.tolist() == [0.5, 0.5, 1.0]
    k, d, ts, tt = 6, 4, 0.1, 0.04
    emb, w = head_inputs(g, 3, d, k)
    s, t = emb(3), emb(3)
    loss_fn = IBOTPatchLoss(k, student_temp=ts)
    loss = loss_fn(s, loss_fn.teacher_targets(t, w, tt), w, wts.double(), n_images=3)
    p = torch.softmax(t @ w.T / tt, -1)  # the centre starts at zero
    expect = sum(wts[m].item() * ce(p[m].tolist(), (s @ w.T)[m].tolist(), ts) for m in range(3)) / 3
    assert loss.item() == pytest.approx(expect, rel=1e-6)


def test_koleo_nearest_neighbour_distance():
    g = gen(6)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    loss = KoLeoLoss()(x)
    xn = F.normalize(x.detach(), dim=-1)
    total = 0.0
    for i in range(6):
        d = min(float((xn[i] - xn[j]).norm()) for j in range(6) if j != i)
        total += -math.log(d + 1e-8)
    assert loss.item() == pytest.approx(total / 6, rel=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_objective_weights_and_inactive_terms():
    cfg = ObjectiveConfig(perceptual=0.0, clip=0.0)
    obj = Objective(cfg.term_weights())
    assert "rec_lpips" not in obj and "clip" not in obj and "dino" in obj
    assert obj.weights == {"rec_l1": 0.1, "dino": 1.0, "ibot": 1.0, "koleo": 0.1}
    values = {"rec_l1": torch.tensor(2.0, requires_grad=True), "dino": torch.tensor(3.0), "ibot": torch.tensor(1.0),
              "koleo": torch.tensor(-1.0), "clip": torch.tensor(100.0)}
    total, logs = obj(values)
    assert total.item() == pytest.approx(0.2 + 3 + 1 - 0.1)
    assert "clip" not in logs and logs["total"].item() == pytest.approx(total.item())
    assert not logs["rec_l1"].requires_grad
    with pytest.raises(KeyError, match="ibot"):
        obj({"rec_l1": torch.tensor(1.0), "dino": torch.tensor(1.0), "koleo": torch.tensor(1.0)})
    with pytest.raises(ConfigError, match="unknown objective term"):
        Objective({"adversarial": 1.0})
    with pytest.raises(ConfigError, match="objective.clip: weights must be >= 0"):
        ObjectiveConfig(clip=-1).validate()


def test_default_weights_are_the_published_ones():
    w = ObjectiveConfig().term_weights()
    assert (w["rec_l1"], w["clip"], w["dino"], w["ibot"]) == (0.1, 1.0, 1.0, 1.0)


def test_perceptual_without_weights_refuses_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"objective.perceptual > 0 needs LPIPS-VGG weights.*vgg16-397923af.pth.*"
                                          r"objective.perceptual=0"):
        ReconstructionLoss(perceptual=True)
    assert ReconstructionLoss(perceptual=False).lpips is None


def test_mse_term_is_the_pixel_mse_of_the_shuffled_tokens_and_weighted_inside_l_rec():
    from vtp_fast.losses.objective import ObjectiveConfig
    from vtp_fast.ops.pixel_shuffle_l1 import pixel_shuffle_ref

    g = gen(3)
    x = torch.randn(2, 3, 32, 64, generator=g)
    tokens = torch.randn(2, 8, 3 * 16 * 16, generator=g)  # a 2x4 grid of 16x16 patches
    y = pixel_shuffle_ref(tokens, (2, 4), 16)
    out = ReconstructionLoss(perceptual=False, mse=True)(tokens, x, y)
    assert out["rec_mse"].item() == pytest.approx(F.mse_loss(y, x).item())
    with pytest.raises(ValueError, match="need the reconstructed images"):
        ReconstructionLoss(perceptual=False, mse=True)(tokens, x)
    assert "rec_mse" not in ReconstructionLoss(perceptual=False)(tokens, x)
    w = ObjectiveConfig(rec=0.1, mse=2.0).term_weights()
    assert w["rec_mse"] == pytest.approx(0.2) and ObjectiveConfig().term_weights()["rec_mse"] == 0  # published: off


@pytest.fixture
def lpips_files(tmp_path):
    """A VGG16 state dict (random weights, torchvision's layout) and LPIPS heads in the lpips package layout."""
    import torchvision

    torch.manual_seed(0)
    vgg = tmp_path / "vgg16-397923af.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), vgg)
    heads = tmp_path / "heads.pth"
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate([64, 128, 256, 512, 512])},
               heads)
    return vgg, heads


def test_lpips_code_path_with_supplied_weights(lpips_files, monkeypatch):
    from vtp_fast.ops.pixel_shuffle_l1 import pixel_shuffle_ref

    vgg, heads = lpips_files
    monkeypatch.setattr("vtp_fast.losses.reconstruction.find_lpips_heads", lambda: heads)
    rec = ReconstructionLoss(perceptual=True, vgg_path=str(vgg))
    assert isinstance(rec.lpips, LPIPS) and not any(p.requires_grad for p in rec.lpips.parameters())
    g = gen(7)
    x = torch.randn(2, 3, 32, 32, generator=g)
    tokens = torch.randn(2, 4, 3 * 16 * 16, generator=g).requires_grad_()  # a 2x2 grid of 16x16 patches
    y = pixel_shuffle_ref(tokens, (2, 2), 16)
    same = rec.lpips(x.tanh(), x.tanh())
    assert torch.allclose(same, torch.zeros(2), atol=1e-6)
    out = rec(tokens, x, y)
    assert out["rec_lpips"].item() > 0 and out["rec_l1"].item() == pytest.approx((y - x).abs().mean().item())
    out["rec_lpips"].backward()
    assert tokens.grad.abs().sum() > 0
    rec.train()
    assert not rec.lpips.training, "the perceptual network stays in eval mode"

"""LightningDiT-style DiT: adaLN-Zero init, shapes, label dropout, classifier-free guidance, configs, sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vtp_fast.config import ConfigError
from vtp_fast.models.dit import DIT_PRESETS, DiT, DiTConfig, dit_config, patchify, unpatchify
from vtp_fast.nn.mlp import swiglu_hidden
from vtp_fast.train.flow import flow_loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is faster, and avoids OpenMP spin-waiting when other
    processes share the (2-core) machine, which slowed this file 10x in a loaded run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nano(**overrides) -> DiT:
    torch.manual_seed(0)
    return DiT(dit_config("dit-nano", **overrides))


@torch.no_grad()
def randomise(model: nn.Module, std: float = 0.1) -> nn.Module:
    """Perturb every parameter, so that the zero-initialised adaLN paths carry signal."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(b: int = 3, c: int = 4, h: int = 4, w: int = 4, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.rand(b, generator=g), torch.randint(0, classes, (b,),
                                                                                           generator=g)


def test_fresh_dit_outputs_exactly_zero_and_blocks_are_identity():
    model = nano(depth=3).eval()
    x, t, y = inputs(b=5, h=4, w=6)
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append(torch.equal(out, a[0]))) for b in model.blocks]
    out = model(x, t, y)
    for h in hooks:
        h.remove()
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))
    assert seen == [True] * 3  # adaLN-Zero: zero gates make every block the identity at init
    # the rest is not zero: patch, timestep and label embeddings are initialised
    assert model.x_embedder.weight.abs().sum() > 0 and model.y_embedder.weight.abs().sum() > 0
    assert model.t_embedder.mlp[2].weight.abs().sum() > 0


def test_one_optimizer_step_makes_output_nonzero():
    model = nano().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0, _, y = inputs(b=8, seed=5)
    losses = flow_loss(model, x0, y, generator=torch.Generator().manual_seed(0))
    assert losses["mse"] > 0.5 and losses["cos"] == 1.0  # a zero prediction is orthogonal to everything
    losses["total"].backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    opt.step()
    model.eval()
    x, t, y = inputs(b=4, seed=3)
    assert model(x, t, y).abs().max() > 0


@pytest.mark.parametrize("patch,h,w,b", [(1, 4, 4, 3), (1, 4, 6, 1), (2, 4, 8, 2), (2, 6, 2, 1), (1, 1, 3, 1)])
def test_shapes_patch_sizes_non_square_and_batch_of_one(patch, h, w, b):
    model = randomise(nano(patch_size=patch)).eval()
    x, t, y = inputs(b=b, h=h, w=w)
    out = model(x, t, y)
    assert out.shape == (b, 4, h, w) and out.dtype == x.dtype and torch.isfinite(out).all()
    # a scalar t means the same time for every sample
    assert torch.allclose(model(x, t[0], y), model(x, t[0].expand(b), y))


def test_samples_are_independent_of_each_other_in_a_batch():
    model = randomise(nano(patch_size=2)).eval()
    x, t, y = inputs(b=3, h=4, w=6)
    whole = model(x, t, y)
    for i in range(3):
        one = model(x[i:i + 1], t[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(one, whole[i:i + 1], rtol=1e-5, atol=1e-6)  # batched matmul rounding only


def test_output_depends_on_t_y_and_position():
    model = randomise(nano()).eval()
    x, t, y = inputs(b=2)
    out = model(x, t, y)
    assert not torch.allclose(out, model(x, 1 - t, y), atol=1e-4)
    assert not torch.allclose(out, model(x, t, (y + 1) % 10), atol=1e-4)
    # RoPE makes the model position-aware: shuffling the grid does not just shuffle the output (it would without
    # positions: attention over a set is permutation-equivariant)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = model(x.flatten(2)[:, :, perm].view_as(x), t, y)
    assert not torch.allclose(shuffled, out.flatten(2)[:, :, perm].view_as(out), atol=1e-4)


def test_patchify_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    tokens = patchify(x, 2)  # (2, 2 * 3, 2 * 2 * 3)
    assert tokens.shape == (2, 6, 12)
    # token 1 is grid cell (0, 1): pixels rows 0-1, cols 2-3, features ordered (py, px, C)
    expected = x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(tokens[0, 1], expected)
    assert torch.equal(unpatchify(tokens, 2, 2, 3), x)
    assert torch.equal(unpatchify(patchify(x, 1), 1, 4, 6), x)


def test_bad_inputs_raise():
    model = nano(patch_size=2)
    x, t, y = inputs(b=2)
    with pytest.raises(ValueError, match="patch size"):
        model(torch.randn(2, 4, 4, 5), t, y)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 3, 4, 4), t, y)
    with pytest.raises(ValueError, match="y must be"):
        model(x, t, y[:1])
    with pytest.raises(ValueError, match="t must be"):
        model(x, t[:1], y)


def _label_recorder(model: DiT) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.y_embedder.register_forward_hook(lambda m, a, out: seen.append(a[0].clone()))
    return seen


def test_label_dropout_rate_in_training_and_never_in_eval():
    model = nano(class_dropout=0.3)
    seen = _label_recorder(model)
    n = 4000
    x, t, y = inputs(b=n, h=2, w=2)
    torch.manual_seed(0)
    with torch.no_grad():
        model.train()(x, t, y)
        model.eval()(x, t, y)
    train_labels, eval_labels = seen
    dropped = train_labels == 10
    # rate 0.3, n 4000: std 0.0072; 0.03 is > 4 std
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    assert torch.equal(train_labels[~dropped], y[~dropped])  # kept labels untouched
    assert torch.equal(eval_labels, y)
    seen.clear()
    with torch.no_grad():  # no dropout when asked, even in training mode (CFG sampling of a training model)
        model.train()(x[:50], t[:50], y[:50], drop_labels=False)
        model.train().forward_with_cfg(x[:50], t[:50], y[:50], 3.0)
    assert torch.equal(seen[0], y[:50])
    assert torch.equal(seen[1], torch.cat([y[:50], torch.full((50,), 10)]))  # cond half intact, then null class


def test_null_class_row_exists_without_dropout():
    model = nano(class_dropout=0.0)
    assert model.y_embedder.num_embeddings == 11
    x, t, y = inputs(b=2)
    model.train()(x, t, torch.full((2,), 10))  # the null class is valid input


def test_forward_with_cfg():
    model = randomise(nano()).eval()
    x, _, y = inputs(b=4)
    t = torch.tensor([0.1, 0.5, 0.9, 0.3])
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, 10))
        assert torch.equal(model.forward_with_cfg(x, t, y, 1.0), cond)
        assert torch.equal(model.forward_with_cfg(x, t, y, 1.0, interval=(0.2, 0.4)), cond)
        out = model.forward_with_cfg(x, t, y, 4.0, interval=(0.3, 0.7))
        full = model.forward_with_cfg(x, t, y, 4.0)
    assert (cond - uncond).abs().max() > 1e-3  # the label matters, so guidance is visible
    inside = torch.tensor([False, True, False, True])  # t in [0.3, 0.7], endpoints included
    guided = uncond + 4.0 * (cond - uncond)
    # the 2B-batch forward rounds differently from the B-batch one: compare with a float32 tolerance
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out[~inside], cond[~inside], **tol)
    torch.testing.assert_close(out[inside], guided[inside], **tol)
    torch.testing.assert_close(full, guided, **tol)


@pytest.mark.parametrize("field,value", [
    ("heads", 5), ("patch_size", 0), ("input_size", 5), ("class_dropout", 1.0), ("class_dropout", -0.1),
    ("mlp_ratio", 0.0), ("depth", 0), ("num_classes", 0), ("time_scale", 0.0),
    ("freq_dim", 7), ("in_channels", 0),
])
def test_config_errors_name_the_field(field, value):
    overrides = {field: value}
    if field == "input_size":
        overrides["patch_size"] = 2
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        dit_config("dit-nano", **overrides)
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        DiT(DiTConfig(**{**DIT_PRESETS["dit-nano"], **overrides}))


def test_config_unknown_key_and_preset():
    with pytest.raises(ConfigError, match="bogus"):
        dit_config("dit-nano", bogus=1)
    with pytest.raises(ConfigError, match="dit-huge"):
        dit_config("dit-huge")
    with pytest.raises(ConfigError, match="hidden"):
        dit_config("dit-nano", hidden="wide")


def expected_params(c: DiTConfig) -> int:
    """Independent count of the architecture's parameters."""
    d, f = c.hidden, c.patch_size ** 2 * c.in_channels
    h = swiglu_hidden(d, c.mlp_ratio)
    block = (3 * d * d + 3 * d) + (d * d + d) + (2 * (d * h + h) + h * d + d) + 2 * d + (6 * d * d + 6 * d)
    embed = (f * d + d) + (c.freq_dim * d + d + d * d + d) + (c.num_classes + 1) * d
    final = d + (2 * d * d + 2 * d) + (d * f + f)
    return c.depth * block + embed + final


# Nominal sizes: DiT-B ~130M, DiT-XL ~675M (the DiT paper's numbers), LightningDiT-1.0B. Tolerance 3% of the
# nominal (actual: 130.4M, 675.0M, 1029.1M); the exact count is checked against expected_params.
@pytest.mark.parametrize("name,nominal", [("dit-b/1", 130e6), ("dit-xl/1", 675e6), ("dit-1b", 1.0e9),
                                          ("dit-l/1", 458e6), ("dit-b/2", 130e6), ("dit-tiny", None)])
def test_presets_build_on_meta_with_expected_sizes(name, nominal):
    cfg = dit_config(name)
    with torch.device("meta"):
        model = DiT(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert n == expected_params(cfg)
    if nominal is not None:
        assert abs(n - nominal) / nominal < 0.03, n
    if name.startswith("dit-1b"):
        assert cfg.hidden // cfg.heads == 64


def test_every_preset_is_valid_and_builds_its_exact_parameter_count():
    for name in DIT_PRESETS:
        cfg = dit_config(name)
        assert cfg.hidden % (4 * cfg.heads) == 0, name  # 2-D RoPE needs head_dim divisible by 4
        with torch.device("meta"):
            model = DiT(cfg)
        assert sum(t.numel() for t in model.parameters()) == expected_params(cfg), name


def test_nano_dit_learns_the_flow_of_two_latents():
    """150 AdamW steps on two fixed latents (one per class) cut the flow loss several-fold (from ~6 to ~1.5)."""
    torch.manual_seed(0)
    protos = torch.randn(2, 4, 4, 4) * 2
    model = DiT(dit_config("dit-nano", num_classes=2)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    hist = []
    for _ in range(150):
        y = torch.randint(0, 2, (32,), generator=g)
        loss = flow_loss(model, protos[y], y, generator=g)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(loss.item())
    first, last = sum(hist[:5]) / 5, sum(hist[-20:]) / 20
    assert last < 0.4 * first, (first, last)

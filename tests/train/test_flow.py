"""Rectified flow: path algebra, the velocity / cosine loss, logit-normal timesteps, the timestep shift, the
Euler / Heun samplers on ODEs with known solutions, and the EMA update."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vtp_fast.models.dit import DiT, dit_config
from vtp_fast.train.common import ema_update
from vtp_fast.train.flow import (
    flow_loss,
    interpolate,
    sample,
    sample_timesteps,
    shift_timesteps,
    time_grid,
    velocity_target,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is faster, and avoids OpenMP spin-waiting when other
    processes share the (2-core) machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------- path algebra

def test_path_endpoints_midpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 5, generator=g, dtype=F64), torch.randn(3, 2, 4, 5, generator=g, dtype=F64)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)  # t = 0: data
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)  # t = 1: noise
    t = torch.tensor([0.25, 0.5, 0.9], dtype=F64)
    mid = interpolate(x0, noise, t)
    for i in range(3):
        torch.testing.assert_close(mid[i], (1 - t[i]) * x0[i] + t[i] * noise[i])
    # the target is the time derivative of the path (it is linear, so a finite difference is exact)
    h = 1e-3
    fd = (interpolate(x0, noise, t + h) - interpolate(x0, noise, t)) / h
    torch.testing.assert_close(velocity_target(x0, noise), noise - x0)
    torch.testing.assert_close(fd, velocity_target(x0, noise), rtol=1e-9, atol=1e-9)


class ScaledExactVelocity(nn.Module):
    """Knows x0; recovers the true velocity from x_t and t (x_t - x0 = t (noise - x0)) and returns k times it."""

    def __init__(self, x0: torch.Tensor, k: float = 1.0):
        super().__init__()
        self.x0, self.k, self.ts = x0, k, []

    def forward(self, x_t, t, y):
        self.ts.append(t)
        return self.k * (x_t - self.x0) / t.to(x_t.dtype).view(-1, 1, 1, 1)


def batch(b=6, dtype=F64):
    g = torch.Generator().manual_seed(7)
    return torch.randn(b, 3, 4, 4, generator=g, dtype=dtype), torch.randint(0, 10, (b,), generator=g)


def test_exact_velocity_has_zero_loss():
    x0, y = batch()
    out = flow_loss(ScaledExactVelocity(x0), x0, y, generator=torch.Generator().manual_seed(1))
    assert out["mse"] < 1e-20
    assert abs(out["cos"]) < 1e-6  # fp32 cosine
    assert out["total"] < 1e-6


def test_wrong_convention_is_not_optimal():
    """A model trained for the opposite convention (data at t = 1) predicts x0 - noise: cos 2, mse 4 E|v|^2."""
    x0, y = batch()
    model = ScaledExactVelocity(x0, k=-1.0)
    out = flow_loss(model, x0, y, generator=torch.Generator().manual_seed(1))
    assert abs(out["cos"] - 2.0) < 1e-6
    assert out["mse"] > 1.0


@pytest.mark.parametrize("cos_over", ["sample", "position"])
def test_cosine_term_parallel_and_opposite(cos_over):
    x0, y = batch()
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - same noise and t in every call
    exact = flow_loss(ScaledExactVelocity(x0), x0, y, generator=gen())
    par = flow_loss(ScaledExactVelocity(x0, k=3.0), x0, y, cos_over=cos_over, cos_weight=0.5, generator=gen())
    opp = flow_loss(ScaledExactVelocity(x0, k=-2.0), x0, y, cos_over=cos_over, cos_weight=0.5, generator=gen())
    assert abs(par["cos"]) < 1e-6 and abs(opp["cos"] - 2.0) < 1e-6
    # mse of k v against v is (k - 1)^2 E[v^2]; E[v^2] from the k = 2 run: (2 - 1)^2 E[v^2]
    ev2 = flow_loss(ScaledExactVelocity(x0, k=2.0), x0, y, generator=gen())["mse"]
    torch.testing.assert_close(par["mse"], 4.0 * ev2, rtol=1e-5, atol=0)
    torch.testing.assert_close(opp["mse"], 9.0 * ev2, rtol=1e-5, atol=0)
    torch.testing.assert_close(opp["total"], opp["mse"] + 0.5 * opp["cos"])
    assert exact["total"] < 1e-6


def test_cosine_is_per_sample_mean():
    """Half the samples parallel, half opposite: cos = (0 + 2) / 2 = 1."""
    x0, y = batch(b=4)

    class Half(ScaledExactVelocity):
        def forward(self, x_t, t, y):
            v = super().forward(x_t, t, y)
            return v * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=v.dtype).view(-1, 1, 1, 1)

    out = flow_loss(Half(x0), x0, y, generator=torch.Generator().manual_seed(0))
    assert abs(out["cos"] - 1.0) < 1e-6


def test_flow_loss_draws_logit_normal_timesteps_and_is_reproducible():
    x0 = torch.zeros(20000, 1, 1, 1)
    model = ScaledExactVelocity(x0)
    flow_loss(model, x0, torch.zeros(20000, dtype=torch.long), mu=-0.75, sigma=1.0,
              generator=torch.Generator().manual_seed(0))
    t = model.ts[0]
    assert t.shape == (20000,) and abs(t.median().item() - 1 / (1 + math.exp(0.75))) < 0.01
    x0, y = batch()
    a = flow_loss(ScaledExactVelocity(x0, k=0.5), x0, y, generator=torch.Generator().manual_seed(4))
    b = flow_loss(ScaledExactVelocity(x0, k=0.5), x0, y, generator=torch.Generator().manual_seed(4))
    c = flow_loss(ScaledExactVelocity(x0, k=0.5), x0, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["total"], b["total"]) and not torch.equal(a["total"], c["total"])
    with pytest.raises(ValueError, match="cos_over"):
        flow_loss(model, x0, y, cos_over="channel")


# ------------------------------------------------------------------------------------------------ timesteps

@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (-0.75, 1.0), (1.0, 0.5)])
def test_logit_normal_timesteps(mu, sigma):
    t = sample_timesteps(40000, mu, sigma, generator=torch.Generator().manual_seed(0))
    assert t.shape == (40000,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.median().item() - 1 / (1 + math.exp(-mu))) < 0.01
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - mu) < 0.03 and abs(logit.std().item() - sigma) < 0.03
    again = sample_timesteps(40000, mu, sigma, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_timestep_shift():
    t = torch.linspace(0, 1, 101, dtype=F64)
    for shift in (0.5, 1.0, 3.0, 6.0):
        s = shift_timesteps(t, shift)
        assert s[0] == 0 and s[-1] == 1
        assert (s[1:] > s[:-1]).all()  # strictly monotone
    assert torch.equal(shift_timesteps(t, 1.0), t)
    assert shift_timesteps(torch.tensor(0.5), 3.0) == 0.75  # 3 * 0.5 / (1 + 2 * 0.5)
    assert (shift_timesteps(t, 3.0) >= t).all()  # shift > 1 moves the grid towards noise
    grid = time_grid(4, 3.0, dtype=F64)
    torch.testing.assert_close(grid, shift_timesteps(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64), 3.0))
    with pytest.raises(ValueError, match="shift"):
        shift_timesteps(t, 0.0)


# ----------------------------------------------------------------------------------------------- samplers

class Field(nn.Module):
    """v(x, t) = c + a * x, recording every call's t."""

    def __init__(self, c=0.0, a=0.0):
        super().__init__()
        self.c, self.a, self.ts = c, a, []

    def forward(self, x, t, y):
        self.ts.append(t[0].item())
        assert t.shape == (x.shape[0],)
        return self.c + self.a * x


def noise(shape=(2, 3, 4, 5)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=F64)


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 3, 7])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_constant_field_is_integrated_exactly(solver, steps, shift):
    x1 = noise()
    c = torch.randn(1, 3, 1, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    field = Field(c=c)
    x0 = sample(field, x1.shape, torch.zeros(2, dtype=torch.long), steps=steps, solver=solver, shift=shift,
                noise=x1)
    torch.testing.assert_close(x0, x1 - c, rtol=0, atol=1e-12)
    assert len(field.ts) == steps * (2 if solver == "heun" else 1)
    assert field.ts[0] == 1.0  # starts at noise
    assert (field.ts[-1] == 0.0) == (solver == "heun")  # Heun's last corrector evaluates at t = 0


@pytest.mark.parametrize("a", [1.5, -1.0])
def test_linear_field_converges_heun_far_better(a):
    x1 = noise()
    y = torch.zeros(2, dtype=torch.long)
    exact = x1 * math.exp(-a)  # dx/dt = a x from t = 1 back to t = 0
    err = {}
    for solver in ("euler", "heun"):
        for steps in (5, 10, 20, 40):
            out = sample(Field(a=a), x1.shape, y, steps=steps, solver=solver, noise=x1)
            err[solver, steps] = ((out - exact).abs().max() / exact.abs().max()).item()  # relative
    # closed forms of one step of size h = 1 / N backwards: Euler (1 - a h), Heun (1 - a h + (a h)^2 / 2)
    for steps in (5, 40):
        h = 1 / steps
        euler = sample(Field(a=a), x1.shape, y, steps=steps, noise=x1)
        heun = sample(Field(a=a), x1.shape, y, steps=steps, solver="heun", noise=x1)
        torch.testing.assert_close(euler, x1 * (1 - a * h) ** steps, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(heun, x1 * (1 - a * h + (a * h) ** 2 / 2) ** steps, rtol=1e-12, atol=1e-12)
    for steps in (5, 10, 20, 40):  # the gap widens with the step count: about 9x-15x at 5 steps, 80x-120x at 40
        assert err["heun", steps] < err["euler", steps] / (steps * 1.2)
    for steps in (5, 10, 20):  # first order: halving h halves the error; second order: quarters it
        assert 1.7 < err["euler", steps] / err["euler", 2 * steps] < 2.3
        assert 3.4 < err["heun", steps] / err["heun", 2 * steps] < 4.6
    assert err["heun", 40] < 1e-3
    # a shifted grid converges too
    shifted = sample(Field(a=a), x1.shape, y, steps=40, solver="heun", shift=3.0, noise=x1)
    torch.testing.assert_close(shifted, exact, rtol=1e-3, atol=1e-3)


def test_shift_moves_steps_towards_noise():
    field = Field()
    sample(field, (1, 1, 1, 1), torch.zeros(1, dtype=torch.long), steps=4, shift=3.0, noise=torch.zeros(1, 1, 1, 1))
    assert field.ts == pytest.approx([1.0, 0.9, 0.75, 0.5])  # shift(0.75) = 2.25 / 2.5


class GuidedField(Field):
    def __init__(self):
        super().__init__(c=1.0)
        self.cfg_calls = []

    def forward_with_cfg(self, x, t, y, scale, interval):
        self.cfg_calls.append((t[0].item(), scale, interval))
        return torch.full_like(x, 1.0 * scale)


def test_sampler_uses_guidance_only_inside_the_interval():
    field = GuidedField()
    x1 = torch.zeros(2, 1, 2, 2, dtype=F64)
    out = sample(field, x1.shape, torch.zeros(2, dtype=torch.long), steps=4, cfg_scale=2.0,
                 cfg_interval=(0.0, 0.5), noise=x1)
    assert field.ts == [1.0, 0.75]
    assert field.cfg_calls == [(0.5, 2.0, (0.0, 0.5)), (0.25, 2.0, (0.0, 0.5))]
    torch.testing.assert_close(out, torch.full_like(x1, -(0.5 * 1.0 + 0.5 * 2.0)))
    plain = GuidedField()
    sample(plain, x1.shape, torch.zeros(2, dtype=torch.long), steps=4, noise=x1)
    assert plain.cfg_calls == []


def test_sampler_argument_errors():
    y = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="solver"):
        sample(Field(), (1, 1, 1, 1), y, solver="rk4")
    with pytest.raises(ValueError, match="steps"):
        sample(Field(), (1, 1, 1, 1), y, steps=0)
    with pytest.raises(ValueError, match="noise"):
        sample(Field(), (1, 1, 1, 1), y, noise=torch.zeros(2, 1, 1, 1))


def test_sampling_a_dit_end_to_end():
    torch.manual_seed(0)
    model = DiT(dit_config("dit-nano")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    y = torch.tensor([1, 2])
    kwargs = dict(steps=3, solver="heun", shift=2.0, cfg_scale=3.0, cfg_interval=(0.1, 1.0))
    a = sample(model, (2, 4, 4, 6), y, generator=torch.Generator().manual_seed(0), **kwargs)
    b = sample(model, (2, 4, 4, 6), y, generator=torch.Generator().manual_seed(0), progress=True, **kwargs)
    assert a.shape == (2, 4, 4, 6) and torch.isfinite(a).all() and not a.requires_grad
    assert torch.equal(a, b)
    # a model left in training mode samples as in eval mode (no label dropout) and stays in training mode
    model.class_dropout = 0.99
    plain = dict(steps=3, generator=torch.Generator().manual_seed(0))
    ref = sample(model, (2, 4, 4, 6), y, **plain)
    model.train()
    plain["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(sample(model, (2, 4, 4, 6), y, **plain), ref) and model.training
    x1 = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, x1)  # the model's velocity moved the noise


# ----------------------------------------------------------------------------------------------------- EMA

def test_ema_update_formula():
    ema = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    params = [nn.Parameter(torch.tensor([5.0, -2.0])), nn.Parameter(torch.tensor([[7.0]]))]
    ema_update(ema, params, 0.9)
    torch.testing.assert_close(ema[0], torch.tensor([0.9 * 1 + 0.1 * 5, 0.9 * 2 + 0.1 * -2]))
    torch.testing.assert_close(ema[1], torch.tensor([[0.9 * 3 + 0.1 * 7]]))
    ema_update(ema, params, 1.0)  # decay 1: frozen
    torch.testing.assert_close(ema[1], torch.tensor([[3.4]]))
    ema_update(ema, params, 0.0)  # decay 0: a copy
    assert torch.equal(ema[0], params[0].detach()) and torch.equal(ema[1], params[1].detach())
    with pytest.raises(ValueError, match="EMA"):
        ema_update(ema[:1], params, 0.5)


def test_ema_of_a_module():
    torch.manual_seed(0)
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema.parameters(), model.parameters(), 0.99)
    for e, b, p in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.99 * b + 0.01 * p)
        assert e.grad is None

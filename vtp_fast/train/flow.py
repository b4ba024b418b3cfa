"""Rectified flow on tokenizer latents: the training loss, logit-normal timesteps, ODE samplers and EMA.

Convention (used everywhere in vtp_fast, including vtp_fast.models.dit):

    t in [0, 1];  t = 0 is data, t = 1 is pure noise (SD3 / "noise at t = 1");
    x_t = (1 - t) * x0 + t * noise                     (linear path)
    v   = dx_t / dt = noise - x0                       (the velocity the model predicts)

Sampling integrates dx/dt = v(x, t) backwards from x(1) = noise to x(0) = data on a grid 1 = t_0 > ... > t_S = 0,
optionally warped by the SD3 / LightningDiT timestep shift t' = shift * t / (1 + (shift - 1) * t), which for
shift > 1 spends more steps near the noise end. A model is anything called as model(x_t, t, y) -> v with
x_t (B, C, H, W), t (B,) and y (B,); classifier-free guidance needs `forward_with_cfg` (see DiT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) matching x's rank, in x's dtype."""
    return t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t noise: x0, noise (B, ...), t (B,) -> (B, ...)."""
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + tb * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """v = d x_t / dt = noise - x0, (B, ...)."""
    return noise - x0


def sample_timesteps(n: int, mu: float = 0.0, sigma: float = 1.0, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """Logit-normal timesteps: sigmoid(mu + sigma * N(0, 1)), (n,) float32 in (0, 1); median sigmoid(mu).

    Drawn on the generator's device (so a seeded CPU generator gives the same draws everywhere), then moved to
    `device`.
    """
    src = generator.device if generator is not None else device
    z = torch.randn(n, generator=generator, device=src, dtype=torch.float32)
    return torch.sigmoid(mu + sigma * z).to(device if device is not None else z.device)


def flow_loss(model: nn.Module, x0: Tensor, y: Tensor, *, mu: float = 0.0, sigma: float = 1.0,
              cos_weight: float = 1.0, cos_over: str = "sample", generator: torch.Generator | None = None) -> dict:
    """Rectified-flow velocity loss on a batch of clean latents x0 (B, C, H, W) with labels y (B,).

    Draws noise ~ N(0, I) and logit-normal t (B,), predicts v = model(x_t, t, y) and returns scalars
      mse   mean over all elements of (v - (noise - x0))^2
      cos   mean of 1 - cos(v, noise - x0): per sample over the flattened latent (cos_over="sample"), or per
            latent position over channels as in LightningDiT (cos_over="position")
      total mse + cos_weight * cos
    computed in fp32. Noise and t come from `generator` (on its own device) when given.

    Note: the cosine term's gradient scales as 1 / |v|; at adaLN-Zero init (v exactly 0) it is about
    |target| / 1e-8 (cosine_similarity's eps). AdamW normalises it per parameter, as in LightningDiT; with
    global-norm gradient clipping the first steps follow the cosine direction almost alone.
    """
    if cos_over not in ("sample", "position"):
        raise ValueError(f"cos_over must be 'sample' or 'position', got {cos_over!r}")
    b = x0.shape[0]
    src = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=src, dtype=torch.float32).to(x0.device, x0.dtype)
    t = sample_timesteps(b, mu, sigma, generator, device=x0.device)  # (B,)
    x_t = interpolate(x0, noise, t)  # (B, C, H, W)
    pred = model(x_t, t, y).float()
    target = velocity_target(x0, noise).float()
    mse = (pred - target).pow(2).mean()
    if cos_over == "sample":
        cos_sim = F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1, eps=1e-8)  # (B,)
    else:
        cos_sim = F.cosine_similarity(pred, target, dim=1, eps=1e-8)  # (B, H, W)
    cos = (1 - cos_sim).mean()
    return {"mse": mse, "cos": cos, "total": mse + cos_weight * cos}


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """SD3 / LightningDiT timestep shift t' = shift t / (1 + (shift - 1) t): fixes 0 and 1, monotone in t,
    t' >= t for shift >= 1 (more of the grid near the noise end, t = 1). Any shape."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """(steps + 1,) integration times from 1 (noise) down to 0 (data), uniform then shifted."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    grid = shift_timesteps(grid, shift)
    grid[0], grid[-1] = 1.0, 0.0  # exact endpoints whatever the rounding of the shift
    return grid.to(device=device, dtype=dtype)


@torch.no_grad()
def sample(model: nn.Module, shape: tuple[int, ...], y: Tensor, *, steps: int = 50, solver: str = "euler",
           shift: float = 1.0, cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
           generator: torch.Generator | None = None, progress: bool = False, noise: Tensor | None = None,
           dtype: torch.dtype = torch.float32) -> Tensor:
    """Integrate dx/dt = v(x, t, y) from noise at t = 1 to data at t = 0: returns x0 (B, C, H, W).

    shape: (B, C, H, W); y (B,) labels (its device is the sampling device); noise: the starting x(1) (B, C, H, W)
    (default: N(0, I) from `generator`, drawn on the generator's device). solver "euler" (steps model calls)
    or "heun" (2nd order, 2 * steps calls: Euler predictor, trapezoidal corrector). With cfg_scale != 1 the
    velocity is model.forward_with_cfg(x, t, y, cfg_scale, cfg_interval), used only while t is inside the
    interval (elsewhere the plain conditional velocity, at half the cost). The model runs in eval mode (its
    training flag is restored afterwards).
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown solver {solver!r} (choices: euler, heun)")
    device = y.device
    if noise is None:
        src = generator.device if generator is not None else device
        noise = torch.randn(shape, generator=generator, device=src, dtype=dtype).to(device)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
    x = noise
    b = x.shape[0]
    grid = time_grid(steps, shift, dtype=torch.float64).tolist()  # python floats: no device syncs per step

    def velocity(x: Tensor, t: float) -> Tensor:
        tt = torch.full((b,), t, device=x.device, dtype=x.dtype)
        if cfg_scale != 1.0 and cfg_interval[0] <= t <= cfg_interval[1]:
            return model.forward_with_cfg(x, tt, y, cfg_scale, cfg_interval)
        return model(x, tt, y)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"sample ({solver})", unit="step", dynamic_ncols=True)
    was_training = model.training
    model.eval()  # sampling is inference: no label dropout, whatever mode the model was left in
    try:
        for i in range(steps):
            t_cur, t_next = grid[i], grid[i + 1]
            dt = t_next - t_cur  # negative: integrating towards data
            d_cur = velocity(x, t_cur)
            x_next = x + dt * d_cur
            if solver == "heun":
                d_next = velocity(x_next, t_next)
                x_next = x + dt * 0.5 * (d_cur + d_next)
            x = x_next
            if bar is not None:
                bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return x

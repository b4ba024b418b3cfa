"""LightningDiT-style diffusion transformer on tokenizer latents (the downstream judge of a tokenizer).

Architecture (LightningDiT: RMSNorm, 2-D RoPE, SwiGLU, adaLN-Zero, velocity prediction):

    x (B, C, H, W) --patchify--> (B, N, p*p*C) --Linear--> tokens (B, N, D), N = (H/p) * (W/p)
    c = TimestepEmbedder(t) + LabelEmbedder(y)                            (B, D)
    depth x DiTBlock:  x += gate1 * attn(modulate(rms(x), shift1, scale1), rope)
                       x += gate2 * swiglu(modulate(rms(x), shift2, scale2))
                       (shift, scale, gate) = Linear(silu(c)), one Linear per block, zero-initialised
    FinalLayer:        Linear(modulate(rms(x), shift, scale)) -> (B, N, p*p*C) --unpatchify--> (B, C, H, W)

Positions come only from 2-D RoPE (fp32, `vtp_fast.nn.rope.Rope2D`) over the (H/p, W/p) latent grid, with no CLS
and no absolute position table, so any H, W divisible by the patch size work. (LightningDiT adds a fixed sin-cos
table on top of RoPE; we leave it out so that the grid size is free.)

Timesteps follow `vtp_fast.train.flow`: t in [0, 1], t = 0 is data and t = 1 is pure noise; the model predicts
the velocity v = noise - x0. The sinusoidal embedding reads `time_scale * t` (1000 t by default, the DiT range of
integer timesteps) so that its 256 frequencies resolve [0, 1].

Classifier-free guidance: labels are dropped to the null class `num_classes` (the embedding table has
num_classes + 1 rows) with probability `class_dropout` in training mode; `forward_with_cfg` runs the conditional
and unconditional halves in one batch.

adaLN-Zero init: every modulation Linear and the final projection start at zero, so a fresh DiT outputs exactly
zero and every block starts as the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtp_fast.config import ConfigError, from_dict
from vtp_fast.nn.attention import Rope, SelfAttention
from vtp_fast.nn.mlp import SwiGLU, swiglu_hidden
from vtp_fast.nn.norms import RMSNorm
from vtp_fast.nn.rope import Rope2D


@dataclass
class DiTConfig:
    in_channels: int = 64  # latent channels (VTP f16d64)
    patch_size: int = 1  # 1 (LightningDiT on f16 latents) or 2
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0  # SwiGLU hidden = swiglu_hidden(hidden, mlp_ratio)
    num_classes: int = 1000
    class_dropout: float = 0.1  # label dropout for classifier-free guidance; null class = num_classes
    input_size: int = 16  # latent grid side the model is trained on (it runs on any multiple of patch_size)
    rope_base: float = 100.0  # Rope2D period base (coordinates normalised to [-1, 1])
    time_scale: float = 1000.0  # the sinusoidal timestep embedding reads time_scale * t
    freq_dim: int = 256  # sinusoidal timestep embedding width

    def validate(self) -> None:
        checks = [
            ("in_channels", self.in_channels >= 1, "must be >= 1"),
            ("patch_size", self.patch_size >= 1, "must be >= 1"),
            ("hidden", self.hidden >= 1, "must be >= 1"),
            ("depth", self.depth >= 1, "must be >= 1"),
            ("heads", self.heads >= 1 and self.hidden % (4 * self.heads) == 0,
             f"hidden ({self.hidden}) must be divisible by 4 * heads ({self.heads}) for 2-D RoPE"),
            ("mlp_ratio", self.mlp_ratio > 0, "must be > 0"),
            ("num_classes", self.num_classes >= 1, "must be >= 1"),
            ("class_dropout", 0.0 <= self.class_dropout < 1.0, "must be in [0, 1)"),
            ("input_size", self.input_size >= 1 and self.input_size % max(self.patch_size, 1) == 0,
             f"must be a positive multiple of patch_size ({self.patch_size})"),
            ("rope_base", self.rope_base > 0, "must be > 0"),
            ("time_scale", self.time_scale > 0, "must be > 0"),
            ("freq_dim", self.freq_dim >= 2 and self.freq_dim % 2 == 0, "must be an even number >= 2"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key}: {why} (got {getattr(self, key)!r})")


# Parameter counts (in_channels 64, 1000 classes; from tests/models/test_dit.py):
#   dit-b/1 130.4M, dit-l/1 458.4M, dit-xl/1 675.0M, dit-1b 1029.1M (LightningDiT-1.0B: depth 24, width 1536,
#   24 heads), dit-tiny 1.42M, dit-nano 51k.
DIT_PRESETS: dict[str, dict] = {
    "dit-b/1": {"hidden": 768, "depth": 12, "heads": 12},
    "dit-b/2": {"hidden": 768, "depth": 12, "heads": 12, "patch_size": 2},
    "dit-l/1": {"hidden": 1024, "depth": 24, "heads": 16},
    "dit-xl/1": {"hidden": 1152, "depth": 28, "heads": 16},
    "dit-xl/2": {"hidden": 1152, "depth": 28, "heads": 16, "patch_size": 2},
    "dit-1b": {"hidden": 1536, "depth": 24, "heads": 24},
    # CPU sizes: tiny trains in minutes on 4x4 / 8x8 latents; nano is for unit tests.
    "dit-tiny": {"hidden": 128, "depth": 4, "heads": 2, "input_size": 8},
    "dit-nano": {"hidden": 32, "depth": 2, "heads": 2, "in_channels": 4, "input_size": 4, "num_classes": 10},
}


def dit_config(name: str, **overrides) -> DiTConfig:
    """The DiTConfig of a named preset with field overrides; unknown names and fields raise ConfigError."""
    if name not in DIT_PRESETS:
        raise ConfigError(f"unknown DiT preset {name!r} (choices: {', '.join(DIT_PRESETS)})")
    return from_dict(DiTConfig, {**DIT_PRESETS[name], **overrides})


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p) * (W/p), p * p * C), tokens in row-major grid order, features (py, px, C)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // p, p, w // p, p)  # (B, C, h, py, w, px)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, py, px, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, p: int, h: int, w: int) -> Tensor:
    """(B, h * w, p * p * C) on an (h, w) token grid -> (B, C, h * p, w * p); the inverse of `patchify`."""
    b, n, f = x.shape
    c = f // (p * p)
    x = x.view(b, h, w, p, p, c)  # (B, h, w, py, px, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, py, w, px)
    return x.reshape(b, c, h * p, w * p)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, N, D) * (1 + scale (B, D)) + shift (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] -> sinusoidal features of time_scale * t (B, freq_dim) -> MLP -> (B, D)."""

    def __init__(self, dim: int, freq_dim: int = 256, time_scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.time_scale, self.max_period = freq_dim, time_scale, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t: Tensor) -> Tensor:
        """(B,) -> (B, freq_dim) = [cos(s t f_i), sin(s t f_i)], f_i = max_period ** (-i / half), in fp32."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t.float() * self.time_scale)[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block. x (B, N, D), silu(c) (B, D), rope (sin, cos) each (N, hd) -> (B, N, D)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        # RMSNorm keeps its (redundant under modulation) weight, as LightningDiT does.
        self.norm1 = RMSNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.modulation = nn.Linear(dim, 6 * dim)  # on silu(c): shift/scale/gate for attention, then for the MLP

    def forward(self, x: Tensor, c_act: Tensor, rope: Rope) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c_act).chunk(6, dim=-1)  # each (B, D)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """(B, N, D), silu(c) (B, D) -> (B, N, p * p * C): adaLN (shift, scale) then a zero-initialised Linear."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm = RMSNorm(dim, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        shift, scale = self.modulation(c_act).chunk(2, dim=-1)  # each (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional velocity model on latents. See the module docstring for the layout.

    forward(x (B, C, H, W), t (B,) or () in [0, 1], y (B,) int64 in [0, num_classes]) -> velocity (B, C, H, W).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.num_classes, self.class_dropout, self.patch_size = c.num_classes, c.class_dropout, c.patch_size
        token_features = c.patch_size * c.patch_size * c.in_channels
        self.x_embedder = nn.Linear(token_features, c.hidden)
        self.t_embedder = TimestepEmbedder(c.hidden, c.freq_dim, c.time_scale)
        self.y_embedder = nn.Embedding(c.num_classes + 1, c.hidden)  # last row: the null class (CFG)
        self.rope = Rope2D(c.hidden // c.heads, base=c.rope_base, dtype="fp32")
        hidden = swiglu_hidden(c.hidden, c.mlp_ratio)
        self.blocks = nn.ModuleList(DiTBlock(c.hidden, c.heads, hidden) for _ in range(c.depth))
        self.final_layer = FinalLayer(c.hidden, token_features)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT / LightningDiT init: xavier-uniform Linears with zero bias, N(0, 0.02) label table and timestep
        MLP, then adaLN-Zero: every modulation Linear and the final projection all zeros."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in [b.modulation for b in self.blocks] + [self.final_layer.modulation, self.final_layer.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def transformer_blocks(self) -> list[nn.Module]:
        """The DiT blocks: the units that compile, activation checkpointing and FSDP act on."""
        return list(self.blocks)

    def _check(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        c, p = self.config.in_channels, self.patch_size
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"DiT: x must be (B, {c}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"DiT: latent size {tuple(x.shape[2:])} is not divisible by the patch size {p}")
        b = x.shape[0]
        if y.shape != (b,) or y.is_floating_point():
            raise ValueError(f"DiT: y must be ({b},) integer labels, got {tuple(y.shape)} {y.dtype}")
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"DiT: t must be ({b},) or a scalar, got {tuple(t.shape)}")
        return t

    def drop_labels(self, y: Tensor) -> Tensor:
        """(B,) labels -> (B,) with each replaced by the null class num_classes with probability class_dropout."""
        drop = torch.rand(y.shape, device=y.device) < self.class_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, drop_labels: bool | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) or () in [0, 1], y (B,) int64 -> velocity (B, C, H, W).

        drop_labels: label dropout for CFG training; None means "in training mode" (self.training).
        """
        t = self._check(x, t, y)
        if drop_labels is None:
            drop_labels = self.training
        if drop_labels and self.class_dropout > 0:
            y = self.drop_labels(y)
        p = self.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        tokens = self.x_embedder(patchify(x, p))  # (B, h*w, D)
        c_act = F.silu(self.t_embedder(t) + self.y_embedder(y))  # (B, D); every modulation reads silu(c)
        rope = self.rope(h, w)  # (sin, cos), each (h*w, hd) fp32
        for block in self.blocks:
            tokens = block(tokens, c_act, rope)
        out = self.final_layer(tokens, c_act)  # (B, h*w, p*p*C)
        return unpatchify(out, p, h, w)  # (B, C, H, W)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, scale: float,
                         interval: tuple[float, float] = (0.0, 1.0)) -> Tensor:
        """Classifier-free guided velocity: x (B, C, H, W), t (B,) or (), y (B,) -> (B, C, H, W).

        cond + (scale - 1) * (cond - uncond) (= uncond + scale * (cond - uncond)) for the samples whose t lies in
        [interval[0], interval[1]] (t = 1 is noise, t = 0 data, as in vtp_fast.train.flow); the plain conditional
        velocity elsewhere. Conditional and unconditional halves run in one batch of 2B; no label dropout.
        With scale == 1 only the conditional half is computed.
        """
        t = self._check(x, t, y)
        if scale == 1.0:
            return self.forward(x, t, y, drop_labels=False)
        null = torch.full_like(y, self.num_classes)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), drop_labels=False)
        cond, uncond = out.chunk(2)  # each (B, C, H, W)
        guided = cond + (scale - 1.0) * (cond - uncond)
        active = (t >= interval[0]) & (t <= interval[1])  # (B,)
        return torch.where(active.view(-1, 1, 1, 1), guided, cond)

"""The VTP tokenizer: ViT trunk + 64-d bottleneck, pixel decoder, CLIP text tower, as published.

The module's state dict *is* the published checkpoint layout (`trunk.*`, `pixel_decoder.*`, `visual_proj`,
`text_transformer.*`, `token_embedding`, `positional_embedding`, `ln_final`, `text_projection`,
`logit_scale`), so loading and saving need no key mapping. Training-only parts (DINO/iBOT head, teacher,
discriminator) live outside this module. Images everywhere are ImageNet-normalised RGB, (B, 3, H, W) with H
and W multiples of the patch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtp_fast.config import ConfigError
from vtp_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from vtp_fast.models.decoder import PixelDecoder
from vtp_fast.models.vit import TrunkOutput, VisionTrunk
from vtp_fast.nn.block import TextBlock
from vtp_fast.nn.norms import LayerNorm
from vtp_fast.text import tokenize


@dataclass
class VTPConfig:
    """The published `config.json` (model_type "vtp"); field names are the published ones."""

    image_size: int = 256
    train_clip: bool = True
    train_reconstruction: bool = True
    vision_patch_size: int = 16
    vision_embed_dim: int = 768
    vision_depth: int = 12
    vision_num_heads: int = 12
    vision_mlp_ratio: float = 4.0
    vision_ffn_layer: Literal["swiglu"] = "swiglu"
    vision_norm_layer: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    vision_init_values: None = None
    vision_use_qk_norm: Literal[False] = False
    vision_feature_bottleneck: int = 64
    vision_bottleneck_ae_only: bool = True
    vision_clip_feat: Literal["cls", "pooled"] = "cls"
    text_context_length: int = 77
    text_vocab_size: int = 49408
    text_embed_dim: int = 768
    text_num_heads: int = 12
    text_depth: int = 12
    text_mlp_ratio: float = 4.0
    text_ls_init_value: None = None
    text_embed_cls: Literal[False] = False
    text_pad_id: int = 0
    text_no_causal_mask: bool = False
    text_pool_type: Literal["argmax", "first", "last"] = "argmax"
    text_proj_type: Literal["linear"] = "linear"
    text_proj_bias: Literal[False] = False
    text_output_tokens: bool = False
    text_quick_gelu: bool = False
    decoder_embed_dim: int = 768
    decoder_num_heads: int = 12
    decoder_depth: int = 12
    decoder_ffn_layer: Literal["swiglu"] = "swiglu"
    decoder_norm_layer: Literal["layernorm", "rmsnorm"] = "layernorm"
    decoder_init_values: None = None
    decoder_use_qk_norm: Literal[False] = False
    init_logit_scale: float | None = None
    init_logit_bias: None = None
    nonscalar_logit_scale: Literal[False] = False

    def validate(self) -> None:
        p = self.vision_patch_size
        checks = [
            ("vision_num_heads", self.vision_embed_dim % (4 * self.vision_num_heads) == 0,
             "vision_embed_dim must be divisible by 4 * vision_num_heads (2-D RoPE)"),
            ("decoder_num_heads", self.decoder_embed_dim % (4 * self.decoder_num_heads) == 0,
             "decoder_embed_dim must be divisible by 4 * decoder_num_heads (2-D RoPE)"),
            ("text_num_heads", self.text_embed_dim % self.text_num_heads == 0,
             "text_embed_dim must be divisible by text_num_heads"),
            ("image_size", self.image_size % p == 0, f"image_size must be a multiple of the patch size {p}"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key}: {why}")


class VTP(nn.Module):
    """VTP tokenizer. See the module docstring for the layout; `rope_dtype='fp32'` trades bit-compatibility
    with the published numerics for accuracy (see vtp_fast.nn.rope)."""

    def __init__(self, config: VTPConfig, rope_dtype: str = "bf16"):
        super().__init__()
        config.validate()
        self.config = c = config
        self.rope_dtype = rope_dtype
        self.trunk = VisionTrunk(
            patch_size=c.vision_patch_size, dim=c.vision_embed_dim, depth=c.vision_depth,
            num_heads=c.vision_num_heads, mlp_ratio=c.vision_mlp_ratio, norm=c.vision_norm_layer,
            bottleneck=c.vision_feature_bottleneck, rope_dtype=rope_dtype)
        self.pixel_decoder = PixelDecoder(
            in_dim=c.vision_feature_bottleneck, dim=c.decoder_embed_dim, depth=c.decoder_depth,
            num_heads=c.decoder_num_heads, mlp_ratio=4.0, norm=c.decoder_norm_layer,  # published: fixed 4
            patch_size=c.vision_patch_size, rope_dtype=rope_dtype) if c.train_reconstruction else None
        if c.train_clip:
            clip_in = c.vision_embed_dim if c.vision_bottleneck_ae_only else c.vision_feature_bottleneck
            width = c.text_embed_dim
            self.visual_proj = nn.Linear(clip_in, width, bias=False)
            self.token_embedding = nn.Embedding(c.text_vocab_size, width)
            self.positional_embedding = nn.Parameter(torch.empty(c.text_context_length, width))
            self.text_transformer = TextTransformer(width, c.text_depth, c.text_num_heads, c.text_mlp_ratio,
                                                    causal=not c.text_no_causal_mask, quick_gelu=c.text_quick_gelu)
            self.ln_final = LayerNorm(width)
            self.text_projection = nn.Parameter(torch.empty(width, width))
            self.logit_scale = nn.Parameter(torch.tensor(c.init_logit_scale or math.log(1 / 0.07)))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.init_weights()

    # ---------------------------------------------------------------- init
    def init_weights(self) -> None:
        """The published initialisation: truncated-normal linears, OpenCLIP text init."""
        self.trunk.init_weights()
        if self.pixel_decoder is not None:
            self.pixel_decoder.init_weights()
        if self.config.train_clip:
            width, depth = self.config.text_embed_dim, self.config.text_depth
            nn.init.trunc_normal_(self.visual_proj.weight, std=0.02)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
            proj_std, attn_std, fc_std = width ** -0.5 * (2 * depth) ** -0.5, width ** -0.5, (2 * width) ** -0.5
            for block in self.text_transformer.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.zeros_(block.attn.in_proj_bias)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.normal_(self.text_projection, std=width ** -0.5)

    # ---------------------------------------------------------------- checks
    def check_images(self, images: Tensor) -> None:
        p = self.config.vision_patch_size
        if images.dim() != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 (RGB) channels, got {images.shape[1]}")
        if images.shape[2] % p or images.shape[3] % p:
            raise ValueError(f"image size {images.shape[2]}x{images.shape[3]} is not a multiple of the patch "
                             f"size {p}")

    # ---------------------------------------------------------------- vision
    def normalize(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the model's input space (ImageNet mean/std)."""
        return (pixels - self.pixel_mean) / self.pixel_std

    def denormalize(self, images: Tensor) -> Tensor:
        """Inverse of `normalize` (not clamped)."""
        return images * self.pixel_std + self.pixel_mean

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Normed CLS (B, D) and patch tokens (B, h * w, D) before the bottleneck."""
        self.check_images(images)
        out = self.trunk(images)
        return out.cls, out.patch

    def block_features(self, images: Tensor, n: int) -> list[TrunkOutput]:
        """Normed CLS (B, D) and patch tokens (B, h * w, D) of each of the last n trunk blocks, the deepest last
        (the last one is `features`): the DINO-style linear probe's inputs."""
        self.check_images(images)
        return self.trunk.last_blocks(images, n)

    def encode_views(self, views: list[Tensor], masks: list[Tensor | None]) -> list[TrunkOutput]:
        """Training: several batches of views (multi-crop, different sizes) through the trunk in one pass, each with
        an optional (B, h * w) iBOT mask -> each view's normed tokens before the bottleneck."""
        for v in views:
            self.check_images(v)
        return self.trunk(views, masks)

    def latents_from_patch(self, patch: Tensor, grid: tuple[int, int]) -> Tensor:
        """Normed patch tokens (B, h * w, D) -> latents (B, C, h, w) through the linear bottleneck."""
        z = self.trunk.feature_bottleneck(patch)  # (B, hw, C)
        return z.transpose(1, 2).reshape(z.shape[0], z.shape[2], *grid)

    def decoder_tokens(self, patch: Tensor, grid: tuple[int, int]) -> Tensor:
        """Normed patch tokens (B, h * w, D) -> the pixel decoder's output before its pixel shuffle
        (B, h * w, 3 * p * p): what the fused pixel-shuffle + L1 loss reads (training)."""
        return self.pixel_decoder.forward_tokens(self.latents_from_patch(patch, grid))

    def tokens_to_images(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """The decoder's last step on `decoder_tokens`' output -> images (B, 3, h * p, w * p), normalised space."""
        return self.pixel_decoder.tokens_to_images(tokens, grid)

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> latents (B, 64, H / 16, W / 16)."""
        self.check_images(images)
        out = self.trunk(images)
        return self.latents_from_patch(out.patch, out.grid)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, 64, h, w) -> images (B, 3, 16 h, 16 w) in the normalised input space."""
        if self.pixel_decoder is None:
            raise RuntimeError("this model has no pixel decoder (train_reconstruction is false)")
        c = self.config.vision_feature_bottleneck
        if latents.dim() != 4 or latents.shape[1] != c:
            raise ValueError(f"latents must be (B, {c}, h, w), got {tuple(latents.shape)}")
        return self.pixel_decoder(latents)

    def clip_image_features(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) -> CLIP image embedding (B, E), L2-normalised by default."""
        self._require_clip()
        cls, patch = self.features(images)
        return self.clip_image_features_from_tokens(cls, patch, normalize)

    def clip_image_features_from_tokens(self, cls: Tensor, patch: Tensor, normalize: bool = True) -> Tensor:
        """Normed trunk tokens (cls (B, D), patch (B, N, D)) -> CLIP image embedding (B, E)."""
        c = self.config
        feat = cls if c.vision_clip_feat == "cls" else patch.mean(1)
        if not c.vision_bottleneck_ae_only:
            feat = self.trunk.feature_bottleneck(feat)
        feat = self.visual_proj(feat)
        return F.normalize(feat, dim=-1) if normalize else feat

    # ---------------------------------------------------------------- text
    def tokenize(self, texts: list[str] | str) -> Tensor:
        """Captions -> CLIP BPE token ids (B, context_length), end-of-text kept when truncating."""
        return tokenize(texts, self.config.text_context_length)

    def clip_text_features(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        """Token ids (B, L <= context_length) -> CLIP text embedding (B, E), L2-normalised by default."""
        self._require_clip()
        if tokens.dim() != 2 or tokens.shape[1] > self.config.text_context_length:
            raise ValueError(f"tokens must be (B, L <= {self.config.text_context_length}), got "
                             f"{tuple(tokens.shape)}")
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # (B, L, W)
        x = self.ln_final(self.text_transformer(x))
        pool = self.config.text_pool_type
        if pool == "argmax":  # the end-of-text token has the largest id
            x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        else:
            x = x[:, 0] if pool == "first" else x[:, -1]
        x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def _require_clip(self) -> None:
        if not self.config.train_clip:
            raise RuntimeError("this model has no CLIP side (train_clip is false)")


class TextTransformer(nn.Module):
    """The stack of OpenCLIP text blocks (`text_transformer.resblocks.i.*`)."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, causal: bool, quick_gelu: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(
            TextBlock(width, heads, mlp_ratio, causal=causal, quick_gelu=quick_gelu) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:  # (B, L, W) -> (B, L, W)
        for block in self.resblocks:
            x = block(x)
        return x

"""The VTP tokenizer: ViT trunk + 64-d bottleneck, pixel decoder, CLIP text tower, as published.

The module's state dict *is* the published checkpoint layout (`trunk.*`, `pixel_decoder.*`, `visual_proj`,
`text_transformer.*`, `token_embedding`, `positional_embedding`, `ln_final`, `text_projection`,
`logit_scale`), so loading and saving need no key mapping. Training-only parts (DINO/iBOT head, teacher,
discriminator) live outside this module; `forward_train` is the pretraining pass over every objective's part
(vtp_fast.models.training). Images everywhere are ImageNet-normalised RGB, (B, 3, H, W) with H and W multiples of
the patch size.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtp_fast.config import ConfigError
from vtp_fast.constants import denormalize, normalize, pixel_stats
from vtp_fast.models.decoder import PixelDecoder
from vtp_fast.models.heads import DINOHead
from vtp_fast.models.training import (
    N_GLOBAL,
    ClipInputs,
    RecInputs,
    SSLInputs,
    TrainHooks,
    TrainOutputs,
    TrainParts,
    TrainViews,
)
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
        self.register_buffer("pixel_mean", pixel_stats()[0], persistent=False)  # (3, 1, 1), kept fp32
        self.register_buffer("pixel_std", pixel_stats()[1], persistent=False)
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
        return normalize(pixels, (self.pixel_mean, self.pixel_std))

    def denormalize(self, images: Tensor) -> Tensor:
        """Inverse of `normalize` (not clamped)."""
        return denormalize(images, (self.pixel_mean, self.pixel_std))

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

    # ---------------------------------------------------------------- training
    def forward_train(self, views: TrainViews, parts: TrainParts, head: DINOHead | None = None,
                      hooks: TrainHooks | None = None) -> TrainOutputs:
        """One training pass for every objective in `parts`. The trunk runs once over a list of views: the plain
        images (all of them with CLIP, else the first parts.rec), and with SSL the iBOT-masked global crops and the
        local crops. Semantic parts read the pre-bottleneck tokens (SSL through `head`, the DINO head); only
        reconstruction passes the latent. `hooks` (vtp_fast.models.training) sees each part."""
        if parts.ssl and head is None:
            raise ValueError("forward_train: the SSL part needs the DINO head (head=...)")
        hooks = hooks or TrainHooks()
        n_rec = views.images.shape[0] if parts.rec is None else parts.rec
        images = views.images if parts.clip else views.images[:n_rec]
        batches, masks = [images], [None]
        if parts.ssl:
            batches += [views.global_crops, views.local_crops]
            masks += [views.masks, None]
            if views.local_crops.shape[0] == 0:  # no local crops configured
                batches, masks = batches[:2], masks[:2]
        with hooks.region("trunk"), torch.no_grad() if parts.frozen_trunk else nullcontext():
            for v in batches:
                self.check_images(v)
            outs = self.trunk(batches, masks)
        clip = self._clip_inputs(outs[0], views.tokens, hooks) if parts.clip else None
        rec = self._rec_inputs(outs[0], images[:n_rec], parts.images, hooks)
        ssl = None
        if parts.ssl:
            ssl = self._ssl_inputs(outs[1], outs[2] if len(outs) > 2 else None, views.mask_index, head, hooks)
        return TrainOutputs(rec, clip, ssl)

    def _clip_inputs(self, plain: TrunkOutput, tokens: Tensor, hooks: TrainHooks) -> ClipInputs:
        with hooks.region("clip"):
            cls, patch = hooks.boundary("clip", plain.cls, plain.patch)
            inputs = ClipInputs(self.clip_image_features_from_tokens(cls, patch), self.clip_text_features(tokens),
                                self.logit_scale)
            hooks.ready("clip", inputs)
        return inputs

    def _rec_inputs(self, plain: TrunkOutput, target: Tensor, images: bool, hooks: TrainHooks) -> RecInputs:
        with hooks.region("rec"):
            (patch,) = hooks.boundary("rec", plain.patch[: target.shape[0]])
            tokens = self.decoder_tokens(patch, plain.grid)  # (n, hw, 3p^2), before the pixel shuffle
            inputs = RecInputs(tokens, target, self.tokens_to_images(tokens, plain.grid) if images else None)
            hooks.ready("rec", inputs)
        return inputs

    def _ssl_inputs(self, glob: TrunkOutput, loc: TrunkOutput | None, mask_index: Tensor, head: DINOHead,
                    hooks: TrainHooks) -> SSLInputs:
        with hooks.region("ssl"):
            tokens = [glob.cls, glob.patch] + ([loc.cls] if loc is not None else [])
            glob_cls, glob_patch, *loc_cls = hooks.boundary("ssl", *tokens)
            emb = head.forward_train(glob_cls, glob_patch, mask_index, *loc_cls)
            n_images = glob_cls.shape[0] // N_GLOBAL
            n_local = emb.local.shape[0] // n_images if n_images else 0  # local views per image
            inputs = SSLInputs(glob_cls, list(emb.glob.chunk(N_GLOBAL)),
                               list(emb.local.chunk(n_local)) if n_local else [], emb.patch, emb.weight)
            hooks.ready("ssl", inputs)
        return inputs

    def last_layer(self) -> Tensor:
        """The pixel decoder's last weight (3 p^2, D, 1, 1): where VQGAN's adaptive weight compares the gradients of
        the reconstruction and adversarial losses."""
        return self.pixel_decoder.proj_out.weight

    def transformer_blocks(self) -> list[nn.Module]:
        """Every transformer block (trunk, pixel decoder, text tower): the units that compile, activation
        checkpointing and FSDP act on."""
        blocks = list(self.trunk.blocks)
        if self.pixel_decoder is not None:
            blocks += list(self.pixel_decoder.blocks)
        if self.config.train_clip:
            blocks += list(self.text_transformer.resblocks)
        return blocks

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

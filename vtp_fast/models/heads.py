"""The DINOv2-style projection head shared by DINO and iBOT (training only, not in published checkpoints)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtp_fast.ops import masked_gather as masked_gather_op


class WeightNormLinear(nn.Module):
    """Linear without bias, weight = g * v / ||v|| per output row (keys weight_g (K, 1), weight_v (K, d))."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    @property
    def weight(self) -> Tensor:  # (K, d)
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., K)
        return F.linear(x, self.weight)


class HeadOutputs(NamedTuple):
    """The head's embeddings of one set of SSL views, and the prototypes the losses take the logits against."""

    glob: Tensor  # (n, d) the global crops' CLS tokens
    patch: Tensor  # (M, d) their masked patch tokens, packed
    local: Tensor  # (n_local, d) the local crops' CLS tokens; no rows without local crops
    weight: Tensor  # (K, d) the weight-normalised prototypes, in the embeddings' dtype


class DINOHead(nn.Module):
    """3-layer MLP (GELU) -> L2 normalisation -> weight-normalised prototype layer.

    `embed` (MLP + normalisation, (n, D) -> (n, bottleneck)) and `last_layer` are separate so the prototype
    logits can be fused with the loss; forward(x (n, D)) -> logits (n, prototypes).
    """

    def __init__(self, in_dim: int, prototypes: int = 65536, hidden: int = 2048, bottleneck: int = 256,
                 layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        self.last_layer = WeightNormLinear(bottleneck, prototypes)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.last_layer.weight_v, std=0.02)
        self.gather = masked_gather_op.OP.resolve()  # the masked patch tokens, packed

    def prototypes(self, dtype: torch.dtype) -> Tensor:
        """The weight-normalised prototype matrix (K, d) in `dtype`: the losses take the logits against it."""
        return self.last_layer.weight.to(dtype)

    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.embed(x))

    def forward_train(self, cls: Tensor, patch: Tensor, mask_index: Tensor,
                      local_cls: Tensor | None = None) -> HeadOutputs:
        """Training (student and EMA teacher alike): the global crops' CLS (n, D) and patch tokens (n, N, D), the
        masked tokens' flat indices (M,) into (n * N), and the local crops' CLS (n_local, D) -> their embeddings,
        every row through one MLP call, and the prototypes."""
        n, packed = cls.shape[0], self.gather.impl.masked_gather(patch, mask_index)  # (M, D)
        rows = [cls, packed] + ([local_cls] if local_cls is not None else [])
        emb = self.embed(torch.cat(rows))  # (n + M + n_local, d)
        weight = self.prototypes(emb.dtype)
        m = packed.shape[0]
        return HeadOutputs(emb[:n], emb[n:n + m], emb[n + m:], weight)

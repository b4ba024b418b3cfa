"""Zero-shot classification with the CLIP side of a tokenizer."""

from __future__ import annotations

import torch
from torch import Tensor

from vtp_fast.models.vtp import VTP


@torch.no_grad()
def text_features(model: VTP, prompts: list[str], batch: int = 256) -> Tensor:
    """(C,) prompts -> (C, E) L2-normalised text features."""
    device = next(model.parameters()).device
    feats = [model.clip_text_features(model.tokenize(prompts[i:i + batch]).to(device))
             for i in range(0, len(prompts), batch)]
    return torch.cat(feats)


@torch.no_grad()
def classify(model: VTP, images: Tensor, class_features: Tensor, labels: Tensor, batch: int = 256) -> dict:
    """Normalised images (N, 3, H, W), class text features (C, E), labels (N,) -> top-1 / top-5 accuracy."""
    image_feats = torch.cat([model.clip_image_features(images[i:i + batch]) for i in range(0, len(images), batch)])
    scores = image_feats @ class_features.T  # (N, C)
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    labels = labels.to(top.device)
    return {"top1": (top[:, 0] == labels).float().mean().item(),
            "top5": (top == labels[:, None]).any(1).float().mean().item(),
            "chance": 1.0 / class_features.shape[0]}


@torch.no_grad()
def zero_shot_names(model: VTP, images: Tensor, captions: list[str]) -> dict:
    """Classify each image among the distinct captions of the set (e.g. emoji names), its own being right."""
    names = sorted(set(captions))
    index = {n: i for i, n in enumerate(names)}
    labels = torch.tensor([index[c] for c in captions])
    return classify(model, images, text_features(model, names), labels)

"""Zero-shot classification with prompt templates, and linear probing of frozen tokenizer features.

Zero-shot: every class name is put into each template ("a photo of a {}."), the L2-normalised text features
are averaged over the templates and renormalised (the CLIP recipe), and images are classified by cosine
similarity. The VTP paper evaluates ImageNet zero-shot with CLIP's 80 ImageNet templates (open_clip's metadata:
`vtp_fast.eval.classify.imagenet_templates`); ``TEMPLATES`` here is a short general-purpose subset of those plus
emoji-style prompts for the bundled emoji set.

Linear probe ("last-layer": the published VTP's protocol for every figure but its Table 2): features of a frozen
model (:func:`extract_features` in memory, or `vtp_fast.eval.features` stored and memory-mapped at ImageNet scale)
are standardised with statistics of the training features only, and a linear classifier is trained with
cross-entropy (AdamW or SGD, cosine learning rate, zero-initialised weights) for every learning rate in ``lrs``, all
on the same batches. The learning rate is chosen by accuracy on a held-out, class-stratified part of the TRAIN set
(``val_fraction``); the test set is used exactly once, to report the accuracy of the selected configuration,
retrained on the whole training set (``refit=True``). Everything is deterministic given ``seed``. The DINO-style
protocol (Table 2) is `vtp_fast.eval.probe_dino`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 1 << 16  # rows read at a time for statistics and evaluation

TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a cartoon {}.",
    "art of the {}.",
    "an emoji of {}.",
    "an icon of {}.",
    "a picture of {}.",
    "{}",
]


def _device(model) -> torch.device:
    try:
        p = next(model.parameters())
    except (AttributeError, StopIteration):
        return torch.device("cpu")
    return p.device


# ---------------------------------------------------------------------------------------------- zero-shot
@torch.no_grad()
def zero_shot_classifier(model, class_names: Sequence[str], templates: Sequence[str | Callable[[str], str]] = TEMPLATES,
                         batch: int = 256) -> Tensor:
    """Class names (C,) x templates (T,) -> zero-shot weights (C, E): per class the mean over templates of the
    L2-normalised text features (``model.tokenize`` + ``model.clip_text_features``), renormalised.
    A template is a string with '{}' or a function of the class name (open_clip's metadata holds functions).
    Prompts are encoded in batches of ``batch``."""
    if len(class_names) == 0:
        raise ValueError("zero_shot_classifier: no class names")
    if len(templates) == 0 or any(not callable(t) and "{}" not in t for t in templates):
        raise ValueError(f"every template must contain '{{}}' or be a function of the class name, got {templates!r}")
    device = _device(model)
    prompts = [t(name) if callable(t) else t.format(name)
               for name in class_names for t in templates]  # (C * T,), class-major
    feats = []
    for i in range(0, len(prompts), batch):
        tokens = model.tokenize(prompts[i:i + batch]).to(device)
        feats.append(F.normalize(model.clip_text_features(tokens).float(), dim=-1))
    text = torch.cat(feats).view(len(class_names), len(templates), -1)  # (C, T, E)
    return F.normalize(text.mean(1), dim=-1)  # (C, E)


def top_hits(scores: Tensor, labels: Tensor) -> tuple[int, int]:
    """Scores (n, C), labels (n,) -> how many rows have their label first, and among the top min(5, C)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (n, k)
    labels = labels.to(top.device)
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(1).sum())


@torch.no_grad()
def zero_shot_accuracy(model, images: Tensor, labels: Tensor, classifier: Tensor, batch: int = 256) -> dict:
    """Normalised images (N, 3, H, W), labels (N,) in [0, C), classifier (C, E) -> {"top1", "top5", "chance"}:
    cosine similarity, top-k with k = min(5, C). Batches move to the model's device, so images may stay on the
    CPU."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    device = _device(model)
    classifier = classifier.to(device).float()
    scores = torch.cat([F.normalize(model.clip_image_features(images[i:i + batch].to(device)).float(), dim=-1)
                        @ classifier.T for i in range(0, images.shape[0], batch)]).cpu()  # (N, C)
    top1, top5 = top_hits(scores, labels.long())
    return {"top1": top1 / len(labels), "top5": top5 / len(labels), "chance": 1.0 / classifier.shape[0]}


@torch.no_grad()
def zero_shot_names(model, images: Tensor, captions: list[str]) -> dict:
    """Classify each image among the distinct captions of the set (e.g. emoji names), its own being right."""
    names = sorted(set(captions))
    index = {n: i for i, n in enumerate(names)}
    labels = torch.tensor([index[c] for c in captions])
    return zero_shot_accuracy(model, images, labels, zero_shot_classifier(model, names, ["{}"]))


# ---------------------------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(model, images: Tensor, batch: int = 64) -> dict[str, Tensor]:
    """Frozen VTP features for probing, in eval mode (the mode is restored afterwards).

    Normalised images (N, 3, H, W) -> {"cls_meanpatch": (N, 2D) concat of the last-layer normed CLS token and
    the mean of the normed patch tokens, "latent": (N, 64) the bottleneck latents mean-pooled over positions},
    float32 on the CPU.
    """
    device = _device(model)
    p = model.config.vision_patch_size
    was_training = model.training
    model.eval()
    out: dict[str, list[Tensor]] = {"cls_meanpatch": [], "latent": []}
    try:
        for i in range(0, images.shape[0], batch):
            x = images[i:i + batch].to(device)  # (b, 3, H, W)
            cls, patch = model.features(x)  # (b, D), (b, h * w, D)
            grid = (x.shape[2] // p, x.shape[3] // p)
            latents = model.latents_from_patch(patch, grid)  # (b, 64, h, w)
            out["cls_meanpatch"].append(torch.cat([cls, patch.mean(1)], dim=1).float().cpu())  # (b, 2D)
            out["latent"].append(latents.mean((2, 3)).float().cpu())  # (b, 64)
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- linear probe
def stratified_split(y: Tensor, val_fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices (fit, val): per class round(val_fraction * n_c) examples go to val (none for singletons)."""
    fit, val = [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_val = min(round(val_fraction * idx.numel()), idx.numel() - 1)
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    fit_idx, val_idx = torch.cat(fit).sort().values, torch.cat(val).sort().values
    if val_idx.numel() == 0:
        raise ValueError(f"val_fraction={val_fraction} leaves no held-out training examples for choosing the "
                         f"learning rate ({y.numel()} training examples)")
    return fit_idx, val_idx


def _rows(x, idx: Tensor) -> Tensor:
    """Rows idx (b,) of features x: an (N, D) tensor, or a stored view (vtp_fast.eval.features.FeatureView) that
    indexes like one -> (b, D) float32."""
    return x[idx].float()


def _standardizer(x, idx: Tensor, chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """Mean and std (D,) of the training rows idx of x, accumulated in float64 a chunk at a time (Chan's merge of
    per-chunk means and squared deviations); constant features get std 1."""
    n, mean, m2 = 0, torch.zeros(()), torch.zeros(())
    for i in range(0, idx.numel(), chunk):
        b = _rows(x, idx[i:i + chunk]).cpu().double()  # (k, D)
        k, b_mean = b.shape[0], b.mean(0)
        delta, total = b_mean - mean, n + k
        mean = mean + delta * (k / total)
        m2 = m2 + (b - b_mean).pow(2).sum(0) + delta.pow(2) * (n * k / total)
        n = total
    std = (m2 / n).sqrt()
    return mean.float(), torch.where(std > 1e-8, std, torch.ones_like(std)).float()


def _train_heads(x, y: Tensor, idx: Tensor, mean: Tensor, std: Tensor, num_classes: int, lrs: tuple[float, ...], *,
                 epochs: int, weight_decay: float, batch: int, seed: int, optimizer: str,
                 device: torch.device) -> list[torch.nn.Linear]:
    """Cross-entropy training of one zero-initialised linear layer (D -> C) per learning rate on the standardised
    rows idx of x, all on the same batches (each as if trained alone with a generator seeded `seed`)."""
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    heads, opts = [], []
    for lr in lrs:
        head = torch.nn.Linear(x.shape[1], num_classes, device=device)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        heads.append(head)
        opts.append(torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay) if optimizer == "adamw"
                    else torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay))
    gen = torch.Generator().manual_seed(seed)
    mean, std = mean.to(device), std.to(device)
    n = idx.numel()
    total, step = epochs * math.ceil(n / batch), 0
    for _ in range(epochs):
        order = idx[torch.randperm(n, generator=gen)]  # (n,)
        for i in range(0, n, batch):
            b = order[i:i + batch]
            xb, yb = (_rows(x, b).to(device) - mean) / std, y[b].to(device)  # (b, D), (b,)
            scale = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine decay to 0 over the run
            for head, opt, lr in zip(heads, opts, lrs, strict=True):
                for group in opt.param_groups:
                    group["lr"] = lr * scale
                loss = F.cross_entropy(head(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            step += 1
    return heads


@torch.no_grad()
def _accuracy(head: torch.nn.Linear, x, idx: Tensor, y: Tensor, mean: Tensor, std: Tensor,
              chunk: int = CHUNK) -> float:
    """Top-1 of `head` on the standardised rows idx of x (read `chunk` rows at a time)."""
    device = head.weight.device
    mean, std = mean.to(device), std.to(device)
    right = 0
    for i in range(0, idx.numel(), chunk):
        b = idx[i:i + chunk]
        right += int((head((_rows(x, b).to(device) - mean) / std).argmax(1).cpu() == y[b]).sum())
    return right / max(idx.numel(), 1)


def _check_xy(x, y: Tensor, what: str) -> None:
    if len(x.shape) != 2:
        raise ValueError(f"{what}_x must be (N, D), got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what}_y must be (N,) = ({x.shape[0]},), got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{what}_y must hold integer class ids, got {y.dtype}")
    if y.numel() and y.min() < 0:
        raise ValueError(f"{what}_y has negative class ids")


def linear_probe(train_x, train_y: Tensor, test_x, test_y: Tensor, *,
                 lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1), epochs: int = 100, weight_decay: float = 0.0,
                 batch: int = 256, seed: int = 0, val_fraction: float = 0.2, refit: bool = True,
                 optimizer: str = "adamw", device: str | torch.device | None = None) -> dict:
    """Linear probe: train (N, D) / (N,) and test (M, D) / (M,) -> {"top1": test top-1 of the selected lr,
    "lr": selected lr, "per_lr": {lr: held-out top-1}, "val_top1", "num_classes", "chance", "n_fit", "n_val"}.

    Features are tensors, or stored views (vtp_fast.eval.features: memory-mapped, gathered a batch at a time; the
    results equal those of the same rows in memory). Training runs on `device` (default: the features' device, the
    CPU for stored ones). The lr is chosen on a class-stratified ``val_fraction`` of the TRAIN set (ties: the first
    in ``lrs``); the test set never influences the choice. With ``refit`` the chosen lr is retrained on the whole
    train set (standardised with its own statistics) before the single test evaluation; otherwise the model
    trained on the fit part is evaluated.
    """
    _check_xy(train_x, train_y, "train")
    _check_xy(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train and test features differ in width: {train_x.shape[1]} vs {test_x.shape[1]}")
    if train_x.shape[0] < 2 or test_x.shape[0] < 1:
        raise ValueError(f"need >= 2 training and >= 1 test examples, got {train_x.shape[0]} and {test_x.shape[0]}")
    if not lrs:
        raise ValueError("lrs is empty")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    device = torch.device(device) if device is not None else getattr(train_x, "device", torch.device("cpu"))
    train_y, test_y = train_y.long().cpu(), test_y.long().cpu()
    num_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    kw = {"epochs": epochs, "weight_decay": weight_decay, "batch": batch, "optimizer": optimizer, "device": device,
          "seed": seed}

    # --- lr selection: train split only
    fit_idx, val_idx = stratified_split(train_y, val_fraction, torch.Generator().manual_seed(seed))
    mean, std = _standardizer(train_x, fit_idx)
    heads = _train_heads(train_x, train_y, fit_idx, mean, std, num_classes, tuple(lrs), **kw)
    per_lr = {lr: _accuracy(head, train_x, val_idx, train_y, mean, std) for lr, head in zip(lrs, heads, strict=True)}
    best_lr = max(lrs, key=lambda lr: per_lr[lr])  # first maximum wins ties

    # --- the one test evaluation
    if refit:
        every = torch.arange(train_y.numel())
        mean, std = _standardizer(train_x, every)
        (head,) = _train_heads(train_x, train_y, every, mean, std, num_classes, (best_lr,), **kw)
    else:
        head = heads[list(lrs).index(best_lr)]
    top1 = _accuracy(head, test_x, torch.arange(test_y.numel()), test_y, mean, std)
    return {"top1": top1, "lr": best_lr, "per_lr": per_lr, "val_top1": per_lr[best_lr], "num_classes": num_classes,
            "chance": 1.0 / num_classes, "n_fit": int(fit_idx.numel()), "n_val": int(val_idx.numel())}

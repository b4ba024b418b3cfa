"""Zero-shot classification and linear probes at any scale, on stored features (`vtp-fast eval zeroshot|probe`).

The images are embedded once, streamed and across torchrun's ranks, into memory-mapped feature sets
(vtp_fast.eval.features, resumable); rank 0 then scores from the stored rows, never holding a set in memory.

Zero-shot class names and prompts (`classes`):
    "imagenet"  open_clip's ImageNet-1k class names and the 80 OpenAI prompt templates (open_clip's
                zero_shot_metadata, imported when asked for: pip install open_clip_torch); the label of an image must
                be its class's index in the standard order, which is that of an ImageFolder tree of the WordNet-id
                folders (sorted) and of ImageNet's .cls shards;
    "set"       the set's own class names and the general templates of vtp_fast.eval.probe.TEMPLATES;
    "auto"      "imagenet" for a set of 1000 classes, "set" otherwise.
Text embeddings follow OpenAI's protocol: per class the mean over the templates of the L2-normalised text features,
renormalised; an image goes to the class of highest cosine similarity.

Linear probes (`protocol`): "last-layer" (the published VTP's protocol for all but its Table 2: vtp_fast.eval.probe's
linear_probe on the last block's class token + mean patch token, and on the 64-d latent) or "dino" (Table 2:
vtp_fast.eval.probe_dino).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from vtp_fast import distributed as dist
from vtp_fast import optional
from vtp_fast.config import InputError
from vtp_fast.data.labelled import class_names_of
from vtp_fast.eval.features import FeatureStore, extract_features
from vtp_fast.eval.probe import CHUNK, TEMPLATES, linear_probe, top_hits, zero_shot_classifier

CLASSES = ("auto", "imagenet", "set")
PROTOCOLS = ("last-layer", "dino")


def _zero_shot_metadata():
    if not optional.available("open_clip"):
        raise InputError("ImageNet zero-shot reads its class names and 80 prompt templates from open_clip, which is "
                         f"not installed: pip install open_clip_torch ({optional.reason('open_clip')})")
    return optional.module("open_clip")


def imagenet_classnames() -> tuple[str, ...]:
    """The 1000 ImageNet class names, index = label: open_clip's IMAGENET_CLASSNAMES itself."""
    return _zero_shot_metadata().IMAGENET_CLASSNAMES


def imagenet_templates() -> tuple[Callable[[str], str], ...]:
    """The 80 prompt templates of OpenAI's CLIP ImageNet zero-shot evaluation: open_clip's
    OPENAI_IMAGENET_TEMPLATES itself (functions of the class name)."""
    return _zero_shot_metadata().OPENAI_IMAGENET_TEMPLATES


def zero_shot_prompts(class_names: list[str], classes: str = "auto") -> tuple[list[str] | tuple, tuple | list, str]:
    """(class names, templates, which: "imagenet" or "set") for a set with `class_names` (module docstring)."""
    if classes not in CLASSES:
        raise InputError(f"zero-shot: classes {classes!r} (choices: {', '.join(CLASSES)})")
    if classes == "imagenet" or (classes == "auto" and len(class_names) == 1000):
        if len(class_names) != 1000:
            raise InputError(f"zero-shot: ImageNet's class names need a set of 1000 classes, this one has "
                             f"{len(class_names)}")
        return imagenet_classnames(), imagenet_templates(), "imagenet"
    return class_names, TEMPLATES, "set"


@torch.no_grad()
def zero_shot_stored(model, store: FeatureStore, classes: str = "auto") -> dict:
    """Zero-shot accuracy of the stored CLIP image embeddings of a feature set -> {"top1", "top5", "chance", "n",
    "classes", "templates"}."""
    if not model.config.train_clip:
        raise InputError("zero-shot: this tokenizer has no text tower (train_clip is false)")
    names, templates, which = zero_shot_prompts(store.class_names, classes)
    if which == "set" and list(names) == class_names_of(len(names) - 1):
        raise InputError(f"zero-shot: {store.meta['data']} has no class names (only numeric labels)")
    device = next(model.parameters()).device
    classifier = zero_shot_classifier(model, names, templates).to(device)  # (C, E)
    cols = store.cols("clip")
    top1 = top5 = 0
    for i in range(0, len(store), CHUNK):
        idx = torch.arange(i, min(i + CHUNK, len(store)))
        scores = store.rows(idx, cols).to(device) @ classifier.T  # (b, C): the rows are normalised
        hits1, hits5 = top_hits(scores, store.labels[idx])
        top1, top5 = top1 + hits1, top5 + hits5
    n = len(store)
    return {"top1": top1 / n, "top5": top5 / n, "chance": 1.0 / len(names), "n": n, "classes": which,
            "templates": len(templates)}


def _resident(stores: list[FeatureStore], cols: np.ndarray, device: torch.device, budget: float) -> None:
    """Keep the columns the probe reads on its GPU when they fit in `budget` of its free memory."""
    need = sum(len(s) for s in stores) * len(np.unique(cols)) * 4
    if device.type == "cuda" and need <= budget * torch.cuda.mem_get_info(device)[0]:
        for s in stores:
            s.keep_resident(cols, device)


def probe_stored(train: FeatureStore, test: FeatureStore, protocol: str = "last-layer", *,
                 device: str | torch.device = "cpu", resident: float = 0.5, **probe) -> dict:
    """A linear probe of stored features, trained on `device` (the columns it reads copied there first when they
    fit in `resident` of its free memory; the same results). "last-layer" -> {"probe_cls_meanpatch",
    "probe_latent": test top-1}; "dino" -> {"probe_dino": test top-1, "probe_dino_top5", "dino": the full result}.
    Other keyword arguments go to vtp_fast.eval.probe.linear_probe or vtp_fast.eval.probe_dino.dino_probe."""
    device = torch.device(device)
    if protocol == "dino":
        from vtp_fast.eval.probe_dino import dino_probe

        _resident([train, test], np.concatenate([train.cls_cols(train.n_blocks), train.cols("patch_mean")]), device,
                  resident)
        r = dino_probe(train, test, device=device, **probe)
        return {"probe_dino": r["top1"], "probe_dino_top5": r["top5"], "dino": r}
    if protocol != "last-layer":
        raise InputError(f"probe: protocol {protocol!r} (choices: {', '.join(PROTOCOLS)})")
    kinds = {"cls_meanpatch": lambda s: np.concatenate([s.cls_cols(1), s.cols("patch_mean")]),
             "latent": lambda s: s.cols("latent")}
    _resident([train, test], np.concatenate([c(train) for c in kinds.values()]), device, resident)
    return {f"probe_{k}": linear_probe(train.view(c(train)), train.labels, test.view(c(test)), test.labels,
                                       device=device, **probe)["top1"] for k, c in kinds.items()}


@contextmanager
def _features_dir(root: str | Path | None):
    """`root`, or a temporary folder removed afterwards (made by rank 0: one machine)."""
    if root is not None:
        yield Path(root)
        return
    tmp = dist.broadcast_object(tempfile.mkdtemp(prefix="vtp-features-") if dist.rank() == 0 else None)
    try:
        yield Path(tmp)
    finally:
        dist.barrier()
        if dist.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)


def zero_shot_eval(model, data, features: str | Path | None = None, *, classes: str = "auto",
                   **extract) -> dict | None:
    """Zero-shot accuracy of the image source `data`: features extracted into `features`/<set name> (resumable;
    a temporary folder when None) on every rank, scored on rank 0 (None on the others)."""
    if not model.config.train_clip:
        raise InputError("zero-shot: this tokenizer has no text tower (train_clip is false)")
    if data.class_names:
        zero_shot_prompts(data.class_names, classes)  # a bad choice fails before any work
    with _features_dir(features) as root:
        store = extract_features(model, data, root / data.name, **extract)
        if dist.rank() != 0:
            return None
        return zero_shot_stored(model, store, classes) | {"skipped": store.meta["skipped"]}


def probe_eval(model, train, test, features: str | Path | None = None, *, protocol: str = "last-layer",
               probe: dict | None = None, **extract) -> dict | None:
    """A linear probe trained on the image source `train`, scored on `test`: features extracted as for
    `zero_shot_eval`, the probe on rank 0 (None on the others)."""
    if protocol not in PROTOCOLS:
        raise InputError(f"probe: protocol {protocol!r} (choices: {', '.join(PROTOCOLS)})")
    with _features_dir(features) as root:
        a = extract_features(model, train, root / train.name, **extract)
        b = extract_features(model, test, root / test.name, **extract)
        if dist.rank() != 0:
            return None
        return probe_stored(a, b, protocol, **{"device": next(model.parameters()).device, **(probe or {})})

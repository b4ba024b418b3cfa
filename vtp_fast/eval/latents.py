"""Latent extraction: a tokenizer's latents of a labelled image set (vtp_fast.data.labelled), written as a latent
set (vtp_fast.data.latents) for training a DiT on them. As in the paper's protocol, every image (center-cropped to
a square by `load_images`) is encoded together with its horizontal mirror (`flip=False` skips the mirrors).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from vtp_fast.config import InputError
from vtp_fast.data.labelled import LabelledImages
from vtp_fast.data.pairs import normalize_u8
from vtp_fast.io import atomic_dir
from vtp_fast.models.pretrained import tokenizer_fingerprint
from vtp_fast.models.vtp import VTP


@torch.no_grad()
def extract_latents(model: VTP, data: LabelledImages, out: str | Path, *, flip: bool = True, batch: int = 128,
                    per_file: int = 16384, tokenizer: str = "", progress: bool = True) -> dict:
    """Encode every image (and, with `flip`, its horizontal mirror) into latent shards + meta.json under `out`,
    written to a temp dir and renamed. Returns the meta."""
    if len(data) == 0:
        raise InputError(f"extract-latents: the data set {data.name} holds no images")
    model.eval()
    device = next(model.parameters()).device
    out = Path(out)
    with atomic_dir(out) as tmp:  # .NAME.tmp-XXXXXXXX, renamed to `out` whole
        chunks, labels, total = [], [], 0
        sums = sq = None
        copies = (False, True) if flip else (False,)
        bar = tqdm(total=len(data) * len(copies), desc="extract-latents", unit="img", disable=not progress)
        files = 0

        def flush():
            nonlocal chunks, labels, files
            if chunks:
                save_file({"latents": torch.cat(chunks).contiguous(), "labels": torch.cat(labels).contiguous()},
                          str(tmp / f"latents-{files:05d}.safetensors"))
                files += 1
                chunks, labels = [], []

        for mirrored in copies:
            for i in range(0, len(data), batch):
                x = normalize_u8(data.images[i:i + batch]).to(device)
                if mirrored:
                    x = x.flip(-1)
                z = model.encode(x).float().cpu()  # (b, C, h, w)
                chunks.append(z)
                labels.append(data.labels[i:i + batch])
                s = z.double().sum((0, 2, 3))
                q = z.double().pow(2).sum((0, 2, 3))
                sums, sq = (s, q) if sums is None else (sums + s, sq + q)
                total += z.shape[0]
                bar.update(z.shape[0])
                if sum(c.shape[0] for c in chunks) >= per_file:
                    flush()
        flush()
        bar.close()
        count = total * z.shape[2] * z.shape[3]
        mean = sums / count
        std = (sq / count - mean**2).clamp_min(1e-12).sqrt()
        meta = {"channels": z.shape[1], "grid": [z.shape[2], z.shape[3]], "count": total, "flipped_copies": flip,
                "mean": mean.tolist(), "std": std.tolist(), "class_names": data.class_names, "data": data.name,
                "tokenizer": tokenizer, "tokenizer_fingerprint": tokenizer_fingerprint(model),
                "image_size": int(data.images.shape[1])}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta

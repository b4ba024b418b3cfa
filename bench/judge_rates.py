"""The judge's rates on this machine at the paper's shapes, through the commands' own code paths:
latent extraction (images/s: decode, ADM's centre crop, VTP-S encode at 256 px, mirrors included), DiT sampling
(DiT-B/1 on 64 x 16 x 16 latents: seconds per model call per sample, and samples/s of the 50K protocol's 250
guided Euler steps with the VTP-S decode), and the ADM suite's Inception features (images/s, exact fp32).

    python bench/judge_rates.py [--out bench/results/cpu/judge.jsonl]

Random weights (rates do not depend on them); one warm-up pass each, then the median of `--repeats` timed passes.
The 250-step figure multiplies the measured seconds per model call by the protocol's calls (250 conditional + 250
unconditional) and adds the measured decode: stated in the row as derived, not run whole.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def folder(root: Path, n: int) -> Path:
    """An ImageFolder tree of n JPEG photos of 500 x 375 (ImageNet's typical size) in 2 classes."""
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(root / f"class{i % 2}/{i}.jpg",
                                                                                   quality=90)
    return root


def extraction(tmp: Path, n: int, repeats: int) -> dict:
    from vtp_fast import VTP, vtp_config
    from vtp_fast.data.labelled import open_images
    from vtp_fast.eval.latents import extract_latents

    torch.manual_seed(0)
    model = VTP(vtp_config("vtp-s")).eval()
    source = open_images(str(folder(tmp / "photos", n)), size=256)
    runs = iter(range(10**6))
    s = timed(lambda: extract_latents(model, source, tmp / f"latents-{next(runs)}", batch=n, progress=False),
              repeats)
    return {"what": "extract-latents", "model": "vtp-s", "image_size": 256, "images": n, "flip": True,
            "seconds": s, "images_per_s": n / s, "encodes_per_s": 2 * n / s}


def sampling(batch: int, repeats: int) -> dict:
    from vtp_fast import VTP, vtp_config
    from vtp_fast.models.dit import DiT, dit_config

    torch.manual_seed(0)
    dit = DiT(dit_config("dit-b/1", in_channels=64, input_size=16)).eval()
    tokenizer = VTP(vtp_config("vtp-s")).eval()
    x = torch.randn(batch, 64, 16, 16)
    t = torch.full((batch,), 0.5)
    y = torch.zeros(batch, dtype=torch.long)
    with torch.inference_mode():
        call = timed(lambda: dit(x, t, y), repeats) / batch
        decode = timed(lambda: tokenizer.decode(x), repeats) / batch
    per_sample = 500 * call + decode  # 250 Euler steps, conditional + unconditional at each
    return {"what": "sample", "dit": "dit-b/1", "latents": [64, 16, 16], "tokenizer": "vtp-s", "batch": batch,
            "seconds_per_model_call_per_sample": call, "decode_seconds_per_sample": decode,
            "protocol": "250 Euler steps, CFG at every step (derived: 500 calls + 1 decode per sample)",
            "samples_per_s_protocol": 1 / per_sample}


def features(tmp: Path, n: int, repeats: int) -> dict:
    from vtp_fast.data.image_sets import open_image_set
    from vtp_fast.eval.adm import extract_features

    rng = np.random.default_rng(1)
    np.savez(tmp / "samples.npz", arr_0=rng.integers(0, 255, (n, 256, 256, 3), dtype=np.uint8))
    source = open_image_set(tmp / "samples.npz")
    s = timed(lambda: extract_features(source, precision="fp32", batch_size=n, progress=False), repeats)
    return {"what": "adm-features", "precision": "fp32", "image_size": 256, "images": n, "seconds": s,
            "images_per_s": n / s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="append the JSON rows to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from vtp_fast.measure.rows import write_rows
    from vtp_fast.measure.timing import env_info

    env = env_info("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [extraction(Path(tmp), 16, args.repeats), sampling(8, args.repeats),
                features(Path(tmp), 32, args.repeats)]
    for row in rows:
        row.update(bench="judge_rates", **env)
        print(json.dumps(row), flush=True)
        write_rows([row], args.out)


if __name__ == "__main__":
    main()

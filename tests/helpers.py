"""Test data built by the tests themselves (a prepared emoji-format folder of synthetic images, damaged images), a
load on the cores that comes and goes, and the op tests' backend on the CPU."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vtp_fast import optional
from vtp_fast.data.emoji import STYLES
from vtp_fast.ops.registry import Op

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, rgb: tuple[int, int, int], size: int, style_index: int) -> np.ndarray:
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    r = 0.3 + 0.04 * style_index  # styles differ slightly in scale
    inside = {"circle": xx**2 + yy**2 < r**2,
              "square": (abs(xx) < r * 0.9) & (abs(yy) < r * 0.9),
              "triangle": (yy > -r) & (yy < r) & (abs(xx) < (yy + r) / 2)}[shape]
    img[inside] = rgb
    return img


def make_prepared_emoji(root: Path, size: int = 64, styles=STYLES) -> Path:
    """A folder in prepare_emoji's format: every (colour, shape) pair in every style, captions like
    "red circle", category = shape."""
    root.mkdir(parents=True, exist_ok=True)
    for s_idx, style in enumerate(styles):
        rows, images = [], []
        for colour, rgb in COLOURS.items():
            for shape in SHAPES:
                key = f"{colour}-{shape}"
                rows.append({"key": key, "unified": key, "caption": f"{colour} {shape}", "category": shape,
                             "subcategory": colour, "short_names": [key]})
                images.append(_draw(shape, rgb, size, s_idx))
        np.save(root / f"images_{style}.npy", np.stack(images))
        (root / f"index_{style}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "manifest.json").write_text(json.dumps({"format": 1, "size": size, "categories": sorted(SHAPES)}))
    return root


def random_png(rng: np.random.Generator, side: int) -> bytes:
    """A PNG of uniform random RGB pixels, side x side."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_with_bad_pixels(seed: int = 0) -> bytes:
    """A PNG whose chunks all pass their CRC but whose compressed pixels are garbage: only a decoder notices."""
    rng = np.random.default_rng(seed)
    data = bytearray(random_png(rng, 24))
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4:at], "big")
    data[at + 4:at + 4 + length] = rng.integers(0, 255, length, dtype=np.uint8).tobytes()
    data[at + 4 + length:at + 8 + length] = zlib.crc32(bytes(data[at:at + 4 + length])).to_bytes(4, "big")
    return bytes(data)


def cpu_backend(op: Op, name: str):
    """The implementation of `op`'s backend `name`, which must run on the CPU here. The native one is skipped when
    the extension is not built, and fails the test instead under VTP_FAST_REQUIRE_NATIVE=1 (scripts/test.sh)."""
    if name == "native" and not optional.available("native"):
        if os.environ.get("VTP_FAST_REQUIRE_NATIVE"):
            pytest.fail(f"native extension required but not loaded: {optional.reason('native')}")
        pytest.skip("native extension not built")
    b = op.backends[name]
    assert "cpu" in b.devices, f"{name} does not run on cpu here"
    return b.impl


def dtypes_for(name: str, dtypes: tuple[torch.dtype, ...]) -> list[torch.dtype]:
    """The `dtypes` backend `name` runs on the CPU: the Triton interpreter has no bfloat16."""
    return [d for d in dtypes if not (name == "triton" and d == torch.bfloat16)]


def assert_batches_equal(a, b) -> None:
    """Two vtp_fast.data.batch.Batch objects hold equal tensors in every field (None in the same ones)."""
    for k, v in vars(a).items():
        w = getattr(b, k)
        assert (v is None and w is None) or torch.equal(v, w), k


# One process per CPU, all busy (spinning) for 0.5-4 s, then all idle for 0.5-3 s, over and over: other jobs starting
# and stopping on the cores, which a constant load does not imitate (a run that adapted to the load would adapt once).
_FLICKER = """
import os, random, sys, time
n = os.cpu_count() or 1
for i in range(n - 1):
    if os.fork() == 0:
        break
rng = random.Random(int(sys.argv[1]))  # the same seed in every process: they load and rest together
while True:
    end = time.monotonic() + rng.uniform(0.5, 4.0)
    while time.monotonic() < end:
        pass
    time.sleep(rng.uniform(0.5, 3.0))
"""


@contextmanager
def flickering_load(seed: int = 0):
    """Load every CPU on and off (busy 0.5-4 s, idle 0.5-3 s) while the body runs."""
    proc = subprocess.Popen([sys.executable, "-c", _FLICKER, str(seed)], start_new_session=True)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

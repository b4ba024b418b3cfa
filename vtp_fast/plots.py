"""PNG figures for runs: loss curves and before/after image grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vtp_fast.data.images import to_uint8  # noqa: E402

MARKED_POINTS = 30


def plot_curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *,
                title: str, xlabel: str = "step", ylabel: str = "loss", log_y: bool = True) -> Path:
    """One line per name: series[name] = (x values, y values); each point marked when a line has at most
    MARKED_POINTS (a run shorter than run.log_every logs one row, which a bare line does not show)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, linewidth=1.4, marker="o" if len(xs) <= MARKED_POINTS else None, markersize=4)
    if log_y and all(min(ys, default=1) > 0 for _, ys in series.values()):
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def image_grid(rows: Sequence[torch.Tensor], path: str | Path, pad: int = 2) -> Path:
    """Stack equally-shaped image batches as rows of a grid: rows[r] is (B, 3, H, W) in [0, 1].

    E.g. rows = [originals, reconstructions] gives a before/after grid with matching columns.
    """
    arrays = [to_uint8(r) for r in rows]  # each (B, H, W, 3)
    b, h, w, _ = arrays[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, b * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, arr in enumerate(arrays):
        for c in range(arr.shape[0]):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y: y + h, x: x + w] = arr[c]
    Image.fromarray(grid).save(path)
    return Path(path)

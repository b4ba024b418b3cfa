"""A tokenizer on image files of any size: their latents (`encode`, `vtp-fast encode`) and their reconstructions with
PSNR (`reconstruct`, `vtp-fast reconstruct`). The images named are sized from their headers before any work (the
unreadable ones warned about and skipped), made fit for the model (vtp_fast.data.images.Fitted: padded, cropped or
downscaled to multiples of the patch size, under a `Fit`) and batched by fitted size; images above PIXEL_BUDGET are
announced first, with the time they will take (vtp_fast.eval.timing). Every batch runs in a worker thread
(`forward`), so that Ctrl-C or SIGTERM stop the caller at once, even inside one long native operation.

    fit = Fit(resize="fit", max_side=1024)
    done = reconstruct(model, ["photos/"], "out/", fit)  # out/NAME_recon.png per image, grid.png when they fit one
    latents, index, skipped = encode(model, ["photos/"], fit)
    save_latents("latents.safetensors", latents, index, checkpoint="VTP-L-f16d64", resize=fit.resize)
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm import tqdm

from vtp_fast.config import InputError
from vtp_fast.data import images as image_files
from vtp_fast.data.images import Fitted, ImageError
from vtp_fast.eval.metrics import psnr
from vtp_fast.eval.timing import ERROR, ForwardTime
from vtp_fast.io import atomic_path, temp_dir

if TYPE_CHECKING:
    from vtp_fast.models.vtp import VTP

PIXEL_BUDGET = 4_000_000  # pixels per image above which the time it will take is estimated and said first
GRID_MAX = 64  # images a reconstruction grid shows at most
FORWARD = "vtp-fast forward"  # the worker thread's name

Sized = list[tuple[Path, tuple[int, int]]]  # (path, (W, H)) per image, ordered by size


@dataclass(frozen=True)
class Fit:
    """How images are made fit for the model (vtp_fast.data.images.Fitted): `resize` "pad", "crop" or "fit" (the
    longer side downscaled to `max_side`, then padded), or instead `size` (shorter side to it, centre-cropped square,
    a multiple of the patch size); `batch` images of one fitted size at a time."""

    resize: str = "pad"
    size: int | None = None
    max_side: int = 1024
    batch: int = 16


def sized_images(images: Sequence[str | Path], patch: int, size: int | None, skipped: list[Path]) -> Sized:
    """The images named (files, folders searched recursively) with their (W, H), read from the headers only and
    ordered by size (`read_sizes`: unreadable ones warned about and added to `skipped`), before any work starts."""
    if size is not None and (size < patch or size % patch):
        lo = max(patch, size // patch * patch)
        raise InputError(f"--size {size}: must be a multiple of the patch size {patch} (e.g. {lo} or {lo + patch})")
    paths = image_files.find_images(list(images))
    if len(paths) != len(images):
        print(f"{len(paths)} images found in {len(images)} path(s)")
    sized = image_files.read_sizes(paths, skipped)
    if not sized:
        raise ImageError(f"none of the {len(paths)} images could be read")
    return sized


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def warn_large(model: VTP, sized: Sized, fit: Fit, patch: int, decode: bool = True) -> None:
    """Say, before starting, which images are above PIXEL_BUDGET as the model sees them and about how long they will
    take (vtp_fast.eval.timing: modelled attention and per-token work, calibrated on the device)."""
    large = [(p, image_files.fitted_size(wh, patch, fit.resize, fit.size, fit.max_side)) for p, wh in sized]
    large = [(p, wh) for p, wh in large if wh[0] * wh[1] > PIXEL_BUDGET]
    if not large:
        return
    timing = ForwardTime(model, decode)
    total = sum(timing.seconds((w // patch) * (h // patch)) for _, (w, h) in large)
    names = ", ".join(f"{p.name} ({w}x{h})" for p, (w, h) in large[:3]) + (" ..." if len(large) > 3 else "")
    warnings.warn(f"{len(large)} image(s) above {PIXEL_BUDGET / 1e6:.0f} MP as the model sees them: {names}; about "
                  f"{_duration(total)} on {model.pixel_mean.device.type} (expected within a factor of {ERROR:g}: "
                  f"{_duration(total / ERROR)} to {_duration(total * ERROR)}, with the machine to itself) for those "
                  f"(--resize fit --max-side 1024 downscales them first)", stacklevel=2)


def image_batches(model: VTP, images: Sequence[str | Path], fit: Fit, decode: bool
                  ) -> tuple[Iterator[tuple[list[tuple[Path, Fitted]], Tensor]], list[Path]]:
    """The named images made fit for `model` (`vtp_fast.data.images.fitted_batches`), each batch stacked on its
    device: (group, pixels (B, 3, H, W) in [0, 1]), with a progress bar; and the list of the images skipped
    (unreadable), filled as they are met. Every header is read, and large images announced (their cost with a decode
    when `decode`: a reconstruction), before this returns."""
    patch = model.config.vision_patch_size
    skipped: list[Path] = []
    sized = sized_images(images, patch, fit.size, skipped)
    warn_large(model, sized, fit, patch, decode=decode)

    def stacked():
        done = 0
        with tqdm(total=len(sized), desc="reconstruct" if decode else "encode", unit="img",
                  disable=len(sized) < 2) as bar:
            for group in image_files.fitted_batches(sized, patch, fit.resize, fit.size, fit.max_side, fit.batch,
                                                    skipped):
                yield group, torch.stack([f.pixels for _, f in group]).to(model.pixel_mean.device)
                done += len(group)
                bar.update(len(group))
        if not done:
            raise ImageError(f"none of the {len(skipped)} images could be read")

    return stacked(), skipped


def forward(fn: Callable[[], Any]) -> Any:
    """fn() under inference mode in a worker thread while this one waits in short steps, so that Ctrl-C or SIGTERM
    stop the caller at once, even inside one long native operation (attention over a large image runs for minutes on
    a CPU): the command line then ends the process without waiting for that operation (`forward_running`)."""
    result: dict = {}

    def run():
        try:
            with torch.inference_mode():
                result["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            result["error"] = e
        finally:
            worker.done.set()

    worker = threading.Thread(target=run, name=FORWARD, daemon=True)
    worker.done = threading.Event()  # not is_alive(): a join() interrupted by Ctrl-C marks the thread stopped
    worker.start()
    while not worker.done.wait(0.1):
        pass
    if "error" in result:
        raise result["error"]
    return result["out"]


def forward_running() -> bool:
    """Whether a `forward` is still inside its operation (its caller was interrupted)."""
    return any(t.name == FORWARD and not t.done.is_set() for t in threading.enumerate())


@dataclass(frozen=True)
class Reconstructed:
    rows: list[tuple[Path, str, float]]  # per image: its path, the file written in `out`, PSNR (dB)
    no_grid: str | None  # why there is no out/grid.png (None: there is)
    skipped: list[Path]  # the images that could not be read


def reconstruct(model: VTP, images: Sequence[str | Path], out: str | Path, fit: Fit) -> Reconstructed:
    """Each image encoded and decoded, written to out/NAME_recon.png in its input's geometry (`Fitted.restore`), its
    PSNR against the fitted original; out/grid.png (originals above, reconstructions below) when the images have one
    size and are at most GRID_MAX. Each file appears in `out` whole (staged in a temporary folder beside it)."""
    from vtp_fast.plots import image_grid

    stacked, skipped = image_batches(model, images, fit, decode=True)
    out = Path(out)
    rows, shown = [], []
    with temp_dir(out, prefix=".reconstruct-", perms=0o700) as staging:
        for group, x in stacked:
            rec = forward(lambda x=x: model.denormalize(model.decode(model.encode(model.normalize(x)))).float()
                          .clamp(0, 1).cpu())  # (B, 3, H, W) in [0, 1]
            for (path, fitted), r, original in zip(group, rec, x.cpu(), strict=True):
                r, original = fitted.restore(r), fitted.restore(original)
                name = f"{path.stem}_recon.png"
                image_files.save_image(r, staging / name)
                rows.append((path, name, psnr(r[None], original[None]).item()))
                shown.append((original, r))
        same = len({tuple(o.shape) for o, _ in shown}) == 1
        no_grid = ("the images differ in size (--size N gives them one)" if not same else
                   f"{len(shown)} images (a grid shows at most {GRID_MAX})" if len(shown) > GRID_MAX else None)
        if no_grid is None:
            image_grid([torch.stack([o for o, _ in shown]), torch.stack([r for _, r in shown])],
                       staging / "grid.png")
        for f in staging.iterdir():
            os.replace(f, out / f.name)
    return Reconstructed(rows, no_grid, skipped)


def encode(model: VTP, images: Sequence[str | Path], fit: Fit) -> tuple[dict[str, Tensor], list[dict], list[Path]]:
    """The images' latents, one float32 tensor (N, C, h, w) per latent size: "latents" when there is one size, else
    "latents.{h}x{w}"; the index, per image read: {"file", "key", "row", "size": its (W, H), "box": its content's
    (top, left, height, width) in the padded grid, or None}; and the images skipped (unreadable)."""
    groups: dict[str, list[Tensor]] = {}  # "hxw" of the latents -> their (C, h, w) tensors
    index = []
    stacked, skipped = image_batches(model, images, fit, decode=False)
    for group, x in stacked:
        z = forward(lambda x=x: model.encode(model.normalize(x)).float().cpu())  # (B, C, h, w)
        key = f"{z.shape[2]}x{z.shape[3]}"
        for (path, fitted), latent in zip(group, z, strict=True):
            index.append({"file": str(path), "key": key, "row": len(groups.setdefault(key, [])),
                          "size": list(fitted.original), "box": fitted.box})
            groups[key].append(latent)
    name = (lambda k: "latents") if len(groups) == 1 else (lambda k: f"latents.{k}")  # noqa: E731
    tensors = {name(k): torch.stack(v).contiguous() for k, v in groups.items()}
    for row in index:
        row["key"] = name(row["key"])
    return tensors, index, skipped


def save_latents(out: str | Path, tensors: dict[str, Tensor], index: list[dict], checkpoint: str,
                 resize: str) -> None:
    """`encode`'s result as one safetensors file, written atomically; its metadata holds the index ("files", JSON),
    the tokenizer ("checkpoint") and how the images were fitted ("resize": the mode, or the --size)."""
    from safetensors.torch import save_file

    with atomic_path(Path(out)) as tmp:
        save_file(tensors, str(tmp), metadata={"files": json.dumps(index), "checkpoint": checkpoint,
                                               "resize": resize})

"""Reading and writing image files for the CLI and evaluation (PIL)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from vtp_fast.config import UserError
from vtp_fast.constants import normalize


class ImageError(UserError, ValueError):
    """An image file cannot be used; the message names the file."""


def has_alpha(img: Image.Image) -> bool:
    """Whether an (opened, not necessarily loaded) image has transparency: an alpha channel (RGBA, LA, PA) or a
    transparent colour (palette or colour-key tRNS)."""
    return img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency (RGBA, LA, palette or colour-key) composited on white, 16-bit and CMYK
    converted. The one alpha rule of every decoder (the DALI and nvJPEG paths get such images from here)."""
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode == "P":
        img = img.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / (256.0 if arr.max() > 255 else 1.0), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


@contextmanager
def _opened(source: str | Path | bytes, name: str | None = None) -> Iterator[Image.Image]:
    """PIL's Image.open of an image file or encoded bytes; what fails in the block is an ImageError naming it."""
    name = name or str(source if not isinstance(source, bytes) else "<bytes>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as img:
                yield img
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: unreadable image ({type(e).__name__}: {e})") from None


def open_rgb(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """An image file or encoded image bytes -> an RGB PIL image (see `to_rgb`); ImageError naming the file."""
    with _opened(source, name) as img:
        img.load()
        return to_rgb(img)


def image_size(path: str | Path) -> tuple[int, int]:
    """(W, H) of an image file, from its header (nothing decoded); ImageError naming the file."""
    with _opened(path) as img:
        return img.size


def as_uint8(img: Image.Image) -> Tensor:
    """RGB PIL image -> (3, H, W) uint8."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> (3, H, W) float32 in [0, 1]."""
    return as_uint8(img).float() / 255.0


def plain_image(img: Tensor, size: int) -> Tensor:
    """The plain image of every decoder (PIL, DALI, nvJPEG: they differ only in the pixels they hand in here):
    (3, H, W) uint8 on any device -> (3, size, size) uint8, the centred square of side min(H, W) (offsets rounded
    down) resized with the antialiased bilinear filter (PIL's BILINEAR: a triangle widened when shrinking).

    Cropping before resizing scales both axes by the same factor, needs no rounding of a resized long side, and
    keeps work and memory at the square's size whatever the aspect (a 20 x 2000 strip is not upscaled whole).
    On the CPU the filter runs on the uint8 pixels (PIL's fixed point, the fast kernel); CUDA has no uint8 kernel,
    so a GPU resizes in float32 and rounds. The filter's weights are non-negative (no overshoot to clamp), so the
    two agree to 1 level."""
    h, w = img.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = img[None, :, top:top + side, left:left + side]  # (1, 3, side, side)
    if side == size:
        return x[0].contiguous()
    if x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)  # the layout the uint8 kernel is fast on
        return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)[0]
    try:
        y = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
    except RuntimeError:  # CUDA's antialiased kernel runs out of shared memory when shrinking ~90x or more
        return plain_image(img.cpu(), size).to(img.device)
    return y[0].round().clamp(0, 255).to(torch.uint8)  # (3, size, size)


def normalize_u8(images: Tensor) -> Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 in the normalised space (`vtp_fast.constants.normalize`)."""
    return normalize(images.permute(0, 3, 1, 2))  # (B, S, S, 3) -> (B, 3, S, S)


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """RGB PIL image -> its size x size plain image (`plain_image`), as a PIL image."""
    return Image.fromarray(plain_image(as_uint8(img), size).permute(1, 2, 0).numpy())  # (3, S, S) -> (S, S, 3)


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (guided-diffusion's `center_crop_arr`, the protocol of the ImageNet generation benchmarks
    and of the reference batches gFID is measured against): RGB PIL image -> size x size RGB PIL image.
    While the shorter side is at least 2 * size, both sides are halved (floored) with the BOX filter; then the image
    is resized with BICUBIC so the shorter side is `size` (the longer one rounded); then the centred square is cut
    (offsets rounded down)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) floats in [0, 1] -> (..., H, W, 3) uint8 (clamped, rounded)."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def save_image(image: Tensor, path: str | Path) -> None:
    """(3, H, W) floats in [0, 1] -> a PNG file."""
    Image.fromarray(to_uint8(image)).save(path)


# ------------------------------------------------------------------------------------- images of any size
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def find_images(paths: list[str | Path]) -> list[Path]:
    """Image files, and the image files under folders (recursively, sorted; hidden names skipped). A path that is
    neither, or a folder without images, is an ImageError."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not inside:
                raise ImageError(f"{p}: a folder without images ({', '.join(IMAGE_SUFFIXES)})")
            found += inside
        elif p.exists() or p.suffix:
            found.append(p)
        else:
            raise ImageError(f"{p}: no such file or folder")
    return found


def downscaled_size(wh: tuple[int, int], short_side: int | None = None,
                    max_side: int | None = None) -> tuple[int, int]:
    """(W, H) after downscaling `wh` (keeping the aspect, never up) so that the shorter side is at most
    `short_side` and the longer at most `max_side` (None: no bound)."""
    w, h = wh
    scale = min(1.0, short_side / min(w, h) if short_side else 1.0, max_side / max(w, h) if max_side else 1.0)
    return (w, h) if scale == 1.0 else (max(1, round(w * scale)), max(1, round(h * scale)))


def downscale(img: Image.Image, short_side: int | None = None, max_side: int | None = None) -> Image.Image:
    """`img` resized (bicubic) to `downscaled_size`; itself when that is its size."""
    size = downscaled_size(img.size, short_side, max_side)
    return img if size == img.size else img.resize(size, Image.BICUBIC)


def fitted_size(wh: tuple[int, int], patch: int, resize: str = "pad", size: int | None = None,
                max_side: int = 1024) -> tuple[int, int]:
    """(W, H) of `Fitted(image of size wh, ...).pixels`, from the size alone (no decoding)."""
    if size is not None:
        return size, size
    w, h = downscaled_size(wh, max_side=max_side) if resize == "fit" else wh
    if resize == "crop":
        return max(patch, w // patch * patch), max(patch, h // patch * patch)
    return -(-w // patch) * patch, -(-h // patch) * patch


class Fitted:
    """An image made fit for a model of patch size `patch`: `pixels` (3, H', W') in [0, 1] with H', W' multiples
    of the patch (`fitted_size`), and `restore`, which turns the model's output at that size back into the input's
    geometry.

    resize "pad"   reflect-pad each side to the next multiple (split evenly); restore crops the padding off, so a
                   reconstruction has the input's size exactly
           "crop"  centre-crop each side to the previous multiple (at most patch - 1 pixels lost per side);
                   restore is the identity (the output is the cropped size)
           "fit"   downscale (keeping the aspect) so the longer side is at most `max_side`, then pad as "pad";
                   restore crops the padding (the output has the downscaled size)
    `size` instead: shorter side resized to `size` and centre-cropped to size x size (one size for all)."""

    def __init__(self, img: Image.Image, patch: int, resize: str = "pad", size: int | None = None,
                 max_side: int = 1024):
        self.original = img.size  # (W, H)
        self.box: tuple[int, int, int, int] | None = None  # (top, left, height, width) of the content
        if size is not None:
            self.pixels = to_tensor(center_crop_resize(img, size))
            return
        ww, hh = fitted_size(img.size, patch, resize, max_side=max_side)
        x = to_tensor(downscale(img, max_side=max_side) if resize == "fit" else img)
        h, w = x.shape[1:]
        if resize == "crop":
            if hh > h or ww > w:  # smaller than one patch: nothing to crop to
                raise ImageError(f"{w}x{h}: smaller than one patch ({patch} px); use --resize pad")
            top, left = (h - hh) // 2, (w - ww) // 2
            self.pixels = x[:, top:top + hh, left:left + ww]
            return
        ph, pw = hh - h, ww - w
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # left, right, top, bottom
        mode = "reflect" if ph < h and pw < w else "replicate"  # reflect needs padding < the side
        self.pixels = torch.nn.functional.pad(x[None], pad, mode=mode)[0] if ph or pw else x
        self.box = (pad[2], pad[0], h, w)

    def restore(self, out: Tensor) -> Tensor:
        """(3, H', W') model output -> the geometry of the input (see the class)."""
        if self.box is None:
            return out
        top, left, h, w = self.box
        return out[..., top:top + h, left:left + w]


def _skip(path: Path, error: ImageError, skipped: list[Path]) -> None:
    warnings.warn(f"{path}: {str(error).removeprefix(f'{path}: ')}; skipped", stacklevel=3)
    skipped.append(path)


def read_sizes(paths: list[Path], skipped: list[Path]) -> list[tuple[Path, tuple[int, int]]]:
    """(path, (W, H)) of every image, read from the headers only and ordered by size (so that equal sizes batch
    together). A missing file is an ImageError; an unreadable one warns, naming it, and joins `skipped`."""
    sized = []
    for p in paths:
        if not p.is_file():
            raise ImageError(f"{p}: no such file")
        try:
            sized.append((p, image_size(p)))
        except ImageError as e:
            _skip(p, e, skipped)
    return sorted(sized, key=lambda ps: (ps[1][1], ps[1][0]))


def fitted_batches(sized: list[tuple[Path, tuple[int, int]]], patch: int, resize: str, size: int | None,
                   max_side: int, batch: int, skipped: list[Path]) -> Iterator[list[tuple[Path, Fitted]]]:
    """Lists of (path, Fitted) of one fitted size, at most `batch` images each, from `read_sizes`' list, decoded as
    they come. An image that does not decode (or fit) warns, naming it, and joins `skipped`."""
    group: list = []
    for p, wh in sized:
        shape = fitted_size(wh, patch, resize, size, max_side)
        if group and (len(group) == batch or shape != group[0][2]):
            yield [(q, f) for q, f, _ in group]
            group = []
        try:
            group.append((p, Fitted(open_rgb(p), patch, resize, size, max_side), shape))
        except ImageError as e:
            _skip(p, e, skipped)
    if group:
        yield [(q, f) for q, f, _ in group]

"""Reading and writing image files for the CLI and evaluation (PIL)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from vtp_fast.config import UserError


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


def open_rgb(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """An image file or encoded image bytes -> an RGB PIL image (see `to_rgb`); ImageError naming the file."""
    name = name or str(source if not isinstance(source, bytes) else "<bytes>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as img:
                img.load()
                return to_rgb(img)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: unreadable image ({type(e).__name__}: {e})") from None


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic), then center-crop to size x size."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
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

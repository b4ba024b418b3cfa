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


def load_image(path: str | Path, size: int | None = None) -> Tensor:
    """An image file -> (3, H, W) float32 RGB in [0, 1]; with `size`, resized (shorter side) and center-cropped
    to size x size."""
    img = open_rgb(path)
    return to_tensor(center_crop_resize(img, size) if size is not None else img)


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

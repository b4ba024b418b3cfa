"""Image sets stored as arrays or folders, read a slice at a time (what vtp_fast.eval.adm embeds): an .npz with
``arr_0`` (guided-diffusion's sample and reference batches; ``images`` as written by ``vtp-fast sample`` is read
too) or an .npy of uint8 images, (N, H, W, 3) or (N, 3, H, W) (grey ones repeated to RGB), or a folder of image
files. Arrays are memory-mapped where stored uncompressed and decompressed chunk by chunk otherwise: only the batch
being read is ever in memory. ADM's precomputed Inception statistics stored beside the images (``mu``, ``sigma``,
``mu_s``, ``sigma_s``) are read too.
"""

from __future__ import annotations

import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vtp_fast.config import InputError
from vtp_fast.data.images import ImageError, as_uint8, find_images, open_rgb

IMAGE_KEYS = ("arr_0", "images")  # ADM's batches; vtp-fast sample's samples.npz
STAT_NAMES = ("mu", "sigma", "mu_s", "sigma_s")  # ADM's precomputed statistics (pool, then spatial features)


def _layout(shape: tuple[int, ...], name: str) -> str:
    if len(shape) == 3:
        return "nhw"
    if len(shape) == 4 and shape[3] in (1, 3):
        return "nhwc"
    if len(shape) == 4 and shape[1] in (1, 3):
        return "nchw"
    raise InputError(f"{name}: images must be (N, H, W, 3) (ADM's batches), (N, 3, H, W) or grey (N, H, W), "
                     f"got shape {shape}")


def _to_nchw(x: np.ndarray, layout: str) -> Tensor:
    """uint8 (b, H, W, C) / (b, C, H, W) / (b, H, W), C in {1, 3} -> uint8 (b, 3, H, W), contiguous."""
    t = torch.from_numpy(x)
    if layout == "nhw":
        t = t[:, None]  # (b, 1, H, W)
    elif layout == "nhwc":
        t = t.permute(0, 3, 1, 2)  # (b, H, W, C) -> (b, C, H, W)
    return t.expand(-1, 3, -1, -1).contiguous()


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream ``f``, which is left at the start of the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def _member_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """File offset of a stored zip member's first byte (after its local header)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise ValueError("damaged zip local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


class ArrayImages:
    """uint8 images in an .npz (``arr_0``, else ``images``) or .npy file, read a slice at a time: memory-mapped where
    stored uncompressed (``mapped``), else decompressed chunk by chunk. ``stats``: ADM's precomputed statistics
    found in the .npz ({"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}, those
    present). An .npz of statistics only is a set of 0 images."""

    skipped = 0

    def __init__(self, path: Path, what: str):
        self.path, self.name = path, f"{what} {path}"
        self.shape: tuple[int, ...] = (0, 0, 0)
        self.mapped, self.key, self.stats, self.n = None, None, {}, 0
        try:
            if path.suffix.lower() == ".npy":
                with open(path, "rb") as f:
                    self.shape, fortran, dtype = _npy_header(f)
                    offset = f.tell()
                self._open(dtype, fortran, offset)
            else:
                self._open_npz()
        except InputError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
            raise InputError(f"{self.name}: not a readable .npz / .npy file ({type(e).__name__}: {e})") from None

    def _open_npz(self) -> None:
        with zipfile.ZipFile(self.path) as z:
            names = set(z.namelist())
            self.key = next((k for k in IMAGE_KEYS if f"{k}.npy" in names), None)
            stat_names = [k for k in STAT_NAMES if f"{k}.npy" in names]
            if self.key is None and not stat_names:
                raise InputError(f"{self.name}: holds neither images ({' or '.join(IMAGE_KEYS)}) nor statistics "
                                 f"(mu, sigma); arrays: {sorted(n.removesuffix('.npy') for n in names)}")
            if self.key is not None:
                info = z.getinfo(f"{self.key}.npy")
                with z.open(info) as f:
                    self.shape, fortran, dtype = _npy_header(f)
                    self._header = f.tell()
                stored = info.compress_type == zipfile.ZIP_STORED
                self._open(dtype, fortran, _member_offset(self.path, info) + self._header if stored else None)
        if stat_names:
            with np.load(self.path) as z:
                self.stats = {k: np.asarray(z[k], dtype=np.float64) for k in stat_names}

    def _open(self, dtype: np.dtype, fortran: bool, offset: int | None) -> None:
        if dtype != np.uint8:
            raise InputError(f"{self.name}: images must be uint8 in [0, 255] (as ADM's batches), got {dtype}")
        self.layout = _layout(tuple(self.shape), self.name)
        self.n = int(self.shape[0])
        if offset is not None:
            self.mapped = np.memmap(self.path, np.uint8, "r", offset, tuple(self.shape), "F" if fortran else "C")
        elif fortran:
            raise InputError(f"{self.name}: a compressed Fortran-ordered array; save it C-ordered or uncompressed")

    def __len__(self) -> int:
        return self.n

    def batches(self, start: int, stop: int, batch_size: int):
        """uint8 (b <= batch_size, 3, H, W) tensors of images [start, stop), in order."""
        if stop <= start:
            return
        if self.mapped is not None:
            for i in range(start, stop, batch_size):
                yield _to_nchw(np.array(self.mapped[i:min(i + batch_size, stop)]), self.layout)  # a copy
            return
        row = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as z, z.open(f"{self.key}.npy") as f:
            skip = self._header + start * row
            while skip > 0:  # a compressed stream is read forward (a short file shows at the first batch)
                got = len(f.read(min(skip, 1 << 26)))
                skip = skip - got if got else 0
            for i in range(start, stop, batch_size):
                b = min(batch_size, stop - i)
                data = bytearray(f.read(b * row))
                if len(data) != b * row:
                    raise InputError(f"{self.name}: truncated array (image {i + len(data) // row} of {len(self)})")
                yield _to_nchw(np.frombuffer(data, np.uint8).reshape(b, *self.shape[1:]), self.layout)


class FolderImages:
    """The image files under a folder (recursively, sorted: vtp_fast.data.images.find_images), decoded to RGB one at
    a time; consecutive images of one size share a batch (the network resizes each to 299 itself). An unreadable
    file warns, naming it, and is counted in ``skipped``."""

    def __init__(self, path: Path, what: str = "images"):
        self.paths, self.skipped, self.stats, self.name = find_images([path]), 0, {}, f"{what} {path}"

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, start: int, stop: int, batch_size: int):
        """uint8 (b <= batch_size, 3, H, W) tensors of the readable images among [start, stop), in order."""
        pending: list[Tensor] = []
        for p in self.paths[start:stop]:
            try:
                img = as_uint8(open_rgb(p))  # (3, H, W)
            except ImageError as e:
                warnings.warn(f"{e}; skipped", stacklevel=2)
                self.skipped += 1
                continue
            if pending and (img.shape != pending[0].shape or len(pending) == batch_size):
                yield torch.stack(pending)
                pending = []
            pending.append(img)
        if pending:
            yield torch.stack(pending)


def open_image_set(path: str | Path, what: str = "images") -> ArrayImages | FolderImages:
    """A sample or reference set by path: an .npz / .npy file (:class:`ArrayImages`) or an image folder
    (:class:`FolderImages`). InputError naming ``what`` and the path when it cannot be one."""
    p = Path(path).expanduser()
    if p.is_dir():
        return FolderImages(p, what)
    if not p.is_file():
        raise InputError(f"{what} {p}: no such file or folder")
    if p.suffix.lower() in (".npz", ".npy"):
        return ArrayImages(p, what)
    raise InputError(f"{what} {p}: not an .npz / .npy file of images or an image folder")

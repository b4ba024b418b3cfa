"""Decoding: a batch's samples -> its normalised plain images and SSL views, behind one interface (`Decoder`), with
the decoder chosen once for a run (`pick_decoder`, from data.decoder):

  torchvision  PIL on the CPU (`PilDecoder`): decodes each sample as it is read, so an image it cannot decode is
               a bad sample there; also reads an in-memory set's pixels as they are
  nvjpeg       torchvision's nvJPEG on the GPU, views cut there (`vtp_fast.data.nvjpeg.NvjpegDecoder`)
  dali         NVIDIA DALI: `mixed` decoding on a GPU, CPU operators otherwise (`vtp_fast.data.dali.DaliDecoder`)

Every decoder cuts the plain image the same way (`vtp_fast.data.images.plain_image`) and takes its views' random
choices from the caller (`vtp_fast.data.views.sample_views`), so they differ only as their decoded pixels and
resampling do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from vtp_fast import optional
from vtp_fast.config import ConfigError
from vtp_fast.constants import normalize
from vtp_fast.data.images import normalize_u8, plain_image
from vtp_fast.data.pairs import Pair, PairSource
from vtp_fast.data.views import Crop, cut_views

DECODERS = ("torchvision", "nvjpeg", "dali")


class Decoder(Protocol):
    name: str  # its data.decoder value
    on_gpu: bool  # decodes on the GPU, in the training process (no DataLoader workers)

    def read(self, source: PairSource, i: int) -> Pair:
        """Sample i of `source` as this decoder takes it (encoded, or decoded by PIL); BadSample when unusable."""

    def decode(self, images: Sequence, size: int) -> Tensor:
        """A batch's `Pair.image`s -> (B, 3, size, size) float32 normalised plain images."""

    def views(self, images: Sequence, crops: Sequence[Sequence[Crop]]) -> tuple[Tensor, Tensor]:
        """crops[i][v]: view v of image i (2 global, then L local, the same sizes for every image) -> normalised
        global crops (2n, 3, G, G) and local crops (L n, 3, l, l), view-major; (0, 3, 1, 1) without local crops."""

    def reset(self) -> None:
        """Drop what a failed batch may have left broken (a DALI pipeline): rebuilt for the next batch."""


class PilDecoder:
    """The CPU path: samples decoded by PIL as they are read (`PairSource.pixels`), plain images and views cut in
    PyTorch. The reference the other decoders are tested against, and their fallback."""

    name, on_gpu = "torchvision", False

    def read(self, source: PairSource, i: int) -> Pair:
        return source.pixels(i)

    def decode(self, images: Sequence[Tensor], size: int) -> Tensor:
        """(3, H, W) uint8 images -> (B, 3, size, size) normalised plain images."""
        return normalize_u8(torch.stack([plain_image(x, size).permute(1, 2, 0) for x in images]))  # (B, S, S, 3)

    def views(self, images: Sequence[Tensor], crops: Sequence[Sequence[Crop]]) -> tuple[Tensor, Tensor]:
        return cut_views(images, crops)

    def reset(self) -> None:
        """Nothing to drop."""


class EncodedDecoder:
    """What DALI and nvJPEG share: samples are read encoded (`PairSource.encoded`) and decoded a batch at a time by
    the subclass's `decoded` (encoded images -> list of (3, H, W) uint8 on its device)."""

    def read(self, source: PairSource, i: int) -> Pair:
        return source.encoded(i)

    def decoded(self, encoded: Sequence[bytes]) -> list[Tensor]:
        raise NotImplementedError

    def decode(self, encoded: Sequence[bytes], size: int) -> Tensor:
        """Encoded images -> (B, 3, size, size) normalised plain images (`vtp_fast.data.images.plain_image`)."""
        return normalize(torch.stack([plain_image(x, size) for x in self.decoded(encoded)]))


def decoder_name(name: str = "auto", *, in_memory: bool = False) -> str:
    """The name of the decoder `pick_decoder` builds for data.decoder=`name` (nothing is built)."""
    if name != "auto" and name not in DECODERS:
        raise ConfigError(f"unknown decoder {name!r} (choices: auto, {', '.join(DECODERS)})")
    if in_memory:
        return PilDecoder.name
    if name == "auto":
        return "dali" if optional.available("dali") else "nvjpeg" if torch.cuda.is_available() else "torchvision"
    if name == "dali" and not optional.available("dali"):
        raise ConfigError(f"data.decoder: dali requested but unavailable ({optional.reason('dali')})")
    if name == "nvjpeg" and not torch.cuda.is_available():
        raise ConfigError("data.decoder: nvjpeg needs a CUDA device")
    return name


def pick_decoder(name: str = "auto", *, in_memory: bool = False, dali_device: str | None = None, threads: int = 2,
                 seed: int = 0, max_batch: int = 1) -> Decoder:
    """The decoder for data.decoder=`name`: "auto" takes DALI when importable, else nvJPEG when CUDA is available,
    else PIL; a decoder named but unavailable is a ConfigError; an in-memory set (`in_memory`) is read by PIL's path
    whatever the name. DALI runs on `dali_device` ("gpu" or "cpu"; None: "gpu" when CUDA is available) with
    `threads` threads and batches of up to `max_batch`."""
    name = decoder_name(name, in_memory=in_memory)
    if name == "dali":
        from vtp_fast.data.dali import DaliDecoder

        return DaliDecoder(max_batch, threads=threads, device=dali_device, seed=seed)
    if name == "nvjpeg":
        from vtp_fast.data.nvjpeg import NvjpegDecoder

        return NvjpegDecoder()
    return PilDecoder()

"""The torchvision GPU path: nvJPEG decoding (`torchvision.io.decode_jpeg(device="cuda")`), views cut on the GPU.

A `vtp_fast.data.decoders.Decoder` (data.decoder=nvjpeg); non-JPEG images are decoded by PIL and uploaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from vtp_fast.constants import pixel_stats
from vtp_fast.data.decoders import EncodedDecoder
from vtp_fast.data.images import as_uint8, open_rgb
from vtp_fast.data.views import Crop, cut_views


class NvjpegDecoder(EncodedDecoder):
    name = "nvjpeg"

    def __init__(self, device: str = "cuda"):
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.stats = pixel_stats(self.device)

    def reset(self) -> None:
        """Nothing to drop: every batch is decoded afresh."""

    def decoded(self, encoded: Sequence[bytes]) -> list[torch.Tensor]:
        """Encoded images -> list of (3, H, W) uint8 RGB on the device: JPEGs by nvJPEG (by torchvision's CPU
        decoder on a CPU device), others by PIL (`open_rgb`), uploaded."""
        jpeg = [i for i, e in enumerate(encoded) if e[:2] == b"\xff\xd8"]
        out: list[torch.Tensor | None] = [None] * len(encoded)
        if jpeg:
            data = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpeg]
            for i, img in zip(jpeg, decode_jpeg(data, device=self.device, mode=ImageReadMode.RGB), strict=True):
                out[i] = img
        return [as_uint8(open_rgb(e)).to(self.device) if x is None else x for x, e in zip(out, encoded, strict=True)]

    def views(self, encoded: Sequence[bytes], crops: Sequence[Sequence[Crop]]) -> tuple[torch.Tensor, torch.Tensor]:
        """crops[i][v]: view v of sample i -> normalised global and local crops, view-major (`view_major`)."""
        return cut_views(self.decoded(encoded), crops, self.stats)

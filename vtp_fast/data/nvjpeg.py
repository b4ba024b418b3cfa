"""The torchvision GPU path: nvJPEG decoding (`torchvision.io.decode_jpeg(device="cuda")`), views cut on the GPU.

Same interface as `vtp_fast.data.dali.DaliDecoder`; non-JPEG images are decoded by PIL and uploaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg

from vtp_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from vtp_fast.data.images import open_rgb, to_tensor
from vtp_fast.data.views import Crop, apply_crop

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


class NvjpegDecoder:
    def __init__(self, device: str = "cuda"):
        self.device = torch.device(device)
        self.mean, self.std = MEAN.to(self.device), STD.to(self.device)

    def _images(self, encoded: Sequence[bytes]) -> list[torch.Tensor]:
        """Encoded images -> list of (3, H, W) float in [0, 1] on the device (RGB)."""
        jpeg = [i for i, e in enumerate(encoded) if e[:2] == b"\xff\xd8"]
        out: list[torch.Tensor | None] = [None] * len(encoded)
        if jpeg:
            data = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpeg]
            decoded = decode_jpeg(data, device=self.device, mode=ImageReadMode.RGB)
            for i, img in zip(jpeg, decoded, strict=True):
                out[i] = img.float() / 255
        for i, e in enumerate(encoded):
            if out[i] is None:
                out[i] = to_tensor(open_rgb(e)).to(self.device)
        return out

    def decode(self, encoded: Sequence[bytes], size: int) -> torch.Tensor:
        """(B, 3, size, size) normalised: shorter side resized, center crop."""
        imgs = [TF.center_crop(TF.resize(img, size, antialias=True), [size, size]) for img in self._images(encoded)]
        return (torch.stack(imgs) - self.mean) / self.std

    def views(self, encoded: Sequence[bytes], crops: Sequence[Sequence[Crop]]) -> list[torch.Tensor]:
        imgs = self._images(encoded)
        return [(torch.stack([apply_crop(img, c[v]) for img, c in zip(imgs, crops, strict=True)]) - self.mean)
                / self.std for v in range(len(crops[0]))]

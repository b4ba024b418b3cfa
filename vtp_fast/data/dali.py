"""Decoding and views with NVIDIA DALI: `mixed` (nvJPEG) decoding on a GPU, CPU operators otherwise.

One pipeline definition serves both devices. Random choices are not DALI's: every crop box, flip and colour
factor comes from `vtp_fast.data.views.sample_views` (seeded per sample in Python) and is fed to DALI as
per-sample arguments, so the DALI path and the PIL fallback cut the same views and a resumed run sees the same
data. Two pipelines run per batch: decoding every sample, whose plain image is then cut by the function every
decoder shares (`vtp_fast.data.images.plain_image`, in PyTorch on the decoded pixels, handed over through DLPack),
and the SSL views of the first `ssl` samples (normalised CHW float tensors, through DLPack without a copy).
A `vtp_fast.data.decoders.Decoder` (data.decoder=dali).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vtp_fast import optional
from vtp_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from vtp_fast.data.decoders import EncodedDecoder
from vtp_fast.data.views import Crop, view_major

MEAN_255 = [m * 255 for m in IMAGENET_MEAN]  # DALI's normalisation takes the statistics as numbers
STD_255 = [s * 255 for s in IMAGENET_STD]


def dali_device() -> str:
    """'gpu' when DALI can use a CUDA device here, else 'cpu'."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def _to_torch(out) -> torch.Tensor:
    """A dense DALI TensorList -> torch tensor via DLPack (no copy)."""
    return torch.from_dlpack(out.as_tensor())


class DaliDecoder(EncodedDecoder):
    """decoded(encoded) -> list of (3, H, W) uint8; decode(encoded, image_size) -> (B, 3, S, S); views(encoded,
    crops) -> view-major global and local crops. Pipelines are built on first use, per process."""

    name = "dali"

    def __init__(self, max_batch: int, threads: int = 2, device: str | None = None, seed: int = 0):
        self.dali = optional.module("dali")
        self.device = device or dali_device()
        self.on_gpu = self.device == "gpu"
        self.max_batch, self.threads, self.seed = max_batch, threads, seed
        self.reset()

    def reset(self) -> None:
        """Drop the pipelines (after a failure: rebuilt on the next batch)."""
        self._decode: object | None = None
        self._views: dict[tuple[int, ...], object] = {}

    def _pipeline(self, builder):
        pipe = builder(batch_size=self.max_batch, num_threads=self.threads, seed=self.seed,
                       device_id=torch.cuda.current_device() if self.device == "gpu" else None, exec_dynamic=True,
                       prefetch_queue_depth=1)
        pipe.build()
        return pipe

    def _decoded(self, enc):
        fn, types = self.dali.fn, self.dali.types
        return fn.decoders.image(enc, device="mixed" if self.device == "gpu" else "cpu", output_type=types.RGB)

    def decoded(self, encoded: Sequence[bytes]) -> list[torch.Tensor]:
        """Encoded images -> list of (3, H, W) uint8 RGB (on the GPU with `mixed` decoding), views of DALI's
        buffers."""
        if self._decode is None:
            fn, types = self.dali.fn, self.dali.types

            @self.dali.pipeline_def
            def decode_only():
                return self._decoded(fn.external_source(name="enc", dtype=types.UINT8))

            self._decode = self._pipeline(decode_only)
        self._decode.feed_input("enc", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
        (out,) = self._decode.run()
        return [torch.from_dlpack(out[i]).permute(2, 0, 1) for i in range(len(encoded))]  # (H, W, 3) -> (3, H, W)

    def views(self, encoded: Sequence[bytes], crops: Sequence[Sequence[Crop]]) -> tuple[torch.Tensor, torch.Tensor]:
        """crops[i][v]: view v of sample i (same count and sizes for every sample) -> normalised global crops
        (2B, 3, G, G) and local crops (L B, 3, l, l), view-major (`vtp_fast.data.views.view_major`)."""
        sizes = tuple(c.size for c in crops[0])
        if sizes not in self._views:
            fn, types = self.dali.fn, self.dali.types

            @self.dali.pipeline_def
            def views():
                img = self._decoded(fn.external_source(name="enc", dtype=types.UINT8))
                outs = []
                for v, s in enumerate(sizes):
                    arg = {k: fn.external_source(name=f"{k}{v}", dtype=types.INT32 if k == "flip" else types.FLOAT)
                           for k in ("start", "end", "flip", "bri", "con", "sat")}
                    x = fn.resize(img, size=[s, s], roi_start=arg["start"], roi_end=arg["end"], roi_relative=False,
                                  antialias=True)
                    x = fn.flip(x, horizontal=arg["flip"])
                    x = fn.color_twist(x, brightness=arg["bri"], contrast=arg["con"], saturation=arg["sat"])
                    outs.append(fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=MEAN_255,
                                                         std=STD_255))
                return tuple(outs)

            self._views[sizes] = self._pipeline(views)
        pipe = self._views[sizes]
        pipe.feed_input("enc", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
        f32 = np.float32
        for v in range(len(sizes)):
            cs = [c[v] for c in crops]
            pipe.feed_input(f"start{v}", [np.array([c.top, c.left], f32) for c in cs])
            pipe.feed_input(f"end{v}", [np.array([c.top + c.height, c.left + c.width], f32) for c in cs])
            pipe.feed_input(f"flip{v}", [np.array(int(c.flip), np.int32) for c in cs])
            pipe.feed_input(f"bri{v}", [np.array(c.brightness, f32) for c in cs])
            pipe.feed_input(f"con{v}", [np.array(c.contrast, f32) for c in cs])
            pipe.feed_input(f"sat{v}", [np.array(c.saturation, f32) for c in cs])
        return view_major([_to_torch(o) for o in pipe.run()])  # per view (B, 3, s, s)

    def __getstate__(self):  # pipelines stay in the process that built them
        state = dict(self.__dict__)
        state["_decode"], state["_views"], state["dali"] = None, {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.dali = optional.module("dali")

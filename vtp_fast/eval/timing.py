"""How long the tokenizer will take on an image, said before it runs (`vtp-fast reconstruct` / `encode` on images
above 4 MP): a model of the forward's time at the image's token count n, calibrated on the model's device. Per
transformer block (the encoder's, and the pixel decoder's when decoding):

    time(n) = a n + b n^2
    b       attention (4 n^2 d FLOPs): the block's own attention (its backend, layout and RoPE) timed alone at n0
            tokens, over n0^2
    a       everything else (projections, MLP, norms): the whole block timed at n0 tokens, less b n0^2, over n0

n0 is the first of 1024, 2304, 4096, 9216 tokens at which the run takes LONG_ENOUGH, so that it times work rather
than per-operation overhead; attention's time per FLOP hardly changes past that. Each time is the fastest of a few
runs after an untimed one (first calls pay for allocation and kernel selection). On a CPU the runs use one thread
and count its CPU time, shared out over torch's threads: load from other processes stretches the time taken but not
the CPU time, so the estimate is the time with the machine to itself (a busy machine takes longer), the same from
one run to the next. Timing the whole model once, unwarmed, on all threads, at 64 and 256 tokens and extrapolating
a quadratic gave 1,607.5, 18.6 and 0.9 min for one 6000 x 4000 image in three runs. Patch embedding and output
projections are left out (under 1 % of the work at these sizes). Measured on 2 CPU cores (vtp-nano, vtp-tiny at 4
to 5 MP): within 10 % of the CPU time taken over the threads; expected within ERROR of it anywhere."""

from __future__ import annotations

import math
import time

import torch

from vtp_fast.nn.block import Views

ERROR = 2.0  # expected factor between an estimate and the time taken (or another run's estimate)
SIDES = (32, 48, 64, 96)  # patches a side of the calibration runs (1024 to 9216 tokens), the first long enough
LONG_ENOUGH = 0.05  # seconds: shorter runs time per-operation overhead more than work


def _fastest(fn, device: torch.device, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls of fn() (fewer when a call takes long), after one untimed call: on
    a GPU the time taken, on a CPU the CPU time of this thread (the caller runs torch on one thread), which
    whatever else runs on the machine does not stretch."""
    clock, sync = (time.perf_counter, torch.cuda.synchronize) if device.type == "cuda" else (time.thread_time, None)
    best = math.inf
    for i in range(repeats + 1):
        start = clock()
        fn()
        if sync is not None:
            sync()
        if i:
            best = min(best, clock() - start)
            if best > 5 * LONG_ENOUGH:
                break
    return best


def _first_long(seconds_at) -> tuple[int, float]:
    """(tokens, seconds) of `seconds_at(side)` at the first of SIDES that takes LONG_ENOUGH (else the last)."""
    for side in SIDES:
        took = seconds_at(side)
        if took >= LONG_ENOUGH:
            break
    return side * side, took


def _calibrate(part, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(seconds per token, seconds per token^2) of one block of `part` (the trunk, or the pixel decoder): its
    attention (the model's own backend, layout and RoPE) timed alone, then the whole block less that."""
    block = part.blocks[0]
    d = block.attn.qkv.in_features

    def runs(side: int):  # the block's attention alone, and the whole block, at side x side tokens
        qkv = torch.randn(1, side * side, 3 * d, device=device, dtype=dtype)  # (B, n, 3 d)
        x = torch.randn(1, side * side, d, device=device, dtype=dtype)  # (B, n, d)
        views = Views([part.rope_embed(side, side)])
        return (lambda: block.attn.attend(qkv, views.ropes[0])), (lambda: block([x], views))

    n, took = _first_long(lambda side: _fastest(runs(side)[0], device))
    b = took / n**2
    n, took = _first_long(lambda side: _fastest(runs(side)[1], device))
    return max(took - b * n**2, took / 10) / n, b


class ForwardTime:
    """The expected time of `model`'s forward (encode, and decode with `decode`) on its device, per image, with
    the device to itself: `seconds(tokens)`. Calibrating takes under a second on a GPU, a few seconds on a CPU."""

    def __init__(self, model, decode: bool = True):
        p = next(model.parameters())
        cpu = p.device.type != "cuda"
        threads = torch.get_num_threads()
        share = threads if cpu else 1  # a CPU: timed on one thread, run on all of them
        self.blocks: list[tuple[int, float, float]] = []  # (blocks, seconds per token, seconds per token^2)
        torch.set_num_threads(1 if cpu else threads)
        try:
            with torch.inference_mode():
                for part in [model.trunk] + ([model.pixel_decoder] if decode else []):
                    a, b = _calibrate(part, p.device, p.dtype)
                    self.blocks.append((len(part.blocks), a / share, b / share))
        finally:
            torch.set_num_threads(threads)

    def seconds(self, tokens: int) -> float:
        """Expected seconds of the forward of one image of `tokens` patches (within a factor of ERROR)."""
        return sum(depth * (a * tokens + b * tokens**2) for depth, a, b in self.blocks)

"""Commands of the tokenizer itself: `info` (what this machine runs: versions, device, backends), `reconstruct` and
`encode` (images of any size, through vtp_fast.eval.codec)."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from vtp_fast.cli.common import POSITIVE, TOKENIZER, Commands, codec_options, load_codec


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from vtp_fast import __version__, optional
    from vtp_fast.ops import default_device
    from vtp_fast.ops.registry import summary

    print(f"vtp_fast {__version__}  python {platform.python_version()}  torch {torch.__version__}"
          f"  (CUDA build {torch.version.cuda or 'none'})")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"device: {default_device()}  (GPU: {cuda})")
    from vtp_fast.threads import budget

    print(f"thread budget: {budget().describe()}")
    from vtp_fast.allocator import allocator_setting

    print(f"malloc: {allocator_setting()}")
    if optional.available("native"):
        native = optional.module("native")
        cuda_note = (f"CUDA sources compiled for {native.cuda_archs()}" if native.cuda_compiled()
                     else "CUDA sources not compiled")
        print(f"native extension vtp_fast._C: loaded, CPU ops registered; {cuda_note}")
    else:
        print(f"native extension vtp_fast._C: not loaded ({optional.reason('native')})")
    for name in optional.NAMES:
        if name != "native":
            print(f"  {name:10s} {'available' if optional.available(name) else optional.reason(name)}")
    if optional.triton_interpreter():
        print("  TRITON_INTERPRET=1: Triton kernels run on the CPU through the interpreter")
    from vtp_fast.data.decoders import decoder_name

    decoder = decoder_name("auto")
    cpu_only = decoder == "dali" and not torch.cuda.is_available()
    print(f"data decoder (auto, for shards): {decoder}" + (" (CPU operators)" if cpu_only else ""))
    device = args.device or default_device()
    print(f"ops on {device} (resolved backend; every backend's state):")
    rows = summary(device)
    width = max(len(row["op"]) for row in rows)
    for row in rows:
        states = ", ".join(f"{k}={v}" for k, v in row["backends"].items())
        print(f"  {row['op']:{width}s} -> {row['resolved']:10s} [{states}]")
        for backend, note in row["notes"].items():
            print(f"  {'':{width}s}    {backend}: {note}")
    return 0


def _skipped(skipped: list[Path], done: int) -> None:
    if skipped:
        print(f"{len(skipped)} of {len(skipped) + done} images skipped (unreadable, named above)", file=sys.stderr)


def _fit(args: argparse.Namespace):
    """--resize, --size, --max-side, --batch as given; Fit's defaults for those not given."""
    from vtp_fast.eval.codec import Fit

    given = {k: getattr(args, k) for k in ("resize", "size", "max_side", "batch")}
    return Fit(**{k: v for k, v in given.items() if v is not None})


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from vtp_fast.eval.codec import reconstruct

    fit = _fit(args)
    done = reconstruct(load_codec(args), args.images, args.out, fit)
    out = Path(args.out)
    for path, name, value in done.rows:
        print(f"{path}: PSNR {value:.2f} dB -> {out / name}")
    if done.no_grid is None:
        print(f"grid (originals above, reconstructions below): {out / 'grid.png'}")
    else:
        print(f"no grid: {done.no_grid}")
    _skipped(done.skipped, len(done.rows))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from vtp_fast.eval.codec import encode, save_latents

    fit = _fit(args)
    tensors, index, skipped = encode(load_codec(args), args.images, fit)
    save_latents(args.out, tensors, index, str(args.checkpoint), str(args.size or fit.resize))
    print(", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()) + f" -> {Path(args.out)}"
          + (" (one tensor per latent size; metadata 'files' maps each image to its key and row)"
             if len(tensors) > 1 else ""))
    _skipped(skipped, len(index))
    return 0


def add_commands(sub: Commands) -> None:
    p = sub.add_parser("info", help="versions, device, native extension, resolved op backends")
    p.add_argument("--device", choices=("cpu", "cuda"), help="resolve the ops for this device")
    p.set_defaults(func=cmd_info)

    for name, func, help_text in (("reconstruct", cmd_reconstruct, "encode + decode images, PSNR per image"),
                                  ("encode", cmd_encode, "encode images to latents in a safetensors file")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
        p.add_argument("--checkpoint", required=True, help=f"the tokenizer: {TOKENIZER}")
        p.add_argument("--out", required=True,
                       help="output directory" if name == "reconstruct" else "output .safetensors file")
        pad = ("reflect-pad, cropped back after decoding" if name == "reconstruct" else
               "reflect-pad; the metadata 'files' gives each image's content box in the padded grid")
        p.add_argument("--resize", choices=("pad", "crop", "fit"),
                       help=f"sizes that are not multiples of the patch size: pad ({pad}), crop (centre-crop to the "
                            "multiple below), fit (downscale to --max-side, then pad) (default: pad)")
        p.add_argument("--max-side", type=POSITIVE, help="--resize fit: the longest side, in pixels (default 1024)")
        p.add_argument("--size", type=int, help="instead of --resize: shorter side to SIZE, centre-cropped to SIZE x "
                                                "SIZE (a multiple of the patch size)")
        p.add_argument("--batch", type=POSITIVE, default=16, help="images of one size encoded at once")
        p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        codec_options(p)
        p.set_defaults(func=func)

"""Commands that judge a tokenizer by generation: `extract-latents` (a labelled set's latents), `train-dit` (a DiT
on them) and `sample` (images drawn from the DiT, decoded by the tokenizer); `eval` scores them (cli.evaluate)."""

from __future__ import annotations

import argparse

from vtp_fast.cli.common import POSITIVE, TOKENIZER, Commands, codec_options, ints, load_codec, load_model
from vtp_fast.config import InputError


def cmd_extract_latents(args: argparse.Namespace) -> int:
    from vtp_fast import distributed
    from vtp_fast.data.labelled import open_images
    from vtp_fast.eval.latents import extract_latents
    from vtp_fast.threads import apply_budget, budget

    if distributed.launched_distributed():  # under torchrun: every rank encodes its shards on its own GPU
        distributed.init_from_env()
    workers = apply_budget(budget(0, args.workers)).loader_workers
    model = load_codec(args)
    data = open_images(args.data, size=args.size or model.config.image_size)
    meta = extract_latents(model, data, args.out, flip=not args.no_flip, batch=args.batch, per_shard=args.per_shard,
                           dtype=args.dtype, workers=workers, tokenizer=str(args.checkpoint),
                           progress=distributed.rank() == 0)
    print(f"{meta['count']} latents {meta['channels']}x{meta['grid'][0]}x{meta['grid'][1]} of {data.name} "
          f"({len(meta['class_names'])} classes) -> {args.out}")
    return 0


def cmd_train_dit(args: argparse.Namespace) -> int:
    from vtp_fast.config import load_config
    from vtp_fast.train.config import DiTTrainConfig
    from vtp_fast.train.dit import train_dit

    overrides = list(args.overrides) + ([f"run.resume={args.resume}"] if args.resume else [])
    train_dit(load_config(DiTTrainConfig, args.config, overrides))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from vtp_fast import distributed
    from vtp_fast.downstream.sample import SampleSpec, class_ids, sample_images
    from vtp_fast.train.dit import load_dit

    if args.n is not None and args.per_class is not None:
        raise InputError(f"--n {args.n} and --per-class {args.per_class}: give one")
    distributed.init_from_env()  # under torchrun: join the group (this rank's GPU becomes the current device)
    tokenizer = load_model(args)
    dit, meta = load_dit(args.dit, device=next(tokenizer.parameters()).device)
    classes = class_ids(meta["class_names"], args.classes)
    spec = SampleSpec(n=args.n or (args.per_class or 8) * len(classes), classes=tuple(classes), steps=args.steps,
                      solver=args.solver, shift=args.shift, cfg_scale=args.cfg, cfg_interval=tuple(args.cfg_interval),
                      seed=args.seed, batch=args.batch, chunk=args.chunk, precision=args.precision)
    sample_images(dit, meta, tokenizer, args.out, spec, png=args.png)
    return 0


def _add_sample(sub: Commands) -> None:
    p = sub.add_parser("sample", help="sample images from a DiT, decoded with the tokenizer")
    p.add_argument("--dit", required=True, help="an exported DiT (<train-dit out_dir>/dit)")
    p.add_argument("--checkpoint", required=True, help=f"the tokenizer the latents came from: {TOKENIZER}")
    p.add_argument("--out", required=True, help="output directory: samples.npz (ADM format: arr_0 uint8 NHWC images, "
                                                "arr_1 labels), samples.json, grid.png; a second run resumes")
    p.add_argument("--classes", nargs="+", help="class names (default: every class)")
    p.add_argument("--n", "--num-samples", dest="n", type=POSITIVE,
                   help="images in all, class-balanced (sample i has class i mod K); under torchrun spell it "
                        "--num-samples (torchrun takes --n for an abbreviation of its own options)")
    p.add_argument("--per-class", type=POSITIVE, help="instead of --n: images per class (default 8)")
    p.add_argument("--steps", type=POSITIVE, default=50, help="ODE solver steps")
    p.add_argument("--solver", choices=("euler", "heun"), default="euler", help="ODE solver")
    p.add_argument("--shift", type=float, default=1.0, help="timestep shift")
    p.add_argument("--cfg", "--cfg-scale", dest="cfg", type=float, default=1.0,
                   help="classifier-free guidance scale (1: none)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("T_LO", "T_HI"),
                   help="apply guidance only for t in [T_LO, T_HI]")
    p.add_argument("--seed", type=int, default=0, help="noise seed (sample i's noise is seeded by seed and i)")
    p.add_argument("--batch", type=POSITIVE, default=64, help="images per batch (per rank)")
    p.add_argument("--chunk", type=POSITIVE, default=1000, help="images per resumable chunk file")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32", help="auto: bf16 on CUDA")
    p.add_argument("--png", action="store_true", help="also write one PNG per image to OUT/png")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_sample)


def add_commands(sub: Commands) -> None:
    p = sub.add_parser("extract-latents", help="encode a labelled image set (+ flipped copies) into latent shards; "
                                               "under torchrun each rank encodes its share; a killed run resumes")
    p.add_argument("--checkpoint", required=True, help=f"the tokenizer: {TOKENIZER}")
    p.add_argument("--data", default="emoji", help="emoji[:styles], fashion-mnist[:test], a folder tree (one folder "
                                                   "per class, as ImageNet's train/val) or a directory of WebDataset "
                                                   "shards with .cls labels")
    p.add_argument("--out", required=True, help="output directory (latent shards + meta.json); an unfinished one "
                                                "made with the same options is resumed")
    p.add_argument("--size", type=POSITIVE, help="image size: folders and shards cut by ADM's centre crop to SIZE x "
                                                 "SIZE, one size for the latent set (default: the tokenizer's)")
    p.add_argument("--batch", type=POSITIVE, default=128, help="images encoded at once")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="stored latents (bf16: half the disk)")
    p.add_argument("--per-shard", type=POSITIVE, default=4096, help="images per latent shard (the unit of resume)")
    p.add_argument("--workers", type=ints(0), help="decoding processes per rank (default: the thread budget's)")
    p.add_argument("--no-flip", action="store_true", help="skip the horizontally flipped copies")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    codec_options(p)
    p.set_defaults(func=cmd_extract_latents)

    p = sub.add_parser("train-dit", help="train a DiT on a latent set (rectified flow)")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) of differences, in order")
    p.add_argument("--resume", help="'auto' or a checkpoint directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. latents=runs/latents run.steps=4000")
    p.set_defaults(func=cmd_train_dit)

    _add_sample(sub)

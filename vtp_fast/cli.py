"""vtp-fast: pre-train VTP-style visual tokenizers (a ViT autoencoder trained with reconstruction, CLIP and
DINOv2-style self-supervision) and judge them by the images a diffusion model generates from their latents.

Start with README.md (quick start: `make train`, `make test`); `vtp-fast COMMAND --help` lists a command's options
with their defaults. Errors about your input print one line (VTP_FAST_DEBUG=1 shows the traceback)."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from vtp_fast.config import InputError
from vtp_fast.io import atomic_path, temp_dir
from vtp_fast.threads import prepare_openmp

# before anything loads torch (libgomp reads its wait settings when it loads): the imports above do not
# (tests/test_threads.py checks)
prepare_openmp()


def user_errors() -> tuple[type[BaseException], ...]:
    """The project's own errors about what the user handed it (arguments, configs, input files and data sets,
    checkpoints, a backend asked for by name, a diverged run), all `UserError`s: one line, no traceback (set
    VTP_FAST_DEBUG=1 for it). Nothing else: a plain ValueError or OSError is a bug (or the machine's problem) and
    shows its traceback."""
    from vtp_fast.config import UserError

    return (UserError,)


def _fail(message: str) -> int:
    print(f"vtp-fast: error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------------- info
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
    from vtp_fast.data.pairs import pick_decoder

    decoder = pick_decoder("auto")
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


# ---------------------------------------------------------------------------------------------- images io
PIXEL_BUDGET = 4_000_000  # pixels per image above which the time it will take is estimated and said first


def _model(args: argparse.Namespace):
    from vtp_fast.models.pretrained import load_pretrained
    from vtp_fast.train.common import pick_device

    model = load_pretrained(args.checkpoint, device=pick_device(args.device or "auto", option="--device"))
    return model.requires_grad_(False)


def _inputs(args: argparse.Namespace, patch: int) -> list[tuple[Path, tuple[int, int]]]:
    """The images named (files, folders searched recursively) with their (W, H), read from the headers only and
    ordered by size (so that equal sizes batch together); every header is checked before any work starts."""
    from PIL import Image

    from vtp_fast.data.images import ImageError, find_images, open_rgb

    if args.size is not None and (args.size < patch or args.size % patch):
        lo = max(patch, args.size // patch * patch)
        raise InputError(f"--size {args.size}: must be a multiple of the patch size {patch} (e.g. {lo} or "
                         f"{lo + patch})")
    paths = find_images(args.images)
    if len(paths) != len(args.images):
        print(f"{len(paths)} images found in {len(args.images)} path(s)")
    sized = []
    for p in paths:
        try:
            with Image.open(p) as img:
                sized.append((p, img.size))
        except Exception:  # noqa: BLE001 - open_rgb says what is wrong with it, naming the file
            open_rgb(p)
            raise ImageError(f"{p}: unreadable image") from None
    return sorted(sized, key=lambda ps: (ps[1][1], ps[1][0]))


def _warn_large(model, sized, args: argparse.Namespace, patch: int) -> None:
    """Say, before starting, which images are above PIXEL_BUDGET and about how long they will take (from two
    timed calibration runs: time = a * tokens + b * tokens^2, attention being quadratic)."""
    import time

    import torch

    from vtp_fast.data.images import fitted_size

    large = [(p, fitted_size(wh, patch, args.resize, args.size, args.max_side)) for p, wh in sized]
    large = [(p, wh) for p, wh in large if wh[0] * wh[1] > PIXEL_BUDGET]
    if not large:
        return
    times = []
    for side in (8 * patch, 16 * patch):
        x = torch.zeros(1, 3, side, side, device=model.pixel_mean.device)
        with torch.inference_mode():
            start = time.perf_counter()
            model.decode(model.encode(x))
            times.append(time.perf_counter() - start)
    n1, n2 = 64, 256  # tokens of the two runs
    b = max(0.0, (times[1] / n2 - times[0] / n1) / (n2 - n1))
    a = max(0.0, times[0] / n1 - b * n1)
    total = 0.0
    for _, (w, h) in large:
        n = (w // patch) * (h // patch)
        total += a * n + b * n * n
    names = ", ".join(f"{p.name} ({w}x{h})" for p, (w, h) in large[:3]) + (" ..." if len(large) > 3 else "")
    print(f"warning: {len(large)} image(s) above {PIXEL_BUDGET / 1e6:.0f} MP as the model sees them: {names}; "
          f"about {total / 60:.1f} min on {model.pixel_mean.device.type} for those "
          f"(--resize fit --max-side 1024 downscales them first)", file=sys.stderr, flush=True)


def _batches(sized, args: argparse.Namespace, patch: int, batch: int):
    """Yield lists of (path, Fitted) of one fitted size, at most `batch` images each, decoding as they come."""
    from vtp_fast.data.images import Fitted, fitted_size, open_rgb

    group: list = []
    for p, wh in sized:
        shape = fitted_size(wh, patch, args.resize, args.size, args.max_side)
        if group and (len(group) == batch or shape != group[0][2]):
            yield [(q, f) for q, f, _ in group]
            group = []
        group.append((p, Fitted(open_rgb(p), patch, args.resize, args.size, args.max_side), shape))
    if group:
        yield [(q, f) for q, f, _ in group]


def _fitted_batches(model, args: argparse.Namespace, desc: str):
    """The named images made fit for `model` (`_batches`), each batch stacked on its device: (group, pixels), with
    a progress bar. Every header is read, and large images announced, before this returns."""
    import torch
    from tqdm import tqdm

    patch = model.config.vision_patch_size
    sized = _inputs(args, patch)
    _warn_large(model, sized, args, patch)

    def batches():
        with tqdm(total=len(sized), desc=desc, unit="img", disable=len(sized) < 2) as bar:
            for group in _batches(sized, args, patch, args.batch):
                yield group, torch.stack([f.pixels for _, f in group]).to(model.pixel_mean.device)
                bar.update(len(group))

    return batches()


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from vtp_fast.data.images import save_image
    from vtp_fast.eval.metrics import psnr
    from vtp_fast.plots import image_grid

    model = _model(args)
    batches = _fitted_batches(model, args, "reconstruct")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, shown = [], []
    with temp_dir(out, prefix=".reconstruct-", perms=0o700) as staging:  # each file is moved into `out` whole
        for group, x in batches:
            with torch.inference_mode():
                rec = model.denormalize(model.decode(model.encode(model.normalize(x)))).clamp(0, 1).cpu()
            for (path, fitted), r, original in zip(group, rec, x.cpu(), strict=True):
                r, original = fitted.restore(r), fitted.restore(original)
                name = f"{path.stem}_recon.png"
                save_image(r, staging / name)
                rows.append((path, name, psnr(r[None], original[None]).item()))
                shown.append((original, r))
        same = len({tuple(o.shape) for o, _ in shown}) == 1
        if same and len(shown) <= 64:
            image_grid([torch.stack([o for o, _ in shown]), torch.stack([r for _, r in shown])],
                       staging / "grid.png")
        for f in staging.iterdir():
            os.replace(f, out / f.name)
    for path, name, value in rows:
        print(f"{path}: PSNR {value:.2f} dB -> {out / name}")
    if same and len(shown) <= 64:
        print(f"grid (originals above, reconstructions below): {out / 'grid.png'}")
    else:
        print("no grid: " + ("the images differ in size (--size N gives them one)" if not same else
                             f"{len(shown)} images (a grid shows at most 64)"))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    import json

    import torch
    from safetensors.torch import save_file

    model = _model(args)
    groups: dict[str, list] = {}  # "HxW" of the latents -> their tensors
    index = []  # per input file: (key, row, original W x H)
    for group, x in _fitted_batches(model, args, "encode"):
        with torch.inference_mode():
            z = model.encode(model.normalize(x)).cpu()
        key = f"{z.shape[2]}x{z.shape[3]}"
        for (path, fitted), latent in zip(group, z, strict=True):
            index.append({"file": str(path), "key": key, "row": len(groups.setdefault(key, [])),
                          "size": list(fitted.original), "box": fitted.box})
            groups[key].append(latent)
    name = (lambda k: "latents") if len(groups) == 1 else (lambda k: f"latents.{k}")  # noqa: E731
    tensors = {name(k): torch.stack(v).contiguous() for k, v in groups.items()}
    for row in index:
        row["key"] = name(row["key"])
    out = Path(args.out)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"files": json.dumps(index), "checkpoint": str(args.checkpoint),
                                               "resize": str(args.size or args.resize)})
    print(", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()) + f" -> {out}"
          + (" (one tensor per latent size; metadata 'files' maps each image to its key and row)"
             if len(tensors) > 1 else ""))
    return 0


# ---------------------------------------------------------------------------------------------- training
def cmd_export(args: argparse.Namespace) -> int:
    from vtp_fast.train.checkpoint import export

    out = export(args.checkpoint, args.out)
    print(f"tokenizer of {args.checkpoint} -> {out} (the published layout: load_pretrained reads it)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from vtp_fast.config import load_config
    from vtp_fast.io import atomic_write_text
    from vtp_fast.train import planner
    from vtp_fast.train.config import PretrainConfig

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    plan = planner.plan(cfg, args.gpus, args.gpu)
    text = planner.report(plan)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text)
    planner.check(plan)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from vtp_fast.config import load_config
    from vtp_fast.downstream.generative_probe import generative_probe
    from vtp_fast.eval.evaluate import held_out_scores
    from vtp_fast.train.config import PretrainConfig
    from vtp_fast.train.pretrain import pretrain

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    if args.init:
        overrides.append(f"model.init={args.init}")
    pretrain(load_config(PretrainConfig, args.config, overrides), held_out_scores, generative_probe)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from vtp_fast.config import load_config
    from vtp_fast.train.config import PretrainConfig
    from vtp_fast.train.profile import profile

    profile(load_config(PretrainConfig, args.config, args.overrides), steps=args.steps, warmup=args.warmup,
            out=args.out, trace=args.trace)
    return 0


def cmd_extract_latents(args: argparse.Namespace) -> int:
    from vtp_fast.data.labelled import load_images
    from vtp_fast.eval.latents import extract_latents

    model = _model(args)
    data = load_images(args.data, size=args.size or model.config.image_size)
    meta = extract_latents(model, data, args.out, flip=not args.no_flip, batch=args.batch,
                           tokenizer=str(args.checkpoint))
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
    import numpy as np
    import torch

    from vtp_fast.plots import image_grid
    from vtp_fast.train.dit import generate, load_dit

    tokenizer = _model(args)
    dit, meta = load_dit(args.dit, device=next(tokenizer.parameters()).device)
    classes = meta["class_names"]
    if args.classes:
        unknown = [c for c in args.classes if c not in classes]
        if unknown:
            raise InputError(f"unknown classes {unknown}; this DiT knows: {', '.join(classes)}")
        chosen = [classes.index(c) for c in args.classes]
    else:
        chosen = list(range(max(1, len(classes))))
    labels = torch.tensor(chosen).repeat_interleave(args.per_class)
    images = generate(dit, meta, tokenizer, labels, steps=args.steps, solver=args.solver, shift=args.shift,
                      cfg_scale=args.cfg, cfg_interval=tuple(args.cfg_interval), seed=args.seed, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [images[i * args.per_class:(i + 1) * args.per_class] for i in range(len(chosen))]
    image_grid(rows, out / "grid.png")
    np.savez_compressed(out / "samples.npz", images=(images.mul(255).round().to(torch.uint8)).numpy(),
                        labels=labels.numpy(), class_names=np.array(classes))
    print(f"{len(images)} samples ({args.solver}, {args.steps} steps, shift {args.shift}, cfg {args.cfg}) -> "
          f"{out / 'grid.png'} (one row per class), {out / 'samples.npz'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import torch

    from vtp_fast.data.labelled import load_images
    from vtp_fast.eval import evaluate

    needed = "--samples" if args.what == "gfid" else "--checkpoint"
    if getattr(args, needed.lstrip("-")) is None:
        raise InputError(f"eval {args.what} needs {needed}")
    data = load_images(args.data, size=args.size)
    if args.what == "gfid":
        npz = np.load(args.samples)
        samples = torch.from_numpy(npz["images"])
        result = evaluate.generation_scores(samples, data, args.n)
    else:
        model = _model(args)
        if args.what == "rfid":
            result = evaluate.reconstruction_scores(model, data, args.n)
        elif args.what == "zeroshot":
            result = evaluate.zero_shot_scores(model, data)
        else:
            test = load_images(args.test_data, size=args.size)
            result = evaluate.linear_probe_scores(model, data, test)
    print(json.dumps({"eval": args.what, "data": data.name, **result}, indent=1))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    import json

    from vtp_fast.study import dry_run, load_study, run_study
    from vtp_fast.study.plan import gpu_plan, plan_markdown

    cfg = load_study(args.config, args.overrides)
    if not args.dry_run:
        run_study(cfg, args.out or "runs/study")
        return 0
    plan = gpu_plan(cfg)
    out = run_study(dry_run(cfg), args.out or "runs/study-dry-run",
                    note="A dry run: every stage at tiny shapes (the numbers mean nothing).")
    print(f"\n{plan_markdown(plan)}")
    (out / "gpu_plan.json").write_text(json.dumps(plan, indent=1))
    return 0


def bench_dir() -> Path:
    """bench/ of the source tree this package runs from (benchmarks are not installed with the package)."""
    path = Path(__file__).resolve().parents[1] / "bench"
    if not path.is_dir():
        raise InputError(f"{path}: the benchmarks live in the source tree's bench/; run from a checkout")
    return path


def cmd_bench(args: argparse.Namespace) -> int:
    if getattr(args, "model", False):  # the performance model beside measured rows (--report, else the newest h200)
        from vtp_fast.perf_model import report

        print(report(args.report, bench_dir() / "results" / "h200"))
        return 0
    import importlib.util

    import torch

    from vtp_fast.benchmark import markdown_table, read_rows, row_writer

    if args.report:
        rows, broken = read_rows(args.report)
        columns = [c for c in ("bench", "op", "case", "pass", "mode", "device", "backend", "shape", "dtype",
                               "median_ms", "gb_per_s", "tflop_per_s", "images_per_s", "peak_mem_mb", "error",
                               "device_name", "git")
                   if any(c in r for r in rows)]
        print(markdown_table(rows, columns))
        if broken:
            print(f"\n({broken} unreadable line(s) skipped)")
        return 0
    names = sorted(p.stem.removeprefix("bench_") for p in bench_dir().glob("bench_*.py"))
    chosen = args.names or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise InputError(f"unknown benchmark(s) {unknown}; choices: {', '.join(names)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for name in chosen:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", bench_dir() / f"bench_{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"\n## {name} ({device})\n", flush=True)
        rows = module.run(device, args.quick, emit=row_writer(args.out, module.TABLE_COLUMNS))  # each row as measured
        print()
        print(markdown_table(rows, module.TABLE_COLUMNS))
    if args.out:
        print(f"\nrows appended to {args.out}")
    return 0


def cmd_data_shards(args: argparse.Namespace) -> int:
    from vtp_fast.data import shards

    source = args.source
    photos = source not in ("emoji", "fashion-mnist")
    if not photos and (args.short_side or args.max_side or args.quality):
        raise InputError(f"--short-side, --max-side and --quality apply to photos (a folder or a table), not to "
                         f"{source} (use --size for the emoji set)")
    if source == "emoji":
        from vtp_fast.data.emoji import STYLES, default_cache_dir, prepare_emoji

        samples, total = shards.emoji_samples(prepare_emoji(default_cache_dir(), size=args.size),
                                              args.styles or STYLES)
    elif source == "fashion-mnist":
        samples, total = shards.fashion_mnist_samples(args.split)
    elif Path(source).is_dir():
        samples, total = shards.folder_samples(Path(source))
    elif Path(source).suffix in (".csv", ".parquet"):
        samples, total = shards.table_samples(Path(source), args.path_column, args.caption_column, args.label_column)
    else:
        raise InputError(f"{source}: not 'emoji', 'fashion-mnist', an image folder or a .csv/.parquet table")
    report = shards.Prepared([])
    if photos:
        samples = shards.prepare(samples, report, args.short_side, args.max_side, args.quality)
    paths = shards.write_shards(samples, args.out, prefix=args.prefix, per_shard=args.per_shard, total=total)
    print(f"{len(paths)} shards with index files -> {args.out}"
          f" ({args.out}/{args.prefix}-{{00000..{max(0, len(paths) - 1):05d}}}.tar)")
    if report.from_names:
        print(f"{report.from_names} caption(s) taken from file names (no NAME.txt beside the image)")
    if report.reencoded:
        print(f"{report.reencoded} image(s) resized and/or re-encoded as JPEG (quality {args.quality or 90})")
    if report.skipped:
        listing = Path(args.out) / "skipped.txt"
        listing.write_text("".join(f"{where}\t{why}\n" for where, why in report.skipped))
        print(f"{len(report.skipped)} sample(s) skipped, listed in {listing}:", file=sys.stderr)
        for where, why in report.skipped[:10]:
            print(f"  {where}: {why}", file=sys.stderr)
        if len(report.skipped) > 10:
            print(f"  ... and {len(report.skipped) - 10} more", file=sys.stderr)
    return 0


def cmd_data_emoji(args: argparse.Namespace) -> int:
    from vtp_fast.data.emoji import default_cache_dir, load_emoji, prepare_emoji

    root = prepare_emoji(Path(args.cache) if args.cache else default_cache_dir(), size=args.size)
    data = load_emoji(root)
    print(f"emoji set: {len(data)} images, {len(data.category_names)} categories -> {root}")
    print(f"licences: {root / 'LICENSES.md'}")
    return 0


def cmd_kernels_check(args: argparse.Namespace) -> int:
    from vtp_fast import kernel_check

    return kernel_check.main(args)


# ---------------------------------------------------------------------------------------------- parser
SHARD_RULES = """

An image folder: every image under it (recursively, hidden names skipped); its caption is the text of NAME.txt
beside it, else its file name (underscores and dashes as spaces; the count is reported); its label (KEY.cls) is
the index of its folder among the sorted folders. A table: one row per image, a path (relative to the table), a
caption and optionally an integer label. Images that do not decode and empty captions are skipped and listed in
OUT/skipped.txt; nothing else is changed unless --short-side, --max-side or --quality ask for it."""
TOKENIZER = "a directory (config.json + model.safetensors) or a Hugging Face Hub id (VTP-Large-f16d64[@REVISION])"


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help line (unless it has none, is a flag, or the help states it);
    descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _Commands:
    """Subcommands that show their defaults and repeat their one-line help as their description."""

    def __init__(self, action):
        self.action = action

    def add_parser(self, name: str, *, help: str) -> argparse.ArgumentParser:  # noqa: A002 - argparse's name
        return self.action.add_parser(name, help=help, description=help, formatter_class=_Help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtp-fast", description=__doc__, formatter_class=_Help)
    sub = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                          title="commands"))

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
        p.add_argument("--resize", choices=("pad", "crop", "fit"), default="pad",
                       help="sizes that are not multiples of the patch size: pad (reflect-pad, cropped back after "
                            "decoding), crop (centre-crop to the multiple below), fit (downscale to --max-side, "
                            "then pad)")
        p.add_argument("--max-side", type=int, default=1024, help="--resize fit: the longest side, in pixels")
        p.add_argument("--size", type=int, help="instead of --resize: shorter side to SIZE, centre-cropped to SIZE x "
                                                "SIZE (a multiple of the patch size)")
        p.add_argument("--batch", type=int, default=16, help="images of one size encoded at once")
        p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        p.set_defaults(func=func)

    p = sub.add_parser("pretrain", help="the main job: VTP pretraining (reconstruction + CLIP + DINO/iBOT)")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) of differences, in order")
    p.add_argument("--resume", help="'auto' (newest checkpoint of run.out_dir) or a checkpoint directory")
    p.add_argument("--init", help=f"continue from a published tokenizer (adds heads and teacher): {TOKENIZER}")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.steps=200 objective.clip=0")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export", help="a training checkpoint (whole or sharded) -> the published layout")
    p.add_argument("checkpoint", help="a checkpoint directory (<run>/checkpoints/step_N), or a run directory (its "
                                      "newest checkpoint)")
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="per-GPU memory and step time of a pretraining config on N GPUs, before any GPU "
                                    "runs it; recommends DDP or FSDP2, activation checkpointing and micro-batch")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) of differences, in order")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (all nodes)")
    p.add_argument("--gpu", default="h200", choices=("h200", "h100", "a100"), help="GPU kind (default: h200)")
    p.add_argument("--out", help="also write the report (markdown) to this file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. batch.size=4096")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("profile", help="per-objective step-time profile of a pretraining config")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) of differences, in order")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--out", help="output directory (default: <run.out_dir>/profile)")
    p.add_argument("--trace", action="store_true", help="also write a torch.profiler chrome trace")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("extract-latents", help="encode a labelled image set (+ flipped copies) into latent shards")
    p.add_argument("--checkpoint", required=True, help=f"the tokenizer: {TOKENIZER}")
    p.add_argument("--data", default="emoji", help="emoji[:styles], fashion-mnist[:test], or a shards directory")
    p.add_argument("--out", required=True, help="output directory (latent shards + meta.json)")
    p.add_argument("--size", type=int, help="image size: every image resized (shorter side) and centre-cropped to "
                                            "SIZE x SIZE, one size for the latent set (default: the tokenizer's)")
    p.add_argument("--batch", type=int, default=128, help="images encoded at once")
    p.add_argument("--no-flip", action="store_true", help="skip the horizontally flipped copies")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_extract_latents)

    p = sub.add_parser("train-dit", help="train a DiT on a latent set (rectified flow)")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) of differences, in order")
    p.add_argument("--resume", help="'auto' or a checkpoint directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. latents=runs/latents run.steps=4000")
    p.set_defaults(func=cmd_train_dit)

    p = sub.add_parser("sample", help="sample images from a DiT, decoded with the tokenizer")
    p.add_argument("--dit", required=True, help="an exported DiT (<train-dit out_dir>/dit)")
    p.add_argument("--checkpoint", required=True, help=f"the tokenizer the latents came from: {TOKENIZER}")
    p.add_argument("--out", required=True, help="output directory (samples.npz, a grid per class)")
    p.add_argument("--classes", nargs="+", help="class names (default: every class)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class")
    p.add_argument("--steps", type=int, default=50, help="ODE solver steps")
    p.add_argument("--solver", choices=("euler", "heun"), default="euler", help="ODE solver")
    p.add_argument("--shift", type=float, default=1.0, help="timestep shift")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("T_LO", "T_HI"),
                   help="apply guidance only for t in [T_LO, T_HI]")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="rfid | gfid | zeroshot | probe")
    p.add_argument("what", choices=("rfid", "gfid", "zeroshot", "probe"),
                   help="rfid: reconstruction FID (+ PSNR, SSIM); gfid: FID of DiT samples; zeroshot: CLIP "
                        "accuracy on class names; probe: linear probe on frozen features")
    p.add_argument("--checkpoint", help=f"the tokenizer (rfid, zeroshot, probe): {TOKENIZER}")
    p.add_argument("--data", default="emoji", help="the evaluation / reference set")
    p.add_argument("--test-data", default="emoji:openmoji", help="probe: the test set")
    p.add_argument("--samples", help="gfid: samples.npz from vtp-fast sample")
    p.add_argument("--n", type=int, default=1000, help="images for FID (CPU: a few per second)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("study", help="the paper's scaling study (default: the CPU study on the emoji set, about "
                                     "100 min on 2 cores)")
    p.add_argument("--config", help="a study config (configs/study/*.yaml); default: the CPU study")
    p.add_argument("--out", help="results folder (default: runs/study, or runs/study-dry-run); a second run "
                                 "continues where the first stopped")
    p.add_argument("--dry-run", "--quick", dest="dry_run", action="store_true",
                   help="every stage at tiny shapes on this machine (about a minute once the data is prepared), then "
                        "the planned GPU-hours of the real run")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the study config, e.g. dit_seeds=5")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("bench", help="benchmarks of bench/: every backend vs the reference and torch.compile")
    p.add_argument("names", nargs="*", help="benchmarks to run (bench/bench_<name>.py; default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    p.add_argument("--out", help="append JSONL rows (device, versions, git revision) to this file")
    p.add_argument("--report", nargs="+", metavar="JSONL", help="render rows of earlier runs as a markdown table")
    p.add_argument("--model", action="store_true", help="the H200 performance model of the fast ops (FLOPs, bytes, "
                   "bound, expected %%) beside the --report rows, else the newest bench/results/h200/ rows")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("kernels", help="kernel tools: the ahead-of-time compile gate")
    kernels_sub = _Commands(p.add_subparsers(dest="tool", required=True, metavar="TOOL", title="tools"))
    q = kernels_sub.add_parser("check", help="compile every Triton kernel configuration for GPU targets (no GPU "
                                             "needed): registers, spills, shared memory, MMA kind, warnings")
    q.add_argument("--arch", default="90,80", help="compute capabilities, or 'native' for the visible GPU")
    q.add_argument("--dtypes", default="bfloat16,float16,float32", help="input dtypes, where an op accepts them")
    q.add_argument("--ops", help="comma-separated ops (default: all; 'csrc' for the CUDA sources only)")
    q.add_argument("--subset", action="store_true", help="the CI subset: one or two shapes per op")
    q.add_argument("--cuda", action="store_true", help="also compile csrc/*.cu with nvcc -Xptxas -v")
    q.add_argument("--markdown", help="write the table here")
    q.add_argument("--json", help="write one JSON row per kernel configuration here")
    q.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    q.add_argument("-v", "--verbose", action="store_true", help="name each case as it compiles")
    q.set_defaults(func=cmd_kernels_check)

    p = sub.add_parser("data", help="prepare bundled data sets")
    data_sub = _Commands(p.add_subparsers(dest="dataset", required=True, metavar="DATASET", title="data sets"))
    q = data_sub.add_parser("emoji", help="fetch (npm) and render the multi-style emoji set")
    q.add_argument("--cache", help="cache directory (default $VTP_FAST_CACHE or ~/.cache/vtp_fast)")
    q.add_argument("--size", type=int, default=64, help="image size in pixels")
    q.set_defaults(func=cmd_data_emoji)
    q = data_sub.add_parser("shards", help="write WebDataset shards (img2dataset layout) with DALI index files")
    q.description += SHARD_RULES
    q.add_argument("source", help="'emoji', 'fashion-mnist', an image folder, or a .csv/.parquet of paths + captions")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--prefix", default="shard", help="shard file names: PREFIX-00000.tar, ...")
    q.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    q.add_argument("--styles", nargs="+", help="emoji styles (default: all four)")
    q.add_argument("--size", type=int, default=64, help="emoji image size")
    q.add_argument("--split", default="train", choices=("train", "test"), help="Fashion-MNIST split")
    q.add_argument("--path-column", default="path", help="table column of image paths (relative to the table)")
    q.add_argument("--caption-column", default="caption", help="table column of captions")
    q.add_argument("--label-column", help="table column of integer class labels (written as KEY.cls)")
    q.add_argument("--short-side", type=int, help="photos: downscale so the shorter side is at most this")
    q.add_argument("--max-side", type=int, help="photos: downscale so the longer side is at most this")
    q.add_argument("--quality", type=int, help="photos: re-encode every image as JPEG at this quality (resized "
                                               "ones always are, at 90)")
    q.set_defaults(func=cmd_data_shards)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; dotted overrides (key=value) may also follow options (`--resume auto run.steps=3`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or not all("=" in x and not x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def _terminated(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: temp folders removed, partial outputs never published


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted")
    except user_errors() as e:
        if os.environ.get("VTP_FAST_DEBUG"):
            raise
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    finally:  # process groups left on every exit path (loaded only by the commands that use them)
        if (distributed := sys.modules.get("vtp_fast.distributed")) is not None:
            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())

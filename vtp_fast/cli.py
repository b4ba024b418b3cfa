"""vtp-fast: pre-train VTP-style visual tokenizers (a ViT autoencoder trained with reconstruction, CLIP and
DINOv2-style self-supervision) and judge them by the images a diffusion model generates from their latents.

Start with README.md (quick start: `make train`, `make test`); `vtp-fast COMMAND --help` lists a command's options
with their defaults. Errors about your input print one line (VTP_FAST_DEBUG=1 shows the traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

from vtp_fast.config import InputError
from vtp_fast.io import atomic_path, temp_dir, write_problem
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


def _codec(args: argparse.Namespace):
    """The tokenizer of an encode / decode command, on its fast path (`_codec_options`: --precision, --compile)."""
    import warnings

    from vtp_fast.benchmark import cpu_flags, native_bf16
    from vtp_fast.compile import apply_inference

    model = _model(args)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if args.precision == "bf16" and on_cpu and not native_bf16(cpu_flags()):
        warnings.warn("--precision bf16 on a CPU without native bf16 (avx512_bf16 / amx_bf16): emulated, likely "
                      "slower than fp32", stacklevel=1)
    return apply_inference(model, args.precision, args.compile)


def _codec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32: the exact path; bf16: weights cast once (about 2.7x faster on a CPU with AMX; error "
                        "vs fp32 in docs/performance.md)")
    p.add_argument("--compile", action="store_true", help="torch.compile encode/decode with frozen weights: pays "
                                                          "off over many batches (a graph takes tens of seconds)")


def _inputs(args: argparse.Namespace, patch: int, skipped: list[Path]) -> list[tuple[Path, tuple[int, int]]]:
    """The images named (files, folders searched recursively) with their (W, H), read from the headers only and
    ordered by size (`read_sizes`: unreadable ones warned about and skipped), before any work starts."""
    from vtp_fast.data.images import ImageError, find_images, read_sizes

    if args.size is not None and (args.size < patch or args.size % patch):
        lo = max(patch, args.size // patch * patch)
        raise InputError(f"--size {args.size}: must be a multiple of the patch size {patch} (e.g. {lo} or "
                         f"{lo + patch})")
    paths = find_images(args.images)
    if len(paths) != len(args.images):
        print(f"{len(paths)} images found in {len(args.images)} path(s)")
    sized = read_sizes(paths, skipped)
    if not sized:
        raise ImageError(f"none of the {len(paths)} images could be read")
    return sized


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _warn_large(model, sized, args: argparse.Namespace, patch: int, decode: bool = True) -> None:
    """Say, before starting, which images are above PIXEL_BUDGET and about how long they will take (see
    vtp_fast.eval.timing: modelled attention and per-token work, calibrated on the device)."""
    from vtp_fast.data.images import fitted_size
    from vtp_fast.eval.timing import ERROR, ForwardTime

    large = [(p, fitted_size(wh, patch, args.resize, args.size, args.max_side)) for p, wh in sized]
    large = [(p, wh) for p, wh in large if wh[0] * wh[1] > PIXEL_BUDGET]
    if not large:
        return
    timing = ForwardTime(model, decode)
    total = sum(timing.seconds((w // patch) * (h // patch)) for _, (w, h) in large)
    names = ", ".join(f"{p.name} ({w}x{h})" for p, (w, h) in large[:3]) + (" ..." if len(large) > 3 else "")
    warnings.warn(f"{len(large)} image(s) above {PIXEL_BUDGET / 1e6:.0f} MP as the model sees them: {names}; about "
                  f"{_duration(total)} on {model.pixel_mean.device.type} (expected within a factor of {ERROR:g}: "
                  f"{_duration(total / ERROR)} to {_duration(total * ERROR)}, with the machine to itself) for those "
                  f"(--resize fit --max-side 1024 downscales them first)", stacklevel=2)


def _fitted_batches(model, args: argparse.Namespace, desc: str):
    """The named images made fit for `model` (`vtp_fast.data.images.fitted_batches`), each batch stacked on its
    device: (group, pixels), with a progress bar; and the list of the images skipped (unreadable), filled as they
    are met. Every header is read, and large images announced, before this returns."""
    import torch
    from tqdm import tqdm

    from vtp_fast.data.images import ImageError, fitted_batches

    patch = model.config.vision_patch_size
    skipped: list[Path] = []
    sized = _inputs(args, patch, skipped)
    _warn_large(model, sized, args, patch, decode=desc == "reconstruct")

    def batches():
        done = 0
        with tqdm(total=len(sized), desc=desc, unit="img", disable=len(sized) < 2) as bar:
            for group in fitted_batches(sized, patch, args.resize, args.size, args.max_side, args.batch, skipped):
                yield group, torch.stack([f.pixels for _, f in group]).to(model.pixel_mean.device)
                done += len(group)
                bar.update(len(group))
        if not done:
            raise ImageError(f"none of the {len(skipped)} images could be read")

    return batches(), skipped


def _skipped(skipped: list[Path], done: int) -> None:
    if skipped:
        print(f"{len(skipped)} of {len(skipped) + done} images skipped (unreadable, named above)", file=sys.stderr)


FORWARD = "vtp-fast forward"  # the worker thread's name


def _forward(fn):
    """fn() under inference mode in a worker thread while this one waits in short steps, so that Ctrl-C or
    SIGTERM stop the command at once, even inside one long native operation (attention over a large image runs
    for minutes on a CPU): `main` then ends the process without waiting for that operation."""
    import torch

    result: dict = {}

    def run():
        try:
            with torch.inference_mode():
                result["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            result["error"] = e
        finally:
            worker.done.set()

    worker = threading.Thread(target=run, name=FORWARD, daemon=True)
    worker.done = threading.Event()  # not is_alive(): a join() interrupted by Ctrl-C marks the thread stopped
    worker.start()
    while not worker.done.wait(0.1):
        pass
    if "error" in result:
        raise result["error"]
    return result["out"]


def _forward_running() -> bool:
    return any(t.name == FORWARD and not t.done.is_set() for t in threading.enumerate())


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from vtp_fast.data.images import save_image
    from vtp_fast.eval.metrics import psnr
    from vtp_fast.plots import image_grid

    model = _codec(args)
    batches, skipped = _fitted_batches(model, args, "reconstruct")
    out = Path(args.out)
    rows, shown = [], []
    with temp_dir(out, prefix=".reconstruct-", perms=0o700) as staging:  # each file is moved into `out` whole
        for group, x in batches:
            rec = _forward(lambda x=x: model.denormalize(model.decode(model.encode(model.normalize(x)))).float()
                           .clamp(0, 1).cpu())
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
    _skipped(skipped, len(rows))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    import json

    import torch
    from safetensors.torch import save_file

    model = _codec(args)
    groups: dict[str, list] = {}  # "HxW" of the latents -> their tensors
    index = []  # per input file: (key, row, original W x H)
    batches, skipped = _fitted_batches(model, args, "encode")
    for group, x in batches:
        z = _forward(lambda x=x: model.encode(model.normalize(x)).float().cpu())
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
    _skipped(skipped, len(index))
    return 0


# ---------------------------------------------------------------------------------------------- training
def cmd_export(args: argparse.Namespace) -> int:
    from vtp_fast.train.checkpoint import export, export_source, step_of

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise InputError(f"--out {out}: a folder that is not empty; --force replaces it")
    source = export_source(args.checkpoint)
    step = step_of(source)
    export(source, out)
    print(f"tokenizer of {source} ({'step unknown: not a step_N folder' if step is None else f'step {step}'}) -> "
          f"{out} (the published layout: load_pretrained reads it)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from vtp_fast.config import ConfigError, load_config
    from vtp_fast.io import atomic_write_text
    from vtp_fast.train import plan_dit, planner
    from vtp_fast.train.config import PretrainConfig

    given = {flag: (key, value) for flag, key, value in (
        ("--sample-steps", "steps", args.sample_steps), ("--solver", "solver", args.solver),
        ("--shift", "shift", args.shift), ("--cfg-scale", "cfg_scale", args.cfg_scale),
        ("--cfg-interval", "cfg_interval", args.cfg_interval and tuple(args.cfg_interval)),
        ("--tokenizer", "tokenizer", args.tokenizer)) if value is not None}
    sampling = dict(given.values())
    job = args.job or plan_dit.job_of(args.config, args.overrides)
    if args.samples and job != "dit":
        raise ConfigError("--samples: sampling is planned for a DiT config (configs/dit/, or --job dit)")
    if given and not args.samples:
        raise ConfigError(f"{', '.join(given)}: options of the sampling plan, which needs --samples")
    if job == "dit":
        cfg = plan_dit.load_dit_config(args.config, args.overrides)
        plan = plan_dit.plan_dit(cfg, args.gpus, args.gpu)
        text = plan_dit.report_dit(plan)
        if args.samples:
            text += "\n" + plan_dit.report_sampling(plan_dit.plan_sampling(cfg, args.samples, args.gpus, args.gpu,
                                                                           **sampling))
    else:
        plan = planner.plan(load_config(PretrainConfig, args.config, args.overrides), args.gpus, args.gpu)
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
    from vtp_fast import distributed
    from vtp_fast.data.labelled import open_images
    from vtp_fast.eval.latents import extract_latents
    from vtp_fast.threads import apply_budget, budget

    if distributed.launched_distributed():  # under torchrun: every rank encodes its shards on its own GPU
        distributed.init_from_env()
    workers = apply_budget(budget(0, args.workers)).loader_workers
    model = _codec(args)
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
    tokenizer = _model(args)
    dit, meta = load_dit(args.dit, device=next(tokenizer.parameters()).device)
    classes = class_ids(meta["class_names"], args.classes)
    spec = SampleSpec(n=args.n or (args.per_class or 8) * len(classes), classes=tuple(classes), steps=args.steps,
                      solver=args.solver, shift=args.shift, cfg_scale=args.cfg, cfg_interval=tuple(args.cfg_interval),
                      seed=args.seed, batch=args.batch, chunk=args.chunk, precision=args.precision)
    sample_images(dit, meta, tokenizer, args.out, spec, png=args.png)
    return 0


def _eval_adm(args: argparse.Namespace) -> int:
    """ADM's suite (vtp_fast.eval.adm): one JSON object on stdout (rank 0 under torchrun), progress on stderr."""
    import json

    from vtp_fast.distributed import init_from_env
    from vtp_fast.eval.adm import evaluate_adm

    for option in ("samples", "ref"):
        if getattr(args, option) is None:
            raise InputError(f"eval adm needs --{option}")
    device = init_from_env()  # joins the process group under torchrun
    result = evaluate_adm(args.samples, args.ref, inception_weights=args.inception_weights,
                          precision=args.precision, device=args.device or device)
    if result is not None:
        print(json.dumps({"eval": "adm", **result}, indent=1, allow_nan=False))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import torch

    from vtp_fast.data.labelled import open_images
    from vtp_fast.eval import evaluate

    if args.what == "adm":
        return _eval_adm(args)
    needed = "--samples" if args.what == "gfid" else "--checkpoint"
    if getattr(args, needed.lstrip("-")) is None:
        raise InputError(f"eval {args.what} needs {needed}")
    data = open_images(args.data, size=args.size)  # folders and shards: read a chunk at a time
    if args.what == "gfid":
        npz = np.load(args.samples)  # ADM format (arr_0: uint8 NHWC), or the (N, 3, H, W) "images" of old files
        samples = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2) if "arr_0" in npz else torch.from_numpy(
            npz["images"])
        result = evaluate.generation_scores(samples, data, args.n)
    else:
        if args.what in ("zeroshot", "probe"):
            return _eval_classify(args, data)
        result = evaluate.reconstruction_scores(_model(args), data, args.n)
    print(json.dumps({"eval": args.what, "data": data.name, **result}, indent=1))
    return 0


def _eval_classify(args: argparse.Namespace, data) -> int:
    """Zero-shot or a linear probe on stored features (vtp_fast.eval.classify), extracted over torchrun's ranks; one
    JSON object on stdout from rank 0."""
    import json

    from vtp_fast.data.labelled import open_images
    from vtp_fast.distributed import init_from_env
    from vtp_fast.eval import classify
    from vtp_fast.threads import apply_budget, budget

    init_from_env()  # under torchrun: join the group (this rank's GPU becomes the current device)
    workers = apply_budget(budget(0, args.workers)).loader_workers
    model = _model(args)
    extract = {"workers": workers, "precision": "bf16" if args.precision == "bf16" else "fp32"}
    if args.what == "zeroshot":
        result = classify.zero_shot_eval(model, data, args.features, classes=args.classes, **extract)
    else:
        test = open_images(args.test_data, size=args.size)
        probe = {"select": args.select} if args.protocol == "dino" else {}
        result = classify.probe_eval(model, data, test, args.features, protocol=args.protocol, probe=probe,
                                     **extract)
    if result is not None:
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

    from vtp_fast.benchmark import cpu_ceilings, markdown_table, read_rows, row_writer

    if args.report:
        rows, broken = read_rows(args.report)
        columns = [c for c in ("bench", "op", "case", "pass", "mode", "device", "backend", "shape", "dtype",
                               "median_ms", "gb_per_s", "tflop_per_s", "ceiling_share", "images_per_s", "peak_mem_mb",
                               "error", "device_name", "git")
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
    if torch.device(device).type == "cpu":  # the roofline of the rows' ceiling_share, measured once
        print(cpu_ceilings().describe(), flush=True)
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
    if source != "emoji" and (args.size or args.styles):
        raise InputError(f"--size and --styles apply to the emoji set, not to {source}"
                         + (" (--short-side and --max-side resize photos)" if photos else ""))
    if source == "emoji":
        from vtp_fast.data.emoji import STYLES, default_cache_dir, prepare_emoji

        samples, total = shards.emoji_samples(prepare_emoji(default_cache_dir(), size=args.size or 64),
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
STUDY_STAGES = """

Per objective mix and budget a tokenizer is pretrained and scored on the held-out set (rFID, PSNR, zero-shot,
probe); its latents of the labelled set are extracted (sharded over torchrun's ranks, resumable); a DiT is trained
per seed on the memory-mapped latents; `samples` images (class-balanced, or in the labelled set's class
frequencies) are drawn by the distributed sampler and scored by FID, KID and ADM's suite (sFID, Inception Score,
precision, recall) against adm_reference (ADM's reference batch) or, without one, real images of the labelled set,
beside the floor (real images) and each tokenizer's ceiling (decoded Gaussian latents). Data sets are streamed,
never held in memory. configs/study/vtp_s.yaml is the GPU protocol: all of ImageNet train, FID-50K (50 samples a
class) against VIRTUAL_imagenet256_labeled.npz. Under torchrun every stage runs on every rank."""
TOKENIZER = "a directory (config.json + model.safetensors) or a Hugging Face Hub id (VTP-Large-f16d64[@REVISION])"


def _ints(low: int = 1, high: int | None = None):
    """An argparse type: an integer from `low` to `high` (sizes and counts that would otherwise be ignored or
    misread silently, such as --max-side 0)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer "
                                             + (f"of at least {low}" if high is None else f"from {low} to {high}"))
        return value

    return parse


POSITIVE = _ints(1)


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
        _codec_options(p)
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
    p.add_argument("--force", action="store_true", help="replace --out when it is a folder that is not empty (all "
                                                         "it holds is removed)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="per-GPU memory and step time of a pretraining or DiT config on N GPUs, before "
                                    "any GPU runs it; recommends DDP or FSDP2, activation checkpointing and "
                                    "micro-batch; for a DiT, with --samples, the time to draw them")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) of differences, in order")
    p.add_argument("--job", choices=("tokenizer", "dit"), help="what the config trains (default: dit when it sets "
                                                               "a DiT key such as preset or latents)")
    p.add_argument("--gpus", type=POSITIVE, required=True, help="number of GPUs (all nodes)")
    p.add_argument("--gpu", default="h200", choices=("h200", "h100", "a100"), help="GPU kind (default: h200)")
    p.add_argument("--out", help="also write the report (markdown) to this file")
    p.add_argument("--samples", type=POSITIVE, help="DiT: also the time of vtp-fast sample drawing this many images")
    p.add_argument("--sample-steps", type=POSITIVE, help="with --samples: ODE solver steps (default 50)")
    p.add_argument("--solver", choices=("euler", "heun"), help="with --samples: ODE solver (default euler)")
    p.add_argument("--shift", type=float, help="with --samples: timestep shift (default 1)")
    p.add_argument("--cfg-scale", type=float, help="with --samples: classifier-free guidance scale (default 1: none)")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("T_LO", "T_HI"),
                   help="with --samples: guidance only for t in [T_LO, T_HI] (default 0 1)")
    p.add_argument("--tokenizer", help="with --samples: the decoder, a preset (vtp-l), checkpoint directory or "
                                       "VTP-*-f16d64 id (default: the latent set's, else vtp-l)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. batch.size=4096")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("profile", help="per-objective step-time profile of a pretraining config")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) of differences, in order")
    p.add_argument("--steps", type=POSITIVE, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=_ints(0), default=3, help="untimed steps first")
    p.add_argument("--out", help="output directory (default: <run.out_dir>/profile)")
    p.add_argument("--trace", action="store_true", help="also write a torch.profiler chrome trace")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.set_defaults(func=cmd_profile)

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
    p.add_argument("--workers", type=_ints(0), help="decoding processes per rank (default: the thread budget's)")
    p.add_argument("--no-flip", action="store_true", help="skip the horizontally flipped copies")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    _codec_options(p)
    p.set_defaults(func=cmd_extract_latents)

    p = sub.add_parser("train-dit", help="train a DiT on a latent set (rectified flow)")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) of differences, in order")
    p.add_argument("--resume", help="'auto' or a checkpoint directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. latents=runs/latents run.steps=4000")
    p.set_defaults(func=cmd_train_dit)

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

    p = sub.add_parser("eval", help="rfid | gfid | zeroshot | probe | adm")
    p.add_argument("what", choices=("rfid", "gfid", "zeroshot", "probe", "adm"),
                   help="rfid: reconstruction FID (+ PSNR, SSIM); gfid: FID of DiT samples; zeroshot: CLIP "
                        "accuracy on class names; probe: linear probe on frozen features; adm: ADM's suite (FID, "
                        "sFID, IS, precision, recall) of --samples against --ref")
    p.add_argument("--checkpoint", help=f"the tokenizer (rfid, zeroshot, probe): {TOKENIZER}")
    p.add_argument("--data", default="emoji", help="the evaluation / reference set")
    p.add_argument("--test-data", default="emoji:openmoji", help="probe: the test set")
    p.add_argument("--samples", help="gfid, adm: samples.npz from vtp-fast sample (ADM format)")
    p.add_argument("--ref", help="adm: the reference batch (ADM's .npz, its precomputed statistics used), an image "
                                 "folder or a samples file")
    p.add_argument("--inception-weights", help="adm: torch-fidelity's Inception weights file (with the head the "
                                               "Inception Score needs; default: torch hub's copy, else the offline "
                                               "conversion, which has none)")
    p.add_argument("--precision", choices=("fp32", "fp32-fused", "bf16"), default="fp32",
                   help="adm: the Inception's arithmetic (fp32: the exact network, for numbers to publish); zeroshot, "
                        "probe: the tokenizer's (bf16: autocast)")
    p.add_argument("--features", help="zeroshot, probe: keep the image features in FEATURES/<set> (memory-mapped, "
                                      "resumable; under torchrun each rank embeds its chunks; storage every rank "
                                      "sees); default: a temporary folder")
    p.add_argument("--classes", choices=("auto", "imagenet", "set"), default="auto",
                   help="zeroshot: imagenet: open_clip's ImageNet class names and CLIP's 80 templates (labels in "
                        "the standard class order); set: the set's class names and general templates; auto: "
                        "imagenet for a set of 1000 classes, else set")
    p.add_argument("--protocol", choices=("last-layer", "dino"), default="last-layer",
                   help="probe: last-layer: the last block's class + mean patch token, and the latent; dino: DINOv2's "
                        "grid (class tokens of the last 1 and 4 blocks, with/without the mean patch token, 13 "
                        "learning rates; the paper's Table 2)")
    p.add_argument("--select", choices=("held-out", "test"), default="held-out",
                   help="probe --protocol dino: choose among the grid on held-out train features, or report the "
                        "best on the test set as DINOv2 does")
    p.add_argument("--workers", type=_ints(0), help="zeroshot, probe: decoding processes per rank (default: the "
                                                    "thread budget's)")
    p.add_argument("--n", type=POSITIVE, default=1000, help="images for FID (CPU: a few per second)")
    p.add_argument("--size", type=POSITIVE, default=64, help="image size in pixels")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("study", help="the paper's scaling study (default: the CPU study on the emoji set, about "
                                     "100 min on 2 cores)")
    p.description += STUDY_STAGES
    p.add_argument("--config", help="a study config (configs/study/*.yaml, e.g. configs/study/vtp_s.yaml: the GPU "
                                    "study); default: the CPU study")
    p.add_argument("--out", help="results folder (default: runs/study, or runs/study-dry-run); a second run "
                                 "continues where the first stopped")
    p.add_argument("--dry-run", "--quick", dest="dry_run", action="store_true",
                   help="every stage at tiny shapes on this machine, the same code (streamed sets, sharded latents, "
                        "the sampler, ADM's suite; the config's data sets and adm_reference where they are on this "
                        "machine, else the emoji set and no reference; about a minute once the data is prepared), "
                        "then the planned GPU-hours of the real run")
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
    q.add_argument("--jobs", type=POSITIVE, default=os.cpu_count() or 1, help="compile in this many processes")
    q.add_argument("-v", "--verbose", action="store_true", help="name each case as it compiles")
    q.set_defaults(func=cmd_kernels_check)

    p = sub.add_parser("data", help="prepare bundled data sets")
    data_sub = _Commands(p.add_subparsers(dest="dataset", required=True, metavar="DATASET", title="data sets"))
    q = data_sub.add_parser("emoji", help="fetch (npm) and render the multi-style emoji set")
    q.add_argument("--cache", help="cache directory (default $VTP_FAST_CACHE or ~/.cache/vtp_fast)")
    q.add_argument("--size", type=POSITIVE, default=64, help="image size in pixels")
    q.set_defaults(func=cmd_data_emoji)
    q = data_sub.add_parser("shards", help="write WebDataset shards (img2dataset layout) with DALI index files")
    q.description += SHARD_RULES
    q.add_argument("source", help="'emoji', 'fashion-mnist', an image folder, or a .csv/.parquet of paths + captions")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--prefix", default="shard", help="shard file names: PREFIX-00000.tar, ...")
    q.add_argument("--per-shard", type=POSITIVE, default=1000, help="samples per shard")
    q.add_argument("--styles", nargs="+", help="emoji styles (default: all four)")
    q.add_argument("--size", type=POSITIVE, help="emoji image size (default 64)")
    q.add_argument("--split", default="train", choices=("train", "test"), help="Fashion-MNIST split")
    q.add_argument("--path-column", default="path", help="table column of image paths (relative to the table)")
    q.add_argument("--caption-column", default="caption", help="table column of captions")
    q.add_argument("--label-column", help="table column of integer class labels (written as KEY.cls)")
    q.add_argument("--short-side", type=POSITIVE, help="photos: downscale so the shorter side is at most this")
    q.add_argument("--max-side", type=POSITIVE, help="photos: downscale so the longer side is at most this")
    q.add_argument("--quality", type=_ints(1, 100), help="photos: re-encode every image as JPEG at this quality "
                                                         "(resized ones always are, at 90)")
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


def _check(args: argparse.Namespace) -> None:
    """What parsing cannot see, said before any work: what stops writing --out (a folder, except for the
    commands that write one file), and image options that would be ignored; fills in the image defaults."""
    out = getattr(args, "out", None)
    problem = out and write_problem(out, folder=args.command not in ("encode", "plan", "bench"))
    if problem:
        raise InputError(f"--out {out}: {problem}")
    if args.command in ("reconstruct", "encode"):
        if args.size is not None and args.resize is not None:
            raise InputError(f"--size replaces --resize (shorter side to {args.size}, then a centre crop): give one")
        if args.max_side is not None and args.resize != "fit":
            raise InputError(f"--max-side {args.max_side}: applies to --resize fit only")
        args.resize, args.max_side = args.resize or "pad", args.max_side or 1024


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning in `main`: one line, without Python's file and line, above any progress bar."""
    text = f"vtp-fast: warning: {message}"
    if (tqdm := sys.modules.get("tqdm")) is not None:
        tqdm.tqdm.write(text, file=file or sys.stderr)
    else:
        print(text, file=file or sys.stderr, flush=True)


# torch.compile on a CPU (vtp-fast bench) imports torch.utils.cpp_extension, which logs this on a machine without
# a GPU whenever a CUDA toolkit is installed: it concerns building CUDA extensions, which no command here does
logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: not record.getMessage().startswith("No CUDA runtime is found"))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    shown, warnings.showwarning = warnings.showwarning, _one_line
    try:
        _check(args)
        return args.func(args)
    except KeyboardInterrupt:
        code = _fail("interrupted")
        if _forward_running():
            sys.stdout.flush()  # a forward still inside a native operation: the interpreter cannot shut down
            sys.stderr.flush()  # around it (C++ terminates), and waiting for it is what the user stopped
            os._exit(code)
        return code
    except user_errors() as e:
        if os.environ.get("VTP_FAST_DEBUG"):
            raise
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    finally:  # process groups left on every exit path (loaded only by the commands that use them)
        warnings.showwarning = shown
        if (distributed := sys.modules.get("vtp_fast.distributed")) is not None:
            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())

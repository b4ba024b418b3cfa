"""`vtp-fast sample`: N class-balanced images from a DiT on any number of ranks, resumable, as an ADM-format .npz.

    torchrun --nproc-per-node 8 -m vtp_fast.cli sample --dit D --checkpoint T --out OUT --n 50000 --cfg 1.5

OUT holds, when it is done:
    samples.npz   arr_0 uint8 (N, H, W, 3) and arr_1 int64 (N,) labels: what ADM's sample scripts write and its
                  evaluator (and vtp-fast eval gfid) read
    samples.json  the sampling parameters (the manifest below), class names, throughput: written last, the mark of
                  a finished set (a second run with the same parameters returns at once)
    grid.png      the first samples of up to 16 classes, one row per class
    png/          (png=True) one PNG per sample, NNNNNN.png = its index
and while it runs chunks/: manifest.json and chunk_KKKKKK.npy, uint8 (chunk, H, W, 3), removed at the end.

Labels: sample i has class classes[i % K] (K classes): every run of K consecutive samples, so every chunk and
every prefix, is class-balanced; with N = K * m each class has exactly m samples.
Noise: sample i starts from N(0, I) drawn by a CPU generator seeded with sample_seed(seed, i): an image depends on
its index and the parameters, not on which rank made it or when.
Work: the N indices are cut into chunks of `chunk` (chunk k = [k * chunk, (k + 1) * chunk)), each sampled in
batches of `batch` counted from its start, so every batch holds the same samples whatever the world size. That
matters: the DiT's batched matmuls round differently for other batch compositions (up to ~5e-7 on fp32 latents of
the test model), so a sample is bit-exact only within the same batch, batch size and device. The chunks without a
file are dealt round-robin to the ranks; each is written atomically (vtp_fast.io), so a run killed at any moment
loses at most the chunks in flight, and a second run with the same parameters (the manifest; --batch included, for
the reason above) makes only those. Other parameters over a work folder are refused, naming what differs.
At the end the ranks write the PNGs of their share of chunks, and rank 0 streams the chunks into the .npz (one
chunk in memory at a time: 50k images of 256 x 256 are 9.8 GB). On several nodes OUT must be on a shared
filesystem. Progress (rank 0): images/s and time left for all ranks, taken as rank 0's rate times the world size.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vtp_fast import distributed as dist
from vtp_fast.config import InputError
from vtp_fast.constants import autocast
from vtp_fast.data.views import sample_seed
from vtp_fast.io import atomic_file, atomic_path, atomic_write_text
from vtp_fast.models.pretrained import tokenizer_fingerprint
from vtp_fast.plots import image_grid
from vtp_fast.train.dit import generate

GRID_ROWS, GRID_COLS = 16, 8


@dataclass(frozen=True)
class SampleSpec:
    """What decides the images: n samples of the classes `classes` (label ids, cycled), the ODE solver, guidance
    (cfg_scale, applied for t in cfg_interval), the noise seed, and the work layout (batch, chunk) and precision
    ("fp32", "bf16", or "auto": bf16 on CUDA) that decide the rounding."""

    n: int
    classes: tuple[int, ...]
    steps: int = 50
    solver: str = "euler"
    shift: float = 1.0
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    seed: int = 0
    batch: int = 64
    chunk: int = 1000
    precision: str = "fp32"

    def __post_init__(self):
        for name in ("n", "steps", "batch", "chunk"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}: {getattr(self, name)} (must be at least 1)")
        if not self.classes:
            raise InputError("no classes to sample")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise InputError(f"precision: {self.precision!r} (choices: fp32, bf16, auto)")

    @property
    def chunks(self) -> int:
        return -(-self.n // self.chunk)

    def span(self, k: int) -> tuple[int, int]:
        """Chunk k's sample indices [start, stop)."""
        return k * self.chunk, min(self.n, (k + 1) * self.chunk)

    def labels(self, start: int, stop: int) -> np.ndarray:
        """Labels of samples [start, stop): (stop - start,) int64, sample i -> classes[i % K]."""
        return np.asarray(self.classes, dtype=np.int64)[np.arange(start, stop) % len(self.classes)]


def class_ids(class_names: list[str], chosen: list[str] | None) -> list[int]:
    """Label ids of the classes named (all, or [0] for a DiT without class names, when none are)."""
    if not chosen:
        return list(range(max(1, len(class_names))))
    unknown = [c for c in chosen if c not in class_names]
    if unknown:
        raise InputError(f"unknown classes {unknown}; this DiT knows: {', '.join(class_names)}")
    return [class_names.index(c) for c in chosen]


def sample_noise(seed: int, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise of samples [start, stop): (stop - start, *shape) float32 on the CPU, sample i from a
    generator seeded with sample_seed(seed, i)."""
    gen = torch.Generator()
    out = torch.empty((stop - start, *shape))
    for j, i in enumerate(range(start, stop)):
        gen.manual_seed(sample_seed(seed, i))
        out[j] = torch.randn(shape, generator=gen)
    return out


def render_batch(dit, meta: dict, tokenizer, spec: SampleSpec, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) as uint8 images (stop - start, H, W, 3), in one batch (CFG doubles it inside)."""
    c, (h, w) = dit.config.in_channels, meta["grid"]
    labels = torch.from_numpy(spec.labels(start, stop))
    with autocast(spec.precision, next(dit.parameters()).device):
        images = generate(dit, meta, tokenizer, labels, steps=spec.steps, solver=spec.solver, shift=spec.shift,
                          cfg_scale=spec.cfg_scale, cfg_interval=spec.cfg_interval, batch=stop - start,
                          noise=sample_noise(spec.seed, start, stop, (c, h, w)))  # (B, 3, H, W) in [0, 1]
    return images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)


def chunk_path(work: Path, k: int) -> Path:
    return work / f"chunk_{k:06d}.npy"


def manifest(dit, meta: dict, tokenizer, spec: SampleSpec) -> dict:
    """Everything that decides the images: the parameters and the two models' fingerprints."""
    return {"format": 1, **asdict(spec), "classes": list(spec.classes), "cfg_interval": list(spec.cfg_interval),
            "dit": tokenizer_fingerprint(dit), "tokenizer": tokenizer_fingerprint(tokenizer),
            "latent_grid": list(meta["grid"])}


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} != {new.get(k)!r}" for k in keys)


def _plan(out: Path, work: Path, want: dict, spec: SampleSpec, png: bool) -> list[int] | None:
    """Rank 0: None when OUT already holds this set, else the chunks still to sample (the manifest written first;
    temporaries a killed run left behind removed). Refuses other parameters over earlier work."""
    done = out / "samples.json"
    if done.is_file():
        old = json.loads(done.read_text())["manifest"]
        if old != want:
            raise InputError(f"{out} holds a finished sample set made otherwise ({_differences(old, want)}): "
                             "choose another --out")
        if png and not (out / "png").is_dir():
            raise InputError(f"{out} holds a finished sample set without PNGs: choose another --out for them")
        shutil.rmtree(work, ignore_errors=True)  # what a run killed while it removed the chunks left
        return None
    if (work / "manifest.json").is_file():
        old = json.loads((work / "manifest.json").read_text())
        if old != want:
            raise InputError(f"{work} holds the chunks of another sampling run ({_differences(old, want)}): use "
                             f"the same parameters to resume it, or remove {work}")
    else:
        atomic_write_text(work / "manifest.json", json.dumps(want, indent=1))
    for tmp in work.glob(".chunk_*.tmp"):
        tmp.unlink(missing_ok=True)
    return [k for k in range(spec.chunks) if not chunk_path(work, k).is_file()]


def _agreed_plan(out: Path, work: Path, want: dict, spec: SampleSpec, png: bool) -> list[int] | None:
    """_plan on rank 0, or its error, on every rank (so that no rank waits for a rank 0 that failed)."""
    result, error = None, None
    if dist.rank() == 0:
        try:
            result = ("ok", _plan(out, work, want, spec, png))
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
            result, error = ("error", str(e)), e
    kind, value = dist.broadcast_object(result)
    if error is not None:
        raise error
    if kind == "error":
        raise InputError(value)
    return value


def sample_chunks(dit, meta: dict, tokenizer, spec: SampleSpec, work: Path, mine: list[int], bar) -> None:
    """Sample this rank's chunks `mine`, each written atomically when complete."""
    world = dist.world_size()
    for k in mine:
        start, stop = spec.span(k)
        parts = []
        for b in range(start, stop, spec.batch):
            parts.append(render_batch(dit, meta, tokenizer, spec, b, min(stop, b + spec.batch)))
            if bar is not None:
                bar.update(min(len(parts[-1]) * world, bar.total - bar.n))
        with atomic_file(chunk_path(work, k)) as f:  # .chunk_KKKKKK.npy.XXXXXXXX.tmp until done
            np.save(f, np.concatenate(parts))


def _chunk(work: Path, k: int) -> np.ndarray:
    return np.load(chunk_path(work, k), mmap_mode="r")


def write_npz(path: Path, work: Path, spec: SampleSpec) -> Path:
    """The chunks as one ADM-format .npz (arr_0 images, arr_1 labels), written atomically and streamed: one chunk
    in memory at a time (np.savez would need the whole array, and its copy)."""
    first = _chunk(work, 0)
    shape = (spec.n, *first.shape[1:])
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                     "fortran_order": False, "shape": shape})
            for k in range(spec.chunks):
                part = _chunk(work, k)
                start, stop = spec.span(k)
                if part.shape != (stop - start, *shape[1:]) or part.dtype != np.uint8:
                    raise InputError(f"{chunk_path(work, k)}: {part.dtype} {part.shape}, expected uint8 "
                                     f"{(stop - start, *shape[1:])}; remove it to sample it again")
                f.write(memoryview(np.ascontiguousarray(part)).cast("B"))
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, spec.labels(0, spec.n))
    return path


def write_pngs(folder: Path, work: Path, spec: SampleSpec, chunks: list[int]) -> None:
    """One PNG per sample of `chunks` (each written atomically; those already there are kept)."""
    width = max(6, len(str(spec.n - 1)))
    for k in chunks:
        start, _ = spec.span(k)
        part = _chunk(work, k)
        for j, image in enumerate(part):
            target = folder / f"{start + j:0{width}d}.png"
            if not target.exists():
                with atomic_path(target) as tmp:
                    Image.fromarray(np.asarray(image)).save(tmp, format="PNG")


def write_grid(path: Path, work: Path, spec: SampleSpec) -> Path:
    """The first samples of the first classes, one row per class (sample r + K j in row r, column j)."""
    k = len(spec.classes)
    rows, cols = (min(GRID_ROWS, k), max(1, min(GRID_COLS, spec.n // k))) if spec.n >= k else (spec.n, 1)
    images = []
    for r in range(rows):
        row = [_chunk(work, i // spec.chunk)[i % spec.chunk] for i in range(r, r + k * cols, k)]
        images.append(torch.from_numpy(np.stack(row)).permute(0, 3, 1, 2).float() / 255)  # (cols, 3, H, W)
    return image_grid(images, path)


def _finish(out: Path, work: Path, spec: SampleSpec, want: dict, class_names: list[str], png: bool,
            stats: dict) -> dict[str, Path]:
    """PNGs (every rank its share), then on rank 0 the .npz, the grid and samples.json; the chunks removed."""
    if png:
        write_pngs(out / "png", work, spec, list(range(dist.rank(), spec.chunks, dist.world_size())))
        dist.barrier()
    if dist.rank() != 0:
        return {}
    paths = {"npz": write_npz(out / "samples.npz", work, spec), "grid": write_grid(out / "grid.png", work, spec)}
    names = [class_names[c] if c < len(class_names) else str(c) for c in spec.classes]
    paths["json"] = atomic_write_text(out / "samples.json", json.dumps(
        {"manifest": want, "count": spec.n, "class_names": names, **stats}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    if png:
        paths["png"] = out / "png"
    return paths


def sample_images(dit, meta: dict, tokenizer, out: str | Path, spec: SampleSpec, *, png: bool = False,
                  progress: bool = True) -> dict[str, Path]:
    """Sample spec.n images into OUT (see the module docstring), on every rank of the process group (or alone).
    Every rank calls it with the same arguments; returns the paths written (rank 0; {} on the others)."""
    out = Path(out)
    work = out / "chunks"
    if spec.cfg_scale != 1.0 and dit.config.num_classes <= 1:
        raise InputError("classifier-free guidance needs a class-conditional DiT (this one has no classes)")
    if max(spec.classes) >= max(1, dit.config.num_classes):
        raise InputError(f"class {max(spec.classes)}: this DiT has {dit.config.num_classes} classes")
    want = manifest(dit, meta, tokenizer, spec)
    pending = _agreed_plan(out, work, want, spec, png)
    main, world = dist.rank() == 0, dist.world_size()
    if pending is None:
        if main:
            print(f"vtp-fast sample: {out} already holds these {spec.n} samples")
        return {"npz": out / "samples.npz", "json": out / "samples.json"} if main else {}
    todo = sum(spec.span(k)[1] - spec.span(k)[0] for k in pending)
    if main:
        print(f"vtp-fast sample: {spec.n} images of {len(spec.classes)} classes ({spec.solver}, {spec.steps} steps, "
              f"cfg {spec.cfg_scale} in {list(spec.cfg_interval)}), {world} rank(s): {spec.n - todo} done in "
              f"earlier runs, {todo} to go -> {out}")
    bar = tqdm(total=todo, desc="sample", unit="img", dynamic_ncols=True) if main and progress else None
    begin = time.perf_counter()
    try:
        sample_chunks(dit, meta, tokenizer, spec, work, pending[dist.rank()::world], bar)
    finally:
        if bar is not None:
            bar.close()
    dist.barrier()
    seconds = time.perf_counter() - begin
    stats = {"sampled": todo, "seconds": round(seconds, 3), "images_per_s": round(todo / max(seconds, 1e-9), 3),
             "world_size": world}
    paths = _finish(out, work, spec, want, meta.get("class_names") or [], png, stats)
    if main:
        print(f"{todo} images in {seconds:.1f} s ({stats['images_per_s']:.1f} images/s) -> "
              + ", ".join(str(p) for p in paths.values()))
    return paths

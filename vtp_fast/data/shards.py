"""WebDataset tar shards in the img2dataset layout, with DALI-compatible index files.

A shard is a tar of samples `KEY.{jpg,png,webp}` + `KEY.txt` (caption) + optional `KEY.json` / `KEY.cls`, members of
one sample adjacent. Beside each `NAME.tar` the writer puts `NAME.idx` in DALI's wds2idx format (v1.2: a header
"v1.2 <samples>", then one line per sample listing `ext offset size name` for each member), so DALI's
`fn.readers.webdataset` and this module read the same files. With the index, any sample is one seek away:
`vtp_fast.data.shard_source.ShardSet[i]` returns the raw bytes of global sample i, which is what makes orders
deterministic and resumable (see vtp_fast.data.step_batches).

Bad shards are harmless: a missing shard is skipped, a missing index is rebuilt by scanning the tar (an unreadable
one too), a truncated or damaged tar keeps its complete samples, and a sample without an image is dropped. Every
damaged shard (missing, truncated, damaged, empty, unreadable index) warns once naming the file and the samples
kept; the counts are in `ShardSet.problems`, the files in `ShardSet.damaged` (vtp_fast.data.shard_source).
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vtp_fast.config import InputError
from vtp_fast.io import atomic_path, atomic_write_text

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = "v1.2"


def expand(spec: str | Sequence[str]) -> list[Path]:
    """'data/shard-{00000..00009}.tar' (brace-expanded), a directory (its *.tar, not the hidden temp files of an
    interrupted writer), or a list of either."""
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[Path] = []
    for s in specs:
        p = Path(str(s))
        if p.is_dir():
            out += sorted(f for f in p.glob("*.tar") if not f.name.startswith("."))
        else:
            out += [Path(x) for x in braceexpand(str(s))]
    return out


@dataclass
class Sample:
    """One image-text sample to write: encoded image bytes and their extension, caption, optional label/json."""

    image: bytes
    ext: str
    caption: str | None = None
    label: int | None = None
    meta: dict | None = None
    origin: str | None = None  # where it came from, for messages (not written)
    caption_from_name: bool = False  # the caption is the file name (no sidecar .txt)


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def scan_tar(path: Path) -> tuple[list[list[tuple[str, int, int, str]]], str | None]:
    """Samples of a tar as [(ext, data offset, size, member name), ...] groups, by scanning it, and the damage
    found: None, "empty_shard" (no member), "truncated_shard" (cut off: a member runs past the end of the file,
    or the end-of-archive blocks are missing) or "damaged_shard" (unreadable from some point on). A damaged tar
    yields its complete samples: a sample whose members stop at the damage is dropped."""
    groups: list[list[tuple[str, int, int, str]]] = []
    last, damage, end = None, None, 0
    size = path.stat().st_size
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                slash = m.name.rfind("/")
                dot = m.name.find(".", slash + 1)
                stem = m.name[:dot] if dot > slash + 1 else None
                if m.offset_data + m.size > size:
                    damage = "truncated_shard"
                    if groups and stem == last:  # the cut member belongs to the last sample: incomplete
                        groups.pop()
                    break
                end = _member_end(m.offset_data, m.size)
                if stem is None:  # no extension, or a hidden file
                    continue
                ext = m.name[dot + 1:]
                if stem != last:
                    groups.append([])
                    last = stem
                groups[-1].append((ext, m.offset_data, m.size, m.name))
    except (tarfile.TarError, OSError, EOFError):
        if size == 0:
            return [], "empty_shard"
        # members before the damage are whole; nothing but part of a header after them: the file was cut there
        damage = "truncated_shard" if size - end < 1024 else "damaged_shard"
    return groups, damage or _end_damage(groups, end, size)


def _member_end(offset: int, size: int) -> int:
    """Where a tar member whose data starts at `offset` ends: its data padded to whole 512-byte blocks."""
    return offset + -(-size // 512) * 512


def _end_damage(groups: list, end: int, size: int) -> str | None:
    """'empty_shard' for no sample, 'truncated_shard' when the end-of-archive blocks after the last member's data
    (ending at `end`) are missing, else None."""
    if not groups:
        return "empty_shard"
    return "truncated_shard" if size < end + 1024 else None  # a complete tar ends with two zero blocks


def index_entries(path: Path) -> list[list[tuple[str, int, int, str]]]:
    """The sample groups of a tar (see `scan_tar`), with a warning naming a damaged one."""
    groups, damage = scan_tar(path)
    if damage is not None:
        warnings.warn(f"{path}: {damage.replace('_', ' ')}; keeping its {len(groups)} complete samples",
                      stacklevel=2)
    return groups


def write_index(tar_path: Path, groups: list[list[tuple[str, int, int, str]]] | None = None) -> Path:
    """Write NAME.idx (DALI wds2idx v1.2) for NAME.tar, atomically."""
    groups = index_entries(tar_path) if groups is None else groups
    lines = [f"{INDEX_VERSION} {len(groups)}"] + [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in g) for g in groups]
    return atomic_write_text(tar_path.with_suffix(".idx"), "\n".join(lines) + "\n")


def read_index(idx: Path) -> list[list[tuple[str, int, int, str]]]:
    lines = idx.read_text().splitlines()
    version, count = lines[0].split()
    if version != INDEX_VERSION or int(count) != len(lines) - 1:
        raise ValueError(f"{idx}: not a {INDEX_VERSION} index of {count} samples")
    groups = []
    for line in lines[1:]:
        f = line.split()
        groups.append([(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)])
    return groups


def write_shards(samples: Iterable[Sample], out_dir: str | Path, *, prefix: str = "shard", per_shard: int = 1000,
                 total: int | None = None, progress: bool = True) -> list[Path]:
    """Write samples into out_dir/prefix-00000.tar, ... with their .idx files and a manifest.json; each shard is
    written to a temp file and renamed, so a reader never sees a half-written shard."""
    if per_shard < 1:
        raise ValueError(f"per_shard must be at least 1, got {per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    counts = Counter()
    bar = tqdm(total=total, desc=f"shards {out_dir.name}", unit="img", disable=not progress)
    it, i, end = iter(samples), 0, object()
    while (first := next(it, end)) is not end:
        final = out_dir / f"{prefix}-{len(paths):05d}.tar"
        # .PREFIX-XXXXXXXX.tar (hidden: `expand` skips it) until complete; then NAME.tar, readable by all
        with atomic_path(final, prefix=f".{prefix}-", suffix=".tar", perms=0o644) as tmp, \
                tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for s in itertools.chain([first], itertools.islice(it, per_shard - 1)):
                key = f"{i:09d}"
                ext = s.ext.lower().lstrip(".")
                _member(tar, f"{key}.{ext}", s.image)
                if s.caption is not None:
                    _member(tar, f"{key}.txt", s.caption.encode("utf-8"))
                if s.label is not None:
                    _member(tar, f"{key}.cls", str(int(s.label)).encode())
                if s.meta is not None:
                    _member(tar, f"{key}.json", json.dumps(s.meta).encode())
                counts["samples"] += 1
                counts[ext] += 1
                bar.update(1)
                i += 1
        write_index(final)
        paths.append(final)
    bar.close()
    (out_dir / "manifest.json").write_text(json.dumps({"prefix": prefix, "shards": len(paths), **counts}, indent=1))
    return paths


def shard_groups(path: Path) -> tuple[list[list[tuple[str, int, int, str]]], str | None, str | None]:
    """The sample groups of the tar at `path`, from its index (NAME.idx; rebuilt by scanning when missing or
    unreadable, see `scan_tar`), the damage found (None, or a `scan_tar` kind; an index of a tar cut off later names
    members past its end: the samples before the cut stay) and "unreadable_index" (warned, naming it) or None."""
    idx = path.with_suffix(".idx")
    groups, problem = None, None
    if idx.is_file():
        try:
            groups = read_index(idx)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            problem = "unreadable_index"
            warnings.warn(f"{idx}: unreadable index ({e}); rescanning the tar", stacklevel=3)
    if groups is None:
        return (*scan_tar(path), problem)
    size = path.stat().st_size
    whole = [x for x in groups if all(o + n <= size for _, o, n, _ in x)]
    end = max((_member_end(o, n) for x in whole for _, o, n, _ in x), default=0)
    return whole, "truncated_shard" if len(whole) < len(groups) else _end_damage(whole, end, size), problem


# ------------------------------------------------------------------------------------------------ sources
def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def emoji_samples(root: Path, styles: Sequence[str]) -> tuple[Iterator[Sample], int]:
    """The prepared emoji set as PNG samples: caption = emoji name, label = category id, json = style/key."""
    from vtp_fast.data.emoji import load_emoji

    data = load_emoji(root, styles)

    def gen():
        for i in range(len(data)):
            yield Sample(_png(data.images[i].numpy()), "png", data.captions[i], int(data.labels[i]),
                         {"style": data.styles[i], "key": data.keys[i], "category": data.categories[i]})

    return gen(), len(data)


FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")


def fashion_mnist_dir() -> Path:
    """Where Debian's dataset-fashion-mnist package put its IDX files."""
    import subprocess

    try:
        files = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = []
    hits = [Path(f).parent for f in files if f.endswith("train-images-idx3-ubyte.gz")]
    if not hits:
        raise InputError("Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")
    return hits[0]


def read_idx_gz(path: Path) -> np.ndarray:
    """An IDX file (gzip) -> numpy array (uint8 images (N, 28, 28) or labels (N,))."""
    import gzip

    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(split: str = "train", folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's split "train" or "test": images (N, 28, 28) uint8 and labels (N,) uint8."""
    folder = folder or fashion_mnist_dir()
    prefix = "train" if split == "train" else "t10k"
    return (read_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz"),
            read_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz"))


def fashion_mnist_samples(split: str = "train", folder: Path | None = None) -> tuple[Iterator[Sample], int]:
    """Fashion-MNIST as PNG samples (28x28 grayscale), caption "a photo of a {class}", label = class id."""
    images, labels = fashion_mnist(split, folder)

    def gen():
        for img, lab in zip(images, labels, strict=True):
            yield Sample(_png(img), "png", f"a photo of a {FASHION_CLASSES[lab]}", int(lab))

    return gen(), len(labels)


def folder_samples(folder: Path) -> tuple[Iterator[Sample], int]:
    """Every image under `folder` (recursively; hidden names skipped): caption from a sidecar NAME.txt, else the
    file name (underscores and dashes as spaces; `Sample.caption_from_name` says so); label = index of the parent
    folder among the sorted parent folders."""
    from vtp_fast.data.images import find_images

    files = find_images([folder])
    parents = {p: i for i, p in enumerate(sorted({f.parent for f in files}))}

    def gen():
        for f in files:
            side = f.with_suffix(".txt")
            named = not side.is_file()
            caption = f.stem.replace("_", " ").replace("-", " ") if named else side.read_text(errors="replace")
            yield Sample(f.read_bytes(), f.suffix.lower().lstrip("."), caption.strip(), parents[f.parent],
                         origin=str(f), caption_from_name=named)

    return gen(), len(files)


@dataclass
class Prepared:
    """What `prepare` did: samples skipped (origin, why), captions taken from file names, images re-encoded."""

    skipped: list[tuple[str, str]]
    from_names: int = 0
    reencoded: int = 0


def prepare(samples: Iterable[Sample], report: Prepared, short_side: int | None = None,
            max_side: int | None = None, quality: int | None = None) -> Iterator[Sample]:
    """Check, and optionally resize and re-encode, photos on their way into shards. A sample whose image does not
    decode, or whose caption is empty, is skipped and listed in `report` (never written). Resizing (bicubic,
    never up): the shorter side down to `short_side`, then the longer side down to `max_side`. Re-encoding (JPEG
    at `quality`, default 90) happens when an image is resized, when `quality` is given, or when its format is not
    one shards hold (IMAGE_EXTS)."""
    from vtp_fast.data.images import ImageError, downscale, open_rgb

    for s in samples:
        where = s.origin or "a sample"
        if s.caption is not None and not s.caption.strip():
            report.skipped.append((where, "empty caption"))
            continue
        try:
            img = open_rgb(s.image, name=where)
        except ImageError as e:
            report.skipped.append((where, str(e).split(": ", 1)[-1]))
            continue
        resized = downscale(img, short_side, max_side)
        if resized is not img or quality is not None or s.ext not in IMAGE_EXTS:
            buf = io.BytesIO()
            resized.save(buf, format="JPEG", quality=quality or 90)
            s.image, s.ext = buf.getvalue(), "jpg"
            report.reencoded += 1
        report.from_names += s.caption_from_name
        yield s


def table_samples(table: Path, path_col: str = "path", caption_col: str = "caption",
                  label_col: str | None = None) -> tuple[Iterator[Sample], int]:
    """A CSV (or Parquet, with pyarrow) of image paths (relative to the table) and captions."""
    table = Path(table)
    if table.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(table).to_pylist()
    else:
        import csv

        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
    missing = [c for c in (path_col, caption_col, label_col) if c and rows and c not in rows[0]]
    if missing:
        raise InputError(f"{table}: no column(s) {missing}; columns: {list(rows[0]) if rows else []}")

    def gen():
        for r in rows:
            p = (table.parent / str(r[path_col])).resolve()
            if not p.is_file():
                warnings.warn(f"{table}: {p} missing, skipped", stacklevel=2)
                continue
            label = int(r[label_col]) if label_col and r.get(label_col) not in (None, "") else None
            caption = r[caption_col]
            yield Sample(p.read_bytes(), p.suffix.lower().lstrip("."), "" if caption is None else str(caption),
                         label, origin=str(p))

    return gen(), len(rows)

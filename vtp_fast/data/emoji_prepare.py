"""Preparing the emoji set (`vtp_fast.data.emoji`): ``prepare_emoji`` fetches the npm tarballs with ``npm pack``,
renders every style once into a cache folder (the prepared folder's format is in vtp_fast.data.emoji) and returns
it."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vtp_fast import optional
from vtp_fast.data.emoji import STYLES, EmojiDataError, is_complete
from vtp_fast.io import default_cache_dir, temp_dir

NPM_PACKAGES: dict[str, str] = {
    "meta": "emoji-datasource@16.0.0",
    "google": "emoji-datasource-google@16.0.0",
    "twitter": "emoji-datasource-twitter@16.0.0",
    "fluent": "@lobehub/fluent-emoji-3d@1.1.0",
    "openmoji": "openmoji@17.0.0",
}

_FORMAT_VERSION = 1
_META_MEMBER = "package/emoji.json"
_SKIPPED_CATEGORY = "Component"
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class _Source:
    """Where one npm package keeps what we use, and under which terms."""

    prefix: str  # folder of the image files inside the tarball ("" for the metadata package)
    suffix: str  # image file extension
    licence: str
    supplies: str


_SOURCES: dict[str, _Source] = {
    "meta": _Source("", "", "MIT", "names, code points and categories (emoji.json only)"),
    "google": _Source("package/img/google/64/", ".png", "Apache-2.0", "Google Noto Color Emoji, 64x64 PNG"),
    "twitter": _Source("package/img/twitter/64/", ".png", "CC-BY-4.0", "Twitter Twemoji, 64x64 PNG"),
    "fluent": _Source("package/assets/", ".webp", "MIT", "Microsoft Fluent Emoji 3D, 256x256 WebP"),
    "openmoji": _Source("package/color/svg/", ".svg", "CC-BY-SA-4.0", "OpenMoji colour, SVG"),
}


@dataclass(frozen=True)
class _Emoji:
    """One base emoji of emoji.json."""

    key: str
    unified: str
    caption: str
    category: str
    subcategory: str
    short_names: tuple[str, ...]


def normalise_key(code_points: str) -> str:
    """Canonical key of a code-point string: lower case, '-' separated, U+FE0F removed, tag sequence closed.

    "1F469-200D-1F4BB" -> "1f469-200d-1f4bb"; "263A-FE0F" -> "263a"; Fluent's "1f3f4-e0067_e0062_..._e0067"
    -> "1f3f4-e0067-e0062-...-e0067-e007f" (its file names drop the cancel tag).
    """
    parts = [p for p in code_points.lower().replace("_", "-").split("-") if p and p != "fe0f"]
    if parts and len(parts[-1]) == 5 and "e0020" <= parts[-1] <= "e007e":  # ends on a tag, not on U+E007F
        parts.append("e007f")
    return "-".join(parts)


def prepare_emoji(
    cache_dir: Path | None = None, size: int = 64, tarball_dir: Path | None = None, progress: bool = True
) -> Path:
    """Build (once) the emoji set at ``size``x``size``; return its folder ``<cache>/emoji/prepared-<size>``.

    Tarballs come from ``tarball_dir`` when given, else from ``<cache>/emoji/npm`` (fetched there with
    ``npm pack`` when missing). The folder is built in a temporary sibling and renamed into place, so a
    half-built one is never seen; a complete one is returned without touching the tarballs.
    Raises :class:`EmojiDataError` when npm or a tarball is missing, a download fails or a package lacks
    the expected files.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "emoji"
    final = root / f"prepared-{size}"
    if is_complete(final):
        return final
    if not optional.available("resvg"):  # only preparing the OpenMoji style needs it
        raise EmojiDataError("resvg-py is missing; run `pip install resvg-py==0.5.0` to render OpenMoji")
    if tarball_dir is not None:
        tarballs = _local_tarballs(Path(tarball_dir))
    else:
        tarballs = _fetch_tarballs(root / "npm")
    root.mkdir(parents=True, exist_ok=True)
    # 0o755: a cache is readable like the rest of the folder; _publish keeps a folder another process finished first
    with temp_dir(root, prefix=f".prepared-{size}.tmp-", perms=0o755) as staging:
        _build(staging, tarballs, size, progress)
        return _publish(staging, final)


# ----------------------------------------------------------------------------------------------- tarballs


def _tarball_name(spec: str) -> str:
    """npm pack's file name: "@lobehub/fluent-emoji-3d@1.1.0" -> "lobehub-fluent-emoji-3d-1.1.0.tgz"."""
    name, _, version = spec.rpartition("@")
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def _local_tarballs(folder: Path) -> dict[str, Path]:
    """The tarball of every source in ``folder``; all must be there."""
    paths = {source: folder / _tarball_name(spec) for source, spec in NPM_PACKAGES.items()}
    for source, path in paths.items():
        if not path.is_file():
            spec = NPM_PACKAGES[source]
            raise EmojiDataError(f"{path} not found; run `npm pack {spec}` in {folder} or omit tarball_dir")
    return paths


def _fetch_tarballs(npm_dir: Path) -> dict[str, Path]:
    """The tarball of every source in ``npm_dir``, running ``npm pack`` for those not there yet."""
    missing = [spec for spec in NPM_PACKAGES.values() if not (npm_dir / _tarball_name(spec)).is_file()]
    if missing:
        _npm_pack(missing, npm_dir)
    return _local_tarballs(npm_dir)


def _npm_pack(specs: list[str], dest: Path) -> None:
    """Download ``specs`` with ``npm pack`` into ``dest``; each tarball appears there whole or not at all."""
    npm = shutil.which("npm")
    command = f"npm pack {' '.join(specs)}"
    if npm is None:
        raise EmojiDataError(f"npm not found on PATH; install Node.js or run `{command}`, pass tarball_dir=")
    dest.mkdir(parents=True, exist_ok=True)
    with temp_dir(dest, prefix=".npm-pack-", perms=0o700) as tmp:  # each tarball is moved out once complete
        args = [npm, "pack", *specs, "--pack-destination", str(tmp), "--silent"]
        proc = subprocess.run(args, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise EmojiDataError(f"`{command}` failed ({detail}); check access to the npm registry")
        for spec in specs:
            packed = tmp / _tarball_name(spec)
            if not packed.is_file():
                raise EmojiDataError(f"`{command}` made no {packed.name}; run it by hand, pass tarball_dir=")
            os.replace(packed, dest / packed.name)


def _iter_files(tarball: Path, prefix: str) -> Iterator[tuple[str, bytes]]:
    """(name below ``prefix``, content) of each regular file under ``prefix``, read in one streaming pass."""
    try:
        with tarfile.open(tarball, "r|*") as tar:
            for member in tar:
                if member.isfile() and member.name.startswith(prefix):
                    yield member.name[len(prefix) :], tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise EmojiDataError(f"cannot read {tarball} ({exc}); delete it and run again") from exc


# ------------------------------------------------------------------------------------------------- build


def _build(out: Path, tarballs: dict[str, Path], size: int, progress: bool) -> None:
    """Write every style, LICENSES.md and finally manifest.json into the empty folder ``out``."""
    start = time.perf_counter()
    catalogue = _read_catalogue(tarballs["meta"])
    stats, categories = {}, set()
    for style in STYLES:
        style_start = time.perf_counter()
        images, stats[style] = _render_style(style, tarballs[style], catalogue, size, progress)
        stats[style]["seconds"] = round(time.perf_counter() - style_start, 1)
        rows = [e for e in catalogue.values() if e.key in images]
        _write_style(out, style, rows, images)
        categories.update(e.category for e in rows)
    (out / "LICENSES.md").write_text(_licences_markdown(), "utf-8")
    manifest = {
        "format": _FORMAT_VERSION,
        "size": size,
        "packages": NPM_PACKAGES,
        "categories": sorted(categories),
        "emoji": len(catalogue),
        "styles": stats,
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), "utf-8")


def _read_catalogue(tarball: Path) -> dict[str, _Emoji]:
    """Base emoji of emoji.json by key, in ``sort_order``, the "Component" category left out."""
    content = next((data for _, data in _iter_files(tarball, _META_MEMBER)), None)
    if content is None:
        raise EmojiDataError(f"{tarball} lacks {_META_MEMBER}; delete it, fetch {NPM_PACKAGES['meta']} again")
    try:
        records = sorted(json.loads(content), key=lambda r: r["sort_order"])
        emoji = [_to_emoji(r) for r in records if r["category"] != _SKIPPED_CATEGORY]
    except (ValueError, KeyError, TypeError) as exc:
        raise EmojiDataError(f"{_META_MEMBER} in {tarball} is malformed ({exc}); delete it, rerun") from exc
    return {e.key: e for e in emoji}


def _to_emoji(record: dict) -> _Emoji:
    """An emoji.json record as an :class:`_Emoji`."""
    return _Emoji(
        key=normalise_key(record["unified"]),
        unified=record["unified"].lower(),
        caption=record["name"].lower(),
        category=record["category"],
        subcategory=record["subcategory"],
        short_names=tuple(record["short_names"]),
    )


def _render_style(
    style: str, tarball: Path, catalogue: dict[str, _Emoji], size: int, progress: bool
) -> tuple[dict[str, np.ndarray], dict]:
    """Render the images of one style by key, each (size, size, 3) uint8, with the counts for the manifest.

    A file is matched to an emoji by its fe0f-stripped code points; when two files match one emoji the one
    named by the fully-qualified sequence wins. Files that do not decode are skipped and listed as corrupt.
    """
    source = _SOURCES[style]
    images: dict[str, np.ndarray] = {}
    exact: dict[str, bool] = {}
    corrupt, files, unused = [], 0, 0
    with tqdm(total=len(catalogue), desc=f"emoji {style}", unit="img", disable=not progress) as bar:
        for name, data in _iter_files(tarball, source.prefix):
            if "/" in name or not name.endswith(source.suffix):
                continue
            files += 1
            stem = name[: -len(source.suffix)]
            entry = catalogue.get(normalise_key(stem))
            if entry is None:
                unused += 1
                continue
            key, is_exact = entry.key, stem.lower().replace("_", "-") == entry.unified
            if key in exact and (exact[key] or not is_exact):  # a better-named file of this emoji is in
                unused += 1
                continue
            try:
                image = _render(data, source.suffix, size)
            except _DECODE_ERRORS:
                corrupt.append(name)
                continue
            unused += key in images  # it replaces a file named without the fe0f of the qualified sequence
            bar.update(key not in images)
            images[key], exact[key] = image, is_exact
    if not images:
        raise EmojiDataError(
            f"{tarball} has no usable {source.suffix} images under {source.prefix} ({files} files, "
            f"{len(corrupt)} corrupt); delete it and fetch {NPM_PACKAGES[style]} again"
        )
    unmatched = [key for key in catalogue if key not in images]
    stats = {
        "images": len(images),
        "unmatched": len(unmatched),
        "corrupt": len(corrupt),
        "unused_files": unused,
        "unmatched_keys": unmatched,
        "corrupt_files": sorted(corrupt),
    }
    return images, stats


def _render(data: bytes, suffix: str, size: int) -> np.ndarray:
    """One image file (PNG, WebP or SVG bytes) composited onto white as (size, size, 3) uint8 RGB."""
    if suffix == ".svg":
        data = optional.module("resvg").svg_to_bytes(
            svg_string=data.decode("utf-8"), width=size, height=size, skip_system_fonts=True
        )
    with Image.open(io.BytesIO(data)) as opened:
        rgba = opened.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    if canvas.size != (size, size):
        canvas = canvas.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(canvas, dtype=np.uint8)


def _write_style(out: Path, style: str, rows: list[_Emoji], images: dict[str, np.ndarray]) -> None:
    """Write ``images_<style>.npy`` (N, S, S, 3) uint8 and ``index_<style>.jsonl``; pops ``images``."""
    first = images[rows[0].key]
    array = np.lib.format.open_memmap(
        out / f"images_{style}.npy", mode="w+", dtype=np.uint8, shape=(len(rows), *first.shape)
    )
    for i, entry in enumerate(rows):
        array[i] = images.pop(entry.key)
    array.flush()
    del array
    lines = "".join(json.dumps(asdict(entry)) + "\n" for entry in rows)
    (out / f"index_{style}.jsonl").write_text(lines, "utf-8")


def _licences_markdown() -> str:
    """LICENSES.md: one table row per npm package (package, version, licence, what it supplies)."""
    header = ["# Licences of the emoji data", "", "| package | version | licence | supplies |"]
    rows = [*header, "|---|---|---|---|"]
    for source, spec in NPM_PACKAGES.items():
        name, _, version = spec.rpartition("@")
        info = _SOURCES[source]
        rows.append(f"| {name} | {version} | {info.licence} | {info.supplies} |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------ cache folder


def _publish(staging: Path, final: Path) -> Path:
    """Rename the built ``staging`` folder to ``final``; if another process finished first, keep theirs."""
    if final.exists() and not is_complete(final):
        shutil.rmtree(final)
    try:
        os.rename(staging, final)
    except OSError:
        if not is_complete(final):
            raise
    return final


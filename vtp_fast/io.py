"""Atomic writes: write under a temporary name next to the target, then rename it into place.

Everything vtp_fast publishes (checkpoints, exported models, latent sets, shards and their indexes, caches) is
written this way, so a reader, or a run killed at any moment, sees either the previous content or the complete new
one, never a partial one. On any exception (KeyboardInterrupt included) the temporary is removed and the previous
content is left as it was.

    with atomic_file(path) as f:        # a binary file object; text=True for text
        f.write(data)
    with atomic_path(path) as tmp:      # a temporary path, for writers that take a file name (save_file, tarfile)
        save_file(state, str(tmp))
    with atomic_dir(path) as tmp:       # a temporary directory, renamed to `path` whole (replace_dir)
        (tmp / "config.json").write_text(...)
    atomic_write_bytes(path, data); atomic_write_text(path, text)
    with temp_dir(parent, prefix=".x-") as tmp: ...   # a scratch directory, always removed
    write_problem(path, folder=True)    # what would stop a write there (checked before any work), or None
    default_cache_dir()                 # where prepared and downloaded files are kept ($VTP_FAST_CACHE)
    same_plan(out, "plan.json", plan, temporaries, outputs)  # resume an extraction folder, or clear it for a new plan

Temporary names start with "." so that listings which skip hidden names (`vtp_fast.data.shards.expand`) never pick
them up, and they are part of this API: callers sweep what a killed process left behind by globbing for them
(`Checkpointer.sweep`: `.step_*.tmp-*` and `.step_*.old-*`).
    file        `.NAME.XXXXXXXX.tmp`  (`prefix` / `suffix` replace `.NAME.` / `.tmp`)
    directory   `.NAME.tmp-XXXXXXXX`  (`prefix` replaces `.NAME.tmp-`)
    set aside   `.NAME.old-PID`       (the previous directory while `replace_dir` swaps it)
The parent folder is created when missing. Files and directories get the mode a plain open() / mkdir() would give
them (0o666 / 0o777 less the umask) unless `perms` is given, which sets it exactly; so do the files written inside
`atomic_dir`. Whatever mode a writer gives the files (safetensors' save_file makes them 0o600) is replaced. By
default every file is fsynced before the rename, so a power loss cannot leave a renamed but empty file.

This module imports nothing from the rest of vtp_fast: it sits below every layer.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_dir", "atomic_file", "atomic_path", "atomic_write_bytes", "atomic_write_text", "default_cache_dir",
           "file_mode", "fsync_tree", "replace_dir", "same_plan", "temp_dir", "write_problem"]

_ATTEMPTS = 100


def default_cache_dir() -> Path:
    """Where vtp_fast keeps what it prepares or downloads (the emoji set, the FID weights and statistics):
    ``$VTP_FAST_CACHE`` if set, else ``~/.cache/vtp_fast``."""
    env = os.environ.get("VTP_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vtp_fast"


def _fresh(parent: Path, prefix: str, suffix: str, make: Callable[[Path], None]) -> Path:
    """A new name `parent/PREFIX + 8 random hex digits + SUFFIX`, created by `make` (which must fail with
    FileExistsError on a name that is taken, as O_EXCL and mkdir do)."""
    for _ in range(_ATTEMPTS):
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            make(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{parent}: no free temporary name {prefix}XXXXXXXX{suffix} after {_ATTEMPTS} tries")


def _new_file(path: Path, perms: int | None) -> None:
    # Private until `perms` is applied; without `perms` the umask decides, as for open().
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if perms is None else 0o600))


def file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the umask (read from /proc where it says it, since reading it
    through os.umask changes it for every thread for a moment)."""
    try:
        mask = int(re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.M).group(1), 8)
    except (OSError, AttributeError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_problem(path: str | Path, folder: bool = False) -> str | None:
    """What would stop writing `path` as a file (or, with `folder`, a folder that is filled or replaced whole),
    found without writing anything: a folder where a file goes or the reverse, a file where a parent folder goes,
    a folder this process cannot write in. None when nothing does."""
    path = Path(path)
    if path.is_dir() != folder and path.exists():
        return "is a folder (name a file in it)" if path.is_dir() else "exists and is not a folder"
    where = path if path.is_dir() else path.parent  # where the new names are made
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        return f"{where} is a file, not a folder"
    if not os.access(where, os.W_OK | os.X_OK):
        return f"cannot write in {where} (permission denied)"
    return None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(root: Path) -> None:
    """fsync every regular file under the directory `root`."""
    for f in Path(root).rglob("*"):
        if f.is_file() and not f.is_symlink():
            _fsync_file(f)


@contextmanager
def atomic_path(path: str | Path, *, prefix: str | None = None, suffix: str = ".tmp", perms: int | None = None,
                fsync: bool = True) -> Iterator[Path]:
    """Yield the path of a new empty temporary file beside `path` (`.NAME.XXXXXXXX.tmp`); when the block ends
    normally, fsync it (unless `fsync` is false), set `perms` and rename it to `path` (replacing a file there). On
    any exception it is removed and `path` is left untouched. The block may rewrite the temporary by name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}." if prefix is None else prefix
    tmp = _fresh(path.parent, prefix, suffix, lambda p: _new_file(p, perms))
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        tmp.chmod(file_mode() if perms is None else perms)  # also when the writer made the file anew
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: str | Path, *, text: bool = False, encoding: str = "utf-8", prefix: str | None = None,
                suffix: str = ".tmp", perms: int | None = None, fsync: bool = True) -> Iterator[IO]:
    """Yield a file object open for writing (binary, or text in `encoding` with `text=True`) on a temporary file
    beside `path`; on success it is flushed, fsynced and renamed to `path`, on any exception removed (see
    `atomic_path`)."""
    with atomic_path(path, prefix=prefix, suffix=suffix, perms=perms, fsync=False) as tmp:
        with open(tmp, "w", encoding=encoding) if text else open(tmp, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes, **kwargs) -> Path:
    """Write `data` to `path` atomically (keyword arguments as for `atomic_path`); returns `path`."""
    with atomic_file(path, **kwargs) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8", **kwargs) -> Path:
    """Write `text` to `path` atomically (keyword arguments as for `atomic_path`); returns `path`."""
    with atomic_file(path, text=True, encoding=encoding, **kwargs) as f:
        f.write(text)
    return Path(path)


@contextmanager
def temp_dir(parent: str | Path, *, prefix: str, perms: int | None = None) -> Iterator[Path]:
    """Yield a new directory `parent/PREFIX + 8 random hex digits` (`parent` created when missing), removed with
    whatever it still holds when the block ends, however it ends. A scratch area whose results the block moves out
    (or renames whole) before it ends."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(parent, prefix, "", lambda p: p.mkdir(0o777 if perms is None else 0o700))
    try:
        if perms is not None:
            tmp.chmod(perms)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | Path, *, prefix: str | None = None, perms: int | None = None,
               fsync: bool = True) -> Iterator[Path]:
    """Yield a new empty directory beside `path` (`.NAME.tmp-XXXXXXXX`); fill it in the block. When the block
    ends normally, every file in it gets the mode open() gives (`file_mode`) and is fsynced (unless `fsync` is
    false), and it replaces `path` whole
    (`replace_dir`: an existing `path` is set aside and restored if the rename fails). On any exception, or if
    the replacement fails, the temporary directory is removed and `path` keeps its previous content."""
    path = Path(path)
    with temp_dir(path.parent, prefix=f".{path.name}.tmp-" if prefix is None else prefix, perms=perms) as tmp:
        yield tmp
        mode = file_mode()
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                f.chmod(mode)
                if fsync:
                    _fsync_file(f)
        replace_dir(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory `src` to `dst`; an existing `dst` is moved aside (`.NAME.old-PID`) first and
    restored if the move fails. A process killed between the two renames leaves the old directory aside, never a
    partial `dst`."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def same_plan(out: str | Path, name: str, plan: dict, temporaries: Sequence[str], outputs: Sequence[str]) -> bool:
    """Prepare folder `out` for a resumable extraction by `plan`, kept as JSON in file `name` (call on one process):
    True when the same plan is there (its finished outputs stay); otherwise every file matching the `outputs` globs
    of an earlier extraction is removed (other files are left), the plan written, and False. Files matching the
    `temporaries` globs, left by a killed writer, are removed either way."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in temporaries:
        for tmp in out.glob(pattern):
            tmp.unlink(missing_ok=True)
    path = out / name
    if path.is_file() and json.loads(path.read_text()) == plan:
        return True
    for pattern in outputs:
        for f in out.glob(pattern):
            f.unlink(missing_ok=True)
    atomic_write_text(path, json.dumps(plan, indent=1))
    return False

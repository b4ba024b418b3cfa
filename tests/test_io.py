"""vtp_fast.io: a write either lands whole under its final name or leaves the previous content and no temporary."""

import ast
import os
import stat
from pathlib import Path

import pytest

import vtp_fast.io as vio
from vtp_fast.io import (
    atomic_dir,
    atomic_file,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    default_cache_dir,
    replace_dir,
    temp_dir,
)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def fail_renames_from(monkeypatch, prefix: str) -> None:
    """Make os.replace fail for any source whose name starts with `prefix` (the temporary's)."""
    real = os.replace

    def flaky(src, dst):
        if Path(src).name.startswith(prefix):
            raise OSError(f"simulated rename failure of {src}")
        return real(src, dst)

    monkeypatch.setattr(vio.os, "replace", flaky)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ------------------------------------------------------------------------------------------------ files
def test_write_bytes_and_text_replace_and_leave_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.bin"  # the parent is created
    assert atomic_write_bytes(path, b"one") == path
    assert atomic_write_bytes(path, b"two") == path
    assert path.read_bytes() == b"two"
    text = tmp_path / "b.txt"
    atomic_write_text(text, "grüße\n")
    assert text.read_text("utf-8") == "grüße\n"
    assert names(tmp_path) == ["b.txt", "sub"] and names(tmp_path / "sub") == ["a.bin"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_file_keeps_the_old_content_and_no_temporary(tmp_path, error):
    path = tmp_path / "a.txt"
    path.write_text("old")
    seen = []
    with pytest.raises(error):
        with atomic_file(path, text=True) as f:
            seen.append(Path(f.name))
            f.write("half of the new")
            raise error("interrupted")
    assert path.read_text() == "old"
    assert names(tmp_path) == ["a.txt"]
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".a.txt.") and seen[0].name.endswith(".tmp")


def test_failed_rename_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    fail_renames_from(monkeypatch, ".a.bin.")
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and names(tmp_path) == ["a.bin"]


def test_atomic_path_names_and_modes(tmp_path, umask_022):
    path = tmp_path / "shard-00000.tar"
    with atomic_path(path, prefix=".shard-", suffix=".tar") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".shard-") and tmp.name.endswith(".tar")
        assert tmp.is_file() and not path.exists()
        tmp.write_bytes(b"by name")  # writers that take a file name rewrite it
    assert path.read_bytes() == b"by name" and names(tmp_path) == ["shard-00000.tar"]
    assert mode(path) == 0o644  # as open() makes it under the umask
    atomic_write_bytes(path, b"x", perms=0o600)
    assert mode(path) == 0o600  # exactly `perms`
    atomic_write_bytes(path, b"x", perms=0o640, fsync=False)
    assert mode(path) == 0o640


@pytest.mark.parametrize("where", ["file", "folder"])
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_writer_that_makes_its_file_anew_does_not_decide_its_mode(where, umask, tmp_path):
    """safetensors' save_file writes a new 0o600 file over the temporary (`vtp-fast encode` and `export` made
    0o600 files): what is published has the mode open() gives under the umask, in atomic_path and in atomic_dir."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        if where == "file":
            with atomic_path(tmp_path / "z.safetensors") as tmp:
                save_file({"a": torch.zeros(2)}, str(tmp))
            published = tmp_path / "z.safetensors"
        else:
            with atomic_dir(tmp_path / "model") as tmp:
                save_file({"a": torch.zeros(2)}, str(tmp / "model.safetensors"))
            published = tmp_path / "model" / "model.safetensors"
            assert mode(published.parent) == 0o777 & ~umask
    finally:
        os.umask(old)
    assert mode(published) == 0o666 & ~umask


def test_write_problem_says_what_would_stop_a_write(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    assert vio.write_problem(tmp_path / "new.bin") is None and vio.write_problem(tmp_path / "file") is None
    assert vio.write_problem(tmp_path / "a" / "b", folder=True) is None  # parents are made
    assert vio.write_problem(tmp_path / "dir", folder=True) is None
    assert vio.write_problem(tmp_path / "file", folder=True) == "exists and is not a folder"
    assert vio.write_problem(tmp_path / "dir") == "is a folder (name a file in it)"
    assert vio.write_problem(tmp_path / "file" / "a" / "b") == f"{tmp_path / 'file'} is a file, not a folder"
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "dir").chmod(0o500)
        assert vio.write_problem(tmp_path / "dir" / "x") == f"cannot write in {tmp_path / 'dir'} (permission denied)"
        (tmp_path / "dir").chmod(0o700)
    assert not list((tmp_path / "dir").iterdir())  # nothing written


def test_atomic_file_yields_a_binary_file_by_default(tmp_path):
    with atomic_file(tmp_path / "a") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "a").read_bytes() == b"\x00\x01"


# ---------------------------------------------------------------------------------------------- folders
def test_atomic_dir_replaces_the_folder_whole(tmp_path, umask_022):
    path = tmp_path / "model"
    with atomic_dir(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-") and not path.exists()
        (tmp / "a").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("2")
    assert names(path) == ["a", "sub"] and mode(path) == 0o755
    with atomic_dir(path, perms=0o700, fsync=False) as tmp:
        (tmp / "c").write_text("3")
    assert names(path) == ["c"] and mode(path) == 0o700  # nothing of the old folder is left
    assert names(tmp_path) == ["model"]  # no .model.tmp-* nor .model.old-*


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_dir_keeps_the_old_folder_and_no_temporary(tmp_path, error):
    path = tmp_path / "step_00000010"
    path.mkdir()
    (path / "a").write_text("old")
    with pytest.raises(error):
        with atomic_dir(path) as tmp:
            (tmp / "a").write_text("new")
            raise error("interrupted")
    assert names(path) == ["a"] and (path / "a").read_text() == "old"
    assert names(tmp_path) == ["step_00000010"]


def test_failed_dir_rename_restores_the_old_folder(tmp_path, monkeypatch):
    path = tmp_path / "step_00000010"
    path.mkdir()
    (path / "a").write_text("old")
    fail_renames_from(monkeypatch, ".step_00000010.tmp-")  # the old folder is set aside, the new one fails
    with pytest.raises(OSError, match="simulated"):
        with atomic_dir(path) as tmp:
            (tmp / "a").write_text("new")
    assert (path / "a").read_text() == "old"
    assert names(tmp_path) == ["step_00000010"]  # restored from .step_00000010.old-PID, temporary removed


def test_failed_first_dir_rename_leaves_nothing(tmp_path, monkeypatch):
    fail_renames_from(monkeypatch, ".new.tmp-")
    with pytest.raises(OSError, match="simulated"):
        with atomic_dir(tmp_path / "deeper" / "new") as tmp:
            (tmp / "a").write_text("x")
    assert names(tmp_path / "deeper") == []


def test_replace_dir_sets_the_old_folder_aside_under_the_swept_name(tmp_path, monkeypatch):
    """A process killed between the two renames leaves `.NAME.old-PID` (Checkpointer.sweep globs .step_*.old-*)."""
    src, dst = tmp_path / "src", tmp_path / "step_00000001"
    src.mkdir()
    dst.mkdir()
    (dst / "a").write_text("old")
    real, calls = os.replace, []

    def killed_after_first(a, b):
        calls.append((Path(a).name, Path(b).name))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the second rename never happens ...
        return real(a, b)

    monkeypatch.setattr(vio.os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(src, dst)
    assert calls[0] == ("step_00000001", f".step_00000001.old-{os.getpid()}")
    assert calls[1] == ("src", "step_00000001")
    # ... and the restore (third call) put the old folder back
    assert calls[2] == (f".step_00000001.old-{os.getpid()}", "step_00000001")
    assert (dst / "a").read_text() == "old"
    assert list(tmp_path.glob(".step_*.old-*")) == []


def test_temp_dir_is_removed_however_the_block_ends(tmp_path):
    with temp_dir(tmp_path, prefix=".scratch-", perms=0o755) as tmp:
        assert tmp.name.startswith(".scratch-") and mode(tmp) == 0o755
        (tmp / "f").write_text("x")
    assert names(tmp_path) == []
    with pytest.raises(RuntimeError):
        with temp_dir(tmp_path / "made", prefix=".scratch-") as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError
    assert names(tmp_path / "made") == []


def test_temporary_names_are_fresh(tmp_path):
    with atomic_dir(tmp_path / "d") as a, atomic_dir(tmp_path / "e", prefix=".d.tmp-") as b:
        assert a != b and a.name.startswith(".d.tmp-") and b.name.startswith(".d.tmp-")


def test_io_imports_nothing_from_vtp_fast():
    """vtp_fast.io sits below every layer."""
    tree = ast.parse(Path(vio.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert not relative and not [m for m in imported if m.split(".")[0] == "vtp_fast"], imported


def test_default_cache_dir_honours_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VTP_FAST_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("VTP_FAST_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "vtp_fast"

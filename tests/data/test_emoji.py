"""Tests of vtp_fast.data.emoji on small fake npm tarballs laid out like the real packages (no network)."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vtp_fast.data import emoji_prepare
from vtp_fast.data.emoji import STYLES, EmojiDataError, EmojiSet, load_emoji
from vtp_fast.data.emoji_prepare import NPM_PACKAGES, normalise_key, prepare_emoji

SIZE = 32
TARBALLS = {  # the names `npm pack` gives the real packages
    "meta": "emoji-datasource-16.0.0.tgz",
    "google": "emoji-datasource-google-16.0.0.tgz",
    "twitter": "emoji-datasource-twitter-16.0.0.tgz",
    "fluent": "lobehub-fluent-emoji-3d-1.1.0.tgz",
    "openmoji": "openmoji-17.0.0.tgz",
}
CATALOGUE = [  # emoji.json records, deliberately not in sort_order
    {"name": "KISSING CAT FACE WITH CLOSED EYES", "unified": "1F63D", "category": "Smileys & Emotion",
     "subcategory": "cat-face", "short_names": ["kissing_cat"], "sort_order": 1, "image": "1f63d.png"},
    {"name": "Transgender Symbol", "unified": "26A7-FE0F", "category": "Symbols",
     "subcategory": "gender", "short_names": ["transgender"], "sort_order": 0, "image": "26a7-fe0f.png"},
    {"name": "DOG FACE", "unified": "1F436", "category": "Animals & Nature",
     "subcategory": "animal-mammal", "short_names": ["dog"], "sort_order": 2, "image": "1f436.png"},
    {"name": "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "unified": "1F3FB", "category": "Component",
     "subcategory": "skin-tone", "short_names": ["skin-tone-2"], "sort_order": 3, "image": "1f3fb.png"},
]
# Image files per style: (file name, RGB of the opaque left half, or None for a corrupt file).
FILES = {
    "google": [("26a7-fe0f.png", (200, 0, 0)), ("1f63d.png", (0, 200, 0)), ("1f436.png", None),
               ("1f3fb.png", (9, 9, 9)), ("1f63d-1f3fb.png", (8, 8, 8))],
    "twitter": [("26a7.png", (210, 10, 0)), ("1f63d.png", (10, 210, 0)), ("1f436.png", (10, 10, 210)),
                ("1f3fb.png", (9, 9, 9))],
    "fluent": [("26a7.webp", (1, 2, 3)), ("26a7-fe0f.webp", (220, 20, 0)), ("1f63d.webp", (20, 220, 0)),
               ("1f436.webp", (20, 20, 220)), ("1f3fb.webp", (9, 9, 9))],
    "openmoji": [("26A7-FE0F.svg", (230, 30, 0)), ("1F63D.svg", (30, 230, 0)), ("1F3FB.svg", (9, 9, 9))],
}
FOLDERS = {"google": "package/img/google/64/", "twitter": "package/img/twitter/64/",
           "fluent": "package/assets/", "openmoji": "package/color/svg/"}
EXPECTED_KEYS = {"google": ["26a7", "1f63d"], "twitter": ["26a7", "1f63d", "1f436"],
                 "fluent": ["26a7", "1f63d", "1f436"], "openmoji": ["26a7", "1f63d"]}
CAPTIONS = {"26a7": "transgender symbol", "1f63d": "kissing cat face with closed eyes", "1f436": "dog face"}
ALL_CATEGORIES = ["Animals & Nature", "Smileys & Emotion", "Symbols"]


def _raster(rgb: tuple[int, int, int], fmt: str, side: int = 64) -> bytes:
    """A side x side RGBA image: left half opaque ``rgb``, right half fully transparent black."""
    pixels = np.zeros((side, side, 4), np.uint8)
    pixels[:, : side // 2] = (*rgb, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def _svg(rgb: tuple[int, int, int]) -> bytes:
    """An OpenMoji-like 72x72 SVG: left half filled with ``rgb``, right half empty."""
    fill = "#{:02X}{:02X}{:02X}".format(*rgb)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
            f'<rect x="0" y="0" width="36" height="72" fill="{fill}"/></svg>').encode()


def _file_bytes(name: str, rgb: tuple[int, int, int] | None) -> bytes:
    if rgb is None:
        return b"\x89PNG\r\n\x1a\n" + b"this is not a png" * 4
    if name.endswith(".svg"):
        return _svg(rgb)
    return _raster(rgb, "WEBP" if name.endswith(".webp") else "PNG")


def _write_tarball(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _make_tarballs(folder: Path, files: dict[str, list] = FILES) -> Path:
    """Write the five fake npm tarballs into ``folder`` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"package/package.json": b"{}", "package/emoji.json": json.dumps(CATALOGUE).encode()}
    _write_tarball(folder / TARBALLS["meta"], meta)
    for style, entries in files.items():
        members = {"package/package.json": b"{}"}
        members.update({FOLDERS[style] + name: _file_bytes(name, rgb) for name, rgb in entries})
        _write_tarball(folder / TARBALLS[style], members)
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("emoji")
    return prepare_emoji(cache_dir=tmp / "cache", size=SIZE, tarball_dir=_make_tarballs(tmp / "npm"),
                         progress=False)


def test_prepared_layout_and_shapes(prepared: Path) -> None:
    assert prepared == prepared.parent / f"prepared-{SIZE}" and prepared.parent.name == "emoji"
    per_style = [f"{kind}_{s}.{ext}" for s in STYLES for kind, ext in (("images", "npy"), ("index", "jsonl"))]
    assert sorted(p.name for p in prepared.iterdir()) == sorted(["LICENSES.md", "manifest.json", *per_style])
    data = load_emoji(prepared)
    assert data.images.dtype == torch.uint8 and data.images.shape == (10, SIZE, SIZE, 3)
    assert len(data) == 10 and data.labels.dtype == torch.int64 and data.labels.shape == (10,)
    assert np.load(prepared / "images_fluent.npy").shape == (3, SIZE, SIZE, 3)


def test_rows_matched_by_fe0f_stripped_keys_in_sort_order(prepared: Path) -> None:
    data = load_emoji(prepared)
    assert data.styles == [s for s in STYLES for _ in EXPECTED_KEYS[s]]
    assert data.keys == [k for s in STYLES for k in EXPECTED_KEYS[s]]
    assert data.captions == [CAPTIONS[k] for k in data.keys]
    assert "1f3fb" not in data.keys and "Component" not in data.category_names


def test_alpha_composited_on_white_and_each_file_lands_on_its_emoji(prepared: Path) -> None:
    data = load_emoji(prepared)
    colours = {(s, normalise_key(n.rsplit(".", 1)[0])): rgb for s, files in FILES.items() for n, rgb in files}
    colours[("fluent", "26a7")] = dict(FILES["fluent"])["26a7-fe0f.webp"]  # the qualified name wins
    for i, (style, key) in enumerate(zip(data.styles, data.keys, strict=True)):
        image = data.images[i].numpy().astype(int)
        assert (image[:, -4:] == 255).all(), (style, key)  # transparent black became white
        assert np.abs(image[:, :4] - np.array(colours[style, key])).max() <= 1, (style, key)


@pytest.mark.parametrize("qualified_first", [True, False])
def test_fully_qualified_file_wins_whatever_the_order(tmp_path: Path, qualified_first: bool) -> None:
    fluent = [("26a7-fe0f.webp", (220, 20, 0)), ("26a7.webp", (1, 2, 3)), ("1f63d.webp", (20, 220, 0))]
    files = {**FILES, "fluent": fluent if qualified_first else [fluent[1], fluent[0], fluent[2]]}
    root = prepare_emoji(tmp_path / "c", size=SIZE, tarball_dir=_make_tarballs(tmp_path / "npm", files),
                         progress=False)
    data = load_emoji(root, ["fluent"])
    assert data.keys == ["26a7", "1f63d"]
    assert data.images[0, 0, 0].tolist() == [220, 20, 0]
    assert json.loads((root / "manifest.json").read_text())["styles"]["fluent"]["unused_files"] == 1


def test_manifest_counts_corrupt_unmatched_and_unused(prepared: Path) -> None:
    manifest = json.loads((prepared / "manifest.json").read_text())
    google, openmoji, fluent = (manifest["styles"][s] for s in ("google", "openmoji", "fluent"))
    assert (google["images"], google["corrupt"], google["corrupt_files"]) == (2, 1, ["1f436.png"])
    assert google["unmatched_keys"] == ["1f436"] and google["unused_files"] == 2  # component and skin variant
    assert (openmoji["images"], openmoji["corrupt"], openmoji["unmatched_keys"]) == (2, 0, ["1f436"])
    assert (fluent["images"], fluent["corrupt"], fluent["unmatched"], fluent["unused_files"]) == (3, 0, 0, 2)
    assert manifest["size"] == SIZE and manifest["emoji"] == 3 and manifest["categories"] == ALL_CATEGORIES
    licences = (prepared / "LICENSES.md").read_text()
    for licence in ("Apache-2.0", "CC-BY-4.0", "MIT", "CC-BY-SA-4.0"):
        assert licence in licences
    assert all(spec.rpartition("@")[0] in licences for spec in NPM_PACKAGES.values())


def test_second_call_returns_cached_dir_without_rebuilding(prepared: Path, monkeypatch) -> None:
    manifest_mtime = (prepared / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(emoji_prepare, "_build", lambda *a, **k: pytest.fail("rebuilt a complete prepared dir"))
    again = prepare_emoji(cache_dir=prepared.parent.parent, size=SIZE, tarball_dir=Path("/nonexistent"))
    assert again == prepared and (prepared / "manifest.json").stat().st_mtime_ns == manifest_mtime


def test_failed_build_leaves_no_prepared_or_temp_dir(tmp_path: Path) -> None:
    tarballs = _make_tarballs(tmp_path / "npm")
    _write_tarball(tarballs / TARBALLS["fluent"], {"package/package.json": b"{}"})  # no assets/ at all
    with pytest.raises(EmojiDataError, match="fluent-emoji-3d@1.1.0"):
        prepare_emoji(tmp_path / "c", size=SIZE, tarball_dir=tarballs, progress=False)
    assert list((tmp_path / "c" / "emoji").iterdir()) == []


def test_load_emoji_filters_styles_and_keeps_all_categories(prepared: Path) -> None:
    data = load_emoji(prepared, ["openmoji", "google"])
    assert data.styles == ["openmoji"] * 2 + ["google"] * 2 and data.keys == ["26a7", "1f63d"] * 2
    assert data.category_names == ALL_CATEGORIES  # dog (Animals) is in neither style but in the set
    assert [data.category_names[i] for i in data.labels.tolist()] == data.categories
    assert data.categories == ["Symbols", "Smileys & Emotion"] * 2
    full = load_emoji(prepared)
    assert torch.equal(data.images[:2], full.images[-2:]) and torch.equal(data.images[2:], full.images[:2])


def test_unknown_or_repeated_style_is_a_value_error(prepared: Path) -> None:
    with pytest.raises(ValueError, match=r"'sepia'.*google.*twitter.*fluent.*openmoji"):
        load_emoji(prepared, ["google", "sepia"])
    with pytest.raises(ValueError, match="repeat"):
        load_emoji(prepared, ["google", "google"])


def test_subset_takes_rows_in_order(prepared: Path) -> None:
    data = load_emoji(prepared)
    rows = [4, 0]
    part = data.subset(torch.tensor(rows))
    assert len(part) == 2 and part.keys == [data.keys[i] for i in rows]
    assert part.styles == [data.styles[i] for i in rows] and part.captions == [data.captions[i] for i in rows]
    assert torch.equal(part.images, data.images[rows]) and part.labels.tolist() == data.labels[rows].tolist()
    assert part.category_names == data.category_names and data.subset([1]).keys == [data.keys[1]]


def test_normalise_key() -> None:
    assert normalise_key("1F469-200D-1F4BB") == "1f469-200d-1f4bb"
    assert normalise_key("0023-FE0F-20E3") == normalise_key("0023-20e3") == "0023-20e3"
    england = "1F3F4-E0067-E0062-E0065-E006E-E0067-E007F"
    assert normalise_key("1f3f4-e0067_e0062_e0065_e006e_e0067") == normalise_key(england)  # Fluent's naming


def test_missing_tarball_names_the_npm_command(tmp_path: Path) -> None:
    tarballs = _make_tarballs(tmp_path / "npm")
    (tarballs / TARBALLS["openmoji"]).unlink()
    with pytest.raises(EmojiDataError, match=r"npm pack openmoji@17\.0\.0"):
        prepare_emoji(tmp_path / "c", size=SIZE, tarball_dir=tarballs, progress=False)


def test_missing_npm_is_an_emoji_data_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(emoji_prepare.shutil, "which", lambda name: None)
    with pytest.raises(EmojiDataError, match="npm not found"):
        prepare_emoji(tmp_path / "c", size=SIZE, progress=False)


def test_fetches_missing_tarballs_with_npm_pack(tmp_path: Path, monkeypatch) -> None:
    source = _make_tarballs(tmp_path / "registry")
    log = tmp_path / "npm-args.json"
    fake = tmp_path / "bin" / "npm"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, shutil, sys\n"
        "args = sys.argv[1:]\n"
        f"json.dump(args, open({str(log)!r}, 'w'))\n"
        "dest = args[args.index('--pack-destination') + 1]\n"
        f"for name in {sorted(TARBALLS.values())!r}:\n"
        f"    shutil.copy({str(source)!r} + '/' + name, dest)\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    root = prepare_emoji(tmp_path / "c", size=SIZE, progress=False)
    args = json.loads(log.read_text())
    assert args[0] == "pack" and set(NPM_PACKAGES.values()) <= set(args)
    assert sorted(p.name for p in (tmp_path / "c" / "emoji" / "npm").iterdir()) == sorted(TARBALLS.values())
    assert len(load_emoji(root)) == 10


def test_load_emoji_of_unprepared_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(EmojiDataError, match="prepare_emoji"):
        load_emoji(tmp_path)


def test_emoji_set_rejects_fields_of_different_lengths() -> None:
    images = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    labels = torch.zeros(2, dtype=torch.long)
    ok = EmojiSet(images, ["a", "b"], ["1", "2"], ["google"] * 2, ["X"] * 2, ["X"], labels)
    assert len(ok) == 2
    with pytest.raises(ValueError, match="length"):
        EmojiSet(images, ["a"], ["1", "2"], ["google"] * 2, ["X"] * 2, ["X"], labels)

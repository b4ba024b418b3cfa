"""The `data` command: bundled data sets prepared (the emoji set), and image sets written as WebDataset shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vtp_fast.cli.common import POSITIVE, Commands, ints
from vtp_fast.config import InputError

SHARD_RULES = """

An image folder: every image under it (recursively, hidden names skipped); its caption is the text of NAME.txt
beside it, else its file name (underscores and dashes as spaces; the count is reported); its label (KEY.cls) is
the index of its folder among the sorted folders. A table: one row per image, a path (relative to the table), a
caption and optionally an integer label. Images that do not decode and empty captions are skipped and listed in
OUT/skipped.txt; nothing else is changed unless --short-side, --max-side or --quality ask for it."""


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
        from vtp_fast.data.emoji import STYLES
        from vtp_fast.data.emoji_prepare import prepare_emoji
        from vtp_fast.io import default_cache_dir

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
    from vtp_fast.data.emoji import load_emoji
    from vtp_fast.data.emoji_prepare import prepare_emoji
    from vtp_fast.io import default_cache_dir

    root = prepare_emoji(Path(args.cache) if args.cache else default_cache_dir(), size=args.size)
    data = load_emoji(root)
    print(f"emoji set: {len(data)} images, {len(data.category_names)} categories -> {root}")
    print(f"licences: {root / 'LICENSES.md'}")
    return 0


def add_commands(sub: Commands) -> None:
    p = sub.add_parser("data", help="prepare bundled data sets")
    data_sub = Commands(p.add_subparsers(dest="dataset", required=True, metavar="DATASET", title="data sets"))
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
    q.add_argument("--quality", type=ints(1, 100), help="photos: re-encode every image as JPEG at this quality "
                                                        "(resized ones always are, at 90)")
    q.set_defaults(func=cmd_data_shards)

"""The `eval` command: a tokenizer's reconstruction FID, zero-shot accuracy and linear probe, and generation scores
of DiT samples (FID, or ADM's suite), each printed as one JSON object."""

from __future__ import annotations

import argparse

from vtp_fast.cli.common import POSITIVE, TOKENIZER, Commands, ints, load_model
from vtp_fast.config import InputError


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
        result = evaluate.reconstruction_scores(load_model(args), data, args.n)
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
    model = load_model(args)
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


def add_commands(sub: Commands) -> None:
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
    p.add_argument("--workers", type=ints(0), help="zeroshot, probe: decoding processes per rank (default: the "
                                                   "thread budget's)")
    p.add_argument("--n", type=POSITIVE, default=1000, help="images for FID (CPU: a few per second)")
    p.add_argument("--size", type=POSITIVE, default=64, help="image size in pixels")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_eval)

"""vtp-fast: pre-train VTP-style visual tokenizers (a ViT autoencoder trained with reconstruction, CLIP and
DINOv2-style self-supervision) and judge them by the images a diffusion model generates from their latents.

Start with README.md (quick start: `make train`, `make test`); `vtp-fast COMMAND --help` lists a command's options
with their defaults. Errors about your input print one line (VTP_FAST_DEBUG=1 shows the traceback)."""


from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence

from vtp_fast.allocator import prepare_allocator
from vtp_fast.cli import codec, data, evaluate, judge, tools, train
from vtp_fast.cli.common import Commands, Help
from vtp_fast.config import InputError
from vtp_fast.io import write_problem
from vtp_fast.threads import prepare_openmp

# before anything loads torch (libgomp reads its wait settings when it loads): the imports above do not
# (tests/test_threads.py checks)
prepare_openmp()
prepare_allocator()

# One module per command group, thin over the importable functions of the layers below (common: what they share),
# in the order --help lists them
GROUPS = (codec, train, judge, evaluate, tools, data)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtp-fast", description=__doc__, formatter_class=Help)
    sub = Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands"))
    for group in GROUPS:
        group.add_commands(sub)
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
        codec_runs = sys.modules.get("vtp_fast.eval.codec")  # loaded only by encode and reconstruct
        if codec_runs is not None and codec_runs.forward_running():
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


"""What the command groups share: the argparse pieces (help lines that show defaults, checked integers) and the
tokenizer a command loads (`load_model`; `load_codec` on the encode / decode fast path of `codec_options`)."""

from __future__ import annotations

import argparse

TOKENIZER = "a directory (config.json + model.safetensors) or a Hugging Face Hub id (VTP-Large-f16d64[@REVISION])"


def ints(low: int = 1, high: int | None = None):
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


POSITIVE = ints(1)


class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help line (unless it has none, is a flag, or the help states it);
    descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class Commands:
    """Subcommands that show their defaults and repeat their one-line help as their description."""

    def __init__(self, action):
        self.action = action

    def add_parser(self, name: str, *, help: str) -> argparse.ArgumentParser:  # noqa: A002 - argparse's name
        return self.action.add_parser(name, help=help, description=help, formatter_class=Help)


def load_model(args: argparse.Namespace):
    """The tokenizer --checkpoint names, on --device, without gradients."""
    from vtp_fast.models.pretrained import load_pretrained
    from vtp_fast.train.common import pick_device

    model = load_pretrained(args.checkpoint, device=pick_device(args.device or "auto", option="--device"))
    return model.requires_grad_(False)


def load_codec(args: argparse.Namespace):
    """The tokenizer of an encode / decode command, on its fast path (`codec_options`: --precision, --compile)."""
    import warnings

    from vtp_fast.compile import apply_inference
    from vtp_fast.measure.ceilings import cpu_flags, native_bf16

    model = load_model(args)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if args.precision == "bf16" and on_cpu and not native_bf16(cpu_flags()):
        warnings.warn("--precision bf16 on a CPU without native bf16 (avx512_bf16 / amx_bf16): emulated, likely "
                      "slower than fp32", stacklevel=1)
    return apply_inference(model, args.precision, args.compile)


def codec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32: the exact path; bf16: weights cast once (2.8-3x the fp32 reference on a CPU with AMX; "
                        "its error vs fp32 in docs/performance.md)")
    p.add_argument("--compile", action="store_true", help="torch.compile encode/decode with frozen weights (a graph "
                                                          "takes tens of seconds; no faster in fp32 on a 2-core CPU)")

"""Parity report: the published-layout fixture checkpoint run on a device in fp32 and bf16 against the
reference implementation's outputs (tests/fixtures/vtp_official_tiny), max |error| per tensor.

    python bench/bench_parity.py [--device cuda] [--out rows.jsonl]
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from vtp_fast import load_pretrained
from vtp_fast.measure.rows import Emit, RowLog, bench_cli, resolved_backends

TABLE_COLUMNS = ["device", "dtype", "tensor", "max_abs_error", "max_abs_value"]
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "vtp_official_tiny"


@torch.no_grad()
def run(device: str = "cpu", quick: bool = False, emit: Emit | None = None) -> list[dict]:
    expected = load_file(FIXTURE / "expected.safetensors")
    rows = RowLog(emit)
    for dtype in (torch.float32, torch.bfloat16):
        model = load_pretrained(FIXTURE, device=device).to(dtype)
        e = {k: v.to(device) for k, v in expected.items()}
        x, x96 = e["x"].to(dtype), e["x96"].to(dtype)
        img, txt = model.clip_image_features(x), model.clip_text_features(e["text"])
        cls, patch = model.features(x)
        got = {"latents": model.encode(x), "latents96": model.encode(x96),
               "decoded": model.decode(e["latents"].to(dtype)),
               "clip_img": img, "clip_txt": txt, "last_cls": cls, "last_patch": patch}
        for name, value in got.items():
            rows.add({"bench": "parity", "device": device, "backend": resolved_backends(model),
                      "dtype": str(dtype).removeprefix("torch."), "tensor": name,
                      "max_abs_error": (value.float() - e[name]).abs().max().item(),
                      "max_abs_value": e[name].abs().max().item()})
    return rows.rows


def main() -> None:
    bench_cli(run, TABLE_COLUMNS, __doc__)


if __name__ == "__main__":
    main()

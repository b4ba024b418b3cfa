"""Issue 14: published names resolve as `from_pretrained` does, through the local Hugging Face cache (offline here),
pinned revisions included; an uncached name says what to run to fetch it."""

import json
import os
import subprocess
import sys

import torch

from vtp_fast import VTP, save_pretrained, vtp_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo="MiniMaxAI/VTP-Nano-test"):
    """A Hub-layout cache holding one snapshot of `repo` (what `hf download` leaves): refs/main -> COMMIT."""
    owner, name = repo.split("/")
    base = root / f"models--{owner}--{name}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    torch.manual_seed(0)
    model = VTP(vtp_config("vtp-nano"))
    save_pretrained(model, base / "snapshots" / COMMIT)
    return model


def resolve(cache, *names):
    """load_pretrained(name) in a fresh offline process for each name: its weights' checksum or the error."""
    code = ("import json, sys\nfrom vtp_fast import load_pretrained\nfrom vtp_fast.models.pretrained import "
            "CheckpointError\nout = []\nfor name in sys.argv[1:]:\n    try:\n        m = load_pretrained(name)\n"
            "        out.append(sum(float(v.double().sum()) for v in m.state_dict().values()))\n"
            "    except CheckpointError as e:\n        out.append(str(e))\nprint(json.dumps(out))")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_hub_ids_resolve_from_the_local_cache_offline(tmp_path):
    model = hub_cache(tmp_path / "hub")
    want = sum(float(v.double().sum()) for v in model.state_dict().values())
    full, short, pinned, branch, missing, bad_rev = resolve(
        tmp_path / "hub", "MiniMaxAI/VTP-Nano-test", "VTP-Nano-test", f"VTP-Nano-test@{COMMIT}",
        "MiniMaxAI/VTP-Nano-test@main", "MiniMaxAI/VTP-Missing-f16d64", "VTP-Nano-test@v9")
    assert full == short == pinned == branch == want
    assert "not in the Hugging Face cache" in missing and "hf download MiniMaxAI/VTP-Missing-f16d64" in missing
    assert "--revision v9" in bad_rev


def test_the_cli_takes_a_hub_id(tmp_path):
    from PIL import Image

    hub_cache(tmp_path / "hub")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "vtp_fast.cli", "reconstruct", str(tmp_path / "red.png"),
                        "--checkpoint", "VTP-Nano-test", "--out", str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "red_recon.png").is_file()


def test_the_readme_snippet_runs_as_written_against_a_cached_hub_layout(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Using a published checkpoint"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'load_pretrained("VTP-Large-f16d64")' in snippet
    hub_cache(tmp_path / "hub", "MiniMaxAI/VTP-Large-f16d64")  # a small stand-in under the published name
    check = "\nassert z.shape == (4, 64, 16, 16) and 0 <= float(x_rec.min()) and float(x_rec.max()) <= 1\n"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", snippet + check], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

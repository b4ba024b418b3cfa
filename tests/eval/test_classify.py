"""Zero-shot and linear probes at ImageNet scale (vtp_fast.eval.classify, probe_dino): open_clip's class names and
80 templates (imported, not copied), zero-shot and the last-layer probe on stored features equal to the in-memory
code, the DINO-style grid choosing among its settings, reproducibly, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vtp_fast
from tests.helpers import COLOURS, SHAPES, _draw
from vtp_fast import VTP, vtp_config
from vtp_fast.config import InputError
from vtp_fast.data.images import normalize_u8
from vtp_fast.data.labelled import LabelledImages
from vtp_fast.eval import classify, probe_dino
from vtp_fast.eval.features import extract_features, save_features
from vtp_fast.eval.probe import TEMPLATES, linear_probe, stratified_split, zero_shot_accuracy, zero_shot_classifier
from vtp_fast.eval.probe import extract_features as in_memory_features

open_clip_meta = pytest.importorskip("open_clip.zero_shot_metadata")


def nano() -> VTP:
    torch.manual_seed(0)
    return VTP(vtp_config("vtp-nano")).eval()


# ---------------------------------------------------------------------------------------------- class names, prompts
def test_imagenet_names_and_templates_are_open_clips_own():
    names, templates = classify.imagenet_classnames(), classify.imagenet_templates()
    assert names is open_clip_meta.IMAGENET_CLASSNAMES and templates is open_clip_meta.OPENAI_IMAGENET_TEMPLATES
    assert len(names) == 1000 and len(templates) == 80  # (two names repeat in the list: "crane", "maillot")
    assert templates[0]("goldfish") == "a bad photo of a goldfish."
    # not a copied list anywhere in the package either
    sources = "".join(p.read_text() for p in Path(vtp_fast.__file__).parent.rglob("*.py"))
    assert "great white shark" not in sources and "a plastic {}" not in sources


def test_missing_open_clip_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(classify.optional, "available", lambda name: False)
    monkeypatch.setattr(classify.optional, "reason", lambda name: "import open_clip failed: ModuleNotFoundError")
    with pytest.raises(InputError, match="pip install open_clip_torch"):
        classify.imagenet_classnames()
    assert classify.zero_shot_prompts(["a", "b"], "auto")[2] == "set"  # small sets never need it


def test_which_class_names():
    thousand = [f"c{i}" for i in range(1000)]
    names, templates, which = classify.zero_shot_prompts(thousand, "auto")
    assert which == "imagenet" and names is open_clip_meta.IMAGENET_CLASSNAMES and len(templates) == 80
    assert classify.zero_shot_prompts(thousand, "set") == (thousand, TEMPLATES, "set")
    assert classify.zero_shot_prompts(["cat", "dog"], "auto") == (["cat", "dog"], TEMPLATES, "set")
    with pytest.raises(InputError, match="1000 classes, this one has 2"):
        classify.zero_shot_prompts(["cat", "dog"], "imagenet")


def test_imagenet_zero_shot_end_to_end(tmp_path, monkeypatch):
    """A 1000-class set: open_clip's names through the 80 templates, text features averaged as OpenAI does, and
    the stored image embeddings scored as in memory."""
    model = nano()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 999, 500, 1, 0])
    data = LabelledImages(images, labels, [f"n{i:08d}" for i in range(1000)], [], "fake-imagenet")
    seen = {}
    real = classify.zero_shot_classifier

    def spy(m, names, templates):
        seen.update(names=names, templates=templates, clf=real(m, names, templates))
        return seen["clf"]

    monkeypatch.setattr(classify, "zero_shot_classifier", spy)
    out = classify.zero_shot_eval(model, data, tmp_path, progress=False)
    assert seen["names"] is open_clip_meta.IMAGENET_CLASSNAMES
    assert seen["templates"] is open_clip_meta.OPENAI_IMAGENET_TEMPLATES
    assert out["classes"] == "imagenet" and out["templates"] == 80 and out["n"] == 6 and out["chance"] == 1e-3
    for k in (0, 999):  # the OpenAI protocol: mean of the normalised text features, renormalised
        name = open_clip_meta.IMAGENET_CLASSNAMES[k]
        text = model.clip_text_features(model.tokenize([t(name) for t in open_clip_meta.OPENAI_IMAGENET_TEMPLATES]))
        assert torch.allclose(seen["clf"][k], F.normalize(F.normalize(text, dim=-1).mean(0), dim=0), atol=1e-6)
    ref = zero_shot_accuracy(model, normalize_u8(images), labels, seen["clf"])
    assert (out["top1"], out["top5"]) == (ref["top1"], ref["top5"])
    assert (tmp_path / "fake-imagenet" / "meta.json").is_file()  # kept where asked


# ---------------------------------------------------------------------------------------------- shapes
def shapes_set(per: int, seed: int, name: str) -> LabelledImages:
    """Coloured shapes with pixel noise; the class is the colour."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c, rgb in enumerate(COLOURS.values()):
        for i in range(per):
            base = torch.from_numpy(_draw(SHAPES[i % 3], rgb, 64, i % 4)).float()
            images.append((base + 40 * torch.randn(base.shape, generator=g)).clamp(0, 255).to(torch.uint8))
            labels.append(c)
    return LabelledImages(torch.stack(images), torch.tensor(labels), list(COLOURS), [], name)


def test_zero_shot_of_a_small_set_equals_in_memory(tmp_path):
    model, data = nano(), shapes_set(3, 0, "shapes-zs")
    out = classify.zero_shot_eval(model, data, tmp_path, progress=False)
    ref = zero_shot_accuracy(model, normalize_u8(data.images), data.labels, zero_shot_classifier(model, list(COLOURS)))
    assert out["classes"] == "set" and out["templates"] == len(TEMPLATES)
    assert (out["top1"], out["top5"], out["chance"]) == (ref["top1"], ref["top5"], ref["chance"])


def old_linear_probe(tx, ty, vx, vy, *, lrs, epochs, batch, seed=0, val_fraction=0.2):
    """The in-memory probe as it was before stored features (float32 statistics of the whole matrix, one lr
    after the other), transcribed: the reference the streamed probe is held to."""
    def train(x, y, lr):
        gen = torch.Generator().manual_seed(seed)
        head = torch.nn.Linear(x.shape[1], int(max(ty.max(), vy.max())) + 1)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
        total, step = epochs * -(-x.shape[0] // batch), 0
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen)
            for i in range(0, x.shape[0], batch):
                opt.param_groups[0]["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / total)).item())
                loss = F.cross_entropy(head(x[order[i:i + batch]]), y[order[i:i + batch]])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
        return head

    def stats(x):
        std = x.std(0, unbiased=False)
        return x.mean(0), torch.where(std > 1e-8, std, torch.ones_like(std))

    fit, val = stratified_split(ty, val_fraction, torch.Generator().manual_seed(seed))
    mean, std = stats(tx[fit])
    per = {lr: (train((tx[fit] - mean) / std, ty[fit], lr)((tx[val] - mean) / std).argmax(1) == ty[val])
           .float().mean().item() for lr in lrs}
    best = max(lrs, key=lambda lr: per[lr])
    mean, std = stats(tx)
    head = train((tx - mean) / std, ty, best)
    return (head((vx - mean) / std).argmax(1) == vy).float().mean().item()


def in_memory_probe(model, train: LabelledImages, test: LabelledImages, **kw) -> dict:
    """The last-layer probe with every row in memory: the features of each whole set at once."""
    a, b = (in_memory_features(model, normalize_u8(s.images)) for s in (train, test))
    return {f"probe_{k}": linear_probe(a[k], train.labels, b[k], test.labels, **kw)["top1"] for k in a}


def test_last_layer_probe_on_stored_features_equals_in_memory(tmp_path):
    """The same accuracies as the in-memory probe (the rows of each set in memory at once), exactly:
    the stored rows are bitwise the in-memory ones and the probe gathers them in the same order. Against the
    pre-storage transcription the accuracy may differ by one test image at most: its float32 statistics differ
    from the float64 ones in the last bits (here they agree)."""
    model = nano()
    train, test = shapes_set(12, 0, "shapes-train"), shapes_set(6, 1, "shapes-test")
    kw = {"epochs": 15, "batch": 16}
    stored = classify.probe_eval(model, train, test, tmp_path, probe=kw, batch=8, chunk=20, progress=False)
    in_memory = in_memory_probe(model, train, test, **kw)
    assert stored == in_memory and set(stored) == {"probe_cls_meanpatch", "probe_latent"}
    assert stored["probe_cls_meanpatch"] > 0.5  # 4 colours: learnt, not chance
    a = extract_features(model, train, tmp_path / "again", batch=8, chunk=20, progress=False)
    b = extract_features(model, test, tmp_path / "again-test", batch=8, chunk=20, progress=False)
    cols = [*a.cls_cols(1), *a.cols("patch_mean")]
    full = linear_probe(a.view(cols), a.labels, b.view(cols), b.labels, lrs=(1e-3, 1e-2, 1e-1), **kw)
    old = old_linear_probe(a.view(cols)[torch.arange(len(a))], a.labels, b.view(cols)[torch.arange(len(b))],
                           b.labels, lrs=(1e-3, 1e-2, 1e-1), **kw)
    assert full["top1"] == stored["probe_cls_meanpatch"]
    assert abs(old - full["top1"]) <= 1 / len(b)


# ---------------------------------------------------------------------------------------------- DINO-style
def planted(tmp_path, n: int, seed: int, where: str, name: str):
    """Stored rows (class tokens of 2 blocks, mean patch, latent; 8 wide each) of 6 classes whose signal is only
    in `where`: "patch" (the mean patch token) or "deep2" (the class token of the second-to-last block)."""
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(6, 8, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % 6
    rows = torch.randn(n, 32, generator=g)
    at = {"patch": 16, "deep2": 0}[where]
    rows[:, at:at + 8] += centres[y]
    cols = {"cls_blocks": [0, 16], "patch_mean": [16, 24], "latent": [24, 32]}
    return save_features(tmp_path / name, rows, y, cols, n_blocks=2, chunk=50)


def test_dino_classifiers_step_as_torch_sgd_does():
    """The stacked classifiers' hand-written step is torch.optim.SGD(momentum=0.9) on nn.Linear + cross-entropy,
    each with its own learning rate."""
    g = torch.Generator().manual_seed(1)
    heads = probe_dino._Heads(7, 3, 5, g, torch.device("cpu"))
    lrs = torch.tensor([0.1, 0.5, 1.0])
    lins = [torch.nn.Linear(7, 5) for _ in range(3)]
    for k, lin in enumerate(lins):
        lin.weight.data, lin.bias.data = heads.w[:, k].T.clone(), heads.b[k].clone()
    opts = [torch.optim.SGD(lin.parameters(), lr=float(lr), momentum=0.9) for lin, lr in zip(lins, lrs, strict=True)]
    for _ in range(4):
        x, y = torch.randn(11, 7, generator=g), torch.randint(0, 5, (11,), generator=g)
        heads.step(x, y, lrs)
        for lin, opt in zip(lins, opts, strict=True):
            opt.zero_grad()
            F.cross_entropy(lin(x), y).backward()
            opt.step()
    for k, lin in enumerate(lins):
        assert torch.allclose(heads.w[:, k].T, lin.weight, atol=1e-6) and torch.allclose(heads.b[k], lin.bias,
                                                                                          atol=1e-6)


@pytest.mark.parametrize(("where", "blocks", "pool"), [("patch", 1, True), ("deep2", 2, False)])
def test_dino_grid_selects_the_setting_with_the_signal(tmp_path, where, blocks, pool):
    train, test = planted(tmp_path, 240, 0, where, "tr"), planted(tmp_path, 120, 1, where, "te")
    out = probe_dino.dino_probe(train, test, n_last_blocks=(1, 4), epochs=4, batch=32)
    assert len(out["grid"]) == 2 * 2 * 13  # n in (1, 2: capped), avgpool in (False, True), 13 learning rates
    assert (out["n_blocks"], out["avgpool"]) == (blocks, pool), out
    assert out["grid"][f"blocks{blocks}_avgpool{int(pool)}_lr{out['lr']:g}"] == max(out["grid"].values())
    assert out["top1"] > 0.9 and out["n_val"] == 48 and out["select"] == "held-out"
    assert out["grid"][f"blocks{blocks}_avgpool{int(pool)}_lr1e-05"] < 0.6  # too small a step learns little
    assert probe_dino.dino_probe(train, test, n_last_blocks=(1, 4), epochs=4, batch=32) == out  # reproducible


def test_dino_test_selection_reports_the_best_of_the_grid_and_held_out_ignores_the_test_set(tmp_path):
    train, test = planted(tmp_path, 240, 0, "patch", "tr"), planted(tmp_path, 120, 1, "patch", "te")
    kw = {"lrs": (1e-5, 1e-2, 0.1), "epochs": 3, "batch": 32}
    published = probe_dino.dino_probe(train, test, select="test", **kw)
    assert published["top1"] == max(published["grid"].values()) and published["n_val"] == 0
    shuffled = planted(tmp_path, 120, 1, "patch", "te2")
    shuffled.labels = shuffled.labels[torch.randperm(120, generator=torch.Generator().manual_seed(3))]
    a = probe_dino.dino_probe(train, test, **kw)
    b = probe_dino.dino_probe(train, shuffled, **kw)
    assert a["grid"] == b["grid"] and a["lr"] == b["lr"] and a["top1"] > 0.9 > b["top1"]
    with pytest.raises(InputError, match="select"):
        probe_dino.dino_probe(train, test, select="val")


# ---------------------------------------------------------------------------------------------- command line
def test_command_line(emoji_env, tmp_path, capsys):
    from vtp_fast import save_pretrained
    from vtp_fast.cli import main

    tok = save_pretrained(nano(), tmp_path / "tok")
    common = ["--checkpoint", str(tok), "--data", "emoji:google,twitter", "--features", str(tmp_path / "f")]
    assert main(["eval", "probe", *common, "--test-data", "emoji:openmoji", "--protocol", "dino",
                 "--select", "test"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dino"]["select"] == "test" and len(out["dino"]["grid"]) == 2 * 2 * 13
    assert 0 <= out["probe_dino"] <= out["probe_dino_top5"] <= 1
    assert main(["eval", "zeroshot", *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == "set" and out["n"] == 24 and out["chance"] == pytest.approx(1 / 3)
    assert len(list((tmp_path / "f").glob("*/meta.json"))) == 2  # train and test sets, kept

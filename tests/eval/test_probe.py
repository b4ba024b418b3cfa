"""Zero-shot with prompt templates and the linear probe, on synthetic problems with known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vtp_fast import VTP, vtp_config
from vtp_fast.eval import probe
from vtp_fast.eval.probe import (
    TEMPLATES,
    extract_features,
    linear_probe,
    zero_shot_accuracy,
    zero_shot_classifier,
    zero_shot_names,
)


# ---------------------------------------------------------------------------------------------- zero-shot
class NoisyPromptCLIP(nn.Module):
    """A fake CLIP model: class k has a unit centre c_k; the prompt (class k, template j) has the text feature
    s_kj * (c_k + noise_kj) with large per-prompt noise (|noise| ~ 6) and a wild scale s_kj in [0.1, 10], so one
    template classifies poorly, averaging the *normalised* features over many templates classifies well.
    An "image" is a (E,) vector; its feature is the normalised vector itself."""

    def __init__(self, class_names, templates, dim=64, noise=6.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.centres = F.normalize(torch.randn(len(class_names), dim, generator=g), dim=-1)
        self.index, rows = {}, []
        for k, name in enumerate(class_names):
            for t in templates:
                self.index[t.format(name)] = len(rows)
                n = torch.randn(dim, generator=g) * noise / dim**0.5
                scale = 10 ** (2 * torch.rand((), generator=g) - 1)
                rows.append(scale * (self.centres[k] + n))
        self.table = torch.stack(rows)  # (C * T, E)
        self.batches: list[int] = []

    def tokenize(self, texts):
        self.batches.append(len(texts))
        return torch.tensor([[self.index[t]] for t in texts])  # (B, 1)

    def clip_text_features(self, tokens, normalize=True):
        x = self.table[tokens[:, 0]]
        return F.normalize(x, dim=-1) if normalize else x

    def clip_image_features(self, images, normalize=True):
        return F.normalize(images, dim=-1) if normalize else images

    def images(self, per_class: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        c = self.centres.shape[0]
        labels = torch.arange(c).repeat_interleave(per_class)
        return self.centres[labels] + 0.1 * torch.randn(labels.numel(), self.centres.shape[1], generator=g), labels


NAMES = [f"class{i}" for i in range(10)]
MANY_TEMPLATES = [f"template {j}: {{}}" for j in range(40)]


def test_zero_shot_template_averaging():
    model = NoisyPromptCLIP(NAMES, MANY_TEMPLATES)
    images, labels = model.images(20)
    clf = zero_shot_classifier(model, NAMES, MANY_TEMPLATES, batch=7)
    assert clf.shape == (10, 64)
    assert max(model.batches) <= 7 and sum(model.batches) == 10 * 40  # batched, every prompt once
    # exactly the CLIP recipe: mean of normalised features over templates, renormalised
    raw = model.table.view(10, 40, 64)
    assert torch.allclose(clf, F.normalize(F.normalize(raw, dim=-1).mean(1), dim=-1), atol=1e-6)
    assert not torch.allclose(clf, F.normalize(raw.mean(1), dim=-1), atol=1e-3)  # not the raw mean
    many = zero_shot_accuracy(model, images, labels, clf, batch=16)
    single = zero_shot_accuracy(model, images, labels, zero_shot_classifier(model, NAMES, MANY_TEMPLATES[:1]))
    assert many["top1"] > 0.95 and single["top1"] < 0.8, (many, single)
    assert many["top5"] >= many["top1"] and many["chance"] == pytest.approx(0.1)
    # the scoring written out: cosine similarity of normalised image features with the classifier
    top = (F.normalize(images, dim=-1) @ clf.T).topk(5, dim=1).indices
    assert many["top1"] == pytest.approx((top[:, 0] == labels).float().mean().item())
    assert many["top5"] == pytest.approx((top == labels[:, None]).any(1).float().mean().item())


def test_zero_shot_names_picks_among_the_distinct_captions():
    names = ["cat", "dog", "owl"]
    model = NoisyPromptCLIP(names, ["{}"], noise=0.0)
    images, labels = model.images(4)
    captions = [names[i] for i in labels.tolist()]
    out = zero_shot_names(model, images, captions)
    assert out["top1"] > 0.9 and out["chance"] == pytest.approx(1 / 3)
    wrong = zero_shot_names(model, images, [names[(i + 1) % 3] for i in labels.tolist()])  # every caption wrong
    assert wrong["top1"] < 0.1


def test_zero_shot_bad_templates():
    model = NoisyPromptCLIP(NAMES[:2], ["a {}"])
    with pytest.raises(ValueError, match="template"):
        zero_shot_classifier(model, NAMES[:2], ["no placeholder"])
    with pytest.raises(ValueError, match="no class names"):
        zero_shot_classifier(model, [], ["a {}"])
    assert len(TEMPLATES) >= 5 and all("{}" in t for t in TEMPLATES)


def nano() -> VTP:
    torch.manual_seed(0)
    return VTP(vtp_config("vtp-nano"))


def test_zero_shot_on_a_real_vtp():
    """The real tokenizer + text tower: per template, the classifier is built from the same normalised text
    features of the model's own text tower."""
    model = nano().eval()
    names, templates = ["cat", "dog", "red circle"], TEMPLATES[:3]
    clf = zero_shot_classifier(model, names, templates)
    per_template = torch.stack([model.clip_text_features(model.tokenize([t.format(n) for n in names]))
                                for t in templates])  # (T, C, E), normalised
    assert torch.allclose(clf, F.normalize(per_template.mean(0), dim=-1), atol=1e-5)
    images = torch.randn(4, 3, 64, 64)
    out = zero_shot_accuracy(model, images, torch.tensor([0, 1, 2, 0]), clf)
    assert 0 <= out["top1"] <= out["top5"] == 1.0  # 3 classes: top-5 covers all


# ---------------------------------------------------------------------------------------------- features
def test_extract_features_shapes_and_values():
    model = nano().train()
    images = torch.randn(5, 3, 64, 64)
    out = extract_features(model, images, batch=2)
    assert out["cls_meanpatch"].shape == (5, 128) and out["latent"].shape == (5, 64)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        cls, patch = model.features(images)
        latents = model.encode(images)  # (5, 64, 4, 4)
    assert torch.allclose(out["cls_meanpatch"], torch.cat([cls, patch.mean(1)], 1), atol=1e-5)
    assert torch.allclose(out["latent"], latents.mean((2, 3)), atol=1e-5)


# ---------------------------------------------------------------------------------------------- linear probe
def blobs(n: int, classes: int = 4, dim: int = 16, sep: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = sep * torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, classes, (n,), generator=g)
    # a large offset and scale on the raw features: the probe must standardise
    x = 100 + 50 * (centres[y] + torch.randn(n, dim, generator=g))
    return x, y


def test_linear_probe_separable_blobs():
    tx, ty = blobs(400, seed=0)
    vx, vy = blobs(300, seed=1)
    out = linear_probe(tx, ty, vx, vy, epochs=10, batch=256)
    assert out["top1"] > 0.95, out
    assert out["lr"] in (1e-3, 1e-2, 1e-1) and set(out["per_lr"]) == {1e-3, 1e-2, 1e-1}
    assert out["num_classes"] == 4 and out["n_fit"] + out["n_val"] == 400 and out["n_val"] == pytest.approx(80, abs=4)
    again = linear_probe(tx, ty, vx, vy, epochs=10, batch=256)
    assert again == out  # deterministic given the seed


def test_linear_probe_random_labels_is_chance():
    tx, _ = blobs(400, seed=0)
    vx, _ = blobs(400, seed=1)
    g = torch.Generator().manual_seed(5)
    ty, vy = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (400,), generator=g)
    out = linear_probe(tx, ty, vx, vy, epochs=10, batch=256)
    assert abs(out["top1"] - 0.25) < 0.1, out  # 4 classes; binomial std at n=400 is 0.022


def nuisance(n: int, seed: int):
    """Two classes separable only through a difference of features: x = (s + z, z + small), s = +-1, z ~ N(0, 25).
    One gradient step from zero (what a tiny learning rate amounts to, the argmax being scale-free) points
    along the class-mean difference (1, 0), which is near chance; the optimum (1, -1) is ~100%."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    z = 5 * torch.randn(n, generator=g)
    return torch.stack([2.0 * y - 1 + z, z + 0.05 * torch.randn(n, generator=g)], 1), y


def test_linear_probe_selects_lr_on_the_train_split(monkeypatch):
    """The test set is evaluated exactly once, after the choice, and changing it changes nothing about the
    choice; learning rates too small to get past the first gradient direction are not picked."""
    tx, ty = nuisance(200, 0)
    vx, vy = nuisance(77, 1)
    calls = []
    real_accuracy = probe._accuracy

    def spy(head, x, idx, y, mean, std):
        calls.append(idx.numel())
        return real_accuracy(head, x, idx, y, mean, std)

    monkeypatch.setattr(probe, "_accuracy", spy)
    kw = {"lrs": (1e-7, 1e-1, 1e-6), "epochs": 20, "batch": 64}
    out = linear_probe(tx, ty, vx, vy, **kw)
    n_val = out["n_val"]
    assert calls == [n_val, n_val, n_val, 77]  # three held-out train evaluations, then the test set once
    assert n_val == 40 and out["lr"] == 1e-1, out
    assert out["per_lr"][1e-1] > 0.9 and out["per_lr"][1e-7] < 0.7 and out["top1"] > 0.9, out
    assert out["val_top1"] == max(out["per_lr"].values())
    # a completely different test set (noise features, shuffled labels) leaves the choice untouched
    noise_x = torch.randn(77, 2) * 1e3
    other = linear_probe(tx, ty, noise_x, vy[torch.randperm(77)], **kw)
    assert other["lr"] == out["lr"] and other["per_lr"] == out["per_lr"] and other["top1"] != out["top1"]


def test_linear_probe_errors():
    x, y = blobs(20)
    with pytest.raises(ValueError, match="width"):
        linear_probe(x, y, x[:, :8], y)
    with pytest.raises(ValueError, match="integer class ids"):
        linear_probe(x, y.float(), x, y)
    with pytest.raises(ValueError, match=r"train_y must be \(N,\)"):
        linear_probe(x, y[:5], x, y)
    with pytest.raises(ValueError, match="optimizer"):
        linear_probe(x, y, x, y, optimizer="lbfgs", epochs=1)

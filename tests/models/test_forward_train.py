"""The models' training seams: `VTP.forward_train` (each objective's inputs, its parts watched by hooks in order),
the SSL head's training pass, and the layers and blocks each model names (GAN weight, compile / FSDP units)."""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from vtp_fast import VTP, vtp_config
from vtp_fast.models.dit import DiT, dit_config
from vtp_fast.models.heads import DINOHead
from vtp_fast.models.training import ClipInputs, RecInputs, SSLInputs, TrainHooks, TrainParts


def nano(**overrides) -> VTP:
    torch.manual_seed(0)
    return VTP(vtp_config("vtp-nano", **overrides))


def views(n=4, ssl=2, local_crops=2):
    """A batch of n 32 px pairs, the first `ssl` with two 32 px global crops (2 x 2 tokens, iBOT-masked) and
    `local_crops` 16 px local crops each."""
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(2 * ssl, 4, generator=g) < 0.5
    masks[0, 0] = True  # at least one masked token
    return SimpleNamespace(images=torch.randn(n, 3, 32, 32, generator=g), tokens=torch.randint(1, 100, (n, 8)),
                           global_crops=torch.randn(2 * ssl, 3, 32, 32, generator=g),
                           local_crops=torch.randn(local_crops * ssl, 3, 16, 16, generator=g), masks=masks,
                           mask_index=masks.flatten().nonzero().squeeze(1))


class Watch(TrainHooks):
    """Records the parts in order, and which region each boundary and each objective's inputs arrived in."""

    def __init__(self):
        self.events, self.inside = [], None

    @contextmanager
    def region(self, name):
        self.inside = name
        self.events.append(f"enter {name}")
        yield
        self.events.append(f"exit {name}")
        self.inside = None

    def boundary(self, name, *tensors):
        self.events.append(f"boundary {name} in {self.inside}")
        return tensors

    def ready(self, name, inputs):
        self.events.append(f"ready {name} in {self.inside}: {type(inputs).__name__}")


def test_forward_train_hands_each_objective_its_inputs_inside_its_region():
    m, head, batch, watch = nano(), DINOHead(64, 32, 16, 8), views(), Watch()
    out = m.forward_train(batch, TrainParts(clip=True, ssl=True, rec=3, images=True), head, watch)
    assert watch.events == [
        "enter trunk", "exit trunk",
        "enter clip", "boundary clip in clip", "ready clip in clip: ClipInputs", "exit clip",
        "enter rec", "boundary rec in rec", "ready rec in rec: RecInputs", "exit rec",
        "enter ssl", "boundary ssl in ssl", "ready ssl in ssl: SSLInputs", "exit ssl"]
    assert isinstance(out.clip, ClipInputs) and isinstance(out.rec, RecInputs) and isinstance(out.ssl, SSLInputs)
    assert out.clip.image.shape == out.clip.text.shape == (4, 64) and out.clip.logit_scale is m.logit_scale
    assert out.rec.tokens.shape == (3, 4, 3 * 16 * 16) and torch.equal(out.rec.target, batch.images[:3])
    with torch.no_grad():  # the reconstruction is the plain model's, and the CLIP features too (to rounding)
        torch.testing.assert_close(out.rec.recon, m.decode(m.encode(batch.images[:3])), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.clip.image, m.clip_image_features(batch.images), rtol=1e-5, atol=1e-5)
    s = out.ssl
    assert s.global_cls.shape == (4, 64) and [e.shape for e in s.global_emb] == [(2, 8)] * 2
    assert [e.shape for e in s.local_emb] == [(2, 8)] * 2  # two local views of the two SSL images
    assert s.patch_emb.shape == (batch.mask_index.numel(), 8) and s.weight.shape == (32, 8)


def test_forward_train_without_clip_runs_only_the_reconstructed_images_and_a_frozen_trunk_stays_frozen():
    m, batch = nano(train_clip=False), views()
    seen = []
    m.trunk.register_forward_hook(lambda mod, args, out: seen.append([v.shape[0] for v in args[0]]))
    out = m.forward_train(batch, TrainParts(clip=False, ssl=False, rec=2, frozen_trunk=True))
    assert seen == [[2]] and out.clip is None and out.ssl is None and out.rec.recon is None
    out.rec.tokens.sum().backward()
    assert all(p.grad is None for p in m.trunk.parameters())
    assert all(p.grad is not None for p in m.pixel_decoder.parameters())


def test_head_training_pass_embeds_every_row_in_one_call():
    torch.manual_seed(0)
    head = DINOHead(16, 32, 24, 8)
    cls, patch, local = torch.randn(4, 16), torch.randn(4, 5, 16), torch.randn(6, 16)
    index = torch.tensor([0, 3, 7, 19])  # flat into (4 * 5)
    out = head.forward_train(cls, patch, index, local)
    rows = torch.cat([cls, patch.flatten(0, 1)[index], local])
    want = head.embed(rows)
    assert torch.equal(torch.cat([out.glob, out.patch, out.local]), want)
    assert [t.shape[0] for t in out[:3]] == [4, 4, 6] and torch.equal(out.weight, head.last_layer.weight)
    no_local = head.forward_train(cls, patch, index)  # the EMA teacher's call: global crops only
    assert no_local.local.shape == (0, 8) and torch.equal(no_local.patch, out.patch)


@pytest.mark.parametrize("clip", [True, False])
def test_models_name_their_blocks_and_their_gan_layer(clip):
    m = nano(train_clip=clip)
    blocks = m.transformer_blocks()
    assert blocks[:2] == list(m.trunk.blocks) and blocks[2:4] == list(m.pixel_decoder.blocks)
    assert blocks[4:] == (list(m.text_transformer.resblocks) if clip else [])
    assert m.last_layer() is m.pixel_decoder.proj_out.weight
    dit = DiT(dit_config("dit-nano"))
    assert dit.transformer_blocks() == list(dit.blocks) and len(dit.blocks) == 2

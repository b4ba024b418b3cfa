"""The VTP model: presets, checkpoint round trip and strictness, non-square inputs, the list forward."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vtp_fast import VTP, CheckpointError, load_pretrained, save_pretrained, vtp_config
from vtp_fast.config import ConfigError
from vtp_fast.models.presets import PRESETS


def nano(**overrides) -> VTP:
    torch.manual_seed(0)
    return VTP(vtp_config("vtp-nano", **overrides)).eval()


@pytest.mark.parametrize("preset, width, depth, hidden", [("vtp-s", 384, 12, 1024), ("vtp-b", 768, 12, 2048),
                                                          ("vtp-l", 1024, 24, 2736)])
def test_published_sizes(preset, width, depth, hidden):
    """The VTP_REFERENCE size table, built on the meta device (no memory)."""
    with torch.device("meta"):
        m = VTP(vtp_config(preset))
    sd = m.state_dict()
    assert sd["trunk.cls_token"].shape == (1, 1, width)
    assert sd[f"trunk.blocks.{depth - 1}.mlp.w1.weight"].shape == (hidden, width)
    assert f"trunk.blocks.{depth}.norm1.weight" not in sd
    assert sd["trunk.feature_bottleneck.weight"].shape == (64, width)
    assert sd["visual_proj.weight"].shape == (768, width)
    assert sd["pixel_decoder.proj_out.weight"].shape == (3 * 16 * 16, width, 1, 1)
    assert sd["token_embedding.weight"].shape == (49408, 768)
    assert sd["trunk.rope_embed.periods"].dtype == torch.bfloat16 and sd["trunk.rope_embed.periods"].numel() == 16
    assert not any(k.startswith(("dino", "teacher", "_orig_mod")) for k in sd)


def test_light_decoder_preset():
    with torch.device("meta"):
        m = VTP(vtp_config("vtp-l-light"))
    assert len(m.trunk.blocks) == 24 and len(m.pixel_decoder.blocks) == 4


def test_unknown_preset_and_bad_field():
    with pytest.raises(ConfigError, match="unknown model preset"):
        vtp_config("vtp-xxl")
    with pytest.raises(ConfigError, match="vision_ffn_layer"):
        vtp_config("vtp-nano", vision_ffn_layer="mlp")
    with pytest.raises(ConfigError, match="unknown config key no_such_field"):
        vtp_config("vtp-nano", no_such_field=1)


def test_save_load_round_trip(tmp_path):
    m = nano()
    with torch.no_grad():
        m.logit_scale.fill_(2.5)
    save_pretrained(m, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "vtp" and cfg["vision_embed_dim"] == 64
    m2 = load_pretrained(tmp_path / "ckpt")
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(m.encode(x), m2.encode(x))


def test_saved_layout_matches_published_keys(tmp_path, official_tiny_dir):
    """What we save has exactly the key set of the reference implementation's checkpoint."""
    m = load_pretrained(official_tiny_dir)
    save_pretrained(m, tmp_path / "ckpt")
    ours = load_file(tmp_path / "ckpt" / "model.safetensors")
    theirs = load_file(official_tiny_dir / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape for k in ours)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m = nano()
    save_pretrained(m, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vtp_fast.models.pretrained.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(nano(vision_depth=1), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "no temp dirs left behind"


@pytest.fixture
def ckpt(tmp_path, official_tiny_dir):
    d = tmp_path / "ckpt"
    shutil.copytree(official_tiny_dir, d)
    (d / "expected.safetensors").unlink()
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def _weights(d):
    """The checkpoint's tensors, copied out of the memory map (the file is rewritten afterwards)."""
    return {k: v.clone() for k, v in load_file(d / "model.safetensors").items()}


def _edit_weights(d, edit):
    sd = _weights(d)
    edit(sd)
    save_file(sd, str(d / "model.safetensors"))


def test_missing_unexpected_misshaped_keys_are_named(ckpt):
    _edit_weights(ckpt, lambda sd: (sd.pop("trunk.norm.weight"), sd.__setitem__("dino_head.w", torch.zeros(1)),
                                    sd.__setitem__("visual_proj.weight", torch.zeros(3, 3))))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    msg = str(e.value)
    assert "missing keys (1): trunk.norm.weight" in msg and "unexpected keys (1): dino_head.w" in msg
    assert "visual_proj.weight (3, 3) != (64, 64)" in msg and "model.safetensors" in msg


def test_pickle_is_refused(ckpt):
    torch.save(_weights(ckpt), ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="pickle"):
        load_pretrained(ckpt)


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained(ckpt)


def test_bad_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_pretrained(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "vtp", "vision_use_qk_norm": True}))
    with pytest.raises(CheckpointError, match="vision_use_qk_norm"):
        load_pretrained(ckpt)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_pretrained(tmp_path / "nope")


@torch.no_grad()
def test_shapes_non_square_and_bad_inputs():
    m = nano()
    x = torch.randn(3, 3, 48, 80)
    z = m.encode(x)
    assert z.shape == (3, 64, 3, 5)
    assert m.decode(z).shape == (3, 3, 48, 80)
    cls, patch = m.features(x)
    assert cls.shape == (3, 64) and patch.shape == (3, 15, 64)
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        m.encode(torch.randn(1, 3, 40, 48))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        m.encode(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="latents must be"):
        m.decode(torch.randn(1, 32, 2, 2))


@torch.no_grad()
def test_non_square_is_not_a_transposed_square():
    """The RoPE grid follows (h, w): encoding a transposed image is not the transposed encoding."""
    m = nano()
    x = torch.randn(1, 3, 32, 64)
    z, zt = m.encode(x), m.encode(x.transpose(2, 3))
    assert z.shape == (1, 64, 2, 4) and zt.shape == (1, 64, 4, 2)
    assert not torch.allclose(z.transpose(2, 3), zt, atol=1e-3)


@torch.no_grad()
def test_list_forward_equals_separate_forwards():
    m = nano()
    views = [torch.randn(2, 3, 64, 64), torch.randn(5, 3, 32, 32), torch.randn(1, 3, 48, 32)]
    masks = [torch.rand(2, 16) < 0.4, None, torch.rand(1, 6) < 0.5]
    together = m.trunk(views, masks)
    for view, mask, out in zip(views, masks, together, strict=True):
        alone = m.trunk(view, mask)
        assert out.grid == alone.grid
        # the concatenated linears may block fp32 sums differently: rounding-level agreement
        torch.testing.assert_close(out.cls, alone.cls, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.patch, alone.patch, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_mask_token_replaces_masked_patches_only():
    m = nano()
    with torch.no_grad():
        m.trunk.mask_token.normal_()
    x = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True
    tokens, _ = m.trunk.tokens(x, mask)
    plain, _ = m.trunk.tokens(x, None)
    assert torch.equal(tokens[0, 6], m.trunk.mask_token[0])  # +1: CLS first
    keep = torch.ones(17, dtype=torch.bool)
    keep[6] = False
    assert torch.equal(tokens[0, keep], plain[0, keep])


@torch.no_grad()
def test_text_features_normalised_and_pooled_at_end_token():
    m = nano()
    tokens = m.tokenize(["a red heart", "a grinning cat face with smiling eyes"])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.int64
    f = m.clip_text_features(tokens)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(2))
    # argmax pooling: what follows the end-of-text token cannot change the feature
    t2 = tokens.clone()
    t2[0, -1] = 5
    assert torch.allclose(m.clip_text_features(t2)[0], f[0], atol=1e-6)


def test_tokenize_truncates_keeping_end_of_text():
    m = nano()
    t = m.tokenize("word " * 100)
    assert t.shape == (1, 16) and t[0, -1].item() == t.max().item() == 49407


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_the_architecture_its_config_names(preset):
    c = vtp_config(preset)
    with torch.device("meta"):
        m = VTP(c)
    sd = m.state_dict()
    w, p = c.vision_embed_dim, c.vision_patch_size
    assert sd["trunk.cls_token"].shape == (1, 1, w)
    assert len(m.trunk.blocks) == c.vision_depth and len(m.pixel_decoder.blocks) == c.decoder_depth
    assert f"trunk.blocks.{c.vision_depth - 1}.norm1.weight" in sd and f"trunk.blocks.{c.vision_depth}.norm1.weight" \
        not in sd
    if c.vision_feature_bottleneck != w:
        assert sd["trunk.feature_bottleneck.weight"].shape == (c.vision_feature_bottleneck, w)
    else:  # as published: no bottleneck layer when it would keep the width
        assert not any(k.startswith("trunk.feature_bottleneck") for k in sd)
    assert sd["pixel_decoder.proj_out.weight"].shape == (3 * p * p, c.decoder_embed_dim, 1, 1)
    assert sd["token_embedding.weight"].shape == (c.text_vocab_size, c.text_embed_dim)
    assert len(m.text_transformer.resblocks) == c.text_depth
    assert all(t.is_meta for t in m.parameters())


def test_inference_fp32_is_the_plain_model_bit_for_bit():
    from vtp_fast.compile import apply_inference

    plain, fast = nano(), apply_inference(nano(), "fp32")
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        z = plain.encode(x)
        assert torch.equal(fast.encode(x), z) and torch.equal(fast.decode(z), plain.decode(z))


def test_inference_bf16_casts_the_weights_once_and_stays_near_fp32():
    """bf16: parameters bf16, pixel statistics fp32, fp32 input accepted; the reconstruction within bf16 rounding of
    fp32's (nano, random weights: |error| a few percent of the output's range) and one fingerprint for both."""
    from vtp_fast.compile import apply_inference
    from vtp_fast.models.pretrained import tokenizer_fingerprint

    plain, fast = nano(), apply_inference(nano(), "bf16")
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16} and fast.pixel_mean.dtype == torch.float32
    assert tokenizer_fingerprint(fast) == tokenizer_fingerprint(plain)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = plain.decode(plain.encode(plain.normalize(x)))
        got = fast.decode(fast.encode(fast.normalize(x)))
    assert got.dtype == torch.bfloat16
    err = (got.float() - want).abs()
    assert 0 < err.max() < 0.05 * want.abs().max() and err.mean() < 0.01 * want.abs().mean()
    with pytest.raises(ValueError, match="precision 'fp16'"):
        apply_inference(nano(), "fp16")


def test_inference_compiled_matches_eager():
    from vtp_fast.compile import apply_inference

    plain, fast = nano(), apply_inference(nano(), "fp32", compile=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        z = plain.encode(x)
        torch.testing.assert_close(fast.encode(x), z, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast.decode(z), plain.decode(z), rtol=1e-4, atol=1e-4)

"""The timm vision plugin: every family builds, matches transformers on the same weights, and rejects bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from splice.core.errors import CheckpointError, ConfigError, InputError
from splice.core.interfaces import VisionEncoder
from splice.plugins import timm_vision as tv

transformers = pytest.importorskip("transformers")


def _entries() -> dict[str, SimpleNamespace]:
    entries: dict[str, SimpleNamespace] = {}

    def register(name, builder, config_cls, *, aliases=(), tiny=None, hf=None, description=None):
        assert name not in entries
        entries[name] = SimpleNamespace(builder=builder, config_cls=config_cls, aliases=aliases, tiny=tiny, hf=hf,
                                        description=description)

    tv.register_encoders(register)
    return entries


ENTRIES = _entries()


def _tiny(name: str, **over):
    e = ENTRIES[name]
    return e.builder(e.config_cls(**{**e.tiny, **over})).eval()


def _px(enc, batch: int = 2) -> torch.Tensor:
    c, (h, w) = enc.preprocessing.in_chans, enc.preprocessing.image_size
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# Registry contents


def test_registered_names():
    assert set(ENTRIES) == {"vit", "deit", "deit_distilled", "beit", "swin", "timm"}
    assert ENTRIES["vit"].hf.model_types == ("vit",)
    assert ENTRIES["deit_distilled"].hf.model_types == ("deit",)
    assert ENTRIES["beit"].hf.model_types == ("beit",)
    assert ENTRIES["swin"].hf.model_types == ("swin",)
    assert ENTRIES["deit"].hf.model_types == ()
    assert all(e.description for e in ENTRIES.values())


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_tiny_builds_and_runs(name):
    enc = _tiny(name)
    assert isinstance(enc, VisionEncoder)
    out = enc(_px(enc))
    assert out.last_hidden_state.ndim == 3
    assert out.last_hidden_state.shape[0] == 2 and out.last_hidden_state.shape[2] == enc.hidden_size
    assert out.hidden_states is None
    full = enc(_px(enc), output_hidden_states=True)
    torch.testing.assert_close(full.last_hidden_state, out.last_hidden_state)
    assert all(h.ndim == 3 and h.shape[0] == 2 for h in full.hidden_states)
    assert set(enc.state_dict()) and all(k.startswith("model.") for k in enc.state_dict())


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_tiny_builds_on_meta(name):
    e = ENTRIES[name]
    with torch.device("meta"):
        enc = e.builder(e.config_cls(**e.tiny))
    assert all(p.is_meta for p in enc.parameters())


def test_expected_token_counts():
    assert _tiny("vit")(torch.randn(1, 3, 32, 32)).last_hidden_state.shape == (1, 17, 48)
    assert _tiny("deit_distilled")(torch.randn(1, 3, 32, 32)).last_hidden_state.shape == (1, 18, 48)
    swin = _tiny("swin")
    assert swin.hidden_size == 32
    assert swin(torch.randn(1, 3, 32, 32)).last_hidden_state.shape == (1, 16, 32)  # 8x8 grid merged once
    assert len(swin(torch.randn(1, 3, 32, 32), output_hidden_states=True).hidden_states) == 3  # embed + 2 stages


def test_preprocessing_follows_the_config():
    enc = _tiny("vit", img_size=48, in_chans=1)
    assert enc.preprocessing.image_size == (48, 48)
    assert enc.preprocessing.in_chans == 1 and len(enc.preprocessing.mean) == 1
    assert enc(torch.randn(1, 1, 48, 48)).last_hidden_state.shape == (1, 37, 48)


# ---------------------------------------------------------------------------------------------------------------
# Generic timm entry


def test_timm_generic_nchw_is_flattened_channels_last():
    enc = _tiny("timm", img_size=64)
    assert enc.hidden_size == 32 and not enc.channels_last
    px = torch.randn(2, 3, 64, 64)
    feats = enc.model.forward_features(px)  # (2, 32, 2, 2)
    want = feats.flatten(2).transpose(1, 2)  # (2, 4, 32)
    torch.testing.assert_close(enc(px).last_hidden_state, want)
    assert enc(torch.randn(1, 3, 96, 96)).last_hidden_state.shape == (1, 9, 32)  # convnets take any size


def test_timm_generic_nhwc_matches_swin_family():
    swin = _tiny("swin")
    generic = ENTRIES["timm"].builder(tv.TimmConfig(
        model="swin_tiny_patch4_window7_224", img_size=32,
        kwargs=dict(patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4))).eval()
    assert generic.channels_last and generic.hidden_size == swin.hidden_size
    generic.load_state_dict(swin.state_dict(), strict=True)
    px = _px(swin)
    torch.testing.assert_close(generic(px).last_hidden_state, swin(px).last_hidden_state)
    with pytest.raises(InputError, match="32, 32"):
        generic(torch.randn(1, 3, 64, 64))


def test_timm_generic_rejects():
    with pytest.raises(ValidationError, match="did you mean 'resnet18'"):
        tv.TimmConfig(model="resnet18x")
    with pytest.raises(ValidationError, match="num_classes"):
        tv.TimmConfig(model="resnet18", kwargs={"num_classes": 10})
    with pytest.raises(ConfigError, match="kwargs"):
        ENTRIES["timm"].builder(tv.TimmConfig(model="convnext_atto", kwargs={"window_size": 7}))


# ---------------------------------------------------------------------------------------------------------------
# Bad configs and inputs


def _messages(exc_info) -> str:
    return " | ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc_info.value.errors())


def test_heads_must_divide_width():
    with pytest.raises(ValidationError) as ei:
        tv.ViTConfig(embed_dim=48, num_heads=5)
    msg = _messages(ei)
    assert "num_heads: " in msg and "5" in msg and "48" in msg and "fix" in msg


def test_img_size_must_divide_by_patch():
    with pytest.raises(ValidationError) as ei:
        tv.BEiTConfig(img_size=30, patch_size=8)
    msg = _messages(ei)
    assert "img_size 30" in msg and "patch_size 8" in msg and "24 or 32" in msg


def test_swin_checks():
    with pytest.raises(ValidationError, match="window_size 3"):
        tv.SwinConfig(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=3)
    with pytest.raises(ValidationError, match="one head count per stage"):
        tv.SwinConfig(depths=(2, 2), num_heads=(2, 4, 8))
    with pytest.raises(ValidationError, match="stage 1"):
        tv.SwinConfig(embed_dim=16, depths=(2, 2), num_heads=(2, 3))
    with pytest.raises(ValidationError, match="divisible by 4"):
        tv.SwinConfig(img_size=24, patch_size=4, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=3)
    with pytest.raises(ValidationError, match="extra"):
        tv.SwinConfig(depth=3)


def test_bad_pixel_values():
    enc = _tiny("vit")
    with pytest.raises(InputError, match=r"\(B, 3, 32, 32\).*\(2, 3, 64, 64\)|\(2, 3, 64, 64\).*\(B, 3, 32, 32\)"):
        enc(torch.randn(2, 3, 64, 64))
    with pytest.raises(InputError, match="1 channels"):
        enc(torch.randn(2, 1, 32, 32))
    with pytest.raises(InputError, match="4-D"):
        enc(torch.randn(3, 32, 32))
    with pytest.raises(InputError, match="floating point"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_hf_settings_timm_cannot_express():
    swin = ENTRIES["swin"].hf
    with pytest.raises(ConfigError, match="use_absolute_embeddings"):
        swin.config_from_hf({"use_absolute_embeddings": True})
    with pytest.raises(ConfigError, match="hidden_act"):
        ENTRIES["vit"].hf.config_from_hf({"hidden_act": "relu"})
    with pytest.raises(ConfigError, match="image_size"):  # ViT reads [H, W] (issue 14); timm's Swin is square
        swin.config_from_hf({"image_size": [224, 160]})


def test_qkv_shape_mismatch_is_a_checkpoint_error():
    hf = transformers.ViTModel(_vit_hf_config())
    sd = dict(hf.state_dict())
    sd["layers.0.attention.k_proj.weight"] = torch.zeros(24, 48)
    with pytest.raises(CheckpointError, match="query"):
        ENTRIES["vit"].hf.state_dict_from_hf(sd, hf.config.to_dict())


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers on the same weights


def _vit_hf_config(cls=None, **kw):
    cls = cls or transformers.ViTConfig
    return cls(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
               intermediate_size=96, **kw)


def _roundtrip(tmp_path, name, hf_model, *, extra_prefix="", extra=None):
    """Save a transformers model, load it into ours; return (hf, ours, unused, hf json)."""
    torch.manual_seed(0)
    with torch.no_grad():  # every parameter gets its own values, so swapped or zero-initialised ones show
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf_model.eval().save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    hf_json = json.loads((tmp_path / "config.json").read_text())
    sd = {extra_prefix + k: v for k, v in sd.items()} | (extra or {})

    e = ENTRIES[name]
    enc = e.builder(e.config_cls(**e.hf.config_from_hf(hf_json))).eval()
    mapped, unused = e.hf.state_dict_from_hf(sd, hf_json)
    enc.load_state_dict(mapped, strict=True)

    # transformers-5 in-memory names map to the same tensors
    mapped_v5, _ = e.hf.state_dict_from_hf(hf_model.state_dict(), hf_json)
    assert mapped_v5.keys() == mapped.keys()
    assert all(torch.equal(mapped_v5[k], mapped[k]) for k in mapped)

    # export gives back exactly the tensors we read, under their on-disk names
    back = e.hf.state_dict_to_hf(enc.state_dict(), hf_json)
    disk = {k.removeprefix(extra_prefix): v for k, v in sd.items() if k not in unused}
    assert back.keys() == disk.keys()
    assert all(torch.equal(back[k], disk[k]) for k in back)
    again, none = e.hf.state_dict_from_hf(back, hf_json)
    assert none == [] and again.keys() == enc.state_dict().keys()
    return enc, sorted(unused)


def _assert_parity(hf_model, enc, *, hidden_states=False):
    px = _px(enc)
    with torch.no_grad():
        want = hf_model(pixel_values=px, output_hidden_states=hidden_states)
        got = enc(px, output_hidden_states=hidden_states)
    assert got.last_hidden_state.shape == want.last_hidden_state.shape
    assert (got.last_hidden_state - want.last_hidden_state).abs().max() <= 1e-4
    if hidden_states:
        assert len(got.hidden_states) == len(want.hidden_states)
        for g, w in zip(got.hidden_states, want.hidden_states):
            assert (g - w).abs().max() <= 1e-4


def test_vit_matches_transformers(tmp_path):
    hf = transformers.ViTModel(_vit_hf_config())
    enc, unused = _roundtrip(tmp_path, "vit", hf, extra_prefix="vit.",
                             extra={"classifier.weight": torch.zeros(10, 48), "classifier.bias": torch.zeros(10)})
    assert unused == ["classifier.bias", "classifier.weight", "vit.pooler.dense.bias", "vit.pooler.dense.weight"]
    assert enc.model.norm.eps == 1e-12  # transformers' eps, not timm's default
    _assert_parity(hf, enc, hidden_states=True)


def test_deit_distilled_matches_transformers(tmp_path):
    hf = transformers.DeiTModel(_vit_hf_config(transformers.DeiTConfig))
    enc, unused = _roundtrip(tmp_path, "deit_distilled", hf)
    assert unused == ["pooler.dense.bias", "pooler.dense.weight"]
    _assert_parity(hf, enc, hidden_states=True)


def test_beit_per_layer_bias_mean_pooling_matches_transformers(tmp_path):
    hf = transformers.BeitModel(_vit_hf_config(
        transformers.BeitConfig, use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1))
    enc, unused = _roundtrip(tmp_path, "beit", hf)
    assert unused == []
    assert not isinstance(enc.model.fc_norm, torch.nn.Identity)  # pooler.layernorm went there
    _assert_parity(hf, enc, hidden_states=True)


def test_beit_shared_bias_abs_pos_no_pooling_matches_transformers(tmp_path):
    hf = transformers.BeitModel(_vit_hf_config(
        transformers.BeitConfig, use_shared_relative_position_bias=True, use_absolute_position_embeddings=True,
        use_mean_pooling=False, layer_scale_init_value=0.0, use_mask_token=True))
    enc, unused = _roundtrip(tmp_path, "beit", hf)
    assert unused == ["embeddings.mask_token"]
    assert enc.model.blocks[0].gamma_1 is None
    _assert_parity(hf, enc)


def test_swin_matches_transformers(tmp_path):
    hf = transformers.SwinModel(transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4))
    enc, unused = _roundtrip(tmp_path, "swin", hf)
    assert unused == []
    assert enc.hidden_size == hf.config.hidden_size == 32
    _assert_parity(hf, enc)


def test_swin_reads_legacy_index_buffers(tmp_path):
    # transformers 4.x files carry relative_position_index; they must land in unused, not in the module.
    hf_json = {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 4],
               "window_size": 4}
    enc = ENTRIES["swin"].builder(tv.SwinConfig(**ENTRIES["swin"].hf.config_from_hf(hf_json)))
    sd = ENTRIES["swin"].hf.state_dict_to_hf(enc.state_dict(), hf_json)
    sd["encoder.layers.0.blocks.0.attention.self.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    mapped, unused = ENTRIES["swin"].hf.state_dict_from_hf(sd, hf_json)
    assert unused == ["encoder.layers.0.blocks.0.attention.self.relative_position_index"]
    enc.load_state_dict(mapped, strict=True)


@pytest.mark.parametrize("family", ["vit", "deit_distilled"])
def test_rectangular_vit_matches_transformers(tmp_path, family):
    """transformers' ViT/DeiT ``image_size`` may be [H, W]; timm takes the same (H, W), positions row-major."""
    cls = transformers.ViTConfig if family == "vit" else transformers.DeiTConfig
    model = transformers.ViTModel if family == "vit" else transformers.DeiTModel
    hf = model(cls(image_size=[32, 48], patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                   intermediate_size=96))
    enc, _ = _roundtrip(tmp_path, family, hf)
    assert enc.preprocessing.image_size == (32, 48)
    values = ENTRIES[family].hf.config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert values["img_size"] == (32, 48)
    assert ENTRIES[family].hf.config_to_hf(ENTRIES[family].config_cls(**values).model_dump())["image_size"] == [32, 48]
    _assert_parity(hf, enc, hidden_states=True)


def test_rectangular_img_size_checks():
    assert _tiny("vit", img_size=[32, 48])(torch.randn(1, 3, 32, 48)).last_hidden_state.shape == (1, 1 + 4 * 6, 48)
    with pytest.raises(ValidationError, match="img_size 44 is not divisible by patch_size 8"):
        tv.ViTConfig(**{**ENTRIES["vit"].tiny, "img_size": [32, 44]})
    with pytest.raises(ValidationError, match="img_size"):
        tv.ViTConfig(**{**ENTRIES["vit"].tiny, "img_size": [32, 48, 3]})
    with pytest.raises(ConfigError, match="image_size"):
        ENTRIES["beit"].hf.config_from_hf({"image_size": [32, 48]})  # timm's BEiT takes a square

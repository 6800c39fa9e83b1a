"""The DonutSwin encoder (Donut, Nougat): parity with transformers' DonutSwinModel on rectangular images whose stages
are not window multiples (and an image that is not a patch multiple), VisionEncoderDecoder folders read by
splice.load and written by splice.export_transformers; and a VED folder with a rectangular ViT (its encoder-only
parity is in test_timm_vision.py)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

import splice
from splice.core.errors import ConfigError, InputError
from splice.plugins import donut_swin as ds

transformers = pytest.importorskip("transformers")

from oracle import perturb  # noqa: E402

ATOL = 1e-4

# (image_size, window, depths, heads): stages 10x14 -> 5x7 -> 3x4 with window 3 (each padded, the last unshifted
# with its width padded); 16x12 -> 8x6 with window 5; a 42x58 image, not a patch multiple (an 11x15 grid).
CASES = {
    "40x56-w3": ([40, 56], 3, [1, 2, 2], [2, 2, 4]),
    "64x48-w5": ([64, 48], 5, [2, 2], [2, 4]),
    "42x58-w3-unpatched": ([42, 58], 3, [2, 1, 2], [2, 2, 4]),
}


def _hf_config(size, window, depths, heads, **kw):
    return transformers.DonutSwinConfig(image_size=size, patch_size=4, embed_dim=8, depths=depths, num_heads=heads,
                                        window_size=window, **kw)


def _px(size, batch=2, seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _load(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    hf_json = json.loads((tmp_path / "config.json").read_text())
    enc = ds.build_donut_swin(ds.DonutSwinConfig(**ds.HF.config_from_hf(hf_json))).eval()
    mapped, unused = ds.HF.state_dict_from_hf(sd, hf_json)
    enc.load_state_dict(mapped, strict=True)
    return enc, sd, hf_json, unused


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(tmp_path, case):
    size, window, depths, heads = CASES[case]
    hf = perturb(transformers.DonutSwinModel(_hf_config(size, window, depths, heads)), scale=0.05)
    enc, sd, hf_json, unused = _load(tmp_path, hf)
    assert all(k.endswith("relative_position_index") for k in unused)  # transformers' files carry the indexes
    assert enc.hidden_size == hf.config.hidden_size == 8 * 2 ** (len(depths) - 1)
    assert enc.preprocessing.image_size == tuple(size)

    px = _px(size)
    with torch.no_grad():
        want = hf(pixel_values=px, output_hidden_states=True)
        got = enc(px, output_hidden_states=True)
    assert got.last_hidden_state.shape == want.last_hidden_state.shape
    assert (got.last_hidden_state - want.last_hidden_state).abs().max() <= ATOL
    assert len(got.hidden_states) == len(want.hidden_states) == len(depths) + 1
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert g.shape == w.shape and (g - w).abs().max() <= ATOL
    assert enc(px).hidden_states is None

    # export gives back exactly the tensors transformers saved (indexes included), and reads back
    back = ds.HF.state_dict_to_hf(enc.state_dict(), hf_json)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in back)
    again = transformers.DonutSwinModel(transformers.DonutSwinConfig(**ds.HF.config_to_hf(
        ds.DonutSwinConfig(**ds.HF.config_from_hf(hf_json)).model_dump()))).eval()
    assert again.load_state_dict(back, strict=True)
    with torch.no_grad():
        assert (again(pixel_values=px).last_hidden_state - want.last_hidden_state).abs().max() <= ATOL


def test_classification_prefix_and_mask_token_are_read(tmp_path):
    size, window, depths, heads = CASES["40x56-w3"]
    hf = perturb(transformers.DonutSwinForImageClassification(_hf_config(size, window, depths, heads, num_labels=3)))
    hf.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["donut.embeddings.mask_token"] = torch.zeros(1, 1, 8)
    mapped, unused = ds.HF.state_dict_from_hf(sd, hf.config.to_dict())
    assert {u for u in unused if "relative_position_index" not in u} == {
        "classifier.bias", "classifier.weight", "donut.embeddings.mask_token"}
    enc = ds.build_donut_swin(ds.DonutSwinConfig(**ds.HF.config_from_hf(hf.config.to_dict()))).eval()
    enc.load_state_dict(mapped, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# VisionEncoderDecoder folders: splice.load, greedy generate, export


def _decoder(kind: str):
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=99, n_positions=32, n_embd=24, n_layer=2, n_head=4,
                                       add_cross_attention=True, is_decoder=True, bos_token_id=98, eos_token_id=98)
    return transformers.BartConfig(vocab_size=99, d_model=24, decoder_layers=2, decoder_attention_heads=4,
                                   decoder_ffn_dim=48, max_position_embeddings=32, is_decoder=True,
                                   add_cross_attention=True, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                                   decoder_start_token_id=2)


def _ved(encoder_config, decoder: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder_config, _decoder(decoder))
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = (98, 0, 98) if decoder == "gpt2" else (2, 1, 2)
    return perturb(transformers.VisionEncoderDecoderModel(config=cfg), seed, 0.05)


def _assert_ved_parity(hf, ours, size):
    px = _px(size, batch=2, seed=2)
    ids = torch.randint(3, 98, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = hf(pixel_values=px, decoder_input_ids=ids)
        b = ours(pixel_values=px, decoder_input_ids=ids)
        assert (a.encoder_last_hidden_state - b.encoder_last_hidden_state).abs().max() <= ATOL
        assert (a.logits - b.logits).abs().max() <= ATOL
        want = hf.generate(pixel_values=px, max_new_tokens=8, do_sample=False, num_beams=1)
    assert ours.generate(px, max_new_tokens=8).tolist() == want.tolist()


@pytest.mark.parametrize("decoder", ["gpt2", "bart"])
def test_ved_folder_loads_generates_and_exports(tmp_path, decoder):
    size, window, depths, heads = CASES["40x56-w3"]
    hf = _ved(_hf_config(size, window, depths, heads), decoder)
    hf.save_pretrained(tmp_path / "hf")
    ours = splice.load(tmp_path / "hf")
    assert not ours.loading_report.missing and not ours.loading_report.unexpected
    assert ours.encoder.preprocessing.image_size == (40, 56)
    _assert_ved_parity(hf, ours, size)

    splice.export_transformers(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["encoder"]["model_type"] == "donut-swin" and config["encoder"]["image_size"] == [40, 56]
    again = transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "out").eval()
    _assert_ved_parity(again, ours, size)


def test_ved_rectangular_vit(tmp_path):
    enc = transformers.ViTConfig(image_size=[32, 48], patch_size=8, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=3, intermediate_size=96)
    hf = _ved(enc, "gpt2", seed=4)
    hf.save_pretrained(tmp_path / "hf")
    ours = splice.load(tmp_path / "hf")
    assert ours.encoder.preprocessing.image_size == (32, 48)
    _assert_ved_parity(hf, ours, (32, 48))
    splice.export_transformers(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["encoder"]["image_size"] == [32, 48]
    _assert_ved_parity(transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "out").eval(), ours, (32, 48))


# ---------------------------------------------------------------------------------------------------------------
# Config and input errors


def _message(exc_info) -> str:
    return str(exc_info.value)


@pytest.mark.parametrize("values,says", [
    (dict(ds.TINY, window_size=4), "stage 2 is 3x4 tokens, shorter than window_size 4"),
    (dict(ds.TINY, num_heads=[2, 2]), "one head count per stage"),
    (dict(ds.TINY, num_heads=[3, 2, 4]), "does not divide the stage width 8"),
    (dict(ds.TINY, img_size=[40, 56, 3]), "img_size"),
    (dict(ds.TINY, img_size=[8192, 8192], patch_size=1), "patches"),
    (dict(ds.TINY, depths=[100, 20, 10]), "add up to"),
    (dict(ds.TINY, embed_dim=8192), "wide"),
    (dict(img_size=[4096, 4096], patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=64), "GiB"),
])
def test_config_errors(values, says):
    with pytest.raises(ValidationError) as e:
        ds.DonutSwinConfig(**values)
    assert says in _message(e) and "fix:" in _message(e)


def test_released_sizes_are_accepted_and_square_is_a_pair():
    donut = ds.DonutSwinConfig()  # naver-clova-ix/donut-base
    assert donut.img_size == (2560, 1920) and donut.window_size == 10
    ds.DonutSwinConfig(img_size=[896, 672], window_size=7)  # facebook/nougat-base
    assert ds.DonutSwinConfig(**dict(ds.TINY, img_size=48)).img_size == (48, 48)


def test_hf_settings_it_cannot_read():
    for hf, field in (({"use_absolute_embeddings": True}, "use_absolute_embeddings"),
                      ({"patch_size": [4, 2]}, "patch_size"), ({"hidden_act": "quick_gelu"}, "hidden_act")):
        with pytest.raises(ConfigError, match=field):
            ds.HF.config_from_hf(hf)


def test_bad_pixel_values():
    enc = ds.build_donut_swin(ds.DonutSwinConfig(**ds.TINY)).eval()
    with pytest.raises(InputError, match="40x56"):
        enc(torch.randn(1, 3, 56, 40))
    with pytest.raises(InputError, match="channel"):
        enc(torch.randn(1, 1, 40, 56))


def test_validate_builds_the_tiny_pair():
    plan = splice.validate({"encoder": {"name": "donut_swin", "config": ds.TINY},
                            "decoder": {"name": "gpt2", "config": {"n_embd": 32, "n_layer": 1, "n_head": 2}},
                            "tokens": {"decoder_start": 1, "pad": 0, "eos": 2}})
    assert not plan.problems, plan.problems

"""CLIP's vision tower: parity with transformers' CLIPVisionModel on the same random weights (last_hidden_state,
pooler_output and every hidden_states[i], negative i included, for quick_gelu and gelu, on a 4x4 patch grid and on
an image that is not a patch multiple); the export read back by CLIPVisionModel.from_pretrained; a whole CLIPModel
folder (and transformers 4's prefixed names) read as a pretrained tower; VisionEncoderDecoder folders with a CLIP
encoder (into GPT-2, BERT and TrOCR) read by splice.load, generated from and exported back. The VisionTextDualEncoder
pairs (clip_vision x bert, x roberta) are in tests/test_dual_encoder.py's registry-wide matrix."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

import splice
from splice.core.errors import ConfigError, InputError
from splice.plugins import clip_vision as cv

transformers = pytest.importorskip("transformers")

from oracle import perturb  # noqa: E402
from test_trocr import from_pretrained as hf_from_pretrained  # noqa: E402

ATOL = 1e-4
MEASURED: dict[str, float] = {}  # the largest differences seen (pytest -s prints them at the end)
VIPLLAVA_LAYERS = (-2, -5, -8, -11, 6)  # VipLlava's default vision_feature_layers

# (image_size, patch_size): a 4x4 grid; a 30 px image read as a 3x3 grid of 8 px patches (6 px never read)
GRIDS = {"4x4": (32, 8), "3x3-unpatched": (30, 8)}


def _hf_config(image_size=32, patch_size=8, act="quick_gelu", layers=10, **over):
    return transformers.CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                         hidden_act=act, **over)


def _px(size, batch=2, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ours(hf_json: dict, tensors: dict) -> tuple[cv.ClipVisionEncoder, list[str]]:
    enc = cv.build_clip_vision(cv.ClipVisionConfig(**cv.HF.config_from_hf(hf_json))).eval()
    mapped, unused = cv.HF.state_dict_from_hf(tensors, hf_json)
    enc.load_state_dict(mapped, strict=True)
    return enc, unused


def _diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module", autouse=True)
def _print_measured():
    yield
    print("\nclip_vision max abs diffs:", json.dumps(MEASURED, indent=1))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_matches_transformers(tmp_path, grid, act):
    size, patch = GRIDS[grid]
    torch.manual_seed(0)
    hf = perturb(transformers.CLIPVisionModel(_hf_config(size, patch, act)), scale=0.05)
    hf.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    hf_json = json.loads((tmp_path / "config.json").read_text())
    enc, unused = _ours(hf_json, sd)
    assert not unused
    assert enc.hidden_size == 32 and enc.preprocessing.image_size == (size, size)
    assert enc.preprocessing.mean == cv.CLIP_MEAN

    px = _px(size)
    with torch.no_grad():
        want = hf(pixel_values=px, output_hidden_states=True)
        got = enc(px, output_hidden_states=True)
    name = f"{grid} {act}"
    assert got.last_hidden_state.shape == want.last_hidden_state.shape == (2, (size // patch) ** 2 + 1, 32)
    MEASURED[f"{name} last_hidden_state"] = _diff(got.last_hidden_state, want.last_hidden_state)
    MEASURED[f"{name} pooler_output"] = _diff(got.pooler_output, want.pooler_output)
    assert len(got.hidden_states) == len(want.hidden_states) == 11
    MEASURED[f"{name} hidden_states"] = max(_diff(got.hidden_states[i], want.hidden_states[i])
                                            for i in range(-11, 11))
    assert max(v for k, v in MEASURED.items() if k.startswith(name)) <= ATOL
    for i in VIPLLAVA_LAYERS:  # the layers a VipLlava projector concatenates
        assert _diff(got.hidden_states[i], want.hidden_states[i]) <= ATOL
    assert torch.equal(got.hidden_states[-1], got.last_hidden_state)
    plain = enc(px)
    assert plain.hidden_states is None and plain.pooler_output.shape == (2, 32)


def test_export_is_read_by_transformers(tmp_path):
    torch.manual_seed(1)
    hf = perturb(transformers.CLIPVisionModel(_hf_config(layers=3)), seed=1, scale=0.05)
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    hf_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    enc, _ = _ours(hf_json, sd)

    out_json = cv.HF.config_to_hf(cv.ClipVisionConfig(**cv.HF.config_from_hf(hf_json)).model_dump())
    back = cv.HF.state_dict_to_hf(enc.state_dict(), out_json)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in back)  # transformers' own file
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text(json.dumps(out_json))
    save_file(back, str(tmp_path / "out" / "model.safetensors"), metadata={"format": "pt"})
    again = transformers.CLIPVisionModel.from_pretrained(tmp_path / "out").eval()
    px = _px(32)
    with torch.no_grad():
        want, got = again(pixel_values=px), enc(px)
    MEASURED["export last_hidden_state"] = d = _diff(got.last_hidden_state, want.last_hidden_state)
    assert d <= ATOL and _diff(got.pooler_output, want.pooler_output) <= ATOL


def test_clip_model_folder_is_a_pretrained_tower(tmp_path):
    """A CLIPModel folder (model_type clip, as openai/clip-vit-*): its vision_config and vision_model.* tensors
    give the tower; the text tower and projections are expected leftovers, not errors."""
    torch.manual_seed(2)
    cfg = transformers.CLIPConfig(vision_config=_hf_config(layers=2).to_dict(),
                                  text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, vocab_size=99), projection_dim=8)
    hf = perturb(transformers.CLIPModel(cfg), seed=2, scale=0.05)
    hf.save_pretrained(tmp_path / "clip")
    spec = {"encoder": {"name": "clip_vision", "pretrained": str(tmp_path / "clip")},
            "decoder": {"name": "gpt2", "config": {"n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 99}},
            "tokens": {"decoder_start": 1, "pad": 0, "eos": 2}}
    ours = splice.compose(spec).eval()
    assert ours.spec["encoder"]["config"]["num_hidden_layers"] == 2  # read from vision_config
    report = ours.loading_report
    assert not report.missing and not report.unexpected
    assert not any(name.startswith("encoder.") for name in report.initialised)
    px = _px(32)
    with torch.no_grad():
        want = hf.vision_model(pixel_values=px)
        got = ours.encoder(px)
    assert _diff(got.last_hidden_state, want.last_hidden_state) <= ATOL
    assert _diff(got.pooler_output, want.pooler_output) <= ATOL

    # transformers 4 wrote CLIPVisionModel's names under vision_model., with the position ids
    v4 = {f"vision_model.{k}": v for k, v in hf.vision_model.state_dict().items()}
    v4["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    enc, unused = _ours(hf.config.vision_config.to_dict(), v4)
    assert unused == ["vision_model.embeddings.position_ids"]
    with torch.no_grad():
        assert _diff(enc(px).last_hidden_state, want.last_hidden_state) <= ATOL


# ---------------------------------------------------------------------------------------------------------------
# VisionEncoderDecoder folders: a CLIP encoder into each decoder family transformers pairs it with

TOKENS = dict(decoder_start_token_id=2, pad_token_id=1, eos_token_id=2)
DECODERS = {
    # 24 wide: transformers (and splice) add enc_to_dec_proj from the encoder's 32
    "gpt2": lambda: transformers.GPT2Config(vocab_size=99, n_positions=32, n_embd=24, n_layer=2, n_head=4,
                                            bos_token_id=2, eos_token_id=2),
    "bert": lambda: transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=32, pad_token_id=1),
    "trocr": lambda: transformers.TrOCRConfig(vocab_size=99, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                              decoder_ffn_dim=64, max_position_embeddings=64,
                                              cross_attention_hidden_size=32, init_std=0.3, **TOKENS),
}


def _save_ved(folder, decoder: str, seed: int = 0):
    torch.manual_seed(seed)
    dec = DECODERS[decoder]()
    dec.is_decoder, dec.add_cross_attention = True, True
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(_hf_config(30, 8, layers=2), dec)
    for key, value in TOKENS.items():
        setattr(cfg, key, value)
    hf = perturb(transformers.VisionEncoderDecoderModel(config=cfg), seed, scale=0.3 if decoder == "gpt2" else 0.05)
    hf.save_pretrained(folder)
    return hf.eval()


@torch.no_grad()
def _assert_ved_parity(hf, ours, name: str):
    px = _px(30, seed=2)
    ids = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(3))
    a = hf(pixel_values=px, decoder_input_ids=ids)
    b = ours(pixel_values=px, decoder_input_ids=ids)
    assert _diff(a.encoder_last_hidden_state, b.encoder_last_hidden_state) <= ATOL
    MEASURED[f"{name} logits"] = d = _diff(a.logits, b.logits)
    assert d <= ATOL
    want = hf.generate(pixel_values=px, max_new_tokens=8, do_sample=False, num_beams=1)
    assert ours.generate(px, max_new_tokens=8).tolist() == want.tolist()
    assert want.shape[1] >= 5 and want[0].tolist() != want[1].tolist(), want  # a real search, image-dependent


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_ved_folder_loads_generates_and_exports(tmp_path, decoder):
    hf = _save_ved(tmp_path / "hf", decoder)
    ours = splice.load(tmp_path / "hf")
    assert ours.spec["encoder"]["name"] == "clip_vision"
    assert not ours.loading_report.missing and not ours.loading_report.unexpected
    assert (ours.enc_to_dec_proj is not None) == (decoder == "gpt2")
    _assert_ved_parity(hf, ours, f"ved {decoder}")

    splice.export_transformers(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["encoder"]["model_type"] == "clip_vision_model" and config["encoder"]["image_size"] == 30
    again = hf_from_pretrained(tmp_path / "out")  # transformers' own reading (TrOCR's sinusoids refilled)
    _assert_ved_parity(again, ours, f"ved {decoder} export")


# ---------------------------------------------------------------------------------------------------------------
# Config, checkpoint and input errors


@pytest.mark.parametrize("values,says", [
    (dict(cv.TINY, num_attention_heads=3), "num_attention_heads=3 does not divide hidden_size=16"),
    (dict(cv.TINY, patch_size=40), "holds no patch"),
    (dict(cv.TINY, image_size=4096, patch_size=2), "patches"),
    (dict(cv.TINY, hidden_act="swish"), "hidden_act"),
    (dict(cv.TINY, projection_dim=8), "projection_dim"),
])
def test_config_errors(values, says):
    with pytest.raises(ValidationError) as e:
        cv.ClipVisionConfig(**values)
    assert says in str(e.value)


def test_hf_settings_it_cannot_read():
    for hf, field in (({"hidden_act": "relu2"}, "hidden_act"), ({"image_size": [224, 336]}, "image_size"),
                      ({"model_type": "clip", "vision_config": 3}, "vision_config")):
        with pytest.raises(ConfigError, match=field) as e:
            cv.HF.config_from_hf(hf)
        assert "fix" in str(e.value)
    llava = cv.HF.config_from_hf({"image_size": [336, 336], "patch_size": 14, "projection_dim": 768})
    assert llava["image_size"] == 336 and "projection_dim" not in llava


def test_a_checkpoint_of_another_shape_is_refused_by_name():
    enc = cv.build_clip_vision(cv.ClipVisionConfig(**cv.TINY))
    hf_json = cv.HF.config_to_hf(cv.ClipVisionConfig(**cv.TINY).model_dump())
    sd = cv.HF.state_dict_to_hf(enc.state_dict(), hf_json)
    sd["embeddings.position_embedding.weight"] = torch.zeros(10, 16)
    with pytest.raises(splice.CheckpointError, match="position_embedding.*image_size=32, patch_size=8"):
        cv.HF.state_dict_from_hf(sd, hf_json)


@pytest.mark.parametrize("pixels,says", [
    (torch.randn(1, 3, 32, 40), "32x32"), (torch.randn(1, 1, 32, 32), "channel"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.long), "floating"), (torch.randn(3, 32, 32), "4-D"),
])
def test_bad_pixel_values_are_input_errors(pixels, says):
    with pytest.raises(InputError, match=says) as e:
        cv.build_clip_vision(cv.ClipVisionConfig(**cv.TINY)).eval()(pixels)
    assert "fix" in str(e.value)


def test_validate_builds_the_tiny_pair_and_trains():
    spec = {"encoder": {"name": "clip_vision", "config": cv.TINY},
            "decoder": {"name": "gpt2", "config": {"n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 50}},
            "tokens": {"decoder_start": 1, "pad": 0, "eos": 2}}
    plan = splice.validate(spec)
    assert not plan.problems, plan.problems
    model = splice.compose(spec)
    loss = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.randint(3, 50, (2, 5))).loss
    loss.backward()
    assert model.encoder.embeddings.class_embedding.grad is not None

"""How older and other transformers folders say things (issue 14, items 4, 5 and 7), against transformers 5 as the
oracle: XLM-RoBERTa / CamemBERT decoders, generation settings kept in config.json, tokenizers given only as a
sentencepiece model, and the error for a folder whose parts splice does not read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import splice
from splice.core.checkpoint import load_tokenizer
from splice.core.transformers_format import legacy_generation

transformers = pytest.importorskip("transformers")

from oracle import perturb  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "transformers457"
TEXTS = ["Hello world, une belle journée à Paris 12.50 <mask> x", "  double  spaces\tand tabs ", "ＦＵＬＬ width ① ﬁ",
         "<extra_id_0> hi </s> <s>", "", "invoice no. 4711", "TrOCR reads lines of text"]


def _ved(decoder_cls, **dec):
    enc = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=48)
    dec = decoder_cls(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=66, is_decoder=True, add_cross_attention=True,
                      **dec)
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 0, 1, 2
    torch.manual_seed(0)
    return perturb(transformers.VisionEncoderDecoderModel(config=cfg), scale=0.05)


def _logits(model, px, ids):
    with torch.no_grad():
        return model(pixel_values=px, decoder_input_ids=ids).logits


@pytest.mark.parametrize("cls", ["XLMRobertaConfig", "CamembertConfig"])
def test_xlmr_and_camembert_decoders_saved_by_transformers_5(cls, tmp_path):
    hf = _ved(getattr(transformers, cls))
    hf.save_pretrained(tmp_path / "hf")
    ours = splice.load(tmp_path / "hf")
    assert ours.spec["decoder"]["name"] == "roberta"
    px, ids = torch.randn(2, 3, 32, 32), torch.randint(3, 99, (2, 7))
    assert (_logits(hf, px, ids) - _logits(ours, px, ids)).abs().max() <= 1e-4
    splice.export_transformers(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["decoder"]["model_type"] == hf.config.decoder.model_type
    back = transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "out").eval()
    assert type(back.decoder).__name__ == type(hf.decoder).__name__
    assert (_logits(back, px, ids) - _logits(ours, px, ids)).abs().max() <= 1e-4
    ours.save_pretrained(tmp_path / "splice")  # splice's own format keeps the model type too
    assert splice.load(tmp_path / "splice").spec["decoder"]["config"]["hf_model_type"] == hf.config.decoder.model_type


def _old_style(tmp_path, top: dict, decoder: dict) -> Path:
    """A folder saved by transformers 5, rewritten as 2021-22 folders are: settings in config.json only."""
    folder = tmp_path / "old"
    _ved(transformers.RobertaConfig).save_pretrained(folder)
    (folder / "generation_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config.update(top)
    config["decoder"].update(decoder)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_generation_settings_in_config_json_as_transformers_5_reads_them(tmp_path):
    # the top level wins where it is set (num_beams: 3 over the decoder's 1, even a default-valued length_penalty);
    # the decoder's fills what the top level leaves unset (no_repeat_ngram_size, repetition_penalty)
    folder = _old_style(tmp_path, dict(num_beams=3, length_penalty=1.0, early_stopping=True, max_length=9),
                        dict(num_beams=1, length_penalty=2.0, no_repeat_ngram_size=2, repetition_penalty=1.3))
    hf = transformers.VisionEncoderDecoderModel.from_pretrained(folder).eval()
    ours = splice.load(folder)
    want = dict(num_beams=3, length_penalty=1.0, early_stopping=True, max_length=9, no_repeat_ngram_size=2,
                repetition_penalty=1.3)
    assert ours.generation_defaults == want
    assert {k: getattr(hf.generation_config, k) for k in want} == want
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert ours.generate(px).tolist() == hf.generate(pixel_values=px).tolist()
    splice.export_transformers(ours, tmp_path / "out")  # kept, in generation_config.json
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert {k: gen[k] for k in want} == want
    back = transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert back.generate(pixel_values=px).tolist() == hf.generate(pixel_values=px).tolist()


def test_generation_config_json_replaces_config_json(tmp_path):
    folder = _old_style(tmp_path, dict(num_beams=3, no_repeat_ngram_size=2), {})
    (folder / "generation_config.json").write_text(json.dumps({"decoder_start_token_id": 0, "max_length": 7}))
    assert splice.load(folder).generation_defaults == {"decoder_start_token_id": 0, "max_length": 7}  # config.json unread


def test_a_bad_legacy_setting_names_config_json(tmp_path):
    folder = _old_style(tmp_path, dict(num_beams=0), {})
    with pytest.raises(splice.CheckpointError, match=r"config.json[\s\S]*num_beams"):
        splice.load(folder)


def test_legacy_generation_ignores_nulls_and_other_keys():
    assert legacy_generation({"num_beams": None, "hidden_size": 3, "decoder": {"num_beams": 4, "top_k": None}}) == \
        {"num_beams": 4}
    assert legacy_generation({"decoder": "not a mapping", "max_length": 5}) == {"max_length": 5}


@pytest.mark.parametrize("name", ["vit-xlmr", "trocr-small", "donut", "tokenizers/t5-spiece"])
def test_sentencepiece_only_tokenizers_match_transformers(name, tmp_path):
    folder = FIXTURES / name
    assert not (folder / "tokenizer.json").exists()
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    for text in TEXTS:
        ids = hf(text).input_ids
        assert ours.encode(text).ids == ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.get_vocab_size() == len(hf)


def test_the_tokenizer_is_saved_as_tokenizer_json(tmp_path):
    model = splice.load(FIXTURES / "vit-xlmr")
    model.save_pretrained(tmp_path / "s")
    assert (tmp_path / "s" / "tokenizer.json").is_file()
    hf = transformers.AutoTokenizer.from_pretrained(FIXTURES / "vit-xlmr")
    again = splice.load(tmp_path / "s").tokenizer
    assert all(again.encode(t).ids == hf(t).input_ids for t in TEXTS)


def _copy(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / "tok"
    shutil.copytree(FIXTURES / name, folder)
    return folder


def test_a_corrupted_sentencepiece_model_is_a_checkpoint_error(tmp_path):
    folder = _copy("tokenizers/t5-spiece", tmp_path)
    data = (folder / "spiece.model").read_bytes()
    for broken in (data[:1000], b"\xff" * 64, b"", b"\x0a\x05ab"):
        (folder / "spiece.model").write_bytes(broken)
        with pytest.raises(splice.CheckpointError, match="spiece.model: cannot be read as a tokenizer"):
            load_tokenizer(folder)


def test_another_tokenizer_class_names_the_fix(tmp_path):
    folder = _copy("tokenizers/t5-spiece", tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "AlbertTokenizer"}))
    with pytest.raises(splice.CheckpointError) as info:
        load_tokenizer(folder)
    text = str(info.value)
    assert "tokenizer_class" in text and "AlbertTokenizer" in text and "save_pretrained" in text


def test_an_unread_folder_names_every_unread_part(tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(FIXTURES / "vit-gpt2", folder)
    config = json.loads((folder / "config.json").read_text())
    config["encoder"]["model_type"], config["decoder"]["model_type"] = "siglip_vision_model", "opt"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(splice.ConfigError) as info:
        splice.load(folder)
    text = str(info.value)
    assert "encoder.model_type" in text and "'siglip_vision_model'" in text
    assert "decoder.model_type" in text and "'opt'" in text
    assert "splice list --kind encoder" in text and "splice list --kind decoder" in text
    assert (Path(__file__).parents[1] / "docs" / "writing-a-plugin.md").is_file()  # the fix names what exists
    config["decoder"]["model_type"] = "gpt2"  # one unread part: only that one
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(splice.ConfigError) as info:
        splice.load(folder)
    assert "decoder.model_type" not in str(info.value) and "encoder.model_type" in str(info.value)

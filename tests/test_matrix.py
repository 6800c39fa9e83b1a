"""The encoder x decoder matrix against transformers, parametrised over the registry.

Every registered encoder and decoder that can describe itself to transformers (``hf.config_to_hf``) is paired;
transformers builds a tiny random VisionEncoderDecoderModel from those configs and saves it; ``splice.load``
reads the folder. Logits, loss and an 8-token greedy decode must match. A new plugin with HF interop joins
the matrix without editing this file.
"""

from __future__ import annotations

import pytest
import torch

import splice
from splice.core.plugins import get_registry

transformers = pytest.importorskip("transformers")

from oracle import perturb, reads_context  # noqa: E402

registry = get_registry()


def _hf_entries(kind):
    return [e for e in registry.entries(kind) if e.hf is not None and e.hf.config_to_hf is not None and e.tiny is not None]


ENCODERS = _hf_entries("encoder")
DECODERS = [e for e in _hf_entries("decoder") if reads_context(e)]  # transformers can pair them


def _hf_config(entry) -> "transformers.PretrainedConfig":
    values = entry.config_cls(**entry.tiny).model_dump()
    hf = dict(entry.hf.config_to_hf(values))
    model_type = hf.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **hf)


def _save_ved(folder, enc, dec, *, seed=0, **save_kwargs):
    torch.manual_seed(seed)
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(_hf_config(enc), _hf_config(dec))
    vocab = cfg.decoder.vocab_size
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = vocab - 1, 0, vocab - 2
    model = transformers.VisionEncoderDecoderModel(config=cfg).eval()
    perturb(model, seed)
    model.save_pretrained(folder, **save_kwargs)
    return model


@pytest.mark.parametrize("dec", DECODERS, ids=lambda e: e.name)
@pytest.mark.parametrize("enc", ENCODERS, ids=lambda e: e.name)
def test_pair_matches_transformers(enc, dec, tmp_path):
    hf = _save_ved(tmp_path, enc, dec)
    ours = splice.load(tmp_path)
    assert ours.encoder.__class__.__name__ and not ours.loading_report.missing and not ours.loading_report.unexpected
    assert (ours.enc_to_dec_proj is not None) == (hf.config.encoder.hidden_size != hf.config.decoder.hidden_size)

    g = torch.Generator().manual_seed(1)
    size = ours.encoder.preprocessing.image_size
    px = torch.randn(2, 3, *size, generator=g)
    vocab = hf.config.decoder.vocab_size
    labels = torch.randint(3, vocab - 2, (2, 6), generator=g)
    labels[1, 4:] = -100
    with torch.no_grad():
        a, b = hf(pixel_values=px, labels=labels), ours(pixel_values=px, labels=labels)
    assert (a.logits - b.logits).abs().max().item() <= 1e-4
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5
    with torch.no_grad():
        want = hf.generate(pixel_values=px, max_new_tokens=8, do_sample=False, num_beams=1)
    assert ours.generate(px, max_new_tokens=8).tolist() == want.tolist()

    # and back: transformers reads what splice exports, with the same logits
    splice.export_transformers(ours, tmp_path / "exported")
    again = transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        assert (again(pixel_values=px, labels=labels).logits - a.logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dec", DECODERS, ids=lambda e: e.name)
def test_transformers5_names(dec, tmp_path):
    """Folders saved with save_original_format=False use transformers 5's in-memory names."""
    hf = _save_ved(tmp_path, registry.get("encoder", "vit"), dec, seed=4, save_original_format=False)
    ours = splice.load(tmp_path)
    px = torch.randn(1, 3, *ours.encoder.preprocessing.image_size)
    ids = torch.randint(3, hf.config.decoder.vocab_size - 2, (1, 5))
    with torch.no_grad():
        assert (hf(pixel_values=px, decoder_input_ids=ids).logits - ours(pixel_values=px, decoder_input_ids=ids).logits).abs().max() <= 1e-4


def test_matrix_is_not_empty():
    assert {"vit", "deit_distilled", "beit", "swin"} <= {e.name for e in ENCODERS}
    assert "gpt2" in {e.name for e in DECODERS}

"""What docs/writing-a-plugin.md and docs/spec.md say, checked: a spec's max_length is generate's default length
(saved with the model, overridden by an argument); the built-in decoders' positions under left padding match what
transformers' VisionEncoderDecoderModel does for that family."""

from __future__ import annotations

import pytest
import torch

import splice
from splice import testing

SPEC = {"encoder": {"name": "vit", "config": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1,
                                              "num_heads": 3}},
        "decoder": {"name": "gpt2", "config": {"vocab_size": 50, "n_positions": 32, "n_embd": 32, "n_layer": 1,
                                               "n_head": 4}},
        "tokens": {"decoder_start": 49, "pad": 0, "eos": 48}, "max_length": 5}


def test_spec_max_length_is_the_generation_default(tmp_path):
    model = splice.compose(SPEC, seed=0).eval()
    px = torch.randn(1, 3, 32, 32)
    assert model.generate(px, eos_token_id=[]).shape == (1, 5)
    assert model.generate(px, eos_token_id=[], max_new_tokens=2).shape == (1, 3)
    model.save_pretrained(tmp_path / "m")
    assert splice.load(tmp_path / "m").generate(px, eos_token_id=[]).shape == (1, 5)
    assert splice.compose({**SPEC, "max_length": None}, seed=0).eval().generate(px, eos_token_id=[]).shape == (1, 21)


@pytest.mark.parametrize("decoder", ["gpt2", "bert", "bart_decoder", "trocr"])
def test_left_padded_prompts_as_transformers_ved_generates(decoder, tmp_path):
    """The exception the docs name: transformers' VisionEncoderDecoderModel gives a left-padded prompt other tokens
    than the same prompt unpadded for these families, and splice generates what it generates."""
    transformers = pytest.importorskip("transformers")
    model = splice.compose(testing.pair_spec("vit", decoder), seed=0).eval()
    splice.export_transformers(model, tmp_path / "hf")
    hf = transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "hf").eval()
    V = model.decoder.vocab_size
    px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    padded = torch.tensor([[3, 3, V - 1, 5, 7, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    options = dict(max_new_tokens=5, do_sample=False, num_beams=1)
    with torch.no_grad():
        want = hf.generate(pixel_values=px, decoder_input_ids=padded, decoder_attention_mask=mask, eos_token_id=None,
                           pad_token_id=0, **options)
    got = model.generate(px, decoder_input_ids=padded, decoder_attention_mask=mask, eos_token_id=[], **options)
    assert got[0, -5:].tolist() == want[0, -5:].tolist()

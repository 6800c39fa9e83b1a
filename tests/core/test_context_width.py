"""`cross_attention.context_width`: the adapters' keys/values read the encoder's width directly (no projection),
for any adapter-based decoder; a native decoder says its own (issue 14, item 1)."""

from __future__ import annotations

import pytest
import torch

import splice

ENC = {"name": "vit", "config": {"img_size": 16, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 4}}
GPT2 = {"name": "gpt2", "config": {"vocab_size": 60, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4}}
BERT = {"name": "bert", "config": {"vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 32}}
TOKENS = {"decoder_start": 1, "pad": 0, "eos": 2}


@pytest.mark.parametrize("decoder", [GPT2, BERT], ids=["gpt2", "bert"])
@pytest.mark.parametrize("kind", ["standard", "gated"])
def test_adapters_read_the_encoder_width(decoder, kind, tmp_path):
    spec = {"encoder": ENC, "decoder": decoder, "tokens": TOKENS,
            "cross_attention": {"kind": kind, "context_width": "encoder"}}
    plan = splice.validate(spec)
    assert plan.ok and plan.projection is None and plan.context_width == 48, plan.summary()
    model = splice.compose(spec, seed=0).eval()
    assert model.enc_to_dec_proj is None
    assert all(m.context_width == 48 for m in model.cross_attention_modules)
    pixels = torch.randn(2, 3, 16, 16)
    ids = torch.tensor([[1, 5, 7], [1, 9, 3]])
    with torch.no_grad():
        logits = model(pixel_values=pixels, decoder_input_ids=ids).logits
    model.save_pretrained(tmp_path / "m")
    loaded = splice.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels, decoder_input_ids=ids).logits, logits)
    assert torch.equal(loaded.generate(pixels, max_new_tokens=4), model.generate(pixels, max_new_tokens=4))
    with pytest.raises(splice.CheckpointError, match="context_width: encoder"):
        splice.export_transformers(model, tmp_path / "hf")


def test_the_default_projects_as_transformers_does():
    plan = splice.validate({"encoder": ENC, "decoder": GPT2, "tokens": TOKENS})
    assert plan.projection == "linear" and plan.context_width == 32


def test_a_native_decoder_keeps_its_own():
    bart = {"name": "bart_decoder", "config": {"vocab_size": 60, "d_model": 48, "decoder_layers": 1,
                                               "decoder_attention_heads": 4, "decoder_ffn_dim": 64,
                                               "max_position_embeddings": 32}}
    plan = splice.validate({"encoder": ENC, "decoder": bart, "tokens": TOKENS,
                            "cross_attention": {"context_width": "encoder"}})
    assert [p.path for p in plan.problems] == ["cross_attention"], plan.summary()

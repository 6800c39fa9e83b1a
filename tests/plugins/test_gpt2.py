"""GPT2 decoder: what only GPT2 has (the GPT2Model file layout, Conv1D and legacy buffers in the mapping, scaled
attention, its init). Parity, the KV cache, the slots, the mapping and validation every decoder shares:
test_decoders.py."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import transformers  # the oracle only; src/ never imports it
from decoder_cases import ATOL, CASES, diff, save_hf
from splice.core.errors import ConfigError
from splice.plugins import gpt2 as G

CASE = CASES["gpt2"]
TINY = CASE.tiny


@torch.no_grad()
def test_gpt2model_file_layout(tmp_path):
    # the hub `gpt2` file: GPT2Model, names without `transformer.` and no lm_head
    hf = CASE.hf_model(cls=transformers.GPT2Model, seed=5, add_cross_attention=True)
    cfg, sd = save_hf(hf, tmp_path)
    assert not any(k.startswith("transformer.") for k in sd) and "lm_head.weight" not in sd
    ours = CASE.ours(cfg, sd, cross_layers=[0, 1])
    ids, ctx = CASE.ids(), CASE.ctx()
    ref = hf(input_ids=ids, encoder_hidden_states=ctx).last_hidden_state
    out = ours(ids, context=ctx)
    assert diff(out.hidden_states, ref) <= ATOL
    assert diff(out.logits, ref @ hf.wte.weight.T) <= ATOL


def test_unused_and_tied_lm_head(plain_pair):
    _, _, cfg, sd = plain_pair
    extra = dict(sd)
    extra["lm_head.weight"] = sd["transformer.wte.weight"]  # .bin files carry the tied duplicate
    extra["transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    extra["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    extra["transformer.h.0.crossattention.bias"] = torch.ones(1, 1, 64, 64)
    extra["score.weight"] = torch.zeros(2, 32)
    mapped, unused = G.state_dict_from_hf(extra, cfg)
    assert sorted(unused) == sorted(["transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias",
                                     "transformer.h.0.crossattention.bias", "score.weight"])
    assert "lm_head.weight" not in mapped and set(mapped) == set(G.build_gpt2(G.GPT2Config(**TINY)).state_dict())


def test_config_from_hf():
    kw = G.config_from_hf({**TINY, "model_type": "gpt2", "add_cross_attention": True, "n_ctx": 64,
                           "summary_type": "cls_index", "activation_function": "relu"})
    assert kw == {**TINY, "activation_function": "relu"}
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        G.config_from_hf({**TINY, "add_cross_attention": True, "scale_attn_by_inverse_layer_idx": True})


@torch.no_grad()
def test_scale_attn_by_inverse_layer_idx_parity(tmp_path):
    hf = CASE.hf_model(seed=9, scale_attn_by_inverse_layer_idx=True, activation_function="gelu")
    cfg, sd = save_hf(hf, tmp_path)
    ours = CASE.ours(cfg, sd)
    ids = CASE.ids()
    assert diff(ours(ids).logits, hf(input_ids=ids).logits) <= ATOL


def test_config_defaults():
    with pytest.raises(ValidationError, match="n_positions"):
        G.GPT2Config(n_positions=0)
    assert G.GPT2Config().n_embd == 768 and G.GPT2Config().activation_function == "gelu_new"


def test_init():
    # transformers' init: residual projections are narrower than the rest
    big = G.build_gpt2(G.GPT2Config(n_embd=64, n_layer=8, n_head=4, vocab_size=50, n_positions=32))
    assert big.h[0].attn.c_proj.weight.std() < 0.6 * big.h[0].attn.c_attn.weight.std()
    assert "lm_head.weight" not in big.state_dict()

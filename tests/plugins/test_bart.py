"""BART decoder: what only BART has (native cross-attention, the position offset, scaled embeddings, the hub's
BartModel / BartForConditionalGeneration layouts, its export). Parity, the KV cache, the mapping and validation every
decoder shares: test_decoders.py."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import transformers  # the oracle only; src/ never imports it
from decoder_cases import ATOL, CASES, diff, perturb, save_hf
from splice.core.errors import CheckpointError, IncompatibleComponentsError
from splice.plugins import bart as B

CASE = CASES["bart"]
TINY = CASE.tiny
ENCODER = dict(encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48)


def test_tied_head_is_not_on_disk(cross_pair):
    _, _, _, sd = cross_pair
    assert "lm_head.weight" not in sd and "model.decoder.embed_tokens.weight" in sd


@torch.no_grad()
def test_scale_embedding_and_activation_parity(tmp_path):
    hf = CASE.hf_model(seed=4, scale_embedding=True, activation_function="relu")
    cfg, sd = save_hf(hf, tmp_path)
    ours = CASE.ours(cfg, sd)
    assert ours.embed_scale == pytest.approx(TINY["d_model"] ** 0.5)
    ids, ctx = CASE.ids(), CASE.ctx()
    assert diff(ours(ids, context=ctx).logits, hf(input_ids=ids, encoder_hidden_states=ctx).logits) <= ATOL
    ours.embed_scale = 1.0  # the scale matters
    assert diff(ours(ids, context=ctx).logits, hf(input_ids=ids, encoder_hidden_states=ctx).logits) > 1e-2


@torch.no_grad()
def test_explicit_positions_carry_the_offset(cross_pair):
    _, ours, _, _ = cross_pair
    ids, ctx = CASE.ids(T=5), CASE.ctx()
    full = ours(ids, context=ctx).logits
    assert torch.equal(ours(ids, context=ctx, position_ids=torch.arange(5)).logits, full)
    shifted = ours(ids, context=ctx, position_ids=torch.arange(3, 8)).logits
    assert diff(shifted, full) > 1e-3


@torch.no_grad()
def test_bart_model_hub_layout(tmp_path):
    # the hub `facebook/bart-*` file: BartModel, shared.weight + encoder.* + decoder.* without embed_tokens
    torch.manual_seed(6)
    hub = perturb(transformers.BartModel(transformers.BartConfig(**TINY, **ENCODER)), 7).eval()
    cfg, sd = save_hf(hub, tmp_path)
    assert "shared.weight" in sd and "decoder.embed_tokens.weight" not in sd and "lm_head.weight" not in sd
    encoder_keys = sorted(k for k in sd if k.startswith("encoder."))
    assert encoder_keys
    ours, missing, unused = CASE.load(cfg, sd)
    assert missing == set() and sorted(unused) == encoder_keys
    assert torch.equal(ours.embed_tokens.weight, sd["shared.weight"])
    # the oracle: BartForCausalLM given the same decoder weights with embed_tokens (and the head) tied to shared
    hf = transformers.BartForCausalLM(CASE.hf_config()).eval()
    dec_sd = {"model." + k: v for k, v in sd.items() if k.startswith("decoder.")}
    dec_sd["model.decoder.embed_tokens.weight"] = sd["shared.weight"]
    res = hf.load_state_dict(dec_sd, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) <= {"lm_head.weight"}
    assert torch.equal(hf.lm_head.weight, sd["shared.weight"])
    ids, ctx = CASE.ids(), CASE.ctx()
    assert diff(ours(ids, context=ctx).logits, hf(input_ids=ids, encoder_hidden_states=ctx).logits) <= ATOL
    # and BartModel's own decoder agrees (hidden states before the head)
    ref_h = hub.decoder(input_ids=ids, encoder_hidden_states=ctx).last_hidden_state
    assert diff(ours(ids, context=ctx).hidden_states, ref_h) <= ATOL


def test_conditional_generation_layout(cross_pair):
    # BartForConditionalGeneration: `model.` prefix and final_logits_bias; decoder.* under model.
    _, _, cfg, sd = cross_pair
    cg = {"model." + k[len("model."):]: v for k, v in sd.items()}  # model.decoder.* stays
    cg["model.shared.weight"] = sd["model.decoder.embed_tokens.weight"]
    cg["model.encoder.layers.0.fc1.weight"] = torch.zeros(48, 32)
    cg["final_logits_bias"] = torch.zeros(1, 99)
    cg["model.decoder.version"] = torch.tensor(3.0)
    cg["lm_head.weight"] = sd["model.decoder.embed_tokens.weight"]  # .bin files carry the tied duplicate
    mapped, unused = B.state_dict_from_hf(cg, cfg)
    assert sorted(unused) == ["final_logits_bias", "model.decoder.version", "model.encoder.layers.0.fc1.weight"]
    assert set(mapped) == set(B.build_bart(B.BartConfig(**TINY)).state_dict())
    with pytest.raises(CheckpointError, match="shared.weight"):
        B.state_dict_from_hf({"shared.weight": torch.zeros(98, 32)}, cfg)


@torch.no_grad()
def test_export_loads_in_transformers(cross_pair):
    # config_to_hf + state_dict_to_hf give a folder transformers' BartForCausalLM reads (default use_cache)
    _, ours, _, _ = cross_pair
    values = B.BartConfig(**TINY, dropout=0.0).model_dump()
    hf_cfg = B.config_to_hf(values)
    assert hf_cfg["encoder_layers"] == TINY["decoder_layers"] and hf_cfg["model_type"] == "bart"
    hf = transformers.BartForCausalLM(transformers.BartConfig(**{k: v for k, v in hf_cfg.items() if k != "model_type"}))
    hf.load_state_dict(B.state_dict_to_hf(ours.state_dict(), hf_cfg), strict=False)
    hf.eval()
    ids, ctx = CASE.ids(), CASE.ctx()
    assert diff(hf(input_ids=ids, encoder_hidden_states=ctx).logits, ours(ids, context=ctx).logits) <= ATOL


def test_config_from_hf(cross_pair):
    _, _, cfg, _ = cross_pair
    kw = B.config_from_hf(cfg)
    assert {k: kw[k] for k in TINY} == TINY
    assert (kw["pad_token_id"], kw["bos_token_id"], kw["eos_token_id"], kw["decoder_start_token_id"]) == (1, 0, 2, 2)
    assert "encoder_layers" not in kw and B.BartConfig(**kw).activation_function == "gelu"


def test_native_cross_attention(cross_pair):
    _, ours, _, _ = cross_pair
    assert (ours.hidden_size, ours.vocab_size, ours.max_positions, ours.native_cross_attention) == (32, 99, 64, True)
    specs = ours.layer_specs()
    assert [s.index for s in specs] == [0, 1]
    assert all((s.width, s.heads, s.norm, s.eps) == (32, 4, "post", 1e-5) for s in specs)
    with pytest.raises(IncompatibleComponentsError, match="own cross-attention"):
        ours.install_cross_attention(0, torch.nn.Identity())
    k, v = ours.layers[0].encoder_attn.context_kv(CASE.ctx())
    assert k.shape == v.shape == (2, 4, 5, 8)


def test_config_defaults():
    with pytest.raises(ValidationError, match="pad_token_id=120 is outside"):
        B.BartConfig(**TINY, pad_token_id=120)
    c = B.BartConfig()
    assert (c.d_model, c.decoder_layers, c.vocab_size, c.max_position_embeddings) == (1024, 12, 50265, 1024)


def test_registration_extras():
    calls = []
    B.register_decoders(lambda *a, **kw: calls.append((a, kw)))
    [(_, kw)] = calls
    assert kw["aliases"] == ("bart",)
    model = B.build_bart(B.BartConfig(**kw["tiny"]))
    assert torch.equal(model.embed_tokens.weight[1], torch.zeros(32))  # padding row, as transformers inits
    assert "lm_head.weight" not in model.state_dict()

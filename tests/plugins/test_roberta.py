"""RoBERTa decoder: what only RoBERTa has (positions counted from the padding id, with and without a KV cache; the
RobertaForMaskedLM / RobertaModel layouts; its defaults). Parity, the KV cache, the slots, the mapping and
validation every decoder shares: test_decoders.py; BERT's blocks and mapping machinery in depth: test_bert.py."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import transformers  # the oracle only; src/ never imports it
from decoder_cases import ATOL, CASES, diff, padding_mask, save_hf
from splice.core.generation import KVCache
from splice.plugins import roberta as R

CASE = CASES["roberta"]
TINY = CASE.tiny
PAD = CASE.pad_in_ids


@torch.no_grad()
def test_positions_start_after_padding_id(cross_pair):
    _, ours, _, _ = cross_pair
    ids = torch.tensor([[5, 6, PAD, 7], [PAD, PAD, 8, 9]])
    assert ours.positions(ids, past=0).tolist() == [[2, 3, 1, 4], [1, 1, 2, 3]]
    assert ours.positions(ids[:, :1], past=4).tolist() == [[6], [1]]  # the count goes on from the cache length


@torch.no_grad()
def test_left_padding_shifts_positions(cross_pair):
    # pad tokens in the ids shift RoBERTa's positions: after left padding the first real token is at pad + 1
    hf, ours, _, _ = cross_pair
    mask = padding_mask("left")
    ids, ctx = CASE.ids(B=3, T=8).masked_fill(mask == 0, PAD), CASE.ctx(B=3)
    ref = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=ctx).logits
    real = mask.bool()
    assert diff(ours(ids, context=ctx, attention_mask=mask).logits[real], ref[real]) <= ATOL
    # arange positions (BERT's rule) would not match
    shifted = ours(ids, context=ctx, attention_mask=mask, position_ids=torch.arange(8)).logits
    assert diff(shifted[real], ref[real]) > 1e-3


@torch.no_grad()
def test_kv_cache_with_left_padding_matches_transformers_cache(cross_pair):
    # transformers continues the count from the cache length, padding included: with a left-padded prompt the
    # cached positions of later tokens are NOT those of one full forward. We match its cached path.
    hf, ours, _, _ = cross_pair
    ids, ctx = CASE.ids(B=2, T=7), CASE.ctx()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    step = hf(input_ids=ids[:, :4], attention_mask=mask[:, :4], encoder_hidden_states=ctx, use_cache=True)
    refs, past = [step.logits], step.past_key_values
    cache = KVCache(2, max_len=8)
    outs = [ours(ids[:, :4], context=ctx, attention_mask=mask[:, :4], cache=cache).logits]
    for t in range(4, 7):
        step = hf(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], encoder_hidden_states=ctx,
                  past_key_values=past, use_cache=True)
        refs.append(step.logits)
        past = step.past_key_values
        outs.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits)
    real = mask.bool()
    ref, got = torch.cat(refs, 1), torch.cat(outs, 1)
    assert diff(got[real], ref[real]) <= ATOL
    full = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=ctx).logits
    assert diff(full[0, 4:], ref[0, 4:]) > 1e-3  # the quirk is real: the padded row's cached positions moved on
    assert diff(full[1], ref[1]) <= ATOL  # without padding, cache and full forward agree


@pytest.mark.parametrize("cls", [transformers.RobertaForMaskedLM, transformers.RobertaModel])
@torch.no_grad()
def test_standalone_layouts_leave_only_cross_attention_missing(tmp_path, cls):
    hf = CASE.hf_model(cls=cls, seed=4)
    cfg, sd = save_hf(hf, tmp_path)
    ours, missing, unused = CASE.load(cfg, sd, cross_layers=range(2))
    cross = {k for k in ours.state_dict() if ".crossattention." in k}
    ids = CASE.ids()
    if cls is transformers.RobertaModel:  # no head; a pooler instead
        assert sorted(unused) == ["pooler.dense.bias", "pooler.dense.weight"]
        assert missing == cross | {k for k in ours.state_dict() if k.startswith("head.")}
        assert diff(ours(ids).hidden_states, hf(input_ids=ids).last_hidden_state) <= ATOL
    else:
        assert unused == [] and missing == cross
        assert diff(ours(ids).logits, hf(input_ids=ids).logits) <= ATOL


def test_head_names_and_tied_duplicates(cross_pair):
    _, ours, cfg, sd = cross_pair
    back = R.state_dict_to_hf(ours.state_dict(), cfg)
    head = {"lm_head.bias", "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight",
            "lm_head.layer_norm.bias"}
    assert {k for k in back if not k.startswith("roberta.")} == head
    extra = {**sd, "lm_head.decoder.weight": sd["roberta.embeddings.word_embeddings.weight"],
             "lm_head.decoder.bias": sd["lm_head.bias"], "roberta.embeddings.position_ids": torch.arange(66)[None]}
    mapped, unused = R.state_dict_from_hf(extra, cfg)
    assert unused == ["roberta.embeddings.position_ids"] and set(mapped) == set(ours.state_dict())


def test_config_from_hf_and_defaults():
    # keys a config.json leaves out take transformers' RobertaConfig defaults, not roberta-base's
    assert R.config_from_hf({"hidden_size": 32, "num_attention_heads": 4}) == dict(
        hidden_size=32, num_attention_heads=4, vocab_size=50265, max_position_embeddings=512, type_vocab_size=2,
        layer_norm_eps=1e-12, pad_token_id=1)
    assert R.config_to_hf(R.RobertaConfig(**TINY).model_dump())["model_type"] == "roberta"
    c = R.RobertaConfig()
    assert (c.vocab_size, c.max_position_embeddings, c.pad_token_id, c.type_vocab_size, c.layer_norm_eps) == \
        (50265, 514, 1, 1, 1e-5)
    with pytest.raises(ValidationError, match="max_position_embeddings=2 leaves no position"):
        R.RobertaConfig(max_position_embeddings=2)
    assert R.RobertaDecoder(**TINY).max_positions == 64


@torch.no_grad()
def test_longest_sequence(cross_pair):
    hf, ours, _, _ = cross_pair
    ids = CASE.ids(B=1, T=64)
    assert diff(ours(ids).logits, hf(input_ids=ids).logits) <= ATOL  # the last position (65) still fits
    assert isinstance(ours, R.RobertaDecoder)

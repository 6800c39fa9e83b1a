"""RoBERTa decoder: parity with transformers' RobertaForCausalLM (padding-relative positions, with and without a
KV cache), the RobertaForMaskedLM / RobertaModel layouts, the inverse mapping, config and bad input.

The blocks and the mapping machinery are BERT's and are tested in depth in test_bert.py; here: what differs."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

import transformers  # the oracle only; src/ never imports it
from splice.adapters.cross_attention import GatedAdapter, StandardAdapter
from splice.core.errors import ConfigError, InputError
from splice.core.generation import KVCache
from splice.core.interfaces import HFInterop, TextDecoder
from splice.plugins import roberta as R

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=66)
PAD = 1
ATOL = 1e-4


def _hf_model(cls=transformers.RobertaForCausalLM, seed=0, **over):
    torch.manual_seed(seed)
    # hidden_act relu: RoBERTa's head must keep its own exact GELU whatever the layers use
    model = cls(transformers.RobertaConfig(**{**TINY, "is_decoder": True, "hidden_act": "relu", **over}))
    g = torch.Generator().manual_seed(seed + 1)  # move every parameter off transformers' 0/1 init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _load(hf, path, cross_layers=(), adapter=None) -> tuple[R.RobertaDecoder, dict, dict, list[str]]:
    """save_pretrained, read the file, map it; returns (ours with what fitted loaded, missing keys, config, unused)."""
    hf.save_pretrained(path)
    cfg, sd = json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))
    dec = R.build_roberta(R.RobertaConfig(**R.config_from_hf(cfg)))
    for i in cross_layers:
        dec.install_cross_attention(i, (adapter or StandardAdapter()).build(dec.layer_specs()[i], TINY["hidden_size"]))
    mapped, unused = R.state_dict_from_hf(sd, cfg)
    res = dec.load_state_dict(mapped, strict=False)
    assert res.unexpected_keys == []
    return dec.eval(), set(res.missing_keys), {"config": cfg, "sd": sd}, unused


@pytest.fixture(scope="module")
def cross_pair(tmp_path_factory):
    hf = _hf_model(add_cross_attention=True)
    ours, missing, files, unused = _load(hf, tmp_path_factory.mktemp("robx"), cross_layers=range(2))
    assert missing == set() and unused == []
    return hf, ours, files


def _ids(B_=2, T=9, seed=0):
    # real tokens avoid the padding id: a pad inside the ids changes the positions (tested on purpose below)
    return torch.randint(PAD + 1, TINY["vocab_size"], (B_, T), generator=torch.Generator().manual_seed(seed))


def _ctx(B_=2, N=5, seed=0):
    return torch.randn(B_, N, TINY["hidden_size"], generator=torch.Generator().manual_seed(seed))


def _diff(a, b) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def test_parity_with_and_without_context(cross_pair):
    hf, ours, _ = cross_pair
    ids, ctx = _ids(), _ctx()
    ref = hf(input_ids=ids, encoder_hidden_states=ctx).logits
    assert _diff(ours(ids, context=ctx).logits, ref) <= ATOL
    assert _diff(ours(ids).logits, ref) > 1e-2
    assert _diff(ours(ids).logits, hf(input_ids=ids).logits) <= ATOL
    assert isinstance(ours, TextDecoder)


@torch.no_grad()
def test_positions_start_after_padding_id(cross_pair):
    _, ours, _ = cross_pair
    ids = torch.tensor([[5, 6, PAD, 7], [PAD, PAD, 8, 9]])
    assert ours.positions(ids, past=0).tolist() == [[2, 3, 1, 4], [1, 1, 2, 3]]
    assert ours.positions(ids[:, :1], past=4).tolist() == [[6], [1]]  # the count goes on from the cache length


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_padded_batch_parity(cross_pair, side):
    # pad tokens in the ids shift RoBERTa's positions (left padding: the first real token is at pad + 1)
    hf, ours, _ = cross_pair
    ids, ctx = _ids(B_=3, T=8), _ctx(B_=3)
    mask = torch.ones(3, 8, dtype=torch.long)
    if side == "right":
        mask[1, 5:], mask[2, 2:] = 0, 0
    else:
        mask[1, :3], mask[2, :6] = 0, 0
    ids = ids.masked_fill(mask == 0, PAD)
    ref = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=ctx).logits
    out = ours(ids, context=ctx, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(out).all() and _diff(out[real], ref[real]) <= ATOL
    if side == "left":  # positions matter: arange positions (BERT's rule) would not match
        shifted = ours(ids, context=ctx, attention_mask=mask, position_ids=torch.arange(8)).logits
        assert _diff(shifted[real], ref[real]) > 1e-3


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1]])
@torch.no_grad()
def test_kv_cache_matches_full_forward(cross_pair, chunks):
    _, ours, _ = cross_pair
    ids, ctx = _ids(T=9), _ctx()
    full = ours(ids, context=ctx).logits
    cache = KVCache(num_layers=2, max_len=12)
    outs, start = [], 0
    for n in chunks:
        outs.append(ours(ids[:, start:start + n], context=ctx if start == 0 else None, cache=cache).logits)
        start += n
    assert cache.length == 9 and _diff(torch.cat(outs, 1), full) <= ATOL


@torch.no_grad()
def test_kv_cache_with_left_padding_matches_transformers_cache(cross_pair):
    # transformers continues the count from the cache length, padding included: with a left-padded prompt the
    # cached positions of later tokens are NOT those of one full forward. We match its cached path.
    hf, ours, _ = cross_pair
    ids, ctx = _ids(B_=2, T=7), _ctx()
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
    assert _diff(got[real], ref[real]) <= ATOL
    full = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=ctx).logits
    assert _diff(full[0, 4:], ref[0, 4:]) > 1e-3  # the quirk is real: the padded row's cached positions moved on
    assert _diff(full[1], ref[1]) <= ATOL  # without padding, cache and full forward agree


@pytest.mark.parametrize("cls", [transformers.RobertaForMaskedLM, transformers.RobertaModel])
@torch.no_grad()
def test_standalone_layouts_leave_only_cross_attention_missing(tmp_path, cls):
    hf = _hf_model(cls=cls, seed=4)
    ours, missing, files, unused = _load(hf, tmp_path, cross_layers=range(2))
    cross = {k for k in ours.state_dict() if ".crossattention." in k}
    ids = _ids()
    if cls is transformers.RobertaModel:  # no head; a pooler instead
        assert sorted(unused) == ["pooler.dense.bias", "pooler.dense.weight"]
        assert missing == cross | {k for k in ours.state_dict() if k.startswith("head.")}
        assert _diff(ours(ids).hidden_states, hf(input_ids=ids).last_hidden_state) <= ATOL
    else:
        assert unused == [] and missing == cross
        assert _diff(ours(ids).logits, hf(input_ids=ids).logits) <= ATOL


def test_state_dict_round_trip(cross_pair):
    _, ours, files = cross_pair
    cfg, sd = files["config"], files["sd"]
    back = R.state_dict_to_hf(ours.state_dict(), cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    head = {"lm_head.bias", "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight",
            "lm_head.layer_norm.bias"}
    assert {k for k in back if not k.startswith("roberta.")} == head
    extra = {**sd, "lm_head.decoder.weight": sd["roberta.embeddings.word_embeddings.weight"],
             "lm_head.decoder.bias": sd["lm_head.bias"], "roberta.embeddings.position_ids": torch.arange(66)[None]}
    mapped, unused = R.state_dict_from_hf(extra, cfg)
    assert unused == ["roberta.embeddings.position_ids"] and set(mapped) == set(ours.state_dict())


@torch.no_grad()
def test_gated_adapter_at_init_is_identity(tmp_path):
    hf = _hf_model(seed=8)
    gated, missing, _, _ = _load(hf, tmp_path, cross_layers=range(2), adapter=GatedAdapter())
    assert missing == {k for k in gated.state_dict() if ".crossattention." in k}
    ids = _ids()
    assert _diff(gated(ids, context=_ctx()).logits, hf(input_ids=ids).logits) <= ATOL
    assert torch.equal(gated(ids, context=_ctx()).logits, gated(ids).logits)


def test_config_from_hf_and_defaults():
    # keys a config.json leaves out take transformers' RobertaConfig defaults, not roberta-base's
    assert R.config_from_hf({"hidden_size": 32, "num_attention_heads": 4}) == dict(
        hidden_size=32, num_attention_heads=4, vocab_size=50265, max_position_embeddings=512, type_vocab_size=2,
        layer_norm_eps=1e-12, pad_token_id=1)
    with pytest.raises(ConfigError) as e:
        R.config_from_hf({**TINY, "pad_token_id": None, "position_embedding_type": "relative_key_query"})
    msg = str(e.value)
    assert "pad_token_id" in msg and "relative_key_query" in msg and "fix:" in msg
    values = R.RobertaConfig(**TINY).model_dump()
    assert R.config_from_hf(R.config_to_hf(values)) == values and R.config_to_hf(values)["model_type"] == "roberta"
    c = R.RobertaConfig()
    assert (c.vocab_size, c.max_position_embeddings, c.pad_token_id, c.type_vocab_size, c.layer_norm_eps) == \
        (50265, 514, 1, 1, 1e-5)
    with pytest.raises(ValidationError, match="max_position_embeddings=2 leaves no position"):
        R.RobertaConfig(max_position_embeddings=2)
    assert R.RobertaDecoder(**TINY).max_positions == 64


@torch.no_grad()
def test_bad_inputs(cross_pair):
    hf, ours, _ = cross_pair
    ids = _ids(B_=1, T=64)
    assert _diff(ours(ids).logits, hf(input_ids=ids).logits) <= ATOL  # the last position (65) still fits
    with pytest.raises(InputError, match="65 tokens.*64 positions.*max_position_embeddings=66"):
        ours(_ids(B_=1, T=65))
    with pytest.raises(InputError, match=r"\[0, 98\]"):
        ours(torch.tensor([[2, 99]]))
    with pytest.raises(InputError, match="context width 16"):
        ours(_ids(B_=1, T=3), context=torch.randn(1, 4, 16))


def test_registration():
    calls = []
    R.register_decoders(lambda *a, **kw: calls.append((a, kw)))
    [(args, kw)] = calls
    assert args[0] == "roberta" and args[2] is R.RobertaConfig
    assert isinstance(kw["hf"], HFInterop) and kw["hf"].model_types == ("roberta",)
    model = args[1](args[2](**kw["tiny"]))
    assert isinstance(model, R.RobertaDecoder) and model.max_positions == 64
    assert model(torch.full((1, 2), 3)).logits.shape == (1, 2, kw["tiny"]["vocab_size"])
    assert all(s.norm == "post" and s.eps == 1e-5 for s in model.layer_specs())

"""What every native decoder (decoder_cases.CASES) must do: parity with transformers on the same weights (with and
without context, context masks, padded batches), the KV cache, the cross-attention slots, the checkpoint mapping
both ways, config and input validation, registration. What only one family does: test_<family>.py."""

from __future__ import annotations

import re

import pytest
import torch
from pydantic import ValidationError

from decoder_cases import ALL, ATOL, CROSS_PARTS, SLOTTED, diff, padding_mask, save_hf
from splice.adapters.cross_attention import GatedAdapter, StandardAdapter
from splice.core.errors import CheckpointError, ConfigError, InputError
from splice.core.generation import KVCache
from splice.core.interfaces import HFInterop, TextDecoder

# ---- parity ----------------------------------------------------------------------------------------------


@ALL
@torch.no_grad()
def test_cross_attention_parity(case, cross_pair):
    hf, ours, _, _ = cross_pair
    ids, ctx = case.ids(), case.ctx()
    ref = hf(input_ids=ids, encoder_hidden_states=ctx).logits
    out = ours(ids, context=ctx)
    assert out.logits.shape == ref.shape == (2, 9, case.vocab)
    assert diff(out.logits, ref) <= ATOL
    assert out.hidden_states.shape == (2, 9, case.hidden)
    assert diff(ours(ids).logits, ref) > 1e-2  # the context matters, so the parity above is not vacuous


@ALL
@torch.no_grad()
def test_context_mask_parity(case, cross_pair):
    hf, ours, _, _ = cross_pair
    ids, ctx = case.ids(), case.ctx(N=6)
    cmask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    ref = hf(input_ids=ids, encoder_hidden_states=ctx, encoder_attention_mask=cmask).logits
    out = ours(ids, context=ctx, context_mask=cmask).logits
    assert diff(out, ref) <= ATOL
    assert diff(out[1], ours(ids, context=ctx).logits[1]) > 1e-3


@ALL
@torch.no_grad()
def test_parity_without_context(case, cross_pair, plain_pair):
    # without context transformers skips the cross-attention (BART: encoder_attn and its norm); so do we
    for hf, ours, _, _ in (cross_pair, plain_pair):
        ids = case.ids(T=12)
        assert diff(ours(ids).logits, hf(input_ids=ids).logits) <= ATOL
        assert isinstance(ours, TextDecoder)


@ALL
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_padded_batch_parity(case, cross_pair, side):
    # transformers 5 counts positions from the past in every row, padding or not (RoBERTa: from the padding id,
    # which the padding tokens carry); we match that. Compare at the real tokens only.
    hf, ours, _, _ = cross_pair
    ids, ctx, mask = case.ids(B=3, T=8), case.ctx(B=3), padding_mask(side)
    if case.pad_in_ids is not None:
        ids = ids.masked_fill(mask == 0, case.pad_in_ids)
    ref = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=ctx).logits
    out = ours(ids, context=ctx, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(out).all()  # padding rows stay finite too
    assert diff(out[real], ref[real]) <= ATOL
    unmasked = ours(ids, context=ctx).logits
    if side == "left":  # the mask matters: real tokens after left padding would otherwise see it
        assert diff(unmasked[real], ref[real]) > 1e-3
    else:  # causal attention alone already hides right padding from real tokens
        assert diff(unmasked[real], ref[real]) <= ATOL


# ---- KV cache --------------------------------------------------------------------------------------------


@ALL
@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1], [9]])
@torch.no_grad()
def test_kv_cache_matches_full_forward(case, cross_pair, chunks):
    hf, ours, _, _ = cross_pair
    ids, ctx = case.ids(T=9), case.ctx()
    full = ours(ids, context=ctx).logits
    assert diff(full, hf(input_ids=ids, encoder_hidden_states=ctx).logits) <= ATOL
    cache = KVCache(num_layers=case.n_layers, max_len=16)
    outs, start = [], 0
    for n in chunks:
        # context only on the first call: later calls read the cross K/V stored in the cache
        out = ours(ids[:, start:start + n], context=ctx if start == 0 else None, cache=cache)
        assert out.cache is cache
        outs.append(out.logits)
        start += n
    assert cache.length == 9 and all(kv is not None for kv in cache.cross)
    assert diff(torch.cat(outs, 1), full) <= ATOL


# RoBERTa's cached positions follow transformers' cache, not one full forward, under left padding: test_roberta.py
@pytest.mark.parametrize("case", ["gpt2", "bert", "bart"], indirect=True)
@torch.no_grad()
def test_kv_cache_with_left_padding(case, cross_pair):
    hf, ours, _, _ = cross_pair
    ids, ctx = case.ids(B=2, T=7), case.ctx()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    full = ours(ids, context=ctx, attention_mask=mask).logits
    cache = KVCache(case.n_layers, max_len=8)
    first = ours(ids[:, :4], context=ctx, attention_mask=mask[:, :4], cache=cache).logits
    rest = [ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits for t in range(4, 7)]
    real = mask.bool()
    assert diff(torch.cat([first, *rest], 1)[real], full[real]) <= ATOL
    ref = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=ctx).logits
    assert diff(full[real], ref[real]) <= ATOL


# ---- the cross-attention slots ---------------------------------------------------------------------------


@SLOTTED
@torch.no_grad()
def test_gated_adapter_at_init_is_identity(case, plain_pair):
    hf, plain, cfg, sd = plain_pair
    gated, missing, _ = case.load(cfg, sd, range(case.n_layers), GatedAdapter(), context_width=24)
    assert missing == {k for k in gated.state_dict() if ".crossattention." in k}
    ids, ctx = case.ids(), case.ctx(width=24)
    assert torch.equal(gated(ids, context=ctx).logits, plain(ids).logits)
    assert torch.equal(gated(ids, context=ctx).logits, gated(ids).logits)
    assert diff(gated(ids, context=ctx).logits, hf(input_ids=ids).logits) <= ATOL
    gated.layers[0].crossattention.gate.fill_(0.5)
    assert diff(gated(ids, context=ctx).logits, plain(ids).logits) > 1e-4


@SLOTTED
@torch.no_grad()
def test_layer_specs_and_sparse_install(case, plain_pair):
    dec = case.builder(case.config_cls(**case.tiny, **{case.attn_dropout: 0.2}))
    specs = dec.layer_specs()
    assert [s.index for s in specs] == [0, 1]
    assert all((s.width, s.heads, s.norm, s.eps, s.bias, s.dropout) == (32, 4, *case.norm, True, 0.2) for s in specs)
    assert (dec.hidden_size, dec.vocab_size, dec.max_positions, dec.native_cross_attention) == (32, 99, 64, False)
    _, _, cfg, sd = plain_pair
    dec = case.build(cfg)
    dec.load_state_dict(case.module.state_dict_from_hf(sd, cfg)[0])
    plain = dec(case.ids()).logits
    dec.install_cross_attention(1, StandardAdapter().build(dec.layer_specs()[1], context_width=24))
    keys = [k for k in dec.state_dict() if ".crossattention." in k]
    assert keys and all(k.startswith(f"{case.prefix}1.crossattention.") for k in keys)
    assert {k.split(".")[3] for k in keys} == CROSS_PARTS
    assert dec.layers[0].crossattention is None
    out = dec(case.ids(), context=torch.randn(2, 5, 24)).logits
    assert out.shape == plain.shape and diff(out, plain) > 1e-4
    assert torch.equal(dec(case.ids()).logits, plain)  # no context: the slot is skipped
    with pytest.raises(IndexError, match="0..1"):
        dec.install_cross_attention(2, StandardAdapter().build(specs[1], 24))


@SLOTTED
def test_context_needs_an_installed_slot(case, plain_pair):
    _, plain, _, _ = plain_pair
    with pytest.raises(InputError, match="install an adapter"):
        plain(case.ids(B=1, T=3), context=case.ctx(B=1))


@SLOTTED
def test_to_hf_refuses_gated(case, plain_pair):
    _, _, cfg, _ = plain_pair
    dec = case.build(cfg, cross_layers=[0], adapter=GatedAdapter())
    with pytest.raises(CheckpointError, match=f"{case.prefix}0.crossattention.gate"):
        case.module.state_dict_to_hf(dec.state_dict(), cfg)


# ---- checkpoint mapping ----------------------------------------------------------------------------------


@ALL
def test_state_dict_round_trip(case, cross_pair):
    _, ours, cfg, sd = cross_pair
    back = case.module.state_dict_to_hf(ours.state_dict(), cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # and transformers takes it: only the tied head is absent
    res = case.hf_class(case.hf_config(add_cross_attention=True)).load_state_dict(back, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) <= case.tied_missing
    with pytest.raises(CheckpointError, match="extra.weight"):
        case.module.state_dict_to_hf({**ours.state_dict(), "extra.weight": torch.zeros(1)}, cfg)


@ALL
def test_shape_mismatch_raises(case, cross_pair):
    _, _, cfg, sd = cross_pair
    key, given, expected = case.bad_shape
    with pytest.raises(CheckpointError) as e:
        case.module.state_dict_from_hf({**sd, key: torch.zeros(given)}, cfg)
    assert key in str(e.value) and str(given) in str(e.value) and str(expected) in str(e.value)


# BERT's and RoBERTa's untied head also unties its bias: test_bert.py
@pytest.mark.parametrize("case", ["gpt2", "bart"], indirect=True)
@torch.no_grad()
def test_untied_lm_head(case, tmp_path):
    hf = case.hf_model(seed=7, tie_word_embeddings=False)
    cfg, sd = save_hf(hf, tmp_path)
    assert "lm_head.weight" in sd
    ours = case.ours(cfg, sd)
    assert ours.lm_head is not None and "lm_head.weight" in ours.state_dict()
    ids = case.ids()
    assert diff(ours(ids).logits, hf(input_ids=ids).logits) <= ATOL


# ---- config and input validation -------------------------------------------------------------------------


@ALL
def test_config_validation(case):
    values, error = case.heads_error
    with pytest.raises(ValidationError) as e:
        case.config_cls(**values)
    assert error in str(e.value) and "fix:" in str(e.value)
    with pytest.raises(ValidationError, match=case.activation):
        case.config_cls(**{case.activation: "tanh"})
    with pytest.raises(ValidationError, match=case.unknown_key):
        case.config_cls(**{case.unknown_key: 2})


@ALL
def test_config_from_hf_refuses_and_round_trips(case):
    given, named = case.unsupported
    with pytest.raises(ConfigError) as e:
        case.module.config_from_hf({**case.tiny, **given})
    assert all(s in str(e.value) for s in (*named, "fix:"))
    values = case.config_cls(**case.tiny).model_dump()
    assert case.module.config_from_hf(case.module.config_to_hf(values)) == values


@ALL
def test_bad_inputs(case, cross_pair):
    _, ours, _, _ = cross_pair
    V, P, tokens = case.vocab, case.position_rows, torch.full((1, 3), case.low_id)
    for call, match in (
        (lambda: ours(torch.tensor([[2, V]])), rf"\[0, {V - 1}\].*{V}"),
        (lambda: ours(torch.tensor([[-1, 3]])), "-1"),
        (lambda: ours(torch.zeros(1, 3)), "integer token ids"),
        (lambda: ours(case.ids(B=1, T=65)), case.too_long),
        (lambda: ours(tokens[:, :2], position_ids=torch.tensor([P - 1, P])), rf"position_ids .*{P}, but"),
        (lambda: ours(tokens, context=torch.randn(1, 4, 16)), f"context width 16.*{case.expects_width}"),
        (lambda: ours(tokens, context=case.ctx(B=1), context_mask=torch.ones(1, 3)), "context_mask"),
        (lambda: ours(tokens, attention_mask=torch.ones(1, 4)), "attention_mask"),
    ):
        with pytest.raises(InputError, match=match):
            call()
    cache = KVCache(case.n_layers, max_len=128)
    cache.length = 60
    with pytest.raises(InputError, match="60 cached") as e:
        ours(torch.full((1, 5), case.low_id), cache=cache)
    assert re.search(case.too_long, str(e.value))


# ---- registration ----------------------------------------------------------------------------------------


@ALL
def test_registration(case):
    calls = []
    case.module.register_decoders(lambda *a, **kw: calls.append((a, kw)))
    [(args, kw)] = calls
    name, builder, config_cls = args
    assert (name, builder, config_cls) == (case.registered, case.builder, case.config_cls)
    # the family's own model type first (roberta also reads xlm-roberta and camembert)
    assert isinstance(kw["hf"], HFInterop) and kw["hf"].model_types[0] == case.name
    model = builder(config_cls(**kw["tiny"]))
    assert isinstance(model, TextDecoder)
    assert model(torch.full((1, 2), case.low_id)).logits.shape == (1, 2, kw["tiny"]["vocab_size"])

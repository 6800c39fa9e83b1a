"""BERT decoder: parity with transformers' BertLMHeadModel on the same weights, the KV cache, every on-disk layout
(BertForPreTraining, BertModel, legacy gamma/beta), the inverse mapping, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

import transformers  # the oracle only; src/ never imports it
from splice.adapters.cross_attention import GatedAdapter, StandardAdapter
from splice.core.errors import CheckpointError, ConfigError, InputError
from splice.core.generation import KVCache
from splice.core.interfaces import HFInterop, TextDecoder
from splice.plugins import bert as B

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
ATOL = 1e-4
CROSS_PARTS = {"norm", "q_proj", "k_proj", "v_proj", "o_proj"}


def _save_hf(model, path) -> tuple[dict, dict]:
    """save_pretrained, then read back exactly what is on disk."""
    model.save_pretrained(path)
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


def _hf_model(cls=transformers.BertLMHeadModel, seed=0, **over):
    torch.manual_seed(seed)
    model = cls(transformers.BertConfig(**{**TINY, "is_decoder": True, **over}))
    # transformers inits biases to 0 and LayerNorms to identity, which would hide mapping mistakes
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _build(cfg: dict, cross_layers=(), adapter=None) -> B.BertDecoder:
    dec = B.build_bert(B.BertConfig(**B.config_from_hf(cfg)))
    for i in cross_layers:
        dec.install_cross_attention(i, (adapter or StandardAdapter()).build(dec.layer_specs()[i], TINY["hidden_size"]))
    return dec.eval()


def _ours(cfg: dict, sd: dict, cross_layers=()) -> B.BertDecoder:
    dec = _build(cfg, cross_layers)
    mapped, unused = B.state_dict_from_hf(sd, cfg)
    dec.load_state_dict(mapped, strict=True)
    assert unused == []
    return dec


@pytest.fixture(scope="module")
def cross_pair(tmp_path_factory):
    hf = _hf_model(add_cross_attention=True)
    cfg, sd = _save_hf(hf, tmp_path_factory.mktemp("bertx"))
    return hf, _ours(cfg, sd, cross_layers=range(TINY["num_hidden_layers"])), cfg, sd


@pytest.fixture(scope="module")
def plain_pair(tmp_path_factory):
    hf = _hf_model(seed=3)
    cfg, sd = _save_hf(hf, tmp_path_factory.mktemp("bert"))
    return hf, _ours(cfg, sd), cfg, sd


def _ids(B_=2, T=9, seed=0):
    return torch.randint(0, TINY["vocab_size"], (B_, T), generator=torch.Generator().manual_seed(seed))


def _ctx(B_=2, N=5, seed=0):
    return torch.randn(B_, N, TINY["hidden_size"], generator=torch.Generator().manual_seed(seed))


def _diff(a, b) -> float:
    return float((a - b).abs().max())


# ---- parity ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_cross_attention_parity(cross_pair):
    hf, ours, _, _ = cross_pair
    ids, ctx = _ids(), _ctx()
    ref = hf(input_ids=ids, encoder_hidden_states=ctx).logits
    out = ours(ids, context=ctx)
    assert out.logits.shape == ref.shape == (2, 9, TINY["vocab_size"])
    assert _diff(out.logits, ref) <= ATOL
    assert out.hidden_states.shape == (2, 9, TINY["hidden_size"])
    assert _diff(ours(ids).logits, ref) > 1e-2  # the context matters, so the parity above is not vacuous
    cmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    ref = hf(input_ids=ids, encoder_hidden_states=ctx, encoder_attention_mask=cmask).logits
    assert _diff(ours(ids, context=ctx, context_mask=cmask).logits, ref) <= ATOL
    # and without context the cross-attention is skipped, as transformers does without encoder_hidden_states
    assert _diff(ours(ids).logits, hf(input_ids=ids).logits) <= ATOL


@torch.no_grad()
def test_plain_parity(plain_pair):
    hf, ours, _, _ = plain_pair
    ids = _ids(T=12)
    assert _diff(ours(ids).logits, hf(input_ids=ids).logits) <= ATOL
    assert isinstance(ours, TextDecoder)


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_padded_batch_parity(cross_pair, side):
    # BERT positions are arange(past, past + T) in every row, padding or not; compare at the real tokens only
    hf, ours, _, _ = cross_pair
    ids, ctx = _ids(B_=3, T=8), _ctx(B_=3)
    mask = torch.ones(3, 8, dtype=torch.long)
    if side == "right":
        mask[1, 5:], mask[2, 2:] = 0, 0
    else:
        mask[1, :3], mask[2, :6] = 0, 0
    ref = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=ctx).logits
    out = ours(ids, context=ctx, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(out).all()  # padding rows stay finite too
    assert _diff(out[real], ref[real]) <= ATOL
    if side == "left":  # the mask matters: real tokens after left padding would otherwise see it
        assert _diff(ours(ids, context=ctx).logits[real], ref[real]) > 1e-3


@torch.no_grad()
def test_untied_head(tmp_path):
    # transformers 5 unties the decoder bias too: logits use cls.predictions.decoder.bias, cls.predictions.bias is dead
    hf = _hf_model(seed=7, tie_word_embeddings=False)
    cfg, sd = _save_hf(hf, tmp_path)
    assert {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "cls.predictions.bias"} <= set(sd)
    ours = _build(cfg)
    mapped, unused = B.state_dict_from_hf(sd, cfg)
    assert unused == ["cls.predictions.bias"]
    ours.load_state_dict(mapped, strict=True)
    ids = _ids()
    assert _diff(ours(ids).logits, hf(input_ids=ids).logits) <= ATOL
    back = B.state_dict_to_hf(ours.state_dict(), cfg)
    assert set(back) == set(sd)
    assert torch.equal(back["cls.predictions.decoder.bias"], sd["cls.predictions.decoder.bias"])


# ---- KV cache --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1], [9]])
@torch.no_grad()
def test_kv_cache_matches_full_forward(cross_pair, chunks):
    _, ours, _, _ = cross_pair
    ids, ctx = _ids(T=9), _ctx()
    full = ours(ids, context=ctx).logits
    cache = KVCache(num_layers=TINY["num_hidden_layers"], max_len=16)
    outs, start = [], 0
    for n in chunks:
        # context only on the first call: later calls read the cross K/V stored in the cache
        out = ours(ids[:, start:start + n], context=ctx if start == 0 else None, cache=cache)
        assert out.cache is cache
        outs.append(out.logits)
        start += n
    assert cache.length == 9 and all(kv is not None for kv in cache.cross)
    assert _diff(torch.cat(outs, 1), full) <= ATOL


@torch.no_grad()
def test_kv_cache_with_left_padding(cross_pair):
    hf, ours, _, _ = cross_pair
    ids, ctx = _ids(B_=2, T=7), _ctx()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    full = ours(ids, context=ctx, attention_mask=mask).logits
    cache = KVCache(TINY["num_hidden_layers"], max_len=8)
    first = ours(ids[:, :4], context=ctx, attention_mask=mask[:, :4], cache=cache).logits
    rest = [ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits for t in range(4, 7)]
    real = mask.bool()
    assert _diff(torch.cat([first, *rest], 1)[real], full[real]) <= ATOL
    ref = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=ctx).logits
    assert _diff(full[real], ref[real]) <= ATOL


# ---- on-disk layouts -------------------------------------------------------------------------------------


def _cross_keys(dec) -> set[str]:
    return {k for k in dec.state_dict() if ".crossattention." in k}


@torch.no_grad()
def test_pretraining_layout_leaves_only_cross_attention_missing(tmp_path):
    # the bert-base-uncased file: BertForPreTraining, so a pooler and the next-sentence head ride along
    hf = _hf_model(cls=transformers.BertForPreTraining, seed=5)
    cfg, sd = _save_hf(hf, tmp_path)
    assert any(k.startswith("cls.seq_relationship.") for k in sd) and any(k.startswith("bert.pooler.") for k in sd)
    sd["bert.embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[None]  # old files carry it
    dec = _build(cfg, cross_layers=range(TINY["num_hidden_layers"]))
    mapped, unused = B.state_dict_from_hf(sd, cfg)
    head = ["cls.seq_relationship.weight", "cls.seq_relationship.bias"]
    pooler = ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    assert sorted(unused) == sorted([*pooler, *head, "bert.embeddings.position_ids"])
    res = dec.load_state_dict(mapped, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) == _cross_keys(dec)
    assert {k.split(".")[3] for k in res.missing_keys} == CROSS_PARTS
    ids = _ids()
    assert _diff(dec(ids).logits, hf(input_ids=ids).prediction_logits) <= ATOL


@torch.no_grad()
def test_bertmodel_layout_and_legacy_names(tmp_path):
    # BertModel: no `bert.` prefix and no head; old files name LayerNorm parameters gamma/beta
    hf = _hf_model(cls=transformers.BertModel, seed=6, add_cross_attention=True)
    cfg, sd = _save_hf(hf, tmp_path)
    assert not any(k.startswith("bert.") for k in sd)
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in sd.items()}
    assert sum(".gamma" in k for k in legacy) == 1 + 3 * TINY["num_hidden_layers"]
    dec = _build(cfg, cross_layers=range(TINY["num_hidden_layers"]))
    mapped, unused = B.state_dict_from_hf(legacy, cfg)
    assert sorted(unused) == ["pooler.dense.bias", "pooler.dense.weight"]
    res = dec.load_state_dict(mapped, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) == {k for k in dec.state_dict() if k.startswith("head.")}
    ids, ctx = _ids(), _ctx()
    ref = hf(input_ids=ids, encoder_hidden_states=ctx).last_hidden_state
    assert _diff(dec(ids, context=ctx).hidden_states, ref) <= ATOL


def test_tied_duplicates_consumed(plain_pair):
    _, _, cfg, sd = plain_pair
    extra = dict(sd)  # torch.save .bin files also carry the tied decoder
    extra["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    extra["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    mapped, unused = B.state_dict_from_hf(extra, cfg)
    assert unused == [] and set(mapped) == set(_build(cfg).state_dict())


# ---- adapters in the slots -------------------------------------------------------------------------------


@torch.no_grad()
def test_gated_adapter_at_init_is_identity(plain_pair):
    _, plain, cfg, sd = plain_pair
    gated = _build(cfg, cross_layers=range(TINY["num_hidden_layers"]), adapter=GatedAdapter())
    res = gated.load_state_dict(B.state_dict_from_hf(sd, cfg)[0], strict=False)
    assert set(res.missing_keys) == _cross_keys(gated)
    ids, ctx = _ids(), _ctx()
    assert torch.equal(gated(ids, context=ctx).logits, plain(ids).logits)
    gated.layers[0].crossattention.gate.fill_(0.5)
    assert _diff(gated(ids, context=ctx).logits, plain(ids).logits) > 1e-4


@torch.no_grad()
def test_layer_specs_and_sparse_install():
    dec = B.build_bert(B.BertConfig(**TINY, attention_probs_dropout_prob=0.2)).eval()
    specs = dec.layer_specs()
    assert [s.index for s in specs] == [0, 1]
    assert all((s.width, s.heads, s.norm, s.eps, s.bias, s.dropout) == (32, 4, "post", 1e-12, True, 0.2) for s in specs)
    assert (dec.hidden_size, dec.vocab_size, dec.max_positions, dec.native_cross_attention) == (32, 99, 64, False)
    plain = dec(_ids()).logits
    dec.install_cross_attention(1, StandardAdapter().build(specs[1], context_width=24))
    assert {k.split(".")[3] for k in _cross_keys(dec)} == CROSS_PARTS
    assert all(k.startswith("layers.1.") for k in _cross_keys(dec)) and dec.layers[0].crossattention is None
    assert _diff(dec(_ids(), context=torch.randn(2, 5, 24)).logits, plain) > 1e-4
    with pytest.raises(IndexError, match="0..1"):
        dec.install_cross_attention(2, StandardAdapter().build(specs[1], 24))


# ---- checkpoint mapping ----------------------------------------------------------------------------------


def test_state_dict_round_trip(cross_pair):
    _, ours, cfg, sd = cross_pair
    back = B.state_dict_to_hf(ours.state_dict(), cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    hf = transformers.BertLMHeadModel(transformers.BertConfig(**TINY, is_decoder=True, add_cross_attention=True))
    res = hf.load_state_dict(back, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) <= {"cls.predictions.decoder.weight",
                                                                   "cls.predictions.decoder.bias"}


def test_to_hf_refuses_gated(plain_pair):
    _, _, cfg, _ = plain_pair
    dec = _build(cfg, cross_layers=[0], adapter=GatedAdapter())
    with pytest.raises(CheckpointError, match="layers.0.crossattention.gate"):
        B.state_dict_to_hf(dec.state_dict(), cfg)


def test_shape_mismatch_raises(plain_pair):
    _, _, cfg, sd = plain_pair
    bad = dict(sd)
    bad["bert.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(32, 37)
    with pytest.raises(CheckpointError) as e:
        B.state_dict_from_hf(bad, cfg)
    msg = str(e.value)
    assert "bert.encoder.layer.1.intermediate.dense.weight" in msg and "(32, 37)" in msg and "(37, 32)" in msg


def test_config_from_hf():
    kw = B.config_from_hf({**TINY, "model_type": "bert", "is_decoder": True, "add_cross_attention": True,
                           "position_embedding_type": "absolute", "classifier_dropout": None, "use_cache": True,
                           "pad_token_id": None, "hidden_act": "relu"})
    assert kw == {**TINY, "hidden_act": "relu"}
    with pytest.raises(ConfigError) as e:
        B.config_from_hf({**TINY, "position_embedding_type": "relative_key", "hidden_act": "swish"})
    msg = str(e.value)
    assert "position_embedding_type" in msg and "'relative_key'" in msg and "hidden_act" in msg and "fix:" in msg
    values = B.BertConfig(**TINY).model_dump()
    hf = B.config_to_hf(values)
    assert (hf["model_type"], hf["is_decoder"], hf["add_cross_attention"]) == ("bert", True, True)
    assert B.config_from_hf(hf) == values
    assert transformers.BertConfig(**{k: v for k, v in hf.items() if k != "model_type"}).hidden_size == 32


def test_config_validation():
    with pytest.raises(ValidationError) as e:
        B.BertConfig(hidden_size=32, num_attention_heads=5)
    assert "num_attention_heads=5 does not divide hidden_size=32" in str(e.value) and "fix:" in str(e.value)
    with pytest.raises(ValidationError, match="pad_token_id=99"):
        B.BertConfig(vocab_size=99, pad_token_id=99)
    with pytest.raises(ValidationError, match="hidden_act"):
        B.BertConfig(hidden_act="tanh")
    with pytest.raises(ValidationError, match="n_layer"):
        B.BertConfig(n_layer=2)
    c = B.BertConfig()
    assert (c.vocab_size, c.hidden_size, c.max_position_embeddings, c.layer_norm_eps, c.pad_token_id) == \
        (30522, 768, 512, 1e-12, 0)


def test_bad_inputs(cross_pair, plain_pair):
    _, ours, _, _ = cross_pair
    _, plain, _, _ = plain_pair
    with pytest.raises(InputError, match=r"\[0, 98\].*99"):
        ours(torch.tensor([[1, 99]]))
    with pytest.raises(InputError, match="integer token ids"):
        ours(torch.zeros(1, 3))
    with pytest.raises(InputError, match="exceeds the 64 positions"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    cache = KVCache(TINY["num_hidden_layers"], max_len=128)
    cache.length = 60
    with pytest.raises(InputError, match="60 cached"):
        ours(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(InputError, match="position_ids reach 64"):
        ours(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([63, 64]))
    with pytest.raises(InputError, match="install an adapter"):
        plain(torch.zeros(1, 3, dtype=torch.long), context=_ctx(B_=1))
    with pytest.raises(InputError, match="context width 16.*expects 32"):
        ours(torch.zeros(1, 3, dtype=torch.long), context=torch.randn(1, 4, 16))
    with pytest.raises(InputError, match="context_mask"):
        ours(torch.zeros(1, 3, dtype=torch.long), context=_ctx(B_=1), context_mask=torch.ones(1, 3))
    with pytest.raises(InputError, match="attention_mask"):
        ours(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))


def test_registration():
    calls = []
    B.register_decoders(lambda *a, **kw: calls.append((a, kw)))
    [(args, kw)] = calls
    name, builder, config_cls = args
    assert (name, config_cls) == ("bert", B.BertConfig)
    assert isinstance(kw["hf"], HFInterop) and kw["hf"].model_types == ("bert",)
    model = builder(config_cls(**kw["tiny"]))
    assert isinstance(model, TextDecoder) and "head.decoder.weight" not in model.state_dict()
    assert model(torch.zeros(1, 2, dtype=torch.long)).logits.shape == (1, 2, kw["tiny"]["vocab_size"])
    assert torch.equal(model.embeddings.word.weight[0], torch.zeros(32))  # padding row, as transformers inits it

"""GPT2 decoder: parity with transformers on the same weights, the KV cache, checkpoint mapping, bad input."""

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
from splice.plugins import gpt2 as G

TINY = dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4)
ATOL = 1e-4


def _save_hf(model, path) -> tuple[dict, dict]:
    """save_pretrained, then read back exactly what is on disk."""
    model.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    return cfg, load_file(str(path / "model.safetensors"))


def _perturb(model, seed=1):
    # transformers inits biases to 0 and LayerNorms to identity, which would hide mapping mistakes
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _hf_model(cls=transformers.GPT2LMHeadModel, seed=0, **over):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**{**TINY, **over})
    return _perturb(cls(cfg)).eval()


def _ours(cfg: dict, sd: dict, cross_layers=None, adapter=None) -> G.GPT2Decoder:
    config = G.GPT2Config(**G.config_from_hf(cfg))
    dec = G.build_gpt2(config)
    specs = dec.layer_specs()
    adapter = adapter or StandardAdapter()
    for i in cross_layers if cross_layers is not None else []:
        dec.install_cross_attention(i, adapter.build(specs[i], context_width=config.n_embd))
    mapped, unused = G.state_dict_from_hf(sd, cfg)
    dec.load_state_dict(mapped, strict=True)
    assert unused == []
    return dec.eval()


@pytest.fixture(scope="module")
def cross_pair(tmp_path_factory):
    hf = _hf_model(add_cross_attention=True)
    cfg, sd = _save_hf(hf, tmp_path_factory.mktemp("gpt2x"))
    return hf, _ours(cfg, sd, cross_layers=range(TINY["n_layer"])), cfg, sd


@pytest.fixture(scope="module")
def plain_pair(tmp_path_factory):
    hf = _hf_model(seed=3)
    cfg, sd = _save_hf(hf, tmp_path_factory.mktemp("gpt2"))
    return hf, _ours(cfg, sd), cfg, sd


def _ids(B=2, T=9, seed=0):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def _ctx(B=2, N=5, seed=0):
    return torch.randn(B, N, TINY["n_embd"], generator=torch.Generator().manual_seed(seed))


# ---- parity ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_cross_attention_parity(cross_pair):
    hf, ours, _, _ = cross_pair
    ids, ctx = _ids(), _ctx()
    ref = hf(input_ids=ids, encoder_hidden_states=ctx).logits
    out = ours(ids, context=ctx)
    assert out.logits.shape == ref.shape == (2, 9, TINY["vocab_size"])
    assert (out.logits - ref).abs().max() <= ATOL
    assert out.hidden_states.shape == (2, 9, TINY["n_embd"])
    # the context matters: without it the logits move (so the parity above is not vacuous)
    assert (ours(ids).logits - ref).abs().max() > 1e-2


@torch.no_grad()
def test_context_mask_parity(cross_pair):
    hf, ours, _, _ = cross_pair
    ids, ctx = _ids(), _ctx(N=6)
    cmask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    ref = hf(input_ids=ids, encoder_hidden_states=ctx, encoder_attention_mask=cmask).logits
    out = ours(ids, context=ctx, context_mask=cmask).logits
    assert (out - ref).abs().max() <= ATOL
    assert (out[1] - ours(ids, context=ctx).logits[1]).abs().max() > 1e-3


@torch.no_grad()
def test_plain_parity(plain_pair):
    hf, ours, _, _ = plain_pair
    ids = _ids(T=12)
    assert (ours(ids).logits - hf(input_ids=ids).logits).abs().max() <= ATOL
    assert isinstance(ours, TextDecoder)


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_padded_batch_parity(cross_pair, side):
    # transformers 5 does not shift positions for padding in forward: positions are arange(past, past+T)
    # for every row, left padding included. We match that; compare at the real positions only.
    hf, ours, _, _ = cross_pair
    ids, ctx = _ids(B=3, T=8), _ctx(B=3)
    mask = torch.ones(3, 8, dtype=torch.long)
    if side == "right":
        mask[1, 5:] = 0
        mask[2, 2:] = 0
    else:
        mask[1, :3] = 0
        mask[2, :6] = 0
    ref = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=ctx).logits
    out = ours(ids, context=ctx, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(out).all()  # padding rows stay finite too
    assert (out[real] - ref[real]).abs().max() <= ATOL
    unmasked = ours(ids, context=ctx).logits
    if side == "left":  # the mask matters: real tokens after left padding would otherwise see it
        assert (unmasked[real] - ref[real]).abs().max() > 1e-3
    else:  # causal attention alone already hides right padding from real tokens
        assert (unmasked[real] - ref[real]).abs().max() <= ATOL


@torch.no_grad()
def test_gpt2model_file_layout(tmp_path):
    # the hub `gpt2` file: GPT2Model, names without `transformer.` and no lm_head
    hf = _hf_model(cls=transformers.GPT2Model, seed=5, add_cross_attention=True)
    cfg, sd = _save_hf(hf, tmp_path)
    assert not any(k.startswith("transformer.") for k in sd) and "lm_head.weight" not in sd
    ours = _ours(cfg, sd, cross_layers=[0, 1])
    ids, ctx = _ids(), _ctx()
    ref = hf(input_ids=ids, encoder_hidden_states=ctx).last_hidden_state
    out = ours(ids, context=ctx)
    assert (out.hidden_states - ref).abs().max() <= ATOL
    assert (out.logits - ref @ hf.wte.weight.T).abs().max() <= ATOL


@torch.no_grad()
def test_untied_lm_head(tmp_path):
    hf = _hf_model(seed=7, tie_word_embeddings=False)
    cfg, sd = _save_hf(hf, tmp_path)
    assert "lm_head.weight" in sd
    ours = _ours(cfg, sd)
    assert ours.lm_head is not None and "lm_head.weight" in ours.state_dict()
    ids = _ids()
    assert (ours(ids).logits - hf(input_ids=ids).logits).abs().max() <= ATOL


# ---- KV cache --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1], [9]])
@torch.no_grad()
def test_kv_cache_matches_full_forward(cross_pair, chunks):
    _, ours, _, _ = cross_pair
    ids, ctx = _ids(T=9), _ctx()
    full = ours(ids, context=ctx).logits
    cache = KVCache(num_layers=TINY["n_layer"], max_len=16)
    outs, start = [], 0
    for n in chunks:
        # context only on the first call: later calls read the cross K/V stored in the cache
        out = ours(ids[:, start:start + n], context=ctx if start == 0 else None, cache=cache)
        assert out.cache is cache
        outs.append(out.logits)
        start += n
    assert cache.length == 9
    assert all(kv is not None for kv in cache.cross)
    assert (torch.cat(outs, 1) - full).abs().max() <= ATOL


@torch.no_grad()
def test_kv_cache_with_left_padding(cross_pair):
    _, ours, _, _ = cross_pair
    ids, ctx = _ids(B=2, T=7), _ctx()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    full = ours(ids, context=ctx, attention_mask=mask).logits
    cache = KVCache(TINY["n_layer"], max_len=8)
    first = ours(ids[:, :4], context=ctx, attention_mask=mask[:, :4], cache=cache).logits
    rest = [ours(ids[:, t:t + 1], context=ctx, attention_mask=mask[:, :t + 1], cache=cache).logits for t in range(4, 7)]
    got = torch.cat([first, *rest], 1)
    real = mask.bool()
    assert (got[real] - full[real]).abs().max() <= ATOL


# ---- adapters in the slots -------------------------------------------------------------------------------


@torch.no_grad()
def test_gated_adapter_at_init_is_identity(plain_pair):
    _, _, cfg, sd = plain_pair
    plain = _ours(cfg, sd)
    gated = G.build_gpt2(G.GPT2Config(**G.config_from_hf(cfg))).eval()
    for spec in gated.layer_specs():
        gated.install_cross_attention(spec.index, GatedAdapter().build(spec, context_width=24))
    gated.load_state_dict({**G.state_dict_from_hf(sd, cfg)[0],
                           **{k: v for k, v in gated.state_dict().items() if "crossattention" in k}})
    ids, ctx = _ids(), torch.randn(2, 5, 24)
    assert torch.equal(gated(ids, context=ctx).logits, plain(ids).logits)
    with torch.no_grad():
        gated.h[0].crossattention.gate.fill_(0.5)
    assert (gated(ids, context=ctx).logits - plain(ids).logits).abs().max() > 1e-4


@torch.no_grad()
def test_sparse_install(plain_pair):
    _, _, cfg, sd = plain_pair
    dec = G.build_gpt2(G.GPT2Config(**G.config_from_hf(cfg))).eval()
    dec.load_state_dict(G.state_dict_from_hf(sd, cfg)[0])
    plain_logits = dec(_ids()).logits
    spec = dec.layer_specs()[1]
    dec.install_cross_attention(1, StandardAdapter().build(spec, context_width=24))
    keys = [k for k in dec.state_dict() if "crossattention" in k]
    assert keys and all(k.startswith("h.1.crossattention.") for k in keys)
    assert {k.split(".")[3] for k in keys} == {"norm", "q_proj", "k_proj", "v_proj", "o_proj"}
    assert dec.h[0].crossattention is None
    out = dec(_ids(), context=torch.randn(2, 5, 24)).logits
    assert out.shape == plain_logits.shape and (out - plain_logits).abs().max() > 1e-4
    assert torch.equal(dec(_ids()).logits, plain_logits)  # no context: the slot is skipped


def test_layer_specs():
    dec = G.build_gpt2(G.GPT2Config(**TINY, attn_pdrop=0.2))
    specs = dec.layer_specs()
    assert [s.index for s in specs] == [0, 1]
    assert all((s.width, s.heads, s.norm, s.eps, s.bias, s.dropout) == (32, 4, "pre", 1e-5, True, 0.2) for s in specs)
    assert (dec.hidden_size, dec.vocab_size, dec.max_positions, dec.native_cross_attention) == (32, 99, 64, False)


# ---- checkpoint mapping ----------------------------------------------------------------------------------


def test_state_dict_round_trip(cross_pair):
    _, ours, cfg, sd = cross_pair
    back = G.state_dict_to_hf(ours.state_dict(), cfg)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # and transformers takes it: only the tied lm_head is absent
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY, add_cross_attention=True))
    res = hf.load_state_dict(back, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) <= {"lm_head.weight"}


def test_to_hf_refuses_gated(plain_pair):
    _, _, cfg, _ = plain_pair
    dec = G.build_gpt2(G.GPT2Config(**TINY))
    dec.install_cross_attention(0, GatedAdapter().build(dec.layer_specs()[0], 32))
    with pytest.raises(CheckpointError, match="h.0.crossattention.gate"):
        G.state_dict_to_hf(dec.state_dict(), cfg)


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


def test_shape_mismatch_raises(plain_pair):
    _, _, cfg, sd = plain_pair
    bad = dict(sd)
    bad["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 64)
    with pytest.raises(CheckpointError) as e:
        G.state_dict_from_hf(bad, cfg)
    assert "transformer.h.1.mlp.c_fc.weight" in str(e.value) and "(32, 64)" in str(e.value) and "(32, 128)" in str(e.value)


def test_config_from_hf():
    kw = G.config_from_hf({**TINY, "model_type": "gpt2", "add_cross_attention": True, "n_ctx": 64,
                           "summary_type": "cls_index", "activation_function": "relu"})
    assert kw == {**TINY, "activation_function": "relu"}
    with pytest.raises(ConfigError) as e:
        G.config_from_hf({**TINY, "reorder_and_upcast_attn": True, "activation_function": "swish"})
    msg = str(e.value)
    assert "reorder_and_upcast_attn" in msg and "activation_function" in msg and "'swish'" in msg and "fix:" in msg
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        G.config_from_hf({**TINY, "add_cross_attention": True, "scale_attn_by_inverse_layer_idx": True})


@torch.no_grad()
def test_scale_attn_by_inverse_layer_idx_parity(tmp_path):
    hf = _hf_model(seed=9, scale_attn_by_inverse_layer_idx=True, activation_function="gelu")
    cfg, sd = _save_hf(hf, tmp_path)
    ids = _ids()
    assert (_ours(cfg, sd)(ids).logits - hf(input_ids=ids).logits).abs().max() <= ATOL


# ---- config and input validation -------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValidationError) as e:
        G.GPT2Config(n_embd=32, n_head=5)
    assert "n_head=5 does not divide n_embd=32" in str(e.value) and "fix:" in str(e.value)
    with pytest.raises(ValidationError, match="activation_function"):
        G.GPT2Config(activation_function="tanh")
    with pytest.raises(ValidationError, match="n_layers"):
        G.GPT2Config(n_layers=2)
    with pytest.raises(ValidationError, match="n_positions"):
        G.GPT2Config(n_positions=0)
    assert G.GPT2Config().n_embd == 768 and G.GPT2Config().activation_function == "gelu_new"


def test_bad_inputs(cross_pair, plain_pair):
    _, ours, _, _ = cross_pair
    _, plain, _, _ = plain_pair
    with pytest.raises(InputError, match=r"\[0, 98\].*99"):
        ours(torch.tensor([[1, 99]]))
    with pytest.raises(InputError, match="-1"):
        ours(torch.tensor([[-1, 3]]))
    with pytest.raises(InputError, match="exceeds n_positions=64"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    cache = KVCache(TINY["n_layer"], max_len=128)
    cache.length = 60
    with pytest.raises(InputError, match="exceeds n_positions=64"):
        ours(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(InputError, match="install an adapter"):
        plain(torch.zeros(1, 3, dtype=torch.long), context=_ctx(B=1))
    with pytest.raises(InputError, match="context width 16.*expects 32"):
        ours(torch.zeros(1, 3, dtype=torch.long), context=torch.randn(1, 4, 16))
    with pytest.raises(InputError, match="attention_mask"):
        ours(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))


def test_registration():
    calls = []
    G.register_decoders(lambda *a, **kw: calls.append((a, kw)))
    [(args, kw)] = calls
    name, builder, config_cls = args
    assert (name, config_cls) == ("gpt2", G.GPT2Config)
    assert isinstance(kw["hf"], HFInterop) and kw["hf"].model_types == ("gpt2",)
    model = builder(config_cls(**kw["tiny"]))
    assert isinstance(model, TextDecoder)
    assert model(torch.zeros(1, 2, dtype=torch.long)).logits.shape == (1, 2, kw["tiny"]["vocab_size"])
    # transformers' init: residual projections are narrower than the rest
    big = builder(config_cls(n_embd=64, n_layer=8, n_head=4, vocab_size=50, n_positions=32))
    assert big.h[0].attn.c_proj.weight.std() < 0.6 * big.h[0].attn.c_attn.weight.std()
    assert "lm_head.weight" not in big.state_dict()

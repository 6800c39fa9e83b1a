"""BART decoder: parity with transformers on the same weights, the KV cache, checkpoint layouts, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

import transformers  # the oracle only; src/ never imports it
from splice.core.errors import CheckpointError, ConfigError, IncompatibleComponentsError, InputError
from splice.core.generation import KVCache
from splice.core.interfaces import HFInterop, TextDecoder
from splice.plugins import bart as B

TINY = dict(vocab_size=99, max_position_embeddings=64, d_model=32, decoder_layers=2, decoder_attention_heads=4,
            decoder_ffn_dim=64)
# transformers 5 sizes BartForCausalLM's DynamicCache by num_hidden_layers, which BartConfig maps to
# *encoder*_layers: fewer encoder than decoder layers raises IndexError in forward (use_cache defaults to True)
ENCODER = dict(encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48)
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


def _hf_config(**over):
    return transformers.BartConfig(**{**TINY, **ENCODER, "is_decoder": True, "add_cross_attention": True,
                                      "dropout": 0.0, **over})


def _hf_causal(seed=0, **over):
    torch.manual_seed(seed)
    return _perturb(transformers.BartForCausalLM(_hf_config(**over)), seed + 1).eval()


def _ours(cfg: dict, sd: dict, expect_unused=()) -> B.BartDecoder:
    dec = B.build_bart(B.BartConfig(**B.config_from_hf(cfg)))
    mapped, unused, *_notes = B.state_dict_from_hf(sd, cfg)
    dec.load_state_dict(mapped, strict=True)
    assert sorted(unused) == sorted(expect_unused)
    return dec.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = _hf_causal()
    cfg, sd = _save_hf(hf, tmp_path_factory.mktemp("bart"))
    return hf, _ours(cfg, sd), cfg, sd


def _ids(Bn=2, T=9, seed=0):
    return torch.randint(0, TINY["vocab_size"], (Bn, T), generator=torch.Generator().manual_seed(seed))


def _ctx(Bn=2, N=5, seed=0):
    return torch.randn(Bn, N, TINY["d_model"], generator=torch.Generator().manual_seed(seed))


# ---- parity ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_cross_attention_parity(pair):
    hf, ours, _, sd = pair
    assert "lm_head.weight" not in sd and "model.decoder.embed_tokens.weight" in sd  # tied, absent on disk
    ids, ctx = _ids(), _ctx()
    ref = hf(input_ids=ids, encoder_hidden_states=ctx).logits
    out = ours(ids, context=ctx)
    assert out.logits.shape == ref.shape == (2, 9, TINY["vocab_size"])
    assert (out.logits - ref).abs().max() <= ATOL
    assert out.hidden_states.shape == (2, 9, TINY["d_model"])
    assert (ours(ids).logits - ref).abs().max() > 1e-2  # the context matters: the parity above is not vacuous


@torch.no_grad()
def test_no_context_parity(pair):
    # without encoder_hidden_states transformers skips encoder_attn (and its norm); so do we
    hf, ours, _, _ = pair
    ids = _ids(T=12)
    assert (ours(ids).logits - hf(input_ids=ids).logits).abs().max() <= ATOL
    assert isinstance(ours, TextDecoder)


@torch.no_grad()
def test_context_mask_parity(pair):
    hf, ours, _, _ = pair
    ids, ctx = _ids(), _ctx(N=6)
    cmask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    ref = hf(input_ids=ids, encoder_hidden_states=ctx, encoder_attention_mask=cmask).logits
    out = ours(ids, context=ctx, context_mask=cmask).logits
    assert (out - ref).abs().max() <= ATOL
    assert (out[1] - ours(ids, context=ctx).logits[1]).abs().max() > 1e-3


@torch.no_grad()
def test_scale_embedding_and_activation_parity(tmp_path):
    hf = _hf_causal(seed=4, scale_embedding=True, activation_function="relu")
    cfg, sd = _save_hf(hf, tmp_path)
    ours = _ours(cfg, sd)
    assert ours.embed_scale == pytest.approx(TINY["d_model"] ** 0.5)
    ids, ctx = _ids(), _ctx()
    assert (ours(ids, context=ctx).logits - hf(input_ids=ids, encoder_hidden_states=ctx).logits).abs().max() <= ATOL
    ours.embed_scale = 1.0  # the scale matters
    assert (ours(ids, context=ctx).logits - hf(input_ids=ids, encoder_hidden_states=ctx).logits).abs().max() > 1e-2


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_padded_batch_parity(pair, side):
    # transformers 5 does not shift positions for padding: arange(past, past+T) + 2 for every row, left padding
    # included. We match that; compare at the real positions only.
    hf, ours, _, _ = pair
    ids, ctx = _ids(Bn=3, T=8), _ctx(Bn=3)
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
    assert torch.isfinite(out).all()
    assert (out[real] - ref[real]).abs().max() <= ATOL
    if side == "left":  # the mask matters: real tokens after left padding would otherwise see it
        assert (ours(ids, context=ctx).logits[real] - ref[real]).abs().max() > 1e-3


@torch.no_grad()
def test_explicit_positions_carry_the_offset(pair):
    _, ours, _, _ = pair
    ids, ctx = _ids(T=5), _ctx()
    full = ours(ids, context=ctx).logits
    assert torch.equal(ours(ids, context=ctx, position_ids=torch.arange(5)).logits, full)
    shifted = ours(ids, context=ctx, position_ids=torch.arange(3, 8)).logits
    assert (shifted - full).abs().max() > 1e-3


# ---- KV cache --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1]])
@torch.no_grad()
def test_kv_cache_matches_full_forward(pair, chunks):
    hf, ours, _, _ = pair
    ids, ctx = _ids(T=9), _ctx()
    full = ours(ids, context=ctx).logits
    assert (full - hf(input_ids=ids, encoder_hidden_states=ctx).logits).abs().max() <= ATOL
    cache = KVCache(num_layers=TINY["decoder_layers"], max_len=16)
    outs, start = [], 0
    for n in chunks:
        # context only on the first call: later calls read the cross K/V stored in the cache
        out = ours(ids[:, start:start + n], context=ctx if start == 0 else None, cache=cache)
        assert out.cache is cache
        outs.append(out.logits)
        start += n
    assert cache.length == 9 and all(kv is not None for kv in cache.cross)
    assert (torch.cat(outs, 1) - full).abs().max() <= ATOL


@torch.no_grad()
def test_kv_cache_with_left_padding(pair):
    _, ours, _, _ = pair
    ids, ctx = _ids(Bn=2, T=7), _ctx()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    full = ours(ids, context=ctx, attention_mask=mask).logits
    cache = KVCache(TINY["decoder_layers"], max_len=8)
    first = ours(ids[:, :4], context=ctx, attention_mask=mask[:, :4], cache=cache).logits
    rest = [ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits for t in range(4, 7)]
    real = mask.bool()
    assert (torch.cat([first, *rest], 1)[real] - full[real]).abs().max() <= ATOL


# ---- checkpoint layouts ----------------------------------------------------------------------------------


@torch.no_grad()
def test_bart_model_hub_layout(tmp_path, pair):
    # the hub `facebook/bart-*` file: BartModel, shared.weight + encoder.* + decoder.* without embed_tokens
    torch.manual_seed(6)
    hub = _perturb(transformers.BartModel(transformers.BartConfig(**TINY, **ENCODER)), 7).eval()
    cfg, sd = _save_hf(hub, tmp_path)
    assert "shared.weight" in sd and "decoder.embed_tokens.weight" not in sd and "lm_head.weight" not in sd
    encoder_keys = sorted(k for k in sd if k.startswith("encoder."))
    assert encoder_keys
    ours = _ours(cfg, sd, expect_unused=encoder_keys)
    assert torch.equal(ours.embed_tokens.weight, sd["shared.weight"])
    # the oracle: BartForCausalLM given the same decoder weights with embed_tokens (and the head) tied to shared
    hf = transformers.BartForCausalLM(_hf_config()).eval()
    dec_sd = {"model." + k: v for k, v in sd.items() if k.startswith("decoder.")}
    dec_sd["model.decoder.embed_tokens.weight"] = sd["shared.weight"]
    res = hf.load_state_dict(dec_sd, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) <= {"lm_head.weight"}
    assert torch.equal(hf.lm_head.weight, sd["shared.weight"])
    ids, ctx = _ids(), _ctx()
    ref = hf(input_ids=ids, encoder_hidden_states=ctx).logits
    assert (ours(ids, context=ctx).logits - ref).abs().max() <= ATOL
    # and BartModel's own decoder agrees (hidden states before the head)
    ref_h = hub.decoder(input_ids=ids, encoder_hidden_states=ctx).last_hidden_state
    assert (ours(ids, context=ctx).hidden_states - ref_h).abs().max() <= ATOL


def test_conditional_generation_layout(pair):
    # BartForConditionalGeneration: `model.` prefix and final_logits_bias; decoder.* under model.
    _, _, cfg, sd = pair
    cg = {"model." + k[len("model."):]: v for k, v in sd.items()}  # model.decoder.* stays
    cg["model.shared.weight"] = sd["model.decoder.embed_tokens.weight"]
    cg["model.encoder.layers.0.fc1.weight"] = torch.zeros(48, 32)
    cg["final_logits_bias"] = torch.zeros(1, 99)
    cg["model.decoder.version"] = torch.tensor(3.0)
    cg["lm_head.weight"] = sd["model.decoder.embed_tokens.weight"]  # .bin files carry the tied duplicate
    mapped, unused = B.state_dict_from_hf(cg, cfg)
    assert sorted(unused) == ["final_logits_bias", "model.decoder.version", "model.encoder.layers.0.fc1.weight"]
    assert set(mapped) == set(B.build_bart(B.BartConfig(**TINY)).state_dict())


@torch.no_grad()
def test_untied_lm_head(tmp_path):
    hf = _hf_causal(seed=8, tie_word_embeddings=False)
    cfg, sd = _save_hf(hf, tmp_path)
    assert "lm_head.weight" in sd
    ours = _ours(cfg, sd)
    assert ours.lm_head is not None
    ids = _ids()
    assert (ours(ids).logits - hf(input_ids=ids).logits).abs().max() <= ATOL


def test_state_dict_round_trip(pair):
    _, ours, cfg, sd = pair
    back = B.state_dict_to_hf(ours.state_dict(), cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    hf = transformers.BartForCausalLM(_hf_config())
    res = hf.load_state_dict(back, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) <= {"lm_head.weight"}
    with pytest.raises(CheckpointError, match="extra.weight"):
        B.state_dict_to_hf({**ours.state_dict(), "extra.weight": torch.zeros(1)}, cfg)


@torch.no_grad()
def test_export_loads_in_transformers(pair):
    # config_to_hf + state_dict_to_hf give a folder transformers' BartForCausalLM reads (default use_cache)
    _, ours, _, _ = pair
    values = B.BartConfig(**TINY, dropout=0.0).model_dump()
    hf_cfg = B.config_to_hf(values)
    assert hf_cfg["encoder_layers"] == TINY["decoder_layers"] and hf_cfg["model_type"] == "bart"
    assert B.config_from_hf(hf_cfg) == values
    hf = transformers.BartForCausalLM(transformers.BartConfig(**{k: v for k, v in hf_cfg.items() if k != "model_type"}))
    hf.load_state_dict(B.state_dict_to_hf(ours.state_dict(), hf_cfg), strict=False)
    hf.eval()
    ids, ctx = _ids(), _ctx()
    assert (hf(input_ids=ids, encoder_hidden_states=ctx).logits - ours(ids, context=ctx).logits).abs().max() <= ATOL


def test_shape_mismatch_raises(pair):
    _, _, cfg, sd = pair
    bad = dict(sd)
    bad["model.decoder.layers.1.fc1.weight"] = torch.zeros(32, 64)
    with pytest.raises(CheckpointError) as e:
        B.state_dict_from_hf(bad, cfg)
    assert "layers.1.fc1.weight" in str(e.value) and "(32, 64)" in str(e.value) and "(64, 32)" in str(e.value)
    bad = {"shared.weight": torch.zeros(98, 32)}
    with pytest.raises(CheckpointError, match="shared.weight"):
        B.state_dict_from_hf(bad, cfg)


def test_config_from_hf(pair):
    _, _, cfg, _ = pair
    kw = B.config_from_hf(cfg)
    assert {k: kw[k] for k in TINY} == TINY
    assert (kw["pad_token_id"], kw["bos_token_id"], kw["eos_token_id"], kw["decoder_start_token_id"]) == (1, 0, 2, 2)
    assert "encoder_layers" not in kw and B.BartConfig(**kw).activation_function == "gelu"
    with pytest.raises(ConfigError) as e:
        B.config_from_hf({**cfg, "normalize_before": True, "add_final_layer_norm": True,
                          "activation_function": "tanh"})
    msg = str(e.value)
    assert all(s in msg for s in ("normalize_before", "add_final_layer_norm", "'tanh'", "fix:"))


# ---- protocol, config and input validation ---------------------------------------------------------------


def test_native_cross_attention(pair):
    _, ours, _, _ = pair
    assert (ours.hidden_size, ours.vocab_size, ours.max_positions, ours.native_cross_attention) == (32, 99, 64, True)
    specs = ours.layer_specs()
    assert [s.index for s in specs] == [0, 1]
    assert all((s.width, s.heads, s.norm, s.eps) == (32, 4, "post", 1e-5) for s in specs)
    with pytest.raises(IncompatibleComponentsError, match="own cross-attention"):
        ours.install_cross_attention(0, torch.nn.Identity())
    k, v = ours.layers[0].encoder_attn.context_kv(_ctx())
    assert k.shape == v.shape == (2, 4, 5, 8)


def test_config_validation():
    with pytest.raises(ValidationError) as e:
        B.BartConfig(d_model=32, decoder_attention_heads=5)
    assert "decoder_attention_heads=5 does not divide d_model=32" in str(e.value) and "fix:" in str(e.value)
    with pytest.raises(ValidationError, match="pad_token_id=120 is outside"):
        B.BartConfig(**TINY, pad_token_id=120)
    with pytest.raises(ValidationError, match="activation_function"):
        B.BartConfig(activation_function="tanh")
    with pytest.raises(ValidationError, match="n_layer"):
        B.BartConfig(n_layer=2)
    c = B.BartConfig()
    assert (c.d_model, c.decoder_layers, c.vocab_size, c.max_position_embeddings) == (1024, 12, 50265, 1024)


def test_bad_inputs(pair):
    _, ours, _, _ = pair
    with pytest.raises(InputError, match=r"\[0, 98\].*99"):
        ours(torch.tensor([[1, 99]]))
    with pytest.raises(InputError, match="-1"):
        ours(torch.tensor([[-1, 3]]))
    with pytest.raises(InputError, match="exceeds max_position_embeddings=64"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    cache = KVCache(TINY["decoder_layers"], max_len=128)
    cache.length = 60
    with pytest.raises(InputError, match="exceeds max_position_embeddings=64"):
        ours(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(InputError, match="context width 16.*d_model=32"):
        ours(torch.zeros(1, 3, dtype=torch.long), context=torch.randn(1, 4, 16))
    with pytest.raises(InputError, match="attention_mask"):
        ours(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(InputError, match="position_ids"):
        ours(torch.zeros(1, 3, dtype=torch.long), position_ids=torch.tensor([62, 63, 64]))


def test_registration():
    calls = []
    B.register_decoders(lambda *a, **kw: calls.append((a, kw)))
    [(args, kw)] = calls
    name, builder, config_cls = args
    assert (name, config_cls, kw["aliases"]) == ("bart_decoder", B.BartConfig, ("bart",))
    assert isinstance(kw["hf"], HFInterop) and kw["hf"].model_types == ("bart",)
    model = builder(config_cls(**kw["tiny"]))
    assert isinstance(model, TextDecoder)
    assert model(torch.zeros(1, 2, dtype=torch.long)).logits.shape == (1, 2, kw["tiny"]["vocab_size"])
    assert torch.equal(model.embed_tokens.weight[1], torch.zeros(32))  # padding row, as transformers inits
    assert "lm_head.weight" not in model.state_dict()

"""The built-in cross-attention kinds: formulas, masks, precomputed K/V, the zero gate, registration."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

import transformers  # oracle for the post-norm (BERT) layout
from splice.adapters import cross_attention as X
from splice.core.interfaces import CrossAttention, CrossAttentionAdapter, LayerSpec

D, H, C = 16, 4, 12  # width, heads, context width


def _spec(norm="pre", **kw):
    return LayerSpec(index=0, width=D, heads=H, norm=norm, eps=1e-5, **kw)


def _randomise(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = 1.0 if name.lower().endswith("norm.weight") else 0.0  # LayerNorm gains near 1
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + scale)
    return m.eval()


def _reference(m, x, ctx, cmask=None):
    """Plain-math multi-head attention, no SDPA."""
    B, T, _ = x.shape
    hs = D // H
    q = m.q_proj(x).view(B, T, H, hs).transpose(1, 2)
    k = m.k_proj(ctx).view(B, -1, H, hs).transpose(1, 2)
    v = m.v_proj(ctx).view(B, -1, H, hs).transpose(1, 2)
    w = q @ k.transpose(-1, -2) / math.sqrt(hs)
    if cmask is not None:
        w = w.masked_fill(~cmask.bool()[:, None, None, :], float("-inf"))
    y = (w.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    return m.o_proj(y)


@pytest.mark.parametrize("norm", ["pre", "post"])
@torch.no_grad()
def test_standard_formula(norm):
    m = _randomise(X.StandardAdapter().build(_spec(norm), C))
    assert isinstance(m, CrossAttention) and m.norm_position == norm
    x, ctx = torch.randn(2, 3, D), torch.randn(2, 5, C)
    want = x + _reference(m, m.norm(x), ctx) if norm == "pre" else m.norm(x + _reference(m, x, ctx))
    assert (m(x, context=ctx) - want).abs().max() < 1e-5


@torch.no_grad()
def test_post_norm_matches_bert_cross_attention():
    cfg = transformers.BertConfig(hidden_size=D, num_attention_heads=H, layer_norm_eps=1e-12)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    bert = transformers.models.bert.modeling_bert.BertAttention(cfg, is_cross_attention=True).eval()
    _randomise(bert, seed=2)
    ours = X.StandardCrossAttention(D, H, D, norm="post", eps=1e-12).eval()
    sd = {"norm.weight": bert.output.LayerNorm.weight, "norm.bias": bert.output.LayerNorm.bias}
    for a, b in [("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")]:
        for p in ("weight", "bias"):
            sd[f"{a}.{p}"] = getattr(bert.self, b).state_dict()[p]
    sd.update({f"o_proj.{p}": t for p, t in bert.output.dense.state_dict().items()})
    ours.load_state_dict(sd, strict=True)
    x, ctx = torch.randn(2, 3, D), torch.randn(2, 6, D)
    cmask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0]])
    additive = (1.0 - cmask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    ref = bert(x, encoder_hidden_states=ctx, encoder_attention_mask=additive)[0]
    assert (ours(x, context=ctx, context_mask=cmask) - ref).abs().max() < 1e-5


@torch.no_grad()
def test_context_mask_hides_tokens():
    m = _randomise(X.StandardCrossAttention(D, H, C))
    x, ctx = torch.randn(2, 3, D), torch.randn(2, 5, C)
    cmask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = m(x, context=ctx, context_mask=cmask)
    ctx2 = ctx.clone()
    ctx2[0, 3:] = 100.0  # masked tokens: changing them changes nothing
    assert torch.equal(out, m(x, context=ctx2, context_mask=cmask))
    assert (out - _reference(m, m.norm(x), ctx, cmask) - x).abs().max() < 1e-5
    assert (out[0] - m(x, context=ctx)[0]).abs().max() > 1e-3


@torch.no_grad()
def test_precomputed_kv_equals_context():
    m = _randomise(X.StandardCrossAttention(D, H, C))
    x, ctx = torch.randn(2, 3, D), torch.randn(2, 5, C)
    k, v = m.context_kv(ctx)
    assert k.shape == v.shape == (2, H, 5, D // H)
    assert torch.equal(m(x, kv=(k, v)), m(x, context=ctx))
    assert torch.equal(m(x, context=torch.zeros_like(ctx), kv=(k, v)), m(x, context=ctx))  # kv wins


def test_shapes_and_names():
    m = X.StandardAdapter().build(_spec(bias=False, dropout=0.1), C)
    assert set(m.state_dict()) == {"norm.weight", "norm.bias", "q_proj.weight", "k_proj.weight",
                                   "v_proj.weight", "o_proj.weight"}
    assert m.k_proj.weight.shape == (D, C) and m.q_proj.weight.shape == (D, D) and m.context_width == C
    assert m.dropout_p == 0.1
    with pytest.raises(ValueError, match="divisible"):
        X.StandardCrossAttention(10, 4, C)


@torch.no_grad()
def test_gated_is_identity_at_init_then_learns():
    m = X.GatedAdapter().build(_spec("post"), C)  # always pre-norm, whatever the family
    assert m.norm_position == "pre" and m.gate.shape == () and m.gate.item() == 0.0
    x, ctx = torch.randn(2, 3, D), torch.randn(2, 5, C)
    assert torch.equal(m(x, context=ctx), x)
    m.gate.fill_(0.7)
    want = x + math.tanh(0.7) * _reference(m, m.norm(x), ctx)
    assert (m(x, context=ctx) - want).abs().max() < 1e-5
    assert X.build_gated(X.GatedConfig(init_gate=0.3)).build(_spec(), C).gate.item() == pytest.approx(0.3)


def test_gate_gets_gradient():
    m = X.GatedAdapter().build(_spec(), C)
    m(torch.randn(2, 3, D), context=torch.randn(2, 5, C)).pow(2).sum().backward()
    assert m.gate.grad is not None and m.gate.grad.abs() > 0  # d tanh/d gate = 1 at 0


def test_registration_and_configs():
    calls = {}
    X.register_adapters(lambda name, builder, cfg, **kw: calls.setdefault(name, (builder, cfg, kw)))
    assert set(calls) == {"standard", "gated"}
    for name, (builder, cfg, kw) in calls.items():
        adapter = builder(cfg(**kw["tiny"]))
        assert isinstance(adapter, CrossAttentionAdapter) and kw["description"]
        assert isinstance(adapter.build(_spec(), C), CrossAttention)
    assert isinstance(calls["standard"][0](X.StandardConfig()), X.StandardAdapter)
    with pytest.raises(ValidationError):
        X.StandardConfig(gate=1)
    with pytest.raises(ValidationError):
        X.GatedConfig(init_gate=float("inf"))
    with pytest.raises(ValidationError):
        X.GatedConfig(init=0.0)

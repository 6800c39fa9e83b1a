"""LLaMA as a native splice decoder: config, blocks, model, and the transformers checkpoint mapping.

The decoder of transformers' ``LlamaForCausalLM`` (LLaMA 1-3, TinyLlama, Vicuna, the language model of LLaVA and
VipLlava): pre-norm layers with RMSNorm, rotary positions (``rope_theta``, scaled as ``rope_scaling`` says:
``default``, ``linear``, ``dynamic`` or ``llama3``, computed as transformers 5's ``ROPE_INIT_FUNCTIONS``),
grouped-query attention (``num_key_value_heads`` K/V heads shared by the query heads; the ``KVCache`` stores only
those), a SwiGLU MLP (``down(act(gate(x)) * up(x))``), optional ``attention_bias`` / ``mlp_bias``, an explicit
``head_dim``, and a tied or untied head.

LLaMA has no cross-attention: each layer has an empty ``crossattention`` slot that an adapter fills (``standard``,
``gated``), placed after the self-attention; ``layer_specs`` reports ``norm_kind="rms"`` so the adapter normalises
as the family does. ``forward`` also takes ``inputs_embeds`` (B, T, D) instead of ids (the prefix-LM kind splices
image features into the prompt's embeddings, from ``embed_tokens``) and ``position_ids``; without position ids,
an ``attention_mask`` sets them as transformers' ``generate`` does (``cumsum(mask) - 1``), so left-padded prompts
give transformers' logits.

Layout (module state-dict names; transformers' minus the ``model.`` prefix, the head unprefixed)::

    embed_tokens.weight (V, D)   norm.weight (D,)   [lm_head.weight (V, D) only when untied]
    layers.N.input_layernorm.weight (D,)            layers.N.post_attention_layernorm.weight (D,)
    layers.N.self_attn.q_proj.{weight (H * hd, D), [bias]}   self_attn.{k,v}_proj.{weight (KV * hd, D), [bias]}
    layers.N.self_attn.o_proj.{weight (D, H * hd), [bias]}
    layers.N.mlp.{gate,up}_proj.{weight (I, D), [bias]}      layers.N.mlp.down_proj.{weight (D, I), [bias]}
    layers.N.crossattention.*   the module an adapter installed (empty by default; transformers has no equivalent)
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from splice import hookimpl
from splice.core.cache import context_kv
from splice.core.errors import ConfigError, InputError, Problem
from splice.core.interfaces import DecoderOutput, HFInterop, LayerSpec
from splice.core.kernels import Linear, linear
from splice.core.keymap import DUPLICATE, Row, from_hf, to_hf
from splice.plugins._shared import ACTIVATION_FNS, DecoderConfig, NativeDecoder, causal_mask, normal_init
from splice.plugins._shared import Eps, FFNWidth, Heads, InitStd, Layers, Positions, Probability, TokenId, Vocab, Width
from splice.plugins._shared import bounded_int, bounded_real

__all__ = [
    "LlamaConfig", "RopeScaling", "LlamaDecoder", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "RMSNorm",
    "rope_inv_freq", "build_llama", "config_from_hf", "config_to_hf", "state_dict_from_hf", "state_dict_to_hf", "HF",
    "TINY",
]

Activation = Literal["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]
ACTIVATIONS: tuple[str, ...] = Activation.__args__
RopeType = Literal["default", "linear", "dynamic", "llama3"]
ROPE_TYPES: tuple[str, ...] = RopeType.__args__

TINY: dict[str, Any] = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

HeadDim = bounded_int(2, 1024, "released LLaMA-family models use 64 to 256")
Theta = bounded_real(1, 1e9, "the rotary base; LLaMA 3 uses 500000", lo_open=True)
Factor = bounded_real(1, 1e4, "a context-extension factor (transformers expects >= 1)")
FreqFactor = bounded_real(0, 1e4, "LLaMA 3.1 uses low_freq_factor 1 and high_freq_factor 4", lo_open=True)


# ---- config -----------------------------------------------------------------------------------------------


class RopeScaling(BaseModel):
    """transformers' ``rope_scaling`` (4.x) / ``rope_parameters`` (5.x) for the rotary types splice implements.

    ``linear`` divides the frequencies by ``factor``; ``dynamic`` (NTK) raises the base once a sequence outgrows
    ``max_position_embeddings``; ``llama3`` (LLaMA 3.1) divides the low frequencies by ``factor`` and blends the
    middle ones, using ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings``.
    """

    model_config = ConfigDict(extra="forbid")

    rope_type: RopeType = "default"
    factor: Factor | None = None
    low_freq_factor: FreqFactor | None = None
    high_freq_factor: FreqFactor | None = None
    original_max_position_embeddings: Positions | None = Field(
        None, description="llama3: the pretraining context; None: max_position_embeddings (as transformers)")

    @model_validator(mode="before")
    @classmethod
    def _legacy_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and "type" in data:  # transformers 4.x configs spell rope_type "type"
            data = dict(data)
            data.setdefault("rope_type", data.pop("type"))
        return data

    @model_validator(mode="after")
    def _parameters_of_the_type(self) -> "RopeScaling":
        needed = {"linear": ("factor",), "dynamic": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(self.rope_type, ())
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"rope_type={self.rope_type!r} needs {missing}; expected e.g. "
                             f"{_ROPE_EXAMPLES[self.rope_type]}; fix: add {', '.join(missing)} to rope_scaling")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor={self.high_freq_factor} <= low_freq_factor={self.low_freq_factor}; "
                             "expected high_freq_factor > low_freq_factor (LLaMA 3.1: 4 and 1); fix: swap or "
                             "correct them")
        return self


_ROPE_EXAMPLES = {"linear": "{rope_type: linear, factor: 2.0}", "dynamic": "{rope_type: dynamic, factor: 2.0}",
                  "llama3": "{rope_type: llama3, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, "
                            "original_max_position_embeddings: 8192}"}


class LlamaConfig(DecoderConfig):
    """LLaMA's hyper-parameters, named and defaulted as in transformers' ``LlamaConfig`` (the rotary settings as
    ``rope_theta`` and ``rope_scaling``, the names transformers 4 wrote and 5 still reads)."""

    vocab_size: Vocab = 32000
    hidden_size: Width = Field(4096, description="hidden width D")
    intermediate_size: FFNWidth = Field(11008, description="SwiGLU width I")
    num_hidden_layers: Layers = 32
    num_attention_heads: Heads = Field(32, description="query heads H")
    num_key_value_heads: Heads | None = Field(None, description="K/V heads (grouped-query); None: one per query head")
    head_dim: HeadDim | None = Field(None, description="per-head width; None: hidden_size // num_attention_heads")
    hidden_act: Activation = "silu"
    max_position_embeddings: Positions = Field(2048, description="longest sequence (past + new tokens)")
    initializer_range: InitStd = 0.02
    rms_norm_eps: Eps = 1e-6
    pad_token_id: TokenId | None = None
    bos_token_id: TokenId | None = 1
    eos_token_id: TokenId | list[TokenId] | None = 2
    tie_word_embeddings: bool = False
    rope_theta: Theta = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    attention_dropout: Probability = 0.0
    mlp_bias: bool = False

    width_and_heads = ("hidden_size", "num_attention_heads")

    @model_validator(mode="after")
    def _heads_and_ids(self) -> "LlamaConfig":
        kv, heads = self.num_key_value_heads, self.num_attention_heads
        if kv is not None and heads % kv:
            divisors = [h for h in range(1, heads + 1) if heads % h == 0]
            raise ValueError(f"num_key_value_heads={kv} does not divide num_attention_heads={heads}; expected a "
                             f"divisor (each K/V head serves a group of query heads); fix: pick one of {divisors}")
        head_dim = self.head_dim or self.hidden_size // heads
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} is odd; expected an even head size (rotary positions turn pairs "
                             "of dimensions); fix: set head_dim, or hidden_size / num_attention_heads, to an even "
                             "number")
        if head_dim == 2 and self.rope_scaling is not None and self.rope_scaling.rope_type == "dynamic":
            raise ValueError("head_dim=2 with rope_type='dynamic'; expected head_dim >= 4 (dynamic scaling raises "
                             "the base to the power head_dim / (head_dim - 2)); fix: widen the heads")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} is outside the vocabulary (vocab_size="
                             f"{self.vocab_size}); expected an id < vocab_size; fix: correct it or set it to null")
        return self


# ---- rotary positions -------------------------------------------------------------------------------------


def _inverse_frequencies(base: float | Tensor, dim: int, device=None) -> Tensor:
    """``1 / base ** (2i / dim)`` for i < dim / 2, in float32 as transformers computes it: (dim/2,)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def _llama3(inv_freq: Tensor, factor: float, low: float, high: float, old_context: int) -> Tensor:
    """LLaMA 3.1's scaling (transformers' ``_compute_llama3_parameters``): long wavelengths divided by ``factor``,
    short ones kept, the band between blended smoothly."""
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq  # (dim/2,)
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int,
                  seq_len: Tensor | None = None) -> Tensor:
    """The rotary inverse frequencies (head_dim/2,) for a sequence of ``seq_len`` positions (``dynamic`` only
    depends on it: a 0-d int64 tensor, the largest position + 1), as transformers 5's ``ROPE_INIT_FUNCTIONS``.
    The attention factor of these four types is 1."""
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":  # transformers' compute_default_rope_parameters: a float arange
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    factor = scaling["factor"]
    if kind == "linear":
        return _inverse_frequencies(theta, head_dim) / factor
    if kind == "dynamic":
        if seq_len is None or int(seq_len) <= max_position_embeddings:
            return _inverse_frequencies(theta, head_dim)
        # float32 tensor arithmetic, as transformers does with the tensor seq_len of a forward
        base = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return _inverse_frequencies(base, head_dim, seq_len.device)
    old_context = scaling.get("original_max_position_embeddings") or max_position_embeddings
    return _llama3(_inverse_frequencies(theta, head_dim), factor, scaling["low_freq_factor"],
                   scaling["high_freq_factor"], old_context)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` (B, nh, T, hs) with cos/sin (B, 1, T, hs): the two halves turned as pairs."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (B, nh, T, hs)


# ---- blocks -----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """transformers' ``LlamaRMSNorm``: normalised in float32, cast back, then scaled."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., D)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class LlamaAttention(nn.Module):
    """Causal self-attention with rotary positions and ``kv_heads`` key/value heads shared by ``heads`` queries."""

    def __init__(self, index: int, width: int, heads: int, kv_heads: int, head_dim: int, bias: bool, dropout: float):
        super().__init__()
        self.index, self.heads, self.kv_heads, self.head_dim = index, heads, kv_heads, head_dim
        self.dropout_p = dropout
        self.q_proj = Linear(width, heads * head_dim, bias=bias)
        self.k_proj = Linear(width, kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(width, kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(heads * head_dim, width, bias=bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, is_causal: bool, cache: Any) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.index, k, v)  # (B, nkv, L, hs): the cache keeps the K/V heads only
        if self.kv_heads != self.heads:  # each K/V head serves heads // kv_heads consecutive query heads
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)  # (B, nh, L, hs)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.head_dim ** -0.5,
                                           dropout_p=self.dropout_p if self.training else 0.0)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))  # (B, T, D)


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, width: int, inner: int, activation: str, bias: bool):
        super().__init__()
        self.gate_proj = Linear(width, inner, bias=bias)
        self.up_proj = Linear(width, inner, bias=bias)
        self.down_proj = Linear(inner, width, bias=bias)
        self.act = ACTIVATION_FNS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # (B, T, D)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm layer: self-attention, then the cross-attention slot (when filled), then the MLP."""

    def __init__(self, index: int, width: int, heads: int, kv_heads: int, head_dim: int, inner: int, activation: str,
                 eps: float, attention_bias: bool, mlp_bias: bool, attention_dropout: float):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(width, eps)
        self.self_attn = LlamaAttention(index, width, heads, kv_heads, head_dim, attention_bias, attention_dropout)
        # the slot an adapter fills; a registered child, so its parameters are layers.N.crossattention.*
        self.register_module("crossattention", None)
        self.post_attention_layernorm = RMSNorm(width, eps)
        self.mlp = LlamaMLP(width, inner, activation, mlp_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, is_causal: bool,
                context: Tensor | None, context_mask: Tensor | None, cache: Any) -> Tensor:
        """``x`` (B, T, D); ``rope`` the (cos, sin) of the positions; the mask as ``NativeDecoder`` describes it."""
        x = x + self.self_attn(self.input_layernorm(x), *rope, mask, is_causal, cache)  # (B, T, D)
        x = self.cross_attend(x, context, context_mask, cache)  # (B, T, D)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, D)

    def cross_attend(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None, cache: Any) -> Tensor:
        """The slot's module, when an adapter filled it and there is a context (given, or kept in the cache)."""
        if self.crossattention is None:
            return x
        kv = context_kv(self.crossattention, context, cache, self.index)  # each (B, nh, N, hs) or None
        if kv is None and context is None:
            return x
        return self.crossattention(x, context=context, context_mask=context_mask, kv=kv)  # (B, T, D)


# ---- model ------------------------------------------------------------------------------------------------


class LlamaDecoder(NativeDecoder):
    """LLaMA language model with one empty cross-attention slot per layer (``TextDecoder``)."""

    family = "LLaMA"
    norm_position = "pre"
    positions_name = "max_position_embeddings"

    def __init__(
        self, vocab_size: int = 32000, hidden_size: int = 4096, intermediate_size: int = 11008,
        num_hidden_layers: int = 32, num_attention_heads: int = 32, num_key_value_heads: int | None = None,
        head_dim: int | None = None, hidden_act: str = "silu", max_position_embeddings: int = 2048,
        initializer_range: float = 0.02, rms_norm_eps: float = 1e-6, pad_token_id: int | None = None,
        bos_token_id: int | None = 1, eos_token_id: int | list[int] | None = 2, tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0, rope_scaling: dict | None = None, attention_bias: bool = False,
        attention_dropout: float = 0.0, mlp_bias: bool = False,
    ):
        scaling = None if not rope_scaling or rope_scaling.get("rope_type") == "default" else dict(rope_scaling)
        # dynamic NTK scaling exists to read past max_position_embeddings: up to factor times as far
        dynamic = scaling is not None and scaling["rope_type"] == "dynamic"
        longest = int(max_position_embeddings * scaling["factor"]) if dynamic else max_position_embeddings
        super().__init__(hidden_size=hidden_size, vocab_size=vocab_size, n_head=num_attention_heads,
                         max_positions=longest, eps=rms_norm_eps, attn_dropout=attention_dropout)
        kv_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.num_key_value_heads = kv_heads
        self.initializer_range, self.tie_word_embeddings = initializer_range, tie_word_embeddings
        self.attention_bias = attention_bias
        self.rope_theta, self.rope_scaling, self.max_position_embeddings = rope_theta, scaling, max_position_embeddings
        self.token_ids = dict(pad=pad_token_id, bos=bos_token_id, eos=eos_token_id)

        self.embed_tokens = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(i, hidden_size, num_attention_heads, kv_heads, self.head_dim, intermediate_size,
                              hidden_act, rms_norm_eps, attention_bias, mlp_bias, attention_dropout)
            for i in range(num_hidden_layers)
        )
        self.norm = RMSNorm(hidden_size, rms_norm_eps)
        self.lm_head = None if tie_word_embeddings else Linear(hidden_size, vocab_size, bias=False)
        # float32 whatever the model's dtype; not saved (recomputed from the config)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.reset_parameters()

    def _inv_freq(self, seq_len: Tensor | None = None) -> Tensor:
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling, self.max_position_embeddings, seq_len)

    def init_non_persistent_buffers(self) -> None:
        self.inv_freq = self._inv_freq().to(self.embed_tokens.weight.device)

    def reset_parameters(self) -> None:
        """transformers' init: N(0, initializer_range) weights, zero biases and padding row, unit RMSNorm weights."""
        normal_init(self, self.initializer_range)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.reset_parameters()

    # -- the TextDecoder slot protocol --

    def layer_specs(self) -> list[LayerSpec]:
        """Pre-norm RMSNorm layers; an adapter's projections carry biases when the family's attention does."""
        return [
            LayerSpec(index=i, width=self.hidden_size, heads=self.n_head, norm="pre", eps=self.eps,
                      bias=self.attention_bias, dropout=self.attn_dropout, norm_kind="rms")
            for i in range(len(self.layers))
        ]

    # -- forward --

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin) of the positions (B, T) or (T,), each (B or 1, 1, T, hs), as ``LlamaRotaryEmbedding``."""
        pos = position_ids if position_ids.dim() == 2 else position_ids[None]  # (B, T)
        inv_freq = self.inv_freq  # (hs/2,) float32, recomputed if a cast of the model (.half()) rounded it
        if inv_freq.dtype != torch.float32:
            inv_freq = self._inv_freq().to(pos.device)
        if self.rope_scaling is not None and self.rope_scaling["rope_type"] == "dynamic" and pos.numel():
            inv_freq = self._inv_freq(pos.max() + 1).to(pos.device)  # transformers: the batch's largest position
        freqs = pos[..., None].float() * inv_freq.float()  # (B, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # each (B, 1, T, hs)

    def positions_from(self, attention_mask: Tensor | None, past: int, T: int, device) -> Tensor:
        """Position ids of the T new tokens: ``past, past+1, ...`` without a mask; with one, the count of real
        tokens before each (transformers' generate: ``cumsum(mask) - 1``, padding at 0), so left padding does not
        shift a row's positions."""
        if attention_mask is None:
            return torch.arange(past, past + T, device=device)  # (T,)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)

    def forward(
        self,
        input_ids: Tensor | None = None,  # (B, T)
        context: Tensor | None = None,  # (B, N, D_ctx)
        context_mask: Tensor | None = None,  # (B, N) 1 = attend
        attention_mask: Tensor | None = None,  # (B, L) 1 = real token, covers past + new
        cache: Any = None,  # splice.core.cache.KVCache
        position_ids: Tensor | None = None,  # (B, T) or (T,)
        inputs_embeds: Tensor | None = None,  # (B, T, D) instead of input_ids
    ) -> DecoderOutput:
        past = cache.length if cache is not None else 0
        ids = self._ids_to_check(input_ids, inputs_embeds)  # (B, T)
        self._check_inputs(ids, context, context_mask, attention_mask, cache, position_ids, past)
        B, T = ids.shape
        if position_ids is not None and tuple(position_ids.shape) not in ((T,), (B, T)):
            raise InputError(f"position_ids must have shape (B, T) = {(B, T)} or (T,); given "
                             f"{tuple(position_ids.shape)}; fix: one position per new token")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        if position_ids is None:
            position_ids = self.positions_from(attention_mask, past, T, x.device)  # (T,) or (B, T)
        rope = self.rope(position_ids.to(x.device), x.dtype)  # each (B or 1, 1, T, hs)
        mask, is_causal = causal_mask(attention_mask, past, T, x.device)
        for layer in self.layers:
            x = layer(x, rope, mask, is_causal, context, context_mask, cache)  # (B, T, D)
        x = self.norm(x)  # (B, T, D)
        logits = linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)  # (B, T, V)
        if cache is not None:
            cache.advance(T)
        return DecoderOutput(logits=logits, cache=cache, hidden_states=x)

    def _ids_to_check(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        """The ids for ``NativeDecoder._check_inputs``: ``input_ids``, or for embeddings a meta stand-in of their
        (B, T) (shapes only: no value to check); either one, never both."""
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError(
                f"{self.family}: pass input_ids (B, T) or inputs_embeds (B, T, {self.hidden_size}), exactly one; "
                f"given {'both' if input_ids is not None else 'neither'}; fix: "
                f"{'drop one of them' if input_ids is not None else 'pass the token ids or their embeddings'}"
            )
        if inputs_embeds is None:
            return input_ids
        E = inputs_embeds
        if E.dim() != 3 or E.shape[-1] != self.hidden_size or not E.is_floating_point():
            raise InputError(
                f"inputs_embeds must be floating-point of shape (B, T, {self.hidden_size}); given dtype "
                f"{inputs_embeds.dtype}, shape {tuple(inputs_embeds.shape)}; fix: pass embeddings as wide as "
                f"hidden_size (decoder.embed_tokens(ids) gives them for token ids)"
            )
        return torch.empty(inputs_embeds.shape[:2], dtype=torch.long, device="meta")  # (B, T)


def build_llama(config: LlamaConfig) -> LlamaDecoder:
    return LlamaDecoder(**config.model_dump())


# ---- transformers interop ---------------------------------------------------------------------------------

_UNSUPPORTED_ROPE_FIX = ("use a checkpoint with rope_type default, linear, dynamic or llama3, or register a decoder "
                         "plugin that implements this rotary type")


def _rope_from_hf(hf: dict) -> tuple[dict, list[Problem]]:
    """``rope_theta`` and ``rope_scaling`` kwargs from transformers 5's ``rope_parameters`` or 4.x's
    ``rope_scaling`` + ``rope_theta`` (and the older ``type`` spelling)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    problems = []
    if kind not in ROPE_TYPES:
        problems.append(Problem("rope_scaling.rope_type", "a rotary type splice's LLaMA does not implement",
                                given=kind, expected=f"one of {list(ROPE_TYPES)}", fix=_UNSUPPORTED_ROPE_FIX))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(Problem("rope_scaling.partial_rotary_factor", "LLaMA turns whole heads",
                                given=params["partial_rotary_factor"], expected="1.0", fix=_UNSUPPORTED_ROPE_FIX))
    params.pop("partial_rotary_factor", None)
    if problems or kind == "default":
        return {"rope_theta": theta, "rope_scaling": None}, problems
    known = {k: v for k, v in params.items() if k in RopeScaling.model_fields and v is not None}
    return {"rope_theta": theta, "rope_scaling": {"rope_type": kind, **known}}, problems


def config_from_hf(hf: dict) -> dict:
    """A transformers LLaMA ``config.json`` (dict) -> ``LlamaConfig`` keyword arguments; keys we don't model drop
    (``pretraining_tp``, which transformers 5 ignores too)."""
    rope, problems = _rope_from_hf(hf)
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        problems.append(Problem(
            "hidden_act", "unknown activation", given=act, expected=f"one of {list(ACTIVATIONS)}",
            fix="use a supported activation or register a decoder plugin that implements it",
        ))
    if problems:
        raise ConfigError(problems, source="transformers LLaMA config")
    kwargs = {k: hf[k] for k in LlamaConfig.model_fields if k in hf and k not in rope}
    for key in ("initializer_range", "attention_dropout"):  # null in some files: the default
        if kwargs.get(key) is None:
            kwargs.pop(key, None)
    if rope["rope_scaling"] is not None:
        rope["rope_scaling"] = RopeScaling(**rope["rope_scaling"]).model_dump()
    return {**kwargs, **rope}


def config_to_hf(values: dict) -> dict:
    """``LlamaConfig`` values -> a transformers 5 LLaMA config dict (``rope_parameters`` holds theta and scaling)."""
    out = {k: v for k, v in values.items() if k not in ("rope_theta", "rope_scaling")}
    scaling = {k: v for k, v in (values.get("rope_scaling") or {}).items() if v is not None}
    out["rope_parameters"] = {"rope_type": "default", **scaling, "rope_theta": values.get("rope_theta", 10000.0)}
    return {"model_type": "llama", **out}


def _sizes(hf: dict) -> dict[str, Any]:
    """The config values that shape the tensors, transformers' defaults where the config leaves one out."""
    D, H = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    return dict(vocab_size=hf.get("vocab_size", 32000), hidden_size=D,
                intermediate_size=hf.get("intermediate_size", 11008),
                num_attention_heads=H, num_key_value_heads=hf.get("num_key_value_heads") or H,
                head_dim=hf.get("head_dim") or D // H, num_hidden_layers=hf.get("num_hidden_layers", 32))


def _table(hf: dict) -> list[Row]:
    """Every tensor, copied as is under the same name (``model.`` removed on disk), with its shape."""
    s = _sizes(hf)
    V, D, I, hd = s["vocab_size"], s["hidden_size"], s["intermediate_size"], s["head_dim"]
    Q, KV = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (V, D), "norm.weight": (D,)}
    if not hf.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, D)
    layer = {"self_attn.q_proj": (Q, D), "self_attn.k_proj": (KV, D), "self_attn.v_proj": (KV, D),
             "self_attn.o_proj": (D, Q), "mlp.gate_proj": (I, D), "mlp.up_proj": (I, D), "mlp.down_proj": (D, I)}
    for n in range(s["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"layers.{n}.{norm}.weight"] = (D,)
        for name, shape in layer.items():
            shapes[f"layers.{n}.{name}.weight"] = shape
            if hf.get("attention_bias" if name.startswith("self_attn") else "mlp_bias", False):
                shapes[f"layers.{n}.{name}.bias"] = shape[:1]
    return [Row(name, name, shape) for name, shape in shapes.items()]


_HEAD = "lm_head.weight"  # unprefixed on disk, beside ``model.*``


def state_dict_from_hf(sd: dict[str, Tensor], hf_config: dict) -> tuple[dict[str, Tensor], list[str]]:
    """transformers LLaMA tensors (``LlamaForCausalLM``, or ``LlamaModel`` without ``model.``) -> (ours, unused keys).
    A tied ``lm_head.weight`` (``.bin`` files carry it) is the embedding again and is passed over."""
    tied = hf_config.get("tie_word_embeddings", False)

    def name_of(key: str) -> str:
        return (DUPLICATE if tied else key) if key == _HEAD else key.removeprefix("model.")

    return from_hf(sd, _table(hf_config), name_of, str(_sizes(hf_config)))


def state_dict_to_hf(sd: dict[str, Tensor], hf_config: dict) -> dict[str, Tensor]:
    """Ours -> ``LlamaForCausalLM`` on-disk names (``model.`` prefix; the head only when untied). A cross-attention
    an adapter installed has no place there: transformers' LLaMA has none."""
    fix = ("transformers' LlamaForCausalLM has no cross-attention, so a LLaMA with adapters (and any "
           "VisionEncoderDecoder folder with a LLaMA decoder) cannot be exported; save in splice format")
    return to_hf(sd, _table(hf_config), lambda name: name if name == _HEAD else f"model.{name}",
                 layout="LlamaForCausalLM", required=True, fix=fix)


HF = HFInterop(
    model_types=("llama",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    state_dict_from_hf=state_dict_from_hf, state_dict_to_hf=state_dict_to_hf,
    ignorable=(r"(?:model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),  # transformers 4.3x .bin buffers
)


DESCRIPTION = ("LLaMA (Meta; also TinyLlama, Vicuna, LLaVA's LM): RMSNorm, rotary positions with scaling, "
               "grouped-query attention, SwiGLU; cross-attention through adapters")


@hookimpl
def register_decoders(register):
    register("llama", build_llama, LlamaConfig, tiny=dict(TINY), hf=HF, description=DESCRIPTION)

"""BART's decoder as a native splice decoder: config, blocks, model, and the transformers checkpoint mapping.

The decoder of transformers' ``BartForCausalLM``: post-norm layers with their own (native) cross-attention, so
adapters do not apply (``native_cross_attention = True``).

Layout (module state-dict names; the same as transformers' minus the ``model.decoder.`` prefix)::

    embed_tokens.weight (V, D)   embed_positions.weight (P + 2, D)   layernorm_embedding.{weight,bias}
    layers.N.self_attn.{q_proj,k_proj,v_proj,out_proj}.*     layers.N.self_attn_layer_norm.*
    layers.N.encoder_attn.{q_proj,k_proj,v_proj,out_proj}.*  layers.N.encoder_attn_layer_norm.*
    layers.N.fc1.{weight (F, D), bias}   layers.N.fc2.{weight (D, F), bias}   layers.N.final_layer_norm.*
    [lm_head.weight (V, D) only when untied]

Two BART quirks: positions are looked up at ``position + 2`` (the table has ``max_position_embeddings + 2``
rows, a fairseq leftover), and with ``scale_embedding`` the token embeddings are multiplied by ``sqrt(d_model)``
(the tied LM head uses the unscaled matrix). There is no final layer norm (mBART's pre-norm layout is not BART).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from splice import hookimpl
from splice.core.errors import CheckpointError, ConfigError, IncompatibleComponentsError, InputError, Problem
from splice.core.interfaces import DecoderOutput, HFInterop, LayerSpec

__all__ = [
    "BartConfig",
    "BartDecoder",
    "BartDecoderLayer",
    "BartSelfAttention",
    "BartCrossAttention",
    "build_bart",
    "config_from_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "config_to_hf",
    "HF",
    "TINY",
    "POSITION_OFFSET",
]

Activation = Literal["gelu", "relu", "gelu_new", "silu"]
ACTIVATIONS: tuple[str, ...] = Activation.__args__
POSITION_OFFSET = 2  # BART looks positions up at ``position + 2``
LAYER_NORM_EPS = 1e-5  # BART's LayerNorms use torch's default; transformers has no config field for it

TINY: dict[str, Any] = dict(
    vocab_size=99, max_position_embeddings=64, d_model=32, decoder_layers=2, decoder_attention_heads=4,
    decoder_ffn_dim=64,
)


# ---- config -----------------------------------------------------------------------------------------------


class BartConfig(BaseModel):
    """BART's decoder hyper-parameters, named and defaulted as in transformers' ``BartConfig`` (bart-large)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(50265, gt=0)
    max_position_embeddings: int = Field(1024, gt=0, description="longest sequence (past + new tokens)")
    d_model: int = Field(1024, gt=0, description="hidden width D, also the cross-attention context width")
    decoder_layers: int = Field(12, gt=0)
    decoder_attention_heads: int = Field(16, gt=0)
    decoder_ffn_dim: int = Field(4096, gt=0)
    activation_function: Activation = "gelu"
    scale_embedding: bool = Field(False, description="multiply token embeddings by sqrt(d_model)")
    dropout: float = Field(0.1, ge=0, lt=1)
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    activation_dropout: float = Field(0.0, ge=0, lt=1)
    decoder_layerdrop: float = Field(0.0, ge=0, lt=1)
    init_std: float = Field(0.02, ge=0)
    tie_word_embeddings: bool = True
    pad_token_id: int | None = Field(1, ge=0)
    bos_token_id: int | None = Field(0, ge=0)
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = Field(2, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "BartConfig":
        if self.d_model % self.decoder_attention_heads:
            divisors = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
            raise ValueError(
                f"decoder_attention_heads={self.decoder_attention_heads} does not divide d_model={self.d_model}; "
                f"expected d_model % decoder_attention_heads == 0; fix: pick decoder_attention_heads among "
                f"{divisors} or change d_model to a multiple of {self.decoder_attention_heads}"
            )
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for name, ids in (("pad_token_id", [self.pad_token_id]), ("bos_token_id", [self.bos_token_id]),
                          ("eos_token_id", eos), ("decoder_start_token_id", [self.decoder_start_token_id])):
            bad = [i for i in ids if i is not None and not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is outside the vocabulary; expected ids in "
                    f"[0, {self.vocab_size - 1}] (vocab_size={self.vocab_size}); fix: set {name} to an id of the "
                    f"tokenizer, or grow vocab_size"
                )
        return self


# ---- blocks -----------------------------------------------------------------------------------------------


def _activation(name: str):
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[name]


class _Attention(nn.Module):
    """Multi-head attention weights in BART's layout; queries scaled by ``head_dim ** -0.5`` as BART does."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_size = heads, d_model // heads
        self.scaling = self.head_size**-0.5
        self.dropout_p = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        B, _, T, _ = q.shape
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling,
            dropout_p=self.dropout_p if self.training else 0.0,
        )  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class BartSelfAttention(_Attention):
    """Causal self-attention; keys/values go through the ``KVCache`` when one is given."""

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, cache: Any, layer: int) -> Tensor:
        q = self._split(self.q_proj(x))  # (B, nh, T, hs)
        k = self._split(self.k_proj(x))  # (B, nh, T, hs)
        v = self._split(self.v_proj(x))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, L, hs)
        return self._attend(q, k, v, mask, is_causal)  # (B, T, D)


class BartCrossAttention(_Attention):
    """BART's native cross-attention (``encoder_attn``); the context has width ``d_model``.

    Unlike an adapter's module, ``forward`` returns the attention output only: the layer adds the residual and
    applies ``encoder_attn_layer_norm`` (kept beside it, as in transformers' names).
    """

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__(d_model, heads, dropout)
        self.context_width = d_model

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Project the context once (generation keeps it in ``KVCache.cross``): each (B, nh, N, hs)."""
        return self._split(self.k_proj(context)), self._split(self.v_proj(context))

    def forward(
        self,
        x: Tensor,  # (B, T, D)
        context: Tensor | None = None,  # (B, N, D); ignored when kv is given
        context_mask: Tensor | None = None,  # (B, N) 1 = attend
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        k, v = kv if kv is not None else self.context_kv(context)  # each (B, nh, N, hs)
        mask = None if context_mask is None else context_mask[:, None, None, :].bool()  # (B, 1, 1, N)
        return self._attend(self._split(self.q_proj(x)), k, v, mask, False)  # (B, T, D)


class BartDecoderLayer(nn.Module):
    """Post-norm layer: self-attention, cross-attention (skipped without context), feed-forward."""

    def __init__(self, index: int, d_model: int, heads: int, ffn_dim: int, activation: str, dropout: float,
                 attention_dropout: float, activation_dropout: float):
        super().__init__()
        self.index = index
        self.self_attn = BartSelfAttention(d_model, heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.encoder_attn = BartCrossAttention(d_model, heads, attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.act = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(
        self,
        x: Tensor,  # (B, T, D)
        mask: Tensor | None,  # (B, 1, T, L) / (T, L) bool, True = attend; None with is_causal or one new token
        is_causal: bool,
        context: Tensor | None,  # (B, N, D)
        context_mask: Tensor | None,  # (B, N)
        cache: Any,
    ) -> Tensor:
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, mask, is_causal, cache, self.index)))
        kv = None
        if cache is not None:
            kv = cache.cross[self.index]
            if kv is None and context is not None:
                # the context is projected once per generation, then read back at every step
                kv = cache.cross[self.index] = self.encoder_attn.context_kv(context)  # each (B, nh, N, hs)
        if kv is not None or context is not None:  # without context transformers skips the block; so do we
            y = self.encoder_attn(x, context=context, context_mask=context_mask, kv=kv)  # (B, T, D)
            x = self.encoder_attn_layer_norm(x + self.dropout(y))  # (B, T, D)
        h = self.activation_dropout(self.act(self.fc1(x)))  # (B, T, F)
        return self.final_layer_norm(x + self.dropout(self.fc2(h)))  # (B, T, D)


# ---- model ------------------------------------------------------------------------------------------------


class BartDecoder(nn.Module):
    """BART's decoder with its LM head, native cross-attention in every layer (``TextDecoder``)."""

    native_cross_attention = True

    def __init__(
        self,
        vocab_size: int = 50265,
        max_position_embeddings: int = 1024,
        d_model: int = 1024,
        decoder_layers: int = 12,
        decoder_attention_heads: int = 16,
        decoder_ffn_dim: int = 4096,
        activation_function: str = "gelu",
        scale_embedding: bool = False,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        decoder_layerdrop: float = 0.0,
        init_std: float = 0.02,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = 1,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 2,
        decoder_start_token_id: int | None = 2,
    ):
        super().__init__()
        assert d_model % decoder_attention_heads == 0, "BartConfig validates this"
        self.hidden_size = d_model
        self.vocab_size = vocab_size
        self.max_positions = max_position_embeddings
        self.n_head = decoder_attention_heads
        self.attention_dropout = attention_dropout
        self.layerdrop = decoder_layerdrop
        self.init_std = init_std
        self.tie_word_embeddings = tie_word_embeddings
        self.embed_scale = math.sqrt(d_model) if scale_embedding else 1.0
        self.token_ids = dict(pad=pad_token_id, bos=bos_token_id, eos=eos_token_id,
                              decoder_start=decoder_start_token_id)

        self.embed_tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id)
        self.embed_positions = nn.Embedding(max_position_embeddings + POSITION_OFFSET, d_model)
        self.layernorm_embedding = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            BartDecoderLayer(i, d_model, decoder_attention_heads, decoder_ffn_dim, activation_function, dropout,
                             attention_dropout, activation_dropout)
            for i in range(decoder_layers)
        )
        self.lm_head = None if tie_word_embeddings else nn.Linear(d_model, vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """transformers' init: N(0, init_std) weights, zero biases and padding row, identity LayerNorms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
                if getattr(m, "padding_idx", None) is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    # -- the TextDecoder slot protocol --

    def layer_specs(self) -> list[LayerSpec]:
        return [
            LayerSpec(index=i, width=self.hidden_size, heads=self.n_head, norm="post", eps=LAYER_NORM_EPS, bias=True,
                      dropout=self.attention_dropout)
            for i in range(len(self.layers))
        ]

    def install_cross_attention(self, index: int, module: nn.Module) -> None:
        raise IncompatibleComponentsError([Problem(
            "cross_attention", f"BART has its own cross-attention (encoder_attn) in every layer; cannot install "
            f"an adapter's module at layer {index}", given=type(module).__name__,
            expected="no adapter for a decoder with native_cross_attention",
            fix="drop `cross_attention` from the spec (BART's encoder_attn is used), or pick a decoder without "
            "native cross-attention (gpt2)", error="incompatible",
        )])

    # -- forward --

    def _check_inputs(self, input_ids, context, context_mask, attention_mask, cache, position_ids, past) -> None:
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise InputError(
                f"input_ids must be integer token ids of shape (B, T); given dtype {input_ids.dtype}, "
                f"shape {tuple(input_ids.shape)}; fix: pass a LongTensor of token ids"
            )
        B, T = input_ids.shape
        if input_ids.numel():
            lo, hi = torch.aminmax(input_ids)  # one pass over B*T ids, nothing vocabulary-sized
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.vocab_size:
                raise InputError(
                    f"token ids must lie in [0, {self.vocab_size - 1}] (vocab_size={self.vocab_size}); given ids "
                    f"from {lo} to {hi}; fix: use the tokenizer that matches this decoder, or grow vocab_size"
                )
        if position_ids is None and past + T > self.max_positions:
            raise InputError(
                f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds max_position_embeddings="
                f"{self.max_positions}; fix: truncate the input or lower max_new_tokens"
            )
        if position_ids is not None and position_ids.numel():
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0 or hi >= self.max_positions:
                raise InputError(
                    f"position_ids span {lo}..{hi}, but max_position_embeddings={self.max_positions}; "
                    f"fix: keep positions in [0, {self.max_positions - 1}] (BART's offset of 2 is added inside)"
                )
        if cache is not None and past + T > cache.max_len:
            raise InputError(
                f"the KVCache holds {cache.max_len} tokens, {past + T} were asked for; "
                f"fix: allocate the cache with max_len >= prompt + new tokens"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise InputError(
                f"attention_mask must cover past + new tokens: expected shape {(B, past + T)}, "
                f"given {tuple(attention_mask.shape)}"
            )
        if context is None:
            return
        if context.dim() != 3 or context.shape[0] != B:
            raise InputError(f"context must have shape (B={B}, N, D={self.hidden_size}); given {tuple(context.shape)}")
        if context.shape[-1] != self.hidden_size:
            raise InputError(
                f"context width {context.shape[-1]} does not match BART's cross-attention, which expects "
                f"d_model={self.hidden_size}; fix: project the encoder output to {self.hidden_size} "
                f"(projection: linear/auto)"
            )
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise InputError(
                f"context_mask must have shape (B, N) = {tuple(context.shape[:2])}; given {tuple(context_mask.shape)}"
            )

    @staticmethod
    def _self_attention_mask(attention_mask: Tensor | None, past: int, T: int, device) -> tuple[Tensor | None, bool]:
        """Boolean mask (True = attend) for the new queries over past + new keys, or ``is_causal``."""
        if attention_mask is None:
            if past == 0:
                return None, True  # plain causal: the fused path
            if T == 1:
                return None, False  # one new token sees everything stored
        L = past + T
        q_pos = torch.arange(past, L, device=device)[:, None]  # (T, 1) absolute positions of the queries
        k_pos = torch.arange(L, device=device)[None, :]  # (1, L)
        mask = k_pos <= q_pos  # (T, L) causal, aligned to the end (is_causal would align to the start)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, L)
            # a padding query may have no real key before it; letting it see itself keeps its row finite
            mask = mask | (k_pos == q_pos)  # (B, 1, T, L)
        return mask, False

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        context: Tensor | None = None,  # (B, N, D)
        context_mask: Tensor | None = None,  # (B, N) 1 = attend
        attention_mask: Tensor | None = None,  # (B, L) 1 = real token, covers past + new
        cache: Any = None,  # splice.core.generation.KVCache
        position_ids: Tensor | None = None,  # (B, T) or (T,), without BART's offset
    ) -> DecoderOutput:
        past = cache.length if cache is not None else 0
        self._check_inputs(input_ids, context, context_mask, attention_mask, cache, position_ids, past)
        B, T = input_ids.shape
        if position_ids is None:
            # like transformers: positions count from the past whatever the padding
            position_ids = torch.arange(past, past + T, device=input_ids.device)  # (T,)
        x = self.embed_tokens(input_ids) * self.embed_scale  # (B, T, D)
        x = x + self.embed_positions(position_ids + POSITION_OFFSET)  # (B, T, D)
        x = self.drop(self.layernorm_embedding(x))  # (B, T, D)
        mask, is_causal = self._self_attention_mask(attention_mask, past, T, input_ids.device)
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and cache is None and float(torch.rand([])) < self.layerdrop:
                continue  # LayerDrop, as transformers (training only)
            x = layer(x, mask, is_causal, context, context_mask, cache)  # (B, T, D)
        logits = F.linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)  # (B, T, V)
        if cache is not None:
            cache.advance(T)
        return DecoderOutput(logits=logits, cache=cache, hidden_states=x)


def build_bart(config: BartConfig) -> BartDecoder:
    return BartDecoder(**config.model_dump())


# ---- transformers interop ---------------------------------------------------------------------------------

_SHARED = "shared.weight"  # BartModel / BartForConditionalGeneration: the embedding encoder and decoder share


def config_from_hf(hf: dict) -> dict:
    """A transformers BART ``config.json`` (dict) -> ``BartConfig`` keyword arguments; the encoder's keys drop."""
    problems = []
    act = hf.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        problems.append(Problem(
            "activation_function", "unknown activation", given=act, expected=f"one of {list(ACTIVATIONS)}",
            fix="use a supported activation or register a decoder plugin that implements it",
        ))
    # settings of old (transformers 3.x) or mBART-style configs that change the architecture
    for key, bad, why in (
        ("normalize_before", True, "pre-norm layers (mBART) are not BART's post-norm layout"),
        ("add_final_layer_norm", True, "a final decoder layer norm (mBART) is not part of BART"),
        ("normalize_embedding", False, "BART always applies layernorm_embedding"),
        ("static_position_embeddings", True, "sinusoidal positions (Marian) are not BART's learned positions"),
        ("add_bias_logits", True, "a logits bias is not part of BART's decoder"),
        ("do_blenderbot_90_layernorm", True, "Blenderbot's layer norm placement is not BART's"),
    ):
        if key in hf and hf[key] == bad:
            problems.append(Problem(
                key, f"not supported by splice's BART: {why}", given=bad, expected=f"{not bad}",
                fix="load this checkpoint with a decoder plugin for its own family",
            ))
    if hf.get("extra_pos_embeddings", POSITION_OFFSET) != POSITION_OFFSET:
        problems.append(Problem(
            "extra_pos_embeddings", "BART's position offset is fixed", given=hf["extra_pos_embeddings"],
            expected=str(POSITION_OFFSET), fix="use a BART checkpoint (this looks like another family)",
        ))
    if problems:
        raise ConfigError(problems, source="transformers BART config")
    kwargs = {k: hf[k] for k in BartConfig.model_fields if k in hf and hf[k] is not None}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if key in hf and hf[key] is None:
            kwargs[key] = None  # an explicit "no such token" is meaningful
    return kwargs


def config_to_hf(values: dict) -> dict:
    """``BartConfig`` values -> a transformers BART config dict (``BartForCausalLM``, as a VED decoder).

    The encoder_* fields mirror the decoder's: transformers 5 sizes BartForCausalLM's cache by
    ``num_hidden_layers``, which BartConfig maps to ``encoder_layers``; fewer encoder layers would break it.
    """
    # BartConfig defaults forced_eos_token_id to 2, which transformers' generate would apply at max_length; splice's
    # BART config has no such setting, so the export must not claim one
    out = {"model_type": "bart", **values, "is_decoder": True, "add_cross_attention": True,
           "is_encoder_decoder": False, "forced_eos_token_id": None}
    for enc, dec in (("encoder_layers", "decoder_layers"), ("encoder_attention_heads", "decoder_attention_heads"),
                     ("encoder_ffn_dim", "decoder_ffn_dim")):
        if dec in values:
            out[enc] = values[dec]
    return out


def _shapes(hf_config: dict, ours: set[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Our state-dict name -> shape, for every tensor of this config."""
    D = hf_config.get("d_model", 1024)
    Fd = hf_config.get("decoder_ffn_dim", 4096)
    V = hf_config.get("vocab_size", 50265)
    P = hf_config.get("max_position_embeddings", 1024) + POSITION_OFFSET
    table = {
        "embed_tokens.weight": (V, D),
        "embed_positions.weight": (P, D),
        "layernorm_embedding.weight": (D,),
        "layernorm_embedding.bias": (D,),
    }
    if not hf_config.get("tie_word_embeddings", True):
        table["lm_head.weight"] = (V, D)
    for n in range(hf_config.get("decoder_layers", 12)):
        p = f"layers.{n}."
        for attn in ("self_attn", "encoder_attn"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                table[f"{p}{attn}.{proj}.weight"] = (D, D)
                table[f"{p}{attn}.{proj}.bias"] = (D,)
        for norm in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
            table[f"{p}{norm}.weight"] = (D,)
            table[f"{p}{norm}.bias"] = (D,)
        table[f"{p}fc1.weight"], table[f"{p}fc1.bias"] = (Fd, D), (Fd,)
        table[f"{p}fc2.weight"], table[f"{p}fc2.bias"] = (D, Fd), (D,)
    return table


def _check_shape(key: str, tensor: Tensor, shape: tuple[int, ...], hf_config: dict) -> None:
    if tuple(tensor.shape) != shape:
        dims = {k: hf_config.get(k) for k in ("d_model", "decoder_ffn_dim", "vocab_size", "max_position_embeddings")}
        raise CheckpointError(
            f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape} from the config ({dims}); "
            f"fix: load it with the config.json it was saved with"
        )


def state_dict_from_hf(sd: dict[str, Tensor], hf_config: dict) -> tuple[dict[str, Tensor], list[str]]:
    """transformers BART tensors (a VisionEncoderDecoder's ``decoder.`` removed) -> (ours, unused keys).

    Reads the ``BartForCausalLM`` layout (``model.decoder.*``; ``lm_head.weight`` tied, so absent on disk) and the
    ``BartModel`` / ``BartForConditionalGeneration`` hub layout (``[model.]shared.weight``, ``[model.]encoder.*``,
    ``[model.]decoder.*``, ``final_logits_bias``). In the hub layout ``decoder.embed_tokens.weight`` is tied to
    ``shared.weight`` and not on disk: ``shared.weight`` is consumed into our ``embed_tokens.weight`` (transformers'
    ``BartForCausalLM.from_pretrained`` leaves it randomly initialised there). ``shared.weight`` is therefore never
    reported unused. The encoder (``encoder.*``), ``final_logits_bias`` (not part of the decoder; zero in the
    released BART files), legacy ``*.version`` buffers and anything unknown are returned in ``unused`` by name.
    """
    table = _shapes(hf_config)
    tied = hf_config.get("tie_word_embeddings", True)
    mapped: dict[str, Tensor] = {}
    unused: list[str] = []
    shared: tuple[str, Tensor] | None = None
    for key, tensor in sd.items():
        name = key[len("model."):] if key.startswith("model.") else key
        if name == _SHARED:
            shared = (key, tensor)
            continue
        if name.startswith("decoder."):
            name = name[len("decoder."):]
        if name == "lm_head.weight" and tied:
            continue  # a duplicate of the (shared) embedding matrix (torch.save .bin files carry it)
        if name not in table:
            unused.append(key)  # encoder.*, final_logits_bias, *.version, anything unknown
            continue
        _check_shape(key, tensor, table[name], hf_config)
        mapped[name] = tensor
    if shared is not None and "embed_tokens.weight" not in mapped:
        _check_shape(shared[0], shared[1], table["embed_tokens.weight"], hf_config)
        mapped["embed_tokens.weight"] = shared[1]  # decoder.embed_tokens.weight <- shared.weight
        note = (f"embed_tokens.weight (and the tied LM head) filled from {shared[0]}: this file has no decoder "
                "embedding of its own (transformers' BartForCausalLM.from_pretrained leaves it random here)")
        return mapped, unused, [note]
    return mapped, unused


def state_dict_to_hf(sd: dict[str, Tensor], hf_config: dict) -> dict[str, Tensor]:
    """Ours -> ``BartForCausalLM`` on-disk names (``model.decoder.`` prefix; ``lm_head.weight`` only when untied)."""
    table = _shapes(hf_config)
    out: dict[str, Tensor] = {}
    for name, shape in table.items():
        if name not in sd:
            raise CheckpointError(f"cannot write BART's {name!r}: it is missing from the state dict")
        _check_shape(name, sd[name], shape, hf_config)
        out[name if name == "lm_head.weight" else "model.decoder." + name] = sd[name].contiguous()
    left = sorted(set(sd) - set(table))
    if left:
        raise CheckpointError(
            f"{len(left)} tensor(s) have no place in transformers' BartForCausalLM layout: {left[:8]}"
            f"{' ...' if len(left) > 8 else ''}; fix: export with the config the model was built from, "
            f"or save in splice format"
        )
    return out


HF = HFInterop(
    model_types=("bart",),
    config_from_hf=config_from_hf,
    state_dict_from_hf=state_dict_from_hf,
    state_dict_to_hf=state_dict_to_hf,
    config_to_hf=config_to_hf,
)


@hookimpl
def register_decoders(register):
    register(
        "bart_decoder", build_bart, BartConfig, aliases=("bart",), tiny=dict(TINY), hf=HF,
        description="BART's decoder (facebook), post-norm with learned positions and native cross-attention",
    )

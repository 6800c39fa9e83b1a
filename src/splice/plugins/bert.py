"""BERT as a native splice decoder (transformers' ``BertLMHeadModel`` with ``is_decoder=True``).

Post-LN blocks: every sub-block is ``LayerNorm(x + sublayer(x))``. RoBERTa (``roberta.py``) reuses these blocks and
differs only in its positions, defaults and head names.

Layout (module state-dict names, ``nn.Linear`` everywhere so weights are ``(out, in)``)::

    embeddings.word.weight (V, D)   embeddings.position.weight (P, D)   embeddings.token_type.weight (TV, D)
    embeddings.norm.{weight,bias}
    layers.N.attention.{q_proj,k_proj,v_proj,o_proj}.{weight (D, D), bias}   layers.N.attention.norm.*
    layers.N.crossattention.*   the module an adapter installed (empty slot by default), e.g. for ``standard``:
                                norm, q_proj, k_proj, v_proj, o_proj (``LayerSpec.norm = "post"``)
    layers.N.mlp.fc1.{weight (I, D), bias}   layers.N.mlp.fc2.{weight (D, I), bias}   layers.N.mlp.norm.*
    head.dense.*   head.norm.*   head.bias (V,)   [head.decoder.weight (V, D) only when untied]

transformers on disk (``bert.`` prefix in BertLMHeadModel / BertForPreTraining, none in BertModel)::

    embeddings.{word,position,token_type}_embeddings.weight   embeddings.LayerNorm.*
    encoder.layer.N.attention.self.{query,key,value}.*   attention.output.dense.*   attention.output.LayerNorm.*
    encoder.layer.N.crossattention.self.{query,key,value}.*   crossattention.output.{dense,LayerNorm}.*
    encoder.layer.N.intermediate.dense.*   encoder.layer.N.output.dense.*   encoder.layer.N.output.LayerNorm.*
    cls.predictions.transform.{dense,LayerNorm}.*   cls.predictions.bias   cls.predictions.decoder.* (tied)

``state_dict_from_hf`` / ``state_dict_to_hf`` translate, checking every shape; old files' ``LayerNorm.gamma/beta``
read as ``weight/bias``; the pooler, the next-sentence head and the ``position_ids`` buffers are reported unused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from splice import hookimpl
from splice.core.errors import CheckpointError, ConfigError, InputError, Problem
from splice.core.interfaces import DecoderOutput, HFInterop, LayerSpec

__all__ = [
    "BertConfig",
    "BertDecoder",
    "BertEmbeddings",
    "BertSelfAttention",
    "BertMLP",
    "BertLayer",
    "BertLMHead",
    "HFLayout",
    "build_bert",
    "config_from_hf",
    "config_to_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "HF",
    "TINY",
]

Activation = Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"]
ACTIVATIONS: tuple[str, ...] = Activation.__args__

TINY: dict[str, Any] = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=64,
)


# ---- config -----------------------------------------------------------------------------------------------


class BertConfig(BaseModel):
    """BERT's hyper-parameters, named and defaulted as in transformers' ``BertConfig``."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(30522, gt=0)
    hidden_size: int = Field(768, gt=0, description="hidden width D")
    num_hidden_layers: int = Field(12, gt=0)
    num_attention_heads: int = Field(12, gt=0)
    intermediate_size: int = Field(3072, gt=0, description="MLP width I")
    hidden_act: Activation = "gelu"
    hidden_dropout_prob: float = Field(0.1, ge=0, lt=1)
    attention_probs_dropout_prob: float = Field(0.1, ge=0, lt=1)
    max_position_embeddings: int = Field(512, gt=0, description="rows of the learned position table")
    type_vocab_size: int = Field(2, gt=0, description="token types; a decoder always uses type 0")
    initializer_range: float = Field(0.02, ge=0)
    layer_norm_eps: float = Field(1e-12, gt=0)
    pad_token_id: int = Field(0, ge=0)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _check(self) -> "BertConfig":
        if self.hidden_size % self.num_attention_heads:
            divisors = [h for h in range(1, min(self.hidden_size, 64) + 1) if self.hidden_size % h == 0]
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} does not divide hidden_size={self.hidden_size}; "
                f"expected hidden_size % num_attention_heads == 0; fix: pick num_attention_heads among {divisors} "
                f"or change hidden_size to a multiple of {self.num_attention_heads}"
            )
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(
                f"pad_token_id={self.pad_token_id} is outside the vocabulary (vocab_size={self.vocab_size}); "
                f"expected 0 <= pad_token_id < vocab_size; fix: use the tokenizer's pad id or grow vocab_size"
            )
        return self


# ---- blocks -----------------------------------------------------------------------------------------------

_ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # the exact (erf) GELU, transformers' "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class BertEmbeddings(nn.Module):
    """Word + learned position + token-type (always type 0) embeddings, then LayerNorm."""

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int, type_vocab_size: int, eps: float,
                 dropout: float, pad_token_id: int):
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.position = nn.Embedding(max_positions, hidden_size)
        self.token_type = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        x = self.word(input_ids) + self.token_type.weight[0] + self.position(position_ids)  # (B, T, D)
        return self.dropout(self.norm(x))  # (B, T, D)


class BertSelfAttention(nn.Module):
    """Causal multi-head self-attention with its post-norm residual: ``norm(x + o_proj(attn(x)))``."""

    def __init__(self, hidden_size: int, heads: int, eps: float, attn_dropout: float, hidden_dropout: float):
        super().__init__()
        self.heads, self.head_size = heads, hidden_size // heads
        self.attn_dropout = attn_dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(hidden_dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, cache: Any, layer: int) -> Tensor:
        B, T, D = x.shape
        q = self._heads(self.q_proj(x))  # (B, nh, T, hs)
        k = self._heads(self.k_proj(x))  # (B, nh, T, hs)
        v = self._heads(self.v_proj(x))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.attn_dropout if self.training else 0.0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.norm(x + self.dropout(self.o_proj(y)))  # (B, T, D)


class BertMLP(nn.Module):
    """``norm(x + fc2(act(fc1(x))))`` (transformers' ``intermediate`` + ``output``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, eps: float, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = _ACTIVATION_FNS[activation]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.fc2(self.act(self.fc1(x)))))  # (B, T, D)


class BertLayer(nn.Module):
    """Self-attention, then the cross-attention slot (when filled), then the MLP; each post-norm."""

    def __init__(self, index: int, hidden_size: int, heads: int, intermediate_size: int, activation: str, eps: float,
                 attn_dropout: float, hidden_dropout: float):
        super().__init__()
        self.index = index
        self.attention = BertSelfAttention(hidden_size, heads, eps, attn_dropout, hidden_dropout)
        # the slot an adapter fills; a registered child, so its parameters are layers.N.crossattention.*
        self.register_module("crossattention", None)
        self.mlp = BertMLP(hidden_size, intermediate_size, activation, eps, hidden_dropout)

    def forward(
        self,
        x: Tensor,  # (B, T, D)
        mask: Tensor | None,  # (B, 1, T, L) / (T, L) bool, True = attend; None with is_causal or one new token
        is_causal: bool,
        context: Tensor | None,  # (B, N, D_ctx)
        context_mask: Tensor | None,  # (B, N)
        cache: Any,
    ) -> Tensor:
        x = self.attention(x, mask, is_causal, cache, self.index)  # (B, T, D)
        if self.crossattention is not None:
            kv = None
            if cache is not None:
                kv = cache.cross[self.index]
                if kv is None and context is not None:
                    # the context is projected once per generation, then read back at every step
                    kv = cache.cross[self.index] = self.crossattention.context_kv(context)  # each (B, nh, N, hs)
            if kv is not None or context is not None:
                x = self.crossattention(x, context=context, context_mask=context_mask, kv=kv)  # (B, T, D)
        return self.mlp(x)  # (B, T, D)


class BertLMHead(nn.Module):
    """``dense -> act -> norm -> (tied) word embeddings + bias`` (BERT's ``cls.predictions``, RoBERTa's ``lm_head``)."""

    def __init__(self, hidden_size: int, vocab_size: int, activation: str, eps: float, tied: bool):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = _ACTIVATION_FNS[activation]
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.decoder = None if tied else nn.Linear(hidden_size, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))  # (V,)

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        x = self.norm(self.act(self.dense(x)))  # (B, T, D)
        weight = word_embeddings if self.decoder is None else self.decoder.weight  # (V, D)
        return F.linear(x, weight, self.bias)  # (B, T, V)


def causal_mask(attention_mask: Tensor | None, past: int, T: int, device) -> tuple[Tensor | None, bool]:
    """Boolean SDPA mask (True = attend) for ``T`` new queries over ``past + T`` keys, or ``is_causal``."""
    if attention_mask is None and past == 0:
        return None, True  # plain causal: the fused path
    if attention_mask is None and T == 1:
        return None, False  # one new token sees everything stored
    queries = torch.arange(past, past + T, device=device)[:, None]  # (T, 1) absolute positions
    keys = torch.arange(past + T, device=device)[None, :]  # (1, L)
    mask = keys <= queries  # (T, L) causal aligned to the end (is_causal would align to the start)
    if attention_mask is not None:
        # a padding query may have no real key before it: seeing itself keeps its row finite (an all-False row
        # is NaN); real queries never see padding, so they are unaffected
        mask = (mask & attention_mask.bool()[:, None, None, :]) | (keys == queries)  # (B, 1, T, L)
    return mask, False


# ---- model ------------------------------------------------------------------------------------------------


class BertDecoder(nn.Module):
    """Post-LN BERT as a causal language model, one empty cross-attention slot per layer (``TextDecoder``)."""

    native_cross_attention = False
    family = "BERT"
    head_activation: str | None = None  # None: the head uses hidden_act (RoBERTa's head is always "gelu")

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = True,
    ):
        super().__init__()
        assert hidden_size % num_attention_heads == 0, "the Config validates this"
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.num_positions = max_position_embeddings  # rows of the position table
        self.max_positions = self._max_tokens(max_position_embeddings, pad_token_id)  # longest sequence
        self.pad_token_id = pad_token_id
        self.n_head = num_attention_heads
        self.eps = layer_norm_eps
        self.attn_dropout = attention_probs_dropout_prob
        self.initializer_range = initializer_range

        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
                                         layer_norm_eps, hidden_dropout_prob, pad_token_id)
        self.layers = nn.ModuleList(
            BertLayer(i, hidden_size, num_attention_heads, intermediate_size, hidden_act, layer_norm_eps,
                      attention_probs_dropout_prob, hidden_dropout_prob)
            for i in range(num_hidden_layers)
        )
        self.head = BertLMHead(hidden_size, vocab_size, self.head_activation or hidden_act, layer_norm_eps,
                               tied=tie_word_embeddings)
        self.reset_parameters()

    @staticmethod
    def _max_tokens(max_position_embeddings: int, pad_token_id: int) -> int:
        return max_position_embeddings  # positions are 0, 1, ...

    def positions(self, input_ids: Tensor, past: int) -> Tensor:
        """Position ids of the new tokens: ``past, past+1, ...`` for every row, padding or not (as transformers)."""
        return torch.arange(past, past + input_ids.shape[1], device=input_ids.device)  # (T,)

    def reset_parameters(self) -> None:
        """transformers' init: N(0, 0.02) weights, zero biases and padding row, identity LayerNorms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.initializer_range)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        with torch.no_grad():
            self.embeddings.word.weight[self.pad_token_id].zero_()
        nn.init.zeros_(self.head.bias)

    # -- the TextDecoder slot protocol --

    def layer_specs(self) -> list[LayerSpec]:
        return [
            LayerSpec(index=i, width=self.hidden_size, heads=self.n_head, norm="post", eps=self.eps, bias=True,
                      dropout=self.attn_dropout)
            for i in range(len(self.layers))
        ]

    def install_cross_attention(self, index: int, module: nn.Module) -> None:
        n = len(self.layers)
        if not 0 <= index < n:
            raise IndexError(f"{self.family} has {n} layers (0..{n - 1}); cannot install at {index}")
        self.layers[index].crossattention = module

    # -- forward --

    def _check_inputs(self, input_ids, context, context_mask, attention_mask, cache, position_ids, past) -> None:
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise InputError(
                f"input_ids must be integer token ids of shape (B, T); given dtype {input_ids.dtype}, shape "
                f"{tuple(input_ids.shape)}; fix: pass a LongTensor of token ids"
            )
        B, T = input_ids.shape
        if input_ids.numel():
            lo, hi = (int(t) for t in torch.aminmax(input_ids))
            if lo < 0 or hi >= self.vocab_size:
                raise InputError(
                    f"token ids must lie in [0, {self.vocab_size - 1}] (vocab_size={self.vocab_size}); given ids "
                    f"from {lo} to {hi}; fix: use the tokenizer that matches this decoder, or grow vocab_size"
                )
        if position_ids is None and past + T > self.max_positions:
            raise InputError(
                f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds the {self.max_positions} positions "
                f"of this {self.family} (max_position_embeddings={self.num_positions}); "
                f"fix: truncate the input or lower max_new_tokens"
            )
        if position_ids is not None and position_ids.numel() and int(position_ids.max()) >= self.num_positions:
            raise InputError(
                f"position_ids reach {int(position_ids.max())}, but max_position_embeddings={self.num_positions}; "
                f"fix: keep positions below {self.num_positions}"
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
        if all(layer.crossattention is None for layer in self.layers):
            raise InputError(
                f"context was given, but no {self.family} layer has cross-attention; fix: install an adapter "
                "(cross_attention: {kind: standard} in the spec, or decoder.install_cross_attention(i, module))"
            )
        if context.dim() != 3 or context.shape[0] != B:
            raise InputError(f"context must have shape (B={B}, N, D_ctx); given {tuple(context.shape)}")
        for layer in self.layers:
            width = getattr(layer.crossattention, "context_width", None)
            if width is not None and context.shape[-1] != width:
                raise InputError(
                    f"context width {context.shape[-1]} does not match layer {layer.index}'s cross-attention, which "
                    f"expects {width}; fix: project the encoder output to {width} (projection: linear/auto)"
                )
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise InputError(
                f"context_mask must have shape (B, N) = {tuple(context.shape[:2])}; given {tuple(context_mask.shape)}"
            )

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        context: Tensor | None = None,  # (B, N, D_ctx)
        context_mask: Tensor | None = None,  # (B, N) 1 = attend
        attention_mask: Tensor | None = None,  # (B, L) 1 = real token, covers past + new
        cache: Any = None,  # splice.core.generation.KVCache
        position_ids: Tensor | None = None,  # (B, T) or (T,)
    ) -> DecoderOutput:
        past = cache.length if cache is not None else 0
        self._check_inputs(input_ids, context, context_mask, attention_mask, cache, position_ids, past)
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = self.positions(input_ids, past)  # (T,) or (B, T)
        x = self.embeddings(input_ids, position_ids)  # (B, T, D)
        mask, is_causal = causal_mask(attention_mask, past, T, input_ids.device)
        for layer in self.layers:
            x = layer(x, mask, is_causal, context, context_mask, cache)  # (B, T, D)
        logits = self.head(x, self.embeddings.word.weight)  # (B, T, V)
        if cache is not None:
            cache.advance(T)
        return DecoderOutput(logits=logits, cache=cache, hidden_states=x)


def build_bert(config: BertConfig) -> BertDecoder:
    return BertDecoder(**config.model_dump())


# ---- transformers interop ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFLayout:
    """Where a BERT-family checkpoint keeps its tensors, and how its config differs from ours.

    ``prefix`` is the base model's name inside a head model (``bert.``); ``head`` maps the head's HF names to ours;
    ``head_bias`` / ``head_decoder`` are the logits bias and the (usually tied) output projection.
    """

    family: str
    model_type: str
    prefix: str
    head: dict[str, str]
    head_bias: str
    head_decoder: str
    config_cls: type[BertConfig]
    hf_defaults: dict[str, Any] = field(default_factory=dict)  # transformers' defaults where ours differ
    unused: tuple[str, ...] = ("pooler.",)  # name prefixes (after ``prefix``) that have no place in a decoder

    def dims(self, hf: dict) -> dict[str, int]:
        base = self.config_cls()
        get = lambda k: hf.get(k) if hf.get(k) is not None else self.hf_defaults.get(k, getattr(base, k))  # noqa: E731
        return {k: get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                                    "max_position_embeddings", "type_vocab_size")}

    def table(self, hf: dict) -> dict[str, tuple[tuple[int, ...], str]]:
        """HF name (head names as on disk, base names without ``prefix``) -> (HF shape, our name)."""
        d = self.dims(hf)
        V, D, I, P, TV = d["vocab_size"], d["hidden_size"], d["intermediate_size"], d["max_position_embeddings"], \
            d["type_vocab_size"]
        table: dict[str, tuple[tuple[int, ...], str]] = {
            "embeddings.word_embeddings.weight": ((V, D), "embeddings.word.weight"),
            "embeddings.position_embeddings.weight": ((P, D), "embeddings.position.weight"),
            "embeddings.token_type_embeddings.weight": ((TV, D), "embeddings.token_type.weight"),
            "embeddings.LayerNorm.weight": ((D,), "embeddings.norm.weight"),
            "embeddings.LayerNorm.bias": ((D,), "embeddings.norm.bias"),
            self.head_bias: ((V,), "head.bias"),
        }
        table.update({hf_name: ((D, D) if hf_name.endswith("dense.weight") else (D,), ours)
                      for hf_name, ours in self.head.items()})
        linear = lambda out, inp: {"weight": (out, inp), "bias": (out,)}  # noqa: E731
        norm = {"weight": (D,), "bias": (D,)}
        for n in range(d["num_hidden_layers"]):
            rows = {}
            for attn, ours in (("attention", "attention"), ("crossattention", "crossattention")):
                for hf_proj, our_proj in (("self.query", "q_proj"), ("self.key", "k_proj"), ("self.value", "v_proj"),
                                          ("output.dense", "o_proj")):
                    rows.update({f"{attn}.{hf_proj}.{p}": (s, f"{ours}.{our_proj}.{p}")
                                 for p, s in linear(D, D).items()})
                rows.update({f"{attn}.output.LayerNorm.{p}": (s, f"{ours}.norm.{p}") for p, s in norm.items()})
            rows.update({f"intermediate.dense.{p}": (s, f"mlp.fc1.{p}") for p, s in linear(I, D).items()})
            rows.update({f"output.dense.{p}": (s, f"mlp.fc2.{p}") for p, s in linear(D, I).items()})
            rows.update({f"output.LayerNorm.{p}": (s, f"mlp.norm.{p}") for p, s in norm.items()})
            table.update({f"encoder.layer.{n}.{k}": (s, f"layers.{n}.{o}") for k, (s, o) in rows.items()})
        if not hf.get("tie_word_embeddings", True):
            table[self.head_decoder + ".weight"] = ((V, D), "head.decoder.weight")
        return table

    # -- the HFInterop callables --

    def config_from_hf(self, hf: dict) -> dict:
        """A transformers ``config.json`` (dict) -> ``Config`` keyword arguments; keys we don't model drop."""
        problems = []
        kind = hf.get("position_embedding_type", "absolute")
        if kind not in (None, "absolute"):
            problems.append(Problem(
                "position_embedding_type", f"not supported by splice's {self.family}", given=kind,
                expected="'absolute'", fix="use a checkpoint with absolute positions, or register a decoder plugin "
                "that implements relative position embeddings",
            ))
        act = hf.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            problems.append(Problem(
                "hidden_act", "unknown activation", given=act, expected=f"one of {list(ACTIVATIONS)}",
                fix="use a supported activation or register a decoder plugin that implements it",
            ))
        if "pad_token_id" in hf and hf["pad_token_id"] is None and self.hf_defaults.get("pad_token_id") is not None:
            problems.append(Problem(
                "pad_token_id", f"{self.family} computes positions from the padding id, which is missing", given=None,
                expected="an integer token id", fix=f"set pad_token_id (the {self.family} default is "
                f"{self.hf_defaults['pad_token_id']})",
            ))
        if problems:
            raise ConfigError(problems, source=f"transformers {self.family} config")
        kwargs = {k: hf[k] for k in self.config_cls.model_fields if hf.get(k) is not None}
        return {**{k: v for k, v in self.hf_defaults.items() if k not in hf}, **kwargs}

    def config_to_hf(self, values: dict) -> dict:
        """``Config`` values -> a transformers config dict for the causal LM (as a VisionEncoderDecoder decoder)."""
        return {"model_type": self.model_type, **values, "is_decoder": True, "add_cross_attention": True}

    def state_dict_from_hf(self, sd: dict[str, Tensor], hf: dict) -> tuple[dict[str, Tensor], list[str]]:
        """transformers tensors (``decoder.`` removed; with or without ``prefix``) -> (ours, unused keys)."""
        table = self.table(hf)
        tied = hf.get("tie_word_embeddings", True)
        decoder_bias = self.head_decoder + ".bias"
        names = {key: _hf_name(key, self.prefix) for key in sd}
        has_decoder_bias = decoder_bias in names.values()
        mapped: dict[str, Tensor] = {}
        unused: list[str] = []
        for key, tensor in sd.items():
            name = names[key]
            if tied and name.startswith(self.head_decoder + "."):
                continue  # duplicates of the word embeddings and of the head bias (torch.save files carry them)
            if name == decoder_bias:
                name = self.head_bias  # untied: the bias transformers 5 actually adds
            elif name == self.head_bias and not tied and has_decoder_bias:
                unused.append(key)  # untied in transformers 5: a parameter its forward never reads
                continue
            if name not in table:
                unused.append(key)  # pooler, next-sentence head, position_ids buffers, anything unknown
                continue
            shape, ours = table[name]
            if tuple(tensor.shape) != shape:
                d = self.dims(hf)
                raise CheckpointError(
                    f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape} from the config "
                    f"({', '.join(f'{k}={v}' for k, v in d.items())}); "
                    f"fix: load it with the config.json it was saved with"
                )
            mapped[ours] = tensor
        return mapped, unused

    def state_dict_to_hf(self, sd: dict[str, Tensor], hf: dict) -> dict[str, Tensor]:
        """Ours -> the causal-LM layout (``prefix`` on base names; head names as they are)."""
        out: dict[str, Tensor] = {}
        for hf_name, (shape, ours) in self.table(hf).items():
            if ours not in sd:
                continue  # e.g. a layer without cross-attention
            t = sd[ours]
            if tuple(t.shape) != shape:
                raise CheckpointError(f"tensor {ours!r} has shape {tuple(t.shape)}; {hf_name!r} needs {shape} "
                                      f"from the config")
            is_head = hf_name in self.head or hf_name.startswith((self.head_bias, self.head_decoder))
            out[hf_name if is_head else self.prefix + hf_name] = t.contiguous()
            if ours == "head.bias" and not hf.get("tie_word_embeddings", True):
                out[self.head_decoder + ".bias"] = t.contiguous()  # untied: transformers 5 reads this copy
        left = sorted(set(sd) - {ours for _, ours in self.table(hf).values()})
        if left:
            raise CheckpointError(
                f"{len(left)} tensor(s) have no place in transformers' {self.family} layout: {left[:8]}"
                f"{' ...' if len(left) > 8 else ''}; fix: export only the standard cross-attention kind "
                f"(gated or third-party modules have no transformers equivalent), or save in splice format"
            )
        return out

    def interop(self) -> HFInterop:
        return HFInterop(model_types=(self.model_type,), config_from_hf=self.config_from_hf,
                         state_dict_from_hf=self.state_dict_from_hf, state_dict_to_hf=self.state_dict_to_hf,
                         config_to_hf=self.config_to_hf)


def _hf_name(key: str, prefix: str) -> str:
    """Strip the base model's prefix; read old files' ``LayerNorm.gamma/beta`` as ``weight/bias``."""
    name = key[len(prefix):] if key.startswith(prefix) else key
    if name.endswith("LayerNorm.gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith("LayerNorm.beta"):
        name = name[: -len("beta")] + "bias"
    return name


LAYOUT = HFLayout(
    family="BERT",
    model_type="bert",
    prefix="bert.",
    head={
        "cls.predictions.transform.dense.weight": "head.dense.weight",
        "cls.predictions.transform.dense.bias": "head.dense.bias",
        "cls.predictions.transform.LayerNorm.weight": "head.norm.weight",
        "cls.predictions.transform.LayerNorm.bias": "head.norm.bias",
    },
    head_bias="cls.predictions.bias",
    head_decoder="cls.predictions.decoder",
    config_cls=BertConfig,
)

config_from_hf = LAYOUT.config_from_hf
config_to_hf = LAYOUT.config_to_hf
state_dict_from_hf = LAYOUT.state_dict_from_hf
state_dict_to_hf = LAYOUT.state_dict_to_hf
HF = LAYOUT.interop()


@hookimpl
def register_decoders(register):
    register(
        "bert", build_bert, BertConfig, tiny=dict(TINY), hf=HF,
        description="BERT (Google) as a causal LM: post-norm, learned positions; cross-attention through adapters",
    )

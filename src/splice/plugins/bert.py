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

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from splice import hookimpl
from splice.adapters.cross_attention import STANDARD_PARAMS
from splice.core.kernels import Linear, dropout, linear
from splice.core.errors import ConfigError, Problem
from splice.core.inputs import check_token_ids, home_tensor, input_error
from splice.core.interfaces import HFInterop, TextEncoderOutput
from splice.core.keymap import DUPLICATE, Row, from_hf, to_hf
from splice.core.cache import context_kv
from splice.plugins._shared import ACTIVATION_FNS, NativeDecoder, attention, normal_init, split_heads
from splice.plugins._shared import STANDARD_ONLY, DecoderConfig
from splice.plugins._shared import Eps, FFNWidth, Heads, InitStd, Layers, Positions, Probability, TokenId, Vocab, Width
from splice.plugins._shared import bounded_int

__all__ = [
    "BertConfig", "BertDecoder", "BertEmbeddings", "BertSelfAttention", "BertMLP", "BertLayer", "BertLMHead",
    "BertPooler", "BertTextEncoder", "HFLayout", "build_bert", "build_bert_text_encoder", "config_from_hf",
    "encoder_layer_rows",
    "config_to_hf", "state_dict_from_hf", "state_dict_to_hf", "HF", "ENCODER_HF", "TINY",
]

Activation = Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"]
TokenTypes = bounded_int(1, 1024, "BERT has 2 token types; no released model has more than 16")
ACTIVATIONS: tuple[str, ...] = Activation.__args__

TINY: dict[str, Any] = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=64,
)


# ---- config -----------------------------------------------------------------------------------------------


class BertConfig(DecoderConfig):
    """BERT's hyper-parameters, named and defaulted as in transformers' ``BertConfig``."""

    vocab_size: Vocab = 30522
    hidden_size: Width = Field(768, description="hidden width D")
    num_hidden_layers: Layers = 12
    num_attention_heads: Heads = 12
    intermediate_size: FFNWidth = Field(3072, description="MLP width I")
    hidden_act: Activation = "gelu"
    hidden_dropout_prob: Probability = 0.1
    attention_probs_dropout_prob: Probability = 0.1
    max_position_embeddings: Positions = Field(512, description="rows of the learned position table")
    type_vocab_size: TokenTypes = Field(2, description="token types; a decoder always uses type 0")
    initializer_range: InitStd = 0.02
    layer_norm_eps: Eps = 1e-12
    pad_token_id: TokenId = 0
    tie_word_embeddings: bool = True

    width_and_heads = ("hidden_size", "num_attention_heads")

    @model_validator(mode="after")
    def _check(self) -> "BertConfig":
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(
                f"pad_token_id={self.pad_token_id} is outside the vocabulary (vocab_size={self.vocab_size}); "
                f"expected 0 <= pad_token_id < vocab_size; fix: use the tokenizer's pad id or grow vocab_size"
            )
        return self


# ---- blocks -----------------------------------------------------------------------------------------------

class BertEmbeddings(nn.Module):
    """Word + learned position + token-type embeddings (type 0 unless ``token_type_ids`` are given), then LayerNorm."""

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int, type_vocab_size: int, eps: float,
                 dropout: float, pad_token_id: int):
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.position = nn.Embedding(max_positions, hidden_size)
        self.token_type = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout_p = dropout

    def forward(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        types = self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids)  # (B, T, D)
        x = self.word(input_ids) + types + self.position(position_ids)  # (B, T, D)
        return dropout(self.norm(x), self.dropout_p, self.training)  # (B, T, D)


class BertSelfAttention(nn.Module):
    """Causal multi-head self-attention with its post-norm residual: ``norm(x + o_proj(attn(x)))``."""

    def __init__(self, hidden_size: int, heads: int, eps: float, attn_dropout: float, hidden_dropout: float):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.q_proj = Linear(hidden_size, hidden_size)
        self.k_proj = Linear(hidden_size, hidden_size)
        self.v_proj = Linear(hidden_size, hidden_size)
        self.o_proj = Linear(hidden_size, hidden_size)
        self.hidden_dropout = hidden_dropout
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, cache: Any, layer: int) -> Tensor:
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        y = attention(q, k, v, mask, is_causal=is_causal, cache=cache, layer=layer,
                      dropout_p=self.attn_dropout if self.training else 0.0)  # (B, T, D)
        return self.norm(x + dropout(self.o_proj(y), self.hidden_dropout, self.training))  # (B, T, D)


class BertMLP(nn.Module):
    """``norm(x + fc2(act(fc1(x))))`` (transformers' ``intermediate`` + ``output``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, eps: float, dropout: float):
        super().__init__()
        self.fc1 = Linear(hidden_size, intermediate_size)
        self.act = ACTIVATION_FNS[activation]
        self.fc2 = Linear(intermediate_size, hidden_size)
        self.dropout_p = dropout
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + dropout(self.fc2(self.act(self.fc1(x))), self.dropout_p, self.training))  # (B, T, D)


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

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, context: Tensor | None,
                context_mask: Tensor | None, cache: Any) -> Tensor:
        """One layer: shapes and the mask as ``NativeDecoder`` describes them."""
        x = self.attention(x, mask, is_causal, cache, self.index)  # (B, T, D)
        if self.crossattention is not None:
            kv = context_kv(self.crossattention, context, cache, self.index)  # each (B, nh, N, hs) or None
            if kv is not None or context is not None:
                x = self.crossattention(x, context=context, context_mask=context_mask, kv=kv)  # (B, T, D)
        return self.mlp(x)  # (B, T, D)


class BertLMHead(nn.Module):
    """``dense -> act -> norm -> (tied) word embeddings + bias`` (BERT's ``cls.predictions``, RoBERTa's ``lm_head``)."""

    def __init__(self, hidden_size: int, vocab_size: int, activation: str, eps: float, tied: bool):
        super().__init__()
        self.dense = Linear(hidden_size, hidden_size)
        self.act = ACTIVATION_FNS[activation]
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.decoder = None if tied else Linear(hidden_size, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))  # (V,)

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        x = self.norm(self.act(self.dense(x)))  # (B, T, D)
        weight = word_embeddings if self.decoder is None else self.decoder.weight  # (V, D)
        return linear(x, weight, self.bias)  # (B, T, V)


# ---- model ------------------------------------------------------------------------------------------------


def bert_stack(c: dict[str, Any]) -> tuple[BertEmbeddings, nn.ModuleList]:
    """The embeddings and layers the decoder and the text encoder share, from ``BertConfig`` values (``c``)."""
    embeddings = BertEmbeddings(c["vocab_size"], c["hidden_size"], c["max_position_embeddings"], c["type_vocab_size"],
                                c["layer_norm_eps"], c["hidden_dropout_prob"], c["pad_token_id"])
    layers = nn.ModuleList(
        BertLayer(i, c["hidden_size"], c["num_attention_heads"], c["intermediate_size"], c["hidden_act"],
                  c["layer_norm_eps"], c["attention_probs_dropout_prob"], c["hidden_dropout_prob"])
        for i in range(c["num_hidden_layers"])
    )
    return embeddings, layers



class BertDecoder(NativeDecoder):
    """Post-LN BERT as a causal language model, one empty cross-attention slot per layer (``TextDecoder``)."""

    family = "BERT"
    norm_position = "post"
    positions_name = "max_position_embeddings"
    head_activation: str | None = None  # None: the head uses hidden_act (RoBERTa's head is always "gelu")

    def __init__(
        self,
        vocab_size: int = 30522, hidden_size: int = 768, num_hidden_layers: int = 12, num_attention_heads: int = 12,
        intermediate_size: int = 3072, hidden_act: str = "gelu", hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1, max_position_embeddings: int = 512, type_vocab_size: int = 2,
        initializer_range: float = 0.02, layer_norm_eps: float = 1e-12, pad_token_id: int = 0,
        tie_word_embeddings: bool = True,
    ):
        super().__init__(
            hidden_size=hidden_size, vocab_size=vocab_size, n_head=num_attention_heads, eps=layer_norm_eps,
            attn_dropout=attention_probs_dropout_prob, num_positions=max_position_embeddings,  # rows of the table
            max_positions=self._max_tokens(max_position_embeddings, pad_token_id),  # the longest sequence
        )
        self.pad_token_id = pad_token_id
        self.initializer_range = initializer_range

        self.embeddings, self.layers = bert_stack(locals())
        self.head = BertLMHead(hidden_size, vocab_size, self.head_activation or hidden_act, layer_norm_eps,
                               tied=tie_word_embeddings)
        self.reset_parameters()

    @staticmethod
    def _max_tokens(max_position_embeddings: int, pad_token_id: int) -> int:
        return max_position_embeddings  # positions are 0, 1, ...

    def reset_parameters(self) -> None:
        """transformers' init: N(0, 0.02) weights, zero biases and padding row, identity LayerNorms."""
        normal_init(self, self.initializer_range)
        nn.init.zeros_(self.head.bias)

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        return self.embeddings(input_ids, position_ids)  # (B, T, D)

    def output(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, self.head(x, self.embeddings.word.weight)  # (B, T, D), (B, T, V)

    def _length_limit(self) -> str:
        return f"the {self.max_positions} positions of this {self.family} ({self.positions_name}={self.num_positions})"


def build_bert(config: BertConfig) -> BertDecoder:
    return BertDecoder(**config.model_dump())


# ---- the text encoder -------------------------------------------------------------------------------------


class BertPooler(nn.Module):
    """``tanh(dense(x[:, 0]))``: the first token's state as the sequence's vector (transformers' ``BertPooler``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # (B, D)


class BertTextEncoder(nn.Module):
    """BERT as a bidirectional ``TextEncoder`` with its pooled output (transformers' ``BertModel``): the decoder's
    embeddings and layers without the causal mask and with their cross-attention slots empty, token types read,
    and the pooler. Module names are the decoder's (``embeddings.*``, ``layers.N.*``) plus ``pooler.dense.*``."""

    family = "BERT"
    positions_name = "max_position_embeddings"

    def __init__(self, *, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, hidden_act: str, hidden_dropout_prob: float,
                 attention_probs_dropout_prob: float, max_position_embeddings: int, type_vocab_size: int,
                 initializer_range: float, layer_norm_eps: float, pad_token_id: int):
        super().__init__()
        self.hidden_size, self.vocab_size, self.pad_token_id = hidden_size, vocab_size, pad_token_id
        self.type_vocab_size, self.num_positions = type_vocab_size, max_position_embeddings
        self.max_positions = self._max_tokens(max_position_embeddings, pad_token_id)
        self.embeddings, self.layers = bert_stack(locals())
        self.pooler = BertPooler(hidden_size)
        normal_init(self, initializer_range)

    @staticmethod
    def _max_tokens(max_position_embeddings: int, pad_token_id: int) -> int:
        return max_position_embeddings  # positions are 0, 1, ...

    def positions(self, input_ids: Tensor, past: int = 0) -> Tensor:
        return torch.arange(past, past + input_ids.shape[1], device=input_ids.device)  # (T,)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                output_hidden_states: bool = False) -> TextEncoderOutput:
        input_ids, mask = self._checked(input_ids, attention_mask, token_type_ids)
        x = self.embeddings(input_ids, self.positions(input_ids, 0), token_type_ids)  # (B, T, D)
        seen = [x]
        for layer in self.layers:
            x = layer(x, mask, False, None, None, None)  # (B, T, D)
            seen.append(x)
        return TextEncoderOutput(last_hidden_state=x, pooler_output=self.pooler(x),
                                 hidden_states=tuple(seen) if output_hidden_states else None)

    def _check_types(self, token_type_ids: Any, shape: tuple[int, ...]) -> None:
        want = f"an integer tensor of shape {shape} with types in [0, {self.type_vocab_size - 1}]"
        if not isinstance(token_type_ids, Tensor) or token_type_ids.is_floating_point() or \
                tuple(token_type_ids.shape) != shape:
            raise input_error("token_type_ids", "is not an integer tensor shaped like input_ids",
                              given=tuple(token_type_ids.shape) if isinstance(token_type_ids, Tensor) else
                              type(token_type_ids).__name__, expected=want, fix="pass one token type per input id")
        if token_type_ids.numel() and not token_type_ids.is_meta:
            lo, hi = (int(t) for t in torch.aminmax(token_type_ids))
            if lo < 0 or hi >= self.type_vocab_size:
                raise input_error("token_type_ids", f"holds types from {lo} to {hi}", expected=want,
                                  fix=f"use types below type_vocab_size={self.type_vocab_size} (0 for a single text)")

    def _checked(self, input_ids: Tensor, attention_mask: Tensor | None,
                 token_type_ids: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The ids, and the SDPA mask (B, 1, 1, T), True = attend; a wrong input is an ``InputError``."""
        home = home_tensor(self.embeddings)
        B = input_ids.shape[0] if isinstance(input_ids, Tensor) and input_ids.dim() else 0
        input_ids, _ = check_token_ids("input_ids", input_ids, B, self.vocab_size, home, max_len=self.max_positions)
        shape = tuple(input_ids.shape)
        if shape[1] == 0:
            raise input_error("input_ids", "holds no tokens", given=shape, expected="(B, T) with T >= 1",
                              fix="give every text at least one token (the tokenizer adds [CLS] / <s>)")
        if token_type_ids is not None:
            self._check_types(token_type_ids, shape)
        if attention_mask is None:
            return input_ids, None
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != shape:
            raise input_error("attention_mask", "is not shaped like input_ids",
                              given=tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else
                              type(attention_mask).__name__, expected=f"a 0/1 tensor of shape {shape}",
                              fix="1 marks a real token, 0 padding: one per input id")
        keys = attention_mask.to(input_ids.device).bool()  # (B, T)
        keys = keys | ~keys.any(dim=-1, keepdim=True)  # an all-padding row attends everywhere (no NaN), as transformers
        return input_ids, keys[:, None, None, :]  # (B, 1, 1, T)


def build_bert_text_encoder(config: BertConfig) -> BertTextEncoder:
    return BertTextEncoder(**config.model_dump(exclude={"tie_word_embeddings"}))


# ---- transformers interop ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFLayout:
    """Where a BERT-family checkpoint keeps its tensors, and how its config differs from ours.

    ``prefix`` is the base model's name inside a head model (``bert.``); ``head_dense`` / ``head_norm`` are the head's
    dense layer and LayerNorm, ``head_bias`` / ``head_decoder`` its logits bias and (usually tied) output projection.
    """

    family: str
    model_type: str
    prefix: str
    head_dense: str
    head_norm: str
    head_bias: str
    head_decoder: str
    config_cls: type[BertConfig]
    hf_defaults: dict[str, Any] = field(default_factory=dict)  # transformers' defaults where ours differ

    @property
    def head(self) -> dict[str, str]:
        """The head's dense and norm tensors: HF name -> ours."""
        return {f"{hf}.{p}": f"head.{ours}.{p}" for hf, ours in ((self.head_dense, "dense"), (self.head_norm, "norm"))
                for p in ("weight", "bias")}

    def dims(self, hf: dict) -> dict[str, int]:
        base = self.config_cls()
        get = lambda k: hf.get(k) if hf.get(k) is not None else self.hf_defaults.get(k, getattr(base, k))  # noqa: E731
        return {k: get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                                    "max_position_embeddings", "type_vocab_size")}

    def table(self, hf: dict) -> list[Row]:
        """Every tensor of this config, copied as is: HF name (head names as on disk, base names without
        ``prefix``), our name, HF shape (``splice.core.keymap``)."""
        d = self.dims(hf)
        V, D, I = d["vocab_size"], d["hidden_size"], d["intermediate_size"]
        table = self.embedding_rows(d) + [Row(self.head_bias, "head.bias", (V,))]
        table += [Row(hf_name, ours, (D, D) if hf_name.endswith("dense.weight") else (D,))
                  for hf_name, ours in self.head.items()]
        for n in range(d["num_hidden_layers"]):
            table += [row.prefixed(f"encoder.layer.{n}.", f"layers.{n}.") for row in _layer_rows(D, I)]
        if not hf.get("tie_word_embeddings", True):
            table.append(Row(self.head_decoder + ".weight", "head.decoder.weight", (V, D)))
        return table

    @staticmethod
    def embedding_rows(d: dict[str, int]) -> list[Row]:
        V, D, P, TV = d["vocab_size"], d["hidden_size"], d["max_position_embeddings"], d["type_vocab_size"]
        return [
            Row("embeddings.word_embeddings.weight", "embeddings.word.weight", (V, D)),
            Row("embeddings.position_embeddings.weight", "embeddings.position.weight", (P, D)),
            Row("embeddings.token_type_embeddings.weight", "embeddings.token_type.weight", (TV, D)),
            Row("embeddings.LayerNorm.weight", "embeddings.norm.weight", (D,)),
            Row("embeddings.LayerNorm.bias", "embeddings.norm.bias", (D,)),
        ]

    def encoder_table(self, hf: dict) -> list[Row]:
        """The text encoder's tensors (transformers' ``BertModel`` / ``RobertaModel``, pooler included): the
        embeddings, each layer without cross-attention, the pooler."""
        d = self.dims(hf)
        D, I = d["hidden_size"], d["intermediate_size"]
        table = self.embedding_rows(d)
        layer = encoder_layer_rows(D, I)
        for n in range(d["num_hidden_layers"]):
            table += [row.prefixed(f"encoder.layer.{n}.", f"layers.{n}.") for row in layer]
        return table + [Row("pooler.dense.weight", "pooler.dense.weight", (D, D)),
                        Row("pooler.dense.bias", "pooler.dense.bias", (D,))]

    def encoder_interop(self) -> HFInterop:
        """The text encoder's ``HFInterop``: the base model with its pooler, read with or without ``prefix`` (a
        ``*ForMaskedLM`` file's head is an expected extra), written unprefixed as ``BertModel`` / ``RobertaModel``."""
        def from_hf_(sd: dict[str, Tensor], hf: dict) -> tuple[dict[str, Tensor], list[str]]:
            dims = ", ".join(f"{k}={v}" for k, v in self.dims(hf).items())
            return from_hf(sd, self.encoder_table(hf), lambda key: _hf_name(key, self.prefix), dims)

        def to_hf_(sd: dict[str, Tensor], hf: dict) -> dict[str, Tensor]:
            return to_hf(sd, self.encoder_table(hf), layout=f"{self.family} text encoder", fix=STANDARD_ONLY)

        def config_to_hf(values: dict) -> dict:
            values = {k: v for k, v in values.items() if k != "tie_word_embeddings"}
            return {**self.config_to_hf(values), "is_decoder": False, "add_cross_attention": False}

        base = f"(?:{re.escape(self.prefix)})?"
        heads = (r"cls\..+", r"lm_head\..+")  # BERT's and RoBERTa's pre-training heads
        return replace(self.interop(), config_to_hf=config_to_hf, state_dict_from_hf=from_hf_,
                       state_dict_to_hf=to_hf_,
                       ignorable=(base + r"embeddings\.(?:position_ids|token_type_ids)", *heads))

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
        """transformers tensors (``decoder.`` removed; with or without ``prefix``) -> (ours, unused keys).

        The pooler, the next-sentence head, ``position_ids`` buffers and anything unknown are reported unused.
        """
        tied = hf.get("tie_word_embeddings", True)
        decoder_bias = self.head_decoder + ".bias"
        has_decoder_bias = any(_hf_name(key, self.prefix) == decoder_bias for key in sd)

        def name_of(key: str) -> str | None:
            name = _hf_name(key, self.prefix)
            if tied and name.startswith(self.head_decoder + "."):
                return DUPLICATE  # of the word embeddings and of the head bias (torch.save files carry them)
            if name == decoder_bias:
                return self.head_bias  # untied: the bias transformers 5 actually adds
            if name == self.head_bias and not tied and has_decoder_bias:
                return None  # untied in transformers 5: a parameter its forward never reads
            return name

        dims = ", ".join(f"{k}={v}" for k, v in self.dims(hf).items())
        return from_hf(sd, self.table(hf), name_of, dims)

    def state_dict_to_hf(self, sd: dict[str, Tensor], hf: dict) -> dict[str, Tensor]:
        """Ours -> the causal-LM layout (``prefix`` on base names; head names as they are)."""
        def hf_key(name: str) -> str:
            is_head = name in self.head or name.startswith((self.head_bias, self.head_decoder))
            return name if is_head else self.prefix + name

        out = to_hf(sd, self.table(hf), hf_key, layout=self.family, fix=STANDARD_ONLY)
        if "head.bias" in sd and not hf.get("tie_word_embeddings", True):
            out[self.head_decoder + ".bias"] = sd["head.bias"].contiguous()  # untied: transformers 5 reads this copy
        return out

    def interop(self) -> HFInterop:
        base = f"(?:{re.escape(self.prefix)})?"
        ignorable = (base + r"pooler\..+", base + r"embeddings\.(?:position_ids|token_type_ids)",
                     r"cls\.seq_relationship\..+", re.escape(self.head_bias))
        return HFInterop(model_types=(self.model_type,), config_from_hf=self.config_from_hf,
                         state_dict_from_hf=self.state_dict_from_hf, state_dict_to_hf=self.state_dict_to_hf,
                         config_to_hf=self.config_to_hf, ignorable=ignorable)

    def exports(self) -> tuple[Callable, Callable, Callable, Callable, HFInterop]:
        """What a BERT-family plugin module exports: ``config_from_hf, config_to_hf, state_dict_from_hf,
        state_dict_to_hf, HF``."""
        return self.config_from_hf, self.config_to_hf, self.state_dict_from_hf, self.state_dict_to_hf, self.interop()


def _layer_rows(D: int, I: int) -> list[Row]:
    """One layer's rows, names relative to ``encoder.layer.N.`` / ``layers.N.``: the self-attention fills
    ``BertSelfAttention``, the cross-attention the standard adapter (``STANDARD_PARAMS``)."""
    hf = [f"{m}.{p}" for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
          for p in ("weight", "bias")]
    shapes = [(D,) if name.endswith("bias") or "LayerNorm" in name else (D, D) for name in hf]
    own = [f"{m}.{p}" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "norm") for p in ("weight", "bias")]
    P = STANDARD_PARAMS
    cross = [P.q_weight, P.q_bias, P.k_weight, P.k_bias, P.v_weight, P.v_bias, P.out_weight, P.out_bias,
             P.norm_weight, P.norm_bias]
    rows = [Row(f"attention.{h}", f"attention.{o}", shape) for h, o, shape in zip(hf, own, shapes)]
    rows += [Row(f"crossattention.{h}", f"crossattention.{o}", shape) for h, o, shape in zip(hf, cross, shapes)]
    for hf_name, ours, shape in (("intermediate.dense", "mlp.fc1", (I, D)), ("output.dense", "mlp.fc2", (D, I)),
                                 ("output.LayerNorm", "mlp.norm", (D,))):
        rows += [Row(f"{hf_name}.weight", f"{ours}.weight", shape), Row(f"{hf_name}.bias", f"{ours}.bias", shape[:1])]
    return rows


def encoder_layer_rows(D: int, I: int) -> list[Row]:
    """One text-encoder layer's rows (no cross-attention), names relative to ``encoder.layer.N.`` / ``layers.N.``
    (VisualBERT's ``additional_layer`` is one such layer)."""
    return [row for row in _layer_rows(D, I) if not row.ours[0].startswith("crossattention.")]


def _hf_name(key: str, prefix: str) -> str:
    """Strip the base model's prefix; read old files' ``LayerNorm.gamma/beta`` as ``weight/bias``."""
    name = key[len(prefix):] if key.startswith(prefix) else key
    if name.endswith("LayerNorm.gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith("LayerNorm.beta"):
        name = name[: -len("beta")] + "bias"
    return name


LAYOUT = HFLayout(family="BERT", model_type="bert", prefix="bert.", config_cls=BertConfig,
                  head_dense="cls.predictions.transform.dense", head_norm="cls.predictions.transform.LayerNorm",
                  head_bias="cls.predictions.bias", head_decoder="cls.predictions.decoder")
config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf, HF = LAYOUT.exports()
ENCODER_HF = LAYOUT.encoder_interop()
ENCODER_DESCRIPTION = "BERT (Google) as a bidirectional text encoder with its pooler (transformers' BertModel)"


@hookimpl
def register_decoders(register):
    register(
        "bert", build_bert, BertConfig, tiny=dict(TINY), hf=HF,
        description="BERT (Google) as a causal LM: post-norm, learned positions; cross-attention through adapters",
    )


@hookimpl
def register_text_encoders(register):
    register("bert", build_bert_text_encoder, BertConfig, tiny=dict(TINY), hf=ENCODER_HF,
             description=ENCODER_DESCRIPTION)

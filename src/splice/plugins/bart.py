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
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from splice import hookimpl
from splice.core.kernels import Linear, dropout, linear
from splice.core.errors import ConfigError, InputError, Problem, short
from splice.core.interfaces import HFInterop
from splice.core.keymap import DUPLICATE, Row, check_shape, from_hf, to_hf
from splice.core.cache import context_kv
from splice.plugins._shared import ACTIVATION_FNS, NativeDecoder, attention, normal_init, split_heads
from splice.plugins._shared import DecoderConfig
from splice.plugins._shared import FFNWidth, Heads, InitStd, Layers, Positions, Probability, TokenId, Vocab, Width

__all__ = [
    "BartConfig", "BartDecoder", "BartDecoderLayer", "BartSelfAttention", "BartCrossAttention", "build_bart",
    "config_from_hf", "state_dict_from_hf", "state_dict_to_hf", "config_to_hf", "HF", "TINY", "POSITION_OFFSET",
]

Activation = Literal["gelu", "relu", "gelu_new", "silu"]
ACTIVATIONS: tuple[str, ...] = Activation.__args__
POSITION_OFFSET = 2  # BART looks positions up at ``position + 2``
LAYER_NORM_EPS = 1e-5  # BART's LayerNorms use torch's default; transformers has no config field for it

TINY: dict[str, Any] = dict(vocab_size=99, max_position_embeddings=64, d_model=32, decoder_layers=2,
                            decoder_attention_heads=4, decoder_ffn_dim=64)


# ---- config -----------------------------------------------------------------------------------------------


class BartConfig(DecoderConfig):
    """BART's decoder hyper-parameters, named and defaulted as in transformers' ``BartConfig`` (bart-large).

    Only the decoder is built, so a transformers config's ``encoder_*`` keys are not read (``config_to_hf`` mirrors
    the decoder's into them)."""

    vocab_size: Vocab = 50265
    max_position_embeddings: Positions = Field(1024, description="longest sequence (past + new tokens)")
    d_model: Width = Field(1024, description="hidden width D, also the cross-attention context width")
    decoder_layers: Layers = 12
    decoder_attention_heads: Heads = 16
    decoder_ffn_dim: FFNWidth = 4096
    activation_function: Activation = "gelu"
    scale_embedding: bool = Field(False, description="multiply token embeddings by sqrt(d_model)")
    dropout: Probability = 0.1
    attention_dropout: Probability = 0.0
    activation_dropout: Probability = 0.0
    decoder_layerdrop: Probability = 0.0
    init_std: InitStd = 0.02
    tie_word_embeddings: bool = True
    pad_token_id: TokenId | None = 1
    bos_token_id: TokenId | None = 0
    eos_token_id: int | Annotated[list[int], Field(min_length=1, max_length=64)] | None = 2  # ids: _check
    decoder_start_token_id: TokenId | None = 2

    width_and_heads = ("d_model", "decoder_attention_heads")

    @field_validator("eos_token_id", mode="before")
    @classmethod
    def _ids_not_booleans(cls, v: Any) -> Any:
        if isinstance(v, bool) or isinstance(v, list) and any(isinstance(i, bool) for i in v):
            raise ValueError("eos_token_id holds a boolean; expected a token id or a list of them; fix: write the "
                             "id as a number")
        return v

    @model_validator(mode="after")
    def _check(self) -> "BartConfig":
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for name, ids in (("pad_token_id", [self.pad_token_id]), ("bos_token_id", [self.bos_token_id]),
                          ("eos_token_id", eos), ("decoder_start_token_id", [self.decoder_start_token_id])):
            bad = [i for i in ids if i is not None and not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(
                    f"{name}={short(getattr(self, name))} is outside the vocabulary; expected ids in "
                    f"[0, {self.vocab_size - 1}] (vocab_size={self.vocab_size}); fix: set {name} to an id of the "
                    f"tokenizer, or grow vocab_size"
                )
        return self


# ---- blocks -----------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    """Multi-head attention weights in BART's layout; queries scaled by ``head_dim ** -0.5`` as BART does."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.scaling = (d_model // heads) ** -0.5
        self.dropout_p = dropout
        self.q_proj = Linear(d_model, d_model)
        self.k_proj = Linear(d_model, d_model)
        self.v_proj = Linear(d_model, d_model)
        self.out_proj = Linear(d_model, d_model)

    def _split(self, x: Tensor) -> Tensor:
        return split_heads(x, self.heads)  # (B, nh, T, hs)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, cache: Any = None,
                layer: int = 0) -> Tensor:
        y = attention(q, k, v, mask, is_causal=is_causal, scale=self.scaling, cache=cache, layer=layer,
                      dropout_p=self.dropout_p if self.training else 0.0)  # (B, T, D)
        return self.out_proj(y)  # (B, T, D)


class BartSelfAttention(_Attention):
    """Causal self-attention; keys/values go through the ``KVCache`` when one is given."""

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, cache: Any, layer: int) -> Tensor:
        q, k, v = (self._split(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))  # each (B, nh, T, hs)
        return self._attend(q, k, v, mask, is_causal, cache, layer)  # (B, T, D)


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
        self.fc1 = Linear(d_model, ffn_dim)
        self.fc2 = Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.act = ACTIVATION_FNS[activation]
        self.dropout_p, self.activation_dropout = dropout, activation_dropout

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, context: Tensor | None,
                context_mask: Tensor | None, cache: Any) -> Tensor:
        """One layer: shapes and the mask as ``NativeDecoder`` describes them."""
        y = self.self_attn(x, mask, is_causal, cache, self.index)  # (B, T, D)
        x = self.self_attn_layer_norm(x + dropout(y, self.dropout_p, self.training))
        kv = context_kv(self.encoder_attn, context, cache, self.index)  # each (B, nh, N, hs) or None
        if kv is not None or context is not None:  # without context transformers skips the block; so do we
            y = self.encoder_attn(x, context=context, context_mask=context_mask, kv=kv)  # (B, T, D)
            x = self.encoder_attn_layer_norm(x + dropout(y, self.dropout_p, self.training))  # (B, T, D)
        h = dropout(self.act(self.fc1(x)), self.activation_dropout, self.training)  # (B, T, F)
        return self.final_layer_norm(x + dropout(self.fc2(h), self.dropout_p, self.training))  # (B, T, D)


# ---- model ------------------------------------------------------------------------------------------------


class BartDecoder(NativeDecoder):
    """BART's decoder with its LM head, native cross-attention in every layer (``TextDecoder``)."""

    family = "BART"
    native_cross_attention = True
    norm_position = "post"
    positions_name = "max_position_embeddings"

    def __init__(
        self,
        vocab_size: int = 50265, max_position_embeddings: int = 1024, d_model: int = 1024, decoder_layers: int = 12,
        decoder_attention_heads: int = 16, decoder_ffn_dim: int = 4096, activation_function: str = "gelu",
        scale_embedding: bool = False, dropout: float = 0.1, attention_dropout: float = 0.0,
        activation_dropout: float = 0.0, decoder_layerdrop: float = 0.0, init_std: float = 0.02,
        tie_word_embeddings: bool = True, pad_token_id: int | None = 1, bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 2, decoder_start_token_id: int | None = 2,
    ):
        super().__init__(hidden_size=d_model, vocab_size=vocab_size, n_head=decoder_attention_heads,
                         max_positions=max_position_embeddings, eps=LAYER_NORM_EPS, attn_dropout=attention_dropout)
        self.layerdrop = decoder_layerdrop
        self.init_std = init_std
        self.tie_word_embeddings = tie_word_embeddings
        self.embed_scale = math.sqrt(d_model) if scale_embedding else 1.0
        self.token_ids = dict(pad=pad_token_id, bos=bos_token_id, eos=eos_token_id,
                              decoder_start=decoder_start_token_id)

        self.embed_tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id)
        self.embed_positions = nn.Embedding(max_position_embeddings + POSITION_OFFSET, d_model)
        self.layernorm_embedding = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.dropout_p = dropout
        self.layers = nn.ModuleList(
            BartDecoderLayer(i, d_model, decoder_attention_heads, decoder_ffn_dim, activation_function, dropout,
                             attention_dropout, activation_dropout)
            for i in range(decoder_layers)
        )
        self.lm_head = None if tie_word_embeddings else Linear(d_model, vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """transformers' init: N(0, init_std) weights, zero biases and padding row, identity LayerNorms."""
        normal_init(self, self.init_std)

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        # position_ids come without BART's offset; positions count from the past whatever the padding
        x = self.embed_tokens(input_ids) * self.embed_scale  # (B, T, D)
        x = x + self.embed_positions(position_ids + POSITION_OFFSET)  # (B, T, D)
        return dropout(self.layernorm_embedding(x), self.dropout_p, self.training)  # (B, T, D)

    def output(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, (linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x))  # (B, T, V)

    def _check_position_ids(self, position_ids: Tensor) -> None:
        lo, hi = int(position_ids.min()), int(position_ids.max())
        if lo < 0 or hi >= self.max_positions:
            raise InputError(
                f"position_ids span {lo}..{hi}, but max_position_embeddings={self.max_positions}; "
                f"fix: keep positions in [0, {self.max_positions - 1}] (BART's offset of 2 is added inside)"
            )


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


def _embed_shape(hf_config: dict) -> tuple[int, int]:
    return hf_config.get("vocab_size", 50265), hf_config.get("d_model", 1024)


def _table(hf_config: dict) -> list[Row]:
    """Every tensor, copied as is under the same name (``model.decoder.`` removed on disk), with its shape."""
    V, D = _embed_shape(hf_config)
    Fd = hf_config.get("decoder_ffn_dim", 4096)
    P = hf_config.get("max_position_embeddings", 1024) + POSITION_OFFSET
    shapes = {
        "embed_tokens.weight": (V, D),
        "embed_positions.weight": (P, D),
        "layernorm_embedding.weight": (D,),
        "layernorm_embedding.bias": (D,),
    }
    if not hf_config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (V, D)
    for n in range(hf_config.get("decoder_layers", 12)):
        p = f"layers.{n}."
        for attn in ("self_attn", "encoder_attn"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{p}{attn}.{proj}.weight"] = (D, D)
                shapes[f"{p}{attn}.{proj}.bias"] = (D,)
        for norm in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
            shapes[f"{p}{norm}.weight"] = (D,)
            shapes[f"{p}{norm}.bias"] = (D,)
        shapes[f"{p}fc1.weight"], shapes[f"{p}fc1.bias"] = (Fd, D), (Fd,)
        shapes[f"{p}fc2.weight"], shapes[f"{p}fc2.bias"] = (D, Fd), (D,)
    return [Row(name, name, shape) for name, shape in shapes.items()]


def _sizes(hf_config: dict) -> str:
    return str({k: hf_config.get(k) for k in ("d_model", "decoder_ffn_dim", "vocab_size", "max_position_embeddings")})


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
    table = _table(hf_config)
    tied = hf_config.get("tie_word_embeddings", True)

    def name_of(key: str) -> str:
        name = key.removeprefix("model.")
        if name == _SHARED:
            return DUPLICATE  # read below, where the decoder's own embed_tokens is missing
        name = name.removeprefix("decoder.")
        # a tied lm_head duplicates the (shared) embedding matrix (torch.save .bin files carry it)
        return DUPLICATE if name == "lm_head.weight" and tied else name

    mapped, unused = from_hf(sd, table, name_of, _sizes(hf_config))
    shared = [(key, tensor) for key, tensor in sd.items() if key.removeprefix("model.") == _SHARED]
    if shared and "embed_tokens.weight" not in mapped:
        key, tensor = shared[-1]
        check_shape(key, tensor, _embed_shape(hf_config), _sizes(hf_config))
        mapped["embed_tokens.weight"] = tensor  # decoder.embed_tokens.weight <- shared.weight
        note = (f"embed_tokens.weight (and the tied LM head) filled from {key}: this file has no decoder "
                "embedding of its own (transformers' BartForCausalLM.from_pretrained leaves it random here)")
        return mapped, unused, [note]
    return mapped, unused


def state_dict_to_hf(sd: dict[str, Tensor], hf_config: dict) -> dict[str, Tensor]:
    """Ours -> ``BartForCausalLM`` on-disk names (``model.decoder.`` prefix; ``lm_head.weight`` only when untied)."""
    return to_hf(
        sd, _table(hf_config), lambda name: name if name == "lm_head.weight" else "model.decoder." + name,
        layout="BartForCausalLM", required=True,
        fix="export with the config the model was built from, or save in splice format",
    )


HF = HFInterop(model_types=("bart",), config_from_hf=config_from_hf, state_dict_from_hf=state_dict_from_hf,
               state_dict_to_hf=state_dict_to_hf, config_to_hf=config_to_hf,
               ignorable=(r"final_logits_bias", r"(?:model\.)?encoder\..+", r".*\.version"))


@hookimpl
def register_decoders(register):
    register(
        "bart_decoder", build_bart, BartConfig, aliases=("bart",), tiny=dict(TINY), hf=HF,
        description="BART's decoder (facebook), post-norm with learned positions and native cross-attention",
    )

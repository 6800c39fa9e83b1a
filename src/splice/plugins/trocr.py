"""TrOCR's decoder as a native splice decoder: config, blocks, model, and the transformers checkpoint mapping.

The decoder of transformers' ``TrOCRForCausalLM`` (microsoft/trocr-*): BART's post-norm layers with their own
(native) cross-attention, so adapters do not apply (``native_cross_attention = True``). What TrOCR adds to BART:

- the cross-attention's keys/values read ``cross_attention_hidden_size``-wide tokens (TrOCR-small: DeiT's 384 into a
  256-wide decoder; TrOCR-base: 768 into 1024), reported as ``context_width``: the encoder-decoder kind then adds no
  projection, as transformers adds no ``enc_to_dec_proj`` when ``cross_attention_hidden_size`` is set;
- positions are learned (``use_learned_position_embeddings``, BART's table looked up at ``position + 2``) or
  fairseq's sinusoids (no weights): a token's id is ``pad + 1 + position``, counting real tokens only, and padding
  tokens get the padding id's row, zeros; the count continues from the cache length during generation;
- ``layernorm_embedding`` is optional, and the head is ``output_projection`` (tied to ``embed_tokens`` unless
  ``tie_word_embeddings`` is false).

Layout (module state-dict names; transformers' minus the ``model.decoder.`` prefix, the head unprefixed)::

    embed_tokens.weight (V, D)   [embed_positions.weight (P + 2, D), learned]   [layernorm_embedding.*]
    layers.N.self_attn.{q_proj,k_proj,v_proj,out_proj}.* (D, D)               layers.N.self_attn_layer_norm.*
    layers.N.encoder_attn.{q_proj,out_proj}.* (D, D)  {k_proj,v_proj}.* (D, C)  layers.N.encoder_attn_layer_norm.*
    layers.N.fc1.{weight (F, D), bias}   layers.N.fc2.{weight (D, F), bias}   layers.N.final_layer_norm.*
    [output_projection.weight (V, D) only when untied]

with C = ``cross_attention_hidden_size`` (else D). The config, attention and layers are BART's
(``splice.plugins.bart``), widened where TrOCR is wider.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from splice import hookimpl
from splice.core.errors import ConfigError
from splice.core.interfaces import HFInterop
from splice.core.kernels import Linear, dropout, linear
from splice.core.keymap import DUPLICATE, Row, from_hf, to_hf
from splice.plugins import bart
from splice.plugins._shared import NativeDecoder, Positions, Width, normal_init
from splice.plugins.bart import LAYER_NORM_EPS, POSITION_OFFSET, BartConfig, BartCrossAttention, BartDecoderLayer

__all__ = [
    "TrOCRConfig", "TrOCRDecoder", "TrOCRDecoderLayer", "TrOCRCrossAttention", "build_trocr", "sinusoids",
    "config_from_hf", "config_to_hf", "state_dict_from_hf", "state_dict_to_hf", "HF", "TINY",
]

TINY: dict[str, Any] = dict(vocab_size=99, max_position_embeddings=64, d_model=32, decoder_layers=2,
                            decoder_attention_heads=4, decoder_ffn_dim=64)
TRANSFORMERS_DEFAULTS: dict[str, Any] = dict(vocab_size=50265, d_model=1024, decoder_layers=12,
                                             decoder_ffn_dim=4096, max_position_embeddings=512)


# ---- config -----------------------------------------------------------------------------------------------


class TrOCRConfig(BartConfig):
    """TrOCR's decoder hyper-parameters, named and defaulted as in transformers' ``TrOCRConfig`` (BART's fields,
    512 positions, and the three below)."""

    d_model: Width = Field(1024, description="hidden width D")
    max_position_embeddings: Positions = Field(512, description="longest sequence (past + new tokens)")
    use_learned_position_embeddings: bool = Field(True, description="a learned position table (else sinusoids)")
    layernorm_embedding: bool = Field(True, description="a LayerNorm after the token + position embeddings")
    cross_attention_hidden_size: Width | None = Field(
        None, description="width of the tokens the cross-attention reads (the encoder's); None: d_model")

    width_and_heads = ("d_model", "decoder_attention_heads")

    @model_validator(mode="after")
    def _sinusoids_fit(self) -> "TrOCRConfig":
        if self.use_learned_position_embeddings:
            return self
        if self.pad_token_id is None:
            raise ValueError("pad_token_id=None with use_learned_position_embeddings=false; expected a padding id: "
                             "sinusoidal positions count from it (fairseq); fix: set pad_token_id (TrOCR uses 1)")
        if self.d_model < 4:
            raise ValueError(f"d_model={self.d_model} is too narrow for sinusoidal positions; expected d_model >= 4 "
                             "(their frequencies divide by d_model / 2 - 1); fix: raise d_model or use learned "
                             "positions (use_learned_position_embeddings: true)")
        return self


# ---- blocks -----------------------------------------------------------------------------------------------


class TrOCRCrossAttention(BartCrossAttention):
    """BART's cross-attention whose keys/values project ``context_width``-wide tokens (``kdim``/``vdim``)."""

    def __init__(self, d_model: int, heads: int, dropout: float, context_width: int):
        super().__init__(d_model, heads, dropout)
        self.k_proj = Linear(context_width, d_model)  # (D, C)
        self.v_proj = Linear(context_width, d_model)  # (D, C)
        self.context_width = context_width


class TrOCRDecoderLayer(BartDecoderLayer):
    """BART's post-norm layer (self-attention, cross-attention, feed-forward) with a wider cross-attention input."""

    def __init__(self, index: int, d_model: int, heads: int, ffn_dim: int, activation: str, dropout: float,
                 attention_dropout: float, activation_dropout: float, context_width: int):
        super().__init__(index, d_model, heads, ffn_dim, activation, dropout, attention_dropout, activation_dropout)
        if context_width != d_model:
            self.encoder_attn = TrOCRCrossAttention(d_model, heads, attention_dropout, context_width)


def sinusoids(ids: Tensor, dim: int, padding_idx: int) -> Tensor:
    """fairseq's sinusoidal embedding of each position id (..., dim), computed as transformers' table is:
    ``[sin(id * f), cos(id * f)]`` with ``f_j = 10000 ** (-j / (dim // 2 - 1))``, a zero column last when ``dim`` is
    odd, and zeros for the padding id."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=ids.device).float() * -(math.log(10000) / (half - 1)))  # (dim/2,)
    angles = ids.float()[..., None] * freq  # (..., dim/2)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (..., 2 * (dim/2))
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (..., dim)
    return emb.masked_fill((ids == padding_idx)[..., None], 0.0)  # (..., dim)


# ---- model ------------------------------------------------------------------------------------------------


class TrOCRDecoder(NativeDecoder):
    """TrOCR's decoder with its output projection, native cross-attention in every layer (``TextDecoder``)."""

    family = "TrOCR"
    native_cross_attention = True
    norm_position = "post"
    positions_name = "max_position_embeddings"

    def __init__(
        self, vocab_size: int = 50265, d_model: int = 1024, decoder_layers: int = 12,
        decoder_attention_heads: int = 16, decoder_ffn_dim: int = 4096, activation_function: str = "gelu",
        max_position_embeddings: int = 512, dropout: float = 0.1, attention_dropout: float = 0.0,
        activation_dropout: float = 0.0, decoder_start_token_id: int | None = 2, init_std: float = 0.02,
        decoder_layerdrop: float = 0.0, scale_embedding: bool = False, use_learned_position_embeddings: bool = True,
        layernorm_embedding: bool = True, pad_token_id: int | None = 1, bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 2, cross_attention_hidden_size: int | None = None,
        tie_word_embeddings: bool = True,
    ):
        super().__init__(hidden_size=d_model, vocab_size=vocab_size, n_head=decoder_attention_heads,
                         max_positions=max_position_embeddings, eps=LAYER_NORM_EPS, attn_dropout=attention_dropout)
        self.context_width = cross_attention_hidden_size or d_model  # the encoder-decoder kind reads this
        self.layerdrop, self.init_std, self.dropout_p = decoder_layerdrop, init_std, dropout
        self.tie_word_embeddings = tie_word_embeddings
        self.embed_scale = math.sqrt(d_model) if scale_embedding else 1.0
        self.pad_token_id = pad_token_id
        self.token_ids = dict(pad=pad_token_id, bos=bos_token_id, eos=eos_token_id,
                              decoder_start=decoder_start_token_id)

        self.embed_tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id)
        self.learned_positions = use_learned_position_embeddings
        self.embed_positions = (nn.Embedding(max_position_embeddings + POSITION_OFFSET, d_model)
                                if use_learned_position_embeddings else None)
        self.layernorm_embedding = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS) if layernorm_embedding else None
        self.layers = nn.ModuleList(
            TrOCRDecoderLayer(i, d_model, decoder_attention_heads, decoder_ffn_dim, activation_function, dropout,
                              attention_dropout, activation_dropout, self.context_width)
            for i in range(decoder_layers)
        )
        self.output_projection = None if tie_word_embeddings else Linear(d_model, vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """transformers' init: N(0, init_std) weights, zero biases and padding row, identity LayerNorms."""
        normal_init(self, self.init_std)

    def positions(self, input_ids: Tensor, past: int) -> Tensor:
        if self.learned_positions:
            return super().positions(input_ids, past)  # (T,): past, past + 1, ... whatever the padding
        # sinusoids count real tokens only (fairseq), continuing from the cache; padding tokens get -1 (zero row)
        real = input_ids.ne(self.pad_token_id).long()  # (B, T)
        return (torch.cumsum(real, dim=1) + past) * real - 1  # (B, T)

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale  # (B, T, D)
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids + POSITION_OFFSET)  # (B, T, D)
        else:  # ids pad + 1 + position; -1 (padding) lands on the padding id, whose row is zero
            ids = position_ids.to(x.device) + self.pad_token_id + 1  # (B, T) or (T,)
            x = x + sinusoids(ids, self.hidden_size, self.pad_token_id).to(x.dtype)  # (B, T, D)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)  # (B, T, D)
        return dropout(x, self.dropout_p, self.training)  # (B, T, D)

    def output(self, x: Tensor) -> tuple[Tensor, Tensor]:
        head = self.output_projection
        return x, (linear(x, self.embed_tokens.weight) if head is None else head(x))  # (B, T, V)


def build_trocr(config: TrOCRConfig) -> TrOCRDecoder:
    return TrOCRDecoder(**config.model_dump())


# ---- transformers interop ---------------------------------------------------------------------------------

_OWN = ("use_learned_position_embeddings", "layernorm_embedding", "cross_attention_hidden_size")


def config_from_hf(hf: dict) -> dict:
    """A transformers TrOCR ``config.json`` part (dict) -> ``TrOCRConfig`` keyword arguments."""
    try:
        kwargs = bart.config_from_hf(hf)  # BART's fields, activation checked
    except ConfigError as exc:
        raise ConfigError(exc.problems, source="transformers TrOCR config") from None
    kwargs.update({k: hf[k] for k in _OWN if hf.get(k) is not None})
    return kwargs


def config_to_hf(values: dict) -> dict:
    """``TrOCRConfig`` values -> a transformers TrOCR config dict (``TrOCRForCausalLM``, as a VED decoder).

    ``cross_attention_hidden_size`` is written only when it differs from ``d_model``: transformers requires it to
    equal the encoder's width, and adds no ``enc_to_dec_proj`` when it is set; an equal one reads the same as none.
    """
    out = {"model_type": "trocr", **values, "is_decoder": True, "add_cross_attention": True,
           "is_encoder_decoder": False}
    if out.get("cross_attention_hidden_size") == out.get("d_model"):
        out["cross_attention_hidden_size"] = None
    return out


def _sizes(hf: dict) -> dict[str, Any]:
    """The config values that shape the tensors, transformers' defaults where the config leaves one out."""
    sizes = {key: default if hf.get(key) is None else hf[key] for key, default in TRANSFORMERS_DEFAULTS.items()}
    sizes["cross_attention_hidden_size"] = hf.get("cross_attention_hidden_size") or sizes["d_model"]
    return sizes


def _table(hf: dict) -> list[Row]:
    """Every tensor, copied as is under the same name (``model.decoder.`` removed on disk), with its shape."""
    s = _sizes(hf)
    V, D, Fd, C = s["vocab_size"], s["d_model"], s["decoder_ffn_dim"], s["cross_attention_hidden_size"]
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (V, D)}
    if hf.get("use_learned_position_embeddings", True):
        shapes["embed_positions.weight"] = (s["max_position_embeddings"] + POSITION_OFFSET, D)
    if hf.get("layernorm_embedding", True):
        shapes.update({"layernorm_embedding.weight": (D,), "layernorm_embedding.bias": (D,)})
    if not hf.get("tie_word_embeddings", True):
        shapes["output_projection.weight"] = (V, D)
    for n in range(s["decoder_layers"]):
        width = {"self_attn.k_proj": D, "self_attn.v_proj": D, "encoder_attn.k_proj": C, "encoder_attn.v_proj": C}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            for attn in ("self_attn", "encoder_attn"):
                shapes[f"layers.{n}.{attn}.{proj}.weight"] = (D, width.get(f"{attn}.{proj}", D))
                shapes[f"layers.{n}.{attn}.{proj}.bias"] = (D,)
        for name, shape in (("fc1.weight", (Fd, D)), ("fc1.bias", (Fd,)), ("fc2.weight", (D, Fd)), ("fc2.bias", (D,))):
            shapes[f"layers.{n}.{name}"] = shape
        for norm in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
            shapes.update({f"layers.{n}.{norm}.weight": (D,), f"layers.{n}.{norm}.bias": (D,)})
    return [Row(name, name, shape) for name, shape in shapes.items()]


_HEAD = "output_projection.weight"  # unprefixed on disk, beside ``model.decoder.*``


def state_dict_from_hf(sd: dict[str, Tensor], hf_config: dict) -> tuple[dict[str, Tensor], list[str]]:
    """transformers TrOCR tensors (a VisionEncoderDecoder's ``decoder.`` removed, or a ``TrOCRForCausalLM`` file)
    -> (ours, unused keys). A tied ``output_projection.weight`` (``.bin`` files carry it) is the embedding again;
    transformers 4's ``embed_positions._float_tensor`` buffer and ``*.version`` entries are returned unused."""
    tied = hf_config.get("tie_word_embeddings", True)

    def name_of(key: str) -> str:
        if key == _HEAD:
            return DUPLICATE if tied else key
        return key.removeprefix("model.decoder.")

    return from_hf(sd, _table(hf_config), name_of, str(_sizes(hf_config)))


def _on_disk(name: str) -> str:
    return name if name == _HEAD else f"model.decoder.{name}"


def state_dict_to_hf(sd: dict[str, Tensor], hf_config: dict) -> dict[str, Tensor]:
    """Ours -> ``TrOCRForCausalLM`` on-disk names (``model.decoder.`` prefix; the head only when untied)."""
    fix = "export with the config the model was built from, or save in splice format"
    return to_hf(sd, _table(hf_config), _on_disk, layout="TrOCRForCausalLM", required=True, fix=fix)


HF = HFInterop(
    model_types=("trocr",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    state_dict_from_hf=state_dict_from_hf, state_dict_to_hf=state_dict_to_hf,
    ignorable=(r"model\.decoder\.embed_positions\._float_tensor", r".*\.version"),  # transformers 4's buffers
)


@hookimpl
def register_decoders(register):
    register(
        "trocr", build_trocr, TrOCRConfig, tiny=dict(TINY), hf=HF,
        description="TrOCR's decoder (Microsoft, text recognition): BART's post-norm layers, learned or sinusoidal "
        "positions, native cross-attention reading the encoder's width",
    )

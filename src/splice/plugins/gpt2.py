"""GPT2 as a native splice decoder: config, blocks, model, and the transformers checkpoint mapping.

Layout (module state-dict names, ``nn.Linear`` everywhere so weights are ``(out, in)``)::

    wte.weight (V, D)   wpe.weight (P, D)   ln_f.{weight,bias}   [lm_head.weight (V, D) only when untied]
    h.N.ln_1.*   h.N.attn.c_attn.{weight (3D, D), bias}   h.N.attn.c_proj.*
    h.N.ln_2.*   h.N.mlp.c_fc.{weight (I, D), bias}        h.N.mlp.c_proj.{weight (D, I), bias}
    h.N.crossattention.*   the module an adapter installed (empty slot by default), e.g. for ``standard``:
                           norm, q_proj, k_proj, v_proj, o_proj

transformers stores the same tensors as ``Conv1D`` (``(in, out)``), keeps the cross-attention LayerNorm beside
the attention (``h.N.ln_cross_attn``) and packs the cross K/V into one ``crossattention.c_attn``;
``state_dict_from_hf`` / ``state_dict_to_hf`` translate through one table (``splice.core.keymap``), checking every
shape.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from splice import hookimpl
from splice.adapters.cross_attention import STANDARD_PARAMS
from splice.core.kernels import Linear, dropout, linear
from splice.core.errors import ConfigError, InputError, Problem
from splice.core.interfaces import DecoderOutput, HFInterop
from splice.core.keymap import DUPLICATE, Row, from_hf, to_hf
from splice.core.cache import context_kv
from splice.plugins._shared import ACTIVATION_FNS, NativeDecoder, attention, normal_init
from splice.plugins._shared import STANDARD_ONLY, DecoderConfig
from splice.plugins._shared import Eps, FFNWidth, Heads, InitStd, Layers, Positions, Probability, Vocab, Width

__all__ = [
    "GPT2Config", "GPT2Decoder", "GPT2Block", "GPT2Attention", "GPT2MLP", "build_gpt2", "config_from_hf",
    "state_dict_from_hf", "state_dict_to_hf", "HF", "TINY",
]

Activation = Literal["gelu_new", "gelu", "relu", "gelu_pytorch_tanh", "silu"]
ACTIVATIONS: tuple[str, ...] = Activation.__args__

TINY: dict[str, Any] = dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4)


# ---- config -----------------------------------------------------------------------------------------------


class GPT2Config(DecoderConfig):
    """GPT2's hyper-parameters, named and defaulted as in transformers' ``GPT2Config``."""

    vocab_size: Vocab = 50257
    n_positions: Positions = Field(1024, description="longest sequence (past + new tokens) the model can read")
    n_embd: Width = Field(768, description="hidden width D")
    n_layer: Layers = 12
    n_head: Heads = 12
    n_inner: FFNWidth | None = Field(None, description="MLP width; None = 4 * n_embd")
    activation_function: Activation = "gelu_new"
    layer_norm_epsilon: Eps = 1e-5
    resid_pdrop: Probability = 0.1
    embd_pdrop: Probability = 0.1
    attn_pdrop: Probability = 0.1
    initializer_range: InitStd = 0.02
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    width_and_heads = ("n_embd", "n_head")


# ---- blocks -----------------------------------------------------------------------------------------------


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention; keys/values go through the ``KVCache`` when one is given."""

    def __init__(self, n_embd: int, n_head: int, attn_pdrop: float, resid_pdrop: float, scale: float):
        super().__init__()
        self.n_head = n_head
        self.scale = scale
        self.attn_pdrop = attn_pdrop
        self.c_attn = Linear(n_embd, 3 * n_embd)
        self.c_proj = Linear(n_embd, n_embd)
        self.resid_pdrop = resid_pdrop

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, cache: Any, layer: int) -> Tensor:
        B, T, D = x.shape
        qkv = self.c_attn(x).reshape(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, k, v = qkv.unbind(0)  # each (B, nh, T, hs)
        y = attention(q, k, v, mask, is_causal=is_causal, scale=self.scale, cache=cache, layer=layer,
                      dropout_p=self.attn_pdrop if self.training else 0.0)  # (B, T, D)
        return dropout(self.c_proj(y), self.resid_pdrop, self.training)  # (B, T, D)


class GPT2MLP(nn.Module):
    def __init__(self, n_embd: int, n_inner: int, activation: str, resid_pdrop: float):
        super().__init__()
        self.c_fc = Linear(n_embd, n_inner)
        self.c_proj = Linear(n_inner, n_embd)
        self.act = ACTIVATION_FNS[activation]
        self.resid_pdrop = resid_pdrop

    def forward(self, x: Tensor) -> Tensor:
        return dropout(self.c_proj(self.act(self.c_fc(x))), self.resid_pdrop, self.training)  # (B, T, D)


class GPT2Block(nn.Module):
    """Pre-norm block: self-attention, then the cross-attention slot (when filled), then the MLP."""

    def __init__(self, index: int, n_embd: int, n_head: int, n_inner: int, activation: str, eps: float,
                 attn_pdrop: float, resid_pdrop: float, scale: float):
        super().__init__()
        self.index = index
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.attn = GPT2Attention(n_embd, n_head, attn_pdrop, resid_pdrop, scale)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.mlp = GPT2MLP(n_embd, n_inner, activation, resid_pdrop)
        # the slot an adapter fills; a registered child, so its parameters are h.N.crossattention.*
        self.register_module("crossattention", None)

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, context: Tensor | None,
                context_mask: Tensor | None, cache: Any) -> Tensor:
        """One layer: shapes and the mask as ``NativeDecoder`` describes them."""
        x = x + self.attn(self.ln_1(x), mask, is_causal, cache, self.index)  # (B, T, D)
        if self.crossattention is not None:
            kv = context_kv(self.crossattention, context, cache, self.index)  # each (B, nh, N, hs) or None
            if kv is not None or context is not None:
                x = self.crossattention(x, context=context, context_mask=context_mask, kv=kv)  # (B, T, D)
        return x + self.mlp(self.ln_2(x))  # (B, T, D)


# ---- model ------------------------------------------------------------------------------------------------


class GPT2Decoder(NativeDecoder):
    """GPT2 language model with one empty cross-attention slot per layer (``TextDecoder``)."""

    family = "GPT2"
    norm_position = "pre"
    positions_name = "n_positions"

    def __init__(
        self,
        vocab_size: int = 50257, n_positions: int = 1024, n_embd: int = 768, n_layer: int = 12, n_head: int = 12,
        n_inner: int | None = None, activation_function: str = "gelu_new", layer_norm_epsilon: float = 1e-5,
        resid_pdrop: float = 0.1, embd_pdrop: float = 0.1, attn_pdrop: float = 0.1, initializer_range: float = 0.02,
        tie_word_embeddings: bool = True, scale_attn_weights: bool = True,
        scale_attn_by_inverse_layer_idx: bool = False,
    ):
        super().__init__(hidden_size=n_embd, vocab_size=vocab_size, n_head=n_head, max_positions=n_positions,
                         eps=layer_norm_epsilon, attn_dropout=attn_pdrop)
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings

        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.embd_pdrop = embd_pdrop
        blocks = []
        for i in range(n_layer):
            scale = (n_embd // n_head) ** -0.5 if scale_attn_weights else 1.0
            if scale_attn_by_inverse_layer_idx:
                scale /= i + 1
            blocks.append(GPT2Block(i, n_embd, n_head, n_inner or 4 * n_embd, activation_function,
                                    layer_norm_epsilon, attn_pdrop, resid_pdrop, scale))
        self.h = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(n_embd, eps=layer_norm_epsilon)
        self.lm_head = None if tie_word_embeddings else Linear(n_embd, vocab_size, bias=False)
        self._inputs_embeds: Tensor | None = None  # set during a forward given inputs_embeds
        self.reset_parameters()

    @property
    def layers(self) -> nn.ModuleList:
        return self.h  # transformers' name, so state-dict names map one to one

    def reset_parameters(self) -> None:
        """transformers' init: N(0, 0.02) weights, zero biases; the residual projections scaled by 1/sqrt(2 L)."""
        normal_init(self, self.initializer_range)
        for block in self.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, std=self.initializer_range / math.sqrt(2 * len(self.h)))

    def forward(self, input_ids: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, attention_mask: Tensor | None = None, cache: Any = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None) -> DecoderOutput:
        """``NativeDecoder.forward``; or, with ``inputs_embeds`` (B, T, D) instead of ids (the prefix-LM kind
        splices image features into the prompt's token embeddings, from ``wte``), the same with those embeddings
        in place of ``wte(input_ids)`` (the positions are still added, as transformers' GPT2 does)."""
        if inputs_embeds is None:
            return super().forward(input_ids, context, context_mask, attention_mask, cache, position_ids)
        E = inputs_embeds
        if input_ids is not None or E.dim() != 3 or E.shape[-1] != self.hidden_size or not E.is_floating_point():
            raise InputError(
                f"GPT2: pass input_ids (B, T) or inputs_embeds (B, T, {self.hidden_size}), exactly one; given "
                f"{'both' if input_ids is not None else f'inputs_embeds {E.dtype} {tuple(E.shape)}'}; fix: pass "
                "floating-point embeddings as wide as n_embd (decoder.wte(ids) gives them for token ids)")
        self._inputs_embeds = E
        try:  # zeros stand in for the ids: the base class reads only their shape and device
            return super().forward(E.new_zeros(E.shape[:2], dtype=torch.long), context, context_mask, attention_mask,
                                   cache, position_ids)
        finally:
            self._inputs_embeds = None

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        # positions count from the past whatever the padding (left padding shifts them), like transformers
        tokens = self.wte(input_ids) if self._inputs_embeds is None else self._inputs_embeds  # (B, T, D)
        return dropout(tokens + self.wpe(position_ids), self.embd_pdrop, self.training)  # (B, T, D)

    def output(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.ln_f(x)  # (B, T, D)
        return x, (linear(x, self.wte.weight) if self.lm_head is None else self.lm_head(x))  # (B, T, V)


def build_gpt2(config: GPT2Config) -> GPT2Decoder:
    return GPT2Decoder(**config.model_dump())


# ---- transformers interop ---------------------------------------------------------------------------------

def config_from_hf(hf: dict) -> dict:
    """A transformers GPT2 ``config.json`` (dict) -> ``GPT2Config`` keyword arguments; keys we don't model drop."""
    problems = []
    if hf.get("reorder_and_upcast_attn"):
        problems.append(Problem(
            "reorder_and_upcast_attn", "not supported by splice's GPT2", given=True, expected="false",
            fix="set reorder_and_upcast_attn to false (it only changes fp16 numerics of the attention)",
        ))
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        problems.append(Problem(
            "activation_function", "unknown activation", given=act, expected=f"one of {list(ACTIVATIONS)}",
            fix="use a supported activation or register a decoder plugin that implements it",
        ))
    if hf.get("add_cross_attention") and (
        hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True)
    ):
        problems.append(Problem(
            "scale_attn_by_inverse_layer_idx", "transformers applies this scaling to cross-attention too, which "
            "the standard adapter does not reproduce", given=hf.get("scale_attn_by_inverse_layer_idx"),
            expected="scale_attn_by_inverse_layer_idx=false and scale_attn_weights=true with add_cross_attention",
            fix="use a checkpoint without these options, or load it without its cross-attention",
        ))
    if problems:
        raise ConfigError(problems, source="transformers GPT2 config")
    kwargs = {k: hf[k] for k in GPT2Config.model_fields if k in hf}
    if kwargs.get("initializer_range") is None:
        kwargs.pop("initializer_range", None)
    return kwargs


def config_to_hf(values: dict) -> dict:
    """``GPT2Config`` values -> a transformers GPT2 config dict (as a VisionEncoderDecoder decoder)."""
    return {"model_type": "gpt2", **values, "add_cross_attention": True, "is_decoder": True}


def _dims(hf_config: dict) -> tuple[int, int, int, int]:
    D = hf_config.get("n_embd", 768)
    return D, hf_config.get("n_inner") or 4 * D, hf_config.get("vocab_size", 50257), hf_config.get("n_positions", 1024)


def _table(hf_config: dict) -> list[Row]:
    """Every tensor of this config: HF on-disk name (no ``transformer.``), our name(s), HF shape, op
    (``splice.core.keymap``): Conv1D weights are transposed, the packed cross-attention K/V split in two."""
    D, I, V, P = _dims(hf_config)
    table = [
        Row("wte.weight", "wte.weight", (V, D)),
        Row("wpe.weight", "wpe.weight", (P, D)),
        Row("ln_f.weight", "ln_f.weight", (D,)),
        Row("ln_f.bias", "ln_f.bias", (D,)),
    ]
    if not hf_config.get("tie_word_embeddings", True):
        table.append(Row("lm_head.weight", "lm_head.weight", (V, D)))
    for n in range(hf_config.get("n_layer", 12)):
        table += [row.prefixed(f"h.{n}.", f"h.{n}.") for row in _layer_rows(D, I)]
    return table


def _norm(name: str, D: int) -> list[Row]:
    return [Row(f"{name}.weight", f"{name}.weight", (D,)), Row(f"{name}.bias", f"{name}.bias", (D,))]


def _conv1d(name: str, n_in: int, n_out: int) -> list[Row]:
    """A transformers ``Conv1D`` (weight ``(in, out)``) as our ``Linear`` (weight ``(out, in)``)."""
    return [Row(f"{name}.weight", f"{name}.weight", (n_in, n_out), "transpose"),
            Row(f"{name}.bias", f"{name}.bias", (n_out,))]


def _layer_rows(D: int, I: int) -> list[Row]:
    """One block's rows, names relative to ``h.N.``; the cross-attention ones fill the standard adapter."""
    rows = [*_norm("ln_1", D), *_conv1d("attn.c_attn", D, 3 * D), *_conv1d("attn.c_proj", D, D),
            *_norm("ln_2", D), *_conv1d("mlp.c_fc", D, I), *_conv1d("mlp.c_proj", I, D)]
    c, P = "crossattention.", STANDARD_PARAMS
    return rows + [
        Row("ln_cross_attn.weight", c + P.norm_weight, (D,)),
        Row("ln_cross_attn.bias", c + P.norm_bias, (D,)),
        Row(c + "q_attn.weight", c + P.q_weight, (D, D), "transpose"),
        Row(c + "q_attn.bias", c + P.q_bias, (D,)),
        Row(c + "c_attn.weight", (c + P.k_weight, c + P.v_weight), (D, 2 * D), "transpose_split"),
        Row(c + "c_attn.bias", (c + P.k_bias, c + P.v_bias), (2 * D,), "split"),
        Row(c + "c_proj.weight", c + P.out_weight, (D, D), "transpose"),
        Row(c + "c_proj.bias", c + P.out_bias, (D,)),
    ]


def state_dict_from_hf(sd: dict[str, Tensor], hf_config: dict) -> tuple[dict[str, Tensor], list[str]]:
    """transformers GPT2 tensors (``decoder.`` removed; with or without ``transformer.``) -> (ours, unused keys).

    Legacy buffers (``attn.bias``, ``attn.masked_bias``, ...) and anything unknown are reported unused; a tied
    ``lm_head.weight`` (torch.save .bin files carry it) duplicates ``wte.weight`` and is passed over.
    """
    tied = hf_config.get("tie_word_embeddings", True)

    def name_of(key: str) -> str:
        name = key.removeprefix("transformer.")
        return DUPLICATE if name == "lm_head.weight" and tied else name

    sizes = dict(zip(("n_embd", "n_inner", "vocab_size", "n_positions"), _dims(hf_config)))
    return from_hf(sd, _table(hf_config), name_of, ", ".join(f"{k}={v}" for k, v in sizes.items()))


def state_dict_to_hf(sd: dict[str, Tensor], hf_config: dict) -> dict[str, Tensor]:
    """Ours -> GPT2LMHeadModel on-disk names (``transformer.`` prefix; ``lm_head.weight`` only when untied)."""
    return to_hf(sd, _table(hf_config), lambda name: name if name == "lm_head.weight" else "transformer." + name,
                 layout="GPT2", fix=STANDARD_ONLY)


HF = HFInterop(model_types=("gpt2",), config_from_hf=config_from_hf, state_dict_from_hf=state_dict_from_hf,
               state_dict_to_hf=state_dict_to_hf, config_to_hf=config_to_hf,
               ignorable=(r"(?:transformer\.)?h\.\d+\.(?:attn|crossattention)\.(?:bias|masked_bias)",))  # 4.x buffers


@hookimpl
def register_decoders(register):
    register(
        "gpt2", build_gpt2, GPT2Config, tiny=dict(TINY), hf=HF,
        description="GPT2 (OpenAI), pre-norm causal LM with learned positions; cross-attention through adapters",
    )

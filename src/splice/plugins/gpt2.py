"""GPT2 as a native splice decoder: config, blocks, model, and the transformers checkpoint mapping.

Layout (module state-dict names, ``nn.Linear`` everywhere so weights are ``(out, in)``)::

    wte.weight (V, D)   wpe.weight (P, D)   ln_f.{weight,bias}   [lm_head.weight (V, D) only when untied]
    h.N.ln_1.*   h.N.attn.c_attn.{weight (3D, D), bias}   h.N.attn.c_proj.*
    h.N.ln_2.*   h.N.mlp.c_fc.{weight (I, D), bias}        h.N.mlp.c_proj.{weight (D, I), bias}
    h.N.crossattention.*   the module an adapter installed (empty slot by default), e.g. for ``standard``:
                           norm, q_proj, k_proj, v_proj, o_proj

transformers stores the same tensors as ``Conv1D`` (``(in, out)``), keeps the cross-attention LayerNorm beside
the attention (``h.N.ln_cross_attn``) and packs the cross K/V into one ``crossattention.c_attn``;
``state_dict_from_hf`` / ``state_dict_to_hf`` translate, checking every shape.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from splice import hookimpl
from splice.core.errors import CheckpointError, ConfigError, InputError, Problem
from splice.core.interfaces import DecoderOutput, HFInterop, LayerSpec

__all__ = [
    "GPT2Config",
    "GPT2Decoder",
    "GPT2Block",
    "GPT2Attention",
    "GPT2MLP",
    "build_gpt2",
    "config_from_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "HF",
    "TINY",
]

Activation = Literal["gelu_new", "gelu", "relu", "gelu_pytorch_tanh", "silu"]
ACTIVATIONS: tuple[str, ...] = Activation.__args__

TINY: dict[str, Any] = dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4)


# ---- config -----------------------------------------------------------------------------------------------


class GPT2Config(BaseModel):
    """GPT2's hyper-parameters, named and defaulted as in transformers' ``GPT2Config``."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(50257, gt=0)
    n_positions: int = Field(1024, gt=0, description="longest sequence (past + new tokens) the model can read")
    n_embd: int = Field(768, gt=0, description="hidden width D")
    n_layer: int = Field(12, gt=0)
    n_head: int = Field(12, gt=0)
    n_inner: int | None = Field(None, gt=0, description="MLP width; None = 4 * n_embd")
    activation_function: Activation = "gelu_new"
    layer_norm_epsilon: float = Field(1e-5, gt=0)
    resid_pdrop: float = Field(0.1, ge=0, lt=1)
    embd_pdrop: float = Field(0.1, ge=0, lt=1)
    attn_pdrop: float = Field(0.1, ge=0, lt=1)
    initializer_range: float = Field(0.02, ge=0)
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "GPT2Config":
        if self.n_embd % self.n_head:
            divisors = [h for h in range(1, min(self.n_embd, 64) + 1) if self.n_embd % h == 0]
            raise ValueError(
                f"n_head={self.n_head} does not divide n_embd={self.n_embd}; expected n_embd % n_head == 0; "
                f"fix: pick n_head among {divisors} or change n_embd to a multiple of {self.n_head}"
            )
        return self


# ---- blocks -----------------------------------------------------------------------------------------------


def _activation(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh"):  # the same tanh approximation
        return lambda x: F.gelu(x, approximate="tanh")
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[name]


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention; keys/values go through the ``KVCache`` when one is given."""

    def __init__(self, n_embd: int, n_head: int, attn_pdrop: float, resid_pdrop: float, scale: float):
        super().__init__()
        self.n_head, self.head_size = n_head, n_embd // n_head
        self.scale = scale
        self.attn_pdrop = attn_pdrop
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(resid_pdrop)

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, cache: Any, layer: int) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)  # each (B, T, D)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.attn_pdrop if self.training else 0.0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.resid_dropout(self.c_proj(y))  # (B, T, D)


class GPT2MLP(nn.Module):
    def __init__(self, n_embd: int, n_inner: int, activation: str, resid_pdrop: float):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, n_inner)
        self.c_proj = nn.Linear(n_inner, n_embd)
        self.act = _activation(activation)
        self.dropout = nn.Dropout(resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, D)


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

    def forward(
        self,
        x: Tensor,  # (B, T, D)
        mask: Tensor | None,  # (B, 1, T, L) / (T, L) bool, True = attend; None with is_causal or one new token
        is_causal: bool,
        context: Tensor | None,  # (B, N, D_ctx)
        context_mask: Tensor | None,  # (B, N)
        cache: Any,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, is_causal, cache, self.index)  # (B, T, D)
        if self.crossattention is not None:
            kv = None
            if cache is not None:
                kv = cache.cross[self.index]
                if kv is None and context is not None:
                    # the context is projected once per generation, then read back at every step
                    kv = cache.cross[self.index] = self.crossattention.context_kv(context)  # each (B, nh, N, hs)
            if kv is not None or context is not None:
                x = self.crossattention(x, context=context, context_mask=context_mask, kv=kv)  # (B, T, D)
        return x + self.mlp(self.ln_2(x))  # (B, T, D)


# ---- model ------------------------------------------------------------------------------------------------


class GPT2Decoder(nn.Module):
    """GPT2 language model with one empty cross-attention slot per layer (``TextDecoder``)."""

    native_cross_attention = False

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_inner: int | None = None,
        activation_function: str = "gelu_new",
        layer_norm_epsilon: float = 1e-5,
        resid_pdrop: float = 0.1,
        embd_pdrop: float = 0.1,
        attn_pdrop: float = 0.1,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        scale_attn_weights: bool = True,
        scale_attn_by_inverse_layer_idx: bool = False,
    ):
        super().__init__()
        assert n_embd % n_head == 0, "GPT2Config validates this"
        self.hidden_size = n_embd
        self.vocab_size = vocab_size
        self.max_positions = n_positions
        self.n_head = n_head
        self.eps = layer_norm_epsilon
        self.attn_pdrop = attn_pdrop
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings

        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.drop = nn.Dropout(embd_pdrop)
        blocks = []
        for i in range(n_layer):
            scale = (n_embd // n_head) ** -0.5 if scale_attn_weights else 1.0
            if scale_attn_by_inverse_layer_idx:
                scale /= i + 1
            blocks.append(GPT2Block(i, n_embd, n_head, n_inner or 4 * n_embd, activation_function,
                                    layer_norm_epsilon, attn_pdrop, resid_pdrop, scale))
        self.h = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(n_embd, eps=layer_norm_epsilon)
        self.lm_head = None if tie_word_embeddings else nn.Linear(n_embd, vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """transformers' init: N(0, 0.02) weights, zero biases; the residual projections scaled by 1/sqrt(2 L)."""
        std = self.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        for block in self.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * len(self.h)))

    # -- the TextDecoder slot protocol --

    def layer_specs(self) -> list[LayerSpec]:
        return [
            LayerSpec(index=i, width=self.hidden_size, heads=self.n_head, norm="pre", eps=self.eps, bias=True,
                      dropout=self.attn_pdrop)
            for i in range(len(self.h))
        ]

    def install_cross_attention(self, index: int, module: nn.Module) -> None:
        if not 0 <= index < len(self.h):
            raise IndexError(f"GPT2 has {len(self.h)} layers (0..{len(self.h) - 1}); cannot install at {index}")
        self.h[index].crossattention = module

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
                f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds n_positions={self.max_positions}; "
                f"fix: truncate the input or lower max_new_tokens"
            )
        if position_ids is not None and position_ids.numel() and int(position_ids.max()) >= self.max_positions:
            raise InputError(
                f"position_ids reach {int(position_ids.max())}, but n_positions={self.max_positions}; "
                f"fix: keep positions below {self.max_positions}"
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
        slots = [b.crossattention for b in self.h if b.crossattention is not None]
        if not slots:
            raise InputError(
                "context was given, but no GPT2 layer has cross-attention; fix: install an adapter "
                "(cross_attention: {kind: standard} in the spec, or decoder.install_cross_attention(i, module))"
            )
        if context.dim() != 3 or context.shape[0] != B:
            raise InputError(
                f"context must have shape (B={B}, N, D_ctx); given {tuple(context.shape)}"
            )
        for b in self.h:
            width = getattr(b.crossattention, "context_width", None)
            if width is not None and context.shape[-1] != width:
                raise InputError(
                    f"context width {context.shape[-1]} does not match layer {b.index}'s cross-attention, which "
                    f"expects {width}; fix: project the encoder output to {width} (projection: linear/auto)"
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
            # (an all-False row gives NaN). Real queries are unaffected: they never see padding.
            mask = mask | (k_pos == q_pos)  # (B, 1, T, L)
        return mask, False

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
        B, T = input_ids.shape
        if position_ids is None:
            # like transformers: positions count from the past whatever the padding (left padding shifts them)
            position_ids = torch.arange(past, past + T, device=input_ids.device)  # (T,)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, D)
        mask, is_causal = self._self_attention_mask(attention_mask, past, T, input_ids.device)
        for block in self.h:
            x = block(x, mask, is_causal, context, context_mask, cache)  # (B, T, D)
        x = self.ln_f(x)  # (B, T, D)
        logits = F.linear(x, self.wte.weight) if self.lm_head is None else self.lm_head(x)  # (B, T, V)
        if cache is not None:
            cache.advance(T)
        return DecoderOutput(logits=logits, cache=cache, hidden_states=x)


def build_gpt2(config: GPT2Config) -> GPT2Decoder:
    return GPT2Decoder(**config.model_dump())


# ---- transformers interop ---------------------------------------------------------------------------------

_DROP_BUFFERS = ("attn.bias", "attn.masked_bias", "crossattention.bias", "crossattention.masked_bias")


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


def _table(hf_config: dict) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """HF on-disk name (no ``transformer.``) -> (HF shape, our names, op), for every tensor of this config.

    ops: ``copy``; ``t`` transpose a Conv1D weight; ``split`` halve a packed K/V bias; ``split_t`` halve a packed
    K/V Conv1D weight along its output dim and transpose both halves.
    """
    D, I, V, P = _dims(hf_config)
    table = {
        "wte.weight": ((V, D), ("wte.weight",), "copy"),
        "wpe.weight": ((P, D), ("wpe.weight",), "copy"),
        "ln_f.weight": ((D,), ("ln_f.weight",), "copy"),
        "ln_f.bias": ((D,), ("ln_f.bias",), "copy"),
    }
    if not hf_config.get("tie_word_embeddings", True):
        table["lm_head.weight"] = ((V, D), ("lm_head.weight",), "copy")
    cross = "crossattention"
    for n in range(hf_config.get("n_layer", 12)):
        h = f"h.{n}."
        rows = {
            "ln_1.weight": ((D,), ("ln_1.weight",), "copy"),
            "ln_1.bias": ((D,), ("ln_1.bias",), "copy"),
            "attn.c_attn.weight": ((D, 3 * D), ("attn.c_attn.weight",), "t"),
            "attn.c_attn.bias": ((3 * D,), ("attn.c_attn.bias",), "copy"),
            "attn.c_proj.weight": ((D, D), ("attn.c_proj.weight",), "t"),
            "attn.c_proj.bias": ((D,), ("attn.c_proj.bias",), "copy"),
            "ln_2.weight": ((D,), ("ln_2.weight",), "copy"),
            "ln_2.bias": ((D,), ("ln_2.bias",), "copy"),
            "mlp.c_fc.weight": ((D, I), ("mlp.c_fc.weight",), "t"),
            "mlp.c_fc.bias": ((I,), ("mlp.c_fc.bias",), "copy"),
            "mlp.c_proj.weight": ((I, D), ("mlp.c_proj.weight",), "t"),
            "mlp.c_proj.bias": ((D,), ("mlp.c_proj.bias",), "copy"),
            "ln_cross_attn.weight": ((D,), (f"{cross}.norm.weight",), "copy"),
            "ln_cross_attn.bias": ((D,), (f"{cross}.norm.bias",), "copy"),
            f"{cross}.q_attn.weight": ((D, D), (f"{cross}.q_proj.weight",), "t"),
            f"{cross}.q_attn.bias": ((D,), (f"{cross}.q_proj.bias",), "copy"),
            f"{cross}.c_attn.weight": ((D, 2 * D), (f"{cross}.k_proj.weight", f"{cross}.v_proj.weight"), "split_t"),
            f"{cross}.c_attn.bias": ((2 * D,), (f"{cross}.k_proj.bias", f"{cross}.v_proj.bias"), "split"),
            f"{cross}.c_proj.weight": ((D, D), (f"{cross}.o_proj.weight",), "t"),
            f"{cross}.c_proj.bias": ((D,), (f"{cross}.o_proj.bias",), "copy"),
        }
        table.update({h + k: (shape, tuple(h + o for o in ours), op) for k, (shape, ours, op) in rows.items()})
    return table


def state_dict_from_hf(sd: dict[str, Tensor], hf_config: dict) -> tuple[dict[str, Tensor], list[str]]:
    """transformers GPT2 tensors (``decoder.`` removed; with or without ``transformer.``) -> (ours, unused keys)."""
    table = _table(hf_config)
    tied = hf_config.get("tie_word_embeddings", True)
    mapped: dict[str, Tensor] = {}
    unused: list[str] = []
    for key, tensor in sd.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name == "lm_head.weight" and tied:
            continue  # a duplicate of wte.weight (torch.save .bin files carry it)
        if name not in table:
            unused.append(key)  # legacy buffers (attn.bias, attn.masked_bias, ...) and anything unknown
            continue
        shape, ours, op = table[name]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape} from the config "
                f"(n_embd={_dims(hf_config)[0]}, n_inner={_dims(hf_config)[1]}, vocab_size={_dims(hf_config)[2]}, "
                f"n_positions={_dims(hf_config)[3]}); fix: load it with the config.json it was saved with"
            )
        if op == "copy":
            mapped[ours[0]] = tensor
        elif op == "t":
            mapped[ours[0]] = tensor.t().contiguous()  # Conv1D (in, out) -> Linear (out, in)
        elif op == "split":
            mapped[ours[0]], mapped[ours[1]] = (t.contiguous() for t in tensor.chunk(2, dim=0))  # each (D,)
        else:  # split_t
            k, v = tensor.chunk(2, dim=1)  # each (D_ctx, D)
            mapped[ours[0]], mapped[ours[1]] = k.t().contiguous(), v.t().contiguous()  # each (D, D_ctx)
    return mapped, unused


def state_dict_to_hf(sd: dict[str, Tensor], hf_config: dict) -> dict[str, Tensor]:
    """Ours -> GPT2LMHeadModel on-disk names (``transformer.`` prefix; ``lm_head.weight`` only when untied)."""
    out: dict[str, Tensor] = {}
    consumed: set[str] = set()
    for hf_name, (shape, ours, op) in _table(hf_config).items():
        present = [o for o in ours if o in sd]
        if not present:
            continue  # e.g. a layer without cross-attention
        if len(present) != len(ours):
            missing = sorted(set(ours) - set(present))
            raise CheckpointError(f"cannot write {hf_name!r}: it needs {list(ours)}, but {missing} are missing")
        tensors = [sd[o] for o in ours]
        if op == "copy":
            t = tensors[0]
        elif op == "t":
            t = tensors[0].t()
        elif op == "split":
            t = torch.cat(tensors, dim=0)  # (2D,)
        else:  # split_t
            t = torch.cat([x.t() for x in tensors], dim=1)  # (D_ctx, 2D)
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"tensor(s) {list(ours)} give {hf_name!r} shape {tuple(t.shape)}, expected {shape} from the config"
            )
        prefix = "" if hf_name == "lm_head.weight" else "transformer."
        out[prefix + hf_name] = t.contiguous()
        consumed.update(ours)
    left = sorted(set(sd) - consumed)
    if left:
        raise CheckpointError(
            f"{len(left)} tensor(s) have no place in transformers' GPT2 layout: {left[:8]}"
            f"{' ...' if len(left) > 8 else ''}; fix: export only the standard cross-attention kind "
            f"(gated or third-party modules have no transformers equivalent), or save in splice format"
        )
    return out


HF = HFInterop(
    model_types=("gpt2",),
    config_from_hf=config_from_hf,
    state_dict_from_hf=state_dict_from_hf,
    state_dict_to_hf=state_dict_to_hf,
    config_to_hf=config_to_hf,
)


@hookimpl
def register_decoders(register):
    register(
        "gpt2", build_gpt2, GPT2Config, tiny=dict(TINY), hf=HF,
        description="GPT2 (OpenAI), pre-norm causal LM with learned positions; cross-attention through adapters",
    )

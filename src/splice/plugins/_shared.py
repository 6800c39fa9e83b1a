"""What the native decoders (``gpt2``, ``bert`` and ``roberta``, ``bart``, ``trocr``, ``mbart``) share: mechanics, not
architecture.

Each decoder's own file keeps its config, blocks, embeddings, head and checkpoint table. Here is what would
otherwise be written once per decoder:

- ``NativeDecoder``: the ``TextDecoder`` forward (input checks, positions, the causal/padding mask, the KV cache's
  bookkeeping) and the cross-attention slots, around a subclass's ``embed``, ``layers`` and ``output``;
- ``attention``: one attention step (self-attention through the ``KVCache``); ``cached_context_kv`` is
  ``splice.core.cache.context_kv`` (a layer's cross-attention keys/values, projected once per generation), kept
  importable here under its old name;
- ``STANDARD_ONLY``: the fix an export names when a layer holds a cross-attention module transformers cannot
  express (the checkpoint tables themselves are written in ``splice.core.keymap``);
- ``DecoderConfig``, ``ACTIVATION_FNS`` and ``normal_init`` for the configs, MLPs and initialisation;
- the bounds every component Config accepts (``bounded_int``, ``bounded_real`` and the types built from them, the
  ``MAX_*`` limits and ``check_build_memory``), shared with the vision encoders and adapters: docs/limits.md.
"""

from __future__ import annotations

import functools
import math
from typing import Annotated, Any, Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, model_validator
from torch import Tensor, nn

from splice.core.cache import context_kv as cached_context_kv  # public: splice.core.cache.context_kv
from splice.core.errors import IncompatibleComponentsError, InputError, Problem
from splice.core.interfaces import DecoderOutput, LayerSpec
from splice.core.keymap import DUPLICATE, Row, check_shape
from splice.core.keymap import from_hf as map_from_hf, to_hf as map_to_hf

__all__ = [
    "MAX_LAYERS", "MAX_WIDTH", "MAX_FFN", "MAX_HEADS", "MAX_VOCAB", "MAX_POSITIONS", "MAX_WEIGHT", "BUILD_MEMORY_LIMIT",
    "bounded_int", "bounded_real", "Layers", "Width", "FFNWidth", "Heads", "Vocab", "Positions", "TokenId",
    "Probability", "Eps", "InitStd", "check_build_memory", "DecoderConfig", "ACTIVATION_FNS", "check_heads_divide", "normal_init", "split_heads", "attention",
    "cached_context_kv", "causal_mask", "NativeDecoder", "Row", "DUPLICATE", "STANDARD_ONLY", "check_shape",
    "map_from_hf", "map_to_hf",
]

# ---- bounds: what every component Config accepts (docs/limits.md: the table, and why each number) ----------
# Generous for released checkpoints, small enough that `splice validate` (which builds every layer, parameters
# on the meta device, buffers real) finishes in seconds and never allocates more than BUILD_MEMORY_LIMIT.

MAX_LAYERS = 128  # one stack's layers; LLaMA-3-405B has 126, GPT-2 XL 48, ViT-22B 48
MAX_WIDTH = 16384  # hidden width; LLaMA-3-405B's 16384 is the widest released
MAX_FFN = 65536  # MLP width; 4 x MAX_WIDTH (LLaMA-3-405B: 53248)
MAX_HEADS = 1024  # attention heads; LLaMA-3-405B has 128
MAX_VOCAB = 262144  # Gemma 3's 262144 is the largest released vocabulary
MAX_POSITIONS = 131072  # LLaMA 3.1's 128K context
MAX_WEIGHT = 2**32  # elements of one weight: each is allocated (untouched) for an instant before it moves to meta
BUILD_MEMORY_LIMIT = 2**30  # bytes: the estimate of what building a config allocates for real (buffers, temporaries)


def _a_number(value: Any, info: ValidationInfo) -> Any:
    """Before pydantic's own parsing: ``True`` is not a count, and inf/nan are no size."""
    name = info.field_name
    if isinstance(value, bool):
        raise ValueError(f"{name} is the boolean {value}; expected a number; fix: write {name} as a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} is {value}; expected a finite number; fix: write {name} as a finite number")
    return value


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _within(lo: float, hi: float, why: str, lo_open: bool = False, hi_open: bool = False) -> Callable[..., Any]:
    span = _interval(lo, hi, lo_open, hi_open)

    def check(value: Any, info: ValidationInfo) -> Any:
        low = value > lo if lo_open else value >= lo
        high = value < hi if hi_open else value <= hi
        if not (low and high):
            raise ValueError(f"{info.field_name} is outside {span} ({why}); expected a value in "
                             f"{span}; fix: choose {info.field_name} in {span} (docs/limits.md)")
        return value

    return check


def bounded_int(lo: int, hi: int, why: str) -> Any:
    """An ``int`` type within ``[lo, hi]``: booleans, non-finite numbers and values outside are clean errors."""
    return Annotated[int, BeforeValidator(_a_number), AfterValidator(_within(lo, hi, why)),
                     Field(json_schema_extra={"minimum": lo, "maximum": hi})]


def bounded_real(lo: float, hi: float, why: str, *, lo_open: bool = False, hi_open: bool = False) -> Any:
    """A finite ``float`` type within ``lo`` .. ``hi`` (each end closed unless said open)."""
    schema = {"exclusiveMinimum" if lo_open else "minimum": lo, "exclusiveMaximum" if hi_open else "maximum": hi}
    return Annotated[float, BeforeValidator(_a_number), AfterValidator(_within(lo, hi, why, lo_open, hi_open)),
                     Field(allow_inf_nan=False, json_schema_extra=schema)]


Layers = bounded_int(1, MAX_LAYERS, "validate builds every layer; 128 covers the deepest released models")
Width = bounded_int(1, MAX_WIDTH, "LLaMA-3-405B's 16384 is the widest released")
FFNWidth = bounded_int(1, MAX_FFN, "4 x the widest released width")
Heads = bounded_int(1, MAX_HEADS, "released models use at most 128")
Vocab = bounded_int(1, MAX_VOCAB, "Gemma 3's 262144 is the largest released vocabulary")
Positions = bounded_int(1, MAX_POSITIONS, "a 128K context, LLaMA 3.1's")
TokenId = bounded_int(0, MAX_VOCAB - 1, "an id inside the largest vocabulary")
Probability = bounded_real(0, 1, "a dropout probability", hi_open=True)
Eps = bounded_real(0, 1, "a normalisation epsilon", lo_open=True)
InitStd = bounded_real(0, 1, "an initialisation standard deviation")


def check_build_memory(estimate: int, what: str, fields: str, fix: str) -> None:
    """A config validator's check (raises ``ValueError``): building allocates at most ``BUILD_MEMORY_LIMIT``.

    ``what`` says where the bytes go, ``fields`` names the fields that size them, ``fix`` how to shrink them.
    """
    if estimate > BUILD_MEMORY_LIMIT:
        raise ValueError(
            f"building this config would allocate about {estimate / 2**30:.1f} GiB ({what}); expected at most "
            f"{BUILD_MEMORY_LIMIT / 2**30:g} GiB, set by {fields}; fix: {fix} (docs/limits.md)"
        )


# ---- configs, activations, init ---------------------------------------------------------------------------

ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # the exact (erf) GELU, transformers' "gelu"
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),  # the same tanh approximation
    "relu": F.relu,
    "silu": F.silu,
}


def check_heads_divide(width_name: str, width: int, heads_name: str, heads: int) -> None:
    """A config validator's check (raises ``ValueError``): the heads split the width evenly."""
    if width % heads:
        divisors = [h for h in range(1, min(width, 64) + 1) if width % h == 0]
        raise ValueError(
            f"{heads_name}={heads} does not divide {width_name}={width}; expected {width_name} % {heads_name} == 0; "
            f"fix: pick {heads_name} among {divisors} or change {width_name} to a multiple of {heads}"
        )


class DecoderConfig(BaseModel):
    """A native decoder's ``Config``: unknown keys are errors, and the heads divide the width.

    A subclass names its two fields in ``width_and_heads``, e.g. ``("n_embd", "n_head")``.
    """

    model_config = ConfigDict(extra="forbid")
    width_and_heads: ClassVar[tuple[str, str]]

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "DecoderConfig":
        width, heads = self.width_and_heads
        check_heads_divide(width, getattr(self, width), heads, getattr(self, heads))
        return self


def normal_init(module: nn.Module, std: float) -> None:
    """transformers' init: N(0, std) weights, zero biases and padding rows, identity LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if getattr(m, "padding_idx", None) is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            m.reset_parameters()


# ---- attention --------------------------------------------------------------------------------------------


def split_heads(x: Tensor, heads: int) -> Tensor:
    B, T, D = x.shape
    return x.view(B, T, heads, D // heads).transpose(1, 2)  # (B, nh, T, hs)


def attention(
    q: Tensor,  # (B, nh, T, hs)
    k: Tensor,  # (B, nh, S, hs)
    v: Tensor,  # (B, nh, S, hs)
    mask: Tensor | None,  # bool, True = attend, broadcast to (B, nh, T, S)
    *,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,  # None: hs ** -0.5
    cache: Any = None,  # a KVCache: k, v are the new tokens' and are stored after the past first
    layer: int = 0,
) -> Tensor:
    """Scaled dot-product attention with the heads merged back: (B, T, nh * hs)."""
    if cache is not None:
        k, v = cache.update(layer, k, v)  # (B, nh, L, hs)
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p
    )  # (B, nh, T, hs)
    B, nh, T, hs = y.shape
    return y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, D)


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


# ---- the decoder ------------------------------------------------------------------------------------------


class NativeDecoder(nn.Module):
    """The ``TextDecoder`` forward and cross-attention slots of a native decoder.

    A subclass passes its sizes to ``__init__``, builds ``layers`` and supplies ``embed`` and ``output``. Each layer
    is called as ``layer(x, mask, is_causal, context, context_mask, cache) -> x``: ``x`` (B, T, D); ``mask`` a bool
    (B, 1, T, L) or (T, L), True = attend, or None with ``is_causal`` or for one new token; ``context`` (B, N, D_ctx);
    ``context_mask`` (B, N). It has a ``crossattention`` slot unless the decoder has ``native_cross_attention``.
    """

    family = "decoder"  # named in errors
    native_cross_attention = False
    norm_position: Literal["pre", "post"] = "pre"  # where each layer's norms sit, for the adapters
    positions_name = "n_positions"
    layerdrop = 0.0  # LayerDrop (BART): the chance, while training, that a layer is skipped

    layers: nn.ModuleList

    def __init__(self, *, hidden_size: int, vocab_size: int, n_head: int, max_positions: int, eps: float,
                 attn_dropout: float, num_positions: int | None = None):
        """``max_positions``: the longest sequence (past + new tokens); ``num_positions``: the ``positions_name``
        config value that bounds explicit position ids (default ``max_positions``); ``n_head``, ``eps`` and
        ``attn_dropout``: the layers' attention, as ``layer_specs`` reports it to the adapters."""
        super().__init__()
        assert hidden_size % n_head == 0, "the Config validates this"
        self.hidden_size, self.vocab_size, self.n_head = hidden_size, vocab_size, n_head
        self.max_positions = max_positions
        self.num_positions = max_positions if num_positions is None else num_positions
        self.eps, self.attn_dropout = eps, attn_dropout

    # -- what each decoder supplies --

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """(B, T) ids and their positions -> (B, T, D), the first layer's input."""
        raise NotImplementedError

    def output(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The last layer's output (B, T, D) -> (hidden states after any final norm (B, T, D), logits (B, T, V))."""
        raise NotImplementedError

    def positions(self, input_ids: Tensor, past: int) -> Tensor:
        """Position ids of the new tokens: ``past, past+1, ...`` for every row, padding or not (as transformers)."""
        return torch.arange(past, past + input_ids.shape[1], device=input_ids.device)  # (T,)

    # -- the TextDecoder slot protocol --

    def layer_specs(self) -> list[LayerSpec]:
        return [
            LayerSpec(index=i, width=self.hidden_size, heads=self.n_head, norm=self.norm_position, eps=self.eps,
                      bias=True, dropout=self.attn_dropout)
            for i in range(len(self.layers))
        ]

    def install_cross_attention(self, index: int, module: nn.Module) -> None:
        if self.native_cross_attention:  # its layers own their cross-attention (BART's family: encoder_attn)
            raise IncompatibleComponentsError([Problem(
                "cross_attention", f"{self.family}'s layers have their own cross-attention, so layer {index} takes "
                "no adapter module", given=type(module).__name__, error="incompatible",
                expected=f"no adapter: {self.family} has native_cross_attention",
                fix=f"drop `cross_attention` from the spec (the decoder's own is used), or pick a decoder that "
                "takes adapters (gpt2, bert)",
            )])
        n = len(self.layers)
        if not 0 <= index < n:
            raise IndexError(f"{self.family} has {n} layers (0..{n - 1}); cannot install at {index}")
        self.layers[index].crossattention = module

    # -- forward --

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
        x = self.embed(input_ids, position_ids)  # (B, T, D)
        mask, is_causal = causal_mask(attention_mask, past, T, input_ids.device)
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and cache is None and float(torch.rand([])) < self.layerdrop:
                continue  # LayerDrop, as transformers (training only)
            x = layer(x, mask, is_causal, context, context_mask, cache)  # (B, T, D)
        hidden, logits = self.output(x)  # (B, T, D), (B, T, V)
        if cache is not None:
            cache.advance(T)
        return DecoderOutput(logits=logits, cache=cache, hidden_states=hidden)

    # -- input checks: a user's mistake is an InputError that says what was given and the fix --

    def _check_inputs(self, input_ids, context, context_mask, attention_mask, cache, position_ids, past) -> None:
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise InputError(
                f"input_ids must be integer token ids of shape (B, T); given dtype {input_ids.dtype}, shape "
                f"{tuple(input_ids.shape)}; fix: pass a LongTensor of token ids"
            )
        B, T = input_ids.shape
        if input_ids.numel() and not input_ids.is_meta:  # meta (validate's dry forward): shapes only
            lo, hi = (int(t) for t in torch.aminmax(input_ids))  # one pass over B*T ids, nothing vocabulary-sized
            if lo < 0 or hi >= self.vocab_size:
                raise InputError(
                    f"token ids must lie in [0, {self.vocab_size - 1}] (vocab_size={self.vocab_size}); given ids "
                    f"from {lo} to {hi}; fix: use the tokenizer that matches this decoder, or grow vocab_size"
                )
        if position_ids is None and past + T > self.max_positions:
            raise InputError(
                f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds {self._length_limit()}; "
                f"fix: truncate the input or lower max_new_tokens"
            )
        if position_ids is not None and position_ids.numel():
            self._check_position_ids(position_ids)
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
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise InputError(
                f"context_mask must have shape (B, N) = {tuple(context.shape[:2])}; given {tuple(context_mask.shape)}"
            )
        if cache is None or all(kv is None for kv in cache.cross):  # else: checked when the cached K/V were made
            self._check_context(context, B)

    def _length_limit(self) -> str:
        return f"{self.positions_name}={self.max_positions}"

    def _check_position_ids(self, position_ids: Tensor) -> None:
        if int(position_ids.min()) < 0:
            raise InputError(f"position_ids go down to {int(position_ids.min())}; expected positions >= 0; fix: "
                             f"count positions from 0 (the first token is position 0)")
        if int(position_ids.max()) >= self.num_positions:
            raise InputError(
                f"position_ids reach {int(position_ids.max())}, but {self.positions_name}={self.num_positions}; "
                f"fix: keep positions below {self.num_positions}"
            )

    def _check_context(self, context: Tensor, B: int) -> None:
        """The context against the installed cross-attention slots, or the decoder's own ``context_width``."""
        if self.native_cross_attention:
            width = getattr(self, "context_width", self.hidden_size)
            if context.dim() != 3 or context.shape[0] != B:
                raise InputError(f"context must have shape (B={B}, N, D_ctx={width}); given {tuple(context.shape)}")
            if context.shape[-1] != width:
                raise InputError(
                    f"context width {context.shape[-1]} does not match {self.family}'s own cross-attention, which "
                    f"expects {width}; fix: pass the encoder's (B, N, D) tokens, projected to {width} when the "
                    "encoder is wider or narrower (projection: linear/auto)"
                )
            return
        if all(layer.crossattention is None for layer in self.layers):
            raise InputError(
                f"context was given, but no {self.family} layer has cross-attention; fix: install an adapter "
                "(cross_attention: {kind: standard} in the spec, or decoder.install_cross_attention(i, module))"
            )
        if context.dim() != 3 or context.shape[0] != B:
            raise InputError(f"context must have shape (B={B}, N, D_ctx); given {tuple(context.shape)}")
        for i, layer in enumerate(self.layers):
            width = getattr(layer.crossattention, "context_width", None)
            if width is not None and context.shape[-1] != width:
                raise InputError(
                    f"context width {context.shape[-1]} does not match layer {i}'s cross-attention, which "
                    f"expects {width}; fix: project the encoder output to {width} (projection: linear/auto)"
                )


# ---- transformers checkpoints -----------------------------------------------------------------------------
# The table language is public: ``splice.core.keymap`` (``Row``, ``from_hf``, ``to_hf``). ``Row``, ``DUPLICATE``,
# ``check_shape`` and ``map_from_hf`` / ``map_to_hf`` (= ``from_hf`` / ``to_hf``) stay importable from here.

STANDARD_ONLY = ("export only the standard cross-attention kind (gated or third-party modules have no transformers "
                 "equivalent), or save in splice format")

"""The shapes every component agrees on.

These are ``typing.Protocol`` classes, not base classes: a third-party module satisfies them by having the
attributes and methods, without importing anything from splice.

Shapes: ``B`` batch, ``N`` context tokens, ``T`` new text tokens, ``L`` text tokens so far (past + T),
``D`` width, ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, runtime_checkable

from torch import Tensor, nn


@dataclass
class EncoderOutput:
    last_hidden_state: Tensor  # (B, N, D)
    hidden_states: tuple[Tensor, ...] | None = None
    # (B, D): the image as one vector, for an encoder whose family defines one (CLIP's post-layernormed class
    # token); None: the kind pools the tokens itself
    pooler_output: Tensor | None = None


@dataclass(frozen=True)
class Preprocessing:
    """How an image must be prepared for an encoder."""

    image_size: tuple[int, int]  # (H, W) the encoder expects
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    in_chans: int = 3


@runtime_checkable
class VisionEncoder(Protocol):
    """An ``nn.Module`` turning images into a sequence of context tokens."""

    hidden_size: int
    preprocessing: Preprocessing

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> EncoderOutput: ...


@dataclass(frozen=True)
class LayerSpec:
    """What an adapter needs to know about one decoder layer to build its cross-attention."""

    index: int
    width: int
    heads: int
    norm: Literal["pre", "post"]  # where the layer norm sits around each sub-block
    eps: float
    bias: bool = True
    dropout: float = 0.0
    # the family's norm: LayerNorm (GPT2, BERT, BART) or RMSNorm (LLaMA); an adapter normalises as the layer does
    norm_kind: Literal["layer", "rms"] = "layer"


@dataclass
class DecoderOutput:
    logits: Tensor  # (B, T, V)
    cache: Any = None  # the KVCache passed in, advanced by T (None when no cache was given)
    hidden_states: Tensor | None = None  # (B, T, D) after the final norm


@runtime_checkable
class TextDecoder(Protocol):
    """A causal language model that can attend to context tokens.

    A decoder without native cross-attention exposes one empty slot per layer: ``layer_specs()`` describes the
    layers and ``install_cross_attention(i, module)`` fills slot ``i`` with a module an adapter built. Layers whose
    slot stays empty simply skip cross-attention. A decoder with ``native_cross_attention = True`` builds its own
    and ignores adapters.
    """

    hidden_size: int
    vocab_size: int
    max_positions: int
    native_cross_attention: bool

    def layer_specs(self) -> list[LayerSpec]: ...

    def install_cross_attention(self, index: int, module: nn.Module) -> None: ...

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        context: Tensor | None = None,  # (B, N, D_ctx)
        context_mask: Tensor | None = None,  # (B, N) 1 = attend, 0 = padding; None = all
        attention_mask: Tensor | None = None,  # (B, L) 1 = real token, 0 = padding; covers past + new
        cache: Any = None,  # a DecoderCache (splice.core.cache.KVCache is splice's)
    ) -> DecoderOutput: ...


@dataclass
class TextEncoderOutput:
    last_hidden_state: Tensor  # (B, T, D)
    pooler_output: Tensor | None = None  # (B, D): the sequence as one vector (BERT's pooler, a [CLS] or mean)
    hidden_states: tuple[Tensor, ...] | None = None


@runtime_checkable
class TextEncoder(Protocol):
    """A bidirectional text model with a pooled output (the dual-encoder and single-stream kinds use it)."""

    hidden_size: int
    vocab_size: int
    max_positions: int

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        attention_mask: Tensor | None = None,  # (B, T) 1 = real token, 0 = padding
        token_type_ids: Tensor | None = None,  # (B, T)
        output_hidden_states: bool = False,
    ) -> TextEncoderOutput: ...


@runtime_checkable
class CrossAttention(Protocol):
    """The module an adapter puts in a decoder layer's slot.

    ``forward`` returns the layer's new hidden state (residual and norms included), so pre-norm and post-norm
    families are both expressible. ``context_kv`` projects the context once, so generation can reuse it.
    """

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]: ...  # each (B, nh, N, hs)

    def forward(
        self,
        hidden: Tensor,  # (B, T, D)
        context: Tensor | None = None,  # (B, N, D_ctx); ignored when kv is given
        context_mask: Tensor | None = None,  # (B, N)
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor: ...  # (B, T, D)


@runtime_checkable
class CrossAttentionAdapter(Protocol):
    """A cross-attention kind: builds the module for one decoder layer slot."""

    def build(self, spec: LayerSpec, context_width: int) -> nn.Module: ...


@runtime_checkable
class Projection(Protocol):
    """Maps encoder tokens to the decoder's context width: (B, N, D_enc) -> (B, N, D_ctx)."""

    def forward(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class HFInterop:
    """How a component reads checkpoints written by transformers.

    ``config_from_hf(hf_config)`` turns the component's part of a transformers ``config.json`` into keyword
    arguments of the component's ``Config``. ``state_dict_from_hf(state_dict, hf_config)`` takes the
    component's tensors with the outer prefix already removed (no ``encoder.`` / ``decoder.``) and returns
    ``(mapped, unused)``: ``mapped`` keyed by the module's own ``state_dict`` names, ``unused`` the input
    keys that have no place in the module (a pooler, legacy buffers) so loaders can report them by name. It may
    return a third item, notes for the loading report (e.g. a tensor filled from a shared one).
    ``config_to_hf(values)`` and ``state_dict_to_hf(state_dict, hf_config)`` go the other way (export, and the
    registry-wide parity tests); ``config_to_hf`` returns a transformers config dict including ``model_type``.
    ``ignorable`` names the unused tensors that are expected (anything else unused fails a strict load, so a
    config that describes fewer layers than the file holds is caught).
    """

    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict], dict]
    state_dict_from_hf: Callable[[dict[str, Tensor], dict], tuple[dict[str, Tensor], list[str]]]
    state_dict_to_hf: Callable[[dict[str, Tensor], dict], dict[str, Tensor]] | None = None
    config_to_hf: Callable[[dict], dict] | None = None
    # regular expressions (full match, names as state_dict_from_hf gets them) for tensors this family's files carry
    # that have no place in the module: a pooler, legacy buffers. A strict load refuses any other unused tensor.
    ignorable: tuple[str, ...] = ()


Builder = Callable[[Any], nn.Module]


@runtime_checkable
class DecoderCache(Protocol):
    """What a decoder gets as ``cache`` during generation (``splice.core.cache.KVCache`` is splice's).

    It holds, per decoder layer, the self-attention keys/values of the tokens so far and the cross-attention
    keys/values of the context. Shapes: ``k``/``v`` (B, n_kv_heads, T, head_size), where ``n_kv_heads`` may be
    fewer than the query heads (it divides ``n_heads``: grouped-query attention); the cache stores the K/V heads
    as given and the decoder repeats them for its query heads.

    - ``length``: tokens already stored (the past); a decoder offsets its positions by it.
    - ``max_len``: the most tokens it can hold (prompt + new tokens).
    - ``update(layer, k, v) -> (keys, values)``: store the T new keys/values after the past and return all so far,
      each (B, n_kv_heads, length + T, head_size). Every layer calls it once per forward.
    - ``advance(T)``: called once by the decoder after all its layers have seen the T new tokens.
    - ``cross[layer]``: that layer's context keys/values ``(k, v)``, each (B, n_kv_heads, N, head_size), or None
      until ``splice.core.cache.context_kv`` projects them (once per generate call).
    - ``reorder(index)``: row ``i`` becomes old row ``index[i]`` (beam search), self-attention K/V.
    - ``repeat_interleave(n)``: every row repeated ``n`` times (beams, returned samples), self and cross K/V.
    """

    length: int
    max_len: int
    cross: list[tuple[Tensor, Tensor] | None]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...

    def advance(self, T: int) -> None: ...

    def reorder(self, index: Tensor) -> None: ...

    def repeat_interleave(self, n: int) -> None: ...

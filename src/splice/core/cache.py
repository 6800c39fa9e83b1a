"""The decoder cache: self-attention keys/values stored in place, and each layer's context keys/values.

Public API for decoders (splice's own and third parties'): ``KVCache`` satisfies
``splice.core.interfaces.DecoderCache``, and ``context_kv`` is the one place a layer's cross-attention keys/values
are projected from the context (once per ``generate`` call) and read back at every later step.

Shapes: ``B`` batch rows, ``n_kv`` key/value heads (it may be fewer than the query heads: grouped-query attention
stores only the K/V heads), ``T`` new tokens, ``hs`` head size, ``N`` context tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from splice.core.interfaces import DecoderCache

__all__ = ["KVCache", "context_kv"]


class KVCache:
    """Self-attention keys/values, preallocated to ``max_len`` and written in place (no ``torch.cat``).

    Also holds each layer's cross-attention keys/values (``cross``), computed once per generate call by
    ``context_kv``. A decoder's attention layer calls ``update(layer, k, v)`` and gets back the keys/values so far;
    the decoder calls ``advance(T)`` once all layers have seen the ``T`` new tokens. Keys and values are stored
    with the heads they come with, so a grouped-query decoder stores (B, n_kv_heads, ., hs) and repeats them for
    its query heads itself.
    """

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0  # tokens already stored (the past)
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        # second buffers for ``reorder``: rows are gathered from one buffer into the other, then the two swap
        self._spare_k: list[Tensor | None] = [None] * num_layers
        self._spare_v: list[Tensor | None] = [None] * num_layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` (B, n_kv, T, hs) after the past; return all keys/values so far (B, n_kv, past+T, hs)."""
        B, n_kv, T, hs = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} tokens; {end} were asked for")
        keys, values = self.k[layer], self.v[layer]
        if keys is None:
            keys = self.k[layer] = k.new_empty(B, n_kv, self.max_len, hs)
            values = self.v[layer] = v.new_empty(B, v.shape[1], self.max_len, v.shape[-1])
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, T: int) -> None:
        self.length += T

    @property
    def batch_size(self) -> int | None:
        t = next((t for t in self.k if t is not None), None)
        return None if t is None else t.shape[0]

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): row ``i`` becomes old row ``index[i]``.

        Only the stored positions are copied, into a second buffer that then becomes the live one.
        """
        L = self.length
        for store, spare in ((self.k, self._spare_k), (self.v, self._spare_v)):
            for i, t in enumerate(store):
                if t is None:
                    continue
                if spare[i] is None or spare[i].shape[0] != index.shape[0]:
                    spare[i] = t.new_empty(index.shape[0], *t.shape[1:])
                torch.index_select(t[:, :, :L], 0, index, out=spare[i][:, :, :L])
                store[i], spare[i] = spare[i], t

    def repeat_interleave(self, n: int) -> None:
        """Repeat every batch row ``n`` times (row ``b`` becomes rows ``b*n .. b*n+n-1``): self and cross K/V.

        Used once, after the prompt ran for one row per image, to give each beam (or returned sample) its copy.
        """
        if n == 1:
            return
        L = self.length
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                if t is None:
                    continue
                grown = t.new_empty(t.shape[0] * n, *t.shape[1:])  # (B*n, n_kv, max_len, hs)
                grown[:, :, :L] = t[:, :, :L].repeat_interleave(n, dim=0)
                store[i] = grown
        self._spare_k = [None] * len(self.k)
        self._spare_v = [None] * len(self.v)
        self.cross = [
            None if kv is None else tuple(t.repeat_interleave(n, dim=0) for t in kv)  # each (B*n, n_kv, N, hs)
            for kv in self.cross
        ]


def context_kv(module: Any, context: Tensor | None, cache: DecoderCache | None, index: int) -> Any:
    """Layer ``index``'s cross-attention keys/values (each (B, n_kv, N, hs)), or None.

    With a cache: projected by ``module.context_kv(context)`` on the first call of a generation, stored in
    ``cache.cross[index]``, and read back at every later step (the context is projected once per generate call).
    None without a cache (the module projects the context itself) or when nothing was stored and no context was
    given. ``module`` is the layer's cross-attention (a ``splice.core.interfaces.CrossAttention``).
    """
    if cache is None:
        return None
    kv = cache.cross[index]
    if kv is None and context is not None:
        kv = cache.cross[index] = module.context_kv(context)  # each (B, n_kv, N, hs)
    return kv

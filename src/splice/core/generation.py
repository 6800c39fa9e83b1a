"""Decoding: the key/value cache and the search loops."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Self-attention keys/values, preallocated to ``max_len`` and written in place (no ``torch.cat``).

    Also holds each layer's cross-attention keys/values, computed once per generate call.
    A decoder's attention layer calls ``update(layer, k, v)`` and gets back the keys/values so far; the decoder
    calls ``advance(T)`` once all layers have seen the ``T`` new tokens.
    """

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0  # tokens already stored (the past)
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * num_layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` (B, nh, T, hs) after the past; return all keys/values so far (B, nh, past+T, hs)."""
        B, nh, T, hs = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} tokens; {end} were asked for")
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(B, nh, self.max_len, hs)
            self.v[layer] = v.new_empty(B, v.shape[1], self.max_len, v.shape[-1])
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.length += T

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): row ``i`` becomes old row ``index[i]``."""
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, index)

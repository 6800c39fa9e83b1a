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


def generate(
    model,
    pixel_values: Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    decoder_input_ids: Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    encoder_outputs=None,
    num_beams: int = 1,
) -> Tensor:
    """Greedy decoding with a preallocated KV cache; cross-attention keys/values computed once.

    Returns (B, prompt + new) token ids; the prompt defaults to ``decoder_start``. Sequences that end early are
    padded with ``pad_token_id`` (as transformers does).
    """
    from splice.core.errors import InputError
    from splice.core.models import _last_hidden

    if num_beams != 1:
        raise InputError(f"num_beams={num_beams}: beam search is not implemented yet; use num_beams=1 (greedy)")
    defaults = getattr(model, "generation_defaults", {}) or {}
    tokens = model.tokens
    if encoder_outputs is None:
        if pixel_values is None:
            raise InputError("generate needs pixel_values (B, C, H, W) or encoder_outputs")
        encoder_outputs = model.encode(pixel_values)
    context = model.context(_last_hidden(encoder_outputs))  # (B, N, D_ctx)
    B = context.shape[0]
    if decoder_input_ids is None:
        start = tokens.get("decoder_start")
        if start is None:
            raise InputError("tokens.decoder_start is not set\n    fix: add it to the spec, or pass decoder_input_ids")
        decoder_input_ids = torch.full((B, 1), start, dtype=torch.long, device=context.device)
    prompt_len = decoder_input_ids.shape[1]
    if max_new_tokens is None:
        total = max_length or defaults.get("max_length") or 20
        max_new_tokens = max(total - prompt_len, 0)
    eos = eos_token_id if eos_token_id is not None else defaults.get("eos_token_id", tokens.get("eos"))
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=context.device)
    pad = pad_token_id if pad_token_id is not None else tokens.get("pad")
    if pad is None:
        pad = int(eos_ids[0]) if len(eos_ids) else 0

    decoder = model.decoder
    cache = KVCache(len(decoder.layer_specs()), prompt_len + max_new_tokens)
    out = [decoder_input_ids]
    finished = torch.zeros(B, dtype=torch.bool, device=context.device)
    logits = decoder(decoder_input_ids, context=context, cache=cache).logits[:, -1]  # (B, V)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (B,)
        if len(eos_ids):
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            finished |= torch.isin(nxt, eos_ids)
        out.append(nxt[:, None])
        if step == max_new_tokens - 1 or (len(eos_ids) and bool(finished.all())):
            break
        logits = decoder(nxt[:, None], context=context, cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)

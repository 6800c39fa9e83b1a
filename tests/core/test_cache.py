"""The public decoder cache (issue 13, item 3): ``KVCache`` satisfies ``DecoderCache``, keeps grouped-query K/V
(fewer key/value heads than query heads) as given, and ``context_kv`` projects a layer's context once per
generation and reads it back afterwards."""

from __future__ import annotations

import pytest
import torch

from splice.adapters.cross_attention import StandardCrossAttention
from splice.core.cache import KVCache, context_kv
from splice.core.interfaces import DecoderCache

B, N_HEADS, N_KV, HS, N = 2, 4, 2, 8, 5  # grouped-query: 4 query heads share 2 key/value heads


def _kv(rows: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, N_KV, T, HS, generator=g), torch.randn(rows, N_KV, T, HS, generator=g)


def test_kv_cache_is_a_decoder_cache():
    assert isinstance(KVCache(num_layers=2, max_len=4), DecoderCache)
    assert not isinstance(object(), DecoderCache)


def test_old_import_paths_still_work():
    from splice.core.generation import KVCache as from_generation
    from splice.plugins._shared import cached_context_kv

    assert from_generation is KVCache and cached_context_kv is context_kv


def test_grouped_query_update_keeps_the_kv_heads():
    cache = KVCache(num_layers=1, max_len=6)
    k, v = _kv(B, 3, seed=0)
    keys, values = cache.update(0, k, v)
    assert keys.shape == values.shape == (B, N_KV, 3, HS)
    cache.advance(3)
    k2, v2 = _kv(B, 1, seed=1)
    keys, values = cache.update(0, k2, v2)
    cache.advance(1)
    assert keys.shape == (B, N_KV, 4, HS) and cache.length == 4
    assert torch.equal(keys, torch.cat([k, k2], dim=2)) and torch.equal(values, torch.cat([v, v2], dim=2))
    # what a grouped-query decoder does with them: each K/V head serves N_HEADS // N_KV query heads
    q = torch.randn(B, N_HEADS, 1, HS)
    y = torch.nn.functional.scaled_dot_product_attention(
        q, keys.repeat_interleave(N_HEADS // N_KV, dim=1), values.repeat_interleave(N_HEADS // N_KV, dim=1))
    assert y.shape == (B, N_HEADS, 1, HS)
    with pytest.raises(ValueError, match="holds 6 tokens"):
        cache.update(0, *_kv(B, 3, seed=2))


def test_reorder_and_repeat_interleave_on_grouped_query_shapes():
    cache = KVCache(num_layers=2, max_len=5)
    k, v = _kv(B, 3, seed=3)
    for layer in range(2):
        cache.update(layer, k, v)
    cache.advance(3)
    cross = _kv(B, N, seed=4)
    cache.cross[0] = cross
    cache.repeat_interleave(3)
    assert cache.k[0].shape == (B * 3, N_KV, 5, HS) and cache.batch_size == B * 3
    assert cache.cross[0][0].shape == (B * 3, N_KV, N, HS) and cache.cross[1] is None
    assert torch.equal(cache.v[1][:, :, :3], v.repeat_interleave(3, dim=0))
    assert torch.equal(cache.cross[0][1], cross[1].repeat_interleave(3, dim=0))
    index = torch.tensor([5, 0, 0, 3, 2, 1])
    before = cache.k[1][:, :, :3].clone()
    cache.reorder(index)
    assert torch.equal(cache.k[1][:, :, :3], before[index])
    keys, _ = cache.update(1, *_kv(B * 3, 1, seed=5))
    assert keys.shape == (B * 3, N_KV, 4, HS) and torch.equal(keys[:, :, :3], before[index])


def test_context_kv_projects_once_then_reads_back():
    module = StandardCrossAttention(width=32, heads=N_HEADS, context_width=24).eval()
    projections = []
    module.k_proj.register_forward_hook(lambda mod, args, out: projections.append(out.shape))
    context = torch.randn(B, N, 24)
    cache = KVCache(num_layers=3, max_len=8)

    first = context_kv(module, context, cache, 1)
    assert len(projections) == 1 and first[0].shape == (B, N_HEADS, N, 32 // N_HEADS)
    assert cache.cross[1] is first and cache.cross[0] is None and cache.cross[2] is None
    again = context_kv(module, context, cache, 1)
    later = context_kv(module, None, cache, 1)  # later steps need not pass the context again
    assert again is first and later is first and len(projections) == 1
    # the stored K/V stand for the context: the layer's output is the same either way
    hidden = torch.randn(B, 2, 32)
    with torch.no_grad():
        assert torch.allclose(module(hidden, kv=first), module(hidden, context=context), atol=1e-6)
    projections.clear()
    want_k, want_v = module.context_kv(context)
    assert torch.equal(first[0], want_k) and torch.equal(first[1], want_v)


def test_context_kv_without_cache_or_context():
    module = StandardCrossAttention(width=16, heads=2, context_width=16)
    assert context_kv(module, torch.randn(1, 3, 16), None, 0) is None  # no cache: the module projects itself
    assert context_kv(module, None, KVCache(num_layers=1, max_len=4), 0) is None  # nothing stored, nothing given

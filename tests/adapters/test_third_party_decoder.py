"""A third-party decoder without cross-attention (tests/fixtures/splice_tinyllama, LLaMA-style) gets it
through the adapter protocol: nothing in splice's core knows it."""

from __future__ import annotations

import pytest
import torch

import splice


def spec(kind="standard", layers="all"):
    return {
        "encoder": {"name": "vit", "config": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3}},
        "decoder": {"name": "tinyllama", "config": {"vocab_size": 64, "hidden_size": 32, "num_layers": 4, "num_heads": 4, "intermediate_size": 64}},
        "cross_attention": {"kind": kind, "layers": layers},
        "tokens": {"decoder_start": 1, "pad": 0, "eos": 2},
    }


@pytest.mark.parametrize("kind", ["standard", "gated"])
@pytest.mark.parametrize("layers,expected", [("all", [0, 1, 2, 3]), ("every-2", [0, 2]), ([1, 3], [1, 3])])
def test_adapters_fill_only_the_listed_slots(kind, layers, expected):
    plan = splice.validate(spec(kind, layers))
    assert plan.ok, plan.summary()
    assert sorted(plan.cross_attention) == expected and set(plan.cross_attention.values()) <= {kind}
    model = splice.compose(spec(kind, layers), seed=0)
    got = [i for i, layer in enumerate(model.decoder.layers) if layer.crossattention is not None]
    assert got == expected
    assert plan.params["cross_attention"] == sum(p.numel() for m in model.cross_attention_modules for p in m.parameters())


@pytest.mark.parametrize("layers", ["none", []])
def test_no_layer_with_cross_attention_is_refused(layers):
    """A model whose text never sees the image cannot run (the decoder refuses a context it has no layer for)."""
    plan = splice.validate(spec("standard", layers))
    assert [p.path for p in plan.problems] == ["cross_attention.layers"] and "never sees the image" in str(plan.problems[0])


def test_gated_at_init_leaves_the_decoder_unchanged():
    model = splice.compose(spec("gated"), seed=0).eval()
    ids = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        with_image = model(pixel_values=torch.randn(2, 3, 32, 32), decoder_input_ids=ids).logits
        without = model.decoder(ids).logits
    assert torch.equal(with_image, without)


def test_standard_uses_the_image_and_trains():
    model = splice.compose(spec("standard", "every-2"), seed=0)
    ids = torch.randint(3, 64, (2, 6))
    a = model(pixel_values=torch.randn(2, 3, 32, 32), decoder_input_ids=ids).logits
    b = model(pixel_values=torch.randn(2, 3, 32, 32), decoder_input_ids=ids).logits
    assert not torch.allclose(a, b)
    out = model(pixel_values=torch.randn(2, 3, 32, 32), labels=ids)
    out.loss.backward()
    assert model.decoder.layers[0].crossattention.q_proj.weight.grad is not None


def test_cached_greedy_equals_recomputing(tmp_path):
    model = splice.compose(spec("standard"), seed=0).eval()
    px = torch.randn(2, 3, 32, 32)
    ids = model.generate(px, max_new_tokens=6, eos_token_id=[])
    # recompute each step from scratch, no cache
    seq = torch.full((2, 1), 1)
    with torch.no_grad():
        for _ in range(6):
            nxt = model(pixel_values=px, decoder_input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert ids.tolist() == seq.tolist()
    model.save_pretrained(tmp_path / "m")
    assert splice.load(tmp_path / "m").generate(px, max_new_tokens=6, eos_token_id=[]).tolist() == ids.tolist()

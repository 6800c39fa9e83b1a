"""Bad specs give one clear SpliceError subclass naming the path, the value and the fix; good ones plan right."""

from __future__ import annotations

import copy

import pytest
import torch

import splice
from splice.core.composer import validate

TINY = {
    "encoder": {"name": "vit", "config": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}},
    "decoder": {"name": "gpt2", "config": {"vocab_size": 99, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}},
    "tokens": {"decoder_start": 98, "pad": 0, "eos": 98},
}


def spec(**changes):
    s = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        node = s
        *head, last = dotted.split("__")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return s


def test_good_spec_plans_without_weights():
    plan = validate(TINY)
    assert plan.ok, plan.summary()
    assert plan.projection == "linear"  # 48 -> 32, as transformers would
    assert plan.cross_attention == {0: "standard", 1: "standard"}
    assert all(p.device.type == "meta" for p in plan.meta_model.parameters())
    model = splice.compose(TINY, seed=0)
    assert plan.params["total"] == model.num_parameters()
    assert "ok" in plan.summary()


def test_unknown_name_suggests_close_matches():
    with pytest.raises(splice.UnknownComponentError) as e:
        splice.compose(spec(encoder__name="vitt"))
    assert "encoder.name" in str(e.value) and "'vit'" in str(e.value)
    with pytest.raises(splice.UnknownComponentError, match="cross_attention.kind.*'gated'"):
        splice.compose(spec(cross_attention__kind="gatted"))


def test_every_problem_reported_at_once():
    bad = spec(encoder__confg={}, decoder__pretrained=3.5, tokens__pad=-1)
    bad["frezee"] = ["encoder"]
    plan = validate(bad)
    paths = {p.path for p in plan.problems}
    assert {"encoder.confg", "decoder.pretrained", "tokens.pad", "frezee"} <= paths
    with pytest.raises(splice.ConfigError) as e:
        plan.raise_for_problems()
    assert "did you mean 'config'" in str(e.value) and "did you mean 'freeze'" in str(e.value)


def test_component_config_problems_have_dotted_paths():
    plan = validate(spec(decoder__config__n_head=5, decoder__config__n_layr=2, encoder__config__depth="two"))
    paths = {p.path for p in plan.problems}
    assert "decoder.config.n_layr" in paths
    assert "encoder.config.depth" in paths
    plan = validate(spec(decoder__config__n_head=5))
    assert [p.path for p in plan.problems] == ["decoder.config"]
    assert "n_head=5 does not divide n_embd=32" in str(plan.problems[0])


def test_width_mismatch_with_projection_none():
    with pytest.raises(splice.IncompatibleComponentsError) as e:
        splice.compose(spec(projection="none"))
    msg = str(e.value)
    assert "48" in msg and "32" in msg and "encoder 'vit'" in msg and "decoder 'gpt2'" in msg and "fix" in msg


def test_heads_must_divide_width():
    with pytest.raises(splice.ConfigError, match="n_head"):
        splice.compose(spec(decoder__config__n_head=5))
    with pytest.raises(splice.ConfigError, match="num_heads"):
        splice.compose(spec(encoder__config__num_heads=5))


def test_token_ids_must_fit_vocabulary():
    with pytest.raises(splice.IncompatibleComponentsError, match=r"tokens.eos.*0\.\.98"):
        splice.compose(spec(tokens__eos=500))


def test_image_size_the_encoder_cannot_take():
    with pytest.raises(splice.ConfigError, match="img_size"):
        splice.compose(spec(encoder__config__img_size=30))


def test_max_length_must_fit_positions():
    with pytest.raises(splice.IncompatibleComponentsError, match="max_length"):
        splice.compose({**TINY, "max_length": 65})


def test_sparse_layers_and_freeze():
    model = splice.compose(spec(decoder__config__n_layer=4, cross_attention__layers="every-2", freeze=["encoder", "decoder"]))
    assert [i for i, b in enumerate(model.decoder.h) if b.crossattention is not None] == [0, 2]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("enc_to_dec_proj", "decoder.h.0.crossattention", "decoder.h.2.crossattention")) for n in trainable)
    plan = validate(spec(cross_attention__layers=[0, 7]))
    assert any(p.path == "cross_attention.layers" for p in plan.problems)


def test_presets_and_any_timm_model():
    plan = validate("vit-gpt2")  # a composition preset, full size, but on the meta device
    assert plan.ok and plan.params["total"] > 200_000_000
    plan = validate(spec(encoder__name="resnet18", encoder__config={"img_size": 32}))
    assert plan.ok, plan.summary()
    assert plan.encoder.family == "timm" and plan.encoder.width == 512


def test_forward_errors_are_clear():
    model = splice.compose(spec(tokens={}))
    px = torch.randn(1, 3, 32, 32)
    with pytest.raises(splice.InputError, match="tokens.decoder_start"):
        model(pixel_values=px, labels=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(splice.InputError, match="pixel_values"):
        model(decoder_input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(splice.InputError):
        model(pixel_values=torch.randn(1, 3, 48, 48), decoder_input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(splice.InputError, match="vocab"):
        model(pixel_values=px, decoder_input_ids=torch.full((1, 3), 99))


def test_loss_ignores_minus_100_and_matches_manual():
    model = splice.compose(TINY, seed=0).eval()
    px = torch.randn(2, 3, 32, 32)
    labels = torch.randint(1, 98, (2, 5))
    labels[1, 3:] = -100
    out = model(pixel_values=px, labels=labels)
    shifted = torch.cat([torch.full((2, 1), 98), labels[:, :-1]], 1)
    ids = shifted.masked_fill(shifted == -100, 0)
    logits = model(pixel_values=px, decoder_input_ids=ids).logits
    keep = labels != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(out.loss, manual, atol=1e-6)


def test_projection_with_options(tmp_path):
    model = splice.compose({**TINY, "projection": {"kind": "mlp", "config": {"hidden": 64, "act": "relu"}}}, seed=0)
    assert model.enc_to_dec_proj.fc1.out_features == 64 and isinstance(model.enc_to_dec_proj.act, torch.nn.ReLU)
    model.save_pretrained(tmp_path / "m")
    assert splice.load(tmp_path / "m").enc_to_dec_proj.fc1.out_features == 64
    plan = validate({**TINY, "projection": {"kind": "mlp", "config": {"hiden": 64}}})
    assert [p.path for p in plan.problems] == ["projection.config.hiden"] and "did you mean 'hidden'" in str(plan.problems[0])

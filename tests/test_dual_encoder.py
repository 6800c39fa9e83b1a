"""The dual-encoder kind (issue 15): the text encoders, the kind's spec and model, and VisionTextDualEncoder
folders, each against transformers (the oracle) on the same weights, for every vision x text pair the registry
can express in transformers."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import splice
from splice.core.errors import CheckpointError, ConfigError, InputError, SpliceError
from splice.core.plugins import get_registry
from splice.kinds.dual_encoder import DualEncoderModel, clip_loss, siglip_loss

from oracle import perturb

TOL = 1e-4
REGISTRY = get_registry()


def _hf_entries(kind: str) -> list[str]:
    """Components of ``kind`` that transformers can build (a config_to_hf and a state_dict_to_hf)."""
    return [e.name for e in REGISTRY.entries(kind)
            if e.hf is not None and e.hf.config_to_hf is not None and e.hf.state_dict_to_hf is not None]


VISION = _hf_entries("encoder")
TEXT = _hf_entries("text_encoder")


def _hf_config(kind: str, name: str) -> dict:
    entry = REGISTRY.get(kind, name)
    return entry.hf.config_to_hf(entry.config_cls(**entry.tiny).model_dump())


def _tiny_spec(vision: str = "vit", text: str = "bert", **extra) -> dict:
    parts = {role: {"name": name, "config": dict(REGISTRY.get(kind, name).tiny)}
             for role, kind, name in (("vision", "encoder", vision), ("text", "text_encoder", text))}
    return {"kind": "dual-encoder", **parts, "projection_dim": 16, **extra}


def _hf_model(vision: str, text: str, seed: int = 0) -> transformers.VisionTextDualEncoderModel:
    torch.manual_seed(seed)
    cfg = transformers.VisionTextDualEncoderConfig(vision_config=_hf_config("encoder", vision),
                                                   text_config=_hf_config("text_encoder", text), projection_dim=16)
    return perturb(transformers.VisionTextDualEncoderModel(config=cfg), seed)


def _inputs(model, n_img: int = 3, n_txt: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    H, W = model.vision.preprocessing.image_size
    px = torch.randn(n_img, 3, H, W, generator=g)
    pad = model.text.pad_token_id
    ids = torch.randint(pad + 1, model.text.vocab_size, (n_txt, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[-1, 5:], mask[-1, 5:] = pad, 0  # one padded caption
    return px, ids, mask


def _max_diff(ours, theirs, ours_model, their_model, px, ids, mask) -> dict[str, float]:
    return {
        "logits_per_image": (ours.logits_per_image - theirs.logits_per_image).abs().max().item(),
        "logits_per_text": (ours.logits_per_text - theirs.logits_per_text).abs().max().item(),
        "image_embeds": (ours.image_embeds - theirs.image_embeds).abs().max().item(),
        "text_embeds": (ours.text_embeds - theirs.text_embeds).abs().max().item(),
        "loss": (ours.loss - theirs.loss).abs().item(),
        "image_features": (ours_model.get_image_features(px)
                           - their_model.get_image_features(pixel_values=px).pooler_output).abs().max().item(),
        "text_features": (ours_model.get_text_features(ids, mask)
                          - their_model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
                          ).abs().max().item(),
    }


def _compare(ours_model, their_model) -> dict[str, float]:
    px, ids, mask = _inputs(ours_model)
    with torch.no_grad():
        ours = ours_model(pixel_values=px, input_ids=ids, attention_mask=mask, return_loss=True)
        theirs = their_model(pixel_values=px, input_ids=ids, attention_mask=mask, return_loss=True)
        return _max_diff(ours, theirs, ours_model, their_model, px, ids, mask)


# -- the text encoders ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEXT)
def test_text_encoder_matches_transformers_base_model(name):
    entry = REGISTRY.get("text_encoder", name)
    hf_cfg = _hf_config("text_encoder", name)
    torch.manual_seed(0)
    theirs = perturb(transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**hf_cfg)))
    ours = entry.builder(entry.config_cls(**entry.hf.config_from_hf(theirs.config.to_dict()))).eval()
    mapped, unused = entry.hf.state_dict_from_hf(theirs.state_dict(), theirs.config.to_dict())[:2]
    assert ours.load_state_dict(mapped, strict=True) and not unused
    ids = torch.randint(2, ours.vocab_size, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    types = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2) if ours.type_vocab_size > 1 else None
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() < TOL
    assert (a.pooler_output - b.pooler_output).abs().max() < TOL
    assert len(a.hidden_states) == len(b.hidden_states)
    back = entry.hf.state_dict_to_hf(ours.state_dict(), hf_cfg)
    assert set(back) == set(theirs.state_dict()) - {"embeddings.position_ids", "embeddings.token_type_ids"}


def test_text_encoder_bad_inputs_are_input_errors():
    entry = REGISTRY.get("text_encoder", "bert")
    model = entry.builder(entry.config_cls(**entry.tiny)).eval()
    with pytest.raises(InputError, match="input_ids"):
        model(torch.tensor([[1, 2, 500]]))
    with pytest.raises(InputError, match="attention_mask"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(InputError, match="token_type_ids"):
        model(torch.tensor([[1, 2, 3]]), token_type_ids=torch.tensor([[0, 5, 0]]))
    with pytest.raises(InputError, match="input_ids"):
        model(torch.zeros(1, 1000, dtype=torch.long))  # longer than the positions


# -- the kind -------------------------------------------------------------------------------------------------


def test_validate_compose_and_summary():
    plan = splice.validate(_tiny_spec())
    assert plan.ok, plan.summary()
    text = plan.summary()
    assert "dual-encoder" in text and "dense + tanh" in text and "clip" in text
    model = splice.compose(_tiny_spec())
    assert isinstance(model, DualEncoderModel)
    assert model.visual_projection.bias is None and model.text_projection.bias is None
    assert isinstance(model.logit_scale, torch.nn.Parameter)
    assert model.logit_scale.item() == pytest.approx(2.6592)
    px, ids, mask = _inputs(model, 2, 4)
    out = model(pixel_values=px, input_ids=ids, attention_mask=mask, return_loss=False)
    assert out.logits_per_image.shape == (2, 4) and out.logits_per_text.shape == (4, 2) and out.loss is None
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert model.get_image_features(px).shape == (2, 16) and model.get_text_features(ids, mask).shape == (4, 16)


def test_spec_problems_name_the_field():
    plan = splice.validate({**_tiny_spec(), "text": {"name": "gpt2"}})
    assert not plan.ok and any(p.path == "text.name" for p in plan.problems)
    with pytest.raises(SpliceError, match="projection_dim"):
        splice.compose(_tiny_spec(projection_dim=0))
    with pytest.raises(SpliceError, match="loss"):
        splice.compose(_tiny_spec(loss="triplet"))
    with pytest.raises(SpliceError, match="projectin_dim"):
        splice.compose({**_tiny_spec(), "projectin_dim": 8})


def test_loss_needs_equal_batches_and_both_inputs():
    model = splice.compose(_tiny_spec())
    px, ids, mask = _inputs(model, 2, 3)
    with pytest.raises(InputError, match="as many texts as images"):
        model(pixel_values=px, input_ids=ids, attention_mask=mask)
    with pytest.raises(InputError, match="pixel_values"):
        model(input_ids=ids)
    with pytest.raises(InputError, match="pixel_values"):
        model(pixel_values=torch.randn(2, 3, 16, 16), input_ids=ids[:2])


def test_freeze_vision_is_lit():
    model = splice.compose(_tiny_spec(freeze=["vision"]))
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not model.vision_pooler.weight.requires_grad
    assert all(p.requires_grad for p in model.text.parameters()) and model.visual_projection.weight.requires_grad
    px, ids, mask = _inputs(model, 2, 2)
    model(pixel_values=px, input_ids=ids, attention_mask=mask).loss.backward()
    assert model.visual_projection.weight.grad is not None and model.text.pooler.dense.weight.grad is not None


def test_siglip_loss_and_bias():
    model = splice.compose(_tiny_spec(loss="siglip", logit_scale_init=math.log(10)))
    assert model.logit_bias.item() == -10.0
    px, ids, mask = _inputs(model, 3, 3)
    out = model(pixel_values=px, input_ids=ids, attention_mask=mask)
    logits = out.text_embeds @ out.image_embeds.t() * 10.0 - 10.0
    labels = 2 * torch.eye(3) - 1
    expected = -torch.nn.functional.logsigmoid(labels * logits).sum(-1).mean()
    assert torch.allclose(out.logits_per_text, logits, atol=1e-5)
    assert torch.allclose(out.loss, expected, atol=1e-5) and torch.allclose(siglip_loss(logits), expected)
    with pytest.raises(CheckpointError, match="siglip"):
        splice.export_transformers(model, "/nonexistent/never-written")


def test_clip_loss_is_transformers():
    from transformers.models.vision_text_dual_encoder.modeling_vision_text_dual_encoder import (
        image_text_contrastive_loss as hf_clip_loss)

    logits = torch.randn(5, 5)
    assert torch.allclose(clip_loss(logits), hf_clip_loss(logits), atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = splice.compose(_tiny_spec(text="roberta", freeze=["vision"]))
    model.save_pretrained(tmp_path / "m")
    back = splice.load(tmp_path / "m")
    assert isinstance(back, DualEncoderModel)
    px, ids, mask = _inputs(model)
    with torch.no_grad():
        a = model.eval()(pixel_values=px, input_ids=ids, attention_mask=mask)
        b = back(pixel_values=px, input_ids=ids, attention_mask=mask)
    assert torch.equal(a.logits_per_image, b.logits_per_image)


# -- transformers folders: every vision x text pair ------------------------------------------------------------


@pytest.mark.parametrize("text", TEXT)
@pytest.mark.parametrize("vision", VISION)
def test_transformers_folder_parity_and_export(tmp_path, vision, text):
    theirs = _hf_model(vision, text)
    theirs.save_pretrained(tmp_path / "hf")
    ours = splice.load(tmp_path / "hf")
    assert isinstance(ours, DualEncoderModel)
    assert not ours.loading_report.missing and not ours.loading_report.unexpected
    diffs = _compare(ours, theirs)
    assert max(diffs.values()) < TOL, diffs
    splice.export_transformers(ours, tmp_path / "out")
    again = transformers.VisionTextDualEncoderModel.from_pretrained(tmp_path / "out").eval()
    diffs = _compare(ours, again)
    assert max(diffs.values()) < TOL, diffs
    reloaded = splice.load(tmp_path / "out")
    assert _compare(reloaded, theirs)["logits_per_image"] < TOL


def test_unread_tower_is_a_config_error(tmp_path):
    theirs = _hf_model("vit", "bert")
    theirs.save_pretrained(tmp_path / "hf")
    cfg = (tmp_path / "hf" / "config.json")
    import json

    data = json.loads(cfg.read_text())
    data["text_config"]["model_type"] = "electra"
    cfg.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="text_config.model_type"):
        splice.load(tmp_path / "hf")

"""The dual-encoder kind (issue 15): the text encoders, the kind's spec and model, and VisionTextDualEncoder
folders, each against transformers (the oracle) on the same weights, for every vision x text pair the registry
can express in transformers."""

from __future__ import annotations

import json
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


def _hf_model(vision: str, text: str, seed: int = 0, **vision_overrides) -> transformers.VisionTextDualEncoderModel:
    torch.manual_seed(seed)
    cfg = transformers.VisionTextDualEncoderConfig(vision_config={**_hf_config("encoder", vision), **vision_overrides},
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
    from splice.core.processing import processor_for

    assert processor_for(ours) is not None  # no preprocessor_config.json in the folder: the vision preprocessing
    assert (tmp_path / "out" / "preprocessor_config.json").exists()


def test_beit_class_token_pooling_matches_transformers(tmp_path):
    theirs = _hf_model("beit", "bert", use_mean_pooling=False)  # BeitPooler: the (normed) class token
    theirs.save_pretrained(tmp_path / "hf")
    ours = splice.load(tmp_path / "hf")
    diffs = _compare(ours, theirs)
    assert max(diffs.values()) < TOL, diffs


def test_unread_tower_is_a_config_error(tmp_path):
    theirs = _hf_model("vit", "bert")
    theirs.save_pretrained(tmp_path / "hf")
    cfg = (tmp_path / "hf" / "config.json")

    data = json.loads(cfg.read_text())
    data["text_config"]["model_type"] = "electra"
    cfg.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="text_config.model_type"):
        splice.load(tmp_path / "hf")


# -- warm start (transformers' from_vision_text_pretrained) ----------------------------------------------------


def test_warm_start_from_pretrained_towers(tmp_path):
    torch.manual_seed(0)
    vit = perturb(transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**_hf_config("encoder", "vit"))))
    bert = perturb(transformers.AutoModel.from_config(
        transformers.AutoConfig.for_model(**_hf_config("text_encoder", "bert"))), seed=1)
    vit.save_pretrained(tmp_path / "vit")
    bert.save_pretrained(tmp_path / "bert")
    spec = {"kind": "dual-encoder", "vision": {"name": "vit", "pretrained": str(tmp_path / "vit")},
            "text": {"name": "bert", "pretrained": str(tmp_path / "bert")}, "projection_dim": 16}
    ours = splice.compose(spec).eval()
    report = ours.loading_report
    assert not report.missing
    # new: the projections and logit_scale, as in transformers; the ViT pooler (held by the kind, since splice's
    # vision encoders return tokens only) comes from the ViT folder, as transformers reads it
    assert set(report.initialised) == {"visual_projection.weight", "text_projection.weight", "logit_scale"}
    assert {"vision_pooler.weight", "vision_pooler.bias"} <= set(report.loaded)
    assert not any("pooler" in name for name in report.unused)
    theirs = transformers.VisionTextDualEncoderModel.from_vision_text_pretrained(
        str(tmp_path / "vit"), str(tmp_path / "bert"), projection_dim=16).eval()
    with torch.no_grad():  # the fresh parts taken from transformers: everything else came from the two folders
        for name in ("visual_projection.weight", "text_projection.weight", "logit_scale"):
            ours.state_dict()[name].copy_(theirs.state_dict()[name])
    diffs = _compare(ours, theirs)
    assert max(diffs.values()) < TOL, diffs


# -- splice classify / splice embed -----------------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "photo", "of", "cat", "dog", "car", "the"]


def _tokenizer():
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.add_special_tokens(WORDS[:4])
    return tok


@pytest.fixture
def dual_folder(tmp_path):
    """A ViT + BERT VisionTextDualEncoder saved by transformers, with a word tokenizer and a ViT image processor,
    and three 32x32 images (no resizing, so both sides see the same pixels)."""
    import numpy as np
    from PIL import Image

    theirs = _hf_model("vit", "bert")
    folder = tmp_path / "clip"
    theirs.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    _tokenizer().save(str(folder / "tokenizer.json"))
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images[-1])
    return folder, [str(p) for p in images], theirs


def _their_text(theirs, texts):
    enc = _tokenizer().encode_batch(texts)
    T = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in enc])
    return ids, mask


def test_classify_matches_transformers(dual_folder, capsys):
    from PIL import Image

    from splice.cli import main

    folder, images, theirs = dual_folder
    assert main(["classify", str(folder), *images, "--labels", "cat, dog,car", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    prompts = [f"a photo of a {label}." for label in ("cat", "dog", "car")]
    ids, mask = _their_text(theirs, prompts)
    px = transformers.ViTImageProcessor.from_pretrained(folder)([Image.open(p) for p in images],
                                                                return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = theirs(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image.softmax(-1)
    for row, expected in zip(got, probs.tolist()):
        assert row["error"] is None and list(row["scores"])[0] == row["label"]
        assert max(abs(row["scores"][label] - p) for label, p in zip(("cat", "dog", "car"), expected)) < TOL
    assert main(["classify", str(folder), images[0], "--labels", "cat,dog", "--template", "the {}"]) == 0
    assert capsys.readouterr().out.startswith(images[0] + ": ")


def test_embed_matches_transformers(dual_folder, tmp_path):
    from PIL import Image
    from safetensors import safe_open

    from splice.cli import main

    folder, images, theirs = dual_folder
    texts = ["a cat", "the dog car"]
    assert main(["embed", str(folder), "--texts", *texts, "--out", str(tmp_path / "t.safetensors")]) == 0
    assert main(["embed", str(folder), "--images", *images, "--out", str(tmp_path / "i.safetensors")]) == 0
    ids, mask = _their_text(theirs, texts)
    px = transformers.ViTImageProcessor.from_pretrained(folder)([Image.open(p) for p in images],
                                                                return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want_t = theirs.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        want_i = theirs.get_image_features(pixel_values=px).pooler_output
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert (f.get_tensor("text_embeds") - want_t).abs().max() < TOL
        assert json.loads(f.metadata()["inputs"]) == texts
    with safe_open(str(tmp_path / "i.safetensors"), "pt") as f:
        assert (f.get_tensor("image_embeds") - want_i).abs().max() < TOL


def test_classify_and_embed_refuse_bad_input(dual_folder, tmp_path, capsys):
    from splice.cli import main

    folder, images, _ = dual_folder
    assert main(["classify", str(folder), images[0], "--labels", "cat", "--template", "no slot"]) == 1
    assert "--template" in capsys.readouterr().err
    assert main(["classify", str(folder), images[0], "--labels", " , "]) == 1
    assert "--labels" in capsys.readouterr().err
    assert main(["classify", str(folder), images[0], "--labels", "cat,cat"]) == 1
    assert "more than once" in capsys.readouterr().err
    assert main(["classify", str(folder), images[0], str(tmp_path / "missing.png"), "--labels", "cat,dog"]) == 1
    assert "missing.png: error" in capsys.readouterr().out
    assert main(["embed", str(folder), "--texts", "a", "--out", str(tmp_path)]) == 1
    assert "--out" in capsys.readouterr().err
    captioner = tmp_path / "captioner"
    splice.compose({"encoder": {"name": "vit", "config": REGISTRY.get("encoder", "vit").tiny},
                    "decoder": {"name": "gpt2", "config": REGISTRY.get("decoder", "gpt2").tiny}}
                   ).save_pretrained(captioner)
    assert main(["classify", str(captioner), images[0], "--labels", "cat,dog"]) == 1
    assert "dual-encoder" in capsys.readouterr().err


# -- hostile input: every refusal a SpliceError naming the field ------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("projection_dim", True), ("projection_dim", "12"), ("projection_dim", 0), ("projection_dim", 10**30),
    ("logit_scale_init", math.nan), ("logit_scale_init", math.inf), ("logit_scale_init", True),
    ("logit_bias_init", math.nan), ("freeze", ["encoder"]), ("loss", None), ("vision", {"name": "bert"}),
    ("text", {"name": "vit"}), ("text", {"name": "bert", "config": {"hidden_size": 10**9}}), ("vision", None),
])
def test_hostile_spec_values_are_refused_by_name(field, value):
    with pytest.raises(SpliceError) as info:
        splice.compose({**_tiny_spec(), field: value})
    assert field in str(info.value) and "fix" in str(info.value)


@pytest.mark.parametrize("case", ["channels", "float ids", "mask shape", "3-D ids", "type range", "type shape",
                                  "pixels not a tensor", "no tokens", "mask not a tensor", "too long"])
def test_hostile_inputs_are_input_errors(case):
    model = splice.compose(_tiny_spec()).eval()
    px, ids, mask = _inputs(model, 2, 2)
    call = {
        "channels": lambda: model(pixel_values=px[:, :2], input_ids=ids),
        "float ids": lambda: model(pixel_values=px, input_ids=ids.float()),
        "mask shape": lambda: model(pixel_values=px, input_ids=ids, attention_mask=mask[:, :3]),
        "3-D ids": lambda: model(pixel_values=px, input_ids=ids[None]),
        "type range": lambda: model(pixel_values=px, input_ids=ids, token_type_ids=ids),
        "type shape": lambda: model(pixel_values=px, input_ids=ids, token_type_ids=ids[:, :2]),
        "pixels not a tensor": lambda: model(pixel_values="x", input_ids=ids),
        "no tokens": lambda: model.get_text_features(torch.zeros(2, 0, dtype=torch.long)),
        "mask not a tensor": lambda: model(pixel_values=px, input_ids=ids, attention_mask="x"),
        "too long": lambda: model(pixel_values=px, input_ids=torch.full((2, 600), 3)),
    }[case]
    with pytest.raises(InputError, match="fix"):
        call()


@pytest.mark.parametrize("key,value", [("pooler_act", "relu"), ("pooler_output_size", 8)])
def test_a_vit_pooler_splice_lacks_is_refused_by_name(tmp_path, key, value):
    theirs = _hf_model("vit", "bert", **{key: value})
    theirs.save_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError, match=f"vision_config.{key}"):
        splice.load(tmp_path / "hf")

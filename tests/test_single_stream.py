"""The single-stream kind (issue 17, VisualBERT): the base model and its five heads against transformers (the
oracle) on the same tiny random weights, losses included; folders saved by each transformers class loaded and
exported back; bypass_transformer against transformers' own modules called in the original order (its forward
crashes there); pixels through a vision encoder; the spec's checks; ``splice vqa``; a short training run."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import splice
from splice.core.errors import CheckpointError, ConfigError, InputError
from splice.core.plugins import get_registry
from splice.demo_vqa import build_tokenizer
from splice.kinds.single_stream import SingleStreamModel

from oracle import perturb

TOL = 1e-4
REGISTRY = get_registry()
HF = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
          max_position_embeddings=64, visual_embedding_dim=24, num_labels=5)
CLASSES = {"none": "VisualBertModel", "pretraining": "VisualBertForPreTraining",
           "vqa": "VisualBertForQuestionAnswering", "visual-reasoning": "VisualBertForVisualReasoning",
           "multiple-choice": "VisualBertForMultipleChoice", "region-to-phrase": "VisualBertForRegionToPhraseAlignment"}
B, T, NV = 2, 7, 3


def _hf_model(head: str, seed: int = 0, **config):
    torch.manual_seed(seed)
    cfg = transformers.VisualBertConfig(**{**HF, **config})
    return perturb(getattr(transformers, CLASSES[head])(cfg), seed, scale=0.05)


def _text_config() -> dict:
    return dict(REGISTRY.get("text_encoder", "bert").tiny)


def _spec(head="none", **extra) -> dict:
    return {"kind": "single-stream", "text": {"name": "bert", "config": _text_config()}, "visual_embedding_dim": 24,
            "head": head, **extra}


def _inputs(seed: int = 1) -> dict:
    """Two texts (the second padded) with three visual tokens each (the first row's last one masked)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, 4:] = 1
    visual_mask = torch.ones(B, NV, dtype=torch.long)
    visual_mask[0, 2] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                visual_embeds=torch.randn(B, NV, 24, generator=g), visual_attention_mask=visual_mask)


def _head_inputs(head: str, seed: int = 2) -> tuple[dict, dict]:
    """(inputs, labels) for ``head``, as transformers' class of that head takes them."""
    g = torch.Generator().manual_seed(seed)
    kw, labels = _inputs(), {}
    if head == "multiple-choice":
        kw = {k: torch.stack([v, v.flip(0)], dim=1) for k, v in kw.items()}  # (B, 2, ...)
        labels = dict(labels=torch.tensor([0, 1]))
    elif head == "pretraining":
        mlm = torch.randint(0, 99, (B, T + NV), generator=g)
        mlm[:, T:] = -100
        labels = dict(labels=mlm, sentence_image_labels=torch.tensor([0, 1]))
    elif head == "vqa":
        labels = dict(labels=torch.softmax(torch.randn(B, 5, generator=g), dim=-1))
    elif head == "visual-reasoning":
        labels = dict(labels=torch.tensor([1, 0]))
    elif head == "region-to-phrase":
        kw["region_to_phrase_position"] = torch.randint(-1, T, (B, T + NV), generator=g)
        scores = torch.rand(B, T + NV, NV, generator=g) * kw["visual_attention_mask"][:, None, :]
        labels = dict(labels=scores / scores.sum(-1, keepdim=True))  # no weight on a masked visual token
    return kw, labels


def _their_logits(head: str, out) -> torch.Tensor:
    return out.last_hidden_state if head == "none" else out.prediction_logits if head == "pretraining" else out.logits


def _ours_logits(head: str, out) -> torch.Tensor:
    return out.last_hidden_state if head == "none" else out.logits


def _diffs(head: str, hf_model, ours) -> dict[str, float]:
    kw, labels = _head_inputs(head)
    with torch.no_grad():
        theirs, mine = hf_model(**kw), ours(**kw)
        out = {"logits": (_their_logits(head, theirs) - _ours_logits(head, mine)).abs().max().item()}
        if head == "none":
            out["pooler"] = (theirs.pooler_output - mine.pooler_output).abs().max().item()
        if head == "pretraining":
            out["seq_relationship"] = (theirs.seq_relationship_logits - mine.seq_relationship_logits).abs().max().item()
        if labels:
            their_loss, my_loss = hf_model(**kw, **labels).loss, ours(**kw, **labels).loss
            assert torch.isfinite(their_loss)
            out["loss"] = (their_loss - my_loss).abs().item()
    return out


# -- parity: transformers folders read ----------------------------------------------------------------------


@pytest.mark.parametrize("head", list(CLASSES))
def test_transformers_folder_loads_with_the_same_outputs(head, tmp_path):
    theirs = _hf_model(head)
    theirs.save_pretrained(tmp_path)
    ours = splice.load(tmp_path)
    assert isinstance(ours, SingleStreamModel) and ours.head_kind == head
    assert not ours.loading_report.missing and not ours.loading_report.unexpected
    diffs = _diffs(head, theirs, ours)
    print(head, diffs)
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize("head", list(CLASSES))
def test_export_loads_in_transformers_with_the_same_outputs(head, tmp_path):
    spec_head = {"kind": "vqa", "num_labels": 5, "labels": ["yes", "no", "2", "red", "dog"]} if head == "vqa" else head
    ours = splice.compose(_spec(spec_head), seed=0)
    perturb(ours, 1, scale=0.05)
    splice.export_transformers(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [CLASSES[head]] and config["model_type"] == "visual_bert"
    theirs = getattr(transformers, CLASSES[head]).from_pretrained(tmp_path).eval()
    diffs = _diffs(head, theirs, ours)
    assert max(diffs.values()) < TOL, diffs
    back = splice.load(tmp_path)
    assert back.spec["head"] == ours.spec["head"]
    mine = ours.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in back.state_dict().items())
    if head == "vqa":
        assert theirs.config.id2label[3] == "red"


def test_folder_of_each_class_round_trips_tensor_for_tensor(tmp_path):
    """A transformers folder read by splice and exported again holds the same tensors and settings."""
    from safetensors.torch import load_file

    for head in ("pretraining", "region-to-phrase"):
        src, out = tmp_path / f"{head}-hf", tmp_path / f"{head}-again"
        _hf_model(head, bypass_transformer=True).save_pretrained(src)
        splice.export_transformers(splice.load(src), out)
        a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        config = json.loads((out / "config.json").read_text())
        assert config["bypass_transformer"] is True and config["visual_embedding_dim"] == 24


def test_image_text_alignment_and_text_only_match_transformers(tmp_path):
    theirs = _hf_model("none")
    theirs.save_pretrained(tmp_path)
    ours = splice.load(tmp_path)
    kw = _inputs()
    alignment = torch.tensor([[[0, 1], [2, -1], [-1, -1]], [[3, 3], [1, -1], [4, 5]]])  # (B, Nv, 2)
    with torch.no_grad():
        a = theirs(**kw, image_text_alignment=alignment).last_hidden_state
        b = ours(**kw, image_text_alignment=alignment).last_hidden_state
        text = {k: kw[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        c, d = theirs(**text).last_hidden_state, ours(**text).last_hidden_state
    assert (a - b).abs().max() < TOL and (c - d).abs().max() < TOL


# -- bypass_transformer ---------------------------------------------------------------------------------------


def test_bypass_transformer_is_text_alone_then_the_additional_layer(tmp_path):
    """transformers' forward fails on this path; its own modules, called in the original order, are the oracle."""
    theirs = _hf_model("none", bypass_transformer=True).eval()
    kw = _inputs()
    with pytest.raises((IndexError, TypeError, AttributeError)):
        theirs(**kw)  # the upstream bug this kind works around
    theirs.save_pretrained(tmp_path)
    ours = splice.load(tmp_path)
    with torch.no_grad():
        emb = theirs.embeddings(input_ids=kw["input_ids"], token_type_ids=kw["token_type_ids"],
                                visual_embeds=kw["visual_embeds"])  # (B, T + Nv, D)
        neg = torch.finfo(emb.dtype).min
        text_mask = (1.0 - kw["attention_mask"][:, None, None, :].float()) * neg  # (B, 1, 1, T)
        both = torch.cat([kw["attention_mask"], kw["visual_attention_mask"]], dim=1)
        both_mask = (1.0 - both[:, None, None, :].float()) * neg  # (B, 1, 1, T + Nv)
        text = theirs.encoder(emb[:, :T], attention_mask=text_mask).last_hidden_state
        want = theirs.additional_layer(torch.cat([text, emb[:, T:]], dim=1), both_mask)[0]
        got = ours(**kw)
    assert (want - got.last_hidden_state).abs().max() < TOL
    assert (theirs.pooler(want) - got.pooler_output).abs().max() < TOL
    with torch.no_grad():  # without visual tokens there is nothing to bypass: the plain text encoder
        text_only = {k: kw[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        assert (theirs(**text_only).last_hidden_state - ours(**text_only).last_hidden_state).abs().max() < TOL


# -- pixels through a vision encoder -------------------------------------------------------------------------


@pytest.mark.parametrize("visual_dim,projection", [(None, "auto"), (24, "auto"), (24, "mlp")])
def test_pixels_through_a_vision_encoder(visual_dim, projection):
    vit = dict(REGISTRY.get("encoder", "vit").tiny)  # width 48
    spec = _spec({"kind": "vqa", "num_labels": 3}, vision={"name": "vit", "config": vit}, projection=projection)
    spec["visual_embedding_dim"] = visual_dim
    plan = splice.validate(spec)
    assert plan.ok, plan.summary()
    model = splice.compose(spec, seed=0).eval()
    assert model.visual_embedding_dim == (visual_dim or 48)
    assert (model.vision_projection is None) == (visual_dim is None)
    px = torch.randn(B, 3, 32, 32)
    kw = {k: v for k, v in _inputs().items() if not k.startswith("visual")}
    with torch.no_grad():
        out = model(pixel_values=px, **kw)
        tokens = model.vision(px).last_hidden_state  # (B, N, 48)
        if model.vision_projection is not None:
            tokens = model.vision_projection(tokens)
        same = model(visual_embeds=tokens, **kw)
    assert out.logits.shape == (B, 3)
    assert out.last_hidden_state.shape[1] == T + tokens.shape[1]
    assert torch.allclose(out.logits, same.logits, atol=1e-6)


def test_projection_problems_name_the_field():
    vit = {"name": "vit", "config": dict(REGISTRY.get("encoder", "vit").tiny)}
    plan = splice.validate(_spec(vision=vit, projection="none"))
    assert [p.path for p in plan.problems] == ["projection"] and "48" in str(plan.problems[0])
    plan = splice.validate(_spec(projection="linear"))  # no vision encoder to project
    assert [p.path for p in plan.problems] == ["projection"]
    plan = splice.validate(_spec(vision=vit, projection="lineer"))
    assert plan.problems[0].path == "projection"
    plan = splice.validate(_spec({"kind": "vqa"}))
    assert [p.path for p in plan.problems] == ["head.num_labels"]
    plan = splice.validate(_spec({"kind": "pretraining", "num_labels": 3}))
    assert [p.path for p in plan.problems] == ["head.num_labels"]
    plan = splice.validate(_spec({"kind": "vqa", "num_labels": 2, "labels": ["a", "b", "c"]}))
    assert [p.path for p in plan.problems] == ["head.labels"]
    plan = splice.validate({**_spec(), "visual_dim": 3})
    assert plan.problems and "visual_dim" in plan.problems[0].path


def test_export_refuses_what_transformers_cannot_hold(tmp_path):
    vit = {"name": "vit", "config": dict(REGISTRY.get("encoder", "vit").tiny)}
    model = splice.compose(_spec("none", vision=vit))
    with pytest.raises(CheckpointError, match="vision"):
        splice.export_transformers(model, tmp_path / "x")


def test_input_errors_name_the_input():
    model = splice.compose(_spec({"kind": "vqa", "num_labels": 5}), seed=0)
    kw = _inputs()
    with pytest.raises(InputError, match="visual_embeds"):
        model(**{**kw, "visual_embeds": torch.randn(B, NV, 7)})
    with pytest.raises(InputError, match="pixel_values"):
        model(input_ids=kw["input_ids"], pixel_values=torch.randn(B, 3, 32, 32))
    with pytest.raises(InputError, match="labels"):
        model(**kw, labels=torch.tensor([0, 9]))
    with pytest.raises(ConfigError):
        splice.compose({**_spec(), "head": "vqa"})  # no num_labels


# -- using it -------------------------------------------------------------------------------------------------


def _vqa_jsonl(path, n: int, seed: int = 0):
    """``n`` shapes images, each asked its single shape's colour."""
    from PIL import Image

    from splice import synthetic

    path.mkdir(parents=True, exist_ok=True)
    cfg = synthetic.ShapesConfig(image_size=32, weights=(1.0, 0.0, 0.0))
    with open(path / "qa.jsonl", "w") as fh:
        for i in range(n):
            s = synthetic.sample(seed, 0, i, cfg)
            Image.fromarray(s.image).save(path / f"{i}.png")
            fh.write(json.dumps({"image": f"{i}.png", "question": "what colour is it", "answer": s.shapes[0].colour,
                                 "category": s.category}) + "\n")
    return path / "qa.jsonl"


def _vqa_model(labels=None):
    vit = {"name": "vit", "config": dict(REGISTRY.get("encoder", "vit").tiny)}
    head = {"kind": "vqa", "num_labels": 6, **({"labels": labels} if labels else {})}
    model = splice.compose(_spec(head, vision=vit), seed=0)
    model.tokenizer = build_tokenizer()  # the demo's question words
    return model


def test_splice_vqa_answers_from_a_saved_model(tmp_path, capsys):
    from splice.cli import main
    from splice.vqa import answer

    model = _vqa_model(["red", "green", "blue", "yellow", "purple", "white"])
    model.save_pretrained(tmp_path / "m")
    image = _vqa_jsonl(tmp_path / "data", 1).parent / "0.png"
    assert main(["vqa", str(tmp_path / "m"), str(image), "what colour is it", "--top-k", "3", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["answer"] in model.answer_labels and len(row["scores"]) == 3
    assert abs(sum(answer(model, image, "what colour is it", top_k=6)[0].scores.values()) - 1) < 1e-5
    assert main(["vqa", str(tmp_path / "m"), str(tmp_path / "nope.png"), "what colour is it"]) == 1
    with pytest.raises(InputError, match="vqa"):
        answer(splice.compose(_spec("pretraining")), image, "what")


def test_train_lowers_the_loss_on_a_tiny_vqa_set(tmp_path):
    from splice.train import train
    from splice.vqa import load_qa_data

    model = _vqa_model()
    data, held, reports = load_qa_data(_vqa_jsonl(tmp_path / "data", 24), model, seed=0)
    assert sorted(model.answer_labels) == sorted({"red", "green", "blue", "yellow", "purple", "white"}
                                                 & set(model.answer_labels))
    assert reports[0].used == 24 and held is not None
    before = model.evaluate_training(data, n=None, batch_size=8, precision="fp32")
    result = train(model, data=data, eval_data=data, out=str(tmp_path / "run"), max_steps=60, batch_size=12,
                   lr=3e-3, warmup_steps=0, schedule="constant", log_every=5, progress=False, threads=2)
    after = result.eval
    assert after["loss"] < before["loss"] * 0.8, (before, after)
    saved = splice.load(tmp_path / "run" / "model")
    assert saved.answer_labels == model.answer_labels


def test_splice_train_reads_question_answer_rows(tmp_path):
    """``splice train`` on a JSONL of questions: the model's ``training_data`` routes them to splice.vqa."""
    from splice.cli import main
    from splice.train import TrainConfig, resolve_data
    from splice.vqa import QAData

    model = _vqa_model()
    data = _vqa_jsonl(tmp_path / "data", 8)
    source = resolve_data(str(data), model, TrainConfig(out=str(tmp_path / "probe")))[0]
    assert isinstance(source, QAData)
    model.save_pretrained(tmp_path / "m")
    assert main(["train", str(tmp_path / "m"), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--batch-size", "4", "--no-progress"]) == 0
    assert splice.load(tmp_path / "run" / "model").answer_labels == model.answer_labels


def test_demo_questions_are_answered_by_their_images():
    """The demo's synthetic VQA source: every answer is in the vocabulary and true of the image drawn."""
    import numpy as np

    from splice import demo_vqa, synthetic

    model = splice.compose(demo_vqa.SPEC, seed=0)
    model.tokenizer = demo_vqa.build_tokenizer()
    data = demo_vqa.ShapesVQA.for_model(model)
    for i in range(60):
        s = synthetic.sample(0, synthetic.HELDOUT_STREAM, i, data.config)
        q, answer, kind = demo_vqa.question(s, np.random.default_rng([0, 1, i, 17]))
        assert answer in demo_vqa.ANSWERS and "[UNK]" not in data.tokenizer.encode(q).tokens
        if kind == "where":
            named = next(t for t in s.shapes if q.endswith(f"{t.colour} {t.kind}"))
            other = next(t for t in s.shapes if t is not named)
            dx, dy = named.x - other.x, named.y - other.y
            assert answer == (("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else
                              ("above" if dy < 0 else "below"))
    batch = next(iter(data.eval_batches(4, 4)))
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["labels"].shape == (4,)
    loss = model.training_loss_sum(model, batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_splice_demo_kind_single_stream_exits_0(tmp_path, capsys):
    from splice.cli import main

    assert main(["demo", "--kind", "single-stream", "--minutes", "0.05", "--threads", "1", "--out",
                 str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "held-out answer accuracy:" in out and "loaded it back" in out

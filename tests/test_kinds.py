"""Composition kinds are plugins: the built-in encoder-decoder registers through `register_kinds` like the
fixture package tests/fixtures/splice_classifier (a third party's image classifier, installed by `make test`),
which runs validate -> compose -> train -> save -> load through the public API alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

import splice
from splice.core.plugins import build_registry
from splice.train import TrainConfig, train

VIT = {"name": "vit", "config": {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 4}}
CLASSIFIER = {"kind": "image-classifier", "encoder": VIT, "num_labels": 3}


class Brightness:
    """A data source the trainer reads (``get(positions)``): the label is how bright the image is (3 levels)."""

    def get(self, positions: range) -> dict:
        g = torch.Generator().manual_seed(positions.start)
        labels = torch.randint(0, 3, (len(positions),), generator=g)
        noise = 0.1 * torch.randn(len(positions), 3, 16, 16, generator=g)
        return {"pixel_values": (labels.float() - 1)[:, None, None, None] + noise, "labels": labels}


def test_the_builtin_kind_registers_through_the_public_hook():
    registry, failures = build_registry(entry_points_enabled=False)
    assert not failures
    entry = registry.get("kind", "encoder-decoder")
    assert entry.plugin == "splice.kinds.encoder_decoder" and isinstance(entry.impl, splice.Kind)
    assert entry.impl.formats[0].reads({"model_type": "vision-encoder-decoder"})
    assert entry.impl.formats[0].reads({"model_type": "x", "architectures": ["VisionEncoderDecoderModel"]})
    assert not entry.impl.formats[0].reads({"model_type": "vit", "architectures": ["ViTModel"]})


def test_a_third_party_kind_is_listed():
    kinds = {row["name"]: row for row in splice.list_components("kind")}
    assert kinds["encoder-decoder"]["plugin"] == "splice.kinds.encoder_decoder"
    assert kinds["image-classifier"]["plugin"] == "classifier"


def test_classifier_validate_compose_train_save_load(tmp_path):
    plan = splice.validate(CLASSIFIER)
    assert plan.ok and plan.kind == "image-classifier", plan.summary()
    assert plan.meta_model is not None and plan.params["head"] == 32 * 3 + 3
    assert "head      linear 32 -> 3" in plan.summary()

    model = splice.compose(CLASSIFIER, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, Brightness(), TrainConfig(out=str(tmp_path / "run"), max_steps=4, batch_size=8,
                                                    warmup_steps=0, lr=1e-2, progress=False, log_every=1))
    assert result.step == 4 and result.final is not None and result.loss is not None
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained

    model.save_pretrained(tmp_path / "saved")
    loaded = splice.load(tmp_path / "saved")
    assert type(loaded).__name__ == "ImageClassifier" and loaded.spec["kind"] == "image-classifier"
    pixels = Brightness().get(range(100, 104))["pixel_values"]
    with torch.no_grad():
        assert torch.equal(loaded(pixels).logits, model.eval()(pixels).logits)
    final = splice.load(result.final)  # the trainer's own final save, too
    assert set(final.state_dict()) == set(model.state_dict())


def test_a_kind_spec_is_checked_by_its_own_model():
    plan = splice.validate({**CLASSIFIER, "num_label": 3})
    assert not plan.ok
    assert any(p.path == "num_label" and "did you mean 'num_labels'" in p.fix for p in plan.problems), plan.summary()
    plan = splice.validate({**CLASSIFIER, "encoder": {"name": "vitt"}})
    assert [p.path for p in plan.problems] == ["encoder.name"] and "did you mean" in plan.problems[0].message


def test_an_unknown_kind_gets_a_did_you_mean():
    plan = splice.validate({**CLASSIFIER, "kind": "image-clasifier"})
    assert [p.path for p in plan.problems] == ["kind"]
    assert plan.problems[0].fix == "did you mean 'image-classifier'?"
    with pytest.raises(splice.UnknownComponentError):
        plan.raise_for_problems()


def test_the_freeze_of_a_kind_and_its_export_refusal(tmp_path):
    model = splice.compose({**CLASSIFIER, "freeze": ["encoder"]}, seed=0)
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    with pytest.raises(splice.CheckpointError, match="no transformers layout"):
        splice.export_transformers(model, tmp_path / "hf")


def test_cli_validate_list_and_schema_know_the_kind(tmp_path):
    spec = tmp_path / "classifier.yaml"
    spec.write_text(yaml.safe_dump(CLASSIFIER))
    run = subprocess.run([sys.executable, "-m", "splice.cli", "validate", str(spec)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "splice plan (image-classifier)" in run.stdout, run.stdout + run.stderr
    run = subprocess.run([sys.executable, "-m", "splice.cli", "schema", "--kind", "image-classifier"],
                         capture_output=True, text=True, timeout=120)
    assert "num_labels" in json.loads(run.stdout)["properties"], run.stderr


class _BadKinds:
    """A plugin whose register_kinds calls register wrongly, twice."""

    @staticmethod
    @splice.hookimpl
    def register_kinds(register):
        register("not-a-kind")
        register(splice.Kind(name="no-kind-field", spec_model=splice.TransformersFormat, validate=print,
                             assemble=print, model_class=object))


def test_a_bad_kind_registration_is_recorded_and_the_rest_work():
    registry, failures = build_registry(entry_points_enabled=False, extra_plugins=(_BadKinds,))
    mine = [f for f in failures if f.plugin == "_BadKinds"]
    assert len(mine) == 2 and all(f.stage == "register_kinds" for f in mine)
    assert "takes one splice.Kind" in mine[0].error and "`kind` field" in mine[1].error
    assert "encoder-decoder" in registry.names("kind") and "no-kind-field" not in registry.names("kind")

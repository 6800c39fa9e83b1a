"""Training the dual-encoder kind (issue 15): contrastive batches from the shapes set, an image folder or JSONL,
the held-out figures (recall@1 both ways, zero-shot accuracy), and several processes gathering each other's
features with gradients (open_clip's gather_with_grad), checked against one process on the same global batch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

import splice
from splice import synthetic
from splice.kinds.dual_encoder import retrieval_figures
from splice.train import TrainConfig, train

from multiprocess import train_one_and_two

# Tiny and without dropout: splitting a batch over processes changes nothing but float rounding.
SPEC = {
    "kind": "dual-encoder",
    "vision": {"name": "vit", "config": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
                                         "pos_embed_init": "sincos"}},
    "text": {"name": "bert", "config": {"vocab_size": 23, "hidden_size": 32, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 16,
                                        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                        "initializer_range": 0.2}},  # BERT's 0.02 starts with near-equal texts
    "projection_dim": 16,
}
QUIET = dict(progress=False, save_final=False, batch_size=8, lr=1e-3, warmup_steps=2, log_every=1, threads=1)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "dual.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def _steps(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "event" not in r]


def test_shapes_batches_are_wrapped_captions_and_the_loss_is_the_models(tmp_path):
    """The shapes tokenizer wraps each caption as [BOS] ... [EOS] for a text encoder, and one training step's
    logged loss is the model's own contrastive loss on that batch."""
    model = splice.compose(SPEC, seed=0)  # the same weights as the trained one before its step
    result = train(splice.compose(SPEC, seed=0), "shapes", TrainConfig(out=str(tmp_path / "run"), max_steps=1,
                                                                       eval_at_end=False, **QUIET))
    model.tokenizer = result.model.tokenizer
    source = synthetic.ShapesData.for_model(model)
    batch = source.get(range(8))
    labels = batch["labels"]
    assert (labels[:, 0] == synthetic.BOS).all()
    ends = (labels != -100).sum(dim=1) - 1
    assert (labels[torch.arange(8), ends] == synthetic.EOS).all()
    ids, mask = model.text_inputs(labels)
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask).loss
    assert _steps(tmp_path / "run")[0]["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert result.step == 1


def test_training_learns_and_reports_retrieval(tmp_path):
    model = splice.compose(SPEC, seed=0)
    result = train(model, "shapes", TrainConfig(out=str(tmp_path / "run"), max_steps=40, eval_size=64,
                                                **{**QUIET, "batch_size": 32, "warmup_steps": 5}))
    losses = [r["loss"] for r in _steps(tmp_path / "run")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # it learns
    figures = result.eval
    assert figures["n"] == 64 and figures["caption_set"] == len(synthetic.all_captions()) == 576
    for key in ("image_to_text_recall@1", "text_to_image_recall@1", "zero_shot_accuracy"):
        assert 0.0 <= figures[key] <= 1.0


def test_retrieval_figures_count_duplicate_captions_as_hits():
    # three images, captions a, b, a: image 2's best text is text 0, whose caption is its own
    images = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]), dim=-1)
    texts = F.normalize(torch.tensor([[1.0, 0.05], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    captions = ["a", "b", "a"]
    labels = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), dim=-1)  # caption set: b, a
    out = retrieval_figures(images, texts, captions, labels, ["b", "a"], loss_sum=3.0)
    assert out["image_to_text_recall@1"] == 1.0
    sims = images @ texts.t()
    best_image = sims.argmax(dim=0).tolist()  # text 2 (caption a, pointing away) picks an image of caption b
    assert [captions[i] == captions[j] for j, i in enumerate(best_image)] == [True, True, False]
    assert out["text_to_image_recall@1"] == pytest.approx(2 / 3)
    assert out["zero_shot_accuracy"] == 1.0 and out["loss"] == 1.0 and out["caption_set"] == 2


def test_train_cli_on_an_imagefolder(tmp_path, spec_file, capsys):
    """Contrastive batches from files: captions through the model's (wrapping) tokenizer, held-out figures."""
    data = synthetic.write_imagefolder(tmp_path / "data", 24, image_size=32)
    tok = tmp_path / "tokenizer.json"
    tok.write_text(synthetic.build_tokenizer(wrap=True).to_str())
    out = tmp_path / "run"
    from splice.cli import main

    assert main(["train", str(spec_file), "--data", str(data), "--tokenizer", str(tok), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--threads", "1", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "image to text recall@1" in stdout and "zero shot accuracy" in stdout
    model = splice.load(out / "model")
    assert model.tokenizer is not None and type(model).__name__ == "DualEncoderModel"


def test_jsonl_captions_longer_than_the_text_encoder_keep_their_closing_token(tmp_path):
    from splice.data import load_data

    synthetic.write_imagefolder(tmp_path / "img", 2, image_size=32)
    rows = [{"image": f"img/{i:06d}.png", "text": " ".join(["red"] * 40)} for i in range(2)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = splice.compose(SPEC, seed=0)
    model.tokenizer = synthetic.build_tokenizer(wrap=True)
    train_src, _, reports = load_data(tmp_path / "rows.jsonl", model)
    labels = train_src.get(range(2))["labels"]
    assert labels.shape == (2, model.text.max_positions) and reports[0].truncated == 2
    assert (labels[:, 0] == synthetic.BOS).all() and (labels[:, -1] == synthetic.EOS).all()


def test_a_tokenizer_larger_than_the_text_vocabulary_is_refused(tmp_path, spec_file, capsys):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    big = Tokenizer(WordLevel({f"w{i}": i for i in range(40)}, unk_token="w0"))
    tok = tmp_path / "big.json"
    tok.write_text(big.to_str())
    from splice.cli import main

    code = main(["train", str(spec_file), "--data", "shapes", "--tokenizer", str(tok), "--out", str(tmp_path / "r"),
                 "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "text's vocabulary 23" in err and "text.config.vocab_size: 40" in err


def test_two_processes_gather_features_and_match_one(tmp_path, spec_file):
    """torchrun with 2 CPU processes (gloo), each with 4 of the 8 pairs, against 1 process with all 8: the same
    losses and weights. Without gathering, each process's loss would have 3 negatives per image instead of 7, so
    the losses (about ln 4 against ln 8 at the start) and the gradients would differ."""
    two, (rows_one, rows_two), (a, b) = train_one_and_two(spec_file, tmp_path)
    assert "2 x cpu" in two.stdout and "micro-batch of 4" in two.stdout
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    assert [r["loss"] for r in rows_two] == pytest.approx([r["loss"] for r in rows_one], abs=1e-5)
    # a key bias adds the same number to every key of a query, which softmax ignores: its gradient is 0 but for
    # rounding noise, which Adam scales up to a full step, differently in each run; every other weight must agree
    for name in a:
        if not name.endswith("k_proj.bias"):
            assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_gather_with_grad_is_the_identity_in_one_process():
    from splice.train.distributed import gather_with_grad

    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


# -- splice demo --kind dual-encoder ----------------------------------------------------------------------------


def test_demo_spec_is_the_example():
    from pathlib import Path

    from splice import demo_dual_encoder

    root = Path(__file__).parents[1]
    assert yaml.safe_load((root / "examples" / "demo-dual-encoder.yaml").read_text()) == demo_dual_encoder.SPEC
    assert Path(demo_dual_encoder.bundled_spec()).resolve() == root / "examples" / "demo-dual-encoder.yaml"
    assert splice.validate(demo_dual_encoder.SPEC).ok


def test_demo_kind_flag(monkeypatch):
    from splice import demo_dual_encoder
    from splice.cli import main

    seen = {}
    monkeypatch.setattr(demo_dual_encoder, "run", lambda **kw: seen.update(kw) or 0)
    assert main(["demo", "--kind", "dual-encoder", "--minutes", "0.5", "--threads", "1"]) == 0
    assert seen == {"spec": None, "out": "out/demo-dual-encoder", "minutes": 0.5, "threads": 1, "seed": 0}
    from splice import demo_vqa

    monkeypatch.setattr(demo_vqa, "run", lambda **kw: seen.update(kw) or 0)
    assert main(["demo", "--kind", "single-stream", "--seed", "2"]) == 0
    assert seen == {"spec": None, "out": "out/demo-single-stream", "minutes": 5.0, "threads": 2, "seed": 2}


def test_a_short_dual_encoder_demo_run(tmp_path, capsys):
    from PIL import Image

    from splice import demo_dual_encoder
    from splice.demo import GRID

    out = tmp_path / "demo"
    assert demo_dual_encoder.run(SPEC, out=str(out), minutes=0.05, eval_size=50, progress=False) == 0
    text = capsys.readouterr().out
    assert "held-out image->text recall@1:" in text and "text->image recall@1" in text
    assert "single" in text and "relation" in text and "count" in text
    assert "zero-shot accuracy over all 576 captions" in text and "loaded it back" in text
    assert f"grid: {out / 'classified.png'}" in text
    assert Image.open(out / "classified.png").size[0] > 200
    assert len(list((out / "images").glob("heldout-*.png"))) == GRID
    model = splice.load(out / "model")
    assert model.tokenizer.encode("a red circle").ids[0] == synthetic.BOS  # saved with its wrapping tokenizer
    assert (out / "model" / "preprocessor_config.json").is_file()


def test_demo_refuses_a_captioner_spec(tmp_path):
    from splice import demo_dual_encoder
    from splice.core.errors import InputError

    captioner = {"encoder": SPEC["vision"], "decoder": {"name": "gpt2", "config": {"vocab_size": 23, "n_positions": 8,
                                                                                  "n_embd": 32, "n_layer": 1,
                                                                                  "n_head": 2}}}
    with pytest.raises(InputError, match="not a dual encoder"):
        demo_dual_encoder.run(captioner, out=str(tmp_path / "d"), minutes=0.05, progress=False)

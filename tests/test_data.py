"""Training data: image folders and JSONL files (bad rows counted, never fatal), collation, the shapes set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import splice
from splice import synthetic
from splice.data import collate, encode_caption, find_sources, load_data, pad_labels, read_rows

SPEC = {
    "encoder": {"name": "vit", "config": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
    "decoder": {"name": "gpt2", "config": {"vocab_size": 23, "n_positions": 8, "n_embd": 32, "n_layer": 1, "n_head": 2}},
    "tokens": {"decoder_start": 1, "pad": 0, "eos": 2},
}


@pytest.fixture(scope="module")
def model():
    m = splice.compose(SPEC, seed=0)
    m.tokenizer = synthetic.build_tokenizer()
    return m


def _png(path: Path, colour=(200, 30, 30), size=(40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _folder_with_bad_rows(root: Path) -> Path:
    for name in ("a.png", "b.png", "sub/c.png"):
        _png(root / name)
    (root / "garbage.png").write_bytes(b"this is not a png")
    good = (root / "a.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    lines = [
        json.dumps({"file_name": "a.png", "text": "a red square"}),
        json.dumps({"file_name": "b.png", "text": "  two   red squares "}),
        json.dumps({"file_name": "sub/c.png", "text": "a red circle"}),
        json.dumps({"file_name": "missing.png", "text": "a blue circle"}),
        json.dumps({"file_name": "garbage.png", "text": "a red square"}),
        json.dumps({"file_name": "truncated.png", "text": "a red square"}),
        json.dumps({"file_name": "a.png", "text": ""}),
        json.dumps({"file_name": "b.png", "text": "   "}),
        "{not json",
        json.dumps(["a.png", "a red square"]),
        json.dumps({"text": "no file name"}),
        "",
    ]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_bad_rows_are_counted_by_reason_with_examples(tmp_path):
    root = _folder_with_bad_rows(tmp_path / "data")
    rows, report = read_rows(root / "metadata.jsonl")
    assert [r.image.name for r in rows] == ["a.png", "b.png", "c.png"]
    assert rows[1].text == "two red squares"  # whitespace collapsed
    assert report.total == 11 and report.used == 3 and report.skipped == 8
    assert report.counts == {"missing file": 1, "unreadable image": 2, "empty text": 2, "bad row": 3}
    assert "metadata.jsonl:4" in str(report.examples["missing file"][0])
    assert {str(e).split(":")[1] for e in report.examples["unreadable image"]} == {"5", "6"}
    text = report.summary()
    for reason in ("missing file: 1", "unreadable image: 2", "empty text: 2", "bad row: 3", "3 used, 8 skipped"):
        assert reason in text
    assert json.loads(json.dumps(report.to_dict()))["by_reason"]["bad row"] == 3


def test_load_data_is_not_fatal_and_tokenizes_with_the_model(tmp_path, model):
    root = _folder_with_bad_rows(tmp_path / "data")
    train, evaluation, reports = load_data(root, model)
    assert len(train) == 3 and evaluation is None  # under 20 rows: nothing held out
    assert reports[0].skipped == 8
    item = train.dataset[0]
    assert item["pixel_values"].shape == (3, 32, 32)
    vocab = model.tokenizer.get_vocab()
    assert item["labels"] == [vocab["a"], vocab["red"], vocab["square"], 2]


def test_an_image_that_breaks_after_the_check_is_skipped_and_counted(tmp_path, model):
    root = _folder_with_bad_rows(tmp_path / "data")
    train, _, _ = load_data(root, model)
    (root / "b.png").unlink()
    batch = train.get(range(3))
    assert batch["pixel_values"].shape[0] == 2 and len(batch["errors"]) == 1
    assert "b.png" in batch["errors"][0] or "No such file" in batch["errors"][0]


def test_jsonl_of_image_and_text_with_relative_paths(tmp_path, model):
    for i in range(25):
        _png(tmp_path / "imgs" / f"{i}.png", colour=(i * 10, 0, 0))
    rows = [{"image": f"imgs/{i}.png", "text": "a red circle"} for i in range(25)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(map(json.dumps, rows)))
    train, evaluation, reports = load_data(tmp_path / "pairs.jsonl", model, seed=3)
    assert reports[0].used == 25
    assert len(train) + len(evaluation) == 25 and len(evaluation) == 1  # 5% held out
    names = {r.image.name for r in train.dataset.rows} | {r.image.name for r in evaluation.dataset.rows}
    assert len(names) == 25


def test_train_and_validation_subfolders(tmp_path, model):
    for split in ("train", "validation"):
        _png(tmp_path / split / "x.png")
        (tmp_path / split / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "a red square"}))
    train_src, eval_src = find_sources(tmp_path)
    assert train_src == tmp_path / "train" / "metadata.jsonl"
    assert eval_src == tmp_path / "validation" / "metadata.jsonl"
    train, evaluation, reports = load_data(tmp_path, model)
    assert len(train) == 1 and len(evaluation) == 1 and len(reports) == 2


def test_missing_source_and_empty_dataset_explain_the_fix(tmp_path, model):
    with pytest.raises(splice.InputError, match="no such folder"):
        load_data(tmp_path / "nope", model)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "a"}) + "\n")
    with pytest.raises(splice.InputError, match="no usable rows(.|\n)*missing file: 1"):
        load_data(tmp_path, model)
    m = splice.compose(SPEC, seed=0)
    with pytest.raises(splice.InputError, match="no tokenizer"):
        load_data(tmp_path, m)


def test_collate_pads_labels_with_minus_100():
    items = [{"pixel_values": torch.zeros(3, 4, 4), "labels": [5, 6, 2], "caption": "x"},
             {"pixel_values": torch.ones(3, 4, 4), "labels": [7, 2], "caption": "y"},
             {"error": "gone.png: missing"}]
    batch = collate(items)
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert batch["labels"].tolist() == [[5, 6, 2], [7, 2, -100]]
    assert batch["errors"] == ["gone.png: missing"]
    assert pad_labels([[1], [1, 2]]).tolist() == [[1, -100], [1, 2]]


def test_captions_get_eos_and_are_cut_to_the_decoder_length():
    tok = synthetic.build_tokenizer()
    ids, cut = encode_caption(tok, "a red circle", 2, 8)
    assert ids == [4, 6, 12, 2] and not cut
    ids, cut = encode_caption(tok, "a red circle left of a blue square", 2, 5)
    assert cut and len(ids) == 5 and ids[-1] == 2


def test_images_are_normalised_with_the_encoder_preprocessing(tmp_path, model):
    _png(tmp_path / "x.png", colour=(255, 0, 128), size=(32, 32))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "a red square"}))
    from splice.core.processing import ImageProcessor

    pre = model.encoder.preprocessing
    model.image_processor = ImageProcessor(size={"height": 32, "width": 32}, image_mean=pre.mean, image_std=pre.std)
    try:
        train, _, _ = load_data(tmp_path, model)
        px = train.dataset[0]["pixel_values"]
    finally:
        model.image_processor = None
    want = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    assert torch.allclose(px[:, 5, 5], want.float(), atol=1e-5)


def test_file_stream_visits_every_row_once_per_epoch(tmp_path, model):
    for i in range(7):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "text": "a red square"}) for i in range(7)))
    train, _, _ = load_data(tmp_path, model, seed=1)
    first = [train.index(k) for k in range(7)]
    second = [train.index(k) for k in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert [train.index(k) for k in range(14)] == first + second  # a pure function of the position


# -- the shapes set -------------------------------------------------------------------------------------------


def test_shapes_tokenizer_ids_match_the_demo_spec():
    import yaml

    spec = yaml.safe_load(Path(__file__).parents[1].joinpath("examples/demo-captioner.yaml").read_text())
    tok = synthetic.build_tokenizer()
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[BOS]", "[EOS]", "[UNK]")] == [0, 1, 2, 3]
    assert spec["tokens"] == {"decoder_start": vocab["[BOS]"], "pad": vocab["[PAD]"], "eos": vocab["[EOS]"]}
    assert spec["decoder"]["config"]["vocab_size"] == tok.get_vocab_size() == synthetic.vocab_size() == 23
    ids = tok.encode("two purple triangles").ids
    assert tok.decode(ids) == "two purple triangles"


def test_shapes_are_deterministic_and_heldout_is_separate():
    a = synthetic.sample(0, synthetic.TRAIN_STREAM, 5)
    b = synthetic.sample(0, synthetic.TRAIN_STREAM, 5)
    c = synthetic.sample(0, synthetic.HELDOUT_STREAM, 5)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)
    data = synthetic.ShapesData(image_size=64)
    batch = data.get(range(10, 14))
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert torch.equal(batch["pixel_values"], data.get(range(10, 14))["pixel_values"])
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


def test_every_caption_is_in_the_vocabulary_and_follows_the_grammar():
    tok = synthetic.build_tokenizer()
    held = synthetic.ShapesData(image_size=64).heldout(300)
    cats = Counter(s.category for s in held)
    assert set(cats) == {"single", "count", "relation"} and min(cats.values()) > 60
    for s in held:
        assert synthetic.UNK not in tok.encode(s.caption).ids
        assert synthetic.describe(s.shapes) == (s.caption, s.category)
        if s.category == "relation":
            first, second = sorted(s.shapes, key=lambda t: t.order)
            assert first.colour != second.colour  # one colour for two shapes means "two ..." 
            words = s.caption.split()
            assert words[1:3] == [first.colour, first.kind] and words[-2:] == [second.colour, second.kind]
            dx, dy = first.x - second.x, first.y - second.y
            rel = {"left": dx < 0, "right": dx > 0, "above": dy < 0, "below": dy > 0}[words[3]]
            assert rel
            # clearly apart along the named axis
            along, across = (abs(dx), abs(dy)) if words[3] in ("left", "right") else (abs(dy), abs(dx))
            assert along >= first.r + second.r and across <= along / 2


def test_shapes_scale_with_the_image_size():
    data = synthetic.ShapesData(image_size=32)
    assert data.get(range(20))["pixel_values"].shape == (20, 3, 32, 32)

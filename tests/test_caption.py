"""`splice caption` on a transformers VisionEncoderDecoder folder with a tokenizer and preprocessor config:
the captions equal transformers' own pipeline (processor -> generate -> decode)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import splice
from splice.caption import caption
from splice.cli import main
from splice.core.checkpoint import load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from oracle import tiny_ved  # noqa: E402

WORDS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + [f"w{i}" for i in range(60)]


def _word_tokenizer():
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens(["[PAD]", "[BOS]", "[EOS]", "[UNK]"])
    return tok


@pytest.fixture
def ved_folder(tmp_path):
    model = tiny_ved(vocab=len(WORDS), enc_layers=1, tokens=(1, 0, 2), scale=0.05)
    folder = tmp_path / "ved"
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    _word_tokenizer().save(str(folder / "tokenizer.json"))
    images = []
    rng = np.random.default_rng(0)
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return model, folder, images


def test_captions_match_transformers_pipeline(ved_folder):
    hf, folder, images = ved_folder
    proc = transformers.ViTImageProcessor.from_pretrained(folder)
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    px = proc(images=[Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want_ids = hf.generate(pixel_values=px, max_new_tokens=6, do_sample=False)
    want = [tok.decode(row, skip_special_tokens=True) for row in want_ids.tolist()]
    model = splice.load(folder)
    got = caption(model, images, max_new_tokens=6)
    assert [c.text for c in got] == want
    assert [c.ids for c in got] == want_ids.tolist()


def test_cli_reports_bad_files_and_captions_the_rest(ved_folder, tmp_path, capsys):
    _, folder, images = ved_folder
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    code = main(["caption", str(folder), str(images[0]), str(bad), str(images[1]), "--max-new-tokens", "5", "--json"])
    assert code == 1
    rows = json.loads(capsys.readouterr().out)
    assert [r["error"] is None for r in rows] == [True, False, True]
    assert "notes.txt" in rows[1]["error"] and "not a readable image" in rows[1]["error"]
    assert all(isinstance(r["text"], str) for r in (rows[0], rows[2]))


def test_tokenizer_file_layouts(tmp_path):
    """gpt2/roberta (vocab.json + merges.txt) and bert (vocab.txt) layouts load without tokenizer.json."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    texts = ["a red circle above a blue square", "two green triangles", "a small white square"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    gdir = tmp_path / "gpt2"
    gdir.mkdir()
    bpe.save_model(str(gdir))
    ours = load_tokenizer(gdir)
    theirs = transformers.GPT2TokenizerFast.from_pretrained(gdir)
    text = "a red square above two green circles"
    assert ours.encode(text).ids == theirs(text)["input_ids"]
    assert ours.decode(ours.encode(text).ids) == text

    bdir = tmp_path / "bert"
    bdir.mkdir()
    (bdir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "square", "##s", "two"]) + "\n")
    ours = load_tokenizer(bdir)
    theirs = transformers.BertTokenizerFast.from_pretrained(bdir)
    assert ours.encode("Two red squares").ids == theirs("Two red squares")["input_ids"]
    assert ours.decode(ours.encode("two red squares").ids, skip_special_tokens=True) == "two red squares"


def test_a_prompt_starts_every_caption_as_transformers_does(ved_folder, capsys):
    """`--prompt`: decoder_start, then the prompt's tokens (no special tokens added), as a Donut task prompt is
    given to transformers' generate."""
    hf, folder, images = ved_folder
    proc = transformers.ViTImageProcessor.from_pretrained(folder)
    px = proc(images=[Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    prompt = torch.tensor([[1, WORDS.index("w7"), WORDS.index("w3")]] * len(images))
    with torch.no_grad():
        want = hf.generate(pixel_values=px, decoder_input_ids=prompt, max_new_tokens=5, do_sample=False)
    got = caption(splice.load(folder), images, prompt="w7 w3", max_new_tokens=5)
    assert [c.ids for c in got] == want.tolist()
    assert main(["caption", str(folder), str(images[0]), "--prompt", "w7 w3", "--max-new-tokens", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["ids"] == want[0].tolist()


def test_a_prompt_needs_a_tokenizer_and_tokens(ved_folder):
    _, folder, images = ved_folder
    model = splice.load(folder)
    with pytest.raises(splice.InputError, match="prompt"):
        caption(model, images, prompt="")
    model.tokenizer = None
    with pytest.raises(splice.InputError, match="no tokenizer"):
        caption(model, images, prompt="w7")

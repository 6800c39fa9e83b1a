"""Hostile command lines and files for ``splice caption``, ``splice train`` and ``splice demo`` (issue 12).

Every case ends in a result or one clear error, in time. Commands run in-process through ``splice.cli.main``:
a bad flag or file is exit status 1 (2 for a command line argparse refuses) with ``error:`` and a ``fix:`` line
on stderr, and ``--json`` output stays one JSON document. Python API cases raise one clean ``SpliceError``.

The images are real files: a decompression bomb is a small PNG whose header declares 30000x30000 pixels, a
FIFO is made with ``os.mkfifo`` (reading it would block for ever), ``/dev/zero`` never ends.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import splice
from splice import synthetic
from splice.caption import caption
from splice.cli import main
from splice.core.files import describe_files
from splice.core.processing import FILE as PREPROCESSOR, MAX_IMAGE_PIXELS, ImageProcessor
from splice.data import read_rows
from splice.train import TrainConfig, train

SPEC = {
    "encoder": {"name": "vit", "config": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
    "decoder": {"name": "gpt2", "config": {"vocab_size": 23, "n_positions": 12, "n_embd": 32, "n_layer": 1, "n_head": 2}},
    "cross_attention": {"kind": "standard", "layers": "all"},
    "tokens": {"decoder_start": 1, "pad": 0, "eos": 2},
}


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny captioner saved with its tokenizer and image processor."""
    folder = tmp_path_factory.mktemp("model") / "m"
    model = splice.compose(SPEC, seed=0)
    model.tokenizer = synthetic.build_tokenizer()
    model.image_processor = ImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(saved):
    return splice.load(saved)


def _png_header(width: int, height: int, data: bytes = b"\0" * 64) -> bytes:
    """A PNG whose IHDR declares width x height RGB pixels, with only ``data`` (compressed) behind it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Good images and every kind of bad one, named by what is wrong with them."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for i in range(3):
        paths[f"good{i}"] = root / f"good{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48 + 8 * i, 3), dtype=np.uint8)).save(paths[f"good{i}"])
    good = paths["good0"].read_bytes()
    bad = {
        "decompression bomb (30000x30000 header)": _png_header(30000, 30000),
        "over the pixel bound (10000x10000 header)": _png_header(10000, 10000),
        "huge width header (65535x1, no data)": _png_header(65535, 1),
        "truncated PNG": good[: len(good) // 2],
        "corrupt PNG (bytes flipped)": good[:40] + bytes(b ^ 0xFF for b in good[40:120]) + good[120:],
        "text file named .png": b"hello, not an image\n",
        "0-byte file": b"",
        "JSON named .jpg": b'{"a": 1}',
    }
    for i, (name, data) in enumerate(bad.items()):
        paths[name] = root / f"bad{i}.{'jpg' if 'jpg' in name else 'png'}"
        paths[name].write_bytes(data)
    os.mkfifo(root / "fifo.png")
    paths["FIFO named .png"] = root / "fifo.png"
    (root / "folder.png").mkdir()
    paths["folder named .png"] = root / "folder.png"
    paths["/dev/zero"] = Path("/dev/zero")
    (root / "zero.png").symlink_to("/dev/zero")
    paths["symlink to /dev/zero"] = root / "zero.png"
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    paths["dangling symlink"] = root / "dangling.png"
    paths["missing file"] = root / "missing.png"
    paths["path through a file"] = paths["good0"] / "x.png"
    paths["5,000-character name"] = root / ("x" * 5000 + ".png")
    return paths


BAD_IMAGES = ["decompression bomb (30000x30000 header)", "over the pixel bound (10000x10000 header)",
              "huge width header (65535x1, no data)", "truncated PNG", "corrupt PNG (bytes flipped)",
              "text file named .png", "0-byte file", "JSON named .jpg", "FIFO named .png", "folder named .png",
              "/dev/zero", "symlink to /dev/zero", "dangling symlink", "missing file", "path through a file",
              "5,000-character name"]


def _cli(hostile, capsys, case: str, argv: list[str], *, code: int = 1, seconds: float = 30,
         per_image: bool = False) -> tuple[str, str]:
    """Run ``splice ARGV`` in-process; assert its exit status and, for an error, ``error:`` with a fix line on
    stderr (``per_image``: the errors are in the captions on stdout)."""
    capsys.readouterr()
    rc = hostile.check(case, lambda: main([str(a) for a in argv]), expect="ok", seconds=seconds)
    out, err = capsys.readouterr()
    assert rc == code, f"{case}: exit status {rc}, expected {code}\n{err[-3000:]}"
    if code and not per_image:
        assert "error:" in err and "fix:" in err, f"{case}: no error/fix line on stderr:\n{err[-3000:]}"
        assert "Traceback" not in err
    return out, err


# -- splice caption ---------------------------------------------------------------------------------------


def test_caption_every_bad_image_fails_alone_and_the_batch_is_captioned(hostile, capsys, saved, images):
    """One command with good images between all the bad ones: --json stays one document, each bad image has
    its own error, every good image its caption, exit status 1."""
    names = ["good0", *BAD_IMAGES[:8], "good1", *BAD_IMAGES[8:], "good2"]
    out, _ = _cli(hostile, capsys, "caption: a batch of every bad image", ["caption", saved, *(images[n] for n in names),
                                                                        "--max-new-tokens", "4", "--json"], per_image=True)
    rows = json.loads(out)
    assert [r["image"] for r in rows] == [str(images[n]) for n in names]
    for name, row in zip(names, rows):
        if name.startswith("good"):
            assert row["error"] is None and isinstance(row["text"], str), (name, row)
        else:
            assert row["error"] and row["text"] is None and len(row["error"]) < 1000, (name, row)
            assert "fix:" in row["error"], (name, row)
    by_name = dict(zip(names, rows))
    assert "decompression bomb" in by_name["decompression bomb (30000x30000 header)"]["error"]
    assert f"{MAX_IMAGE_PIXELS:,}" in by_name["over the pixel bound (10000x10000 header)"]["error"]
    assert "FIFO" in by_name["FIFO named .png"]["error"]
    assert "a folder" in by_name["folder named .png"]["error"]
    assert "character device" in by_name["/dev/zero"]["error"]
    assert "empty file" in by_name["0-byte file"]["error"]
    assert "no such image file" in by_name["missing file"]["error"]


def test_caption_text_output_names_each_bad_image(hostile, capsys, saved, images):
    out, _ = _cli(hostile, capsys, "caption: text output", ["caption", saved, images["good0"], images["FIFO named .png"],
                                                            images["decompression bomb (30000x30000 header)"]],
                  per_image=True)
    lines = [line for line in out.splitlines() if line and not line.startswith(" ")]  # the fix lines are indented
    assert len(lines) == 3 and "error:" not in lines[0] and all(": error: " in line for line in lines[1:])
    assert out.count("    fix: ") == 2


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_caption_api_one_bad_image(hostile, model, images, name):
    got = hostile.check(f"caption(): {name}", lambda: caption(model, [images[name], images["good1"]], max_new_tokens=3),
                        expect="ok")
    assert got[0].error and got[0].text is None and "fix:" in got[0].error
    assert got[1].error is None and got[1].text is not None


def test_caption_api_bad_in_memory_images(hostile, model, images):
    bad = {"a 0x0 PIL image": Image.new("RGB", (0, 0)), "a float tensor": torch.rand(3, 32, 32),
           "a 4-channel uint8 tensor": torch.zeros(4, 32, 32, dtype=torch.uint8),
           "an empty uint8 tensor": torch.zeros(3, 0, 5, dtype=torch.uint8), "an int": 7, "None": None,
           "a 16-bit greyscale PIL image": Image.new("I;16", (20, 20)), "a CMYK PIL image": Image.new("CMYK", (20, 20))}
    for name, image in bad.items():
        got = hostile.check(f"caption(): {name}", lambda: caption(model, [image, images["good0"]], max_new_tokens=3),
                            expect="ok")
        assert got[1].text is not None, name
        legit = name.endswith("PIL image") and "0x0" not in name
        assert (got[0].error is None) == legit, (name, got[0].error)
    one = hostile.check("caption(): a single path, not a list", lambda: caption(model, images["good0"], max_new_tokens=3),
                        expect="ok")
    assert len(one) == 1 and one[0].error is None
    hostile.check("caption(): batch_size 0", lambda: caption(model, [images["good0"]], batch_size=0), expect="error")
    assert hostile.check("caption(): no images", lambda: caption(model, []), expect="ok") == []


@pytest.mark.parametrize("flags", [["--num-beams", "0"], ["--num-beams", "-3"], ["--max-new-tokens", "0"],
                                   ["--max-new-tokens", "-1"], ["--num-beams", "two"], ["--bogus"]])
def test_caption_bad_flags(hostile, capsys, saved, images, flags):
    code = 2 if flags[-1] in ("two", "--bogus") else 1
    _, err = _cli(hostile, capsys, f"caption {' '.join(flags)}", ["caption", saved, images["good0"], *flags], code=code)
    assert flags[0] in err


def test_caption_a_model_that_is_not_there(hostile, capsys, images, tmp_path):
    for name, path in {"missing": tmp_path / "nope", "a file": images["good0"], "a FIFO": images["FIFO named .png"]}.items():
        _cli(hostile, capsys, f"caption: model folder {name}", ["caption", path, images["good0"]])


# -- preprocessor_config.json ------------------------------------------------------------------------------

BAD_CONFIG = {
    "rescale_factor": [0, -1, float("nan"), float("inf"), "1/255", True, [1]],
    "resample": [99, -1, 2.5, "bicubic", True],
    "size": [0, -224, 10**9, {"height": 0, "width": 224}, {"height": 224}, {"longest_edge": 10}, "224", [224, 224],
             {"height": 224.5, "width": 224}, {"shortest_edge": 10**12}],
    "crop_size": [0, {"shortest_edge": 224}, {"height": -1, "width": 5}],
    "image_mean": [[0.5, 0.5], [], [0.5, float("nan"), 0.5], "0.5", [[0.5]] * 3, {"r": 0.5}],
    "image_std": [[0, 0, 0], [0.5, -0.5, 0.5], [0.5, 0.5], [float("inf")] * 3, True],
    "do_resize": ["yes", 1, [True]],
    "do_normalize": ["false", 0],
    "do_convert_rgb": ["no"],
}


def _config_cases():
    for name, values in BAD_CONFIG.items():
        for value in values:
            yield name, value


def test_preprocessor_config_values_name_the_file_and_field(hostile, tmp_path):
    base = ImageProcessor(size={"height": 32, "width": 32}).to_dict()
    for i, (name, value) in enumerate(_config_cases()):
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        text = json.dumps({**base, name: value})  # NaN / Infinity as Python's json writes them
        (folder / PREPROCESSOR).write_text(text)
        exc = hostile.check(f"{PREPROCESSOR}: {name} = {value!r:.40}", lambda: ImageProcessor.from_folder(folder),
                            expect="error")
        assert isinstance(exc, splice.CheckpointError) and str(folder / PREPROCESSOR) in str(exc)
        assert name in str(exc), str(exc)


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"{", b"[1, 2]", b"null", b'"abc"', b"[" * 5000 + b"]" * 5000,
                                     b'{"size": ' + b"9" * 5000 + b"}", b" " * (2 << 20)])
def test_preprocessor_config_files_that_are_not_configs(hostile, tmp_path, content):
    (tmp_path / PREPROCESSOR).write_bytes(content)
    exc = hostile.check(f"{PREPROCESSOR}: {content[:20]!r}", lambda: ImageProcessor.from_folder(tmp_path), expect="error")
    assert isinstance(exc, splice.CheckpointError) and PREPROCESSOR in str(exc)


def test_a_saved_model_with_rescale_factor_0_fails_at_load(hostile, saved, tmp_path):
    """End to end: the bad value of issue 12 (a ZeroDivisionError in caption) now fails ``splice.load``."""
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    config = json.loads((folder / PREPROCESSOR).read_text())
    (folder / PREPROCESSOR).write_text(json.dumps({**config, "rescale_factor": 0, "resample": 99}))
    meta = json.loads((folder / "splice.json").read_text())
    meta["files"] = {k: v for k, v in describe_files(folder).items() if k != "splice.json"}  # as a re-save would
    (folder / "splice.json").write_text(json.dumps(meta))
    exc = hostile.check("splice.load: rescale_factor 0, resample 99", lambda: splice.load(folder), expect="error")
    assert "rescale_factor" in str(exc) and "resample" in str(exc) and PREPROCESSOR in str(exc)


def test_extreme_aspect_ratio_is_refused_per_image(hostile, tmp_path):
    proc = ImageProcessor(size={"shortest_edge": 224})
    wide = tmp_path / "wide.png"
    Image.new("RGB", (20000, 2)).save(wide)
    hostile.check("shortest_edge resize of a 20000x2 image", lambda: proc([wide]), expect="error")
    capped = ImageProcessor(size={"shortest_edge": 224, "longest_edge": 400})
    assert hostile.check("longest_edge caps it", lambda: capped([wide]), expect="ok").shape[-1] == 400


# -- splice train: flags -----------------------------------------------------------------------------------

BAD_TRAIN_FLAGS = [
    ["--lr", "-1"], ["--lr", "nan"], ["--lr", "inf"], ["--lr", "0"], ["--log-every", "0"], ["--workers", "-1"],
    ["--workers", "100000"], ["--batch-size", "0"], ["--batch-size", "-8"], ["--batch-size", "10000000"],
    ["--grad-accum", "0"], ["--grad-accum", "3"], ["--max-steps", "-1"], ["--max-minutes", "-1"],
    ["--max-minutes", "0"], ["--max-minutes", "nan"], ["--max-minutes", "inf"], ["--min-lr-ratio", "2"],
    ["--warmup-steps", "-1"], ["--weight-decay", "-0.1"], ["--weight-decay", "nan"], ["--grad-clip", "-1"],
    ["--grad-clip", "nan"], ["--eval-every", "-1"], ["--eval-size", "-1"], ["--save-every", "-2"],
    ["--save-minutes", "-1"], ["--save-minutes", "nan"], ["--seed", "-1"], ["--seed", str(2**70)], ["--threads", "0"],
    ["--threads", "-1"], ["--threads", "1000000"], ["--device", "nonsense"], ["--device", "cuda:7"],
    ["--device", "cuda:-1"], ["--device", "meta"], ["--device", ""],
]


@pytest.mark.parametrize("flags", BAD_TRAIN_FLAGS, ids=" ".join)
def test_train_flags_are_checked_before_anything_loads(hostile, capsys, tmp_path, flags):
    """The model argument names nothing: a flag checked after loading would fail on the model instead."""
    end = [] if flags[0] in ("--max-steps", "--max-minutes") else ["--max-steps", "1"]
    argv = ["train", "no-such-model", "--data", "no-such-data", "--out", tmp_path / "run", *end, *flags]
    _, err = _cli(hostile, capsys, f"train {' '.join(flags)}", argv)
    named = "--batch-size" if flags == ["--grad-accum", "3"] else flags[0]  # 32 does not split into 3
    assert named in err and "no-such-model" not in err, err
    assert not (tmp_path / "run").exists()


def test_train_device_cuda_without_a_gpu(hostile, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid")
    _, err = _cli(hostile, capsys, "train --device cuda (no GPU)", ["train", "x", "--data", "shapes", "--out", tmp_path,
                                                                    "--max-steps", "1", "--device", "cuda"])
    assert "--device" in err and "no CUDA device" in err


def test_train_everything_wrong_at_once_is_one_error(hostile, capsys, tmp_path):
    _, err = _cli(hostile, capsys, "train: five bad flags", ["train", "x", "--data", "shapes", "--out", tmp_path,
                                                             "--lr", "nan", "--log-every", "0", "--workers", "-1",
                                                             "--device", "nonsense"])
    for flag in ("--lr", "--log-every", "--workers", "--device", "--max-steps"):
        assert flag in err
    assert err.count("fix:") == 5


@pytest.mark.parametrize("flags", [["--lr", "abc"], ["--max-steps", "1.5"], ["--schedule", "cubic"],
                                   ["--precision", "fp8"], ["--frobnicate"], ["--freeze", "everything"]], ids=" ".join)
def test_train_flags_argparse_refuses(hostile, capsys, tmp_path, flags):
    _, err = _cli(hostile, capsys, f"train {' '.join(flags)}", ["train", "x", "--data", "shapes", "--out", tmp_path,
                                                                *flags], code=2)
    assert "usage: splice" in err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    (root / "file").write_text("x")
    (root / "dir").mkdir()
    os.mkfifo(root / "fifo")
    (root / "latin1.json").write_bytes(b'{"caf\xe9": 1}')
    (root / "list.json").write_text("[1, 2, 3]")
    (root / "model.json").write_text(json.dumps({"model": {"type": "Unknown"}}))
    big = synthetic.build_tokenizer()
    big.add_tokens([f"extra{i}" for i in range(40)])  # 63 ids for a 23-word decoder
    (root / "big-tokenizer.json").write_text(big.to_str())
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize("what", ["missing", "dir", "fifo", "file", "latin1.json", "list.json", "model.json"])
def test_train_tokenizer_that_is_not_one(hostile, capsys, tmp_path, files, what):
    path = files.get(what, tmp_path / "missing.json")
    _, err = _cli(hostile, capsys, f"train --tokenizer {what}", ["train", "no-such-model", "--data", "shapes", "--out",
                                                                  tmp_path / "run", "--max-steps", "1", "--tokenizer", path])
    assert "--tokenizer" in err and "no-such-model" not in err


def test_train_tokenizer_with_more_ids_than_the_decoder(hostile, capsys, saved, tmp_path, files):
    _, err = _cli(hostile, capsys, "train --tokenizer with 63 ids for 23", [
        "train", saved, "--data", "shapes", "--out", tmp_path / "run", "--max-steps", "1",
        "--tokenizer", files["big-tokenizer.json"]])
    assert "--tokenizer" in err and "23" in err


@pytest.mark.parametrize("what", ["file", "under a file", "fifo"])
def test_train_out_that_is_not_a_folder(hostile, capsys, files, what):
    out = {"file": files["file"], "under a file": files["file"] / "run", "fifo": files["fifo"]}[what]
    _, err = _cli(hostile, capsys, f"train --out {what}", ["train", "no-such-model", "--data", "shapes", "--out", out,
                                                          "--max-steps", "1"])
    assert "--out" in err


@pytest.mark.parametrize("what", ["missing", "fifo", "dir"])
def test_train_data_that_is_not_data(hostile, capsys, tmp_path, files, what):
    data = {"missing": tmp_path / "nope", "fifo": files["fifo"], "dir": files["dir"]}[what]
    for flag in ("--data", "--eval-data"):
        argv = ["train", "no-such-model", "--data", data if flag == "--data" else "shapes", "--out", tmp_path / "run",
                "--max-steps", "1"] + (["--eval-data", data] if flag == "--eval-data" else [])
        _, err = _cli(hostile, capsys, f"train {flag} {what}", argv)
        assert flag in err and "no-such-model" not in err


def test_train_python_api_settings(hostile, tmp_path):
    cases = {
        "lr as a string": dict(lr="1e-4"), "max_steps as a float": dict(max_steps=1.5),
        "betas out of range": dict(betas=(1.0, 2.0)), "progress as a string": dict(progress="no"),
        "out None": dict(out=None), "device as an int": dict(device=7), "an unknown setting": dict(lerning_rate=1e-3),
    }
    for name, kw in cases.items():
        kw = {"out": str(tmp_path / "run"), "max_steps": 1, **kw}
        exc = hostile.check(f"train(): {name}", lambda: train("no-such-model", "shapes", **kw), expect="error")
        assert isinstance(exc, splice.InputError) and "no-such-model" not in str(exc)
    hostile.check("train(): config not a TrainConfig", lambda: train(SPEC, "shapes", {"lr": 1}), expect="error")
    problems = TrainConfig(lr=math.nan, max_steps=1).problems()
    assert [p.path for p in problems] == ["lr"] and all(p.fix for p in problems)


def test_train_resume_from_a_broken_checkpoint(hostile, capsys, tmp_path):
    for i, content in enumerate([b"{", b"\xff\xfe", b"[]", b'{"format": "splice-train"}']):
        ckpt = tmp_path / f"r{i}" / "checkpoint"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_bytes(content)
        _cli(hostile, capsys, f"train --resume, trainer_state.json {content[:12]!r}", [
            "train", _spec_file(tmp_path), "--data", "shapes", "--out", tmp_path / f"r{i}", "--resume", "--max-steps",
            "1", "--batch-size", "4", "--threads", "1", "--no-progress"])


def _spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    return path


# -- splice train: metadata rows ---------------------------------------------------------------------------


def _hostile_imagefolder(root: Path, images: dict[str, Path]) -> tuple[Path, dict[str, int]]:
    """An imagefolder of 24 good rows plus one row of each hostile kind; the bad-row counts it must report."""
    data = synthetic.write_imagefolder(root, 24, image_size=32)
    for name in ("decompression bomb (30000x30000 header)", "truncated PNG", "0-byte file", "text file named .png"):
        shutil.copy(images[name], data / images[name].name)
    os.mkfifo(data / "fifo.png")
    (data / "dir.png").mkdir()
    rows = [json.dumps({"file_name": n, "text": "a red circle"}).encode()
            for n in ("fifo.png", "dir.png", "gone.png", *(images[k].name for k in (
                "decompression bomb (30000x30000 header)", "truncated PNG", "0-byte file", "text file named .png")))]
    rows += [
        b'{"file_name": "000000.png", "text": "caf\xe9 au lait"}',  # Latin-1, not UTF-8
        b"\xff\xfe\x00{\x00",  # UTF-16 text
        b"{not json", b"[1, 2]", b"null", b'"a string"', b'{"text": "no file"}', b'{"file_name": 7, "text": "x"}',
        b'{"file_name": "000000.png", "text": 5}', b'{"file_name": "000000.png", "text": NaN}',
        b'{"file_name": "000000.png", "text": ""}', b"[" * 100_000 + b"]" * 100_000,
        b'{"file_name": "000000.png", "n": ' + b"9" * 5000 + b"}", b'{"file_name": "' + b"y" * (2 << 20) + b'"}',
    ]
    with open(data / "metadata.jsonl", "ab") as fh:
        fh.write(b"\n".join(rows) + b"\n")
    return data, {"unreadable image": 6, "missing file": 1, "bad row": 13, "empty text": 1}


def test_metadata_bad_rows_are_counted_never_fatal(hostile, tmp_path, images):
    data, want = _hostile_imagefolder(tmp_path / "data", images)
    rows, report = hostile.check("metadata.jsonl: every kind of bad row", lambda: read_rows(data / "metadata.jsonl"),
                                 expect="ok", seconds=60)
    assert len(rows) == 24 and report.counts == want, report.summary()
    assert any("not UTF-8" in str(b) for b in report.examples["bad row"])
    assert len(report.summary()) < 4000


def test_train_cli_trains_past_bad_rows(hostile, capsys, tmp_path, images):
    data, want = _hostile_imagefolder(tmp_path / "data", images)
    tok = tmp_path / "tokenizer.json"
    tok.write_text(synthetic.build_tokenizer().to_str())
    out, _ = _cli(hostile, capsys, "train on a folder with every kind of bad row", [
        "train", _spec_file(tmp_path), "--data", data, "--tokenizer", tok, "--out", tmp_path / "run", "--max-steps", "1",
        "--batch-size", "4", "--threads", "1", "--no-progress", "--eval-size", "4"], code=0, seconds=120)
    assert "not UTF-8" in out and "stopped at step 1" in out
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report[0]["by_reason"] == want


# -- splice demo -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--minutes", "-1"], ["--minutes", "0"], ["--minutes", "nan"], ["--minutes", "inf"],
                                   ["--threads", "0"], ["--threads", "-1"], ["--seed", "-1"], ["--minutes", "soon"]],
                         ids=" ".join)
def test_demo_flags(hostile, capsys, tmp_path, flags):
    code = 2 if flags[1] == "soon" else 1
    _, err = _cli(hostile, capsys, f"demo {' '.join(flags)}", ["demo", "--out", tmp_path / "demo", *flags], code=code)
    assert flags[0] in err
    assert not (tmp_path / "demo").exists()


def test_demo_out_is_a_file(hostile, capsys, files):
    _, err = _cli(hostile, capsys, "demo --out a file", ["demo", "--out", files["file"], "--minutes", "0.01"])
    assert "--out" in err

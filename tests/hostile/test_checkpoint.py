"""Corrupted checkpoint folders (issue 12): each loads and runs, or ends in one clean SpliceError, in time.

Two base folders are written once: a tiny splice folder (``model.save_pretrained``) and a folder written by
transformers' own ``VisionEncoderDecoderModel.save_pretrained`` (with a preprocessor config and a tokenizer).
Each case copies one and corrupts it: a metadata file replaced whole, one of its fields set to a hostile value
or removed, its bytes cut, flipped or made non-UTF-8, a file turned into a folder or a FIFO, a tensor's dtype
or the safetensors header changed, the pytorch_model.bin or shard index of a transformers folder broken.
``splice.load`` must then give a model that runs a forward pass and ``generate``, or one ``SpliceError`` that
``hostile.check`` accepts (bounded, with a fix) and that names the corrupted file.

A splice folder's ``splice.json`` records each file's size and checksum. Most cases record the corrupted file
anew, as a hand edit followed by a re-save would, so that the readers behind the checksum are reached; the
cases marked "as copied" show that the checksum catches the change.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import splice
from splice.core.files import describe_files

# hostile JSON values, as JSON text
VALUES = {
    "null": "null", "true": "true", "0": "0", "-1": "-1", "1.5": "1.5", "1e308": "1e308", "'abc'": '"abc"',
    "''": '""', "[1, 2]": "[1, 2]", "[]": "[]", "{}": "{}", "{'a': 1}": '{"a": 1}', "10**9": "1000000000",
    "10**30": "1" + "0" * 30, "5000 digits": "9" * 5000, "NaN": "NaN", "-Infinity": "-Infinity",
    "nested 200 deep": "[" * 200 + "]" * 200, "100,000 characters": json.dumps("x" * 100_000),
    "a 100,000-character key": json.dumps({"k" * 100_000: float("nan")}),
}
# for the many fields of component configs and generation options (each value that passes costs a load and a run;
# the values every field refuses alike, NaN, 10**30 and deep nesting, are tried on the top-level fields)
FEW = ("null", "'abc'", "-1", "1.5", "[1, 2]", "10**9")
OPTION_VALUES = ("'abc'", "-1", "1.5", "10**9")
MARK = "@@hostile@@"


@dataclass
class Case:
    name: str
    corrupt: Callable[[Path], None]
    file: str  # the file corrupted: an error must name it (or one of `also`)
    expect: str | None = None
    also: tuple[str, ...] = ()
    rerecord: bool = True  # splice folders: record the corrupted file's size and checksum anew


# -- the base folders ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    return write_bases(tmp_path_factory.mktemp("bases"))


def write_bases(root: Path) -> dict[str, Path]:
    model = splice.compose("vit-gpt2-tiny", seed=0)
    model.generation_defaults.update(max_length=6, num_beams=2)
    model.save_pretrained(root / "splice")
    transformers = pytest.importorskip("transformers")
    from oracle import tiny_ved
    from tokenizers import Tokenizer, models

    ved = root / "ved"
    hf = tiny_ved()
    hf.generation_config.max_length = 6  # each case that loads generates: keep it short
    hf.save_pretrained(ved)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(ved)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(99)}, unk_token="t0")).save(str(ved / "tokenizer.json"))
    return {"splice": root / "splice", "ved": root / "ved"}


@pytest.fixture
def run_cases(bases, hostile, tmp_path):
    """Run cases on copies of a base folder; fail once at the end, listing every case that failed."""

    def run(base: str, cases: list[Case], *, load=None) -> None:
        failures = []
        for i, case in enumerate(cases):
            folder = tmp_path / f"case{i}"
            shutil.copytree(bases[base], folder)
            try:
                case.corrupt(folder)
                if base == "splice" and case.rerecord and case.file != "splice.json":
                    _rerecord(folder)
                _check(hostile, f"{base}: {case.name}", case, lambda: (load or _load_and_run)(folder))
            except (AssertionError, pytest.fail.Exception) as exc:
                failures.append(str(exc).splitlines()[0][:400])
            finally:
                _remove(folder)
        assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)

    return run


def _check(hostile, label: str, case: Case, fn) -> None:
    result = hostile.check(label, fn, expect=case.expect, seconds=30)
    if isinstance(result, splice.SpliceError) and not getattr(result, "raised_in_use", False):
        named = (case.file, *case.also)
        assert any(n in str(result) for n in named), f"{label}: the error names none of {named}: {result}"


def _load_and_run(folder: Path):
    """Load, then one forward pass and one ``generate`` with the folder's defaults. An error of the second step
    (a folder without a decoder start token loads, but cannot generate) need not name the file."""
    model = splice.load(folder)
    size = model.encoder.preprocessing.image_size
    px = torch.randn(1, model.encoder.preprocessing.in_chans, *size)
    try:
        with torch.no_grad():
            logits = model(pixel_values=px, decoder_input_ids=torch.zeros(1, 2, dtype=torch.long)).logits
            model.generate(px)
    except splice.SpliceError as exc:
        exc.raised_in_use = True
        raise
    assert logits.dtype == torch.float32
    return model


def _rerecord(folder: Path) -> None:
    config = json.loads((folder / "splice.json").read_text())
    config["files"] = {k: v for k, v in describe_files(folder).items() if k != "splice.json"}
    (folder / "splice.json").write_text(json.dumps(config))


def _remove(path: Path) -> None:
    for p in path.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    path.rmdir()


# -- corruptions of files, as data ---------------------------------------------------------------------------


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        (folder / name).unlink(missing_ok=True)
        (folder / name).write_bytes(data)
    return corrupt


def _sparse(name: str, size: int) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        with open(folder / name, "r+b") as f:
            f.truncate(size)
    return corrupt


def _edit(name: str, fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        (folder / name).write_bytes(fn((folder / name).read_bytes()))
    return corrupt


def _replace_with(name: str, kind: str) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        path = folder / name
        path.unlink(missing_ok=True)
        if kind == "folder":
            path.mkdir()
            (path / "inside").write_text("{}")
        elif kind == "FIFO":
            os.mkfifo(path)
        elif kind == "link to /dev/zero":
            path.symlink_to("/dev/zero")
        elif kind == "dangling link":
            path.symlink_to(folder / "nowhere")
    return corrupt


def file_cases(name: str, original: bytes, *, json_file: bool) -> list[Case]:
    """One file replaced whole: by other JSON values, by broken bytes, cut short, or by something not a file."""
    n = len(original)
    cases = []
    if json_file:
        cases += [Case(f"{name} holds {label}", _write(name, text.encode()), name) for label, text in VALUES.items()]
        cases += [
            Case(f"{name} is not JSON", _write(name, b"{oops"), name),
            Case(f"{name} is a 5,000-deep object", _write(name, b'{"a":' * 5000 + b"1" + b"}" * 5000), name),
            Case(f"{name} in UTF-16", _write(name, original.decode().encode("utf-16")), name),
            Case(f"{name} with a byte-order mark", _write(name, b"\xef\xbb\xbf" + original), name),
            Case(f"{name} padded by 500 KB of spaces", _write(name, original + b" " * 500_000), name, expect="ok"),
            Case(f"{name} of 100 MB (sparse)", _sparse(name, 100 << 20), name),
        ]
    cases += [Case(f"{name} cut to {k} of {n} bytes", _edit(name, lambda b, k=k: b[:k]), name)
              for k in sorted({0, 1, 7, n // 3, n // 2, n - 2})]
    cases += [Case(f"{name} with a non-UTF-8 byte at {k}", _edit(name, lambda b, k=k: b[:k] + b"\xff\xfe" + b[k:]),
                   name) for k in (0, n // 2)]
    cases += [Case(f"{name} replaced by a {kind}", _replace_with(name, kind), name)
              for kind in ("folder", "FIFO", "link to /dev/zero", "dangling link")]
    cases.append(Case(f"{name} deleted", lambda folder: (folder / name).unlink(), name))
    return cases


def _field_paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into the mappings of a JSON document (list items are values, not paths)."""
    paths = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            paths.append((*prefix, key))
            paths.extend(_field_paths(value, (*prefix, key)))
    return paths


def _set_field(name: str, path: tuple, text: str | None) -> Callable[[Path], None]:
    """Set the field at ``path`` of the JSON file ``name`` to the JSON ``text`` (None: remove it)."""
    def corrupt(folder: Path) -> None:
        doc = json.loads((folder / name).read_text())
        inner = doc
        for key in path[:-1]:
            inner = inner[key]
        if text is None:
            del inner[path[-1]]
        else:
            inner[path[-1]] = MARK
        (folder / name).write_text(json.dumps(doc).replace(json.dumps(MARK), text or ""))
    return corrupt


def field_cases(name: str, doc: dict, values_for: Callable[[tuple], tuple[str, ...]], *,
                removable: Callable[[tuple], bool] = lambda path: True, also: tuple = ()) -> list[Case]:
    cases = []
    for path in _field_paths(doc):
        dotted = ".".join(path)
        cases += [Case(f"{name}: {dotted} = {label}", _set_field(name, path, VALUES[label]), name, also=also)
                  for label in values_for(path)]
        if removable(path):
            cases.append(Case(f"{name}: {dotted} removed", _set_field(name, path, None), name, also=also))
    return cases


# -- corruptions of safetensors files --------------------------------------------------------------------


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: object, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def _header_edit(fn: Callable[[dict, str], None], name: str = "model.safetensors") -> Callable[[Path], None]:
    """Change the header (``fn(header, first_tensor_name)``) and keep the data as it is."""
    def edit(data: bytes) -> bytes:
        header, body = _split(data)
        fn(header, sorted(k for k in header if k != "__metadata__")[0])
        return _join(header, body)
    return _edit(name, edit)


def _set(header: dict, key: str, value) -> None:
    header[key] = value


def _entry(field: str, value) -> Callable[[dict, str], None]:
    return lambda header, first: header[first].__setitem__(field, value)


def _meta(key: str, value) -> Callable[[dict, str], None]:
    return lambda header, first: header.setdefault("__metadata__", {}).__setitem__(key, value)


def safetensors_byte_cases(name: str, original: bytes) -> list[Case]:
    """Cut at the edges of the header and the data, a broken header length, bits flipped across the header."""
    h = int.from_bytes(original[:8], "little")
    size = len(original)
    cases = [Case(f"{name} cut to {k} of {size} bytes", _edit(name, lambda b, k=k: b[:k]), name)
             for k in sorted({0, 4, 7, 8, 9, 8 + h // 2, 8 + h, 9 + h, size // 2, size - 1})]
    for label, length in (("2**63", 1 << 63), ("0", 0), ("one short", h - 1), ("one long", h + 1),
                          ("the file size", size)):
        cases.append(Case(f"{name} header length {label}",
                          _edit(name, lambda b, n=length: n.to_bytes(8, "little") + b[8:]), name))
    for i in range(24):
        at = 8 + (h * i) // 24 + 3
        cases.append(Case(f"{name} bit {i % 8} flipped at byte {at}",
                          _edit(name, lambda b, at=at, bit=i % 8: b[:at] + bytes([b[at] ^ (1 << bit)]) + b[at + 1:]),
                          name))
    return cases


def safetensors_header_cases(name: str, *, splice_meta: bool) -> list[Case]:
    """The header's JSON rewritten: entries of the wrong shape or type, huge claims, broken metadata."""
    edits = {
        "an entry that is a list": _entry_value([]),
        "entry is null": _entry_value(None), "entry is a string": _entry_value("abc"),
        "dtype unknown": _entry("dtype", "Q4"), "dtype null": _entry("dtype", None),
        "dtype a list": _entry("dtype", ["F32"]),
        "dtype F16 with F32 bytes": _entry("dtype", "F16"), "shape of strings": _entry("shape", ["a", "b"]),
        "shape negative": _entry("shape", [-1, 4]), "shape of lists": _entry("shape", [[1] * 10, [1] * 10]),
        "shape a string": _entry("shape", "3"), "shape null": _entry("shape", None),
        "shape of bools": _entry("shape", [True]), "shape 10**12 with matching offsets": _huge_tensor(10**12),
        "shape 2**70": _huge_tensor(2**70), "offsets reversed": _offsets(lambda b, e: [e, b]),
        "offsets of three": _offsets(lambda b, e: [b, e, e]), "offsets negative": _offsets(lambda b, e: [-e, -b]),
        "offsets past the end": _offsets(lambda b, e: [b + 10**9, e + 10**9]),
        "offsets floats": _offsets(lambda b, e: [b + 0.5, e + 0.5]), "offsets null": _entry("data_offsets", None),
        "metadata null": lambda header, first: _set(header, "__metadata__", None),
        "metadata a list": lambda header, first: _set(header, "__metadata__", ["a"]),
        "metadata holds a number": _meta("format", 5), "metadata holds a mapping": _meta("tied", {"a": "b"}),
        "a second name for the first tensor's bytes": lambda header, first: _set(header, "", header[first]),
        "a tensor named by 100,000 characters": lambda header, first: _set(header, "x" * 100_000, header.pop(first)),
        "a tensor named by 100,000 characters, the original kept": lambda header, first: _set(
            header, "y" * 100_000, dict(header[first])),
    }
    if splice_meta:
        edits.update({
            "format 'pt'": _meta("format", "pt"), "version '9'": _meta("version", "9"),
            "version removed": lambda header, first: header["__metadata__"].pop("version"),
            "tied not JSON": _meta("tied", "{oops"), "tied a list": _meta("tied", "[]"),
            "tied nested 5,000 deep": _meta("tied", "[" * 5000 + "]" * 5000),
            "tied to a missing tensor": _meta("tied", json.dumps({"decoder.lm_head.weight": "no.such.tensor"})),
            "tied alias that exists": lambda header, first: _meta("tied", json.dumps({first: first}))(header, first),
            "tied to numbers": _meta("tied", json.dumps({"a": 1})),
            "tied alias unknown to the model": lambda header, first: _meta(
                "tied", json.dumps({"no.such.alias": first}))(header, first),
        })
    return [Case(f"{name} header: {label}", _header_edit(fn, name), name) for label, fn in edits.items()]


def _entry_value(value) -> Callable[[dict, str], None]:
    return lambda header, first: _set(header, first, value)


def _offsets(fn) -> Callable[[dict, str], None]:
    return lambda header, first: header[first].__setitem__("data_offsets", fn(*header[first]["data_offsets"]))


def _huge_tensor(count: int) -> Callable[[dict, str], None]:
    def edit(header: dict, first: str) -> None:
        begin = header[first]["data_offsets"][0]
        header[first].update(dtype="F32", shape=[count], data_offsets=[begin, begin + 4 * count])
    return edit


def tensor_cases(name: str, float_tensor: str) -> list[Case]:
    """The file rewritten with one tensor changed: its dtype (a float dtype is cast, as transformers does; another
    kind is refused), its values, its shape; a tensor removed, added or renamed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def rewrite(fn) -> Callable[[Path], None]:
        def corrupt(folder: Path) -> None:
            with safe_open(str(folder / name), framework="pt") as f:
                tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
            fn(tensors)
            save_file(tensors, folder / name, metadata=meta)
        return corrupt

    def change(fn) -> Callable[[Path], None]:
        return rewrite(lambda t: t.__setitem__(float_tensor, fn(t[float_tensor])))

    cases = [Case(f"{name}: {float_tensor} in {dt}", change(lambda x, dt=dt: x.to(dt)), name, expect="ok")
             for dt in (torch.float16, torch.bfloat16, torch.float64)]
    cases.append(Case(f"{name}: every tensor in float16", rewrite(
        lambda t: t.update({k: v.half() for k, v in t.items() if v.is_floating_point()})), name, expect="ok"))
    cases += [Case(f"{name}: {float_tensor} in {dt}", change(lambda x, dt=dt: x.to(dt)), name, expect="error")
              for dt in (torch.int64, torch.int32, torch.uint8, torch.bool)]
    cases += [
        Case(f"{name}: {float_tensor} holds {v}", change(lambda x, v=v: torch.full_like(x, float(v))), name,
             expect="error") for v in ("nan", "inf")]
    cases += [
        Case(f"{name}: {float_tensor} of another shape", change(lambda x: torch.zeros(3, 5)), name, expect="error"),
        Case(f"{name}: {float_tensor} empty", change(lambda x: torch.zeros(0)), name, expect="error"),
        Case(f"{name}: {float_tensor} a scalar", change(lambda x: torch.tensor(1.0)), name, expect="error"),
        Case(f"{name}: {float_tensor} removed", rewrite(lambda t: t.pop(float_tensor)), name, expect="error"),
        Case(f"{name}: an extra tensor", rewrite(lambda t: t.update(extra=torch.zeros(2))), name, expect="error"),
        Case(f"{name}: {float_tensor} renamed", rewrite(lambda t: t.update(renamed=t.pop(float_tensor))), name,
             expect="error"),
    ]
    return cases


# -- the splice folder -----------------------------------------------------------------------------------------


def splice_json_cases(base: Path) -> list[Case]:
    original = (base / "splice.json").read_bytes()
    doc = json.loads(original)
    cases = file_cases("splice.json", original, json_file=True)
    cases += field_cases("splice.json", doc, lambda path: FEW if len(path) > 1 else tuple(VALUES),
                         also=("model.safetensors", "generation.json", "preprocessor_config.json"))
    return cases


def test_splice_json(run_cases, bases):
    cases = splice_json_cases(bases["splice"])
    assert len(cases) > 500
    run_cases("splice", cases)


def splice_generation_cases(base: Path) -> list[Case]:
    cases = []
    for name in ("generation.json", "preprocessor_config.json"):
        original = (base / name).read_bytes()
        cases += file_cases(name, original, json_file=True)
        cases += [Case(f"{c.name} (as copied)", c.corrupt, c.file, also=("splice.json",), rerecord=False)
                  for c in file_cases(name, original, json_file=True)[::6]]
    return cases + option_cases("generation.json")


def option_cases(file: str) -> list[Case]:
    """Each generation option of ``file`` set to each hostile value."""
    from splice.core.generation import GENERATION_OPTIONS

    return [Case(f"{file}: {option} = {label}", _set_field(file, (option,), VALUES[label]), file)
            for option in GENERATION_OPTIONS for label in OPTION_VALUES]


def test_splice_generation_and_preprocessor(run_cases, bases):
    run_cases("splice", splice_generation_cases(bases["splice"]))


def weights_cases(base: Path, tensor: str, *, splice_meta: bool) -> tuple[list[Case], list[Case]]:
    """(byte, header and tensor cases; whole-file cases) for a folder's model.safetensors."""
    original = (base / "model.safetensors").read_bytes()
    cases = safetensors_byte_cases("model.safetensors", original)
    cases += safetensors_header_cases("model.safetensors", splice_meta=splice_meta)
    cases += tensor_cases("model.safetensors", tensor)
    return cases, file_cases("model.safetensors", original, json_file=False)


def splice_weights_cases(base: Path) -> list[Case]:
    cases, whole_file = weights_cases(base, "decoder.ln_f.weight", splice_meta=True)
    cases += [Case(f"{c.name} (as copied)", c.corrupt, c.file, also=("splice.json",), rerecord=False)
              for c in cases[::5] if c.expect != "ok"]
    return cases + whole_file


def test_splice_weights(run_cases, bases):
    run_cases("splice", splice_weights_cases(bases["splice"]))


def test_splice_fp16_tensor_is_cast_and_reported(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(bases["splice"], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["decoder.ln_f.weight"] = tensors["decoder.ln_f.weight"].half()
    from safetensors import safe_open

    with safe_open(str(bases["splice"] / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, folder / "model.safetensors", metadata=meta)
    _rerecord(folder)
    model = _load_and_run(folder)
    assert model.decoder.ln_f.weight.dtype == torch.float32
    assert any("float16 to float32" in n and "decoder.ln_f.weight" in n for n in model.loading_report.notes)
    tensors["decoder.ln_f.weight"] = torch.ones(32, dtype=torch.int64)
    save_file(tensors, folder / "model.safetensors", metadata=meta)
    _rerecord(folder)
    with pytest.raises(splice.CheckpointError, match="decoder.ln_f.weight: int64 in the file, the model holds float32"):
        splice.load(folder)


# -- the transformers folder -------------------------------------------------------------------------------


# the fields of a transformers config.json that splice reads itself get every hostile value; the component fields
# (read by the plugins) and the fields splice passes over get FEW
_VED_READ = {"model_type", "encoder", "decoder", "decoder_start_token_id", "pad_token_id", "eos_token_id",
             "bos_token_id", "add_cross_attention"}


def _ved_values(path: tuple) -> tuple[str, ...]:
    return tuple(VALUES) if path[-1] in _VED_READ else FEW


def ved_config_cases(base: Path) -> list[Case]:
    original = (base / "config.json").read_bytes()
    cases = file_cases("config.json", original, json_file=True)
    return cases + field_cases("config.json", json.loads(original), _ved_values)


def test_ved_config(run_cases, bases):
    cases = ved_config_cases(bases["ved"])
    assert len(cases) > 500
    run_cases("ved", cases)


def ved_generation_cases(base: Path) -> list[Case]:
    cases = []
    for name in ("generation_config.json", "preprocessor_config.json", "tokenizer.json"):
        cases += file_cases(name, (base / name).read_bytes(), json_file=True)
    return cases + option_cases("generation_config.json")


def test_ved_generation_preprocessor_tokenizer(run_cases, bases):
    run_cases("ved", ved_generation_cases(bases["ved"]))


def ved_weights_cases(base: Path) -> list[Case]:
    cases, whole_file = weights_cases(base, "decoder.transformer.ln_f.weight", splice_meta=False)
    return cases + whole_file


def test_ved_weights(run_cases, bases):
    run_cases("ved", ved_weights_cases(bases["ved"]))


def _as_bin(content) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        value = content(tensors)
        if isinstance(value, bytes):
            (folder / "pytorch_model.bin").write_bytes(value)
        else:
            torch.save(value, folder / "pytorch_model.bin")
    return corrupt


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _bin_bytes(tensors: dict, cut: int) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()[:cut]


def ved_bin_and_shard_cases(base: Path) -> list[Case]:
    bin_cases = {
        "a state dict": (lambda t: t, "ok"),
        "a state dict in float16": (lambda t: {k: v.half() for k, v in t.items()}, "ok"),
        "a list": (lambda t: list(t.values()), "error"),
        "a tensor": (lambda t: torch.zeros(3), "error"),
        "a mapping of numbers": (lambda t: {k: 1 for k in t}, "error"),
        "integer keys": (lambda t: {1: torch.zeros(1)}, "error"),
        "nested mappings": (lambda t: {"model": t}, "error"),
        "None": (lambda t: None, "error"),
        "a pickled os.system call": (lambda t: {"x": _Evil()}, "error"),
        "random bytes": (lambda t: os.urandom(4096), "error"),
        "nothing": (lambda t: b"", "error"),
        "a cut zip": (lambda t: _bin_bytes(t, 5000), "error"),
    }
    cases = [Case(f"pytorch_model.bin holds {label}", _as_bin(fn), "pytorch_model.bin", expect=expect)
             for label, (fn, expect) in bin_cases.items()]
    index = "model.safetensors.index.json"
    shard_cases = {
        "valid": ({}, "ok"),
        "weight_map null": (None, "error"),
        "weight_map a list": ([], "error"),
        "a shard named by a number": ({"x": 5}, "error"),
        "a shard named by a list": ({"x": ["a"]}, "error"),
        "a shard outside the folder": ({"x": "../escape.safetensors"}, "error"),
        "an absolute shard path": ({"x": "/etc/passwd"}, "error"),
        "a missing shard": ({"x": "gone.safetensors"}, "error"),
        "a shard that is a folder": ({"x": "."}, "error"),
        "a tensor not in its shard": ({"x": "model-1.safetensors"}, "error"),
    }
    cases += [Case(f"{index}: {label}", _sharded(change), index, expect=expect, also=("safetensors",))
              for label, (change, expect) in shard_cases.items()]
    return cases + [Case(f"{index} holds {label}", _sharded({}, text), index) for label, text in VALUES.items()]


def test_ved_bin_and_shards(run_cases, bases):
    run_cases("ved", ved_bin_and_shard_cases(bases["ved"]))


def _sharded(change, text: str | None = None) -> Callable[[Path], None]:
    """Split model.safetensors into two shards with an index; ``change`` updates the weight map (None replaces
    it), ``text`` replaces the whole index."""
    def corrupt(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        names = sorted(tensors)
        weight_map = {}
        for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
            save_file({k: tensors[k] for k in part}, folder / f"model-{i}.safetensors")
            weight_map.update({k: f"model-{i}.safetensors" for k in part})
        if isinstance(change, dict):
            weight_map.update(change)
        else:
            weight_map = change
        index = json.dumps({"metadata": {}, "weight_map": weight_map}) if text is None else text
        (folder / "model.safetensors.index.json").write_text(index)
    return corrupt


# -- pretrained parts and paths ---------------------------------------------------------------------------


def test_pretrained_part_folder(bases, hostile, tmp_path):
    """An encoder warm-started from a transformers ViT folder whose config.json or weights are corrupted."""
    transformers = pytest.importorskip("transformers")
    from oracle import tiny_ved

    part = tmp_path / "vit"
    tiny_ved().encoder.save_pretrained(part)
    cfg = json.loads((part / "config.json").read_text())
    # the spec's own config stands where config.json is gone or not a ViT's (the tiny sizes: no ViT-Base is built)
    tiny = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0}
    spec = {"encoder": {"name": "vit", "pretrained": str(part), "config": tiny}, "decoder": {"name": "gpt2", "config": {
        "vocab_size": 99, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4}}}
    cases = file_cases("config.json", (part / "config.json").read_bytes(), json_file=True)
    cases += field_cases("config.json", cfg, lambda path: ("'abc'", "10**9"), removable=lambda path: False)
    cases += [c for c in tensor_cases("model.safetensors", "embeddings.cls_token")
              if any(w in c.name for w in ("int", "bool", "another shape"))]
    failures = []
    for i, case in enumerate(cases):
        folder = tmp_path / f"case{i}"
        shutil.copytree(part, folder)
        case.corrupt(folder)
        spec["encoder"]["pretrained"] = str(folder)
        try:
            _check(hostile, f"pretrained: {case.name}", case, lambda: splice.compose(spec, seed=0))
        except (AssertionError, pytest.fail.Exception) as exc:
            failures.append(str(exc).splitlines()[0][:400])
        _remove(folder)
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
    assert transformers


@pytest.mark.parametrize("path", [None, 5, b"bytes", "a\x00b", "x" * 5000, "y" * 300 + "/z", "/proc/self/fd/0/x",
                                  "/dev/null", "", "."])
def test_load_refuses_what_is_not_a_folder(path, hostile, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hostile.check(f"splice.load({path!r:.40})", lambda: splice.load(path), expect="error")

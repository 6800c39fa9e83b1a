"""Saving and loading: splice folders, and folders written by transformers.

safetensors only for splice's own files (no pickle). Models are built with parameters on the meta device and
the tensors are assigned from the file, so loading holds about one copy of the weights. Saves are atomic: the
files are written to a temp folder beside the target, which then replaces the target in a rename.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from splice.core.errors import CheckpointError, Problem, short
from splice.core.files import describe_files, inside, verify_files, write_folder

SPLICE_CONFIG = "splice.json"
WEIGHTS = "model.safetensors"
GENERATION = "generation.json"  # generation defaults (max_length, num_beams, ...) saved with the model
FORMAT_VERSION = 2  # 2: splice.json records each file's size and SHA-256
READABLE_VERSIONS = (1, 2)
_INT64 = 1 << 63  # integers in headers and metadata fit 64 bits


@dataclass
class LoadReport:
    """What a load did, by tensor name."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, no place in the model
    unused: list[str] = field(default_factory=list)  # in the file, known to be unneeded (pooler, legacy buffers)
    initialised: list[str] = field(default_factory=list)  # newly initialised (e.g. new cross-attention)
    nonfinite: list[str] = field(default_factory=list)  # loaded, but holding NaN or Inf
    notes: list[str] = field(default_factory=list)  # what a mapping did beyond renaming

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        for label, names in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("unused", self.unused),
            ("newly initialised", self.initialised),
            ("holding NaN or Inf", self.nonfinite),
        ):
            if names:
                lines.append(f"  {label} ({len(names)}): {', '.join(names)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def listing(self, *fields: str) -> str:
        """``  missing (N): a, b`` lines for the named fields that are not empty (for error messages)."""
        return "".join(f"  {f} ({len(getattr(self, f))}): {shown_names(getattr(self, f), 20)}\n"
                       for f in fields if getattr(self, f))


def clip_name(name: str) -> str:
    """A tensor name for a message: names come from files, and a corrupted header can hold any string."""
    return name if len(name) <= 120 else name[:100] + f"... ({len(name):,} characters)"


def shown_names(names: list[str], limit: int) -> str:
    """At most ``limit`` names, clipped, and how many more there are."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(clip_name(n) for n in names[:limit]) + more


def map_from_hf(interop, tensors, hf_config: dict) -> tuple[dict, list[str], list[str]]:
    """``interop.state_dict_from_hf`` -> (mapped, unused, notes); the notes item is optional for plugins."""
    out = interop.state_dict_from_hf(tensors, hf_config)
    mapped, unused = out[0], list(out[1])
    return mapped, unused, list(out[2]) if len(out) > 2 else []


# -- saving ----------------------------------------------------------------------------------------------


SPLICE_FILES = frozenset({SPLICE_CONFIG, WEIGHTS, GENERATION, "preprocessor_config.json", "tokenizer.json"})


def save_pretrained(model, path: str | os.PathLike, *, extra_files: dict[str, bytes] | None = None) -> None:
    """Write ``splice.json``, ``model.safetensors`` and the rest into ``path``, replacing it atomically.

    ``path`` must be new, empty, or a folder an earlier save wrote: splice never deletes files it did not write
    (see ``splice.core.files.write_folder``). ``splice.json`` records each file's size and SHA-256.
    """
    from safetensors.torch import save_file

    extra = dict(extra_files or {})
    for name in extra:
        inside(Path(path), name, what="extra_files")

    def fill(tmp: Path) -> None:
        tensors, tied = _dedupe(model.state_dict())
        meta = {"format": "splice", "version": str(FORMAT_VERSION), "tied": json.dumps(tied)}
        save_file(tensors, tmp / WEIGHTS, metadata=meta)
        if getattr(model, "generation_defaults", None):
            (tmp / GENERATION).write_text(json.dumps(model.generation_defaults, indent=2) + "\n")
        from splice.core.processing import processor_for

        processor = processor_for(model)
        if processor is not None:
            processor.save(tmp)
        if getattr(model, "tokenizer", None) is not None:
            (tmp / "tokenizer.json").write_text(model.tokenizer.to_str())
        for name, data in extra.items():
            (tmp / name).write_bytes(data)
        from splice.core.plugins import provenance

        config = {"format": "splice", "version": FORMAT_VERSION, "spec": model.spec,
                  "components": provenance(model.spec), "files": describe_files(tmp)}
        (tmp / SPLICE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    write_folder(path, fill, marker=SPLICE_CONFIG, owned=SPLICE_FILES | set(extra), what="checkpoint")


def _dedupe(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """safetensors refuses shared storage: keep one name per tensor, remember the others as ties."""
    seen: dict[tuple, str] = {}
    out, tied = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().contiguous()
    return out, tied


# -- reading files -----------------------------------------------------------------------------------------


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ITEMSIZE = {name: dt.itemsize for name, dt in _DTYPES.items()}
_ENTRY_EXPECTED = {
    "dtype": f"one of {', '.join(_DTYPES)}",
    "shape": "a list of sizes (integers >= 0)",
    "data_offsets": "[begin, end], two integers with begin <= end",
}


HEADER_LIMIT = 100_000_000  # bytes: safetensors' own bound on a header


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, offsets) and where its data starts. Every entry is
    checked, and against the file's size, before any tensor is read: a truncated or corrupted file is reported
    with the tensor it breaks, and a header claiming more bytes than the file holds allocates nothing."""
    bad = "\n    fix: the file is truncated or corrupted; save or download it again"
    if not path.is_file():
        what = "file not found" if not path.exists() and not path.is_symlink() else "not a regular file"
        raise CheckpointError(f"{path}: {what}\n    fix: check the checkpoint folder")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a readable safetensors file (only {size} bytes){bad}")
        n = int.from_bytes(raw, "little")
        if n > size - 8 or n > HEADER_LIMIT:
            raise CheckpointError(f"{path}: not a readable safetensors file (header length {n} > file size {size}){bad}")
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a readable safetensors file (header is not JSON: "
                              f"{short(str(exc), 160)}){bad}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (header is not a mapping){bad}")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: its __metadata__ is not a mapping of strings (given {short(meta)}){bad}")
    for name, info in header.items():
        if name != "__metadata__":
            _check_entry(path, name, info, 8 + n, size, bad)
    return header, 8 + n


def _is_count(x: object) -> bool:
    return type(x) is int and 0 <= x < _INT64


def _check_entry(path: Path, name: str, info: object, start: int, size: int, bad: str) -> None:
    """One tensor's header entry: a known dtype, a shape of non-negative ints, and a byte range that matches the
    shape and lies inside the file."""
    if not isinstance(info, dict):
        wrong = "entry"
    elif not (isinstance(info.get("dtype"), str) and info["dtype"] in _DTYPES):
        wrong = "dtype"
    elif not (isinstance(info.get("shape"), list) and all(_is_count(d) for d in info["shape"])):
        wrong = "shape"
    else:
        offsets = info.get("data_offsets")
        ok = (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
              and offsets[0] <= offsets[1])
        wrong = None if ok else "data_offsets"
    if wrong:
        given = info if wrong == "entry" else info.get(wrong)
        want = "{dtype, shape, data_offsets}" if wrong == "entry" else _ENTRY_EXPECTED[wrong]
        raise CheckpointError(f"{path}: tensor {short(name)}: the header's {wrong} is {short(given)}\n"
                              f"    expected: {want}{bad}")
    begin, end = info["data_offsets"]
    if end - begin != math.prod(info["shape"]) * _ITEMSIZE[info["dtype"]]:
        raise CheckpointError(f"{path}: tensor {short(name)}: its byte range does not match shape "
                              f"{short(info['shape'])}{bad}")
    if start + end > size:
        raise CheckpointError(f"{path}: tensor {short(name)} ends at byte {start + end} but the file has {size} "
                              f"bytes{bad}")


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of one file, memory-mapped (pages are read when first used), and its metadata."""
    from safetensors import safe_open

    header, _ = read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(header.get("__metadata__") or {})
    except Exception as exc:  # safetensors' own errors for what the header check let through
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {short(str(exc), 300)})\n"
            "    fix: the file is truncated or corrupted; save or download it again"
        ) from None


# Linux: fault the whole anonymous mapping in at once (MAP_POPULATE), about 2x faster than page by page as
# readinto fills it; elsewhere a plain anonymous mapping
_POPULATE = (dict(flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
             if hasattr(mmap, "MAP_POPULATE") else {})


class LazyTensors(Mapping):
    """Tensors of safetensors files read one at a time, each into its own memory (no shared mapping).

    Converting a transformers checkpoint (fusing q/k/v, transposing Conv1D weights) makes new tensors; reading
    lazily lets each original be freed as soon as it is converted, so loading stays near one copy of the weights.
    """

    def __init__(self, files: list[Path], prefix: str = ""):
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for path in files:
            header, start = read_header(path)
            for name, info in header.items():
                if name != "__metadata__" and name.startswith(prefix):
                    self._where[name[len(prefix):]] = (path, info, start)

    def with_prefix(self, prefix: str) -> "LazyTensors":
        """The tensors under ``prefix.`` with that prefix removed from their names."""
        sub = LazyTensors([])
        sub._where = {k[len(prefix):]: v for k, v in self._where.items() if k.startswith(prefix)}
        return sub

    def __getitem__(self, name: str) -> Tensor:
        path, info, start = self._where[name]
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        # an anonymous mapping per tensor: freeing a converted original returns its pages to the system at once
        # (malloc would keep them in a fragmented heap and the peak would grow)
        buf = mmap.mmap(-1, end - begin, **_POPULATE)
        view, got = memoryview(buf), 0
        with open(path, "rb", buffering=0) as f:
            f.seek(start + begin)
            while got < end - begin:  # one unbuffered read returns at most ~2 GiB on Linux
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        view.release()
        if got != end - begin:
            raise CheckpointError(f"{path}: tensor {short(name)} is cut short ({got} of {end - begin} bytes): the file "
                                  "changed while it was read\n    fix: save or download it again")
        return torch.frombuffer(buf, dtype=dtype).view(info["shape"])

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


WEIGHT_FILES = (WEIGHTS, "model.safetensors.index.json", "pytorch_model.bin")  # in the order they are looked for


def weights_file(folder: Path) -> Path:
    """The file a folder's weights are read from: model.safetensors, a shard index, or pytorch_model.bin."""
    for name in WEIGHT_FILES:
        if (folder / name).exists() or (folder / name).is_symlink():
            return folder / name
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(WEIGHT_FILES)})\n"
                          "    fix: copy or download the whole folder")


def lazy_weights(folder: Path) -> Mapping[str, Tensor]:
    """A folder's safetensors weights (single file or shards) as ``LazyTensors``; a 4.x ``pytorch_model.bin`` is
    read eagerly (with ``weights_only=True``: never plain pickle)."""
    path = weights_file(folder)
    if path.name == WEIGHTS:
        return LazyTensors([path])
    return _sharded(folder, path) if path.name.endswith(".index.json") else _read_bin(path)


def _sharded(folder: Path, index: Path) -> "LazyTensors":
    weight_map = read_json_mapping(index, what="a mapping with a `weight_map`").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise field_error(index, "weight_map", "not a mapping of tensor names to shard files", given=weight_map,
                          expected="{tensor name: shard file name}", fix="download the whole checkpoint again")
    shards = sorted(set(weight_map.values()))
    for shard in shards:  # every shard is a file of this folder, never a path elsewhere
        inside(folder, shard, what=f"{index}: weight_map")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard(s) {shown_names(missing, 5)} are missing from {folder}\n"
                              "    fix: download the whole checkpoint again")
    lazy = LazyTensors([folder / s for s in shards])
    absent = sorted(set(weight_map) - set(lazy))
    if absent:
        raise CheckpointError(f"{index}: tensors listed in the index are not in their shards: "
                              f"{shown_names(absent, 10)}\n    fix: download the whole checkpoint again")
    return lazy


def _read_bin(binary: Path) -> dict[str, Tensor]:
    """A ``pytorch_model.bin``, read with ``weights_only=True``: it must hold a mapping of names to tensors."""
    if not binary.is_file():
        raise CheckpointError(f"{binary}: not a regular file\n    fix: copy or download the whole folder")
    try:
        try:
            data = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (pre-zip) files cannot be memory-mapped: read them whole
                raise
            data = torch.load(binary, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{binary}: cannot read it safely ({type(exc).__name__}: {short(str(exc), 300)})\n"
                              "    fix: convert it to safetensors, or download it again") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
        raise CheckpointError(f"{binary}: holds {type(data).__name__} {short(data)}, not a state dict\n"
                              "    expected: a mapping of tensor names to tensors\n"
                              "    fix: save the model's state_dict(), or convert it to safetensors")
    return data


def read_weights(folder: Path) -> dict[str, Tensor]:
    """A folder's weights, all read: model.safetensors, a sharded index, or (transformers 4.x) pytorch_model.bin."""
    return dict(lazy_weights(folder))


# -- loading into a model ------------------------------------------------------------------------------------


def assign_weights(model, state: dict[str, Tensor], *, source: str, strict: bool = True, dtype: torch.dtype | None = None,
                   unused: Iterable[str] = (), expected_new: Iterable[str] = (), fresh=None,
                   config: str = "the config") -> LoadReport:
    """Assign tensors into a (meta-built) model by name, checking every shape; report what happened.

    ``config`` names the file the model was built from, for the fix of a mismatch.

    ``expected_new`` names weights the file is not meant to have (new cross-attention); they, and with
    ``strict=False`` any other missing weight, are taken from ``fresh()`` (a randomly initialised model).
    """
    report = LoadReport(source=source, unused=sorted(unused))
    expected = model.state_dict()
    mismatched = [  # the shallowest names first: the embeddings say most about a wrong size
        f"{clip_name(name)}: file {tuple(t.shape)}, model {tuple(expected[name].shape)}"
        for name, t in sorted(state.items(), key=lambda item: (item[0].count("."), item[0]))
        if name in expected and tuple(expected[name].shape) != tuple(t.shape)
    ]
    if mismatched:
        more = f"\n  ... and {len(mismatched) - 20} more" if len(mismatched) > 20 else ""
        raise CheckpointError(
            f"{source}: {len(mismatched)} tensor(s) have the wrong shape for this model:\n  "
            + "\n  ".join(mismatched[:20]) + more
            + f"\n    fix: the checkpoint was made for a different configuration; check {config} against the weights"
        )
    state = _fit_dtypes(state, expected, dtype, source, report)
    # by name, not torch's unexpected_keys: torch passes over tensors under an empty module slot (a decoder layer
    # without cross-attention), which would drop them without a word
    report.unexpected = sorted(set(state) - set(expected))
    checked: dict[int, bool] = {}  # by tensor: a tied alias is the same tensor, summed once
    for k, t in state.items():
        if k in expected and id(t) not in checked:
            checked[id(t)] = _has_nonfinite(t)
    report.nonfinite = sorted(k for k, t in state.items() if k in expected and checked[id(t)])
    result = model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    new = set(expected_new)
    report.missing = sorted(k for k in result.missing_keys if k not in new and _is_meta(model, k))
    report.loaded = sorted(set(state) - set(report.unexpected))
    if strict and (report.missing or report.unexpected or report.nonfinite):
        raise CheckpointError(
            f"{source}: the weights do not match the model\n" + report.listing("missing", "unexpected", "nonfinite")
            + f"    fix: check that {config} and the weights belong together (or load with strict=False, "
            "which reports them)"
        )
    if report.nonfinite:
        import warnings

        warnings.warn(f"{source}: {len(report.nonfinite)} weight(s) hold NaN or Inf: "
                      f"{shown_names(report.nonfinite, 10)}", stacklevel=3)
    todo = sorted(k for k in result.missing_keys if _is_meta(model, k))
    if todo:
        assert fresh is not None, "missing weights but no way to initialise them"
        init = fresh().state_dict()
        model.load_state_dict({k: init[k] for k in todo}, strict=False, assign=True)
        report.initialised = todo
    from splice.core.meta import init_meta_buffers

    init_meta_buffers(model)
    if dtype is not None:
        model.to(dtype)
    return report


def dtype_kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point or dtype.is_complex else "int"


def _fit_dtypes(state: dict[str, Tensor], expected: dict[str, Tensor], dtype: torch.dtype | None, source: str,
                report: LoadReport) -> dict[str, Tensor]:
    """Each tensor in the dtype the model holds it in (``dtype`` for floating tensors when given), cast as
    transformers does and noted in the report; a tensor of another kind (integers or booleans where the model
    holds floats, or the reverse) is refused. Tensors tied to one another stay one tensor."""
    out, cast, wrong, done = {}, {}, [], {}
    for name, t in state.items():
        want = expected[name].dtype if name in expected else t.dtype
        if dtype is not None and dtype_kind(want) == "float" and dtype_kind(t.dtype) == "float":
            want = dtype
        if t.dtype == want:
            out[name] = t
        elif dtype_kind(t.dtype) != dtype_kind(want):
            wrong.append(f"{clip_name(name)}: {str(t.dtype).removeprefix('torch.')} in the file, the model holds "
                         f"{str(want).removeprefix('torch.')}")
        else:
            if id(t) not in done:
                done[id(t)] = t.to(want)
            out[name] = done[id(t)]
            if dtype is None or dtype_kind(want) != "float":
                cast.setdefault((t.dtype, want), []).append(name)
    if wrong:
        more = f"\n  ... and {len(wrong) - 12} more" if len(wrong) > 12 else ""
        raise CheckpointError(f"{source}: {len(wrong)} tensor(s) hold values of the wrong kind for this model:\n  "
                              + "\n  ".join(wrong[:12]) + more + "\n    fix: the file was changed or made for another "
                              "model; save or download it again")
    for (a, b), names in cast.items():
        report.notes.append(f"cast {len(names)} tensor(s) from {str(a).removeprefix('torch.')} to "
                            f"{str(b).removeprefix('torch.')}, the model's dtype (as transformers does): "
                            f"{shown_names(names, 5)}")
    return out


def _has_nonfinite(t: Tensor) -> bool:
    """NaN or Inf anywhere in a float tensor. A sum propagates both and needs no tensor-sized temporary (which
    would grow the heap during a load); only a sum that overflowed on finite values needs the exact check."""
    if not t.is_floating_point() or t.numel() == 0:
        return False
    return not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all())


def _is_meta(model, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    t = getattr(module, attr, None)
    return isinstance(t, Tensor) and t.device.type == "meta"


JSON_LIMIT = 64 << 20  # bytes: metadata is small; the shard index of a very large model is a few MB
JSON_DEPTH = 64  # levels of nesting: no checkpoint's metadata comes near it
AGAIN = "save or download the folder again"


def field_error(path: Path | str, field: str, message: str, *, given: object = None, expected: str = "",
                fix: str = AGAIN, cls: type = CheckpointError) -> CheckpointError:
    """One problem with one field of a metadata file: the file is the source, the field the problem's path (clipped:
    the keys of a corrupted file can be any strings)."""
    field = field if len(field) <= 120 else field[:100] + "..."
    return cls([Problem(field, message, given=given, expected=expected, fix=fix)], source=str(path))


def read_json(path: Path, *, limit: int = JSON_LIMIT, wide: tuple[str, ...] = ()) -> object:
    """A JSON file as Python data. Anything but a regular file of UTF-8 JSON, under ``limit`` bytes and
    ``JSON_DEPTH`` levels, with finite numbers and integers that fit 64 bits (but for the top-level keys ``wide``),
    is a ``CheckpointError`` that names the file (and the field)."""
    fix = f"\n    fix: {AGAIN}"
    if not path.is_file():
        what = "is missing" if not path.exists() and not path.is_symlink() else "is not a regular file"
        raise CheckpointError(f"{path}: {what}\n    expected: a JSON file{fix}")
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc}){fix}") from None
    if len(raw) > limit:
        raise CheckpointError(f"{path}: larger than {limit >> 20} MiB, too large for checkpoint metadata{fix}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {short(raw[exc.start:exc.start + 4])} at offset "
                              f"{exc.start}){fix}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: nested deeper than {JSON_DEPTH} levels{fix}") from None
    except ValueError as exc:  # JSONDecodeError (with line and column), or an integer of too many digits
        raise CheckpointError(f"{path}: not valid JSON ({short(str(exc), 160)}){fix}") from None
    _check_json_values(path, data, wide)
    return data


def _check_json_values(path: Path, data: object, wide: tuple[str, ...] = ()) -> None:
    """Refuse NaN and infinities (not JSON), integers beyond 64 bits, and nesting beyond ``JSON_DEPTH``."""
    todo = [("", data, 0)]
    while todo:
        where, value, depth = todo.pop()
        if isinstance(value, dict):
            items = ((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
        else:
            items = ()
            if isinstance(value, float) and not math.isfinite(value):
                raise field_error(path, where, "not a JSON number", given=value, expected="a finite number")
            if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64 \
                    and where not in wide:
                raise field_error(path, where, "an integer beyond 64 bits", given=value,
                                  expected="an integer that fits 64 bits")
        if isinstance(value, (dict, list)) and depth >= JSON_DEPTH:
            raise field_error(path, where, f"nested deeper than {JSON_DEPTH} levels", given=value,
                              expected="checkpoint metadata (a few levels deep)")
        todo.extend((w, v, depth + 1) for w, v in items)


def read_json_mapping(path: Path, *, what: str = "a JSON mapping") -> dict:
    """``read_json`` for a file that must hold a mapping (every metadata file does)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds {_described(data)}\n    expected: {what}\n"
                              f"    fix: {AGAIN}")
    return data


def _described(value: object) -> str:
    return "null" if value is None else f"{_kind_of(value)} {short(value)}"


def _kind_of(value: object) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def checked_splice_config(folder: Path, verify: bool) -> dict:
    """``splice.json``: its format, a version this splice reads, a resolved spec, and the files it lists."""
    path = folder / SPLICE_CONFIG
    config = read_json_mapping(path, what="a mapping with format: splice, a version and a spec")
    if config.get("format") != "splice":
        raise field_error(path, "format", "not a splice config", given=config.get("format"), expected="'splice'",
                          fix="point at a folder written by model.save_pretrained")
    version = config.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise field_error(path, "version", "a format version this splice does not read", given=version,
                          expected=" or ".join(map(str, READABLE_VERSIONS)),
                          fix="load it with the splice release that wrote it, or upgrade splice")
    spec = config.get("spec")
    if not isinstance(spec, dict):
        raise field_error(path, "spec", f"{_kind_of(spec)}, not a resolved spec", given=spec,
                          expected="the resolved spec (a mapping), never a reference to a file or preset",
                          fix="save the model again with model.save_pretrained")
    for role in ("encoder", "decoder"):
        part = spec.get(role)
        if isinstance(part, dict) and part.get("pretrained", False) is not False:
            raise field_error(path, f"spec.{role}.pretrained", "a saved folder holds its own weights",
                              given=part["pretrained"], expected="false",
                              fix="save the model again with model.save_pretrained")
    if version >= 2:
        _check_recorded_files(folder, path, config.get("files"), verify)
    return config


def _check_recorded_files(folder: Path, path: Path, files: object, verify: bool) -> None:
    """The ``files`` record of a version-2 ``splice.json``: every file is there as saved, and no other was added."""
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise field_error(path, "files", f"no record of {WEIGHTS}", given=files,
                          expected=f"a mapping of file name to {{bytes, sha256}} that lists {WEIGHTS}",
                          fix="save the model again")
    verify_files(folder, files, source=str(path), check_hash=verify)
    added = sorted(n for n in SPLICE_FILES - {SPLICE_CONFIG} - set(files) if (folder / n).exists())
    if added:
        raise CheckpointError(
            f"{folder}: {', '.join(added)} not recorded in {SPLICE_CONFIG}: added or changed after the save\n"
            "    fix: remove it, or attach it to the model (model.tokenizer, model.generation_defaults, ...) and "
            "save again")


def checked_generation(path: Path, data: object) -> dict:
    """Generation defaults read from ``path``: a mapping whose options ``generate`` accepts, checked by
    ``GenerationOptions`` (each option's bound, then the bounds between options, as for a one-token prompt), so that
    a bad value is reported at load, naming the file and the option. Other keys are kept as they are."""
    from splice.core.errors import InputError
    from splice.core.generation import GenerationOptions

    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds {_described(data)}\n    expected: a mapping of "
                              f"generation options (max_length, num_beams, ...)\n    fix: {AGAIN}")
    try:
        GenerationOptions.from_mapping(data, unknown="ignore").resolve(prompt_len=1)
    except InputError as exc:
        problem = exc.problems[0]
        option = re.fullmatch(r"generate\((\w+)=\.\.\.\)", problem.path)
        raise field_error(path, option.group(1) if option else problem.path, "not a value generate accepts",
                          given=problem.given, expected=problem.expected,
                          fix=f"correct or remove it in {path.name}, or save the model again") from None
    return data


def check_weights_metadata(weights: Path, meta: dict, version: int) -> None:
    if meta.get("format") != "splice" or meta.get("version") != str(version):
        raise CheckpointError(
            f"{weights}: its metadata says format {short(meta.get('format'))} version {short(meta.get('version'))}, "
            f"but {SPLICE_CONFIG} says splice version {version}\n"
            "    fix: the files do not belong together; save the model again")


def tied_aliases(meta: dict, tensors: dict, source: str) -> dict[str, str]:
    try:
        tied = json.loads(meta.get("tied", "{}"))
    except (ValueError, RecursionError):
        tied = None
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise CheckpointError(f"{source}: metadata `tied` is not a mapping of tensor names (given "
                              f"{short(meta.get('tied'))})\n    fix: save the model again")
    for alias, original in tied.items():
        if alias in tensors:
            raise CheckpointError(f"{source}: metadata ties {short(alias)} to {short(original)}, but the file holds "
                                  f"a tensor {short(alias)} of its own\n    fix: save the model again")
        if original not in tensors:
            raise CheckpointError(f"{source}: metadata ties {short(alias)} to {short(original)}, which is not in "
                                  "the file\n    fix: save the model again")
    return tied


def load_tokenizer(folder: Path):
    """The folder's tokenizer: tokenizer.json, or the vocab files of GPT-2/RoBERTa (vocab.json + merges.txt) or
    BERT (vocab.txt) layouts, or a sentencepiece model alone (XLM-R's sentencepiece.bpe.model, T5's spiece.model).
    None when there is none."""
    if (folder / "tokenizer.json").exists():
        return _tokenizer_from(folder / "tokenizer.json", lambda: _tokenizers().Tokenizer.from_file(
            str(folder / "tokenizer.json")))
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return _tokenizer_from(folder / "vocab.json", lambda: _tokenizers().implementations.ByteLevelBPETokenizer(
            str(folder / "vocab.json"), str(folder / "merges.txt"))._tokenizer, also="merges.txt")
    if (folder / "vocab.txt").exists():
        cfg = folder / "tokenizer_config.json"
        lower = _tokenizer_options(folder).get("do_lower_case", True)
        if not isinstance(lower, bool):
            raise field_error(cfg, "do_lower_case", "not a boolean", given=lower, expected="true or false")
        return _tokenizer_from(folder / "vocab.txt", lambda: _tokenizers().implementations.BertWordPieceTokenizer(
            str(folder / "vocab.txt"), lowercase=lower)._tokenizer)
    for name, default in SENTENCEPIECE_FILES.items():
        if (folder / name).exists():
            return _sentencepiece_tokenizer(folder / name, default)
    return None


def _tokenizer_options(folder: Path) -> dict:
    """The folder's tokenizer_config.json ({} when there is none). Its model_max_length may be transformers'
    "no limit", 10**30, beyond 64 bits."""
    cfg = folder / "tokenizer_config.json"
    if not cfg.exists():
        return {}
    data = read_json(cfg, wide=("model_max_length",))
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: holds {_described(data)}\n    expected: a JSON mapping\n    fix: {AGAIN}")
    return data


# a sentencepiece model alone (no tokenizer.json) -> the tokenizer class it belongs to when tokenizer_config.json
# does not say: XLM-R's file name (TrOCR-small, Donut) and T5's
SENTENCEPIECE_FILES = {"sentencepiece.bpe.model": "XLMRobertaTokenizer", "spiece.model": "T5Tokenizer"}


def _sentencepiece_tokenizer(path: Path, default: str):
    """A tokenizer given only as a sentencepiece model, converted as transformers 5 converts it for the folder's
    tokenizer class (tokenizer_config.json's ``tokenizer_class``, else the file name's)."""
    from splice.core.sentencepiece_files import SPM_CLASSES, spm_tokenizer

    cfg = path.parent / "tokenizer_config.json"
    options = _tokenizer_options(path.parent)
    cls = options.get("tokenizer_class") or default
    name = cls.removesuffix("Fast") if isinstance(cls, str) else cls
    if name not in SPM_CLASSES:
        raise field_error(cfg, "tokenizer_class", f"splice converts {path.name} only for "
                          f"{' and '.join(SPM_CLASSES)}", given=cls, expected=" or ".join(map(repr, SPM_CLASSES)),
                          fix="save the tokenizer as tokenizer.json with transformers (AutoTokenizer.from_pretrained("
                          f"folder).save_pretrained(folder)), or remove {path.name} to load the model without it")
    return _tokenizer_from(path, lambda: spm_tokenizer(path.read_bytes(), name, options))


def _tokenizers():
    import tokenizers
    import tokenizers.implementations

    return tokenizers


TOKENIZER_LIMIT = 1 << 30  # bytes: the largest released tokenizer.json files are tens of MB


def _tokenizer_from(path: Path, read, *, also: str = ""):
    """``read()``, with the tokenizers library's errors for a corrupted or foreign file as a CheckpointError."""
    if not path.is_file() or also and not (path.parent / also).is_file():
        raise CheckpointError(f"{path}{' or ' + also if also else ''}: not a regular file\n"
                              "    fix: save or download the tokenizer files again")
    if path.stat().st_size > TOKENIZER_LIMIT:
        raise CheckpointError(f"{path}: larger than {TOKENIZER_LIMIT >> 30} GiB, too large for a tokenizer\n"
                              "    fix: save or download the tokenizer files again")
    try:
        return read()
    except BaseException as exc:  # the library's own errors, and a Rust panic (a BaseException)
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        raise CheckpointError(f"{path}: cannot be read as a tokenizer ({type(exc).__name__}: {short(str(exc), 300)})"
                              "\n    fix: save or download the tokenizer files again, or remove them (the model then "
                              "has no tokenizer)") from None

"""Saving and loading: splice folders, and folders written by transformers.

safetensors only for splice's own files (no pickle). Models are built with parameters on the meta device and
the tensors are assigned from the file, so loading holds about one copy of the weights. Saves are atomic: the
files are written to a temp folder beside the target, which then replaces the target in a rename.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from splice.core.errors import CheckpointError
from splice.core.files import describe_files, inside, verify_files, write_folder
from splice.core.processing import ImageProcessor

SPLICE_CONFIG = "splice.json"
WEIGHTS = "model.safetensors"
GENERATION = "generation.json"  # generation defaults (max_length, num_beams, ...) saved with the model
FORMAT_VERSION = 2  # 2: splice.json records each file's size and SHA-256
READABLE_VERSIONS = (1, 2)


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
        return "".join(f"  {f} ({len(getattr(self, f))}): {', '.join(getattr(self, f)[:20])}\n"
                       for f in fields if getattr(self, f))


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
        if model.generation_defaults:
            (tmp / GENERATION).write_text(json.dumps(model.generation_defaults, indent=2) + "\n")
        from splice.core.processing import processor_for

        processor_for(model).save(tmp)
        if getattr(model, "tokenizer", None) is not None:
            (tmp / "tokenizer.json").write_text(model.tokenizer.to_str())
        for name, data in extra.items():
            (tmp / name).write_bytes(data)
        config = {"format": "splice", "version": FORMAT_VERSION, "spec": model.spec, "files": describe_files(tmp)}
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


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, offsets) and where its data starts, checked against
    the file's size so a truncated or corrupted file is reported with the tensor it breaks."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found\n    fix: check the checkpoint folder")
    size = path.stat().st_size
    bad = "\n    fix: the file is truncated or corrupted; save or download it again"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a readable safetensors file (only {size} bytes){bad}")
        n = int.from_bytes(raw, "little")
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: not a readable safetensors file (header length {n} > file size {size}){bad}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file (header is not JSON: {exc}){bad}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (header is not a mapping){bad}")
    start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype = _DTYPES[info["dtype"]]
            count = 1
            for d in info["shape"]:
                count *= d
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}{bad}") from None
        if end - begin != count * torch.empty(0, dtype=dtype).element_size():
            raise CheckpointError(f"{path}: tensor {name!r}: its byte range does not match shape {info['shape']}{bad}")
        if start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {start + end} but the file has {size} bytes{bad}"
            )
    return header, start


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of one file, memory-mapped (pages are read when first used), and its metadata."""
    from safetensors import safe_open

    header, _ = read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(header.get("__metadata__") or {})
    except Exception as exc:  # safetensors' own errors for what the header check let through
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})\n"
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
            raise CheckpointError(f"{path}: tensor {name!r} is cut short ({got} of {end - begin} bytes)")
        return torch.frombuffer(buf, dtype=dtype).view(info["shape"])

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def lazy_weights(folder: Path) -> Mapping[str, Tensor]:
    """A folder's safetensors weights (single file or shards) as ``LazyTensors``; a 4.x ``pytorch_model.bin`` is
    read eagerly (with ``weights_only=True``: never plain pickle)."""
    index = folder / "model.safetensors.index.json"
    if (folder / WEIGHTS).is_file():
        return LazyTensors([folder / WEIGHTS])
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no `weight_map` mapping of tensor names to shard files\n"
                                  "    fix: download the whole checkpoint again")
        shards = sorted(set(weight_map.values()), key=str)
        for shard in shards:  # every shard is a file of this folder, never a path elsewhere
            inside(folder, shard, what=f"{index}: weight_map")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard(s) {', '.join(missing)} are missing from {folder}\n"
                                  "    fix: download the whole checkpoint again")
        lazy = LazyTensors([folder / s for s in shards])
        absent = sorted(set(weight_map) - set(lazy))
        if absent:
            raise CheckpointError(f"{index}: tensors listed in the index are not in their shards: {', '.join(absent[:10])}")
        return lazy
    binary = folder / "pytorch_model.bin"
    if binary.is_file():
        try:
            try:
                return torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # legacy (pre-zip) files cannot be memory-mapped: read them whole
                    raise
                return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{binary}: cannot read it safely ({exc})\n    fix: convert it to safetensors") from None
    raise CheckpointError(
        f"{folder}: no weights found (looked for {WEIGHTS}, model.safetensors.index.json, pytorch_model.bin)"
    )


def read_weights(folder: Path) -> dict[str, Tensor]:
    """A folder's weights, all read: model.safetensors, a sharded index, or (transformers 4.x) pytorch_model.bin."""
    return dict(lazy_weights(folder))


# -- loading into a model ------------------------------------------------------------------------------------


def assign_weights(model, state: dict[str, Tensor], *, source: str, strict: bool = True, dtype: torch.dtype | None = None,
                   unused: Iterable[str] = (), expected_new: Iterable[str] = (), fresh=None) -> LoadReport:
    """Assign tensors into a (meta-built) model by name, checking every shape; report what happened.

    ``expected_new`` names weights the file is not meant to have (new cross-attention); they, and with
    ``strict=False`` any other missing weight, are taken from ``fresh()`` (a randomly initialised model).
    """
    report = LoadReport(source=source, unused=sorted(unused))
    expected = model.state_dict()
    mismatched = [
        f"{name}: file {tuple(t.shape)}, model {tuple(expected[name].shape)}"
        for name, t in state.items()
        if name in expected and tuple(expected[name].shape) != tuple(t.shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"{source}: {len(mismatched)} tensor(s) have the wrong shape for this model:\n  "
            + "\n  ".join(mismatched)
            + "\n    fix: the checkpoint was made for a different configuration; check the config against the weights"
        )
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    # by name, not torch's unexpected_keys: torch passes over tensors under an empty module slot (a decoder layer
    # without cross-attention), which would drop them without a word
    report.unexpected = sorted(set(state) - set(expected))
    report.nonfinite = sorted(k for k, t in state.items() if k in expected and _has_nonfinite(t))
    result = model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    new = set(expected_new)
    report.missing = sorted(k for k in result.missing_keys if k not in new and _is_meta(model, k))
    report.loaded = sorted(set(state) - set(report.unexpected))
    if strict and (report.missing or report.unexpected or report.nonfinite):
        raise CheckpointError(
            f"{source}: the weights do not match the model\n" + report.listing("missing", "unexpected", "nonfinite")
            + "    fix: check that the folder's config and weights belong together (or load with strict=False, "
            "which reports them)"
        )
    if report.nonfinite:
        import warnings

        warnings.warn(f"{source}: {len(report.nonfinite)} weight(s) hold NaN or Inf: "
                      f"{', '.join(report.nonfinite[:10])}", stacklevel=3)
    todo = sorted(k for k in result.missing_keys if _is_meta(model, k))
    if todo:
        assert fresh is not None, "missing weights but no way to initialise them"
        init = fresh().state_dict()
        model.load_state_dict({k: init[k] for k in todo}, strict=False, assign=True)
        report.initialised = todo
    from splice.core.composer import init_meta_buffers

    init_meta_buffers(model)
    if dtype is not None:
        model.to(dtype)
    return report


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


def load(path: str | os.PathLike, *, dtype: torch.dtype | None = None, strict: bool = True, revision: str | None = None,
         verify: bool = True):
    """A model from a splice folder, a transformers VisionEncoderDecoder folder, or a hub repo id.

    ``verify=False`` skips the SHA-256 check of a splice folder's files (sizes are still checked)."""
    folder = resolve_folder(path, revision=revision)
    if (folder / SPLICE_CONFIG).is_file():
        return _load_splice(folder, dtype=dtype, strict=strict, verify=verify)
    config_file = folder / "config.json"
    if config_file.is_file():
        from splice.core import transformers_format

        return transformers_format.load_ved(folder, dtype=dtype, strict=strict)
    raise CheckpointError(
        f"{folder}: neither {SPLICE_CONFIG} (a splice folder) nor config.json (a transformers folder) is here\n"
        "    fix: point at a folder written by model.save_pretrained or by transformers"
    )


def resolve_folder(path: str | os.PathLike, *, revision: str | None = None) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: expected a folder, got a file\n    fix: give the folder that holds it")
    text = str(path)
    first = text.split("/")[0]
    # `owner/name` is a hub repo id unless `owner` is a local folder (then it is a missing local path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(first).is_dir():
        from huggingface_hub import snapshot_download

        try:
            # only what splice reads: not TensorFlow/Flax weights or other large extras
            patterns = ["*.json", "*.safetensors", "*.txt", "pytorch_model*.bin", "*.model"]
            return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
        except Exception as exc:
            raise CheckpointError(
                f"{text!r} is not a local folder and the hub could not provide it ({type(exc).__name__}: {exc})\n"
                "    fix: check the path or repo id; offline, download it first (HF_HUB_OFFLINE=1 uses the cache)"
            ) from None
    raise CheckpointError(f"{p}: no such folder\n    fix: check the path")


def read_json(path: Path) -> object:
    """A JSON file as Python data; unreadable or malformed JSON is a ``CheckpointError`` naming the file."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})\n"
                              "    fix: save or download the folder again") from None


def _checked_splice_config(folder: Path, verify: bool) -> dict:
    """``splice.json``: its format, a version this splice reads, a resolved spec, and the files it lists."""
    path = folder / SPLICE_CONFIG
    config = read_json(path)
    if not isinstance(config, dict) or config.get("format") != "splice" or "spec" not in config:
        raise CheckpointError(f"{path}: not a splice config (expected a mapping with format: splice and a spec)\n"
                              "    fix: point at a folder written by model.save_pretrained")
    version = config.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: format version {str(version)[:40]!r}; this splice reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}\n    fix: load it with the splice release that wrote it, "
            "or upgrade splice")
    spec = config["spec"]
    if not isinstance(spec, dict):
        raise CheckpointError(
            f"{path}: spec is {type(spec).__name__} {str(spec)[:80]!r}; expected the resolved spec (a mapping), "
            "never a reference to a file or preset\n    fix: save the model again with model.save_pretrained")
    for role in ("encoder", "decoder"):
        part = spec.get(role)
        if isinstance(part, dict) and part.get("pretrained", False) is not False:
            raise CheckpointError(
                f"{path}: spec.{role}.pretrained is {str(part['pretrained'])[:80]!r}; a saved folder holds its own "
                "weights, so it must be false\n    fix: save the model again with model.save_pretrained")
    if version >= 2:
        files = config.get("files")
        if not isinstance(files, dict) or WEIGHTS not in files:
            raise CheckpointError(f"{path}: no record of {WEIGHTS} under `files`\n    fix: save the model again")
        verify_files(folder, files, source=str(path), check_hash=verify)
        added = sorted(n for n in SPLICE_FILES - {SPLICE_CONFIG} - set(files) if (folder / n).exists())
        if added:
            raise CheckpointError(
                f"{folder}: {', '.join(added)} not recorded in {SPLICE_CONFIG}: added or changed after the save\n"
                "    fix: remove it, or attach it to the model (model.tokenizer, model.generation_defaults, ...) and "
                "save again")
    return config


def _tied_aliases(meta: dict, tensors: dict, source: str) -> dict[str, str]:
    try:
        tied = json.loads(meta.get("tied", "{}"))
    except ValueError:
        tied = None
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise CheckpointError(f"{source}: metadata `tied` is not a mapping of tensor names\n    fix: save the model again")
    for alias, original in tied.items():
        if alias in tensors:
            raise CheckpointError(f"{source}: metadata ties {alias!r} to {original!r}, but the file holds a tensor "
                                  f"{alias!r} of its own\n    fix: save the model again")
        if original not in tensors:
            raise CheckpointError(f"{source}: metadata ties {alias!r} to {original!r}, which is not in the file\n"
                                  "    fix: save the model again")
    return tied


def _load_splice(folder: Path, *, dtype, strict: bool, verify: bool = True):
    from splice.core.composer import validate

    config = _checked_splice_config(folder, verify)
    plan = validate(config["spec"])
    if not plan.ok:  # e.g. the plugin that provides a component is not installed here
        from splice.core.errors import error_for

        raise error_for(plan.problems, source=str(folder / SPLICE_CONFIG))
    model = plan.meta_model
    from splice.core.composer import assemble

    weights = folder / WEIGHTS
    tensors, meta = read_safetensors(weights)
    if meta.get("format") != "splice" or meta.get("version") != str(config["version"]):
        raise CheckpointError(
            f"{weights}: its metadata says format {meta.get('format')!r} version {meta.get('version')!r}, but "
            f"{SPLICE_CONFIG} says splice version {config['version']}\n"
            "    fix: the files do not belong together; save the model again")
    for alias, original in _tied_aliases(meta, tensors, str(weights)).items():
        tensors[alias] = tensors[original]
    model.loading_report = assign_weights(model, tensors, source=str(weights), strict=strict, dtype=dtype,
                                          fresh=lambda: assemble(plan))
    gen_file = folder / GENERATION
    model.generation_defaults = read_json(gen_file) if gen_file.is_file() else {}
    model.tokenizer = load_tokenizer(folder)
    model.image_processor = ImageProcessor.from_folder(folder)
    return model.eval()


def load_tokenizer(folder: Path):
    """The folder's tokenizer: tokenizer.json, or the vocab files of GPT-2/RoBERTa (vocab.json + merges.txt) or
    BERT (vocab.txt) layouts. None when there is none."""
    from tokenizers import Tokenizer

    try:
        if (folder / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            from tokenizers.implementations import ByteLevelBPETokenizer

            return ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))._tokenizer
        if (folder / "vocab.txt").is_file():
            from tokenizers.implementations import BertWordPieceTokenizer

            lower = True
            cfg = folder / "tokenizer_config.json"
            if cfg.is_file():
                lower = json.loads(cfg.read_text()).get("do_lower_case", True)
            return BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)._tokenizer
    except Exception as exc:
        raise CheckpointError(f"{folder}: the tokenizer files cannot be read ({type(exc).__name__}: {exc})") from None
    return None

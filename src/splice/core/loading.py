"""Loading: a folder (splice's own or transformers') or a hub id becomes a model.

The top of the checkpoint layers. The formats below it (``checkpoint`` for splice folders and the safetensors
bytes, ``transformers_format`` for transformers folders) read and check files; this module resolves the source,
plans the model with the composer, assigns the weights and finishes every format with the same tail (report,
generation defaults, tokenizer, processor). Nothing below imports it.
"""

from __future__ import annotations

import dataclasses

import os
from pathlib import Path

import torch

from splice.core.checkpoint import (GENERATION, SPLICE_CONFIG, WEIGHTS, LoadReport, check_weights_metadata,
                                    checked_splice_config, tied_aliases, assign_weights, checked_generation, field_error,
                                    lazy_weights, load_tokenizer, read_json, read_safetensors,
                                    shown_names, weights_file)
from splice.core.composer import assemble, validate
from splice.core.errors import CheckpointError, ConfigError, error_for, short
from splice.core.kinds import DEFAULT_KIND, TransformersFormat
from splice.core.plugins import get_registry
from splice.core.processing import ImageProcessor
from splice.core.roles import unchecked
from splice.core.sources import fetch, parse
from splice.core.transformers_format import generation_options


def load(path: str | os.PathLike, *, dtype: torch.dtype | None = None, strict: bool = True, revision: str | None = None,
         verify: bool = True):
    """A model from a splice folder, a transformers folder a registered kind reads (VisionEncoderDecoder, ...), or
    a hub repo id.

    ``verify=False`` skips the SHA-256 check of a splice folder's files (sizes are still checked)."""
    folder = resolve_folder(path, revision=revision)
    if (folder / SPLICE_CONFIG).exists():
        return load_splice(folder, dtype=dtype, strict=strict, verify=verify)
    if (folder / "config.json").exists():
        return load_transformers(folder, dtype=dtype, strict=strict)
    raise CheckpointError(
        f"{folder}: neither {SPLICE_CONFIG} (a splice folder) nor config.json (a transformers folder) is here\n"
        "    fix: point at a folder written by model.save_pretrained or by transformers"
    )


def resolve_folder(path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """The folder a ``load`` reads: a local folder, or the hub snapshot of ``owner/name[@revision]``."""
    source = parse(path, revision=revision, what="cannot load")
    if source.path is not None and not source.path.is_dir():
        raise CheckpointError(f"{short(source.text, 300)}: expected a folder, got a file\n"
                              "    fix: give the folder that holds it")
    if source.path is None and source.repo is None:
        raise CheckpointError(f"{short(source.text, 300)}: no such folder\n    fix: check the path")
    return fetch(source, what="cannot load")


def load_splice(folder: Path, *, dtype, strict: bool, verify: bool = True):
    """A splice folder: every metadata file and the weights' header are checked before anything is built."""
    config = checked_splice_config(folder, verify)
    gen_file = folder / GENERATION
    generation = checked_generation(gen_file, read_json(gen_file)) if gen_file.exists() else {}
    weights = folder / WEIGHTS
    tensors, meta = read_safetensors(weights)
    check_weights_metadata(weights, meta, config["version"])
    for alias, original in tied_aliases(meta, tensors, str(weights)).items():
        tensors[alias] = tensors[original]
    with unchecked():  # the tensors are checked against the model below
        plan = validate(config["spec"])
    if not plan.ok:  # e.g. the plugin that provides a component is not installed here
        raise error_for(_with_packages(plan.problems, config.get("components")), source=str(folder / SPLICE_CONFIG))
    model = plan.meta_model
    report = assign_weights(model, tensors, source=str(weights), strict=strict, dtype=dtype,
                            fresh=lambda: assemble(plan), config=SPLICE_CONFIG)
    return _finish(model, report, generation, folder)


def _with_packages(problems: list, components: object) -> list:
    """Problems of unknown components, with the fix naming the package that provided each when it was saved
    (``splice.json``'s ``components``)."""
    if not isinstance(components, dict):
        return problems
    out = []
    for p in problems:
        role = p.path.split(".")[0] if p.path.endswith(".name") or p.path.endswith(".kind") else None
        info = components.get(role) if p.error == "unknown" else None
        package = info.get("package") if isinstance(info, dict) else None
        if isinstance(package, str) and package:
            version = info.get("version")
            pin = f"{package}=={version}" if isinstance(version, str) and version else package
            p = dataclasses.replace(p, fix=f'pip install "{pin}": this folder was saved with {info.get("kind")} '
                                    f'{info.get("name")!r} from plugin {info.get("plugin")!r} of that package; '
                                    f"{p.fix}")
        out.append(p)
    return out


def load_transformers(folder: Path, *, dtype: torch.dtype | None = None, strict: bool = True):
    """A folder written by transformers, in a layout a registered kind reads (``Kind.formats``, matched on
    ``model_type`` / ``architectures``): config.json, generation_config.json and the weights' headers are checked
    before anything is built."""
    config_file = folder / "config.json"
    config = read_json(config_file)
    fmt = format_for(config, str(config_file))
    spec, generation = fmt.spec_from_config(config, str(config_file))
    gen_file = folder / "generation_config.json"
    if gen_file.exists():
        generation.update(generation_options(gen_file))
    source = str(weights_file(folder))
    tensors = lazy_weights(folder)  # read one tensor at a time, so converted originals are freed as we go
    with unchecked():  # the tensors are checked against the model below
        plan = validate(spec)
    if not plan.ok:
        raise ConfigError(plan.problems, source=f"{config_file} (as a splice spec)")
    model = plan.meta_model
    state, unused, unexpected, notes = fmt.split_state(source, tensors, plan, config)
    if strict and unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} tensor(s) have no place in the model that config.json "
            f"describes: {shown_names(sorted(unexpected), 10)}\n"
            "    fix: check that config.json and the weights belong together (a layer count, a size), or load "
            "with strict=False, which lists them as unexpected")
    report = assign_weights(model, state, source=source, strict=strict, dtype=dtype, unused=unused,
                            fresh=lambda: assemble(plan), config="config.json")
    report.notes = notes + report.notes
    report.unexpected = sorted(set(report.unexpected) | set(unexpected))
    return _finish(model, report, generation, folder)


def format_for(config: object, source: str) -> TransformersFormat:
    """The registered transformers layout that reads this ``config.json`` (by model_type, then architectures)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: holds {short(config)}\n    expected: a JSON mapping (a transformers "
                              "config)\n    fix: save or download the folder again")
    formats = [f for k in get_registry().entries("kind") for f in k.impl.formats if f.spec_from_config is not None]
    for fmt in formats:
        if fmt.reads(config):
            return fmt
    known = sorted({t for f in formats for t in f.model_types})
    raise field_error(source, "model_type", f"no composition kind reads this layout ({', '.join(sorted(f.name for f in formats))} "
                      "are read)", given=config.get("model_type"), expected=" or ".join(map(repr, known)),
                      fix="splice.load reads splice folders and the transformers layouts above; a plugin can "
                      "register a kind that reads more")


def export_transformers(model, path) -> None:
    """Write ``model`` in the transformers layout its kind exports (the first of ``Kind.formats`` with an
    ``export``); a kind without one is a ``CheckpointError``."""
    spec = getattr(model, "spec", None)
    name = spec.get("kind", DEFAULT_KIND) if isinstance(spec, dict) else None
    registry = get_registry()
    if not isinstance(name, str) or not registry.has("kind", name):
        raise CheckpointError(f"cannot export a {type(model).__name__}: it is not a model splice composed or loaded "
                              "(no `spec` naming a registered kind)\n    fix: export a model from splice.compose "
                              "or splice.load")
    fmt = next((f for f in registry.get("kind", name).impl.formats if f.export is not None), None)
    if fmt is None:
        raise CheckpointError(f"the {name!r} kind has no transformers layout to export to\n"
                              "    fix: save with model.save_pretrained (splice's own format) instead")
    fmt.export(model, path)


def _finish(model, report: LoadReport, generation: dict, folder: Path):
    """The one load tail of every format: the report, the generation defaults, the tokenizer, the processor."""
    model.loading_report = report
    model.generation_defaults = generation
    model.tokenizer = load_tokenizer(folder)
    model.image_processor = ImageProcessor.from_folder(folder)
    return model.eval()

"""Loading: a folder (splice's own or transformers') or a hub id becomes a model.

The top of the checkpoint layers. The formats below it (``checkpoint`` for splice folders and the safetensors
bytes, ``transformers_format`` for transformers folders) read and check files; this module resolves the source,
plans the model with the composer, assigns the weights and finishes every format with the same tail (report,
generation defaults, tokenizer, processor). Nothing below imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from splice.core.checkpoint import (GENERATION, SPLICE_CONFIG, WEIGHTS, LoadReport, check_weights_metadata,
                                    checked_splice_config, tied_aliases, assign_weights, checked_generation,
                                    lazy_weights, load_tokenizer, read_json, read_safetensors,
                                    shown_names, weights_file)
from splice.core.composer import assemble, validate
from splice.core.errors import CheckpointError, ConfigError, error_for, short
from splice.core.processing import ImageProcessor
from splice.core.sources import fetch, parse
from splice.core.transformers_format import generation_options, split_state, spec_from_ved_config


def load(path: str | os.PathLike, *, dtype: torch.dtype | None = None, strict: bool = True, revision: str | None = None,
         verify: bool = True):
    """A model from a splice folder, a transformers VisionEncoderDecoder folder, or a hub repo id.

    ``verify=False`` skips the SHA-256 check of a splice folder's files (sizes are still checked)."""
    folder = resolve_folder(path, revision=revision)
    if (folder / SPLICE_CONFIG).exists():
        return load_splice(folder, dtype=dtype, strict=strict, verify=verify)
    if (folder / "config.json").exists():
        return load_ved(folder, dtype=dtype, strict=strict)
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
    plan = validate(config["spec"])
    if not plan.ok:  # e.g. the plugin that provides a component is not installed here
        raise error_for(plan.problems, source=str(folder / SPLICE_CONFIG))
    model = plan.meta_model
    report = assign_weights(model, tensors, source=str(weights), strict=strict, dtype=dtype,
                            fresh=lambda: assemble(plan), config=SPLICE_CONFIG)
    return _finish(model, report, generation, folder)


def load_ved(folder: Path, *, dtype: torch.dtype | None = None, strict: bool = True):
    """A transformers VisionEncoderDecoder folder: config.json, generation_config.json and the weights' headers
    are checked before anything is built."""
    config_file = folder / "config.json"
    config = read_json(config_file)
    spec, generation = spec_from_ved_config(config, source=str(config_file))
    gen_file = folder / "generation_config.json"
    if gen_file.exists():
        generation.update(generation_options(gen_file))
    source = str(weights_file(folder))
    tensors = lazy_weights(folder)  # read one tensor at a time, so converted originals are freed as we go
    plan = validate(spec)
    if not plan.ok:
        raise ConfigError(plan.problems, source=f"{config_file} (as a splice spec)")
    model = plan.meta_model
    state, unused, unexpected, notes = split_state(source, tensors, plan, config)
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


def _finish(model, report: LoadReport, generation: dict, folder: Path):
    """The one load tail of every format: the report, the generation defaults, the tokenizer, the processor."""
    model.loading_report = report
    model.generation_defaults = generation
    model.tokenizer = load_tokenizer(folder)
    model.image_processor = ImageProcessor.from_folder(folder)
    return model.eval()

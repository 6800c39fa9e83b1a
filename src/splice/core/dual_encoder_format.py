"""Folders written by transformers' ``VisionTextDualEncoderModel.save_pretrained``, read (and written) without
transformers: the ``dual-encoder`` kind's layout.

On disk: ``vision_model.*`` (the vision model with its pooler), ``text_model.*`` (BertModel / RobertaModel, pooler
included), ``visual_projection.weight``, ``text_projection.weight`` and ``logit_scale``. Each tower's tensors go
through its plugin's ``HFInterop``; the ViT/DeiT pooler (``vision_model.pooler.dense``) fills the model's
``vision_pooler``, and the projections and ``logit_scale`` are copied as they are. A CLIP vision tower
(``clip_vision_model``: transformers builds a ``CLIPVisionModel`` for it) keeps its ``post_layernorm`` inside the
encoder, whose ``pooler_output`` is the image vector, as transformers' ``vision_outputs[1]``. This module reads the
planned model's attributes only, so it does not import the kind (``splice.kinds.dual_encoder``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from splice.core.checkpoint import LazyTensors, field_error
from splice.core.errors import CheckpointError, ConfigError, Problem, short
from splice.core.files import write_folder
from splice.core.plugins import get_registry
from splice.core.transformers_format import map_part, part_config_from_hf

MODEL_TYPE = "vision-text-dual-encoder"
ARCHITECTURE = "VisionTextDualEncoderModel"
# what export_dual_encoder writes: a folder holding only these (and config.json) may be replaced by a new export
EXPORT_FILES = frozenset({"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"})
TOWERS = (("vision", "vision_model", "vision_config", "encoder"), ("text", "text_model", "text_config", "text_encoder"))
POOLER = {"pooler.dense.weight": "vision_pooler.weight", "pooler.dense.bias": "vision_pooler.bias"}
# the kind's pooling rules that are transformers' ``pooler_output`` only for some vision families: the mean of the
# tokens (Swin's), and the encoder's own ``pooler_output`` (CLIP's post-layernormed class token). The kind's other
# rules (ViT/DeiT's dense pooler, BEiT's head) are each their family's own.
SAME_POOLING = {"mean": ("swin", "donut_swin"), "own": ("clip_vision",)}
POOLING_WORDS = {"mean": "the mean of its tokens", "own": "its own pooler_output"}


def spec_from_dual_config(config: dict, source: str = "config.json") -> tuple[dict, dict]:
    """A ``dual-encoder`` spec for a transformers VisionTextDualEncoder ``config.json`` (no generation defaults)."""
    _check_config(config, source)
    registry = get_registry()
    spec: dict = {"kind": "dual-encoder"}
    problems = []
    for role, _, key, kind in TOWERS:
        sub = config[key]
        entry = registry.by_hf_model_type(kind, sub["model_type"])
        if entry is None:
            known = sorted({t for e in registry.entries(kind) if e.hf for t in e.hf.model_types})
            problems.append(Problem(f"{key}.model_type", f"no splice {kind.replace('_', ' ')} reads this model type",
                                    given=sub["model_type"], expected=f"one of {', '.join(known)}",
                                    fix=f"`splice list --kind {kind}` shows the installed ones; install a plugin that "
                                    "reads it, or write one (docs/writing-a-plugin.md)"))
            continue
        spec[role] = {"name": entry.name, "config": part_config_from_hf(entry, sub, source=source, prefix=f"{key}.")}
    if problems:
        raise ConfigError(problems, source=source)
    for key, field in (("projection_dim", "projection_dim"), ("logit_scale_init_value", "logit_scale_init")):
        if config.get(key) is not None:
            spec[field] = config[key]
    return spec, {}


def _check_config(config: object, source: str) -> None:
    """What splice reads itself: the model type, the two towers' configs, and the ViT pooler's shape."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: holds {short(config)}\n    expected: a JSON mapping (a transformers "
                              "config)\n    fix: save or download the folder again")
    for _, _, key, _ in TOWERS:
        sub = config.get(key)
        if not isinstance(sub, dict) or not isinstance(sub.get("model_type"), str):
            raise field_error(source, key, "not a tower's config with its model_type", given=sub,
                              expected="a mapping with the model_type and settings of the tower",
                              fix="save or download the folder again", cls=ConfigError)
    vision = config["vision_config"]
    act, size = vision.get("pooler_act", "tanh"), vision.get("pooler_output_size")
    if act != "tanh":
        raise field_error(source, "vision_config.pooler_act", "splice's ViT/DeiT pooler is dense + tanh", given=act,
                          expected="'tanh'", fix="use a checkpoint with the default pooler", cls=ConfigError)
    if size is not None and size != vision.get("hidden_size", size):
        raise field_error(source, "vision_config.pooler_output_size", "the pooler must keep the vision width "
                          "(the projection reads hidden_size)", given=size, expected=vision.get("hidden_size"),
                          fix="remove pooler_output_size", cls=ConfigError)


class _Without(Mapping):
    """A mapping of tensors with some names left out (read lazily when the original is lazy)."""

    def __init__(self, tensors: Mapping, left_out: set[str]):
        self._tensors, self._left_out = tensors, left_out

    def __getitem__(self, name: str):
        if name in self._left_out:
            raise KeyError(name)
        return self._tensors[name]

    def __iter__(self):
        return (k for k in self._tensors if k not in self._left_out)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _group(tensors: Mapping, prefix: str) -> Mapping:
    if isinstance(tensors, LazyTensors):
        return tensors.with_prefix(f"{prefix}.")
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(f"{prefix}.")}


def split_dual_state(source: str, tensors, plan, config: dict) -> tuple[dict, list[str], list[str], list[str]]:
    """(state in splice's names, unused, unexpected, notes): each tower through its plugin's mapping; the
    projections, ``logit_scale`` and the ViT/DeiT pooler directly."""
    state, unused, unexpected, notes = {}, [], [], []
    for name in tensors:
        head = name.partition(".")[0]
        if name in ("visual_projection.weight", "text_projection.weight", "logit_scale"):
            state[name] = tensors[name]
        elif head not in ("vision_model", "text_model"):
            unexpected.append(name)
    pooled = getattr(plan.meta_model, "vision_pooler", None) is not None
    for part, (role, prefix, key, _) in zip(plan.components(), TOWERS):
        group = _group(tensors, prefix)
        if role == "vision" and pooled:
            state.update({ours: group[hf] for hf, ours in POOLER.items() if hf in group})
            group = _Without(group, set(POOLER))
        mapped, known, other, tower_notes = map_part(source, part, group, config[key], prefix)
        state.update({f"{role}.{k}": v for k, v in mapped.items()})
        unused, unexpected, notes = unused + known, unexpected + other, notes + [f"{role}: {n}" for n in tower_notes]
    return state, unused, unexpected, notes


def _export_blockers(model, entries: dict) -> list[str]:
    blockers = []
    if getattr(model, "logit_bias", None) is not None:
        blockers.append("loss: siglip (its logit_bias has no place in VisionTextDualEncoderModel, whose loss is "
                        "CLIP's)")
    vision = model.spec["vision"]["name"]
    if model.pooling in SAME_POOLING and vision not in SAME_POOLING[model.pooling]:
        blockers.append(f"vision {vision!r} pooled by {POOLING_WORDS[model.pooling]} (transformers' vision model "
                        "of that family pools its own way)")
    for role, entry in entries.items():
        if entry.hf is None or entry.hf.config_to_hf is None or entry.hf.state_dict_to_hf is None:
            blockers.append(f"{role} {entry.name!r} has no transformers counterpart")
    return blockers


def export_dual_encoder(model, path) -> None:
    """Write a folder that transformers' ``VisionTextDualEncoderModel.from_pretrained`` loads with the same
    outputs; what transformers cannot express (a SigLIP bias, a vision encoder it has no model for) raises
    ``CheckpointError`` naming it."""
    from safetensors.torch import save_file

    from splice.core.processing import ImageProcessor, processor_for

    spec, registry = model.spec, get_registry()
    entries = {role: registry.get(kind, spec[role]["name"]) for role, _, _, kind in TOWERS}
    blockers = _export_blockers(model, entries)
    if blockers:
        raise CheckpointError("cannot export to transformers' VisionTextDualEncoder layout:\n  - "
                              + "\n  - ".join(blockers) + "\n    fix: save with model.save_pretrained (splice's own "
                              "format) instead")
    config: dict = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "projection_dim": spec["projection_dim"],
                    "logit_scale_init_value": spec["logit_scale_init"]}
    tensors = {}
    for role, prefix, key, _ in TOWERS:
        entry = entries[role]
        sub = entry.hf.config_to_hf(entry.config_cls(**spec[role]["config"]).model_dump())
        config[key] = sub
        module_sd = getattr(model, role).state_dict()
        tensors.update({f"{prefix}.{k}": v for k, v in entry.hf.state_dict_to_hf(module_sd, sub).items()})
    if model.vision_pooler is not None:
        tensors.update({f"vision_model.{hf}": model.state_dict()[ours] for hf, ours in POOLER.items()})
    tensors.update({name: model.state_dict()[name] for name in ("visual_projection.weight", "text_projection.weight",
                                                               "logit_scale")})
    processor = processor_for(model) or ImageProcessor.from_preprocessing(model.vision.preprocessing)

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        processor.save(tmp)
        if model.tokenizer is not None:
            (tmp / "tokenizer.json").write_text(model.tokenizer.to_str())

    write_folder(path, fill, marker="config.json", owned=EXPORT_FILES, what="transformers export")

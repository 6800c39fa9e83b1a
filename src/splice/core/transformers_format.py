"""Folders written by transformers' ``VisionEncoderDecoderModel.save_pretrained``, read without transformers.

Each component says how to read its transformers weights through its ``HFInterop`` (registered by its plugin);
this module splits the folder's ``config.json`` and tensors between them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from splice.core.checkpoint import LazyTensors, assign_weights, lazy_weights, load_tokenizer, map_from_hf, read_json
from splice.core.errors import CheckpointError, ConfigError
from splice.core.files import write_folder
from splice.core.plugins import get_registry
from splice.core.processing import ImageProcessor

VED_MODEL_TYPE = "vision-encoder-decoder"
# what export_ved writes: a folder holding only these (and config.json) may be replaced by a new export
EXPORT_FILES = frozenset({"config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
                          "tokenizer.json"})


def _first(*values):
    for v in values:
        if v is not None:
            return v[0] if isinstance(v, list) and v else v
    return None


def spec_from_ved_config(config: dict, *, source: str = "config.json") -> tuple[dict, dict]:
    """A composition spec for a transformers VED config, plus the generation defaults it implies."""
    if config.get("model_type") != VED_MODEL_TYPE:
        raise CheckpointError(
            f"{source}: model_type is {config.get('model_type')!r}; expected {VED_MODEL_TYPE!r}\n"
            "    fix: splice.load reads splice folders and transformers VisionEncoderDecoder folders"
        )
    registry = get_registry()
    spec: dict = {"kind": "encoder-decoder", "projection": "auto"}
    for role in ("encoder", "decoder"):
        sub = config.get(role) or {}
        model_type = sub.get("model_type")
        entry = registry.by_hf_model_type(role, model_type)
        if entry is None:
            known = sorted({t for e in registry.entries(role) if e.hf for t in e.hf.model_types})
            raise CheckpointError(
                f"{source}: {role}.model_type {model_type!r} has no splice {role} that reads it "
                f"(supported: {', '.join(known)})\n    fix: install a plugin that registers one"
            )
        try:
            values = entry.hf.config_from_hf(sub)
        except ConfigError as exc:
            raise ConfigError(exc.problems, source=f"{source} ({role})") from None
        spec[role] = {"name": entry.name, "config": values}
    dec = config.get("decoder") or {}
    spec["cross_attention"] = {"kind": "standard", "layers": "all" if dec.get("add_cross_attention", True) else "none"}
    spec["tokens"] = {
        "decoder_start": _first(config.get("decoder_start_token_id"), dec.get("decoder_start_token_id"), dec.get("bos_token_id")),
        "pad": _first(config.get("pad_token_id"), dec.get("pad_token_id")),
        "eos": _first(config.get("eos_token_id"), dec.get("eos_token_id")),
    }
    generation = {}
    eos = config.get("eos_token_id", dec.get("eos_token_id"))
    if isinstance(eos, list):
        generation["eos_token_id"] = eos
    return spec, generation


def load_ved(folder: Path, *, dtype: torch.dtype | None = None, strict: bool = True):
    from splice.core.composer import assemble, validate

    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'}: expected a JSON mapping, got {type(config).__name__}")
    spec, generation = spec_from_ved_config(config, source=str(folder / "config.json"))
    plan = validate(spec)
    if not plan.ok:
        raise ConfigError(plan.problems, source=f"{folder / 'config.json'} (as a splice spec)")
    model = plan.meta_model
    tensors = lazy_weights(folder)  # read one tensor at a time, so converted originals are freed as we go
    state, unused, notes = {}, [], []
    unexpected = []  # unused tensors nobody said to expect: a strict load refuses them
    for name in tensors:
        head = name.partition(".")[0]
        if head == "enc_to_dec_proj":
            state[name] = tensors[name]
        elif head not in ("encoder", "decoder"):
            unexpected.append(name)
    for role, part in (("encoder", plan.encoder), ("decoder", plan.decoder)):
        if isinstance(tensors, LazyTensors):
            group = tensors.with_prefix(f"{role}.")
        else:
            group = {k[len(role) + 1:]: v for k, v in tensors.items() if k.startswith(f"{role}.")}
        mapped, role_unused, role_notes = map_from_hf(part.entry.hf, group, config[role])
        notes.extend(f"{role}: {n}" for n in role_notes)
        state.update({f"{role}.{k}": v for k, v in mapped.items()})
        expected_unused = [re.compile(p) for p in getattr(part.entry.hf, "ignorable", ())]
        for k in role_unused:
            (unused if any(p.fullmatch(k) for p in expected_unused) else unexpected).append(f"{role}.{k}")
    if strict and unexpected:
        raise CheckpointError(
            f"{folder}: {len(unexpected)} tensor(s) in the folder have no place in the model its config.json "
            f"describes: {', '.join(sorted(unexpected)[:10])}{' ...' if len(unexpected) > 10 else ''}\n"
            "    fix: check that config.json and the weights belong together (a layer count, a size), or load "
            "with strict=False, which lists them as unexpected")
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        from splice.core.generation import GENERATION_OPTIONS

        gen = read_json(gen_file)
        gen = gen if isinstance(gen, dict) else {}
        generation.update({k: gen[k] for k in GENERATION_OPTIONS if gen.get(k) is not None})
    model.loading_report = assign_weights(
        model, state, source=str(folder), strict=strict, dtype=dtype, unused=unused, fresh=lambda: assemble(plan)
    )
    model.loading_report.notes = notes
    model.loading_report.unexpected = sorted(set(model.loading_report.unexpected) | set(unexpected))
    model.generation_defaults = generation
    model.tokenizer = load_tokenizer(folder)
    model.image_processor = ImageProcessor.from_folder(folder)
    return model.eval()


def export_ved(model, path) -> None:
    """Write a folder that transformers' ``VisionEncoderDecoderModel.from_pretrained`` loads with the same logits.

    Only what transformers can express is exported: the standard cross-attention in every decoder layer, and a
    Linear projection (or none). Anything else raises ``CheckpointError`` naming what stands in the way.
    """
    from safetensors.torch import save_file

    from splice.core.processing import processor_for

    spec = model.spec
    registry = get_registry()
    blockers = []
    ca = spec.get("cross_attention", {})
    decoder_native = getattr(model.decoder, "native_cross_attention", False)
    if not decoder_native and (ca.get("kind") != "standard" or ca.get("layers") != "all"):
        blockers.append(f"cross_attention {ca.get('kind')!r} in layers {ca.get('layers')!r} (transformers has "
                        "only its standard cross-attention in every layer)")
    proj = spec.get("projection")
    proj_kind = proj.get("kind") if isinstance(proj, dict) else proj
    if model.enc_to_dec_proj is not None and (proj_kind not in ("auto", "linear") or
                                              isinstance(proj, dict) and proj.get("config", {}).get("bias") is False):
        blockers.append(f"projection {proj!r} (transformers has only a Linear enc_to_dec_proj with bias)")
    if model.enc_to_dec_proj is not None and model.encoder.hidden_size == model.decoder.hidden_size:
        blockers.append("a projection between equal widths (transformers adds one only when the widths differ)")
    config: dict = {
        "model_type": VED_MODEL_TYPE,
        "architectures": ["VisionEncoderDecoderModel"],
        "is_encoder_decoder": True,
        "tie_word_embeddings": False,
    }
    interops = {}
    for role in ("encoder", "decoder"):
        entry = registry.get(role, spec[role]["name"])
        if entry.hf is None or entry.hf.config_to_hf is None or entry.hf.state_dict_to_hf is None:
            blockers.append(f"{role} {entry.name!r} has no transformers counterpart")
        interops[role] = entry
    if blockers:
        raise CheckpointError("cannot export to transformers' VisionEncoderDecoder layout:\n  - " + "\n  - ".join(blockers)
                              + "\n    fix: save with model.save_pretrained (splice's own format) instead")
    tensors = {}
    for role, entry in interops.items():
        sub = entry.hf.config_to_hf(entry.config_cls(**spec[role]["config"]).model_dump())
        if role == "decoder":
            sub = {**sub, "is_decoder": True, "add_cross_attention": True}
            # the family's default bos/eos ids may lie outside a small vocabulary; the pair's tokens replace them.
            # pad_token_id stays: it is part of the architecture for some families (RoBERTa's positions).
            vocab = sub.get("vocab_size")
            ids = {"bos_token_id": model.tokens.get("decoder_start"), "eos_token_id": model.tokens.get("eos")}
            for key, value in ids.items():
                current = sub.get(key)
                if value is not None and (current is None or vocab is not None and current >= vocab):
                    sub[key] = value
        config[role] = sub
        module_sd = getattr(model, role).state_dict()
        tensors.update({f"{role}.{k}": v for k, v in entry.hf.state_dict_to_hf(module_sd, sub).items()})
    if model.enc_to_dec_proj is not None:
        tensors.update({f"enc_to_dec_proj.{k}": v for k, v in model.enc_to_dec_proj.state_dict().items()})
    tokens = model.tokens
    config.update(decoder_start_token_id=tokens.get("decoder_start"), pad_token_id=tokens.get("pad"),
                  eos_token_id=tokens.get("eos"))
    generation = {"decoder_start_token_id": tokens.get("decoder_start"), "pad_token_id": tokens.get("pad"),
                  "eos_token_id": tokens.get("eos"), **model.generation_defaults}

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        processor_for(model).save(tmp)
        if model.tokenizer is not None:
            (tmp / "tokenizer.json").write_text(model.tokenizer.to_str())

    write_folder(path, fill, marker="config.json", owned=EXPORT_FILES, what="transformers export")

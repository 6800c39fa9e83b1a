"""Folders written by transformers' ``VisionEncoderDecoderModel.save_pretrained``, read without transformers.

Each component says how to read its transformers weights through its ``HFInterop`` (registered by its plugin);
this module splits the folder's ``config.json`` and tensors between them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from splice.core.checkpoint import assign_weights, load_tokenizer, read_weights
from splice.core.errors import CheckpointError, ConfigError
from splice.core.plugins import get_registry
from splice.core.processing import ImageProcessor

VED_MODEL_TYPE = "vision-encoder-decoder"


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

    config = json.loads((folder / "config.json").read_text())
    spec, generation = spec_from_ved_config(config, source=str(folder / "config.json"))
    plan = validate(spec)
    if not plan.ok:
        raise ConfigError(plan.problems, source=f"{folder / 'config.json'} (as a splice spec)")
    model = plan.meta_model
    tensors = read_weights(folder)
    groups: dict[str, dict] = {"encoder": {}, "decoder": {}}
    state, unused = {}, []
    for name, t in tensors.items():
        head, _, rest = name.partition(".")
        if head in groups:
            groups[head][rest] = t
        elif head == "enc_to_dec_proj":
            state[name] = t
        else:
            unused.append(name)
    for role, part in (("encoder", plan.encoder), ("decoder", plan.decoder)):
        mapped, role_unused = part.entry.hf.state_dict_from_hf(groups[role], config[role])
        state.update({f"{role}.{k}": v for k, v in mapped.items()})
        unused.extend(f"{role}.{k}" for k in role_unused)
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        gen = json.loads(gen_file.read_text())
        for key in ("max_length", "max_new_tokens", "num_beams", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                    "no_repeat_ngram_size", "length_penalty", "early_stopping", "repetition_penalty"):
            if gen.get(key) is not None:
                generation[key] = gen[key]
    model.loading_report = assign_weights(
        model, state, source=str(folder), strict=strict, dtype=dtype, unused=unused, fresh=lambda: assemble(plan)
    )
    model.generation_defaults = generation
    model.tokenizer = load_tokenizer(folder)
    model.image_processor = ImageProcessor.from_folder(folder)
    return model.eval()

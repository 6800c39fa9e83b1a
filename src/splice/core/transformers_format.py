"""Folders written by transformers' ``VisionEncoderDecoderModel.save_pretrained``, read without transformers.

Each component says how to read its transformers weights through its ``HFInterop`` (registered by its plugin);
this module splits the folder's ``config.json`` and tensors between them.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from splice.core.checkpoint import LazyTensors, checked_generation, field_error, map_from_hf, read_json_mapping
from splice.core.errors import CheckpointError, ConfigError, Problem, short
from splice.core.files import write_folder
from splice.core.plugins import get_registry

VED_MODEL_TYPE = "vision-encoder-decoder"
# what export_ved writes: a folder holding only these (and config.json) may be replaced by a new export
EXPORT_FILES = frozenset({"config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
                          "tokenizer.json"})


def _first(*values):
    for v in values:
        if v is not None:
            return v[0] if isinstance(v, list) and v else v
    return None


def spec_from_ved_config(config: dict, source: str = "config.json") -> tuple[dict, dict]:
    """A composition spec for a transformers VED config, plus the generation defaults it implies: the legacy
    generation settings of ``config.json`` (``legacy_generation``) when no ``generation_config.json`` sits beside it,
    and a list of eos ids."""
    check_ved_config(config, source)
    registry = get_registry()
    entries = {role: registry.by_hf_model_type(role, config[role]["model_type"]) for role in ("encoder", "decoder")}
    unread = [role for role, entry in entries.items() if entry is None]
    if unread:
        raise ConfigError([_unread_problem(registry, role, config[role]["model_type"]) for role in unread],
                          source=source)
    spec: dict = {"kind": "encoder-decoder", "projection": "auto"}
    for role, entry in entries.items():
        spec[role] = {"name": entry.name,
                      "config": part_config_from_hf(entry, config[role], source=source, prefix=f"{role}.")}
    dec = config["decoder"]
    spec["cross_attention"] = {"kind": "standard", "layers": "all" if dec.get("add_cross_attention", True) else "none"}
    spec["tokens"] = {  # transformers: decoder_start_token_id, else bos_token_id; each the outer value, else the decoder's
        "decoder_start": _first(config.get("decoder_start_token_id"), dec.get("decoder_start_token_id"),
                                config.get("bos_token_id"), dec.get("bos_token_id")),
        "pad": _first(config.get("pad_token_id"), dec.get("pad_token_id")),
        "eos": _first(config.get("eos_token_id"), dec.get("eos_token_id")),
    }
    generation = {}
    if not (Path(source).parent / "generation_config.json").exists():
        generation = checked_generation(Path(source), legacy_generation(config))
    eos = config.get("eos_token_id", dec.get("eos_token_id"))
    if isinstance(eos, list):
        generation["eos_token_id"] = eos
    return spec, generation


def _unread_problem(registry, role: str, model_type: str) -> Problem:
    """The problem for a part no registered plugin reads: what is read, and where to look for more."""
    known = sorted({t for e in registry.entries(role) if e.hf for t in e.hf.model_types})
    return Problem(f"{role}.model_type", f"no splice {role} reads this model type", given=model_type,
                   expected=f"one of {', '.join(known)}",
                   fix=f"`splice list --kind {role}` shows the {role}s installed; install a plugin that reads "
                   f"{short(model_type)}, or write one (docs/writing-a-plugin.md)")


# the options transformers takes from a config.json without generation_config.json, besides the token ids (tokens)
LEGACY_OPTIONS = ("max_length", "min_length", "num_beams", "num_return_sequences", "do_sample", "temperature",
                  "top_k", "top_p", "length_penalty", "early_stopping", "no_repeat_ngram_size", "repetition_penalty",
                  "forced_bos_token_id", "forced_eos_token_id", "max_new_tokens", "min_new_tokens")


def legacy_generation(config: dict) -> dict:
    """The generation settings an old ``config.json`` holds (2021-22 folders: no generation_config.json), as
    transformers 5 reads them (``GenerationConfig.from_model_config`` on the file's dict): each option's value at the
    top level when it is not null, else the decoder's. transformers 4 differs in one case: a top-level value equal
    to transformers' default (``num_beams: 1``) yields to the decoder's there; splice follows 5."""
    dec = config.get("decoder") if isinstance(config.get("decoder"), dict) else {}
    out = {}
    for key in LEGACY_OPTIONS:
        value = config.get(key)
        value = dec.get(key) if value is None else value
        if value is not None:
            out[key] = value
    return out


_TOKEN_IDS = ("decoder_start_token_id", "bos_token_id", "pad_token_id", "eos_token_id")


def _is_token_id(x: object) -> bool:
    return type(x) is int and x >= 0


def check_ved_config(config: object, source: str) -> None:
    """The parts of a VisionEncoderDecoder ``config.json`` that splice reads itself: its model types, the
    encoder and decoder configs (mappings), the token ids and ``add_cross_attention``."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: holds {short(config)}\n    expected: a JSON mapping (a transformers "
                              "config)\n    fix: save or download the folder again")
    if config.get("model_type") != VED_MODEL_TYPE:
        raise field_error(source, "model_type", "not a VisionEncoderDecoder config", given=config.get("model_type"),
                          expected=repr(VED_MODEL_TYPE),
                          fix="splice.load reads splice folders and transformers VisionEncoderDecoder folders")
    for role in ("encoder", "decoder"):
        sub = config.get(role)
        if not isinstance(sub, dict):
            raise field_error(source, role, f"not the {role}'s config", given=sub,
                              expected=f"a mapping with the {role}'s model_type and settings",
                              fix="save or download the folder again", cls=ConfigError)
        if not isinstance(sub.get("model_type"), str):
            raise field_error(source, f"{role}.model_type", "not a model type", given=sub.get("model_type"),
                              expected="a string such as 'vit' or 'gpt2'", fix="save or download the folder again",
                              cls=ConfigError)
    for where, values in (("", config), ("decoder.", config["decoder"])):
        for key in _TOKEN_IDS:
            value = values.get(key)
            if value is None or _is_token_id(value) or (
                    isinstance(value, list) and value and all(_is_token_id(v) for v in value)):
                continue
            raise field_error(source, where + key, "not a token id", given=value,
                              expected="null, a token id (an integer >= 0) or a non-empty list of them",
                              fix="set it to the token's id in the decoder's vocabulary", cls=ConfigError)
    cross = config["decoder"].get("add_cross_attention", True)
    if not isinstance(cross, bool):
        raise field_error(source, "decoder.add_cross_attention", "not a boolean", given=cross,
                          expected="true or false", fix="set it to true (a captioning decoder attends to the image)",
                          cls=ConfigError)


def part_config_from_hf(entry, sub: dict, *, source: str, prefix: str = "") -> dict:
    """A component's splice config from its (``prefix``-ed) part of a transformers config: each field the component
    reads must hold the type transformers writes there (judged by the component's default config), and anything
    else the plugin's reader fails on is a ``ConfigError`` naming the file and the part."""
    problems = [Problem(f"{prefix}{key}", "not the type transformers writes here", given=sub[key],
                        expected=f"{_type_name(ref)} (the default is {short(ref)})",
                        fix="correct the value, or save the config again with transformers")
                for key, ref in _reference_config(entry).items() if key in sub and not _fits(sub[key], ref)]
    if problems:
        raise ConfigError(problems, source=source)
    try:
        return entry.hf.config_from_hf(sub)
    except ConfigError as exc:
        placed = [replace(p, path=f"{prefix}{p.path}" if p.path else prefix.rstrip(".")) for p in exc.problems]
        raise ConfigError(placed, source=source) from None
    except Exception as exc:  # noqa: BLE001 - a plugin's reader that did not expect a value
        raise field_error(source, prefix.rstrip("."), f"the {entry.name!r} plugin cannot read this config "
                          f"({type(exc).__name__}: {short(str(exc), 200)})", expected=f"a transformers "
                          f"{sub.get('model_type')} config", fix="correct the value named above, or save the config "
                          "again with transformers", cls=ConfigError) from None


def _reference_config(entry) -> dict:
    """The component's default config in transformers' terms: the types each field should have."""
    if entry.hf is None or entry.hf.config_to_hf is None:
        return {}
    try:
        return entry.hf.config_to_hf(entry.make_config().model_dump())
    except Exception:  # noqa: BLE001 - no default config to judge by: the plugin's reader judges alone
        return {}


def _fits(value: object, ref: object) -> bool:
    """Whether ``value`` has the JSON type of ``ref`` (an int size may also be a list, as in ``[height, width]``)."""
    if ref is None:
        return True
    if isinstance(ref, bool):
        return isinstance(value, bool)
    if isinstance(ref, int):
        return type(value) is int or isinstance(value, list) and bool(value) and all(type(v) is int for v in value)
    if isinstance(ref, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(ref, (list, tuple)):
        return isinstance(value, list) and (not ref or all(_fits(v, ref[0]) for v in value))
    return isinstance(value, type(ref))


def _type_name(ref: object) -> str:
    if isinstance(ref, bool):
        return "true or false"
    if isinstance(ref, int):
        return "an integer"
    if isinstance(ref, float):
        return "a number"
    if isinstance(ref, (list, tuple)):
        return "a list"
    return {str: "a string", dict: "a mapping"}.get(type(ref), type(ref).__name__)


def generation_options(gen_file: Path) -> dict:
    """The options of a ``generation_config.json`` that ``generate`` takes (transformers writes many more)."""
    from splice.core.generation import GENERATION_OPTIONS

    gen = read_json_mapping(gen_file, what="a mapping of generation options")
    return checked_generation(gen_file, {k: gen[k] for k in GENERATION_OPTIONS if gen.get(k) is not None})


def split_state(source: str, tensors, plan, config: dict) -> tuple[dict, list[str], list[str], list[str]]:
    """(state in splice's names, unused, unexpected, notes): each role's tensors through its plugin's mapping."""
    state, unused, unexpected, notes = {}, [], [], []
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
        mapped, known, other, role_notes = map_part(source, part, group, config[role], role)
        notes.extend(f"{role}: {n}" for n in role_notes)
        state.update({f"{role}.{k}": v for k, v in mapped.items()})
        unused.extend(known)
        unexpected.extend(other)
    return state, unused, unexpected, notes


def map_part(source: str, part, group, hf_config: dict, prefix: str) -> tuple[dict, list, list, list]:
    """One part's tensors (``prefix`` removed) through its plugin's ``HFInterop``: (mapped, expected extras,
    unexpected, notes), the extras and unexpected named with ``prefix`` as in the file; a failure of the plugin's
    mapping is a ``CheckpointError`` naming the file and the part. Every kind's format maps its parts with it."""
    try:
        mapped, left, notes = map_from_hf(part.entry.hf, group, hf_config)
    except CheckpointError as exc:  # the plugin's own message, placed in the file
        text = str(exc)  # clipped in the middle, where a tensor name from the file may be long; the fix stays
        text = text if len(text) <= 1500 else text[:1000] + " ... " + text[-400:]
        raise CheckpointError(f"{source} ({prefix}): {text}") from None
    except Exception as exc:  # noqa: BLE001 - a plugin's mapping that did not expect these tensors
        raise CheckpointError(f"{source}: the {prefix} tensors cannot be read as {part.entry.name!r} weights "
                              f"({type(exc).__name__}: {short(str(exc), 200)})\n    fix: check that config.json and "
                              "the weights belong together, or download the folder again") from None
    ignorable = [re.compile(p) for p in getattr(part.entry.hf, "ignorable", ())]
    extra = {k: any(p.fullmatch(k) for p in ignorable) for k in left}
    return (mapped, [f"{prefix}.{k}" for k, ok in extra.items() if ok],
            [f"{prefix}.{k}" for k, ok in extra.items() if not ok], notes)


def _export_blockers(model, spec: dict) -> list[str]:
    """What in ``model`` transformers' VisionEncoderDecoder layout cannot express (the components aside)."""
    blockers: list[str] = []
    ca = spec.get("cross_attention", {})
    decoder_native = getattr(model.decoder, "native_cross_attention", False)
    if not decoder_native and (ca.get("kind") != "standard" or ca.get("layers") != "all"):
        blockers.append(f"cross_attention {ca.get('kind')!r} in layers {ca.get('layers')!r} (transformers has "
                        "only its standard cross-attention in every layer)")
    if (not decoder_native and ca.get("context_width", "decoder") == "encoder"
            and model.encoder.hidden_size != model.decoder.hidden_size):
        blockers.append("cross_attention.context_width: encoder (transformers' cross-attention of this decoder reads "
                        "the decoder's width)")
    proj = spec.get("projection")
    proj_kind = proj.get("kind") if isinstance(proj, dict) else proj
    if model.enc_to_dec_proj is not None and (proj_kind not in ("auto", "linear") or
                                              isinstance(proj, dict) and proj.get("config", {}).get("bias") is False):
        blockers.append(f"projection {proj!r} (transformers has only a Linear enc_to_dec_proj with bias)")
    if model.enc_to_dec_proj is not None and model.encoder.hidden_size == model.decoder.hidden_size:
        blockers.append("a projection between equal widths (transformers adds one only when the widths differ)")
    context_width = getattr(model.decoder, "context_width", model.decoder.hidden_size)
    if model.enc_to_dec_proj is not None and decoder_native and context_width != model.decoder.hidden_size:
        blockers.append(f"a projection to the decoder's cross_attention_hidden_size {context_width} (transformers "
                        "requires that size to equal the encoder's width, with no projection)")
    return blockers


def export_ved(model, path) -> None:
    """Write a folder that transformers' ``VisionEncoderDecoderModel.from_pretrained`` loads with the same logits.

    Only what transformers can express is exported: the standard cross-attention in every decoder layer, and a
    Linear projection (or none). Anything else raises ``CheckpointError`` naming what stands in the way.
    """
    from safetensors.torch import save_file

    from splice.core.processing import processor_for

    spec = model.spec
    registry = get_registry()
    blockers = _export_blockers(model, spec)
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

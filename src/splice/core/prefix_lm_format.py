"""Folders written by transformers' ``LlavaForConditionalGeneration`` and ``VipLlavaForConditionalGeneration``,
read and written without transformers (the prefix-LM kind's ``TransformersFormat``\\ s).

``config.json`` holds ``vision_config`` (a CLIP vision tower), ``text_config`` (a LLaMA-family LM),
``image_token_index`` (``image_token_id``), ``image_seq_length``, ``projector_hidden_act``,
``vision_feature_layer`` (VipLlava: ``vision_feature_layers`` in old files), LLaVA's
``vision_feature_select_strategy`` and ``multimodal_projector_bias``, VipLlava's ``projector_layernorm_eps`` and
``tie_word_embeddings``. The weights come in two layouts, both read:

- transformers 4.x, and what 5.x still writes on disk: ``vision_tower.*`` (4.x: ``vision_tower.vision_model.*``),
  ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.weight``;
- transformers 5.x module names: ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
  ``model.language_model.*``, ``lm_head.weight``.

Each tower's tensors go through its plugin's ``HFInterop`` (``transformers_format.map_part``); the projector's
module names are transformers' own. The chat template is read from ``chat_template.jinja``,
``chat_template.json`` or ``tokenizer_config.json`` (in that order) into the spec's ``chat_template``.
``export_prefix_lm`` writes the on-disk layout transformers 5 writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from splice.core.checkpoint import field_error, read_json_mapping
from splice.core.errors import CheckpointError, ConfigError, Problem, short
from splice.core.files import write_folder
from splice.core.kinds import TransformersFormat
from splice.core.plugins import get_registry
from splice.core.transformers_format import map_part, part_config_from_hf

# model_type -> (architecture, projector, default vision_feature_layer)
LAYOUTS = {"llava": ("LlavaForConditionalGeneration", "llava", -2),
           "vipllava": ("VipLlavaForConditionalGeneration", "vipllava", [-2, -5, -8, -11, 6])}
EXPORT_FILES = frozenset({"config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
                          "tokenizer.json", "chat_template.jinja"})
TEMPLATE_LIMIT = 1 << 20  # bytes: released chat templates are a few KB
# an on-disk name's head -> (the part, what replaces the head): 4.x / on-disk first, then 5.x module names
_HEADS = (("language_model.lm_head.", "language", "lm_head."), ("language_model.model.", "language", "model."),
          ("multi_modal_projector.", "projector", ""), ("vision_tower.vision_model.", "vision", ""),
          ("vision_tower.", "vision", ""), ("model.language_model.", "language", "model."),
          ("lm_head.", "language", "lm_head."), ("model.multi_modal_projector.", "projector", ""),
          ("model.vision_tower.", "vision", ""))
_TOWERS = (("vision", "vision_config", "encoder"), ("language", "text_config", "decoder"))


def _token_id(config: dict, key: str, source: str) -> int | None:
    """A token id of the config (a list: its first), checked."""
    value = config.get(key)
    if isinstance(value, list) and value:
        value = value[0]
    if value is None or (type(value) is int and value >= 0):
        return value
    raise field_error(source, key, "not a token id", given=value, expected="null, or an integer >= 0",
                      fix="set it to the token's id in the language model's vocabulary", cls=ConfigError)


def _check(config: object, source: str) -> None:
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: holds {short(config)}\n    expected: a JSON mapping (a transformers "
                              "config)\n    fix: save or download the folder again")
    for _, key, _ in _TOWERS:
        sub = config.get(key)
        if not isinstance(sub, dict) or not isinstance(sub.get("model_type"), str):
            raise field_error(source, key, "not a tower's config with its model_type", given=sub,
                              expected="a mapping with the model_type and settings of the tower",
                              fix="save the config again with transformers (it writes both towers' configs)",
                              cls=ConfigError)


def tied(config: dict) -> bool:
    """Whether the LM head is the token embedding: the top-level ``tie_word_embeddings`` (LLaVA also takes the
    text config's, as its config does; VipLlava reads the top level alone, default False)."""
    top = config.get("tie_word_embeddings")
    text = config["text_config"].get("tie_word_embeddings")
    if config.get("model_type") == "llava":
        return bool(top) or bool(text)
    return bool(top) if top is not None else False


def text_config(config: dict) -> dict:
    """The language model's config as its plugin reads it, with the tie the whole model uses."""
    return {**config["text_config"], "tie_word_embeddings": tied(config)}


def _layers(config: dict, source: str, default) -> int | list[int]:
    value = config.get("vision_feature_layer", config.get("vision_feature_layers", default))
    if type(value) is int or (isinstance(value, list) and value and all(type(v) is int for v in value)):
        return value
    raise field_error(source, "vision_feature_layer", "not a layer index or a list of them", given=value,
                      expected="an integer (LLaVA: -2) or a non-empty list of integers (VipLlava: [-2, -5, -8, -11, "
                      "6])", fix="correct it, or save the config again with transformers", cls=ConfigError)


def _projector(config: dict, kind: str) -> dict:
    act = config.get("projector_hidden_act", "gelu")
    if kind == "llava":
        return {"act": act, "bias": config.get("multimodal_projector_bias", True)}
    return {"act": act, "eps": config.get("projector_layernorm_eps", 1e-5)}


def spec_from_config(config: dict, source: str = "config.json") -> tuple[dict, dict]:
    """A prefix-lm spec for a LLaVA or VipLlava ``config.json`` (no generation defaults: they come from
    ``generation_config.json``); the chat template beside it is read into the spec."""
    _check(config, source)
    registry = get_registry()
    model_type = config.get("model_type")
    if model_type not in LAYOUTS:
        archs = config.get("architectures") or []
        model_type = "vipllava" if "VipLlavaForConditionalGeneration" in archs else "llava"
    _, projector, default_layers = LAYOUTS[model_type]
    spec: dict = {"kind": "prefix-lm"}
    subs = {"vision": config["vision_config"], "language": text_config(config)}
    for role, key, kind in _TOWERS:
        entry = registry.by_hf_model_type(kind, subs[role]["model_type"])
        if entry is None:
            raise ConfigError([Problem(f"{key}.model_type", f"no registered {kind} reads this model type",
                                       given=subs[role]["model_type"], expected="a model type a plugin reads (e.g. "
                                       f"{'clip_vision_model' if role == 'vision' else 'llama'})",
                                       fix=f"install a plugin with a {kind} that reads it (`splice list`)",
                                       error="unknown")], source=source)
        spec[role] = {"name": entry.name, "config": part_config_from_hf(entry, subs[role], source=source,
                                                                        prefix=f"{key}.")}
    text = config["text_config"]
    image = config.get("image_token_index", config.get("image_token_id", 32000))
    spec.update(
        projector={"kind": projector, "config": _projector(config, model_type)},
        vision_feature_layers=_layers(config, source, default_layers),
        vision_feature_select_strategy=config.get("vision_feature_select_strategy", "default")
        if model_type == "llava" else "default",
        tokens={"image": _token_id({"image_token_index": image}, "image_token_index", source),
                "pad": _token_id(config, "pad_token_id", source) if config.get("pad_token_id") is not None
                else _token_id(text, "pad_token_id", source),
                "bos": _token_id(text, "bos_token_id", source), "eos": _token_id(text, "eos_token_id", source)},
        chat_template=read_chat_template(Path(source).parent))
    return spec, {}


def read_chat_template(folder: Path) -> str | None:
    """The folder's chat template: ``chat_template.jinja``, else ``chat_template.json``'s or
    ``tokenizer_config.json``'s ``chat_template`` (a list of named templates: the ``default`` one); None: none."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        if jinja.stat().st_size > TEMPLATE_LIMIT:
            raise CheckpointError(f"{jinja}: larger than {TEMPLATE_LIMIT >> 20} MiB, too large for a chat template"
                                  "\n    fix: save or download the folder again")
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{jinja}: not UTF-8 text\n    fix: save or download the folder again") from None
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        value = read_json_mapping(path, what="a mapping").get("chat_template")
        if isinstance(value, list):  # [{name, template}, ...]
            value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"),
                         None)
        if value is not None and not isinstance(value, str):
            raise field_error(path, "chat_template", "not a template", given=value, expected="a Jinja template "
                              "string (or a list of {name, template} with a default one)",
                              fix="save the processor again with transformers", cls=CheckpointError)
        if value is not None:
            return value
    return None


class _Renamed(Mapping):
    """Tensors under new names (``{new: name in the file}``), read lazily from the original mapping."""

    def __init__(self, tensors: Mapping, names: dict[str, str]):
        self._tensors, self._names = tensors, names

    def __getitem__(self, name: str):
        return self._tensors[self._names[name]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _place(name: str) -> tuple[str | None, str]:
    """(the part, the name within it) of one on-disk tensor name; (None, name) for a name of no part."""
    for head, part, new in _HEADS:
        if name.startswith(head):
            return part, new + name[len(head):]
    return None, name


def split_state(source: str, tensors, plan, config: dict) -> tuple[dict, list[str], list[str], list[str]]:
    """(state in splice's names, unused, unexpected, notes): each tower through its plugin's mapping, the
    projector's tensors as they are."""
    groups: dict[str, dict[str, str]] = {"vision": {}, "language": {}, "projector": {}}
    unexpected: list[str] = []
    for name in tensors:
        part, inner = _place(name)
        if part is None:
            unexpected.append(name)
        else:
            groups[part][inner] = name
    state = {f"projector.{inner}": tensors[name] for inner, name in groups["projector"].items()}
    unused, notes = [], []
    subs = {"vision": config["vision_config"], "language": text_config(config)}
    for part, (role, _, _) in zip(plan.components(), _TOWERS):
        prefix = "vision_tower" if role == "vision" else "language_model"
        mapped, known, other, part_notes = map_part(source, part, _Renamed(tensors, groups[role]), subs[role], prefix)
        state.update({f"{role}.{k}": v for k, v in mapped.items()})
        unused, unexpected, notes = unused + known, unexpected + other, notes + [f"{role}: {n}" for n in part_notes]
    return state, unused, unexpected, notes


# ---- export ----------------------------------------------------------------------------------------------


def _export_blockers(model, entries: dict) -> list[str]:
    spec, blockers = model.spec, []
    kind = spec["projector"]["kind"]
    if kind not in ("llava", "vipllava"):
        blockers.append(f"projector {kind!r} (transformers has LLaVA's and VipLlava's projectors only)")
    if kind == "vipllava" and spec["vision_feature_select_strategy"] != "default":
        blockers.append("vision_feature_select_strategy: full with the vipllava projector (VipLlava always drops "
                        "the class token)")
    if entries["language"].name != "llama":
        blockers.append(f"language {entries['language'].name!r} (the export writes LLaMA-family language models, "
                        "LLaVA's and VipLlava's)")
    return blockers + [f"{role} {entry.name!r} has no transformers counterpart" for role, entry in entries.items()
                       if None in (entry.hf, getattr(entry.hf, "config_to_hf", None),
                                   getattr(entry.hf, "state_dict_to_hf", None))]


def _export_config(model, subs: dict) -> dict:
    spec = model.spec
    kind, tokens = spec["projector"]["kind"], model.tokens
    projector = spec["projector"]["config"]
    config = {"model_type": kind, "architectures": [LAYOUTS[kind][0]], "vision_config": subs["vision"],
              "text_config": subs["language"], "image_token_index": tokens["image"],
              "image_seq_length": model.image_seq_length, "projector_hidden_act": projector["act"],
              "vision_feature_layer": spec["vision_feature_layers"],
              "tie_word_embeddings": bool(subs["language"].get("tie_word_embeddings", False))}
    if kind == "llava":
        config.update(vision_feature_select_strategy=spec["vision_feature_select_strategy"],
                      multimodal_projector_bias=projector["bias"])
    else:
        config["projector_layernorm_eps"] = projector["eps"]
    if tokens.get("pad") is not None:
        config["pad_token_id"] = tokens["pad"]
    return config


def export_prefix_lm(model, path) -> None:
    """Write a folder that transformers' ``LlavaForConditionalGeneration`` / ``VipLlavaForConditionalGeneration``
    (the spec's projector says which) loads with the same logits; what it cannot express raises
    ``CheckpointError`` naming it."""
    from safetensors.torch import save_file

    from splice.core.processing import processor_for

    spec, registry = model.spec, get_registry()
    entries = {role: registry.get(kind, spec[role]["name"]) for role, _, kind in _TOWERS}
    blockers = _export_blockers(model, entries)
    if blockers:
        raise CheckpointError("cannot export to transformers' LLaVA / VipLlava layout:\n  - " + "\n  - ".join(blockers)
                              + "\n    fix: save with model.save_pretrained (splice's own format) instead")
    subs, tensors = {}, {}
    for role, _, _ in _TOWERS:
        entry = entries[role]
        subs[role] = entry.hf.config_to_hf(entry.config_cls(**spec[role]["config"]).model_dump())
        head = "vision_tower." if role == "vision" else "language_model."
        hf = entry.hf.state_dict_to_hf(getattr(model, role).state_dict(), subs[role])
        tensors.update({head + k: v for k, v in hf.items()})
    tensors.update({f"multi_modal_projector.{k}": v for k, v in model.projector.state_dict().items()})
    text = subs["language"]
    for key in ("bos", "eos", "pad"):  # the family's defaults may lie outside a small vocabulary: the spec's win
        text[f"{key}_token_id"] = model.tokens.get(key)
    config = _export_config(model, subs)
    generation = {k: v for k, v in {"bos_token_id": model.tokens.get("bos"), "eos_token_id": model.tokens.get("eos"),
                                    "pad_token_id": model.tokens.get("pad"), **model.generation_defaults}.items()
                  if v is not None}
    processor, template = processor_for(model), model.chat_template

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        processor.save(tmp)
        if model.tokenizer is not None:
            (tmp / "tokenizer.json").write_text(model.tokenizer.to_str())
        if template is not None:
            (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")

    write_folder(path, fill, marker="config.json", owned=EXPORT_FILES, what="transformers export")


FORMATS = tuple(TransformersFormat(kind.capitalize() if kind == "llava" else "VipLlava", model_types=(kind,),
                                   architectures=(arch,), spec_from_config=spec_from_config, split_state=split_state,
                                   export=export_prefix_lm)
                for kind, (arch, _, _) in LAYOUTS.items())

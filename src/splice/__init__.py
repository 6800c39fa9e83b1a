"""splice: compose any vision encoder with any text decoder, from a config file, through plugins.

    plan = splice.validate("examples/vit-gpt2.yaml")   # checks everything, allocates no weights
    model = splice.compose("examples/vit-gpt2.yaml")   # an nn.Module
    model.save_pretrained("out/"); model = splice.load("out/")
"""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("splice")

from splice.core.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    IncompatibleComponentsError,
    InputError,
    PluginError,
    Problem,
    SpliceError,
    UnknownComponentError,
)
# torch-backed names are imported on first use (PEP 562), so that `import splice` (and `splice --help`) does not
# import torch: `splice.LayerSpec` and `from splice import HFInterop` work as before
_LAZY = {
    **{name: "splice.core.interfaces" for name in (
        "CrossAttention", "CrossAttentionAdapter", "DecoderCache", "DecoderOutput", "EncoderOutput", "HFInterop",
        "LayerSpec", "Preprocessing", "Projection", "TextDecoder", "TextEncoder", "TextEncoderOutput",
        "VisionEncoder")},
    "Kind": "splice.core.kinds", "Plan": "splice.core.kinds", "TransformersFormat": "splice.core.kinds",
    "KVCache": "splice.core.cache", "context_kv": "splice.core.cache", "GenerationOptions": "splice.core.generation",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'splice' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "ConfigError", "CrossAttention", "CrossAttentionAdapter", "DecoderCache", "DecoderOutput",
    "EncoderOutput", "GenerationOptions", "HFInterop", "IncompatibleComponentsError", "InputError", "KVCache", "Kind",
    "LayerSpec", "Plan", "PluginError",
    "Preprocessing", "Problem", "Projection", "SpliceError", "TextDecoder", "TextEncoder", "TextEncoderOutput",
    "TransformersFormat", "UnknownComponentError", "VisionEncoder", "compose", "export_transformers", "hookimpl",
    "context_kv", "list_components", "load", "schema", "validate",
]


def validate(spec):
    """Resolve and check a spec (a path, a preset name, a dict or a spec object) of any registered composition
    kind (``kind:``; none: ``encoder-decoder``); returns a ``Plan`` whose ``problems`` list what is wrong."""
    from splice.core.composer import validate as _validate

    return _validate(spec)


def compose(spec, *, seed: int | None = None, strict: bool = False):
    """Build the model a spec describes (raises a ``SpliceError`` subclass listing every problem).

    With pretrained parts, ``model.loading_report`` lists loaded / newly initialised / unused weights by name;
    ``strict=True`` turns any missing or unused weight into a ``CheckpointError``."""
    from splice.core.composer import compose as _compose

    return _compose(spec, seed=seed, strict=strict)


def load(path, *, dtype=None, strict: bool = True, revision: str | None = None, verify: bool = True):
    """Load a splice folder, a transformers VisionEncoderDecoder folder, or a hub repo id.

    ``strict`` (the default) fails on any missing, unexpected or non-finite weight; ``strict=False`` lists them
    in ``model.loading_report``. ``verify=False`` skips the SHA-256 check of a splice folder's files."""
    from splice.core.loading import load as _load

    return _load(path, dtype=dtype, strict=strict, revision=revision, verify=verify)


def export_transformers(model, path) -> None:
    """Write ``model`` as a transformers VisionEncoderDecoder folder (config.json + model.safetensors + processor
    and tokenizer files) that ``VisionEncoderDecoderModel.from_pretrained`` loads with the same logits."""
    from splice.core.loading import export_transformers as _export

    _export(model, path)


def list_components(kind: str | None = None) -> list[dict]:
    """Registered components (and presets) as dicts: kind, name, plugin, aliases, description."""
    from splice.core.plugins import get_registry

    from splice.core.registry import KINDS

    registry = get_registry()
    rows = []
    for k in KINDS:
        if kind in (None, k):
            for e in registry.entries(k):
                rows.append({"kind": k, "name": e.name, "plugin": e.plugin, "aliases": list(e.aliases),
                             "description": e.description, "tiny": e.tiny, "hf_model_types": list(e.hf.model_types) if e.hf else []})
    if kind in (None, "preset"):
        for p in registry.presets.values():
            rows.append({"kind": "preset", "name": p.name, "plugin": "registry.yaml", "aliases": [],
                         "description": p.description or f"{p.kind} {p.family}", "family": p.family, "weights": p.weights})
        for name in registry.compositions:
            rows.append({"kind": "preset", "name": name, "plugin": "registry.yaml", "aliases": [],
                         "description": registry.composition_descriptions.get(name) or "composition"})
    return rows


def schema(kind: str | None = None) -> dict:
    """JSON Schema of a composition kind's spec (default: ``encoder-decoder``)."""
    if kind is None:
        from splice.core.spec import schema as _schema

        return _schema()
    from splice.core.composer import get_kind

    return get_kind(kind).spec_model.model_json_schema()

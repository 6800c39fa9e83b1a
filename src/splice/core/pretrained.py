"""Pretrained parts in a spec: ``pretrained:`` on a component (the encoder, the decoder; warm start).

A source is a preset's weights (``true``), a hub repo id (``owner/name`` or ``owner/name@revision``), a local
folder or a single ``.safetensors`` file. Folders may be in transformers' layout (``config.json`` with a
``model_type`` the component reads), timm's layout (``model.*`` names of the timm model), or splice's own component
names; the layout that places the most tensors wins. Downloads go through huggingface_hub (its cache,
``HF_HUB_OFFLINE``, its progress bars).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import Tensor

from splice.core.checkpoint import (LoadReport, clip_name, dtype_kind, map_from_hf, read_json_mapping,
                                    read_safetensors, read_weights, weights_file)
from splice.core.errors import CheckpointError, ConfigError, SpliceError
from splice.core.sources import fetch, parse

def locate(source: str, *, config_only: bool = False) -> Path:
    """A local path for a pretrained source: the path itself, or the hub snapshot (config.json alone when
    ``config_only``)."""
    return fetch(parse(source, what="pretrained source"), what="pretrained source", config_only=config_only)


def source_config(entry, source: str) -> dict | None:
    """Config values a pretrained source implies for a component (its transformers config.json), or None."""
    if entry.hf is None:
        return None
    parsed = parse(source, what="pretrained source")
    try:
        where = fetch(parsed, what="pretrained source", config_only=True)
    except CheckpointError:
        if parsed.repo is None:
            raise
        return None  # weights-only repos (no config.json): the spec's config stands
    cfg_file = (where if where.is_dir() else where.parent) / "config.json"
    if not cfg_file.exists():
        return None
    from splice.core.configs import checked_config
    from splice.core.transformers_format import part_config_from_hf

    try:
        cfg = read_json_mapping(cfg_file, what="a transformers config (a mapping)")
        if cfg.get("model_type") not in entry.hf.model_types:
            return None
        values, problems = part_config_from_hf(entry, cfg, source=str(cfg_file)), []
        checked_config(entry, values, "", problems)  # the checkpoint's own config must be one splice can build
        if problems:
            raise ConfigError(problems, source=f"{cfg_file} (as a {entry.name} config)")
        return values
    except SpliceError as exc:  # placed under `<role>.pretrained` by the composer: the file goes into each message
        if not exc.source:
            raise
        raise type(exc)([replace(p, path="", message=f"{exc.source}: {p.path + ': ' if p.path else ''}{p.message}")
                         for p in exc.problems]) from None


def _candidates(module, entry, tensors: dict[str, Tensor], hf_config: dict | None, values: dict):
    """(name, mapped, unused, notes) for each layout the tensors could be in."""
    own = set(module.state_dict())
    yield "splice", {k: v for k, v in tensors.items() if k in own}, [k for k in tensors if k not in own], []
    prefixed = {f"model.{k}": v for k, v in tensors.items()}
    if any(k in own for k in prefixed):
        yield "timm", {k: v for k, v in prefixed.items() if k in own}, [k[6:] for k in prefixed if k not in own], []
    if entry.hf is not None:
        cfg = hf_config
        if cfg is None and entry.hf.config_to_hf is not None:
            cfg = entry.hf.config_to_hf(values)
        if cfg is not None:
            try:
                yield "transformers", *map_from_hf(entry.hf, dict(tensors), cfg)
            except (CheckpointError, LookupError, ValueError, TypeError, RuntimeError):
                pass  # not this layout (a plugin's mapping may fail on other tensors in its own way)


def load_part(model, part, *, strict: bool) -> LoadReport:
    """Load one pretrained encoder/decoder into ``model`` in place; new modules keep their fresh init."""
    module = getattr(model, part.role)
    where = locate(part.weights)
    if where.is_file():
        tensors, _ = read_safetensors(where)
        hf_config = None
    else:
        tensors = read_weights(where)
        where = weights_file(where)  # the file named in the messages below
        cfg_file = where.parent / "config.json"
        hf_config = read_json_mapping(cfg_file, what="a transformers config (a mapping)") if cfg_file.exists() else None
        if hf_config is not None and part.entry.hf and hf_config.get("model_type") not in part.entry.hf.model_types:
            hf_config = None
    values = part.config.model_dump()
    layout, mapped, unused, notes = max(_candidates(module, part.entry, tensors, hf_config, values), key=lambda c: len(c[1]))
    if not mapped:
        raise CheckpointError(
            f"{where}: none of its {len(tensors)} tensors fit {part.role} {part.family!r} in splice, timm or "
            f"transformers layout\n    fix: check that `{part.role}.pretrained` points at weights of this architecture"
        )
    _check_fit(where, part, mapped, module.state_dict())
    module.load_state_dict(mapped, strict=False)  # copies, casting floats to the module's dtype
    expected = module.state_dict()
    # modules the kind installed inside the component (an adapter's cross-attention) keep their fresh init
    new = {n for m in getattr(model, "cross_attention_modules", ()) for n in _names_in(module, m)}
    missing = sorted(k for k in expected if k not in mapped and k not in new and not _is_buffer(module, k))
    claimed = _claim_unused(model, part.role, tensors, unused)  # {unused name: the model's name it filled}
    p = part.role
    report = LoadReport(
        source=f"{part.weights} ({layout} layout)",
        loaded=sorted([f"{p}.{k}" for k in mapped] + list(claimed.values())),
        missing=[f"{p}.{k}" for k in missing],
        unused=sorted(f"{p}.{k}" for k in unused if k not in claimed),
        initialised=sorted(f"{p}.{k}" for k in new),
        notes=[f"{p}: {n}" for n in notes],
    )
    if strict and (report.missing or report.unused):
        raise CheckpointError(
            f"{where}: strict warm start found surprises for the {p}\n" + report.listing("missing", "unused")
            + "    fix: load with strict=False to accept them, or point at matching weights"
        )
    return report


def _claim_unused(model, role: str, tensors: dict[str, Tensor], unused: list[str]) -> dict[str, str]:
    """The kind's model takes the part's unused tensors it has a place for (``claim_pretrained``): a tensor is
    found under its unused name, or that name behind a prefix of the file (``vit.pooler...``)."""
    claim = getattr(model, "claim_pretrained", None)
    if not callable(claim) or not unused:
        return {}
    found = {}
    for name in unused:
        key = name if name in tensors else next((k for k in tensors if k.endswith("." + name)), None)
        if key is not None:
            found[name] = tensors[key]
    return claim(role, found)


def _check_fit(where: Path, part, mapped: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Every mapped tensor has the module's shape, and values of its kind (no integers where it holds floats)."""
    bad = [f"{clip_name(k)}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}" for k, v in mapped.items()
           if v.shape != expected[k].shape]
    bad += [f"{clip_name(k)}: {str(v.dtype).removeprefix('torch.')} in the file, the model holds "
            f"{str(expected[k].dtype).removeprefix('torch.')}" for k, v in mapped.items()
            if dtype_kind(v.dtype) != dtype_kind(expected[k].dtype)]
    if bad:
        more = f"\n  ... and {len(bad) - 12} more" if len(bad) > 12 else ""
        raise CheckpointError(f"{where}: tensors that do not fit {part.role} {part.family!r}:\n  "
                              + "\n  ".join(bad[:12]) + more + f"\n    fix: check that `{part.role}.pretrained` "
                              "points at weights of this architecture and size")


def _names_in(root, sub) -> list[str]:
    for prefix, m in root.named_modules():
        if m is sub:
            return [f"{prefix}.{n}" for n in sub.state_dict()]
    return []


def _is_buffer(module, name: str) -> bool:
    return name not in dict(module.named_parameters())


def load_pretrained_parts(model, plan, *, strict: bool = False) -> LoadReport:
    """Warm start: every part whose spec names pretrained weights; returns one combined report."""
    combined = LoadReport(source="")
    sources = []
    parts = plan.components()
    for part in parts:
        if part.weights is None:
            continue
        r = load_part(model, part, strict=strict)
        sources.append(r.source)
        for field in ("loaded", "missing", "unused", "initialised", "notes"):
            getattr(combined, field).extend(getattr(r, field))
    # what the kind added between the components (a projection) is new
    prefixes = tuple(f"{part.role}." for part in parts)
    combined.initialised.extend(k for k in model.state_dict() if not k.startswith(prefixes)
                                and k not in combined.loaded)
    combined.source = "; ".join(sources)
    model.loading_report = combined
    return combined

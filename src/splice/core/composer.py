"""validate(spec) -> Plan; assemble(plan) -> model.

The composer owns every dimension: it reads the encoder's and decoder's widths from the built modules,
decides the projection, builds each cross-attention module from the decoder's layer specs, and checks token ids
and lengths. ``validate`` builds on the meta device, so checking a spec costs no weight memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from splice.core.configs import checked_config, placed, plugin_fault
from splice.core.errors import Problem, Shown, SpliceError, clip, error_for, unknown_problem
from splice.core.meta import params_on_meta
from splice.core.models import EncoderDecoderModel
from splice.core.plugins import get_registry
from splice.core.registry import Entry, Registry
from splice.core.spec import CompositionSpec, parse_spec


@dataclass
class Part:
    """A resolved encoder or decoder."""

    role: str  # "encoder" | "decoder"
    requested: str  # the name as the spec wrote it
    entry: Entry
    config: BaseModel
    preset: str | None = None
    pretrained: bool | str = False
    weights: str | None = None  # where pretrained weights come from (preset source, hub id or path)
    width: int = 0
    params: int = 0

    @property
    def family(self) -> str:
        return self.entry.name


@dataclass
class Plan:
    """What ``compose`` would build, found without allocating weights."""

    spec: CompositionSpec | None
    source: str | None = None
    encoder: Part | None = None
    decoder: Part | None = None
    adapter: Entry | None = None
    adapter_config: BaseModel | None = None
    projection: str | None = None  # None: the context is the encoder output as is
    projection_reason: str = ""
    projection_config: BaseModel | None = None
    context_width: int = 0
    decoder_layers: int = 0
    cross_attention: dict[int, str] = field(default_factory=dict)  # layer -> kind ("native" for built-in)
    params: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    meta_model: EncoderDecoderModel | None = None  # the model on the meta device (params only)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        if self.problems:
            raise error_for(self.problems, source=self.source)

    def resolved_spec(self) -> dict:
        """The spec with presets expanded into full component configs (what ``splice.json`` stores)."""
        assert self.spec is not None and self.encoder is not None and self.decoder is not None
        out = self.spec.model_dump(mode="json")
        for part in (self.encoder, self.decoder):
            out[part.role] = {"name": part.family, "pretrained": False, "config": part.config.model_dump(mode="json")}
        out["cross_attention"]["config"] = self.adapter_config.model_dump(mode="json") if self.adapter_config else {}
        return out

    def summary(self) -> str:
        lines = [f"splice plan{f' for {self.source}' if self.source else ''}"]
        for part in (self.encoder, self.decoder):
            if part is None:
                continue
            via = f" (preset {part.preset})" if part.preset else ""
            weights = "random init" if part.pretrained is False else f"pretrained from {part.weights or '(no source)'}"
            size = f"width {part.width}, {part.params:,} params, " if part.width else ""
            lines.append(f"  {part.role:<9}{part.family}{via}: {size}{weights}")
            cfg = ", ".join(f"{k}={v}" for k, v in part.config.model_dump().items())
            lines.append(f"             config: {cfg}")
        if self.encoder and self.decoder:
            proj = self.projection or "none (identity)"
            lines.append(f"  projection {proj} — {self.projection_reason}")
            lines.append(f"  context width {self.context_width}")
            if self.cross_attention:
                kinds: dict[str, list[int]] = {}
                for layer, kind in sorted(self.cross_attention.items()):
                    kinds.setdefault(kind, []).append(layer)
                desc = "; ".join(f"{k} in layers {_ranges(v)}" for k, v in kinds.items())
                lines.append(f"  cross-attention {desc} (of {self.decoder_layers})")
            else:
                lines.append(f"  cross-attention none (of {self.decoder_layers} layers)")
        if self.params:
            p = self.params
            lines.append(
                f"  parameters total {p['total']:,} | new {p['new']:,} | frozen {p['frozen']:,} "
                f"(encoder {p['encoder']:,}, decoder {p['decoder']:,}, cross-attention {p['cross_attention']:,}, "
                f"projection {p['projection']:,})"
            )
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s):")
            lines.extend("    - " + str(pr).replace("\n", "\n      ") for pr in self.problems)
        else:
            lines.append("  ok")
        return "\n".join(lines)


def _ranges(layers: list[int]) -> str:
    return ", ".join(str(i) for i in layers)


# -- resolution -----------------------------------------------------------------------------------------


def _resolve_part(role: str, spec_part, registry: Registry, problems: list[Problem]) -> Part | None:
    name = spec_part.name
    preset = None
    values = dict(spec_part.config)
    weights = spec_part.pretrained if isinstance(spec_part.pretrained, str) else None
    if registry.has(role, name):
        entry = registry.get(role, name)
    elif (p := registry.preset(role, name)) is not None:
        preset = p.name
        entry_name = p.family
        if not registry.has(role, entry_name):
            problems.append(unknown_problem(role, entry_name, registry.names(role), path=f"{role}.name (preset {name})"))
            return None
        entry = registry.get(role, entry_name)
        values = {**p.config, **values}
        if spec_part.pretrained is True:
            weights = p.weights
    elif role == "encoder" and registry.has("encoder", "timm") and _is_timm_model(name):
        # any timm architecture works as an encoder through the generic `timm` component
        entry = registry.get("encoder", "timm")
        values = {"model": name, **values}
    else:
        known = registry.names(role, with_aliases=True) + [p.name for p in registry.presets.values() if p.kind == role]
        problems.append(unknown_problem(role, name, known, path=f"{role}.name"))
        return None
    if spec_part.pretrained is True and weights is None:
        problems.append(
            Problem(
                f"{role}.pretrained",
                f"`pretrained: true` needs a preset with a weights source, and {name!r} has none",
                given=True,
                expected="a preset name from registry.yaml, or a hub id / local path as the value",
                fix="write `pretrained: <hub id or path>` or `pretrained: false`",
            )
        )
    if weights is not None:
        from splice.core.pretrained import source_config

        try:
            implied = source_config(entry, weights)
        except SpliceError as exc:
            problems.extend(placed(exc, f"{role}.pretrained"))
            return None
        except (OSError, ValueError) as exc:  # a name the file system refuses, a NUL byte
            problems.append(Problem(f"{role}.pretrained", f"cannot read this source: {clip(str(exc), 200)}",
                                    given=weights, expected="a local folder or a hub id owner/name[@revision]",
                                    fix="check the path or the hub id"))
            return None
        if implied:
            values = {**implied, **dict(spec_part.config)}  # the checkpoint's config, then the spec's overrides
    config = checked_config(entry, values, f"{role}.config", problems)
    return None if config is None else Part(role, name, entry, config, preset, spec_part.pretrained, weights)


def _is_timm_model(name: str) -> bool:
    try:
        import timm

        return bool(timm.is_model(name))
    except Exception:
        return False


def _layers_from_spec(layers, n: int, problems: list[Problem]) -> list[int]:
    if layers == "all":
        return list(range(n))
    if layers == "none":
        return []
    if isinstance(layers, str):  # every-N
        step = int(layers.split("-")[1])
        return list(range(0, n, step))
    bad = [i for i in layers if i >= n]
    if bad:
        problems.append(
            Problem(
                "cross_attention.layers",
                f"layer indices {bad} do not exist",
                given=layers,
                expected=f"indices in 0..{n - 1} (the decoder has {n} layers)",
                fix="drop the out-of-range indices",
                error="incompatible",
            )
        )
    return sorted(i for i in layers if i < n)


# -- validate / assemble ------------------------------------------------------------------------------


def validate(source: Any) -> Plan:
    """Resolve and check a spec (path, preset name, dict or CompositionSpec). Never raises for spec problems:
    they are in ``plan.problems`` (``plan.raise_for_problems()`` raises them)."""
    from splice.core.errors import ConfigError

    try:
        spec = parse_spec(source)
    except ConfigError as exc:
        return Plan(spec=None, source=exc.source, problems=exc.problems)
    registry = get_registry()
    plan = Plan(spec=spec, source=str(source) if isinstance(source, str) else None)
    problems = plan.problems
    plan.encoder = _resolve_part("encoder", spec.encoder, registry, problems)
    plan.decoder = _resolve_part("decoder", spec.decoder, registry, problems)
    if registry.has("adapter", spec.cross_attention.kind):
        plan.adapter = registry.get("adapter", spec.cross_attention.kind)
        plan.adapter_config = checked_config(plan.adapter, spec.cross_attention.config, "cross_attention.config", problems)
    else:
        problems.append(
            unknown_problem("adapter", spec.cross_attention.kind, registry.names("adapter", with_aliases=True), path="cross_attention.kind")
        )
    proj = spec.projection_kind
    if proj not in ("auto", "none"):
        if not registry.has("projection", proj):
            problems.append(unknown_problem("projection", proj, ["auto", "none", *registry.names("projection")],
                                            path="projection"))
        else:
            plan.projection_config = checked_config(registry.get("projection", proj), spec.projection_config,
                                                    "projection.config", problems)
    if plan.encoder is None or plan.decoder is None or problems:
        return plan
    with params_on_meta():
        built = _build_parts(plan)
    if built is None:
        return plan
    encoder, decoder = built
    _decide(plan, encoder, decoder)
    if plan.problems or plan.adapter is None:
        return plan
    with params_on_meta():
        model = _join(plan, encoder, decoder)
    if model is None:
        return plan
    _count(plan, model)
    plan.meta_model = model
    return plan


def _build_parts(plan: Plan) -> tuple[nn.Module, nn.Module] | None:
    """The encoder and decoder modules; None (with the problems in the plan) when a builder fails."""
    parts = []
    for part in (plan.encoder, plan.decoder):
        try:
            module = part.entry.builder(part.config)
        except SpliceError as exc:
            plan.problems.extend(placed(exc, f"{part.role}.config"))
            continue
        except Exception as exc:  # noqa: BLE001 - a plugin's builder broke; say whose
            plan.problems.append(plugin_fault(part.entry, f"{part.role}.name", "its builder", exc))
            continue
        width = getattr(module, "hidden_size", None)
        if not isinstance(width, int) or isinstance(width, bool):
            plan.problems.append(
                Problem(f"{part.role}.name", f"component {part.family!r} built a module without an int `hidden_size`",
                        given=Shown(type(width).__name__), expected="an int",
                        fix=f"fix the plugin {part.entry.plugin!r}: it must satisfy the {part.role} protocol")
            )
            continue
        part.width = width
        parts.append(module)
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _decide(plan: Plan, encoder: nn.Module, decoder: nn.Module) -> None:
    """Every dimension check, recorded in the plan."""
    spec, problems = plan.spec, plan.problems
    enc, dec = plan.encoder, plan.decoder
    plan.context_width = dec.width
    enc_from = f"encoder {enc.family!r} hidden_size"
    dec_from = f"decoder {dec.family!r} hidden_size (its cross-attention context width)"
    if spec.projection_kind == "auto":
        if enc.width != dec.width:
            plan.projection, plan.projection_reason = "linear", f"widths differ: {enc.width} ({enc_from}) -> {dec.width}"
        else:
            plan.projection_reason = f"widths match ({enc.width})"
    elif spec.projection_kind == "none":
        if enc.width != dec.width:
            problems.append(
                Problem(
                    "projection",
                    f"`projection: none` but the widths differ: {enc.width} from the {enc_from}, "
                    f"{dec.width} from the {dec_from}",
                    given="none",
                    expected="equal widths, or a projection",
                    fix="use `projection: auto` (or linear / mlp), or pick components of equal width",
                    error="incompatible",
                )
            )
        plan.projection_reason = "none requested"
    else:
        plan.projection, plan.projection_reason = spec.projection_kind, "requested"

    _decide_layers(plan, decoder)

    vocab = getattr(decoder, "vocab_size", None)
    for name, value in spec.tokens.model_dump().items():
        if value is not None and vocab is not None and value >= vocab:
            problems.append(
                Problem(
                    f"tokens.{name}",
                    f"token id {value} is outside the decoder's vocabulary",
                    given=value,
                    expected=f"an id in 0..{vocab - 1} (decoder {dec.family!r} vocab_size {vocab})",
                    fix=f"use an id below {vocab}, or enlarge the decoder's vocabulary",
                    error="incompatible",
                )
            )
    max_pos = getattr(decoder, "max_positions", None)
    if spec.max_length is not None and max_pos is not None and spec.max_length > max_pos:
        problems.append(
            Problem(
                "max_length",
                f"max_length {spec.max_length} exceeds the decoder's {max_pos} positions",
                given=spec.max_length,
                expected=f"at most {max_pos}",
                fix="lower max_length, or raise the decoder's position count",
                error="incompatible",
            )
        )


def _decide_layers(plan: Plan, decoder: nn.Module) -> None:
    """Which decoder layers get cross-attention, and whether their heads fit."""
    spec, problems, dec = plan.spec, plan.problems, plan.decoder
    layer_specs = list(decoder.layer_specs())
    plan.decoder_layers = len(layer_specs)
    if getattr(decoder, "native_cross_attention", False):
        if spec.cross_attention.kind != "standard" or spec.cross_attention.layers != "all":
            problems.append(
                Problem(
                    "cross_attention",
                    f"decoder {dec.family!r} has its own (native) cross-attention in every layer; adapters cannot replace it",
                    given=spec.cross_attention.model_dump(),
                    expected="kind: standard, layers: all",
                    fix="remove the cross_attention block for this decoder",
                    error="incompatible",
                )
            )
        plan.cross_attention = {s.index: "native" for s in layer_specs}
    else:
        before = len(problems)
        chosen = _layers_from_spec(spec.cross_attention.layers, len(layer_specs), problems)
        if not chosen and len(problems) == before:
            problems.append(
                Problem("cross_attention.layers", "no decoder layer gets cross-attention, so the text never sees the image",
                        given=spec.cross_attention.layers, expected="at least one layer",
                        fix="use `layers: all`, `every-N` or a list of layer indices")
            )
        plan.cross_attention = {i: spec.cross_attention.kind for i in chosen}
        for s in layer_specs:
            if s.index in plan.cross_attention and s.width % s.heads:
                problems.append(
                    Problem("decoder.config", f"layer {s.index}: {s.heads} heads do not divide width {s.width}",
                            fix="choose a head count that divides the width", error="incompatible")
                )


def _join(plan: Plan, encoder: nn.Module, decoder: nn.Module) -> EncoderDecoderModel | None:
    """The whole model from its parts; None (with the problems in the plan) when a plugin's builder fails."""
    registry = get_registry()
    proj = None
    if plan.projection is not None:
        entry = registry.get("projection", plan.projection)
        config = plan.projection_config or entry.make_config()
        proj = _plugin_call(plan, entry, "projection", lambda: entry.builder(config)(plan.encoder.width, plan.context_width))
    installed: list[nn.Module] = []
    if not getattr(decoder, "native_cross_attention", False):
        installed = _plugin_call(plan, plan.adapter, "cross_attention.kind", lambda: _adapters(plan, decoder)) or []
    if plan.problems:
        return None
    spec = plan.resolved_spec()
    model = EncoderDecoderModel(encoder, decoder, proj, tokens=spec["tokens"], spec=spec, cross_attention=installed)
    if plan.spec.max_length is not None:
        model.generation_defaults["max_length"] = plan.spec.max_length
    apply_freeze(model, plan.spec.freeze)
    return model


def _adapters(plan: Plan, decoder: nn.Module) -> list[nn.Module]:
    adapter = plan.adapter.builder(plan.adapter_config)
    specs = {s.index: s for s in decoder.layer_specs()}
    installed = []
    for layer in sorted(plan.cross_attention):
        module = adapter.build(specs[layer], plan.context_width)
        decoder.install_cross_attention(layer, module)
        installed.append(module)
    return installed


def _plugin_call(plan: Plan, entry: Entry, path: str, fn: Any) -> Any:
    """``fn()``; an exception from the plugin's code becomes a problem in the plan (and None)."""
    try:
        return fn()
    except SpliceError as exc:
        plan.problems.extend(placed(exc, path))
    except Exception as exc:  # noqa: BLE001 - a plugin's builder broke; say whose
        plan.problems.append(plugin_fault(entry, path, "its builder", exc))
    return None


def apply_freeze(model: EncoderDecoderModel, freeze: list[str]) -> None:
    """Turn off gradients for the named parts; adapters stay trainable unless named."""
    cross = {id(p) for m in model.cross_attention_modules for p in m.parameters()}
    groups = {
        "encoder": list(model.encoder.parameters()),
        "decoder": [p for p in model.decoder.parameters() if id(p) not in cross],
        "cross_attention": [p for m in model.cross_attention_modules for p in m.parameters()],
        "projection": list(model.enc_to_dec_proj.parameters()) if model.enc_to_dec_proj is not None else [],
    }
    for part in freeze:
        for p in groups[part]:
            p.requires_grad_(False)


def _count(plan: Plan, model: EncoderDecoderModel) -> None:
    cross = sum(p.numel() for m in model.cross_attention_modules for p in m.parameters())
    enc = sum(p.numel() for p in model.encoder.parameters())
    dec = sum(p.numel() for p in model.decoder.parameters()) - cross
    proj = sum(p.numel() for p in model.enc_to_dec_proj.parameters()) if model.enc_to_dec_proj is not None else 0
    plan.encoder.params, plan.decoder.params = enc, dec
    new = cross + proj + (enc if plan.encoder.pretrained is False else 0) + (dec if plan.decoder.pretrained is False else 0)
    plan.params = {
        "total": enc + dec + cross + proj,
        "new": new,
        "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "encoder": enc,
        "decoder": dec,
        "cross_attention": cross,
        "projection": proj,
    }


def assemble(plan: Plan, *, meta: bool = False) -> EncoderDecoderModel:
    """Build the planned model with real (randomly initialised) weights, or on the meta device."""
    plan.raise_for_problems()
    ctx = params_on_meta() if meta else contextlib.nullcontext()
    with ctx:
        built = _build_parts(plan)
        model = _join(plan, *built) if built is not None else None
    plan.raise_for_problems()
    assert model is not None
    return model


def compose(source: Any, *, seed: int | None = None, strict: bool = False) -> EncoderDecoderModel:
    """Validate a spec and build its model. Raises the first problem's ``SpliceError`` subclass, listing all.

    Pretrained parts are loaded into the fresh model; ``model.loading_report`` says what was loaded, newly
    initialised and unused, and ``strict=True`` makes any missing or unused weight an error."""
    plan = validate(source)
    plan.raise_for_problems()
    if seed is not None:
        torch.manual_seed(seed)
    model = assemble(plan)
    if plan.encoder.pretrained is not False or plan.decoder.pretrained is not False:
        from splice.core.pretrained import load_pretrained_parts

        load_pretrained_parts(model, plan, strict=strict)
    return model

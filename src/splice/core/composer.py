"""validate(spec) -> Plan; assemble(plan) -> model; compose(spec) does both. The same for every composition kind.

``validate`` reads the spec within its bounds, picks the kind its ``kind:`` names (a registered ``Kind``; none
given: ``encoder-decoder``), checks the spec against the kind's spec model, and hands it to the kind's own
``validate``. Kinds plan with the helpers here, so that every kind resolves, builds and checks a component the
same way: ``resolve_part`` (a registered name, a preset or any timm model, with its config checked),
``build_part`` (the plugin's builder, on the meta device during validate, then ``roles.check_role``: the role's
Protocol and a dry forward) and ``plugin_call`` (an exception from plugin code becomes a Problem naming it).
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from splice.core.configs import checked_config, placed, plugin_fault
from splice.core.errors import ConfigError, InputError, Problem, SpliceError, clip
from splice.core.kinds import DEFAULT_KIND, Kind, Plan
from splice.core.meta import params_on_meta
from splice.core.plugins import get_registry
from splice.core.registry import Entry, Registry
from splice.core.roles import check_role
from splice.core.spec import problems_from_validation, read_spec_source

__all__ = ["Part", "Plan", "apply_freeze", "assemble", "build_part", "compose", "count_params", "get_kind",
           "plugin_call", "resolve_part", "validate"]


@dataclass
class Part:
    """A resolved component: the registered entry, its checked config, and where its weights come from."""

    role: str  # the spec's key for it ("encoder", "decoder", "vision", ...), also its attribute in the model
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

    def summary_lines(self) -> list[str]:
        via = f" (preset {self.preset})" if self.preset else ""
        weights = "random init" if self.pretrained is False else f"pretrained from {self.weights or '(no source)'}"
        size = f"width {self.width}, {self.params:,} params, " if self.width else ""
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.model_dump().items())
        return [f"  {self.role:<9}{self.family}{via}: {size}{weights}", f"             config: {cfg}"]


# -- resolution -----------------------------------------------------------------------------------------


def resolve_part(role: str, spec_part: Any, problems: list[Problem], *, kind: str | None = None,
                 registry: Registry | None = None) -> Part | None:
    """The component a spec's ``role:`` block names (``name``, ``pretrained``, ``config``), its config checked, or
    None with the problems appended. ``kind`` is the registry's kind of component (default: ``role``)."""
    registry = registry or get_registry()
    kind = kind or role
    name = spec_part.name
    preset = None
    values = dict(spec_part.config)
    weights = spec_part.pretrained if isinstance(spec_part.pretrained, str) else None
    if registry.has(kind, name):
        entry = registry.get(kind, name)
    elif (p := registry.preset(kind, name)) is not None:
        preset = p.name
        if not registry.has(kind, p.family):
            problems.append(registry.missing_problem(kind, p.family, path=f"{role}.name (preset {name})"))
            return None
        entry = registry.get(kind, p.family)
        values = {**p.config, **values}
        if spec_part.pretrained is True:
            weights = p.weights
    elif kind == "encoder" and registry.has("encoder", "timm") and _is_timm_model(name):
        # any timm architecture works as an encoder through the generic `timm` component
        entry = registry.get("encoder", "timm")
        values = {"model": name, **values}
    else:
        problems.append(registry.missing_problem(kind, name, path=f"{role}.name"))
        return None
    if spec_part.pretrained is True and weights is None:
        problems.append(Problem(f"{role}.pretrained", f"`pretrained: true` needs a preset with a weights source, "
                                f"and {name!r} has none", given=True,
                                expected="a preset name from registry.yaml, or a hub id / local path as the value",
                                fix="write `pretrained: <hub id or path>` or `pretrained: false`"))
    if weights is not None:
        implied = _implied_config(entry, weights, f"{role}.pretrained", problems)
        if implied is None:
            return None
        values = {**implied, **dict(spec_part.config)}  # the checkpoint's config, then the spec's overrides
    config = checked_config(entry, values, f"{role}.config", problems)
    return None if config is None else Part(role, name, entry, config, preset, spec_part.pretrained, weights)


def _implied_config(entry: Entry, weights: str, path: str, problems: list[Problem]) -> dict | None:
    """The config a pretrained source implies (``{}`` when none); None (with a problem) when it cannot be read."""
    from splice.core.pretrained import source_config

    try:
        return source_config(entry, weights) or {}
    except SpliceError as exc:
        problems.extend(placed(exc, path))
    except (OSError, ValueError) as exc:  # a name the file system refuses, a NUL byte
        problems.append(Problem(path, f"cannot read this source: {clip(str(exc), 200)}", given=weights,
                                expected="a local folder or a hub id owner/name[@revision]",
                                fix="check the path or the hub id"))
    return None


def _is_timm_model(name: str) -> bool:
    try:
        import timm

        return bool(timm.is_model(name))
    except Exception:
        return False


# -- building -------------------------------------------------------------------------------------------


def build_part(part: Part, problems: list[Problem]) -> nn.Module | None:
    """The part's module from its plugin's builder; sets ``part.width``. Built on the meta device (``validate``),
    it is checked against its role (``roles.check_role``: attributes and a dry forward); a real build was checked
    by the validate before it. None (with one problem naming the plugin) when the builder fails or the module
    lies."""
    module = plugin_call(problems, part.entry, f"{part.role}.config", lambda: part.entry.builder(part.config),
                         path_for_fault=f"{part.role}.name")
    if module is None:
        return None
    on_meta = isinstance(module, nn.Module) and any(p.is_meta for p in module.parameters())
    if (on_meta or not isinstance(module, nn.Module)) and not check_role(part.entry, module, f"{part.role}.name",
                                                                          problems):
        return None
    part.width = getattr(module, "hidden_size", 0)
    return module


def plugin_call(problems: list[Problem], entry: Entry, path: str, fn: Callable[[], Any], *,
                path_for_fault: str | None = None, what: str = "its builder") -> Any:
    """``fn()``; a SpliceError it raises becomes its problems (placed at ``path``), any other exception a problem
    naming the plugin (at ``path_for_fault``, default ``path``), and the result None."""
    try:
        return fn()
    except SpliceError as exc:
        problems.extend(placed(exc, path))
    except Exception as exc:  # noqa: BLE001 - a plugin's code broke; say whose
        problems.append(plugin_fault(entry, path_for_fault or path, what, exc))
    return None


def count_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


# -- validate / assemble --------------------------------------------------------------------------------


def get_kind(name: str, registry: Registry | None = None, *, path: str = "kind") -> Kind:
    """The registered composition kind ``name``; ``UnknownComponentError`` (with a did-you-mean) otherwise."""
    return (registry or get_registry()).get("kind", name, path=path).impl


def validate(source: Any) -> Plan:
    """Resolve and check a spec (path, preset name, dict or spec object). Never raises for spec problems: they
    are in ``plan.problems`` (``plan.raise_for_problems()`` raises them)."""
    where = str(source) if isinstance(source, str) else None
    try:
        data, where_read = read_spec_source(source)
    except ConfigError as exc:
        return Plan(spec=None, source=exc.source, problems=exc.problems)
    where = where_read if where is None else where
    name = data.get("kind", DEFAULT_KIND)
    registry = get_registry()
    if not isinstance(name, str) or not registry.has("kind", name):
        known = registry.names("kind")
        close = difflib.get_close_matches(str(name)[:100], known, n=1, cutoff=0.5) if isinstance(name, str) else []
        return Plan(spec=None, source=where, problems=[Problem(
            "kind", "unknown composition kind", given=name, expected=f"one of {', '.join(known)}",
            fix=f"did you mean {close[0]!r}?" if close else "`splice list --kind kind` lists them; or install the "
            "plugin that provides it", error="unknown")])
    entry = registry.get("kind", name)
    kind: Kind = entry.impl
    try:
        spec = kind.spec_model.model_validate(data)
    except ValidationError as exc:
        return Plan(spec=None, source=where, kind=name,
                    problems=problems_from_validation(exc, model=kind.spec_model))
    problems: list[Problem] = []
    plan = plugin_call(problems, entry, "kind", lambda: kind.validate(spec, where), what="its validate")
    if plan is None or not isinstance(plan, Plan):
        if not problems:
            problems.append(plugin_fault(entry, "kind", "its validate", TypeError(
                f"validate returned {type(plan).__name__}, not a splice Plan")))
        return Plan(spec=spec, source=where, kind=name, problems=problems)
    plan.kind, plan.source = name, where
    return plan


def assemble(plan: Plan, *, meta: bool = False) -> nn.Module:
    """Build the planned model with real (randomly initialised) weights, or on the meta device."""
    plan.raise_for_problems()
    entry = get_registry().get("kind", plan.kind)
    problems: list[Problem] = []
    with params_on_meta() if meta else contextlib.nullcontext():
        model = plugin_call(problems, entry, "kind", lambda: entry.impl.assemble(plan), what="its assemble")
    plan.problems.extend(problems)
    plan.raise_for_problems()
    return model


def compose(source: Any, *, seed: int | None = None, strict: bool = False) -> nn.Module:
    """Validate a spec and build its model. Raises the first problem's ``SpliceError`` subclass, listing all.

    Pretrained parts are loaded into the fresh model; ``model.loading_report`` says what was loaded, newly
    initialised and unused, and ``strict=True`` makes any missing or unused weight an error."""
    plan = validate(source)
    plan.raise_for_problems()
    if seed is not None:
        torch.manual_seed(seed)
    model = assemble(plan)
    if any(part.weights is not None for part in plan.components()):
        from splice.core.pretrained import load_pretrained_parts

        load_pretrained_parts(model, plan, strict=strict)
    return model


def apply_freeze(model: nn.Module, names: list[str]) -> None:
    """Turn off gradients for the named parts of ``model`` (its kind's ``freeze`` names them)."""
    freeze = getattr(model, "freeze", None)
    if not callable(freeze):
        raise InputError(f"freeze: a {type(model).__name__} has no parts to freeze by name\n"
                         "    fix: set requires_grad_(False) on its parameters yourself")
    freeze(names)

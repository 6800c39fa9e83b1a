"""Name -> entry, for every kind of component, plus the named presets of registry.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

import yaml
from pydantic import BaseModel

from splice.core.errors import PluginError, Problem, UnknownComponentError, unknown_problem
from splice.core.interfaces import HFInterop

KINDS = ("encoder", "decoder", "text_encoder", "adapter", "projection", "kind")  # "kind": composition kinds


class DuplicateNameError(PluginError):
    """A spec used a name (or alias) that two plugins registered for one kind. The name is switched off (which of
    the two the user meant is theirs to decide); every other component of both plugins works."""


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    kind: str
    name: str
    builder: Callable[[Any], Any]
    config_cls: type[BaseModel]
    plugin: str
    aliases: tuple[str, ...] = ()
    tiny: dict | None = None
    hf: HFInterop | None = None
    description: str = ""
    dist: str = ""  # the distribution that installed the plugin ("splice" for the built-ins), when known
    impl: Any = None  # a composition kind's ``splice.Kind`` (the kind "kind" only)

    def make_config(self, values: dict | None = None) -> BaseModel:
        return self.config_cls(**(values or {}))


@dataclass(frozen=True)
class Preset:
    """A named component (a registered family + config + where its weights come from)."""

    name: str
    kind: str
    family: str
    config: dict = field(default_factory=dict)
    weights: str | None = None
    description: str = ""


class Registry:
    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._aliases: dict[str, dict[str, str]] = {k: {} for k in KINDS}
        self.presets: dict[str, Preset] = {}
        self.compositions: dict[str, dict] = {}
        self.composition_descriptions: dict[str, str] = {}
        # kind -> name -> the entries that claimed it: a name two plugins registered is switched off
        self.clashes: dict[str, dict[str, list[Entry]]] = {k: {} for k in KINDS}
        self.failed_plugins: list[Any] = []  # PluginFailure of each plugin that did not load (build_registry sets it)

    # -- registration -------------------------------------------------------------------------------
    def add(self, entry: Entry) -> list[str]:
        """Register ``entry``; returns its names (or aliases) another plugin registered too. Those names are
        switched off for both (a spec using one gets ``DuplicateNameError``); the entries' other names work."""
        kind, clashing = entry.kind, []
        for name in (entry.name, *entry.aliases):
            owner = self._owner(kind, name, clashed=True)
            if owner is not None or name in self.clashes[kind]:
                claims = self.clashes[kind].setdefault(name, [owner] if owner is not None else [])
                claims.append(entry)
                clashing.append(name)
        if entry.name not in clashing:
            self._entries[kind][entry.name] = entry
            for alias in entry.aliases:
                if alias not in clashing:
                    self._aliases[kind][alias] = entry.name
        return clashing

    def _owner(self, kind: str, name: str, *, clashed: bool = False) -> Entry | None:
        if name in self.clashes[kind] and not clashed:
            return None
        if name in self._entries[kind]:
            return self._entries[kind][name]
        if name in self._aliases[kind]:
            return self._entries[kind][self._aliases[kind][name]]
        return None

    # -- lookup -------------------------------------------------------------------------------------
    def names(self, kind: str, *, with_aliases: bool = False) -> list[str]:
        names = list(self._entries[kind])
        if with_aliases:
            names += list(self._aliases[kind])
        return sorted(n for n in names if n not in self.clashes[kind])

    def entries(self, kind: str) -> list[Entry]:
        return [self._entries[kind][n] for n in sorted(self._entries[kind]) if n not in self.clashes[kind]]

    def has(self, kind: str, name: str) -> bool:
        return self._owner(kind, name) is not None

    def get(self, kind: str, name: str, *, path: str | None = None) -> Entry:
        entry = self._owner(kind, name)
        if entry is None:
            problem = self.missing_problem(kind, name, path=path or "")
            raise (DuplicateNameError if problem.error == "plugin" else UnknownComponentError)([problem])
        return entry

    def missing_problem(self, kind: str, name: str, *, path: str = "", list_kind: str | None = None) -> Problem:
        """Why ``name`` is no usable ``kind``: two plugins registered it, or no plugin did (naming each plugin that
        failed to load, which could have been the one)."""
        claims = self.clashes[kind].get(name)
        if claims:
            who = " and ".join(f"plugin {e.plugin!r}" + (f" (package {e.dist!r})" if e.dist else "") for e in claims)
            return Problem(path, f"{kind} name {name!r} is registered by {who}, so it is switched off (their other "
                           "components work)", given=name, expected=f"a {kind} name one plugin registers",
                           fix=f"uninstall one of the packages, or SPLICE_DISABLE_PLUGINS={claims[-1].plugin} (or "
                           f"{claims[0].plugin}) to switch one plugin off; or ask one author to rename it",
                           error="plugin")
        known = self.names(kind, with_aliases=True)
        if kind in ("encoder", "decoder", "text_encoder"):
            known += [p.name for p in self.presets.values() if p.kind == kind]
        problem = unknown_problem(kind, name, known, path=path, list_kind=list_kind)
        failed = [f for f in self.failed_plugins if f.stage == "import"]
        if not failed:
            return problem
        notes = "; ".join(f"plugin {f.plugin!r}" + (f" (package {f.dist})" if f.dist else "")
                          + f" failed to load: {f.error}" for f in failed[:3])
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        return Problem(path, f"{problem.message}; it may be one of these: {notes}{more}", expected=problem.expected,
                       fix=f"{problem.fix}; `splice list` shows why each plugin failed, with its fix",
                       error="unknown")

    def preset(self, kind: str, name: str) -> Preset | None:
        p = self.presets.get(name)
        return p if p is not None and p.kind == kind else None

    def by_hf_model_type(self, kind: str, model_type: str) -> Entry | None:
        """The first registered component of ``kind`` that reads transformers' ``model_type``."""
        for entry in self._entries[kind].values():
            if entry.hf is not None and model_type in entry.hf.model_types:
                return entry
        return None

    # -- presets ------------------------------------------------------------------------------------
    def load_presets(self, text: str | None = None) -> None:
        if text is None:
            text = resources.files("splice").joinpath("registry.yaml").read_text()
        data = yaml.safe_load(text) or {}
        for kind_key, kind in (("encoders", "encoder"), ("decoders", "decoder")):
            for name, body in (data.get(kind_key) or {}).items():
                self.presets[name] = Preset(
                    name=name,
                    kind=kind,
                    family=body["family"],
                    config=dict(body.get("config") or {}),
                    weights=body.get("weights"),
                    description=body.get("description", ""),
                )
        for name, body in (data.get("compositions") or {}).items():
            body = dict(body)
            self.composition_descriptions[name] = body.pop("description", "")
            self.compositions[name] = body

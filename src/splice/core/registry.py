"""Name -> entry, for every kind of component, plus the named presets of registry.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

import yaml
from pydantic import BaseModel

from splice.core.errors import PluginError, UnknownComponentError
from splice.core.interfaces import HFInterop

KINDS = ("encoder", "decoder", "text_encoder", "adapter", "projection", "kind")  # "kind": composition kinds


class DuplicateNameError(PluginError):
    """Two plugins registered one name (or alias) of one kind. Raised for the whole registry, not recorded as
    one plugin's failure: which of the two the user meant is theirs to decide."""


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

    # -- registration -------------------------------------------------------------------------------
    def add(self, entry: Entry) -> None:
        kind = entry.kind
        for name in (entry.name, *entry.aliases):
            owner = self._owner(kind, name)
            if owner is not None:
                raise DuplicateNameError(
                    f"{kind} name {name!r} is registered twice: by plugin {owner.plugin!r} and by plugin "
                    f"{entry.plugin!r}\n    fix: rename one of them, or uninstall/disable one plugin "
                    f"(SPLICE_DISABLE_PLUGINS={entry.plugin})"
                )
        self._entries[kind][entry.name] = entry
        for alias in entry.aliases:
            self._aliases[kind][alias] = entry.name

    def _owner(self, kind: str, name: str) -> Entry | None:
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
        return sorted(names)

    def entries(self, kind: str) -> list[Entry]:
        return [self._entries[kind][n] for n in sorted(self._entries[kind])]

    def has(self, kind: str, name: str) -> bool:
        return self._owner(kind, name) is not None

    def get(self, kind: str, name: str, *, path: str | None = None) -> Entry:
        entry = self._owner(kind, name)
        if entry is None:
            known = self.names(kind, with_aliases=True)
            if kind in ("encoder", "decoder", "text_encoder"):
                known += [p.name for p in self.presets.values() if p.kind == kind]
            raise UnknownComponentError.for_name(kind, name, known, path=path or "")
        return entry

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

"""Finding plugins: the built-ins by module path, then third parties through the ``splice`` entry points.

Every plugin goes through the same hooks. A plugin that fails to import, or raises inside a hook, is recorded
in ``failures`` (shown by ``splice list``) and the others keep working.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from splice.core import hookspecs
from splice.core.errors import PluginError
from splice.core.registry import Entry, Registry

ENTRY_POINT_GROUP = "splice"
BUILTIN_PLUGINS = (
    "splice.plugins.timm_vision",
    "splice.plugins.gpt2",
    "splice.plugins.bert",
    "splice.plugins.roberta",
    "splice.plugins.bart",
    "splice.adapters.cross_attention",
    "splice.adapters.projection",
)
_HOOKS = {
    "register_encoders": "encoder",
    "register_decoders": "decoder",
    "register_adapters": "adapter",
    "register_projections": "projection",
}


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    stage: str  # "import" or the hook's name
    error: str

    def __str__(self) -> str:
        return f"{self.plugin} ({self.stage}): {self.error}"


def _disabled() -> set[str]:
    raw = os.environ.get("SPLICE_DISABLE_PLUGINS", "")
    return {p.strip() for p in raw.split(",") if p.strip()}


def build_registry(*, entry_points_enabled: bool = True, extra_plugins: tuple[Any, ...] = ()) -> tuple[Registry, list[PluginFailure]]:
    """Load every plugin and let each register its components. Returns the registry and the failures.

    ``SPLICE_DISABLE_PLUGINS`` is a comma-separated list of plugin names to skip (an entry point's name, a
    built-in's module path); ``all-external`` (or ``entry_points_enabled=False``) skips every entry point.
    """
    pm = pluggy.PluginManager("splice")
    pm.add_hookspecs(hookspecs)
    failures: list[PluginFailure] = []
    disabled = _disabled()

    for modname in BUILTIN_PLUGINS:
        if modname in disabled:
            continue
        try:
            pm.register(importlib.import_module(modname), name=modname)
        except Exception as exc:  # a broken plugin must not take the others down
            failures.append(PluginFailure(modname, "import", f"{type(exc).__name__}: {exc}"))

    if entry_points_enabled and "all-external" not in disabled:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in disabled or ep.value in disabled:
                continue
            if pm.has_plugin(ep.name):
                failures.append(PluginFailure(ep.name, "import", "a plugin of this name is already loaded"))
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as exc:
                failures.append(PluginFailure(ep.name, "import", f"{type(exc).__name__}: {exc}"))

    for i, plugin in enumerate(extra_plugins):
        pm.register(plugin, name=getattr(plugin, "__name__", f"extra-{i}"))

    registry = Registry()
    for hook_name, kind in _HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin_name = impl.plugin_name
            try:
                impl.function(register=_register_fn(registry, kind, plugin_name))
            except PluginError:
                raise  # duplicate names are the user's to resolve, loudly
            except Exception as exc:
                failures.append(PluginFailure(plugin_name, hook_name, f"{type(exc).__name__}: {exc}"))
    registry.load_presets()
    return registry, failures


def _register_fn(registry: Registry, kind: str, plugin_name: str):
    def register(name, builder, config_cls, *, aliases=(), tiny=None, hf=None, description=None):
        if not callable(builder):
            raise TypeError(f"register({name!r}): builder must be callable, got {builder!r}")
        if not (isinstance(config_cls, type) and hasattr(config_cls, "model_validate")):
            raise TypeError(f"register({name!r}): config_cls must be a pydantic model class, got {config_cls!r}")
        doc = description or (builder.__doc__ or "").strip().split("\n")[0]
        registry.add(
            Entry(kind, name, builder, config_cls, plugin_name, tuple(aliases), tiny, hf, doc)
        )

    return register


_lock = threading.Lock()
_cached: tuple[Registry, list[PluginFailure]] | None = None


def get_registry() -> Registry:
    return _load()[0]


def plugin_failures() -> list[PluginFailure]:
    return list(_load()[1])


def _load() -> tuple[Registry, list[PluginFailure]]:
    global _cached
    with _lock:
        if _cached is None:
            _cached = build_registry()
        return _cached


def reset_registry() -> None:
    """Forget the loaded plugins (tests, or after installing a plugin in the same process)."""
    global _cached
    with _lock:
        _cached = None

"""Finding plugins: the built-ins by module path, then third parties through the ``splice`` entry points.

Every plugin goes through the same hooks, under the same rules (docs/writing-a-plugin.md, "Rules and limits"):

- a plugin that fails to import, raises (even ``SystemExit``) or runs past its time limit inside a hook, marks a
  function that is not a hook, or calls ``register`` wrongly is recorded in ``failures`` (shown by ``splice
  list``), and the others keep working;
- what a plugin prints goes to stderr, never to splice's stdout (``splice list --json`` stays valid JSON);
- each registered builder and config class is wrapped, so that an exception raised inside it becomes a
  ``PluginError`` naming the component, the plugin and its distribution.

Two plugins registering one name switch that name off, and only that name: the clash is recorded for both plugins
(``splice list`` shows it), a spec that uses the name gets a ``DuplicateNameError`` naming both, and every other
component works.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import inspect
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from importlib.metadata import entry_points
from typing import Any, Callable

import pluggy
from pydantic import BaseModel, ValidationError

from splice.core import hookspecs
from splice.core.errors import ConfigError, PluginError, Problem, SpliceError, clip, short
from splice.core.interfaces import HFInterop
from splice.core.registry import Entry, Registry

ENTRY_POINT_GROUP = "splice"
BUILTIN_PLUGINS = (
    "splice.plugins.timm_vision",
    "splice.plugins.donut_swin",
    "splice.plugins.clip_vision",
    "splice.plugins.gpt2",
    "splice.plugins.bert",
    "splice.plugins.roberta",
    "splice.plugins.bart",
    "splice.plugins.trocr",
    "splice.plugins.mbart",
    "splice.plugins.llama",
    "splice.adapters.cross_attention",
    "splice.adapters.projection",
    "splice.kinds.encoder_decoder",
    "splice.kinds.dual_encoder",
    "splice.kinds.prefix_lm",
    "splice.kinds.single_stream",
)
_HOOKS = {
    "register_encoders": "encoder",
    "register_decoders": "decoder",
    "register_text_encoders": "text_encoder",
    "register_adapters": "adapter",
    "register_projections": "projection",
    "register_kinds": "kind",
}
TIMEOUT_ENV, DEFAULT_TIMEOUT = "SPLICE_PLUGIN_TIMEOUT", 60.0  # a plugin's import, one hook, one config check
BUILD_TIMEOUT_ENV, DEFAULT_BUILD_TIMEOUT = "SPLICE_BUILD_TIMEOUT", 600.0  # one call of a builder
NAME_LIMIT, DESCRIPTION_LIMIT, MESSAGE_LIMIT = 100, 200, 300
_ROLE_PATH = {"encoder": "encoder", "decoder": "decoder", "text_encoder": "text", "adapter": "cross_attention",
              "projection": "projection", "kind": "kind"}
_PIP_NAMES = {"cv2": "opencv-python", "PIL": "Pillow", "sklearn": "scikit-learn", "skimage": "scikit-image",
              "yaml": "PyYAML", "bs4": "beautifulsoup4", "google.protobuf": "protobuf"}


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    stage: str  # "import", "hooks" (a misspelt or unmarked hook, a bad hook signature), or the hook's name
    error: str
    fix: str = ""
    dist: str = ""  # the distribution that installed the plugin, when known
    clash: bool = False  # a name two plugins registered (switched off alone; the plugin itself loaded)

    def __str__(self) -> str:
        text = f"{self.plugin} ({self.stage}): {self.error}"
        return text + (f"\n      fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class _Source:
    """Where a plugin comes from: its name (as `splice list` shows it), distribution and module."""

    name: str
    dist: str = ""
    module: str = ""

    def fix(self, first: str = "report this to the plugin's author") -> str:
        return f"{first}, or SPLICE_DISABLE_PLUGINS={self.name} to switch the plugin off"

    def failure(self, stage: str, error: str, fix: str = "") -> PluginFailure:
        return PluginFailure(self.name, stage, error, fix or self.fix(), self.dist)


def _disabled() -> set[str]:
    raw = os.environ.get("SPLICE_DISABLE_PLUGINS", "")
    return {p.strip() for p in raw.split(",") if p.strip()}


def time_limit(var: str = TIMEOUT_ENV, default: float = DEFAULT_TIMEOUT) -> float:
    """Seconds from the environment variable ``var`` (0: no limit); a value that is not a number is an error."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError([Problem(var, f"{var} is not a time limit", given=raw, expected="a number of seconds >= 0 "
                                   "(0: no limit)", fix=f"set {var}={default:g}, or unset it")])
    return min(value, 1e7)


# -- running plugin code: stdout to stderr, bounded in time ----------------------------------------------------


class PluginTimeout(BaseException):
    """Raised inside plugin code that ran past its time limit. A BaseException, so that a plugin's own
    ``except Exception`` does not swallow it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        super().__init__(f"timed out after {seconds:g} s")


class _Deadline:
    """Raise ``PluginTimeout`` in the main thread after ``seconds`` (0: never), through SIGALRM.

    An alarm already set outside (a test harness's) keeps its time: it fires when it is due, through its own
    handler, and ``outer_raised`` says so, so that the caller lets that exception through. Off the main thread
    (or without SIGALRM) nothing is bounded."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.outer_fired = self.outer_raised = False
        self.active = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "_Deadline":
        if not self.active:
            return self
        self.start = time.monotonic()
        self.old_handler = signal.signal(signal.SIGALRM, self._alarm)
        self.outer_left, self.outer_interval = signal.setitimer(signal.ITIMER_REAL, 0)
        self.outer_first = self.outer_left > 0 and (self.seconds <= 0 or self.outer_left <= self.seconds)
        delay = self.outer_left if self.outer_first else self.seconds
        if delay > 0:
            signal.setitimer(signal.ITIMER_REAL, delay)
        return self

    def _alarm(self, signum, frame) -> None:
        if not self.outer_first:
            raise PluginTimeout(self.seconds)
        self.outer_first, self.outer_fired = False, True
        if callable(self.old_handler):
            try:
                self.old_handler(signum, frame)
            except BaseException:
                self.outer_raised = True
                raise
        if self.seconds > 0:  # the outer handler returned: our own limit still holds
            signal.setitimer(signal.ITIMER_REAL, max(self.seconds - (time.monotonic() - self.start), 1e-3))

    def __exit__(self, *exc) -> bool:
        if not self.active:
            return False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old_handler if self.old_handler is not None else signal.SIG_DFL)
        if self.outer_left > 0 and not self.outer_fired:  # the outer alarm has not fired yet: give it its time back
            left = self.outer_left - (time.monotonic() - self.start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), self.outer_interval)
        return False


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send what plugin code prints to stderr: Python's ``sys.stdout`` and file descriptor 1 both."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr if sys.stderr is not None else io.StringIO()):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def run_plugin_code(fn: Callable[[], Any], seconds: float) -> tuple[Any, BaseException | None]:
    """``fn()`` with its stdout sent to stderr, bounded by ``seconds``: ``(value, None)``, or ``(None, exc)`` for
    anything it raised (``SystemExit`` included; ``PluginTimeout`` when it ran too long). A KeyboardInterrupt,
    and an alarm set outside this call, pass through."""
    deadline = _Deadline(seconds)
    try:
        with _stdout_to_stderr(), deadline:
            return fn(), None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a plugin must not take splice down, whatever it raises
        if deadline.outer_raised:
            raise
        return None, exc


def _describe(exc: BaseException) -> str:
    """One bounded line for an exception a plugin raised."""
    if isinstance(exc, PluginTimeout):
        return f"timed out after {exc.seconds:g} s"
    if isinstance(exc, SystemExit):
        return f"SystemExit({short(exc.code)}): the plugin tried to end the process"
    try:
        text = " ".join(str(exc).split())
    except Exception:  # noqa: BLE001 - a hostile __str__
        text = "<a message that could not be rendered>"
    text = clip(text, MESSAGE_LIMIT)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _timeout_fix(source: _Source, exc: BaseException, var: str = TIMEOUT_ENV) -> str:
    if isinstance(exc, PluginTimeout):
        return source.fix(f"report this to the plugin's author; raise {var} (seconds, 0: no limit) if it is "
                          "only slow")
    return source.fix()


# -- loading ---------------------------------------------------------------------------------------------------


def build_registry(*, entry_points_enabled: bool = True, extra_plugins: tuple[Any, ...] = ()) -> tuple[Registry, list[PluginFailure]]:
    """Load every plugin and let each register its components. Returns the registry and the failures.

    ``SPLICE_DISABLE_PLUGINS`` is a comma-separated list of plugin names to skip (an entry point's name, a
    built-in's module path); ``all-external`` (or ``entry_points_enabled=False``) skips every entry point.
    ``SPLICE_PLUGIN_TIMEOUT`` bounds each third-party plugin's import and each of its hook calls (seconds;
    default 60, 0: no limit).
    """
    pm = pluggy.PluginManager("splice")
    pm.add_hookspecs(hookspecs)
    failures: list[PluginFailure] = []
    sources: dict[str, _Source] = {}
    disabled = _disabled()
    limit = time_limit()
    with _stdout_to_stderr():
        for modname in BUILTIN_PLUGINS:  # splice's own code: not bounded in time (a slow disk is no plugin fault)
            if modname not in disabled:
                load = functools.partial(importlib.import_module, modname)
                _add_plugin(pm, _Source(modname, "splice", modname), load, 0, failures, sources)
        if entry_points_enabled and "all-external" not in disabled:
            for ep in _entry_points(failures):
                if ep.name not in disabled and ep.value not in disabled:
                    source = _Source(ep.name, _dist_name(ep), ep.module)
                    _add_plugin(pm, source, ep.load, limit, failures, sources)
        for i, plugin in enumerate(extra_plugins):
            name = str(getattr(plugin, "__name__", f"extra-{i}"))
            _add_plugin(pm, _Source(name), lambda p=plugin: p, limit, failures, sources)
        registry = Registry()
        registry.failed_plugins = failures  # named in every "unknown component" error: one of them may be its
        _run_hooks(pm, registry, sources, limit, failures)
    registry.load_presets()
    return registry, failures


def _entry_points(failures: list[PluginFailure]) -> list[Any]:
    try:
        return list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:  # noqa: BLE001 - broken metadata of some installed package
        failures.append(PluginFailure("<entry points>", "import", _describe(exc),
                                      "an installed package has broken metadata: `pip check` names it; reinstall it"))
        return []


def _dist_name(ep: Any) -> str:
    try:
        return str(ep.dist.name) if ep.dist is not None else ""
    except Exception:  # noqa: BLE001 - unreadable METADATA
        return ""


def _add_plugin(pm: pluggy.PluginManager, source: _Source, load: Callable[[], Any], limit: float,
                failures: list[PluginFailure], sources: dict[str, _Source]) -> None:
    """Import one plugin (bounded), check its hook names, and register it with pluggy; failures are recorded."""
    if pm.has_plugin(source.name):
        failures.append(source.failure("import", "a plugin of this name is already loaded",
                                       "uninstall one of the two packages that declare it"))
        return
    plugin, exc = run_plugin_code(load, limit)
    if exc is not None:
        failures.append(source.failure("import", _describe(exc), _import_fix(source, exc)))
        return
    for problem in _hook_name_problems(pm, plugin):
        failures.append(source.failure("hooks", problem, source.fix("fix the hook's name and its marker")))
    try:
        pm.register(plugin, name=source.name)
    except Exception as exc:  # noqa: BLE001 - pluggy's validation of the hook functions
        fix = ("each hook takes one argument, named `register`: `def register_encoders(register): ...`"
               if isinstance(exc, pluggy.PluginValidationError) else "report this to the plugin's author")
        failures.append(source.failure("hooks", _describe(exc), source.fix(fix)))
        return
    sources[source.name] = source


def _import_fix(source: _Source, exc: BaseException) -> str:
    if isinstance(exc, PluginTimeout):
        return _timeout_fix(source, exc)
    if not isinstance(exc, ImportError):
        return source.fix()
    missing = exc.name if isinstance(exc, ModuleNotFoundError) and isinstance(exc.name, str) else ""
    if not missing:
        return source.fix("a dependency of the plugin is missing or has the wrong version (`pip check` lists "
                          "them); reinstall the plugin")
    if missing == source.module or source.module.startswith(missing + "."):
        return source.fix(f"reinstall {source.dist or source.name}: its entry point names the module "
                          f"{source.module!r}, which is not installed")
    return source.fix(f'pip install "{_package_for(missing, source.dist)}" (the plugin imports {missing!r})')


def _package_for(module: str, dist: str) -> str:
    """The pip requirement that most likely provides ``module``: from the plugin's declared requirements, when
    one matches, else a few well-known names, else the module's top-level name."""
    top = module.split(".")[0]
    guess = _PIP_NAMES.get(module, _PIP_NAMES.get(top, top))
    norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()  # noqa: E731
    try:
        requires = (metadata.requires(dist) or []) if dist else []
    except Exception:  # noqa: BLE001 - no such distribution, or unreadable metadata
        requires = []
    for req in requires:
        name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]
        if norm(name) in (norm(top), norm(guess)):
            return req.split(";")[0].strip()
    return guess


def _hook_name_problems(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """A function marked ``@splice.hookimpl`` whose name is not a hook (misspelt), or a hook-named function
    without the marker: pluggy would ignore both without a word."""
    problems = []
    try:
        names = [n for n in dir(plugin) if not n.startswith("__")]
    except Exception:  # noqa: BLE001 - a hostile __dir__; pluggy will report it
        return []
    for attr in names:
        try:
            marked = pm.parse_hookimpl_opts(plugin, attr) is not None
            is_function = inspect.isroutine(getattr(plugin, attr, None))
        except Exception:  # noqa: BLE001 - an attribute that cannot be read is no hook
            continue
        if marked and attr not in _HOOKS:
            close = difflib.get_close_matches(attr, list(_HOOKS), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"the hooks are {', '.join(_HOOKS)}"
            problems.append(f"{short(attr)} is marked @splice.hookimpl but is not a splice hook ({hint}); "
                            "splice never calls it")
        elif attr in _HOOKS and is_function and not marked:
            problems.append(f"{attr} is not marked @splice.hookimpl, so splice never calls it")
    return problems


def _run_hooks(pm: pluggy.PluginManager, registry: Registry, sources: dict[str, _Source], limit: float,
               failures: list[PluginFailure]) -> None:
    for hook_name, kind in _HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            source = sources.get(impl.plugin_name) or _Source(impl.plugin_name)
            make = _register_kind_fn if kind == "kind" else _register_fn
            register = make(registry, kind, source, hook_name, failures)
            bound = 0 if source.dist == "splice" else limit
            _, exc = run_plugin_code(lambda: impl.function(register=register), bound)
            if exc is not None:
                failures.append(source.failure(hook_name, _describe(exc), _timeout_fix(source, exc)))


# -- register(...) ---------------------------------------------------------------------------------------------


def _register_signature(name, builder, config_cls, *, aliases=(), tiny=None, hf=None, description=None):
    """register(name, builder, config_cls, *, aliases=(), tiny=None, hf=None, description=None)"""


_SIGNATURE = inspect.signature(_register_signature)


def _register_fn(registry: Registry, kind: str, source: _Source, hook_name: str, failures: list[PluginFailure]):
    """The ``register`` callback a hook receives. A bad call is recorded as the plugin's failure (the hook goes
    on with its other components); so is a name another plugin registered (``_clash``)."""

    def register(*args, **kwargs) -> None:
        try:
            call = _SIGNATURE.bind(*args, **kwargs)
        except TypeError as exc:
            failures.append(source.failure(hook_name, f"register() called wrongly: {_describe(exc)}",
                                           source.fix(f"call {_register_signature.__doc__}")))
            return
        call.apply_defaults()
        a = call.arguments
        problems = _registration_problems(a)
        if problems:
            error = f"register({short(a['name'])}, ...) refused: " + "; ".join(problems)
            failures.append(source.failure(hook_name, error, source.fix("fix the register(...) call")))
            return
        _clash(registry, Entry(
            kind, a["name"], _guard_builder(a["builder"], kind, a["name"], source),
            _guard_config(a["config_cls"], kind, a["name"], source), source.name, tuple(a["aliases"]),
            a["tiny"], a["hf"], _description(a["description"], a["builder"]), source.dist,
        ), source, hook_name, failures)

    return register


def _clash(registry: Registry, entry: Entry, source: _Source, hook_name: str, failures: list[PluginFailure]) -> None:
    """Register ``entry``; each of its names another plugin registered too is recorded as a failure of both."""
    for name in registry.add(entry):
        claims = registry.clashes[entry.kind][name]
        plugins = " and ".join(repr(e.plugin) for e in claims)
        error = (f"{entry.kind} name {name!r} is registered by plugins {plugins}: the name is switched off, the "
                 "plugins' other components work")
        fix = (f"uninstall one of the packages, or SPLICE_DISABLE_PLUGINS={entry.plugin} (or {claims[0].plugin}) to "
               "switch one plugin off; or ask one author to rename it")
        failures.append(PluginFailure(source.name, hook_name, error, fix, source.dist, clash=True))


def _register_kind_fn(registry: Registry, kind: str, source: _Source, hook_name: str,
                      failures: list[PluginFailure]):
    """The ``register`` callback of ``register_kinds``: ``register(splice.Kind(...))``, checked like a component's."""
    from splice.core.kinds import Kind

    def register(*args, **kwargs) -> None:
        value = args[0] if len(args) == 1 and not kwargs else None
        problems = [] if isinstance(value, Kind) else [f"register() takes one splice.Kind, got {short(args or kwargs)}"]
        problems += _kind_problems(value) if not problems else []
        if problems:
            failures.append(source.failure(hook_name, "register(...) refused: " + "; ".join(problems),
                                           source.fix("call register(splice.Kind(name=..., spec_model=..., "
                                                      "validate=..., assemble=..., model_class=...))")))
            return
        _clash(registry, Entry(kind, value.name, value.assemble, value.spec_model, source.name,
                               description=_description(value.description, value.validate), dist=source.dist,
                               impl=value), source, hook_name, failures)

    return register


def _kind_problems(k: Any) -> list[str]:
    from splice.core.kinds import TransformersFormat

    problems = [p for p in [_name_problem("name", k.name)] if p]
    spec_model = k.spec_model
    if not (isinstance(spec_model, type) and issubclass(spec_model, BaseModel) and "kind" in spec_model.model_fields):
        problems.append(f"spec_model must be a pydantic model class with a `kind` field, got {short(spec_model)}")
    problems += [f"{what} must be callable" for what in ("validate", "assemble") if not callable(getattr(k, what))]
    if not isinstance(k.model_class, type):
        problems.append(f"model_class must be a class, got {short(k.model_class)}")
    if not (isinstance(k.formats, tuple) and all(isinstance(f, TransformersFormat) for f in k.formats)):
        problems.append(f"formats must be a tuple of splice.TransformersFormat, got {short(k.formats)}")
    return problems


def _name_problem(what: str, value: Any) -> str | None:
    if (isinstance(value, str) and 0 < len(value) <= NAME_LIMIT and value.isprintable()
            and not any(c.isspace() for c in value)):
        return None
    return f"{what} must be a non-empty string without spaces (at most {NAME_LIMIT} characters), got {short(value)}"


def _registration_problems(a: dict[str, Any]) -> list[str]:
    """Every way the arguments of one ``register`` call break the plugin API, as short sentences."""
    problems = [p for p in [_name_problem("name", a["name"])] if p]
    if not callable(a["builder"]):
        problems.append(f"builder must be callable, got {short(a['builder'])}")
    if not (isinstance(a["config_cls"], type) and issubclass(a["config_cls"], BaseModel)):
        problems.append(f"config_cls must be a pydantic model class, got {short(a['config_cls'])}")
    aliases = a["aliases"]
    if isinstance(aliases, (str, bytes)) or not isinstance(aliases, (list, tuple, set, frozenset)):
        problems.append(f"aliases must be a list or tuple of names, got {short(aliases)}")
    else:
        problems += [p for p in (_name_problem("each alias", x) for x in aliases) if p][:1]
        if a["name"] in aliases or len(set(map(repr, aliases))) != len(aliases):
            problems.append(f"aliases repeat a name: {short(aliases)}")
    problems += [p for p in [_tiny_problem(a["tiny"])] if p]
    if a["hf"] is not None and not isinstance(a["hf"], HFInterop):
        problems.append(f"hf must be None or a splice.HFInterop, got {short(a['hf'])}")
    if a["description"] is not None and not isinstance(a["description"], str):
        problems.append(f"description must be None or a string, got {short(a['description'])}")
    return problems


def _tiny_problem(tiny: Any) -> str | None:
    if tiny is None:
        return None
    if not (isinstance(tiny, dict) and all(isinstance(k, str) for k in tiny)):
        return f"tiny must be None or a dict of config values keyed by field name, got {short(tiny)}"
    try:
        json.dumps(tiny)
    except (TypeError, ValueError, RecursionError):
        return f"tiny must hold plain values (numbers, strings, lists, dicts), got {short(tiny)}"
    return None


def _description(description: str | None, builder: Callable) -> str:
    text = description if description is not None else (getattr(builder, "__doc__", None) or "")
    line = text.strip().split("\n")[0] if isinstance(text, str) else ""
    return clip(line, DESCRIPTION_LIMIT)


# -- guarding builders and config classes ----------------------------------------------------------------------


def _fault(kind: str, name: str, source: _Source, where: str, path: str, exc: BaseException,
           var: str = TIMEOUT_ENV) -> SpliceError:
    """The error for an exception raised inside a plugin's builder or config class."""
    dist = f", distribution {source.dist!r}" if source.dist else ""
    message = f"{kind} {name!r} from plugin {source.name!r}{dist} failed in {where}: {_describe(exc)}"
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() or "DefaultCPUAllocator" in str(exc):
        return ConfigError([Problem(path, message, expected="a config this machine has the memory to build",
                                    fix=f"lower the sizes in the {kind}'s config")])
    return PluginError([Problem(path, message, expected="a built component, or a SpliceError naming the problem",
                                fix=_timeout_fix(source, exc, var), error="plugin")])


def _guard_builder(builder: Callable, kind: str, name: str, source: _Source, where: str = "its builder") -> Callable:
    """``builder`` run under the plugin rules: stdout to stderr, bounded by ``SPLICE_BUILD_TIMEOUT``; any
    exception but a SpliceError becomes one naming the component and its plugin. A projection's builder
    returns a factory ``(in_width, out_width) -> nn.Module``, which is guarded the same way."""

    @functools.wraps(builder)
    def build(*args, **kwargs):
        value, exc = run_plugin_code(lambda: builder(*args, **kwargs), time_limit(BUILD_TIMEOUT_ENV, DEFAULT_BUILD_TIMEOUT))
        if isinstance(exc, SpliceError):
            raise exc
        if exc is not None:
            raise _fault(kind, name, source, where, _ROLE_PATH[kind], exc, BUILD_TIMEOUT_ENV) from exc
        if kind == "projection" and where == "its builder" and callable(value):
            return _guard_builder(value, kind, name, source, "the factory its builder returned")
        return value

    return build


def _guard_config(config_cls: type[BaseModel], kind: str, name: str, source: _Source) -> type[BaseModel]:
    """A subclass of ``config_cls`` (same name, fields and validators) whose validation runs under the plugin
    rules: pydantic's ValidationError and SpliceErrors pass, any other exception (or a hang) becomes a
    PluginError naming the component. Falls back to ``config_cls`` itself if it cannot be subclassed."""
    path = f"{_ROLE_PATH[kind]}.config" if kind != "projection" else "projection"

    def checked(fn: Callable[[], Any]) -> Any:
        value, exc = run_plugin_code(fn, time_limit())
        if isinstance(exc, (ValidationError, SpliceError)):
            raise exc
        if exc is not None:
            raise _fault(kind, name, source, "its config class", path, exc) from exc
        return value

    def __init__(self, /, **data):
        checked(lambda: super(guarded, self).__init__(**data))

    def model_validate(cls, obj, *args, **kwargs):
        return checked(lambda: super(guarded, cls).model_validate(obj, *args, **kwargs))

    def __reduce_ex__(self, protocol):  # pickle finds this class through the registry, not by its name
        return _rebuild_config, (config_cls, kind, name, self.__getstate__())

    namespace = {"__init__": __init__, "model_validate": classmethod(model_validate), "__reduce_ex__": __reduce_ex__,
                 "__module__": config_cls.__module__, "__qualname__": config_cls.__qualname__,
                 "__doc__": config_cls.__doc__}
    try:
        guarded = type(config_cls)(config_cls.__name__, (config_cls,), namespace)
    except Exception:  # noqa: BLE001 - a config class pydantic cannot subclass: keep it unguarded
        return config_cls
    return guarded


def _rebuild_config(plain: type[BaseModel], kind: str, name: str, state: dict) -> BaseModel:
    """Unpickle a guarded config: as the registered (guarded) class, or the plugin's own when that is gone."""
    try:
        cls = get_registry().get(kind, name).config_cls
    except Exception:  # noqa: BLE001 - no registry in this process, or the component is gone
        cls = plain
    cls = cls if issubclass(cls, plain) else plain
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


# -- the process-wide registry ---------------------------------------------------------------------------------

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


# -- where each component of a saved model came from ---------------------------------------------------------------

_ROLE_KINDS = {"encoder": ("encoder",), "vision": ("encoder",), "decoder": ("decoder",), "text": ("text_encoder",),
               "language_model": ("decoder",)}


def provenance(spec: dict) -> dict[str, dict]:
    """For each component a resolved spec names: its kind, name, plugin, package and the package's version (what
    ``splice.json`` records, so that loading the folder elsewhere can name the package to install)."""
    registry = get_registry()
    found: dict[str, dict] = {}
    wanted = [("kind", "kind", spec.get("kind", "encoder-decoder"))]
    for role, part in spec.items():
        if isinstance(part, dict) and isinstance(part.get("name"), str):
            kinds = _ROLE_KINDS.get(role, ("encoder", "decoder", "text_encoder"))
            wanted += [(role, kind, part["name"]) for kind in kinds]
    ca = spec.get("cross_attention")
    if isinstance(ca, dict) and isinstance(ca.get("kind"), str):
        wanted.append(("cross_attention", "adapter", ca["kind"]))
    for role, kind, name in wanted:
        if role not in found and isinstance(name, str) and registry.has(kind, name):
            entry = registry.get(kind, name)
            found[role] = {"kind": kind, "name": entry.name, "plugin": entry.plugin, "package": entry.dist or None,
                           "version": _version(entry.dist)}
    return found


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist) if dist else None
    except Exception:  # noqa: BLE001 - not installed as a distribution (a plugin passed in by hand)
        return None

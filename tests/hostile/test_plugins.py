"""Hostile plugins: every fault is one recorded failure or one clear SpliceError naming the plugin; the other
plugins keep working, splice's stdout stays its own, and nothing hangs.

Each fixture plugin is a real installed distribution found through the ``splice`` entry points: a module plus a
``<name>-0.1.dist-info`` folder in a temporary directory on ``sys.path`` (no pip). Hangs are bounded by
``SPLICE_PLUGIN_TIMEOUT=1`` / ``SPLICE_BUILD_TIMEOUT=1``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import splice
from splice.core.errors import ConfigError, PluginError
from splice.core.plugins import build_registry, get_registry, plugin_failures
from splice.core.registry import DuplicateNameError

SPEC = {
    "encoder": {"name": "toy_conv", "config": {"img_size": 16, "patch_size": 4, "width": 24}},
    "decoder": {"name": "gpt2", "config": {"vocab_size": 50, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4}},
    "tokens": {"decoder_start": 49, "pad": 0, "eos": 49},
}
HEAD = "import os, sys, time\nimport splice\nfrom splice_toyconv import ToyConvConfig, build\n"


class Site:
    """A folder on sys.path holding fake installed distributions, each with a `splice` entry point."""

    def __init__(self, root: Path):
        self.root = root
        self.modules: list[str] = []

    def add(self, dist: str, code: str, *, module: str | None = None, requires: tuple[str, ...] = (),
            write_module: bool = True) -> str:
        module = module or f"hostile_{dist}"
        if write_module:
            (self.root / f"{module}.py").write_text(HEAD + textwrap.dedent(code))
        info = self.root / f"{dist}-0.1.dist-info"
        info.mkdir()
        meta = f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
        (info / "METADATA").write_text(meta)
        (info / "entry_points.txt").write_text(f"[splice]\n{dist} = {module}\n")
        self.modules.append(module)
        importlib.invalidate_caches()
        return dist

    def build(self):
        registry, failures = build_registry()
        return registry, {f.plugin: f for f in failures}


@pytest.fixture(scope="module", autouse=True)
def warm():
    """Import the built-in and installed plugins once, so that the first case's time is its own."""
    build_registry()


@pytest.fixture
def site(tmp_path, monkeypatch, fresh_registry):
    monkeypatch.setenv("SPLICE_PLUGIN_TIMEOUT", "1")
    monkeypatch.setenv("SPLICE_BUILD_TIMEOUT", "1")
    monkeypatch.delenv("SPLICE_DISABLE_PLUGINS", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    s = Site(tmp_path)
    yield s
    for module in s.modules:
        sys.modules.pop(module, None)


def _others_work(registry) -> None:
    assert {"vit", "toyconv"} <= set(registry.names("encoder")) and "gpt2" in registry.names("decoder")


def _failed(site: Site, dist: str, stage: str, *words: str):
    """Build the registry; the plugin ``dist`` must have one recorded failure at ``stage`` saying ``words``."""
    registry, failures = site.build()
    _others_work(registry)
    f = failures[dist]
    assert f.stage == stage, f
    assert all(w in str(f) for w in words), f
    assert f.fix and f"SPLICE_DISABLE_PLUGINS={dist}" in f.fix and f.dist == dist and len(f.error) < 1000, f
    return registry, f


# -- import time ------------------------------------------------------------------------------------------------

IMPORT_FAULTS = {
    "exit_at_import": ("sys.exit(3)\n", ["SystemExit(3)", "tried to end the process"]),
    "exit0_at_import": ("raise SystemExit\n", ["SystemExit(None)"]),
    "base_at_import": ("class Boom(BaseException): pass\nraise Boom('odd')\n", ["Boom: odd"]),
    "raise_at_import": ("raise RuntimeError('import exploded')\n", ["RuntimeError: import exploded"]),
    "huge_message_at_import": ("raise RuntimeError('x' * 1_000_000)\n", ["RuntimeError: xxx", "..."]),
    "bad_str_at_import": ("class E(Exception):\n    def __str__(self): raise ValueError\nraise E()\n",
                          ["could not be rendered"]),
    "hang_at_import": ("time.sleep(60)\n", ["timed out after 1 s", "SPLICE_PLUGIN_TIMEOUT"]),
    "stubborn_hang_at_import": ("while True:\n    try:\n        time.sleep(60)\n    except Exception:\n        pass\n",
                                ["timed out after 1 s"]),
    "missing_dep_at_import": ("import splice_hostile_no_such_pkg\n", ['pip install "splice_hostile_no_such_pkg"']),
    "syntax_error_at_import": ("def (:\n", ["SyntaxError"]),
}


@pytest.mark.parametrize("dist", list(IMPORT_FAULTS))
def test_import_fault_is_recorded_and_the_others_work(site, hostile, dist):
    code, words = IMPORT_FAULTS[dist]
    site.add(dist, code)
    start = time.monotonic()
    hostile.check(dist, lambda: _failed(site, dist, "import", *words), expect="ok")
    assert time.monotonic() - start < 10


def test_missing_dependency_names_the_declared_requirement(site, hostile):
    site.add("needs_dep", "import splice_hostile_absent.sub\n", requires=("splice-hostile-absent>=1.2",))
    hostile.check("missing declared dependency",
                  lambda: _failed(site, "needs_dep", "import", 'pip install "splice-hostile-absent>=1.2"'), expect="ok")


def test_entry_point_naming_a_missing_module_says_reinstall(site, hostile):
    site.add("no_module", "", module="hostile_not_there", write_module=False)
    hostile.check("entry point to nowhere", lambda: _failed(site, "no_module", "import", "reinstall no_module"),
                  expect="ok")


# -- hook time --------------------------------------------------------------------------------------------------

HOOK_FAULTS = {
    "exit_in_hook": ("sys.exit('bye')", ["register_encoders", "SystemExit('bye')"]),
    "raise_in_hook": ("raise KeyError('k')", ["KeyError"]),
    "hang_in_hook": ("time.sleep(60)", ["timed out after 1 s"]),
}


@pytest.mark.parametrize("dist", list(HOOK_FAULTS))
def test_hook_fault_is_recorded_and_the_others_work(site, hostile, dist):
    body, words = HOOK_FAULTS[dist]
    site.add(dist, f"""
        @splice.hookimpl
        def register_encoders(register):
            register("{dist}_ok", build, ToyConvConfig)
            {body}
    """)
    registry, _ = hostile.check(dist, lambda: _failed(site, dist, "register_encoders", *words), expect="ok")
    assert registry.has("encoder", f"{dist}_ok")  # what it registered before failing stays


BAD_REGISTRATIONS = {
    "none_name": ("None, build, ToyConvConfig", "name must be a non-empty string"),
    "empty_name": ("'', build, ToyConvConfig", "name must be"),
    "blank_name": ("'   ', build, ToyConvConfig", "name must be"),
    "spaced_name": ("'two words', build, ToyConvConfig", "name must be"),
    "int_name": ("42, build, ToyConvConfig", "got 42"),
    "long_name": ("'n' * 100_000, build, ToyConvConfig", "at most 100 characters"),
    "str_aliases": ("'bad_aliases', build, ToyConvConfig, aliases='abc'", "aliases must be a list"),
    "none_alias": ("'bad_alias', build, ToyConvConfig, aliases=[None]", "each alias must be"),
    "repeated_alias": ("'rep', build, ToyConvConfig, aliases=['rep']", "aliases repeat"),
    "list_tiny": ("'bad_tiny', build, ToyConvConfig, tiny=[1]", "tiny must be None or a dict"),
    "object_tiny": ("'bad_tiny2', build, ToyConvConfig, tiny={'a': object()}", "plain values"),
    "wrong_hf": ("'bad_hf', build, ToyConvConfig, hf='nope'", "hf must be None or a splice.HFInterop"),
    "none_builder": ("'bad_builder', None, ToyConvConfig", "builder must be callable"),
    "dict_config": ("'bad_config', build, dict", "config_cls must be a pydantic model class"),
    "int_description": ("'bad_desc', build, ToyConvConfig, description=5", "description must be None or a string"),
    "missing_args": ("'only_a_name'", "register() called wrongly"),
    "unknown_kwarg": ("'colourful', build, ToyConvConfig, colour='red'", "register() called wrongly"),
}


@pytest.mark.parametrize("case", list(BAD_REGISTRATIONS))
def test_bad_register_call_is_recorded_and_the_rest_of_the_hook_runs(site, hostile, case):
    args, words = BAD_REGISTRATIONS[case]
    dist = f"reg_{case}"
    site.add(dist, f"""
        @splice.hookimpl
        def register_encoders(register):
            register({args})
            register("{dist}_ok", build, ToyConvConfig)
    """)
    registry, _ = hostile.check(case, lambda: _failed(site, dist, "register_encoders", words), expect="ok")
    assert registry.has("encoder", f"{dist}_ok")


HOOK_NAME_FAULTS = {
    "misspelt_hook": ("@splice.hookimpl\ndef register_encoder(register): pass\n",
                      "'register_encoder' is marked @splice.hookimpl but is not a splice hook (did you mean "
                      "'register_encoders'?)"),
    "unknown_hook": ("@splice.hookimpl\ndef setup(register): pass\n", "the hooks are register_encoders"),
    "unmarked_hook": ("def register_decoders(register): pass\n", "register_decoders is not marked @splice.hookimpl"),
    "wrong_argument": ("@splice.hookimpl\ndef register_encoders(reg): pass\n", "`register`"),
}


@pytest.mark.parametrize("dist", list(HOOK_NAME_FAULTS))
def test_misspelt_or_unmarked_hook_is_reported(site, hostile, dist):
    code, words = HOOK_NAME_FAULTS[dist]
    site.add(dist, code + "@splice.hookimpl\ndef register_adapters(register): pass\n" * (dist != "wrong_argument"))
    hostile.check(dist, lambda: _failed(site, dist, "hooks", words), expect="ok")


def test_duplicate_names_switch_off_the_name_only(site, hostile):
    site.add("dup_toy", """
        @splice.hookimpl
        def register_encoders(register):
            register("toyconv", build, ToyConvConfig)
    """)
    registry, failures = hostile.check("duplicate name", build_registry, expect="ok")
    assert not registry.has("encoder", "toyconv") and registry.has("encoder", "vit")
    assert any("'dup_toy'" in f.error and "switched off" in f.error for f in failures)
    with pytest.raises(DuplicateNameError, match="dup_toy"):
        registry.get("encoder", "toyconv")


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_bad_time_limit_is_a_config_error(site, hostile, monkeypatch, value):
    monkeypatch.setenv("SPLICE_PLUGIN_TIMEOUT", value)
    exc = hostile.check(f"SPLICE_PLUGIN_TIMEOUT={value}", build_registry, expect="error")
    assert isinstance(exc, ConfigError) and "SPLICE_PLUGIN_TIMEOUT" in str(exc)


# -- prints -----------------------------------------------------------------------------------------------------


def test_prints_go_to_stderr(site, hostile, capfd):
    site.add("chatty", """
        print("CHATTY-IMPORT")
        os.write(1, b"CHATTY-FD\\n")

        @splice.hookimpl
        def register_encoders(register):
            print("CHATTY-HOOK")
            register("chatty_enc", printing_build, ToyConvConfig)

        def printing_build(config):
            print("CHATTY-BUILD")
            return build(config)
    """)
    capfd.readouterr()
    registry, failures = hostile.check("printing plugin", site.build, expect="ok")
    entry = registry.get("encoder", "chatty_enc")
    hostile.check("printing builder", lambda: entry.builder(entry.make_config({"img_size": 8, "width": 8})),
                  expect="ok")
    out, err = capfd.readouterr()
    assert "chatty" not in failures and "CHATTY" not in out
    assert all(w in err for w in ("CHATTY-IMPORT", "CHATTY-FD", "CHATTY-HOOK", "CHATTY-BUILD"))


# -- builders and config classes --------------------------------------------------------------------------------

FAULTY_PARTS = """
    from pydantic import BaseModel, model_validator

    def boom(config):
        raise RuntimeError("builder exploded")

    def leave(config):
        sys.exit(4)

    def stall(config):
        time.sleep(60)

    def hog(config):
        raise MemoryError()

    def deliberate(config):
        raise splice.ConfigError("width 3 is odd\\n    fix: use an even width")

    def factory_boom(config):
        def make(in_width, out_width):
            raise ValueError("factory exploded")
        return make

    def validator(body):
        class Config(ToyConvConfig):
            @model_validator(mode="after")
            def _check(self):
                exec(body)
                return self
        return Config

    @splice.hookimpl
    def register_encoders(register):
        for name, fn in [("boom", boom), ("leave", leave), ("stall", stall), ("hog", hog),
                         ("deliberate", deliberate)]:
            register(f"enc_{name}", fn, ToyConvConfig)
        for name, body in [("keyerror", "{}['missing']"), ("exit", "sys.exit(5)"), ("stall", "time.sleep(60)"),
                           ("valueerror", "raise ValueError('widths must be even')")]:
            register(f"cfg_{name}", build, validator(body))

    @splice.hookimpl
    def register_projections(register):
        register("proj_boom", factory_boom, ToyConvConfig)
"""


def _compose_with(encoder: str) -> object:
    return splice.compose({**SPEC, "encoder": {"name": encoder, "config": {"img_size": 16, "patch_size": 4, "width": 24}}})


BUILDER_FAULTS = {
    "enc_boom": ["RuntimeError: builder exploded", "its builder"],
    "enc_leave": ["SystemExit(4)"],
    "enc_stall": ["timed out after 1 s", "SPLICE_BUILD_TIMEOUT"],
    "cfg_keyerror": ["its config class", "KeyError"],
    "cfg_exit": ["its config class", "SystemExit(5)"],
    "cfg_stall": ["its config class", "timed out after 1 s"],
}


@pytest.mark.parametrize("name", list(BUILDER_FAULTS))
def test_builder_and_config_faults_name_the_plugin(site, hostile, name):
    site.add("faulty_parts", FAULTY_PARTS)
    exc = hostile.check(f"compose {name}", lambda: _compose_with(name), expect="error")
    assert all(w in str(exc) for w in [name, "'faulty_parts'", *BUILDER_FAULTS[name]]), exc
    entry = get_registry().get("encoder", name)
    direct = lambda: entry.builder(entry.make_config({"img_size": 16, "patch_size": 4, "width": 24}))  # noqa: E731
    exc = hostile.check(f"call {name}", direct, expect="error")
    assert isinstance(exc, PluginError) and "distribution 'faulty_parts'" in str(exc)
    assert "SPLICE_DISABLE_PLUGINS=faulty_parts" in str(exc)


def test_deliberate_errors_pass_through(site, hostile):
    site.add("faulty_parts", FAULTY_PARTS)
    entry = get_registry().get("encoder", "enc_deliberate")
    exc = hostile.check("deliberate ConfigError", lambda: entry.builder(entry.make_config()), expect="error")
    assert type(exc) is splice.ConfigError and str(exc) == "width 3 is odd\n    fix: use an even width"
    exc = hostile.check("validator ValueError", lambda: _compose_with("cfg_valueerror"), expect="error")
    assert "widths must be even" in str(exc) and "faulty_parts" not in str(exc)


def test_out_of_memory_in_a_builder_asks_for_smaller_sizes(site, hostile):
    site.add("faulty_parts", FAULTY_PARTS)
    entry = get_registry().get("encoder", "enc_hog")
    exc = hostile.check("MemoryError", lambda: entry.builder(entry.make_config()), expect="error")
    assert isinstance(exc, ConfigError) and "lower the sizes" in str(exc)


def test_projection_factory_fault_names_the_plugin(site, hostile):
    site.add("faulty_parts", FAULTY_PARTS)
    entry = get_registry().get("projection", "proj_boom")
    make = entry.builder(entry.make_config())
    exc = hostile.check("projection factory", lambda: make(8, 16), expect="error")
    assert isinstance(exc, PluginError) and "the factory its builder returned" in str(exc)


# -- alarms set outside -----------------------------------------------------------------------------------------


def test_an_outside_alarm_keeps_its_time(site, hostile, monkeypatch):
    site.add("sleeper", "time.sleep(60)\n")

    def outer_wins():
        class Outer(BaseException):
            pass

        def ring(signum, frame):
            raise Outer()

        monkeypatch.setenv("SPLICE_PLUGIN_TIMEOUT", "20")
        old = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        try:
            with pytest.raises(Outer):  # not swallowed as the plugin's failure
                build_registry()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    def outer_survives():
        monkeypatch.setenv("SPLICE_PLUGIN_TIMEOUT", "1")
        _, failures = site.build()
        assert "timed out" in failures["sleeper"].error
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 20 < left < 30, left  # the harness's own alarm is set again, less the time spent

    hostile.check("outer alarm first", outer_wins, seconds=30, expect="ok")
    hostile.check("plugin limit first", outer_survives, seconds=30, expect="ok")


# -- everything at once: the API and the command line ------------------------------------------------------------

ZOO = {
    "zoo_exit": "sys.exit(1)\n",
    "zoo_hang": "time.sleep(60)\n",
    "zoo_print": "print('ZOO-PRINT')\n@splice.hookimpl\ndef register_encoders(register):\n"
                 "    print('ZOO-HOOK')\n    register(None, build, ToyConvConfig)\n",
    "zoo_misspelt": "@splice.hookimpl\ndef register_encoder(register): pass\n",
    "zoo_missing": "import splice_hostile_zoo_absent\n",
}


def _zoo(site: Site) -> None:
    for dist, code in ZOO.items():
        site.add(dist, code)


def test_compose_works_beside_every_fault(site, hostile):
    _zoo(site)

    def compose():
        failures = {f.plugin for f in plugin_failures()}
        assert set(ZOO) <= failures, failures
        return splice.compose(SPEC, seed=0)

    model = hostile.check("compose beside the zoo", compose, expect="ok")
    assert model.encoder.hidden_size == 24


SEPARATOR = "=== splice list ==="
BOTH = f"from splice.cli import main; main(['list', '--json']); print({SEPARATOR!r}); main(['list'])"


def test_splice_list_reports_every_fault_and_json_stays_json(site, hostile):
    """One process (the slow part is importing torch and timm) runs `splice list --json`, then `splice list`."""
    _zoo(site)
    env = dict(os.environ, PYTHONPATH=str(site.root), SPLICE_PLUGIN_TIMEOUT="1")
    run = lambda: subprocess.run([sys.executable, "-c", BOTH], capture_output=True, text=True, env=env, timeout=170)  # noqa: E731
    out = hostile.check("splice list --json, splice list", run, seconds=180, expect="ok")
    assert out.returncode == 0 and SEPARATOR in out.stdout, out.stderr[-3000:]
    as_json, text = out.stdout.split(SEPARATOR + "\n")
    data = json.loads(as_json)  # the plugins' prints went to stderr
    failures = {f["plugin"]: f for f in data["plugin_failures"]}
    assert set(ZOO) <= set(failures) and all(failures[d]["fix"] for d in ZOO)
    assert "timed out after 1 s" in failures["zoo_hang"]["error"] and failures["zoo_hang"]["dist"] == "zoo_hang"
    assert {"vit", "gpt2", "toyconv"} <= {c["name"] for c in data["components"]}
    assert "ZOO-PRINT" in out.stderr and "ZOO-HOOK" in out.stderr
    assert "failed to load" in text and all(d in text for d in ZOO)
    assert "did you mean 'register_encoders'?" in text and 'pip install "splice_hostile_zoo_absent"' in text

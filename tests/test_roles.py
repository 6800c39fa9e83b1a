"""Components checked against their roles in validate: each lie of a fixture plugin is one clear problem naming
the component, the plugin and the package (tests/fixtures/splice_liars, installed here as `splice-liars`)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import splice
from splice.core.errors import PluginError

LIARS = Path(__file__).parent / "fixtures" / "splice_liars"
GPT2 = {"name": "gpt2", "config": {"vocab_size": 50, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 4}}
HONEST = {"name": "honest_patch"}
TOKENS = {"decoder_start": 1, "pad": 0, "eos": 2}
CASES = {  # component -> (role, what the one problem says)
    "liar_width": ("encoder", "declares hidden_size 32, but its forward returns tokens of width 48"),
    "liar_type": ("encoder", "its forward returned no `last_hidden_state` tensor"),
    "liar_raises": ("encoder", "RuntimeError: weights server unreachable"),
    "liar_vocab": ("decoder", "declares vocab_size 50, but its logits cover 60 tokens"),
    "liar_tuple": ("decoder", "its forward returned no `logits` tensor"),
}


@pytest.fixture
def liars(tmp_path, monkeypatch, fresh_registry) -> dict:
    """splice_liars installed as the distribution `splice-liars` (entry point `liars`); the env for a CLI run."""
    site = tmp_path / "site"
    info = site / "splice_liars-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: splice-liars\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[splice]\nliars = splice_liars\n")
    monkeypatch.syspath_prepend(str(LIARS))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(LIARS)]))


def _spec(name: str) -> dict:
    role = CASES[name][0]
    return {"encoder": {"name": name} if role == "encoder" else HONEST,
            "decoder": {"name": name} if role == "decoder" else GPT2, "tokens": TOKENS}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_lie_is_one_problem_naming_the_plugin(liars, name):
    role, says = CASES[name]
    plan = splice.validate(_spec(name))
    assert len(plan.problems) == 1, plan.summary()
    problem = plan.problems[0]
    text = str(problem)
    assert problem.path.startswith(role), text
    assert says in text and "plugin 'liars'" in text and "splice-liars" in text, text
    assert "SPLICE_DISABLE_PLUGINS=liars" in text, text
    with pytest.raises(PluginError):
        splice.compose(_spec(name))


@pytest.mark.parametrize("name", sorted(CASES))
def test_splice_validate_reports_the_lie(liars, name, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(name)))
    run = subprocess.run([sys.executable, "-m", "splice.cli", "validate", str(spec), "--json"], capture_output=True,
                         text=True, env=liars, timeout=120)
    assert run.returncode == 1, run.stderr
    out = json.loads(run.stdout)
    assert len(out["problems"]) == 1 and "Traceback" not in run.stderr, run.stdout + run.stderr
    assert CASES[name][1] in out["problems"][0]["message"] and "splice-liars" in out["problems"][0]["message"]


def test_an_honest_plugin_passes(liars):
    plan = splice.validate({"encoder": HONEST, "decoder": GPT2, "tokens": TOKENS})
    assert plan.ok, plan.summary()
    assert plan.encoder.width == 32


def test_every_builtin_component_passes_its_role_check():
    """The dry forward accepts every registered component's tiny config (real zeros), and on meta too."""
    from splice.core import roles
    from splice.core.meta import params_on_meta
    from splice.core.plugins import get_registry

    registry = get_registry()
    for limit in (roles.REAL_DRY_FORWARD, 0):  # 0: every component on the meta device
        for kind in ("encoder", "decoder"):
            for entry in registry.entries(kind):
                with params_on_meta():
                    module = entry.builder(entry.make_config(entry.tiny or {}))
                problems: list = []
                old, roles.REAL_DRY_FORWARD = roles.REAL_DRY_FORWARD, limit
                try:
                    assert roles.check_role(entry, module, kind, problems), problems
                finally:
                    roles.REAL_DRY_FORWARD = old

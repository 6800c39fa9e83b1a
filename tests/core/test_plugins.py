"""Plugins: a pip-installed third party composes like a built-in; a broken one is reported, not fatal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import splice
from splice.core.plugins import BUILTIN_PLUGINS, build_registry


def test_builtins_register_through_the_public_hooks():
    registry, failures = build_registry(entry_points_enabled=False)
    assert not failures, failures
    assert {"vit", "deit", "deit_distilled", "beit", "swin", "timm"} <= set(registry.names("encoder"))
    assert "gpt2" in registry.names("decoder")
    assert {"standard", "gated"} <= set(registry.names("adapter"))
    assert all(e.plugin in BUILTIN_PLUGINS for k in ("encoder", "decoder") for e in registry.entries(k))


def test_third_party_plugin_composes_from_yaml(tmp_path):
    """tests/fixtures/splice_toyconv is pip-installed with a `splice` entry point; nothing registers it by hand."""
    names = {row["name"]: row for row in splice.list_components("encoder")}
    assert names["toyconv"]["plugin"] == "toyconv"
    spec = tmp_path / "toy.yaml"
    spec.write_text(textwrap.dedent("""
        encoder: {name: toy_conv, config: {img_size: 16, patch_size: 4, width: 24}}
        decoder: {name: gpt2, config: {vocab_size: 50, n_positions: 32, n_embd: 32, n_layer: 2, n_head: 4}}
        tokens: {decoder_start: 49, pad: 0, eos: 49}
    """))
    plan = splice.validate(str(spec))
    assert plan.ok, plan.summary()
    assert plan.projection == "linear" and plan.encoder.family == "toyconv"
    model = splice.compose(str(spec), seed=0).eval()
    out = model(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.randint(0, 49, (2, 5)))
    assert out.logits.shape == (2, 5, 50) and out.encoder_last_hidden_state.shape == (2, 16, 24)
    model.save_pretrained(tmp_path / "m")
    again = splice.load(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_disable_entry_points(no_entry_points):
    from splice.core.plugins import get_registry

    assert not get_registry().has("encoder", "toyconv")
    assert get_registry().has("encoder", "vit")


def _fake_dist(root: Path, dist: str, module: str, code: str) -> None:
    """A real installed distribution on sys.path: a module plus dist-info with a `splice` entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(code))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[splice]\n{dist} = {module}\n")


def _splice_cli(args, extra_path: Path):
    env = dict(os.environ, PYTHONPATH=str(extra_path))
    return subprocess.run([sys.executable, "-m", "splice.cli", *args], capture_output=True, text=True, env=env)


def test_broken_plugins_are_reported_and_the_rest_work(tmp_path):
    _fake_dist(tmp_path, "broken_import", "broken_import_mod", "raise ImportError('needs libfoo')\n")
    _fake_dist(tmp_path, "broken_hook", "broken_hook_mod", """
        import splice
        @splice.hookimpl
        def register_encoders(register):
            raise RuntimeError('hook exploded')
    """)
    out = _splice_cli(["list", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    failures = {f["plugin"]: f for f in data["plugin_failures"]}
    assert "needs libfoo" in failures["broken_import"]["error"] and failures["broken_import"]["stage"] == "import"
    assert "hook exploded" in failures["broken_hook"]["error"] and failures["broken_hook"]["stage"] == "register_encoders"
    assert {"vit", "gpt2", "toyconv"} <= {c["name"] for c in data["components"]}
    text = _splice_cli(["list"], tmp_path).stdout
    assert "failed to load" in text and "broken_import" in text
    assert _splice_cli(["validate", "vit-gpt2-tiny"], tmp_path).returncode == 0


def test_duplicate_name_names_both_plugins(tmp_path, monkeypatch, fresh_registry):
    _fake_dist(tmp_path, "dup_vit", "dup_vit_mod", """
        import splice
        from splice.plugins.timm_vision import ViTConfig, build_vit
        @splice.hookimpl
        def register_encoders(register):
            register("vit", build_vit, ViTConfig)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(splice.PluginError) as e:
        build_registry()
    assert "splice.plugins.timm_vision" in str(e.value) and "dup_vit" in str(e.value)
    out = _splice_cli(["list"], tmp_path)
    assert out.returncode == 1 and "registered twice" in out.stderr

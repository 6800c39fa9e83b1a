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


def test_duplicate_name_switches_off_that_name_only(tmp_path, monkeypatch, fresh_registry):
    # dup_vit registers `vit` (the built-in's name) and `dup_enc` (its own): only `vit` is switched off
    _fake_dist(tmp_path, "dup_vit", "dup_vit_mod", """
        import splice
        from splice.plugins.timm_vision import ViTConfig, build_vit
        @splice.hookimpl
        def register_encoders(register):
            register("vit", build_vit, ViTConfig)
            register("dup_enc", build_vit, ViTConfig)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry, failures = build_registry()
    assert not registry.has("encoder", "vit") and registry.has("encoder", "dup_enc") and registry.has("encoder", "deit")
    clash = [f for f in failures if f.plugin == "dup_vit"]
    assert len(clash) == 1 and "'splice.plugins.timm_vision' and 'dup_vit'" in clash[0].error
    with pytest.raises(splice.PluginError, match="registered by plugin 'splice.plugins.timm_vision'"):
        registry.get("encoder", "vit")

    listed = _splice_cli(["list", "--json"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    names = {c["name"] for c in data["components"] if c["kind"] == "encoder"}
    assert "dup_enc" in names and "deit" in names and "vit" not in names
    assert any("switched off" in f["error"] and f["plugin"] == "dup_vit" for f in data["plugin_failures"])
    text = _splice_cli(["list"], tmp_path)
    assert text.returncode == 0 and "encoder name 'vit' is registered by plugins" in text.stdout
    clashes = text.stdout.split("names two plugins registered (switched off; everything else works):")[1]
    assert "dup_vit" in clashes and "plugins that failed to load" not in text.stdout  # dup_vit itself loaded
    assert any(f["clash"] for f in data["plugin_failures"] if f["plugin"] == "dup_vit")

    other = tmp_path / "other.yaml"  # every other component validates
    other.write_text("encoder: {name: deit, config: {img_size: 32, patch_size: 8, embed_dim: 48, depth: 1, "
                     "num_heads: 3}}\ndecoder: {name: gpt2, config: {vocab_size: 50, n_positions: 32, n_embd: 32, "
                     "n_layer: 1, n_head: 4}}\ntokens: {decoder_start: 1, pad: 0, eos: 2}\n")
    assert _splice_cli(["validate", str(other)], tmp_path).returncode == 0
    clashing = tmp_path / "clash.yaml"
    clashing.write_text(other.read_text().replace("name: deit", "name: vit"))
    out = _splice_cli(["validate", str(clashing)], tmp_path)
    said = out.stdout + out.stderr
    assert out.returncode == 1 and "encoder name 'vit' is registered by plugin 'splice.plugins.timm_vision' (package " \
        "'splice') and plugin 'dup_vit' (package 'dup_vit')" in said and "SPLICE_DISABLE_PLUGINS=dup_vit" in said, said


def test_unknown_names_name_the_plugins_that_failed(tmp_path, monkeypatch, fresh_registry):
    _fake_dist(tmp_path, "broken_import", "broken_import_mod", "raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plan = splice.validate({"encoder": {"name": "fancy"}, "decoder": {"name": "gpt2"}})
    text = str(plan.problems[0])
    assert "unknown encoder 'fancy'" in text
    assert "plugin 'broken_import' (package broken_import) failed to load: ImportError: needs libfoo" in text, text


def test_saved_folder_names_the_package_of_each_component(tmp_path, monkeypatch, fresh_registry):
    spec = {"encoder": {"name": "toyconv", "config": {"img_size": 16, "patch_size": 4, "width": 24}},
            "decoder": {"name": "gpt2", "config": {"vocab_size": 50, "n_positions": 32, "n_embd": 32, "n_layer": 1,
                                                   "n_head": 4}}, "tokens": {"decoder_start": 1, "pad": 0, "eos": 2}}
    splice.compose(spec, seed=0).save_pretrained(tmp_path / "m")
    components = json.loads((tmp_path / "m" / "splice.json").read_text())["components"]
    assert components["encoder"] == {"kind": "encoder", "name": "toyconv", "plugin": "toyconv",
                                     "package": "splice-toyconv", "version": "0.1.0"}
    assert components["decoder"]["plugin"] == "splice.plugins.gpt2" and components["decoder"]["package"] == "splice"
    assert components["cross_attention"]["name"] == "standard" and components["kind"]["name"] == "encoder-decoder"
    monkeypatch.setenv("SPLICE_DISABLE_PLUGINS", "toyconv")
    from splice.core.plugins import reset_registry

    reset_registry()
    with pytest.raises(splice.UnknownComponentError, match='pip install "splice-toyconv==0.1.0": this folder was saved with '
                       "encoder 'toyconv' from plugin 'toyconv'"):
        splice.load(tmp_path / "m")

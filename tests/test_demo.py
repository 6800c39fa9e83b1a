"""``splice demo`` (a short run: the accuracy target needs the full 5 minutes), its spec, and the ViT's sin-cos
position embedding it relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import splice
from splice import demo

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_builtin_spec_is_the_example():
    example = yaml.safe_load((ROOT / "examples" / "demo-captioner.yaml").read_text())
    assert example == demo.SPEC
    assert Path(demo.bundled_spec()).resolve() == ROOT / "examples" / "demo-captioner.yaml"
    plan = splice.validate(demo.SPEC)
    assert plan.ok and 0.9e6 < plan.params["total"] < 1.0e6


def test_demo_flags(monkeypatch):
    from splice.cli import main

    seen = {}
    monkeypatch.setattr(demo, "run", lambda **kw: seen.update(kw) or 0)
    assert main(["demo", "--minutes", "0.5", "--out", "x", "--threads", "1", "--seed", "3", "--spec", "s.yaml"]) == 0
    assert seen == {"spec": "s.yaml", "out": "x", "minutes": 0.5, "threads": 1, "seed": 3}
    assert main(["demo"]) == 0
    assert seen == {"spec": None, "out": "out/demo", "minutes": 5.0, "threads": 2, "seed": 0}


def test_a_short_demo_run_writes_the_captioned_grid(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "images").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("from an earlier run\n")  # a second run replaces the first
    assert demo.run(out=str(out), minutes=0.1, eval_size=100, progress=False) == 0
    text = capsys.readouterr().out
    assert "held-out exact match:" in text and "single" in text and "relation" in text and "count" in text
    assert "loaded it back" in text and f"grid: {out / 'captions.png'}" in text
    grid = Image.open(out / "captions.png")
    assert grid.size[0] > 400 and grid.size[1] > 400
    assert len(list((out / "images").glob("heldout-*.png"))) == demo.GRID
    model = splice.load(out / "model")
    assert model.tokenizer.get_vocab()["[BOS]"] == model.tokens["decoder_start"]
    assert (out / "model" / "preprocessor_config.json").is_file()
    assert "earlier" not in (out / "metrics.jsonl").read_text()


def test_the_grid_marks_right_and_wrong(tmp_path):
    im = Image.new("RGB", (32, 32), (0, 0, 0))
    demo.draw_grid([im, im], [("a red circle", "a red circle"), ("a red square", "a red circle")], tmp_path / "g.png",
                   cols=2, scale=2)
    g = Image.open(tmp_path / "g.png").convert("RGB")
    tile_w = 32 * 2 + 16
    left, right = g.getpixel((6, 10)), g.getpixel((tile_w + 6, 10))
    assert left[1] > left[0] and right[0] > right[1]  # green frame, red frame


# -- sin-cos position embedding (timm_vision) ------------------------------------------------------------------


def _vit(**kw):
    cfg = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, **kw}
    return splice.compose({"encoder": {"name": "vit", "config": cfg},
                           "decoder": {"name": "gpt2", "config": {"vocab_size": 23, "n_positions": 8, "n_embd": 32,
                                                                  "n_layer": 1, "n_head": 2}}}, seed=0)


def test_sincos_position_embedding(tmp_path):
    from timm.layers import build_sincos2d_pos_embed

    model = _vit(pos_embed_init="sincos", pos_embed_trainable=False)
    pos = model.encoder.model.pos_embed  # (1, 1 + 16, 32)
    assert torch.equal(pos[0, 0], torch.zeros(32))  # the class token's position
    assert torch.equal(pos[0, 1:], build_sincos2d_pos_embed([4, 4], dim=32))
    assert not pos.requires_grad
    model.save_pretrained(tmp_path)
    loaded = splice.load(tmp_path)
    assert torch.equal(loaded.encoder.model.pos_embed, pos) and not loaded.encoder.model.pos_embed.requires_grad
    trainable = _vit(pos_embed_init="sincos")
    assert trainable.encoder.model.pos_embed.requires_grad
    assert torch.equal(trainable.encoder.model.pos_embed, pos)
    learned = _vit()
    assert not torch.equal(learned.encoder.model.pos_embed, pos)


def test_sincos_distilled_deit_keeps_both_prefix_positions_zero():
    model = splice.compose({"encoder": {"name": "deit_distilled", "config": {
        "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "pos_embed_init": "sincos"}},
        "decoder": {"name": "gpt2", "config": {"n_positions": 8, "n_embd": 32, "n_layer": 1, "n_head": 2}}}, seed=0)
    pos = model.encoder.model.pos_embed
    assert torch.equal(pos[0, :2], torch.zeros(2, 32)) and pos[0, 2:].abs().sum() > 0


def test_sincos_needs_a_width_divisible_by_4():
    plan = splice.validate({"encoder": {"name": "vit", "config": {"img_size": 32, "patch_size": 8, "embed_dim": 30,
                                                                  "depth": 1, "num_heads": 2, "pos_embed_init": "sincos"}},
                            "decoder": {"name": "gpt2"}})
    assert not plan.ok
    problem = next(p for p in plan.problems if "pos_embed_init" in p.path)
    assert "divisible by 4" in str(problem)

"""``splice demo``: the embedded default, end to end, offline, on a laptop's CPU.

Composes the tiny captioner of ``examples/demo-captioner.yaml`` (ViT with fixed sin-cos positions + GPT-2 with
cross-attention), trains it from scratch on the synthetic shapes set (``splice.synthetic``) on 2 CPU threads for
a time budget (5 minutes), reports exact-match caption accuracy on 500 held-out images with a breakdown per
kind of caption, saves the model with its tokenizer, loads it back, captions held-out images from PNG files and
writes them with their captions into a grid (``captions.png``).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from splice.core.errors import InputError, Problem

TARGET = 0.95
GRID = 16  # held-out images captioned after reloading

# The same spec as examples/demo-captioner.yaml (a test keeps them equal), for installs without the examples.
SPEC = {
    "kind": "encoder-decoder",
    "encoder": {"name": "vit", "config": {"img_size": 64, "patch_size": 8, "embed_dim": 128, "depth": 2,
                                          "num_heads": 4, "pos_embed_init": "sincos", "pos_embed_trainable": False}},
    "decoder": {"name": "gpt2", "config": {"vocab_size": 23, "n_positions": 16, "n_embd": 128, "n_layer": 2,
                                           "n_head": 4, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}},
    "cross_attention": {"kind": "standard", "layers": "all"},
    "projection": "auto",
    "tokens": {"decoder_start": 1, "pad": 0, "eos": 2},
    "max_length": 12,
}

# What the demo trains with: measured on 2 CPU cores (docs/training.md).
RECIPE = dict(batch_size=128, lr=1e-3, warmup_steps=50, schedule="cosine", weight_decay=0.01, grad_clip=1.0)


def bundled_spec(example: str = "demo-captioner.yaml", built_in: dict | None = None) -> str | dict:
    """examples/<example> from a source checkout, else the same spec built in (``SPEC`` by default)."""
    path = Path(__file__).resolve().parents[2] / "examples" / example
    if not path.is_file():
        return dict(built_in or SPEC)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_settings(*, minutes: Any, threads: Any, seed: Any, out: Any, recipe: dict | None = None) -> list[Problem]:
    """The demo's settings are training settings: checked as ``TrainConfig`` checks them, named as ``run`` names
    them (``splice demo`` names them by its flags)."""
    from splice.train import TrainConfig

    config = TrainConfig(out=out, max_minutes=minutes, threads=threads, seed=seed, **(recipe or RECIPE))
    names = {"max_minutes": "minutes", "max_steps": "minutes", "threads": "threads", "seed": "seed", "out": "out"}
    return [dataclasses.replace(p, path=names[p.path]) for p in config.problems() if p.path in names]


def prepare(spec: str | dict, out: str, *, minutes: Any, threads: Any, seed: Any, recipe: dict) -> tuple[Any, Path]:
    """Check a demo's settings, set the threads, and clear what an earlier run wrote into ``out`` (a second run
    replaces the first): (the spec, the output folder)."""
    problems = check_settings(minutes=minutes, threads=threads, seed=seed, out=out, recipe=recipe)
    if problems:
        raise InputError(problems, source="the demo settings")
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out)
    for name in ("checkpoint", "model", "images", "metrics.jsonl", "captions.png", "classified.png"):
        p = out_dir / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return spec, out_dir


def run(spec: str | dict | None = None, out: str = "out/demo", *, minutes: float = 5.0, threads: int | None = 2,
        seed: int = 0, target: float = TARGET, eval_size: int = 500, progress: bool = True) -> int:
    """Train, evaluate, save, reload, caption, draw. Returns 0 (the accuracy is reported, not enforced)."""
    from splice.synthetic import ShapesData
    from splice.train import TrainConfig, train
    from splice.train.progress import clock

    t_start = time.perf_counter()
    spec, out_dir = prepare(spec or bundled_spec(), out, minutes=minutes, threads=threads, seed=seed, recipe=RECIPE)

    model = _compose(spec, seed)
    where = spec if isinstance(spec, str) else "the built-in demo spec"
    print(f"splice demo: a {model.num_parameters() / 1e6:.2f} M-parameter captioner ({where}) trained from scratch "
          f"on synthetic shapes, {torch.get_num_threads()} CPU threads, {minutes:g} minutes", flush=True)

    result = train(model, "shapes", TrainConfig(
        out=str(out_dir), max_minutes=minutes, seed=seed, threads=threads, log_every=25, eval_at_end=False,
        save_minutes=None, overwrite=True, progress=progress, **RECIPE))
    model = result.model
    print(f"trained {result.step:,} steps ({result.samples:,} images) in {clock(result.elapsed_s)}", flush=True)

    data = ShapesData.for_model(model, seed=seed)
    _report_accuracy(model, data, eval_size, target)
    _caption_heldout(reload_saved(out_dir), data, out_dir)
    print(f"done in {clock(time.perf_counter() - t_start)}")
    return 0


def _compose(spec: str | dict, seed: int):
    """The untrained captioner with the shapes tokenizer and an image processor at the encoder's size."""
    import splice
    from splice.core.processing import ImageProcessor
    from splice.synthetic import build_tokenizer

    model = splice.compose(spec, seed=seed)
    model.tokenizer = build_tokenizer()
    pre = model.encoder.preprocessing
    # the images are drawn at the encoder's size: inference resizes to it exactly (no crop), like training
    model.image_processor = ImageProcessor(size={"height": pre.image_size[0], "width": pre.image_size[1]},
                                           image_mean=tuple(pre.mean), image_std=tuple(pre.std))
    return model


def _report_accuracy(model, data, eval_size: int, target: float) -> None:
    """Exact match on the held-out images, in all and per kind of caption (single, count, relation)."""
    from splice.train import evaluate

    ev = evaluate(model, data, n=eval_size, batch_size=100, examples=0)
    verdict = "reached" if ev["exact_match"] >= target else "not reached"
    print(f"held-out exact match: {ev['exact_match']:.1%} of {ev['n']} images (target {target:.0%}: {verdict})")
    print("  " + "   ".join(f"{cat} {r['exact_match']:.1%} ({r['n']})" for cat, r in ev["by_category"].items()))


def _caption_heldout(loaded, data, out_dir: Path) -> None:
    """Held-out images written as PNGs, captioned from those files by the reloaded model, drawn into a grid."""
    from PIL import Image

    from splice.caption import caption

    images = out_dir / "images"
    held, paths = write_heldout(data, images)
    caps = caption(loaded, paths, batch_size=GRID, max_new_tokens=12)
    rows = [(str(p), c.text or "", s.caption) for p, c, s in zip(paths, caps, held)]
    right = sum(pred == ref for _, pred, ref in rows)
    print(f"captions of {len(rows)} held-out images read from {images}/ by the reloaded model ({right}/{len(rows)} exact):")
    for path, pred, ref in rows[:8]:
        mark = "ok " if pred == ref else "NO "
        print(f"  {mark} {Path(path).name}: {pred}" + ("" if pred == ref else f"   (expected: {ref})"))
    grid = out_dir / "captions.png"
    draw_grid([Image.open(p).convert("RGB") for p in paths], [(pred, ref) for _, pred, ref in rows], grid)
    print(f"grid: {grid}")


def reload_saved(out_dir: Path):
    """The model the training run saved in ``out_dir/model``, loaded back (and said so)."""
    import splice

    saved = out_dir / "model"
    loaded = splice.load(saved)
    files = ", ".join(sorted(p.name for p in saved.iterdir()))
    print(f"saved {saved}/ ({files}) and loaded it back")
    return loaded


def write_heldout(data, images: Path) -> tuple[list, list[Path]]:
    """The first ``GRID`` held-out samples, and the PNG files they are written to in ``images``."""
    from PIL import Image

    images.mkdir(parents=True, exist_ok=True)
    held = data.heldout(GRID)
    paths = [images / f"heldout-{i:02d}.png" for i in range(len(held))]
    for sample, path in zip(held, paths):
        Image.fromarray(sample.image).save(path)
    return held, paths


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def draw_grid(images, captions: list[tuple[str, str]], path: Path, *, cols: int = 4, scale: int = 3) -> None:
    """Images with their predicted captions: green frame when the caption is exact, red (with the right one)
    when not."""
    from PIL import Image, ImageDraw

    font = _font(13)
    w, h = images[0].size
    tile_w, pad, text_h = w * scale + 16, 8, 64
    tile_h = h * scale + text_h + pad
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile_w, rows * tile_h), "white")
    d = ImageDraw.Draw(sheet)
    for i, (im, (pred, ref)) in enumerate(zip(images, captions)):
        x, y = (i % cols) * tile_w + 8, (i // cols) * tile_h + pad
        ok = pred == ref
        colour = (20, 140, 40) if ok else (200, 30, 30)
        d.rectangle([x - 4, y - 4, x + w * scale + 3, y + h * scale + 3], fill=colour)
        sheet.paste(im.resize((w * scale, h * scale), Image.NEAREST), (x, y))
        ty = y + h * scale + 6
        for line in _wrap(("right: " if ok else "wrong: ") + (pred or "(nothing)"), font, tile_w - 12)[:2]:
            d.text((x, ty), line, fill=colour, font=font)
            ty += 15
        if not ok:
            for line in _wrap(f"true: {ref}", font, tile_w - 12)[:2]:
                d.text((x, ty), line, fill=(90, 90, 90), font=font)
                ty += 15
    sheet.save(path)

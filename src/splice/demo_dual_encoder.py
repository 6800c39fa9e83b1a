"""``splice demo --kind dual-encoder``: a tiny dual encoder trained contrastively from scratch, offline, on 2 CPU
threads.

Composes the dual encoder of ``examples/demo-dual-encoder.yaml`` (a ViT and a BERT text encoder projected into one
space, clip loss), trains it on the synthetic shapes set (``splice.synthetic``: every image has one caption) for
a time budget (5 minutes), and reports on 500 held-out images: image->text and text->image recall@1 among their
500 captions (per kind of caption too), and zero-shot accuracy over every caption the set can draw (576). It then
saves the model with its tokenizer, loads it back, classifies held-out images read from PNG files against the
576 captions with ``splice.zero_shot.classify`` (what ``splice classify`` runs) and draws them into a grid.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from splice.core.errors import InputError
from splice import demo
from splice.demo import draw_grid, write_heldout
from splice.train.progress import clock

TARGET = 0.90  # image->text recall@1 on the held-out images

# The same spec as examples/demo-dual-encoder.yaml (a test keeps them equal), for installs without the examples.
SPEC = {
    "kind": "dual-encoder",
    "vision": {"name": "vit", "config": {"img_size": 64, "patch_size": 8, "embed_dim": 128, "depth": 2,
                                         "num_heads": 4, "pos_embed_init": "sincos", "pos_embed_trainable": False}},
    "text": {"name": "bert", "config": {"vocab_size": 23, "hidden_size": 128, "num_hidden_layers": 2,
                                        "num_attention_heads": 4, "intermediate_size": 512,
                                        "max_position_embeddings": 16, "hidden_dropout_prob": 0.0,
                                        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.2}},
    "projection_dim": 128,
    "loss": "clip",
}

# What the demo trains with: measured on 2 CPU cores (docs/dual-encoder.md).
RECIPE = dict(batch_size=128, lr=1e-3, warmup_steps=50, schedule="cosine", weight_decay=0.01, grad_clip=1.0)


def bundled_spec() -> str | dict:
    """examples/demo-dual-encoder.yaml from a source checkout, else the same spec built in."""
    return demo.bundled_spec("demo-dual-encoder.yaml", SPEC)


def run(spec: str | dict | None = None, out: str = "out/demo-dual-encoder", *, minutes: float = 5.0,
        threads: int | None = 2, seed: int = 0, target: float = TARGET, eval_size: int = 500,
        progress: bool = True) -> int:
    """Train, evaluate, save, reload, classify, draw. Returns 0 (the recall is reported, not enforced)."""
    import splice
    from splice.synthetic import ShapesData, build_tokenizer
    from splice.train import TrainConfig, train

    t_start = time.perf_counter()
    spec, out_dir = demo.prepare(spec or bundled_spec(), out, minutes=minutes, threads=threads, seed=seed,
                                 recipe=RECIPE)
    model = splice.compose(spec, seed=seed)
    if getattr(model, "get_image_features", None) is None:
        raise InputError(f"--spec: {spec if isinstance(spec, str) else 'the spec'} is not a dual encoder\n"
                         "    fix: give a spec with `kind: dual-encoder`, or run `splice demo` for the captioner")
    model.tokenizer = build_tokenizer(wrap=True)  # [BOS] caption [EOS], as the text encoder's [CLS] ... [SEP]
    where = spec if isinstance(spec, str) else "the built-in demo spec"
    print(f"splice demo: a {model.num_parameters() / 1e6:.2f} M-parameter dual encoder ({where}) trained "
          f"contrastively from scratch on synthetic shapes, {torch.get_num_threads()} CPU threads, {minutes:g} "
          "minutes", flush=True)
    result = train(model, "shapes", TrainConfig(
        out=str(out_dir), max_minutes=minutes, seed=seed, threads=threads, log_every=25, eval_at_end=False,
        save_minutes=None, overwrite=True, progress=progress, **RECIPE))
    model = result.model
    print(f"trained {result.step:,} steps ({result.samples:,} image-caption pairs) in {clock(result.elapsed_s)}",
          flush=True)
    data = ShapesData.for_model(model, seed=seed)
    report(model.evaluate_training(data, n=eval_size, batch_size=100, precision="fp32"), target)
    classify_heldout(demo.reload_saved(out_dir), data, out_dir)
    print(f"done in {clock(time.perf_counter() - t_start)}")
    return 0


def report(figures: dict, target: float) -> None:
    """Recall@1 both ways (per kind of caption) and zero-shot accuracy over the caption set."""
    recall = figures["image_to_text_recall@1"]
    verdict = "reached" if recall >= target else "not reached"
    n = figures["n"]
    print(f"held-out image->text recall@1: {recall:.1%} of {n} images among their {n} captions "
          f"(target {target:.0%}: {verdict}); text->image recall@1: {figures['text_to_image_recall@1']:.1%}")
    print("  " + "   ".join(f"{cat} {r['image_to_text_recall@1']:.1%} ({r['n']})"
                            for cat, r in figures.get("by_category", {}).items()))
    if "zero_shot_accuracy" in figures:
        print(f"zero-shot accuracy over all {figures['caption_set']} captions of the set: "
              f"{figures['zero_shot_accuracy']:.1%}")


def classify_heldout(loaded, data, out_dir: Path) -> None:
    """Held-out images written as PNGs, classified from those files by the reloaded model against every caption
    of the set, drawn into a grid."""
    from PIL import Image

    from splice.zero_shot import classify

    images = out_dir / "images"
    held, paths = write_heldout(data, images)
    results = classify(loaded, paths, data.caption_set(), template="{}")
    rows = [(r.label or "", s.caption) for r, s in zip(results, held)]
    right = sum(pred == ref for pred, ref in rows)
    print(f"zero-shot labels of {len(rows)} held-out images read from {images}/ by the reloaded model, among "
          f"{len(data.caption_set())} captions ({right}/{len(rows)} right):")
    for path, r, (pred, ref) in list(zip(paths, results, rows))[:8]:
        mark = "ok " if pred == ref else "NO "
        p = r.scores.get(pred, 0.0)
        print(f"  {mark} {path.name}: {pred} ({p:.2f})" + ("" if pred == ref else f"   (true: {ref})"))
    grid = out_dir / "classified.png"
    draw_grid([Image.open(p).convert("RGB") for p in paths], rows, grid)
    print(f"grid: {grid}")

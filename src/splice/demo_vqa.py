"""A synthetic VQA demo: a tiny single-stream model (a ViT whose tokens join a BERT's text, a vqa head) trained
from scratch, offline, on 2 CPU threads, on questions about the shapes set (``splice.synthetic``).

Every image of the shapes set gets one question, drawn with it: its colour or its shape (one shape, or two alike),
how many shapes there are, or where one of two shapes lies relative to the other. The answer is one of 15 words
(``ANSWERS``): a classification over the head's answer vocabulary. The demo trains for a time budget (5 minutes),
reports the answer accuracy on 500 held-out images (per kind of question too), saves the model with its tokenizer
and answer vocabulary, loads it back and answers held-out images read from PNG files with ``splice.vqa.answer``
(what ``splice vqa`` runs).

    python -c "from splice import demo_vqa; demo_vqa.run()"
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from splice import demo, synthetic
from splice.train.progress import clock

TARGET = 0.90  # held-out answer accuracy
ANSWERS = [*synthetic.COLOURS, *synthetic.KINDS, "one", "two", "left", "right", "above", "below"]
QUESTION_WORDS = ["what", "colour", "shape", "is", "are", "the", "it", "they", "shapes", "how", "many", "there",
                  "where", *synthetic.COLOURS, *synthetic.KINDS]
SPECIAL = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")  # ids 0, 1, 2, 3
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}

SPEC = {
    "kind": "single-stream",
    "vision": {"name": "vit", "config": {"img_size": 64, "patch_size": 16, "embed_dim": 128, "depth": 2,
                                         "num_heads": 4, "pos_embed_init": "sincos", "pos_embed_trainable": False}},
    "text": {"name": "bert", "config": {"vocab_size": len(SPECIAL) + len(QUESTION_WORDS), "hidden_size": 128,
                                        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512,
                                        "max_position_embeddings": 16, "hidden_dropout_prob": 0.0,
                                        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.2}},
    "head": {"kind": "vqa", "num_labels": len(ANSWERS), "labels": ANSWERS},
}
RECIPE = dict(batch_size=32, lr=2e-3, warmup_steps=50, schedule="cosine", weight_decay=0.01, grad_clip=1.0)


def build_tokenizer():
    """A word-level tokenizer of the questions: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, then ``QUESTION_WORDS``; every
    question wrapped as ``[CLS] ... [SEP]``."""
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate([*SPECIAL, *QUESTION_WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return tok


def question(s: synthetic.Sample, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, answer, kind of question) about sample ``s``, one of the questions its shapes answer."""
    a = s.shapes[0]
    choices = [("how many shapes are there", "one" if len(s.shapes) == 1 else "two", "count")]
    if s.category == "single":
        choices += [("what colour is the shape", a.colour, "colour"), ("what shape is it", a.kind, "shape")]
    elif s.category == "count":
        choices += [("what colour are the shapes", a.colour, "colour"), ("what shape are they", a.kind, "shape")]
    else:  # the caption names the shape whose colour comes first, and where it lies relative to the other
        first, other = sorted(s.shapes, key=lambda t: t.order)
        where = s.caption.split()[3]  # "a red circle left of a blue square" -> "left"
        choices += [(f"where is the {first.colour} {first.kind}", where, "where"),
                    (f"where is the {other.colour} {other.kind}", OPPOSITE[where], "where")]
    return choices[int(rng.integers(len(choices)))]


class ShapesVQA(synthetic.ShapesData):
    """The shapes set with one question per image, as a training source (``get``: fresh images) and a fixed
    held-out set (``eval_batches``); batches as ``splice.vqa``'s reader makes them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.index = {a: i for i, a in enumerate(ANSWERS)}

    def describe(self) -> str:
        return f"shapes VQA: synthetic {self.config.image_size}px images, one question each, seed {self.seed}"

    def items(self, stream: int, indices: Iterable[int]) -> dict:
        from splice.vqa import collate_qa

        out = []
        for k in indices:
            s = synthetic.sample(self.seed, stream, k, self.config)
            q, answer, kind = question(s, np.random.default_rng([self.seed, stream, k, 17]))
            out.append({"pixel_values": self.pixels([s.image])[0], "input_ids": self.tokenizer.encode(q).ids,
                        "label": self.index[answer], "question": q, "answer": answer, "category": kind})
        return collate_qa(out, pad=0)



def run(spec: dict | None = None, out: str = "out/demo-vqa", *, minutes: float = 5.0, threads: int | None = 2,
        seed: int = 0, target: float = TARGET, eval_size: int = 500, progress: bool = True) -> int:
    """Train, evaluate, save, reload, answer. Returns 0, the exit status of ``splice demo`` (the accuracy is
    reported, not enforced)."""
    import splice
    from splice.train import TrainConfig, train

    t_start = time.perf_counter()
    spec, out_dir = demo.prepare(spec or SPEC, out, minutes=minutes, threads=threads, seed=seed, recipe=RECIPE)
    model = splice.compose(spec, seed=seed)
    model.tokenizer = build_tokenizer()
    data = ShapesVQA.for_model(model, seed=seed)
    print(f"splice demo (vqa): a {model.num_parameters() / 1e6:.2f} M-parameter single-stream model trained from "
          f"scratch on questions about synthetic shapes, {torch.get_num_threads()} CPU threads, {minutes:g} "
          "minutes", flush=True)
    result = train(model, data, TrainConfig(
        out=str(out_dir), max_minutes=minutes, seed=seed, threads=threads, log_every=25, eval_at_end=False,
        save_minutes=None, overwrite=True, progress=progress, **RECIPE))
    print(f"trained {result.step:,} steps ({result.samples:,} questions) in {clock(result.elapsed_s)}", flush=True)
    figures = result.model.evaluate_training(data, n=eval_size, batch_size=100, precision="fp32")
    verdict = "reached" if figures["accuracy"] >= target else "not reached"
    print(f"held-out answer accuracy: {figures['accuracy']:.1%} of {figures['n']} questions (target {target:.0%}: "
          f"{verdict}); loss {figures['loss']:.4f}")
    print("  " + "   ".join(f"{c} {r['accuracy']:.1%} ({r['n']})" for c, r in figures.get("by_category", {}).items()))
    answer_heldout(demo.reload_saved(out_dir), data, out_dir)
    print(f"done in {clock(time.perf_counter() - t_start)}")
    return 0


def answer_heldout(loaded, data: ShapesVQA, out_dir: Path, n: int = 8) -> None:
    """Held-out images written as PNGs, answered from those files by the reloaded model."""
    from PIL import Image

    from splice.vqa import answer

    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    print(f"answers of the reloaded model to held-out images read from {images}/:")
    for i in range(n):
        s = synthetic.sample(data.seed, synthetic.HELDOUT_STREAM, i, data.config)
        q, truth, _ = question(s, np.random.default_rng([data.seed, synthetic.HELDOUT_STREAM, i, 17]))
        path = images / f"heldout-{i:02d}.png"
        Image.fromarray(s.image).save(path)
        got = answer(loaded, path, q, top_k=1)[0]
        mark = "ok " if got.answer == truth else "NO "
        print(f"  {mark} {path.name}: {q}? {got.answer} ({got.scores[got.answer]:.2f})"
              + ("" if got.answer == truth else f"   (true: {truth})"))

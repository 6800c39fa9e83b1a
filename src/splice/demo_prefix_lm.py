"""``splice demo --kind prefix-lm``: a tiny LLaVA-style model (a CLIP vision tower, the llava projector, a LLaMA
language model) trained from scratch, offline, on 2 CPU threads, to answer questions about the shapes set.

Every image gets one question (``splice.demo_vqa.question``: colour, shape, how many, where), or, for two shapes,
a VipLlava visual prompt: a red box drawn around one of them and "what is in the red box" (answer: its colour and
kind). The prompt is built as ``splice ask`` builds it, from the model's chat template; the answer is generated
(greedy) and scored by exact match on 500 held-out images, per kind of question. The model is saved with its
tokenizer and template, loaded back, and asked about held-out PNG files through ``splice.ask.ask``.
"""

from __future__ import annotations

import functools
import time
from typing import Iterable

import numpy as np
import torch

from splice import demo, demo_vqa, synthetic
from splice.train.progress import clock

TARGET = 0.90  # held-out exact-match answer accuracy
SPECIAL = ("[PAD]", "[BOS]", "[EOS]", "[UNK]", "<image>")  # ids 0..4
WORDS = sorted({*demo_vqa.QUESTION_WORDS, *demo_vqa.ANSWERS, "in", "red", "box", "question:", "answer:"})
TEMPLATE = "{{ bos_token }} <image> question: {{ messages[0]['content'][1]['text'] }} answer:"

SPEC = {
    "kind": "prefix-lm",
    "vision": {"name": "clip_vision", "config": {"image_size": 64, "patch_size": 8, "hidden_size": 128,
                                                 "intermediate_size": 512, "num_hidden_layers": 2,
                                                 "num_attention_heads": 4}},
    "language": {"name": "llama", "config": {"vocab_size": len(SPECIAL) + len(WORDS), "hidden_size": 128,
                                             "intermediate_size": 512, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "num_key_value_heads": 2,
                                             "max_position_embeddings": 96}},
    "projector": "llava",
    "vision_feature_layers": -1,
    "tokens": {"image": 4, "pad": 0, "bos": 1, "eos": 2},
    "chat_template": TEMPLATE,
}
RECIPE = dict(batch_size=32, lr=1e-3, warmup_steps=50, schedule="cosine", weight_decay=0.01, grad_clip=1.0)


def build_tokenizer():
    """Word-level: the special tokens (``<image>`` among them, never split), then ``WORDS``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate([*SPECIAL, *WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL))
    return tok


def question(s: synthetic.Sample, rng: np.random.Generator) -> tuple[str, str, str, tuple | None]:
    """(question, answer, kind of question, box or None): a red box around one of two shapes half the time."""
    if len(s.shapes) == 2 and rng.random() < 0.5:
        shape = s.shapes[int(rng.integers(2))]
        pad = shape.r + 3
        box = (shape.x - pad, shape.y - pad, shape.x + pad, shape.y + pad)
        return "what is in the red box", f"{shape.colour} {shape.kind}", "box", box
    return (*demo_vqa.question(s, rng), None)


class ShapesPromptQA(synthetic.ShapesData):
    """The shapes set with one question per image (a visual prompt drawn in when it asks about a box), as batches
    of prompt + answer tokens (``splice.ask.collate_prompts``): fresh images for training, a fixed held-out set."""

    def __init__(self, model, *, seed: int = 0):
        pre = model.vision_tower().preprocessing
        super().__init__(tokenizer=model.tokenizer, image_size=pre.image_size[0], mean=pre.mean, std=pre.std,
                         seed=seed)
        self.model = model

    def describe(self) -> str:
        return f"shapes questions: synthetic {self.config.image_size}px images, one question each, seed {self.seed}"

    @functools.lru_cache(maxsize=None)
    def prompt(self, q: str) -> tuple[int, ...]:
        from splice.ask import prompt_ids

        return tuple(prompt_ids(self.model, q)[0].tolist())

    def sample(self, stream: int, k: int):
        """(the image as drawn, with its box; question, answer, kind)."""
        from PIL import Image

        from splice.ask import draw_prompts

        s = synthetic.sample(self.seed, stream, k, self.config)
        q, answer, kind, box = question(s, np.random.default_rng([self.seed, stream, k, 29]))
        image = np.asarray(draw_prompts(Image.fromarray(s.image), box=box)) if box else s.image
        return image, q, answer, kind

    def items(self, stream: int, indices: Iterable[int]) -> dict:
        from splice.ask import collate_prompts

        out, answers = [], []
        for k in indices:
            image, q, answer, kind = self.sample(stream, k)
            prompt = list(self.prompt(q))
            target = self.tokenizer.encode(answer, add_special_tokens=False).ids + [self.model.tokens["eos"]]
            out.append({"pixel_values": self.pixels([image])[0], "input_ids": prompt + target,
                        "labels": [-100] * len(prompt) + target, "question": q, "category": kind})
            answers.append(answer)
        return {**collate_prompts(out, pad=self.model.tokens["pad"]), "answers": answers}



@torch.no_grad()
def accuracy(model, data: ShapesPromptQA, n: int = 500) -> dict:
    """Greedy exact match of the generated answers on ``n`` held-out images, per kind of question."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for batch in data.eval_batches(n):
        prompts = [list(data.prompt(q)) for q in batch["captions"]]
        T = max(map(len, prompts))
        ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])  # left padded (B, T)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=ids, pixel_values=batch["pixel_values"], attention_mask=mask,
                             max_new_tokens=3)
        for row, answer, kind in zip(out[:, T:].tolist(), batch["answers"], batch["categories"]):
            said = " ".join(model.tokenizer.decode(row, skip_special_tokens=True).split())
            hits.setdefault(kind, []).append(said == answer)
    every = [h for v in hits.values() for h in v]
    return {"exact_match": sum(every) / max(len(every), 1), "n": len(every),
            "by_kind": {k: (sum(v) / len(v), len(v)) for k, v in sorted(hits.items())}}


def run(spec: dict | str | None = None, out: str = "out/demo-prefix-lm", *, minutes: float = 5.0,
        threads: int | None = 2, seed: int = 0, target: float = TARGET, eval_size: int = 500,
        progress: bool = True) -> int:
    """Train, evaluate, save, reload, ask. Returns 0 (the accuracy is reported, not enforced)."""
    import splice
    from splice.train import TrainConfig, train

    t_start = time.perf_counter()
    spec, out_dir = demo.prepare(spec or SPEC, out, minutes=minutes, threads=threads, seed=seed, recipe=RECIPE)
    model = splice.compose(spec, seed=seed)
    model.tokenizer = build_tokenizer()
    data = ShapesPromptQA(model, seed=seed)
    print(f"splice demo: a {model.num_parameters() / 1e6:.2f} M-parameter prefix LM (CLIP vision + llava projector + "
          f"LLaMA) trained from scratch on questions about synthetic shapes, {torch.get_num_threads()} CPU threads, "
          f"{minutes:g} minutes", flush=True)
    result = train(model, data, TrainConfig(
        out=str(out_dir), max_minutes=minutes, seed=seed, threads=threads, log_every=25, eval_at_end=False,
        save_minutes=None, overwrite=True, progress=progress, **RECIPE))
    model = result.model
    print(f"trained {result.step:,} steps ({result.samples:,} questions) in {clock(result.elapsed_s)}", flush=True)
    figures = accuracy(model, data, eval_size)
    verdict = "reached" if figures["exact_match"] >= target else "not reached"
    print(f"held-out exact match: {figures['exact_match']:.1%} of {figures['n']} answers (target {target:.0%}: "
          f"{verdict})")
    print("  " + "   ".join(f"{k} {a:.1%} ({n})" for k, (a, n) in figures["by_kind"].items()))
    ask_heldout(demo.reload_saved(out_dir), data, out_dir)
    print(f"done in {clock(time.perf_counter() - t_start)}")
    return 0


def ask_heldout(loaded, data: ShapesPromptQA, out_dir) -> None:
    """Held-out images written as PNGs (without their box), asked by the reloaded model with ``splice.ask.ask``,
    the box drawn by ``ask`` as ``splice ask --box`` draws it."""
    from PIL import Image

    from splice.ask import ask

    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    right = 0
    lines = []
    for k in range(8):
        s = synthetic.sample(data.seed, synthetic.HELDOUT_STREAM, k, data.config)
        q, answer, _, box = question(s, np.random.default_rng([data.seed, synthetic.HELDOUT_STREAM, k, 29]))
        path = images / f"heldout-{k:02d}.png"
        Image.fromarray(s.image).save(path)
        said = ask(loaded, path, q, box=box, max_new_tokens=3)
        right += said == answer
        lines.append(f"  {'ok ' if said == answer else 'NO '} {path.name}: {q}{' (box drawn)' if box else ''} -> "
                     f"{said}" + ("" if said == answer else f"   (true: {answer})"))
    print(f"questions about {len(lines)} held-out images read from {images}/, asked of the reloaded model "
          f"({right}/{len(lines)} right):")
    print("\n".join(lines))

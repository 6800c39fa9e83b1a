"""``splice ask MODEL IMAGE "question"``: a question about an image, answered by a prefix-LM model (LLaVA,
VipLlava).

The prompt comes from the model's chat template (a transformers folder's ``chat_template.jinja``, kept in the
spec), rendered as transformers' ``apply_chat_template`` renders it: one user message whose content is an image
and the question, with the generation prompt; without a template, VipLlava's documented one,
``###Human: <image>\\n{question}###Assistant:``. The one image token of the prompt is then expanded to the
model's ``image_seq_length`` image tokens, as transformers 5's processors do. ``--box`` and ``--arrow`` draw
VipLlava's visual prompts (a red rectangle or arrow, in the image's pixel coordinates) on the image first.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch

from splice.core.errors import InputError, short
from splice.data import RowDataset

VIPLLAVA_TEMPLATE = "###Human: <image>\n{prompt}###Assistant:"
RED = (255, 0, 0)


def _prefix_lm(model) -> None:
    if not callable(getattr(model, "prompt_embeddings", None)):
        kind = model.spec.get("kind", "encoder-decoder") if isinstance(getattr(model, "spec", None), dict) else "?"
        raise InputError(f"model: a {kind} model does not answer questions about images\n    expected: a prefix-lm "
                         "model (kind: prefix-lm, or a transformers LLaVA / VipLlava folder)\n    fix: give such a "
                         "model; `splice caption` describes images with a captioner")
    if getattr(model, "tokenizer", None) is None:
        raise InputError("model: it has no tokenizer, so the question cannot be turned into token ids\n"
                         "    fix: save the model with its tokenizer.json")


def parse_box(flag: str, value: str) -> tuple[float, float, float, float]:
    """``x0,y0,x1,y1`` in pixels (``--box`` / ``--arrow``)."""
    parts = value.split(",") if isinstance(value, str) else []
    try:
        numbers = tuple(float(p) for p in parts)
    except ValueError:
        numbers = ()
    if len(numbers) != 4 or not all(math.isfinite(n) for n in numbers):
        raise InputError(f"{flag}: given {short(value)}; expected four numbers x0,y0,x1,y1 (pixels)\n"
                         f"    fix: e.g. {flag} 10,20,60,80")
    return numbers  # type: ignore[return-value]


def draw_prompts(image, *, box: Sequence[float] | None = None, arrow: Sequence[float] | None = None):
    """A copy of the RGB ``image`` with VipLlava's visual prompts drawn: a red rectangle around ``box``, a red
    arrow from (x0, y0) to its head at (x1, y1)."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    width = max(1, round(min(out.size) / 64))
    if box is not None:
        x0, y0, x1, y1 = box
        d.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=RED, width=width)
    if arrow is not None:
        x0, y0, x1, y1 = arrow
        d.line([x0, y0, x1, y1], fill=RED, width=width)
        angle, head = math.atan2(y1 - y0, x1 - x0), max(3.0, min(out.size) / 12)
        wings = [(x1 - head * math.cos(angle + s), y1 - head * math.sin(angle + s)) for s in (0.5, -0.5)]
        d.polygon([(x1, y1), *wings], fill=RED)
    return out


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """A chat template compiled once (a dataset builds one prompt per row)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment().from_string(template)


def prompt_text(model, question: str) -> tuple[str, bool]:
    """(the prompt with one image placeholder, whether the tokenizer should add its special tokens)."""
    template = getattr(model, "chat_template", None)
    image = model.tokenizer.id_to_token(model.tokens["image"]) or "<image>"
    if not template:
        return VIPLLAVA_TEMPLATE.replace("<image>", image).format(prompt=question), True
    names = {k: model.tokenizer.id_to_token(model.tokens[k]) if model.tokens.get(k) is not None else ""
             for k in ("bos", "eos", "pad")}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    try:
        text = _compiled(template).render(
            messages=messages, add_generation_prompt=True, bos_token=names["bos"], eos_token=names["eos"],
            pad_token=names["pad"])
    except Exception as exc:  # a template that fails to render: its own error, named
        raise InputError(f"chat_template: the model's template does not render ({type(exc).__name__}: "
                         f"{short(str(exc), 200)})\n    fix: fix chat_template.jinja, or remove it to use "
                         "VipLlava's template") from None
    if image not in text:  # a template that leaves images out: the image goes first, as transformers' processor
        text = f"{image}\n{text}"
    return text, False  # the template writes the special tokens itself, as apply_chat_template


def prompt_ids(model, question: str) -> torch.Tensor:
    """(1, T) token ids of the prompt, its image placeholder expanded to ``image_seq_length`` image tokens."""
    text, special = prompt_text(model, question)
    image, tok = model.tokens["image"], model.tokenizer
    placeholder = tok.id_to_token(image) or "<image>"
    ids = tok.encode(text, add_special_tokens=special).ids
    if image not in ids and text.count(placeholder) == 1:  # a tokenizer that splits the placeholder into pieces
        before, after = text.split(placeholder)
        ids = (tok.encode(before, add_special_tokens=special).ids + [image]
               + tok.encode(after, add_special_tokens=False).ids)
    if ids.count(image) != 1:
        raise InputError(f"question: the prompt holds {ids.count(image)} image tokens (id {image}); expected one "
                         "placeholder\n    fix: do not write the image token in the question")
    i = ids.index(image)
    return torch.tensor([ids[:i] + [image] * model.image_seq_length + ids[i + 1:]])


@torch.no_grad()
def ask(model, image: Any, question: str, *, box=None, arrow=None, max_new_tokens: int = 32, **options) -> str:
    """The model's answer to ``question`` about ``image`` (a path or a PIL image)."""
    from splice.core.processing import load_image, processor_for

    _prefix_lm(model)
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"question: given {short(question)}; expected a non-empty question\n"
                         "    fix: e.g. \"what colour is the circle?\"")
    picture = load_image(image) if not hasattr(image, "convert") else image
    if box is not None or arrow is not None:
        picture = draw_prompts(picture, box=box, arrow=arrow)
    from splice.core.inputs import home_tensor

    home = home_tensor(model)
    pixels = processor_for(model).one(picture)[None].to(home.device, home.dtype)  # (1, C, H, W)
    ids = prompt_ids(model, question).to(home.device)
    model.eval()
    out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                         max_new_tokens=max_new_tokens, **options)
    return " ".join(model.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).split())


def run_ask(model_path: str, image: str, question: str, *, box: str | None, arrow: str | None,
            max_new_tokens: int, num_beams: int) -> int:
    import splice

    from splice.caption import _printable

    boxes = parse_box("--box", box) if box is not None else None
    arrows = parse_box("--arrow", arrow) if arrow is not None else None
    model = splice.load(model_path)
    answer = ask(model, image, question, box=boxes, arrow=arrows, max_new_tokens=max_new_tokens,
                 num_beams=num_beams)
    print(_printable(answer))
    return 0


# -- question/answer rows for splice train ------------------------------------------------------------------------


class PromptQADataset(RowDataset):
    """Rows of (image, question, answer) as a prefix LM trains on them: ``input_ids`` the prompt (as ``splice ask``
    builds it, the image token expanded) then the answer's tokens and ``eos``; ``labels`` -100 over the prompt, so
    the loss is taken on the answer alone."""

    def __init__(self, rows: list, *, model, processor, report):
        self.rows, self.processor = rows, processor
        eos, limit = model.tokens.get("eos"), getattr(model.language, "max_positions", None)
        self.items: list[tuple[list[int], list[int]]] = []
        for row in rows:
            prompt = prompt_ids(model, row.question)[0].tolist()
            answer = model.tokenizer.encode(" " + row.answer, add_special_tokens=False).ids
            ids = prompt + answer + ([eos] if eos is not None else [])
            if limit is not None and len(ids) > limit:  # the answer's end is cut, never the image
                ids, report.truncated = ids[:limit], report.truncated + 1
            self.items.append((ids, [-100] * len(prompt) + ids[len(prompt):]))

    def item(self, i: int, row, pixels: torch.Tensor) -> dict:
        ids, labels = self.items[i]
        return {"pixel_values": pixels, "input_ids": ids, "labels": labels, "question": row.question,
                "category": row.category}


def collate_prompts(items, pad: int) -> dict:
    """Right-padded (B, T) ``input_ids`` / ``attention_mask`` / ``labels`` (-100 on padding), stacked images; items
    that failed to load are counted in ``errors``."""
    from splice.vqa import collate_qa

    items = list(items)  # the questions' batch, then the labels over its tokens
    batch = collate_qa([it if "error" in it else {**it, "label": -100, "answer": None} for it in items], pad)
    if batch["pixel_values"] is None:
        return batch
    labels = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)  # (B, T)
    for i, it in enumerate(it for it in items if "error" not in it):
        labels[i, : len(it["labels"])] = torch.tensor(it["labels"])
    batch.pop("answers")
    return {**batch, "labels": labels}


def load_prompt_qa_data(path, model, *, seed: int = 0, eval_path=None, eval_fraction: float = 0.05):
    """``splice train`` data for a prefix LM from a JSONL file or image folder of ``{"image", "question",
    "answer"}`` rows (``splice.vqa.read_qa_rows``): (train, eval or None, reports)."""
    from splice.core.processing import processor_for
    from splice.data import DataReport, FileData, find_sources, split
    from splice.vqa import read_qa_rows

    _prefix_lm(model)
    train_src, eval_src = find_sources(path)
    if eval_path is not None:
        eval_src = find_sources(eval_path)[0]
    rows, report = read_qa_rows(train_src)
    reports, eval_report = [report], None
    if eval_src is not None:
        eval_rows, eval_report = read_qa_rows(eval_src)
        reports.append(eval_report)
    else:
        rows, eval_rows = split(rows, eval_fraction, seed) if len(rows) >= 20 else (rows, [])
    pad, processor = model.tokens.get("pad") or 0, processor_for(model)

    def source(rows_: list, report_, name: str) -> FileData:
        dataset = PromptQADataset(rows_, model=model, processor=processor, report=report_)
        return FileData(dataset, seed=seed, name=name, collate_fn=functools.partial(collate_prompts, pad=pad))

    train = source(rows, report, str(train_src))
    evaluation = None
    if eval_rows:
        held = eval_report or DataReport("held out", len(eval_rows), len(eval_rows))
        evaluation = source(eval_rows, held, str(eval_src or f"{train_src} (held out {len(eval_rows)})"))
    return train, evaluation, reports

"""Visual question answering with a single-stream model: what ``splice vqa`` runs, and the question / answer data
``splice train`` reads for a model with a ``vqa`` or ``visual-reasoning`` head.

``answer`` reads one image and one question, and scores every answer of the head's vocabulary (``head.labels``,
saved with the model: in ``splice.json``, and as ``id2label`` in a transformers folder).

Training data: a JSONL file of ``{"image": path, "question": ..., "answer": ...}`` rows (paths relative to the
file), or an image folder whose ``metadata.jsonl`` rows name a ``file_name`` (with ``train/`` and ``validation/``
subfolders, as for captions). An answer is a string (true / false read as "true" / "false"); a row may carry a
``category``, by which the held-out accuracy is also reported. A model whose head has no answer vocabulary yet
takes one from the training rows (the ``num_labels`` most frequent answers); rows whose answer is outside the
vocabulary, like rows without an image, are counted by reason in the data report, never dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
import functools
from typing import Any, Iterable, Sequence

import torch

from splice.core.errors import InputError, short
from splice.data import (METADATA, BadRow, DataReport, FileData, check_tokenizer, encode_caption, find_sources,
                         RowDataset, split)

UNKNOWN = "unknown answer"  # the data report's reason for a row whose answer is not in the vocabulary


def _vqa_model(model, *, needs_vision: bool) -> None:
    """An ``InputError`` unless ``model`` is a single-stream model with a vqa / visual-reasoning head (and a vision
    encoder when ``needs_vision``)."""
    head = getattr(model, "head_kind", None)
    if head not in ("vqa", "visual-reasoning"):
        spec = getattr(model, "spec", None)
        kind = spec.get("kind", "encoder-decoder") if isinstance(spec, dict) else type(model).__name__
        raise InputError(f"model: a {kind} model{f' with a {head} head' if head else ''} does not answer questions\n"
                         "    expected: a single-stream model with a vqa (or visual-reasoning) head\n"
                         "    fix: compose `kind: single-stream` with `head: {kind: vqa, num_labels: N}`, or load a "
                         "VisualBertForQuestionAnswering folder")
    if needs_vision and model.vision is None:
        raise InputError("model: this single-stream model has no vision encoder, so it cannot read images\n"
                         "    expected: a `vision:` encoder in its spec (transformers' VisualBERT reads a detector's "
                         "region features)\n    fix: call model(input_ids=..., visual_embeds=...) with your region "
                         "features, or compose with a vision encoder")


# -- answering ------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    image: str
    question: str
    answer: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # answer -> probability, best first
    error: str | None = None


def _names(model) -> list[str]:
    """Every answer's name, id order (``LABEL_i`` where the vocabulary has none)."""
    labels = model.answer_labels or []
    return [labels[i] if i < len(labels) else f"LABEL_{i}" for i in range(model.classifier.out_features)]


@torch.no_grad()
def answer(model, images: Sequence[Any] | Any, question: str, *, top_k: int = 5) -> list[Answer]:
    """Each image's ``top_k`` answers to ``question`` (a softmax over the head's answers), best first. An image
    that cannot be read gets its ``error``; the others are still answered."""
    from splice.core.processing import processor_for
    from splice.zero_shot import tokenize

    _vqa_model(model, needs_vision=True)
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"question: given {short(question)}; expected a non-empty question\n"
                         "    fix: e.g. \"what color is the circle?\"")
    if type(top_k) is not int or top_k < 1:
        raise InputError(f"--top-k: given {short(top_k)}; expected an integer >= 1\n    fix: use 5")
    if isinstance(images, (str, Path)):
        images = [images]
    processor, names = processor_for(model), _names(model)
    results, pixels = [], []
    for image in images:
        item = Answer(image=str(image) if isinstance(image, (str, Path)) else f"<{type(image).__name__}>",
                      question=question)
        results.append(item)
        try:
            pixels.append((item, processor.one(image)))
        except InputError as exc:
            item.error = str(exc)
    ids, mask = tokenize(model, [question])  # (1, T) each
    first = next(model.parameters())
    for item, px in pixels:
        out = model(pixel_values=px[None].to(first.device, first.dtype), input_ids=ids.to(first.device),
                    attention_mask=mask.to(first.device))
        probs = out.logits[0].float().softmax(dim=-1)  # (K,)
        best = probs.topk(min(top_k, probs.numel()))
        item.scores = {names[i]: float(p) for p, i in zip(best.values.tolist(), best.indices.tolist())}
        item.answer = next(iter(item.scores))
    return results


def run_cli(model_path: str, images: list[str], question: str, *, top_k: int, as_json: bool) -> int:
    import splice

    model = splice.load(model_path)
    results = answer(model, images, question, top_k=top_k)
    if as_json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        if not model.answer_labels:
            print("(this model's head has no answer vocabulary: answers shown as LABEL_<id>)")
        for r in results:
            if r.error is not None:
                print(f"{r.image}: error: {r.error}")
                continue
            others = ", ".join(f"{a} {p:.1%}" for a, p in list(r.scores.items())[1:])
            print(f"{r.image}: {r.answer} ({r.scores[r.answer]:.1%})" + (f"; then {others}" if others else ""))
    return 1 if any(r.error for r in results) else 0


# -- training data -------------------------------------------------------------------------------------------


@dataclass
class QARow:
    image: Path
    question: str
    answer: str
    where: str
    category: str | None = None


def _parse(raw: bytes | None, where: str, base: Path, image_keys: tuple[str, ...]) -> QARow | BadRow:
    """One line: a QARow, or the BadRow saying why not."""
    if raw is None:
        return BadRow(where, "bad row", "a line too long to be a row")
    try:
        obj = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return BadRow(where, "bad row", f"not a UTF-8 JSON line ({type(exc).__name__})")
    if not isinstance(obj, dict):
        return BadRow(where, "bad row", f"a JSON {type(obj).__name__}, not an object")
    key = next((k for k in image_keys if isinstance(obj.get(k), str) and obj[k]), None)
    answer = obj.get("answer", obj.get("label"))
    answer = str(answer).lower() if isinstance(answer, bool) else str(answer) if isinstance(answer, int) else answer
    if key is None:
        return BadRow(where, "bad row", f"no image path (expected a string under {' or '.join(image_keys)})")
    if not isinstance(obj.get("question"), str) or not obj["question"].strip():
        return BadRow(where, "empty text", f"{short(obj[key])}: no question")
    if not isinstance(answer, str) or not answer.strip():
        return BadRow(where, "bad row", f"{short(obj[key])}: no answer (a string under \"answer\")")
    category = obj.get("category")
    return QARow(base / obj[key], " ".join(obj["question"].split()), answer.strip(), where,
                 category if isinstance(category, str) else None)


def read_qa_rows(path: str | Path, *, check_images: bool = True) -> tuple[list[QARow], DataReport]:
    """The usable rows of a JSONL / metadata.jsonl file of questions and answers, and the report of the others."""
    from splice.data import _check_images, _lines

    path = Path(path)
    report = DataReport(str(path))
    keys = ("file_name", "image") if path.name == METADATA else ("image", "file_name")
    rows: list = []
    with open(path, "rb") as fh:
        for n, raw in _lines(fh):
            if raw is not None and not raw.strip():
                continue
            report.total += 1
            row = _parse(raw, f"{path.name}:{n}", path.parent, keys)
            (report.add if isinstance(row, BadRow) else rows.append)(row)
    if check_images:
        rows = _check_images(rows, report)
    report.used = len(rows)
    return rows, report


def answer_vocabulary(rows: Iterable[QARow], n: int) -> list[str]:
    """The ``n`` most frequent answers (ties in alphabetical order)."""
    counts = Counter(row.answer for row in rows)
    return sorted(counts, key=lambda a: (-counts[a], a))[:n]


def _known(rows: list[QARow], index: dict[str, int], report: DataReport) -> list[QARow]:
    """The rows whose answer is in the vocabulary; the others counted in ``report``."""
    kept = [row for row in rows if row.answer in index]
    for row in rows:
        if row.answer not in index:
            report.add(BadRow(row.where, UNKNOWN, f"{short(row.answer)} is not one of the head's answers"))
    report.used -= len(rows) - len(kept)
    return kept


class QADataset(RowDataset):
    """Rows of (image, question, answer); items are ``{"pixel_values" (C, H, W), "input_ids" list[int], "label",
    "question", "answer", "category"}``."""

    def __init__(self, rows: list[QARow], *, tokenizer, processor, index: dict[str, int], max_len: int,
                 report: DataReport):
        self.rows, self.processor, self.report = rows, processor, report
        self.ids = []
        for row in rows:
            ids, cut = encode_caption(tokenizer, row.question, None, max_len, special_tokens=True)
            report.truncated += cut
            self.ids.append(ids)
        self.labels = [index[row.answer] for row in rows]

    def item(self, i: int, row: QARow, pixels: torch.Tensor) -> dict:
        return {"pixel_values": pixels, "input_ids": self.ids[i], "label": self.labels[i], "question": row.question,
                "answer": row.answer, "category": row.category}


def collate_qa(items: Iterable[dict], pad: int) -> dict:
    """Stack images, pad questions with ``pad`` (mask 0); items that failed to load are counted in ``errors``."""
    items = list(items)
    good = [it for it in items if "error" not in it]
    errors = [it["error"] for it in items if "error" in it]
    if not good:
        return {"pixel_values": None, "labels": None, "captions": [], "categories": None, "errors": errors}
    T = max(len(it["input_ids"]) for it in good)
    ids = torch.full((len(good), T), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(good), T), dtype=torch.long)  # (B, T)
    for i, it in enumerate(good):
        ids[i, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        mask[i, : len(it["input_ids"])] = 1
    categories = [it["category"] for it in good]
    return {"pixel_values": torch.stack([it["pixel_values"] for it in good]), "input_ids": ids,
            "attention_mask": mask, "labels": torch.tensor([it["label"] for it in good]),  # (B,)
            "captions": [it["question"] for it in good], "answers": [it["answer"] for it in good],
            "categories": categories if any(c is not None for c in categories) else None, "errors": errors}


class QAData(FileData):
    """A ``QADataset`` read as a seeded stream of epochs (``splice.data.FileData``'s order)."""

    def __init__(self, dataset: QADataset, *, pad: int, seed: int = 0, name: str = ""):
        super().__init__(dataset, seed=seed, name=name, collate_fn=functools.partial(collate_qa, pad=pad))
        self.pad = pad


def load_qa_data(path: str | Path, model, *, seed: int = 0, eval_path: str | Path | None = None,
                 eval_fraction: float = 0.05) -> tuple[QAData, QAData | None, list[DataReport]]:
    """Training (and evaluation) data for a single-stream model with a vqa / visual-reasoning head, from a JSONL
    file or an image folder of questions and answers; the head's answer vocabulary is taken from the training rows
    when it has none."""
    from splice.core.processing import processor_for

    _vqa_model(model, needs_vision=True)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError("the model has no tokenizer to encode the questions with\n"
                         "    fix: train from a saved model folder that has tokenizer.json, or pass --tokenizer")
    check_tokenizer(tokenizer, model, "the model's tokenizer")
    train_src, eval_src = find_sources(path)
    if eval_path is not None:
        eval_src = find_sources(eval_path)[0]
    rows, report = read_qa_rows(train_src)
    if not model.answer_labels:
        model.set_answer_labels(answer_vocabulary(rows, model.classifier.out_features))
    index = {a: i for i, a in enumerate(model.answer_labels)}
    rows = _known(rows, index, report)
    reports = [report]
    eval_report = None
    if eval_src is not None:
        eval_rows, eval_report = read_qa_rows(eval_src)
        eval_rows = _known(eval_rows, index, eval_report)
        reports.append(eval_report)
    else:
        rows, eval_rows = split(rows, eval_fraction, seed) if len(rows) >= 20 else (rows, [])
    kw = dict(tokenizer=tokenizer, processor=processor_for(model), index=index, max_len=model.text.max_positions)
    pad = getattr(model.text, "pad_token_id", 0)
    train = QAData(QADataset(rows, report=report, **kw), pad=pad, seed=seed, name=str(train_src))
    evaluation = None
    if eval_rows:
        held = QADataset(eval_rows, report=eval_report or DataReport("held out", len(eval_rows), len(eval_rows)), **kw)
        evaluation = QAData(held, pad=pad, seed=seed, name=str(eval_src or f"{train_src} (held out {len(eval_rows)})"))
    return train, evaluation, reports

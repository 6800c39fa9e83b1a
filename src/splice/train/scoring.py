"""Evaluation on a source's evaluation batches: the kind's own (``ComposedModel.evaluate_training``), else for a
captioner the loss and greedy exact-match accuracy, per category when the batches carry categories (the shapes
set does), else the loss alone."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splice.core.models import EncoderDecoderModel
from splice.train.optim import autocast_for, token_loss_sum, trained


def _decode(model: nn.Module, row: list[int]) -> str:
    eos = model.tokens.get("eos")
    row = row[1:]  # the start token
    if eos is not None and eos in row:
        row = row[: row.index(eos)]
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return " ".join(map(str, row))
    return " ".join(tok.decode(row, skip_special_tokens=True).split())


def evaluate(model: nn.Module, source: Any, *, n: int | None = 500, batch_size: int = 100,
             precision: str = "fp32", examples: int = 16) -> dict:
    """The held-out figures of ``model`` on ``source.eval_batches``: the kind's own when its model defines
    ``evaluate_training``; else greedy exact match for a captioner (an encoder-decoder); else the mean loss."""
    own = trained(model).evaluate_training(source, n=n, batch_size=batch_size, precision=precision)
    if own is not None:
        return own
    if isinstance(trained(model), EncoderDecoderModel):
        return evaluate_captions(model, source, n=n, batch_size=batch_size, precision=precision, examples=examples)
    return evaluate_loss(model, source, n=n, batch_size=batch_size, precision=precision)


@torch.no_grad()
def evaluate_loss(model: nn.Module, source: Any, *, n: int | None, batch_size: int, precision: str) -> dict:
    """The mean loss over ``source.eval_batches`` (as the trainer weighs it)."""
    core, device = trained(model), next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, weight, rows = 0.0, 0, 0
    try:
        for batch in source.eval_batches(n, batch_size):
            if batch["pixel_values"] is None:
                continue
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with autocast_for(precision, device):
                loss_sum += float(core.training_loss_sum(model, batch))
            weight += core.training_weight(batch)
            rows += batch["pixel_values"].shape[0]
    finally:
        model.train(was_training)
    return {"loss": loss_sum / max(weight, 1), "n": rows}


@torch.no_grad()
def evaluate_captions(model: nn.Module, source: Any, *, n: int | None = 500, batch_size: int = 100,
                      precision: str = "fp32", examples: int = 16) -> dict:
    """Loss and greedy exact-match accuracy on ``source.eval_batches`` (per category when it has them)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, tokens, right, total = 0.0, 0, 0, 0
    cats: dict[str, list[int]] = {}
    shown: list[dict] = []
    try:
        for batch in source.eval_batches(n, batch_size):
            if batch["pixel_values"] is None:
                continue
            px, labels = batch["pixel_values"].to(device), batch["labels"].to(device)
            with autocast_for(precision, device):
                loss_sum += float(token_loss_sum(model, px, labels))
                ids = model.generate(px, max_new_tokens=labels.shape[1])
            tokens += int((labels != -100).sum())
            for i, row in enumerate(ids.tolist()):
                pred, ref = _decode(model, row), " ".join(batch["captions"][i].split())
                ok = pred == ref
                right += ok
                total += 1
                cat = batch["categories"][i] if batch.get("categories") else None
                if cat is not None:
                    c = cats.setdefault(cat, [0, 0])
                    c[0] += ok
                    c[1] += 1
                if len(shown) < examples:
                    shown.append({"reference": ref, "prediction": pred, "category": cat, "correct": ok})
    finally:
        model.train(was_training)
    return {
        "loss": loss_sum / max(tokens, 1),
        "exact_match": right / max(total, 1),
        "n": total,
        "by_category": {k: {"exact_match": v[0] / v[1], "n": v[1]} for k, v in sorted(cats.items())},
        "examples": shown,
    }


def format_eval(result: dict) -> str:
    """``eval: loss L, <each other figure as a percentage> on N — <per category>``."""
    figures = [f"{k.replace('_', ' ')} {v:.1%}" for k, v in result.items() if k not in ("loss", "n")
               and isinstance(v, float)]
    head = ", ".join([f"loss {result['loss']:.4f}", *figures])
    parts = [f"eval: {head} on {result['n']}"]
    for cat, r in result.get("by_category", {}).items():
        figure = next(v for k, v in r.items() if k != "n")  # the category's first figure
        parts.append(f"{cat} {figure:.1%} ({r['n']})")
    return parts[0] + (" — " + ", ".join(parts[1:]) if len(parts) > 1 else "")

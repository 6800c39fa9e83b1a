"""Images to captions with a saved model: what ``splice caption`` runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from splice.core.errors import InputError, short


@dataclass
class Caption:
    image: str
    text: str | None = None
    ids: list[int] | None = None
    error: str | None = None


def decode(model, ids: list[int]) -> str | None:
    """Token ids -> text with special tokens skipped (None when the model has no tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    skip = {v for v in model.tokens.values() if v is not None}
    return tok.decode([i for i in ids if i not in skip], skip_special_tokens=True).strip()


def caption(model, images: Sequence[Any], *, batch_size: int = 8, **generate_kwargs) -> list[Caption]:
    """One caption per image (paths, PIL images or uint8 tensors), batched. An image that cannot be read (not a
    regular file, not an image, truncated, over ``processing.MAX_IMAGE_PIXELS``) gets its ``error`` set and the
    others are still captioned."""
    from splice.core.processing import processor_for

    if isinstance(images, (str, Path)):
        images = [images]
    if type(batch_size) is not int or batch_size < 1:
        raise InputError(f"batch_size: given {short(batch_size)}; expected an integer >= 1\n    fix: use 8")
    processor = processor_for(model)
    results: list[Caption] = []
    ready: list[tuple[Caption, torch.Tensor]] = []
    for image in images:
        item = Caption(image=str(image) if isinstance(image, (str, Path)) else f"<{type(image).__name__}>")
        results.append(item)
        try:
            ready.append((item, processor.one(image)))
        except InputError as exc:
            item.error = str(exc)
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        pixel_values = torch.stack([px for _, px in chunk]).to(next(model.parameters()).dtype)
        ids = model.generate(pixel_values, **generate_kwargs)
        for (item, _), row in zip(chunk, ids.tolist()):
            item.ids = row
            item.text = decode(model, row)
    return results


def run_cli(model_path: str, images: list[str], *, num_beams: int | None, max_new_tokens: int | None, as_json: bool) -> int:
    import json

    import splice

    kwargs = {k: v for k, v in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens)) if v is not None}
    for flag, value in kwargs.items():
        if value < 1:
            raise InputError(f"--{flag.replace('_', '-')}: given {value}; expected an integer >= 1\n"
                             f"    fix: leave it out (the model's generation settings) or give e.g. 4")
    model = splice.load(model_path)
    results = caption(model, images, **kwargs)
    if as_json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        if model.tokenizer is None:
            print("(this model has no tokenizer: showing token ids)")
        for r in results:
            shown = r.text if r.text is not None else r.ids
            print(_printable(f"{r.image}: {shown}" if r.error is None else f"{r.image}: error: {r.error}"))
    return 1 if any(r.error for r in results) else 0


def _printable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (surrogate escapes) shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

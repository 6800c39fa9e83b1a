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


def prompt_ids(model, prompt: str) -> list[int]:
    """The decoder's first tokens for a text ``prompt``: ``decoder_start`` (unless the prompt's own first token is
    already a start token, as Donut's task prompts are), then the prompt's tokens without special tokens added."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InputError("prompt: this model has no tokenizer, so a text prompt cannot be turned into token ids\n"
                         "    fix: save the model with its tokenizer (model.tokenizer), or leave the prompt out")
    if not isinstance(prompt, str) or not prompt:
        raise InputError(f"prompt: given {short(prompt)}; expected non-empty text\n    fix: e.g. --prompt '<s_cord-v2>'")
    ids = tok.encode(prompt, add_special_tokens=False).ids
    start = model.tokens.get("decoder_start")
    if not ids:
        raise InputError(f"prompt: {short(prompt)} gives no tokens with this model's tokenizer\n"
                         "    fix: check the prompt's spelling (a task prompt must be one of the tokenizer's tokens)")
    return ids if start is None or ids[0] == start else [start, *ids]


def caption(model, images: Sequence[Any], *, batch_size: int = 8, prompt: str | None = None,
            **generate_kwargs) -> list[Caption]:
    """One caption per image (paths, PIL images or uint8 tensors), batched. An image that cannot be read (not a
    regular file, not an image, truncated, over ``processing.MAX_IMAGE_PIXELS``) gets its ``error`` set and the
    others are still captioned. ``prompt``: text every caption starts from (a Donut task prompt, the start of a
    caption)."""
    from splice.core.processing import processor_for

    if isinstance(images, (str, Path)):
        images = [images]
    if type(batch_size) is not int or batch_size < 1:
        raise InputError(f"batch_size: given {short(batch_size)}; expected an integer >= 1\n    fix: use 8")
    if prompt is not None:
        generate_kwargs["decoder_input_ids"] = torch.tensor([prompt_ids(model, prompt)])
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
        kwargs = dict(generate_kwargs)
        if "decoder_input_ids" in kwargs:  # one prompt for every image of the batch
            kwargs["decoder_input_ids"] = kwargs["decoder_input_ids"].expand(len(chunk), -1)
        ids = model.generate(pixel_values, **kwargs)
        for (item, _), row in zip(chunk, ids.tolist()):
            item.ids = row
            item.text = decode(model, row)
    return results


def run_cli(model_path: str, images: list[str], *, num_beams: int | None, max_new_tokens: int | None, as_json: bool,
            prompt: str | None = None) -> int:
    import json

    import splice

    kwargs = {k: v for k, v in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens)) if v is not None}
    for flag, value in kwargs.items():
        if value < 1:
            raise InputError(f"--{flag.replace('_', '-')}: given {value}; expected an integer >= 1\n"
                             f"    fix: leave it out (the model's generation settings) or give e.g. 4")
    model = splice.load(model_path)
    results = caption(model, images, prompt=prompt, **kwargs)
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

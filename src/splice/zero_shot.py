"""Zero-shot classification and embeddings with a dual encoder: what ``splice classify`` and ``splice embed`` run.

``classify`` scores each image against one prompt per label (``template`` with the label in place of ``{}``):
a softmax over the labels for a CLIP-trained model, each label's own sigmoid for a SigLIP one. ``embed`` writes
the projected, unnormalised features (``get_image_features`` / ``get_text_features``) of images or texts to a
safetensors file, one row per input in the given order.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from splice.core.errors import InputError, short

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass
class Scores:
    image: str
    scores: dict[str, float] = field(default_factory=dict)  # label -> probability, best first
    label: str | None = None
    error: str | None = None


def _dual_encoder(model) -> None:
    if not all(callable(getattr(model, f"get_{side}_features", None)) for side in ("image", "text")):
        spec = getattr(model, "spec", None)
        kind = spec.get("kind", "encoder-decoder") if isinstance(spec, dict) else type(model).__name__
        raise InputError(f"model: a {kind} model cannot score images against texts\n    expected: a dual-encoder "
                         "model (kind: dual-encoder, or a transformers VisionTextDualEncoder folder)\n    fix: give a "
                         "dual encoder; `splice caption` describes images with a captioner")


def parse_labels(text: str | Sequence[str]) -> list[str]:
    """``"cat, dog,car"`` (or a list) -> ``["cat", "dog", "car"]``: non-empty and distinct."""
    labels = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    labels = [t for t in labels if t]
    if not labels:
        raise InputError(f"--labels: given {short(text)}; expected comma-separated class names\n"
                         "    fix: e.g. --labels \"cat,dog,car\"")
    repeated = sorted({t for t in labels if labels.count(t) > 1})
    if repeated:
        raise InputError(f"--labels: {', '.join(map(repr, repeated))} given more than once; expected distinct labels\n"
                         "    fix: name each class once")
    return labels


def tokenize(model, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each (N, T): the model's tokenizer with its special tokens, padded with the text
    encoder's pad id and cut to its positions."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InputError("texts: this model has no tokenizer, so text cannot be turned into token ids\n"
                         "    fix: save the model with its tokenizer (model.tokenizer = tokenizers.Tokenizer...)")
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise InputError(f"texts: given {short(list(texts))}; expected non-empty strings\n"
                         "    fix: give at least one text")
    limit = model.text.max_positions
    rows = [enc.ids[:limit] for enc in tok.encode_batch(list(texts))]
    T = max(1, max(len(r) for r in rows))
    pad = getattr(model.text, "pad_token_id", 0)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def text_features(model, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """(N, projection_dim): the projected, unnormalised features of ``texts``."""
    _dual_encoder(model)
    ids, mask = tokenize(model, texts)
    device = next(model.parameters()).device
    return torch.cat([model.get_text_features(ids[i: i + batch_size].to(device), mask[i: i + batch_size].to(device))
                      for i in range(0, len(ids), batch_size)]).float().cpu()


@torch.no_grad()
def image_features(model, images: Sequence[Any], *, batch_size: int = 16) -> tuple[torch.Tensor, list[str | None]]:
    """(features of the images that could be read (M, projection_dim), one error or None per image). An image
    that cannot be read gets its error; the others are still embedded."""
    from splice.core.processing import ImageProcessor, processor_for

    _dual_encoder(model)
    processor = processor_for(model) or ImageProcessor.from_preprocessing(model.vision.preprocessing)
    pixels, errors = [], []
    for image in images:
        try:
            pixels.append(processor.one(image))
            errors.append(None)
        except InputError as exc:
            errors.append(str(exc))
    first = next(model.parameters())
    out = [model.get_image_features(torch.stack(pixels[i: i + batch_size]).to(first.device, first.dtype))
           for i in range(0, len(pixels), batch_size)]
    width = model.visual_projection.out_features
    return (torch.cat(out).float().cpu() if out else torch.empty(0, width)), errors


def classify(model, images: Sequence[Any], labels: str | Sequence[str], *,
             template: str = DEFAULT_TEMPLATE) -> list[Scores]:
    """Each image's probability for each label (best first)."""
    labels = parse_labels(labels)
    if not isinstance(template, str) or template.count("{}") != 1:
        raise InputError(f"--template: given {short(template)}; expected text with one {{}} where the label goes\n"
                         f"    fix: e.g. --template \"{DEFAULT_TEMPLATE}\"")
    if isinstance(images, (str, Path)):
        images = [images]
    text = F.normalize(text_features(model, [template.replace("{}", label) for label in labels]), dim=-1)
    feats, errors = image_features(model, images)
    logits = F.normalize(feats, dim=-1) @ text.t() * model.logit_scale.detach().exp().float().cpu()  # (M, L)
    bias = getattr(model, "logit_bias", None)
    probs = (logits + bias.detach().float().cpu()).sigmoid() if bias is not None else logits.softmax(dim=-1)
    rows = iter(probs.tolist())
    results = []
    for image, error in zip(images, errors):
        item = Scores(image=str(image) if isinstance(image, (str, Path)) else f"<{type(image).__name__}>", error=error)
        if error is None:
            ranked = sorted(zip(labels, next(rows)), key=lambda pair: -pair[1])
            item.scores, item.label = dict(ranked), ranked[0][0]
        results.append(item)
    return results


def embed(model, *, images: Sequence[Any] | None = None, texts: Sequence[str] | None = None,
          out: str | os.PathLike) -> dict[str, Any]:
    """Write ``image_embeds`` or ``text_embeds`` (N, projection_dim) to the safetensors file ``out`` (atomically);
    the inputs are listed in its metadata. An image that cannot be read is an error naming it."""
    from safetensors.torch import save_file

    if (images is None) == (texts is None):
        raise InputError("embed: give images or texts, not both and not neither\n    fix: --images A.png B.png, or "
                         "--texts \"a cat\" \"a dog\"")
    if images is not None:
        feats, errors = image_features(model, images)
        bad = [f"{image}: {error}" for image, error in zip(images, errors) if error is not None]
        if bad:
            raise InputError("images: cannot read " + "; ".join(bad) + "\n    fix: remove or replace those images")
        name, inputs = "image_embeds", [str(i) for i in images]
    else:
        feats, name, inputs = text_features(model, list(texts)), "text_embeds", list(texts)
    target = Path(out)
    if target.is_dir():
        raise InputError(f"--out: {short(str(target))} is a folder; expected a file name\n"
                         "    fix: e.g. --out embeddings.safetensors")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".embed-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({name: feats.contiguous()}, tmp, metadata={"inputs": json.dumps(inputs)})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"file": str(target), "tensor": name, "shape": list(feats.shape)}


def run_classify(model_path: str, images: list[str], *, labels: str, template: str, as_json: bool) -> int:
    import splice

    from splice.caption import _printable

    model = splice.load(model_path)
    results = classify(model, images, labels, template=template)
    if as_json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        for r in results:
            shown = " | ".join(f"{label} {p:.3f}" for label, p in r.scores.items())
            print(_printable(f"{r.image}: {shown}" if r.error is None else f"{r.image}: error: {r.error}"))
    return 1 if any(r.error for r in results) else 0


def run_embed(model_path: str, *, images: list[str] | None, texts: list[str] | None, out: str) -> int:
    import splice

    written = embed(splice.load(model_path), images=images, texts=texts, out=out)
    print(f"wrote {written['tensor']} {tuple(written['shape'])} to {written['file']}")
    return 0

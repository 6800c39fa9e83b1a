"""The synthetic captioning set behind ``splice demo`` and ``splice train --data shapes``.

Images are drawn with PIL: one or two shapes (circle, square, triangle) in six colours on a dark background.
Every image has exactly one correct caption, so exact match is a fair score:

* one shape: ``a red circle``
* two identical shapes (colour and kind): ``two red circles``
* two shapes of different colours: ``a red circle left of a blue square``. The shape named first is the one
  whose colour comes first in ``COLOURS`` (red, green, blue, yellow, purple, white); the relation (left of,
  right of, above, below) is where it lies relative to the other, which is drawn clearly apart along one axis.

Two shapes of one colour but different kinds are never drawn: telling them from a pair (``two ...``) at the
first word is what a 5-minute model got wrong most (docs/training.md).

Samples are a pure function of ``(seed, stream, index)``: training draws fresh images for every batch (the
stream position is the step), the held-out set is fixed by its seed, and any process can draw any slice of a
batch — which is what makes resume and multi-process runs exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
KINDS = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single", "count", "relation")
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")  # ids 0, 1, 2, 3: the demo spec's tokens
PAD, BOS, EOS, UNK = range(4)

TRAIN_STREAM, HELDOUT_STREAM = 0, 1


def words() -> list[str]:
    """The vocabulary after the special tokens, in id order."""
    out = ["a", "two", *COLOURS, *KINDS, *(k + "s" for k in KINDS)]
    for rel in RELATIONS:
        out += [w for w in rel.split() if w not in out]
    return out


def build_tokenizer(*, wrap: bool = False):
    """A word-level ``tokenizers.Tokenizer``: [PAD]=0 [BOS]=1 [EOS]=2 [UNK]=3, then ``words()``. ``wrap``: its
    special tokens wrap every text as ``[BOS] ... [EOS]`` (a text encoder's ``[CLS] ... [SEP]``)."""
    from tokenizers import Tokenizer, decoders, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words()])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    if wrap:
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A [EOS]", special_tokens=[("[BOS]", BOS), ("[EOS]", EOS)])
    return tok


def vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(words())


def all_captions() -> list[str]:
    """Every caption the set can draw (576): the label set of zero-shot classification over the shapes."""
    out = [f"a {c} {k}" for c in COLOURS for k in KINDS] + [f"two {c} {k}s" for c in COLOURS for k in KINDS]
    colours = list(COLOURS)
    for i, c1 in enumerate(colours):
        out += [f"a {c1} {k1} {rel} a {c2} {k2}" for c2 in colours[i + 1:] for k1 in KINDS for k2 in KINDS
                for rel in RELATIONS]
    return out


@dataclass
class Shape:
    colour: str
    kind: str
    x: float  # centre
    y: float
    r: float  # half extent

    @property
    def order(self) -> tuple[int, int]:
        return list(COLOURS).index(self.colour), KINDS.index(self.kind)


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    category: str
    shapes: list[Shape]


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 64
    min_radius: float | None = None  # None: image_size * 0.15 (9.6 px at 64)
    max_radius: float | None = None  # None: image_size * 0.2 (12.8 px at 64)
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # single, count, relation
    gap: float | None = None  # between the two shapes along the relation axis; None: image_size / 20
    square: float = 0.9  # a square's half side, as a fraction of the radius

    def radii(self) -> tuple[float, float]:
        lo = self.image_size * 0.15 if self.min_radius is None else self.min_radius
        return lo, self.image_size * 0.2 if self.max_radius is None else self.max_radius

    @property
    def spacing(self) -> float:
        return self.image_size / 20 if self.gap is None else self.gap


def _place_one(rng: np.random.Generator, cfg: ShapesConfig, r: float) -> tuple[float, float]:
    lo, hi = r + 1, cfg.image_size - 1 - r
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _place_apart(rng: np.random.Generator, cfg: ShapesConfig, r1: float, r2: float, axis: int | None):
    """Two centres whose shapes do not touch. With ``axis`` (0: x, 1: y), they are apart along it and the
    offset across it is at most half the offset along it, so the relation is unambiguous."""
    for _ in range(1000):
        a, b = _place_one(rng, cfg, r1), _place_one(rng, cfg, r2)
        d = (b[0] - a[0], b[1] - a[1])
        if axis is None:
            if max(abs(d[0]), abs(d[1])) >= r1 + r2 + cfg.spacing:
                return a, b
        elif abs(d[axis]) >= r1 + r2 + cfg.spacing and abs(d[1 - axis]) <= abs(d[axis]) / 2:
            return a, b
    raise RuntimeError("cannot place two shapes; the image is too small for the radii")  # pragma: no cover


def describe(shapes: Sequence[Shape]) -> tuple[str, str]:
    """The one correct caption of these shapes, and its category."""
    if len(shapes) == 1:
        s = shapes[0]
        return f"a {s.colour} {s.kind}", "single"
    a, b = shapes
    if (a.colour, a.kind) == (b.colour, b.kind):
        return f"two {a.colour} {a.kind}s", "count"
    s, o = sorted(shapes, key=lambda t: t.order)
    dx, dy = s.x - o.x, s.y - o.y
    if abs(dx) >= abs(dy):
        rel = "left of" if dx < 0 else "right of"
    else:
        rel = "above" if dy < 0 else "below"
    return f"a {s.colour} {s.kind} {rel} a {o.colour} {o.kind}", "relation"


def sample(seed: int, stream: int, index: int, cfg: ShapesConfig = ShapesConfig()) -> Sample:
    """Sample ``index`` of ``stream`` (0: training, 1: held out) under ``seed``."""
    rng = np.random.default_rng([seed, stream, index])
    category = CATEGORIES[int(rng.choice(3, p=np.asarray(cfg.weights) / sum(cfg.weights)))]
    lo, hi = cfg.radii()
    colours, radius = list(COLOURS), lambda: float(rng.uniform(lo, hi))
    pick = lambda: (colours[int(rng.integers(len(colours)))], KINDS[int(rng.integers(len(KINDS)))])  # noqa: E731
    if category == "single":
        (c, k), r = pick(), radius()
        shapes = [Shape(c, k, *_place_one(rng, cfg, r), r)]
    else:
        first = pick()
        second = first
        if category == "relation":
            while second[0] == first[0]:  # two colours: "two" is said exactly when the colours match
                second = pick()
        r1, r2 = radius(), radius()
        axis = int(rng.integers(2)) if category == "relation" else None
        p1, p2 = _place_apart(rng, cfg, r1, r2, axis)
        shapes = [Shape(*first, *p1, r1), Shape(*second, *p2, r2)]
    caption, cat = describe(shapes)
    assert cat == category
    return Sample(draw(shapes, rng, cfg.image_size, cfg.square), caption, category, shapes)


def draw(shapes: Sequence[Shape], rng: np.random.Generator, size: int, square: float = 0.9) -> np.ndarray:
    from PIL import Image, ImageDraw

    bg = int(rng.integers(0, 40))
    im = Image.new("RGB", (size, size), (bg, bg, bg))
    d = ImageDraw.Draw(im)
    for s in shapes:
        jitter = rng.integers(-15, 16, size=3).tolist()
        colour = tuple(min(255, max(0, v + j)) for v, j in zip(COLOURS[s.colour], jitter))
        x, y, r = s.x, s.y, s.r
        if s.kind == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        elif s.kind == "square":
            h = r * square
            d.rectangle([x - h, y - h, x + h, y + h], fill=colour)
        else:
            d.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=colour)
    return np.asarray(im)


class ShapesData:
    """The shapes set as a training source for a model: ``get(positions)`` draws the training samples at those
    stream positions (a fresh image for every position), ``eval_batches`` the fixed held-out set. Captions are
    tokenized with the given tokenizer (the model's own, or the word-level one of this module)."""

    is_stream = True

    def __init__(self, *, tokenizer=None, image_size: int = 64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 seed: int = 0, config: ShapesConfig | None = None, eos: int | None = EOS,
                 special_tokens: bool = False):
        config = config or ShapesConfig()
        if config.image_size != image_size:
            config = ShapesConfig(**{**config.__dict__, "image_size": image_size})
        self.config = config
        self.seed = seed
        self.eos = eos
        self.special_tokens = special_tokens  # the tokenizer's own (a text encoder's [CLS] ... [SEP])
        self.tokenizer = tokenizer or build_tokenizer(wrap=special_tokens)
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self._scale, self._shift = 1 / std, -mean / std
        self._ids: dict[str, list[int]] = {}

    @classmethod
    def for_model(cls, model, *, seed: int = 0, config: ShapesConfig | None = None) -> "ShapesData":
        """Drawn at the vision encoder's image size, normalised with its mean/std, tokenized with the model's
        tokenizer as its ``caption_encoding`` says."""
        pre = model.vision_tower().preprocessing
        h, w = pre.image_size
        if h != w or pre.in_chans != 3:
            from splice.core.errors import InputError

            raise InputError(f"the shapes set draws square RGB images; the encoder takes {pre.in_chans}x{h}x{w}\n"
                             "    fix: build the encoder with a square img_size and 3 channels")
        enc = model.caption_encoding()
        return cls(tokenizer=getattr(model, "tokenizer", None), image_size=h, mean=pre.mean, std=pre.std, seed=seed,
                   config=config, eos=enc.eos, special_tokens=enc.special_tokens)

    def describe(self) -> str:
        c = self.config
        return f"shapes: synthetic {c.image_size}x{c.image_size} captions, fresh images every batch, seed {self.seed}"

    def caption_ids(self, caption: str) -> list[int]:
        ids = self._ids.get(caption)
        if ids is None:
            ids = self.tokenizer.encode(caption, add_special_tokens=self.special_tokens).ids
            ids = self._ids[caption] = ids + ([self.eos] if self.eos is not None else [])
        return ids

    def pixels(self, images: Sequence[np.ndarray]) -> Tensor:
        x = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))  # (B, 3, H, W) uint8
        return torch.from_numpy(x).float().mul_(self._scale).add_(self._shift)  # (x - mean) / std

    def make_batch(self, samples: Sequence[Sample]) -> dict:
        from splice.data import pad_labels

        return {
            "pixel_values": self.pixels([s.image for s in samples]),  # (B, 3, H, W)
            "labels": pad_labels([self.caption_ids(s.caption) for s in samples]),  # (B, T)
            "captions": [s.caption for s in samples],
            "categories": [s.category for s in samples],
            "errors": [],
        }

    def items(self, stream: int, indices: Iterable[int]) -> dict:
        """The batch of samples ``indices`` of ``stream`` (a subclass asks other questions of the same images)."""
        return self.make_batch([sample(self.seed, stream, k, self.config) for k in indices])

    def get(self, positions: Sequence[int]) -> dict:
        return self.items(TRAIN_STREAM, positions)

    def caption_set(self) -> list[str]:
        """Every caption the set can draw (what zero-shot classification chooses among)."""
        return all_captions()

    def heldout(self, n: int = 500) -> list[Sample]:
        return [sample(self.seed, HELDOUT_STREAM, i, self.config) for i in range(n)]

    def eval_batches(self, n: int | None = 500, batch_size: int = 100) -> Iterable[dict]:
        n = 500 if n is None else n
        for start in range(0, n, batch_size):
            yield self.items(HELDOUT_STREAM, range(start, min(start + batch_size, n)))


def write_imagefolder(path: str | Path, n: int, *, image_size: int = 64, seed: int = 0, stream: int = TRAIN_STREAM) -> Path:
    """Write ``n`` samples as an ``imagefolder`` folder (PNGs + metadata.jsonl), e.g. to try ``splice train``
    on files."""
    import json

    from PIL import Image

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    cfg = ShapesConfig(image_size=image_size)
    with open(root / "metadata.jsonl", "w") as fh:
        for i in range(n):
            s = sample(seed, stream, i, cfg)
            name = f"{i:06d}.png"
            Image.fromarray(s.image).save(root / name)
            fh.write(json.dumps({"file_name": name, "text": s.caption}) + "\n")
    return root

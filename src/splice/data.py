"""Captioning data for training: image folders and JSONL files, tokenized with the model's own tokenizer.

Two layouts are read:

* an ``imagefolder`` folder: images plus ``metadata.jsonl`` whose rows name a ``file_name`` and its ``text``
  (with ``train/`` and ``validation/`` (or ``val/``, ``test/``) subfolders, each with its own metadata, the
  second becomes the evaluation set);
* a JSONL file of ``{"image": path, "text": caption}`` rows, paths relative to the file.

Rows that cannot be used (a missing file, an image that does not decode, an empty caption, a line that is not a
JSON object with the two keys) are counted by reason, with examples, in a ``DataReport``: never fatal, never
dropped silently. Captions longer than the decoder's positions are truncated and counted too.

A dataset is read as a stream: position ``k`` of the stream is row ``perm_e[k % n]`` of epoch ``e = k // n``, a
permutation fixed by the seed. A step's batch is a range of stream positions, so the data position of a run is
one number (samples seen), which resume and multi-process sharding rely on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from splice.core.errors import InputError, clip, short

REASONS = ("missing file", "unreadable image", "empty text", "bad row")
METADATA = "metadata.jsonl"
EVAL_SPLITS = ("validation", "val", "valid", "test", "eval")
MAX_EXAMPLES = 5  # examples kept per reason
MAX_LINE = 1 << 20  # bytes: a longer line of a metadata / JSONL file is a bad row


@dataclass
class BadRow:
    where: str  # "metadata.jsonl:12"
    reason: str  # one of REASONS
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {clip(self.detail, 300)}"


@dataclass
class DataReport:
    """What was read from a source: rows used, and every row that was not, by reason."""

    source: str
    total: int = 0
    used: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # reason -> rows
    examples: dict[str, list[BadRow]] = field(default_factory=dict)  # reason -> the first few
    truncated: int = 0  # captions cut to the decoder's positions (still used)

    def add(self, bad: BadRow) -> None:
        self.counts[bad.reason] = self.counts.get(bad.reason, 0) + 1
        kept = self.examples.setdefault(bad.reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(bad)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self, examples: int = MAX_EXAMPLES) -> str:
        lines = [f"{short(self.source, 200)}: {self.total:,} rows, {self.used:,} used, {self.skipped:,} skipped"]
        for reason in sorted(self.counts, key=lambda r: -self.counts[r]):
            lines.append(f"  {reason}: {self.counts[reason]:,}")
            lines += [f"    e.g. {ex}" for ex in self.examples.get(reason, [])[:examples]]
        if self.truncated:
            lines.append(f"  truncated to the decoder's length (used): {self.truncated:,}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "source": self.source, "total": self.total, "used": self.used, "skipped": self.skipped,
            "by_reason": dict(self.counts), "truncated": self.truncated,
            "examples": {r: [str(b) for b in ex] for r, ex in self.examples.items()},
        }


# -- rows ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    image: Path
    text: str
    where: str


def _read_jsonl(path: Path, image_keys: tuple[str, ...], report: DataReport) -> list[Row]:
    rows: list[Row] = []
    with open(path, "rb") as fh:
        for n, raw in _lines(fh):
            if raw is not None and not raw.strip():
                continue
            report.total += 1
            row = _parse_row(raw, f"{path.name}:{n}", image_keys, path.parent)
            if isinstance(row, BadRow):
                report.add(row)
            else:
                rows.append(row)
    return rows


def _lines(fh) -> Iterator[tuple[int, bytes | None]]:
    """(line number, the line's bytes) for each line; None for a line longer than ``MAX_LINE`` (skipped)."""
    n = 0
    while line := fh.readline(MAX_LINE + 1):
        n += 1
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while (rest := fh.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            yield n, None
        else:
            yield n, line


def _parse_row(raw: bytes | None, where: str, image_keys: tuple[str, ...], base: Path) -> Row | BadRow:
    """One line of a metadata / JSONL file: a Row, or the BadRow saying why not."""
    if raw is None:
        return BadRow(where, "bad row", f"a line of more than {MAX_LINE:,} bytes")
    try:
        obj = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as exc:
        return BadRow(where, "bad row", f"not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})")
    except (ValueError, RecursionError) as exc:  # not JSON, a 5,000-digit number, nesting past the stack
        return BadRow(where, "bad row", f"not JSON ({getattr(exc, 'msg', type(exc).__name__)})")
    if not isinstance(obj, dict):
        return BadRow(where, "bad row", f"a JSON {type(obj).__name__}, not an object")
    key = next((k for k in image_keys if k in obj), None)
    if key is None or not isinstance(obj[key], str) or not obj[key]:
        return BadRow(where, "bad row", f"no image path (expected a string under {' or '.join(image_keys)})")
    text = obj.get("text", obj.get("caption"))
    if text is not None and not isinstance(text, str):
        return BadRow(where, "bad row", f"text is a {type(text).__name__}, not a string")
    if text is None or not text.strip():
        return BadRow(where, "empty text", f"{short(obj[key])}: no caption")
    return Row(base / obj[key], " ".join(text.split()), where)


def _check_images(rows: list[Row], report: DataReport) -> list[Row]:
    """The rows whose image decodes (read as training will read it: a regular file, within the pixel bound)."""
    from splice.core.processing import load_image

    good = []
    for row in rows:
        try:
            if not row.image.exists():
                report.add(BadRow(row.where, "missing file", f"{short(str(row.image))}: no such file"))
                continue
            load_image(row.image)  # decodes: a truncated file fails here, not mid-training
        except (InputError, OSError) as exc:
            detail = str(exc).split("\n")[0] if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc.strerror}"
            report.add(BadRow(row.where, "unreadable image", detail))
            continue
        good.append(row)
    return good


def read_rows(path: str | Path, *, check_images: bool = True) -> tuple[list[Row], DataReport]:
    """The usable rows of a metadata.jsonl / JSONL file, and the report of the others."""
    path = Path(path)
    report = DataReport(str(path))
    keys = ("file_name", "image") if path.name == METADATA else ("image", "file_name")
    rows = _read_jsonl(path, keys, report)
    if check_images:
        rows = _check_images(rows, report)
    report.used = len(rows)
    return rows, report


def find_sources(path: str | Path) -> tuple[Path, Path | None]:
    """(train metadata/JSONL, eval metadata or None) for a folder or a JSONL file."""
    p = Path(path)
    name = short(str(p))
    try:
        if p.is_file():
            return p, None
        if p.is_dir():
            if (p / METADATA).is_file():
                return p / METADATA, None
            if (p / "train" / METADATA).is_file():
                ev = next((p / s / METADATA for s in EVAL_SPLITS if (p / s / METADATA).is_file()), None)
                return p / "train" / METADATA, ev
            raise InputError(
                f"{name}: no {METADATA} (a regular file) here, nor in its train/ folder\n"
                f"    fix: add {METADATA} with one {{\"file_name\": ..., \"text\": ...}} object per line"
            )
        what = "exists but is neither a regular file nor a folder" if p.exists() else "no such folder or file"
    except OSError as exc:
        what = f"cannot be read ({type(exc).__name__}: {exc.strerror})"
    raise InputError(f"{name}: {what}\n    fix: give an imagefolder folder or a .jsonl file, or 'shapes'")


# -- the dataset -----------------------------------------------------------------------------------------


def encode_caption(tokenizer, text: str, eos: int | None, max_len: int, *,
                   special_tokens: bool = False) -> tuple[list[int], bool]:
    """Token ids of a caption followed by ``eos``, cut to ``max_len`` keeping the last token (``eos``, or the
    tokenizer's closing special token). ``special_tokens``: with the tokenizer's own (a text encoder's
    ``[CLS] ... [SEP]``); else without them (a decoder's target)."""
    ids = tokenizer.encode(text, add_special_tokens=special_tokens).ids
    if eos is not None:
        ids.append(eos)
    truncated = len(ids) > max_len
    if truncated:
        keep_last = eos is not None or special_tokens
        ids = ids[: max_len - 1] + (ids[-1:] if keep_last else ids[max_len - 1 : max_len])
    return ids, truncated


def pad_labels(rows: Sequence[Sequence[int]]) -> Tensor:
    """(B, T) labels, -100 after each row's end (ignored by the loss, replaced by pad when shifted)."""
    labels = torch.full((len(rows), max(map(len, rows), default=1)), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return labels


class RowDataset(torch.utils.data.Dataset):
    """Rows whose image is read when the item is asked for: ``item(i, row, pixels)`` makes the item; a row whose
    image no longer reads is ``{"error": ...}`` (``row_pixels``)."""

    rows: list
    processor: object

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        px = row_pixels(self.processor, self.rows[i])
        return px if isinstance(px, dict) else self.item(i, self.rows[i], px)

    def item(self, i: int, row, pixels: Tensor) -> dict:
        raise NotImplementedError


class CaptionDataset(RowDataset):
    """Rows of (image, caption); items are ``{"pixel_values" (C, H, W), "labels" list[int], "caption"}``."""

    def __init__(self, rows: list[Row], *, tokenizer, processor, eos: int | None, max_len: int,
                 report: DataReport | None = None, special_tokens: bool = False):
        self.rows = rows
        self.processor = processor
        self.report = report or DataReport("rows", total=len(rows), used=len(rows))
        self.labels: list[list[int]] = []
        for row in rows:
            ids, cut = encode_caption(tokenizer, row.text, eos, max_len, special_tokens=special_tokens)
            self.report.truncated += cut
            self.labels.append(ids)

    def item(self, i: int, row: Row, pixels: Tensor) -> dict:
        return {"pixel_values": pixels, "labels": self.labels[i], "caption": row.text}


def row_pixels(processor, row) -> Tensor | dict:
    """A row's image as (C, H, W) pixels, or ``{"error": ...}`` when it no longer reads (the file changed since it
    was checked): the collate leaves it out and counts it."""
    try:
        return processor.one(row.image)  # (C, H, W)
    except Exception as exc:
        return {"error": f"{row.where}: {type(exc).__name__}: {exc}"}


def collate(items: Iterable[dict]) -> dict:
    """Stack images, pad labels with -100; items that failed to load are left out and counted in ``errors``."""
    items = list(items)
    good = [it for it in items if "error" not in it]
    errors = [it["error"] for it in items if "error" in it]
    if not good:
        return {"pixel_values": None, "labels": None, "captions": [], "categories": None, "errors": errors}
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in good]),  # (B, C, H, W)
        "labels": pad_labels([it["labels"] for it in good]),  # (B, T)
        "captions": [it["caption"] for it in good],
        "categories": None,
        "errors": errors,
    }


class FileData:
    """A ``CaptionDataset`` read as a seeded stream of epochs (see the module docstring)."""

    is_stream = False

    def __init__(self, dataset: CaptionDataset, *, seed: int = 0, name: str = "", collate_fn=None):
        if len(dataset) == 0:
            raise InputError(
                f"{short(name or 'the dataset')}: no usable rows\n{dataset.report.summary(examples=2)}\n"
                "    fix: check the paths in the metadata (relative to its folder) and the captions"
            )
        self.dataset = dataset
        self.seed = seed
        self.name = name
        self.collate = collate_fn or collate  # items -> a batch
        self._perms: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self) -> str:
        return f"{self.name}: {len(self.dataset):,} rows"

    def index(self, position: int) -> int:
        n = len(self.dataset)
        epoch, k = divmod(position, n)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = self._perms[epoch] = torch.randperm(n, generator=g)
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
        return int(perm[k])

    def get(self, positions: Sequence[int]) -> dict:
        return self.collate(self.dataset[self.index(k)] for k in positions)

    def eval_batches(self, n: int | None = None, batch_size: int = 64) -> Iterable[dict]:
        """The rows in order (at most ``n``), as batches."""
        total = len(self.dataset) if n is None else min(n, len(self.dataset))
        for start in range(0, total, batch_size):
            yield self.collate(self.dataset[i] for i in range(start, min(start + batch_size, total)))


def split(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out ``fraction`` of the rows (at most 500), chosen by the seed."""
    n_eval = min(500, int(len(rows) * fraction))
    if n_eval == 0:
        return rows, []
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(rows), generator=g).tolist()
    held = set(perm[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def check_tokenizer(tokenizer, model, what: str) -> None:
    """An ``InputError`` when ``tokenizer`` can give ids the model's text side has no embedding for."""
    enc = model.caption_encoding()
    size = tokenizer.get_vocab_size()
    if enc.vocab_size is not None and size > enc.vocab_size:
        raise InputError(f"{what} has {size:,} token ids, the {enc.component}'s vocabulary {enc.vocab_size:,}\n"
                         f"    fix: use the tokenizer the {enc.component} was built for, or set "
                         f"{enc.component}.config.vocab_size: {size} in the spec")


def load_data(path: str | Path, model, *, seed: int = 0, eval_path: str | Path | None = None,
              eval_fraction: float = 0.05, check_images: bool = True) -> tuple[FileData, FileData | None, list[DataReport]]:
    """Training (and evaluation) data for ``model`` from a folder or JSONL file, with the reports of each."""
    from splice.core.processing import processor_for

    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError(
            "the model has no tokenizer to encode the captions with\n"
            "    fix: train from a saved model folder that has tokenizer.json, or pass --tokenizer tokenizer.json"
        )
    check_tokenizer(tokenizer, model, "the model's tokenizer")
    processor = processor_for(model)
    enc = model.caption_encoding()
    train_src, eval_src = find_sources(path)
    rows, report = read_rows(train_src, check_images=check_images)
    reports = [report]
    if eval_path is not None:
        eval_src = find_sources(eval_path)[0]
    if eval_src is not None:
        eval_rows, eval_report = read_rows(eval_src, check_images=check_images)
        reports.append(eval_report)
    else:
        rows, eval_rows = split(rows, eval_fraction, seed) if len(rows) >= 20 else (rows, [])
        eval_report = None
    kw = dict(tokenizer=tokenizer, processor=processor, eos=enc.eos, max_len=enc.max_len or 1024,
              special_tokens=enc.special_tokens)
    train = FileData(CaptionDataset(rows, report=report, **kw), seed=seed, name=str(train_src))
    evaluation = None
    if eval_rows:
        ds = CaptionDataset(eval_rows, report=eval_report, **kw)
        evaluation = FileData(ds, seed=seed, name=str(eval_src or f"{train_src} (held out {len(eval_rows)})"))
    return train, evaluation, reports

"""Checkpoint key tables: one small language for mapping a component's tensors to and from transformers' names.

A **table** is a list of ``Row``\\ s. A row names the transformers tensor(s), the splice tensor(s), the shape of
each transformers tensor (``None``: not checked here; the loader still compares every tensor with the module) and
an **op**, the layout change between the two:

=====================  ==========================================================  ==================================
op                     transformers -> splice (``from_hf``)                         splice -> transformers (``to_hf``)
=====================  ==========================================================  ==================================
``copy``               one tensor, as is                                            as is
``transpose``          one 2-D tensor transposed (a ``Conv1D`` ``(in, out)``        transposed back
                       weight -> an ``nn.Linear`` ``(out, in)`` one)
``split``              one tensor cut into ``len(ours)`` equal parts along          the parts concatenated
                       ``axis`` (GPT-2's packed cross-attention K/V bias)
``transpose_split``    transposed, then split (GPT-2's packed ``Conv1D`` K/V)       concatenated, then transposed
``fuse``               ``len(hf)`` tensors concatenated along ``axis`` (separate    cut back into equal parts
                       query/key/value -> timm's fused ``qkv``)
=====================  ==========================================================  ==================================

``from_hf`` reads a transformers state dict through a table and returns ``(mapped, unused)``: our tensors, and the
input keys no row takes (a pooler, legacy buffers), for the loading report. Every shape is checked; an error names
the tensor, the shape expected and the config values it came from. ``to_hf`` writes our tensors back; a tensor no
row takes raises, naming the layout and the fix. A round trip gives back the same tensors.

Example (a toy two-layer table; ``D = 4``)::

    from splice.core.keymap import Row, from_hf, to_hf

    D = 4
    table = [
        Row("ln.weight", "norm.weight", (D,)),
        Row("fc.weight", "fc.weight", (D, D), "transpose"),
        Row(("q.weight", "k.weight", "v.weight"), "qkv.weight", (D, D), "fuse"),
    ]
    ours, unused = from_hf(hf_state_dict, table, config=f"hidden_size={D}")
    again = to_hf(ours, table, layout="MyModel")        # the same tensors as hf_state_dict, unused ones left out

This module depends on torch and ``splice.core.errors`` only, so any plugin can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from splice.core.errors import CheckpointError

__all__ = ["Row", "OPS", "DUPLICATE", "from_hf", "to_hf", "check_shape"]

OPS = ("copy", "transpose", "split", "transpose_split", "fuse")

DUPLICATE = "<duplicate>"  # what a ``name_of`` returns for a tensor to pass over silently (e.g. a tied copy)


@dataclass(frozen=True)
class Row:
    """transformers tensor(s) ``hf`` <-> splice tensor(s) ``ours``, through ``op`` (see the module's table).

    ``hf`` and ``ours`` are a name or a tuple of names: ``split`` and ``transpose_split`` take one ``hf`` and two
    or more ``ours``; ``fuse`` two or more ``hf`` and one ``ours``; ``copy`` and ``transpose`` one of each.
    ``shape`` is each transformers tensor's shape (``None``: unchecked); ``axis`` is where ``split`` cuts and
    ``fuse`` joins. ``Row("ln_f.weight", "ln_f.weight", (768,))`` copies one LayerNorm weight.
    """

    hf: str | tuple[str, ...]
    ours: str | tuple[str, ...]
    shape: tuple[int, ...] | None = None
    op: str = "copy"
    axis: int = 0

    def __post_init__(self) -> None:
        hf, ours = _names(self.hf), _names(self.ours)
        object.__setattr__(self, "hf", hf)
        object.__setattr__(self, "ours", ours)
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))
        many_ours, many_hf = self.op in ("split", "transpose_split"), self.op == "fuse"
        if self.op not in OPS:
            raise ValueError(f"Row {hf}: op {self.op!r} is not one of {OPS}")
        if (len(hf) > 1) != many_hf or (len(ours) > 1) != many_ours:
            raise ValueError(f"Row {hf} -> {ours}: op {self.op!r} maps {'several' if many_hf else 'one'} "
                             f"transformers tensor(s) to {'several' if many_ours else 'one'} of ours")

    def prefixed(self, hf: str = "", ours: str = "") -> "Row":
        """The same row with ``hf`` before every transformers name and ``ours`` before every one of ours."""
        return Row(tuple(hf + n for n in self.hf), tuple(ours + n for n in self.ours), self.shape, self.op, self.axis)


def _names(names: str | Sequence[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def check_shape(key: str, tensor: Tensor, shape: tuple[int, ...] | None, config: str) -> None:
    """Raise ``CheckpointError`` unless ``tensor`` (named ``key``) has ``shape``; ``config`` says where it came from."""
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(
            f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} from the config ({config}); "
            f"fix: load it with the config.json it was saved with"
        )


def _read(row: Row, parts: list[Tensor]) -> tuple[Tensor, ...]:
    """transformers tensors (one per ``row.hf``) -> ours (one per ``row.ours``)."""
    n = len(row.ours)
    if row.op == "copy":
        return (parts[0],)
    if row.op == "transpose":
        return (parts[0].t().contiguous(),)
    if row.op == "fuse":
        return (torch.cat(parts, row.axis),)
    t = parts[0].t() if row.op == "transpose_split" else parts[0]
    if t.shape[row.axis] % n:
        raise CheckpointError(f"tensor {row.hf[0]!r}: dimension {row.axis} is {t.shape[row.axis]}, not a multiple "
                              f"of {n} (one part for each of {list(row.ours)}); fix: check the checkpoint matches "
                              "its config.json")
    return tuple(h.contiguous() for h in t.chunk(n, dim=row.axis))


def _write(row: Row, ours: list[Tensor]) -> tuple[Tensor, ...]:
    """Ours (one per ``row.ours``) -> transformers tensors (one per ``row.hf``)."""
    if row.op == "copy":
        return (ours[0],)
    if row.op == "transpose":
        return (ours[0].t(),)
    if row.op == "split":
        return (torch.cat(ours, row.axis),)
    if row.op == "transpose_split":
        return (torch.cat(ours, row.axis).t(),)
    t, n = ours[0], len(row.hf)
    if t.shape[row.axis] % n:
        raise CheckpointError(f"{row.ours[0]}: dimension {row.axis} is {t.shape[row.axis]}, not a multiple of {n} "
                              f"(one part for each of {list(row.hf)}); fix: export a model built by this plugin")
    return t.chunk(n, row.axis)


def _gather(row: Row, sd: dict[str, Tensor], key_of: dict[str, str], config: str) -> list[Tensor]:
    """The row's transformers tensors from ``sd``, every shape checked; a fuse row needs all of its parts."""
    keys = [key_of.get(name) for name in row.hf]
    if None in keys:
        missing = [name for name, key in zip(row.hf, keys) if key is None]
        present = [name for name, key in zip(row.hf, keys) if key is not None]
        raise CheckpointError(f"{missing[0]}: missing, but {present[0]} is there; expected {list(row.hf)} "
                              f"together (fused into {row.ours[0]!r}); fix: use a complete checkpoint")
    parts = [sd[key] for key in keys]
    for key, tensor in zip(keys, parts):
        check_shape(key, tensor, row.shape, config)
    if len({tuple(t.shape) for t in parts}) > 1:
        raise CheckpointError(f"{row.hf[0]}: shapes {', '.join(str(tuple(t.shape)) for t in parts)} for "
                              f"{list(row.hf)}; expected equal shapes to fuse into {row.ours[0]!r}; fix: check the "
                              "checkpoint matches its config.json")
    return parts


def from_hf(
    sd: dict[str, Tensor], table: Sequence[Row], name_of: Callable[[str], str | None] | None = None,
    config: str = "",
) -> tuple[dict[str, Tensor], list[str]]:
    """transformers tensors -> (ours, unused keys), through ``table``.

    ``name_of(key)`` gives a key's name in the table (a prefix removed, an old spelling renamed), ``DUPLICATE``
    for a tensor to pass over, or ``None`` for one to report unused, as is any name no row has; by default the key
    is its name. ``config`` (the config values the shapes came from) is quoted when a shape is off. A row none of
    whose tensors is in ``sd`` is left out: the loader reports its tensors missing.
    """
    index: dict[str, Row] = {name: row for row in table for name in row.hf}
    if len(index) != sum(len(row.hf) for row in table):
        raise ValueError("a transformers name appears in more than one row of the table")
    names = {key: (name_of(key) if name_of else key) for key in sd}
    key_of = {name: key for key, name in names.items() if name in index}  # a name given twice: the last key
    mapped: dict[str, Tensor] = {}
    unused: list[str] = []
    done: set[int] = set()
    for key, name in names.items():
        if name == DUPLICATE:
            continue
        row = index.get(name)  # type: ignore[arg-type]
        if row is None:
            unused.append(key)
        elif id(row) not in done:
            done.add(id(row))
            mapped.update(zip(row.ours, _read(row, _gather(row, sd, key_of, config))))
    return mapped, unused


def to_hf(
    sd: dict[str, Tensor], table: Sequence[Row], hf_key: Callable[[str], str] | None = None, *, layout: str,
    fix: str = "save in splice format", required: bool = False,
) -> dict[str, Tensor]:
    """Ours -> transformers tensors, through ``table``; ``hf_key`` gives a table name its on-disk key (default: as is).

    A row none of whose tensors is in ``sd`` is left out (e.g. a layer without cross-attention) unless
    ``required``; a tensor no row takes raises, naming the ``layout`` (e.g. ``"GPT2"``) and the ``fix``.
    """
    out: dict[str, Tensor] = {}
    consumed: set[str] = set()
    for row in table:
        present = [o for o in row.ours if o in sd]
        if not present and not required:
            continue
        if len(present) != len(row.ours):
            missing = sorted(set(row.ours) - set(present))
            raise CheckpointError(f"cannot write {row.hf[0]!r}: it needs {list(row.ours)}, but {missing} are missing")
        for name, t in zip(row.hf, _write(row, [sd[o] for o in row.ours])):
            if row.shape is not None and tuple(t.shape) != row.shape:
                raise CheckpointError(f"tensor(s) {list(row.ours)} give {name!r} shape {tuple(t.shape)}, expected "
                                      f"{row.shape} from the config")
            out[hf_key(name) if hf_key else name] = t.contiguous()
        consumed.update(row.ours)
    left = sorted(set(sd) - consumed)
    if left:
        raise CheckpointError(
            f"{len(left)} tensor(s) have no place in transformers' {layout} layout: {left[:8]}"
            f"{' ...' if len(left) > 8 else ''}; fix: {fix}"
        )
    return out

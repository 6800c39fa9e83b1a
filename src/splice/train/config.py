"""``TrainConfig``: every training setting with its default, its bound and its ``splice train`` flag, in one table.

A field made with ``_setting`` carries its bound (or its choices), which ``TrainConfig.problems`` checks, and the
help of the ``splice train`` flag of the same name (``max_steps`` -> ``--max-steps``), which ``flags`` lists for
the CLI. The other fields (``out``, ``resume``, ``overwrite``, ``progress`` and a few that have no flag) are set
by the CLI's own arguments or through the Python API only.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.core.errors import InputError, Problem, short

MAX_BATCH = 65_536  # samples in one optimizer step (or evaluation batch): far past what a step can hold
MAX_THREADS = 1_024  # torch CPU threads
MAX_WORKERS = 64  # data-loading processes
MAX_SEED = 2**32 - 1  # numpy's seed range


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Bound:
    """What a numeric setting takes: an int, or a finite number (``kind`` float); from ``low`` (exclusive with
    ``above``) to ``high``; ``None`` too when ``optional``."""

    kind: type
    low: float
    high: float | None = None
    above: bool = False
    optional: bool = False
    example: str = ""

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        if not math.isfinite(value) or value < self.low or (self.above and value == self.low):
            return False
        return self.high is None or value <= self.high

    def problem(self, name: str, value: Any) -> Problem | None:
        if self.accepts(value):
            return None
        what = "an integer" if self.kind is int else "a finite number"
        if self.high is not None:
            expected = f"{what} from {self.low:,} to {self.high:,}"
        else:
            expected = f"{what} {'>' if self.above else '>='} {self.low:,}"
        if value is None:
            message = "not set"
        elif type(value) is int or (self.kind is float and is_number(value)):
            message = "out of range"
        else:
            message = f"not {what}"
        return Problem(name, message, given=value, expected=expected + (" (or unset)" if self.optional else ""),
                       fix=f"use e.g. {self.example}")


_BETA = _Bound(float, 0, 0.999999)


def _setting(default: Any, bound: _Bound | None = None, *, help: str | None = None,
             choices: tuple[str, ...] | None = None, flag: bool = True) -> Any:
    """A field with its ``bound`` or ``choices`` (checked by ``problems``) and, with ``flag``, a ``splice train``
    flag with ``help``."""
    return dataclasses.field(default=default, metadata={"bound": bound, "choices": choices, "flag": flag,
                                                        "help": help})


@dataclass
class TrainConfig:
    """Everything ``train`` can be told; a field with a flag is the ``splice train`` flag of the same name."""

    out: str = "out/train"
    # stop after this many optimizer steps (also the schedule's length)
    max_steps: int | None = _setting(None, _Bound(int, 0, optional=True, example="1000"),
                                     help="stop after this many steps, >= 0")
    # stop when the time is spent (the schedule follows the clock)
    max_minutes: float | None = _setting(None, _Bound(float, 0, above=True, optional=True, example="5"),
                                         help="stop when this time is spent, > 0")
    # samples per optimizer step, over all processes and accumulation steps
    batch_size: int = _setting(32, _Bound(int, 1, MAX_BATCH, example="32 (the default)"),
                               help="global batch per step, 1 to 65536 (default 32)")
    # micro-batches per step (per process)
    grad_accum: int = _setting(1, _Bound(int, 1, MAX_BATCH, example="1 (the default)"),
                               help="micro-batches per step, >= 1, dividing the batch size (default 1)")
    lr: float = _setting(1e-4, _Bound(float, 0, above=True, example="1e-4 (the default)"),
                         help="peak learning rate, > 0 (default 1e-4)")
    min_lr_ratio: float = _setting(0.0, _Bound(float, 0, 1, example="0 (the default) or 0.1"),
                                   help="the schedule ends at lr x this, 0 to 1 (default 0)")
    warmup_steps: int = _setting(50, _Bound(int, 0, example="50 (the default)"), help=">= 0 (default 50)")
    schedule: str = _setting("cosine", choices=("cosine", "linear", "constant"))
    # on matrices and embeddings; never on biases and norms
    weight_decay: float = _setting(0.01, _Bound(float, 0, example="0.01 (the default)"), help=">= 0 (default 0.01)")
    betas: tuple[float, float] = (0.9, 0.999)
    # max global gradient norm; None or 0: no clipping
    grad_clip: float | None = _setting(
        1.0, _Bound(float, 0, optional=True, example="1.0 (the default; 0: no clipping)"),
        help="max gradient norm, >= 0 (default 1.0; 0: none)")
    # auto: bf16 on GPUs that support it, else fp32
    precision: str = _setting("auto", choices=("auto", "fp32", "bf16"))
    # steps between evaluations; None: none during training
    eval_every: int | None = _setting(None, _Bound(int, 0, optional=True, example="500 (0: only at the end)"),
                                      help="steps between evaluations, >= 0 (0: only at the end)")
    eval_at_end: bool = True  # evaluate once more when training ends
    # evaluation samples (None: the whole evaluation set)
    eval_size: int | None = _setting(500, _Bound(int, 0, optional=True, example="500 (the default)"),
                                     help="evaluation samples, >= 0 (default 500)")
    eval_batch_size: int = _setting(100, _Bound(int, 1, MAX_BATCH, example="100 (the default)"), flag=False)
    # steps between checkpoints (there is also one on stopping)
    save_every: int | None = _setting(None, _Bound(int, 0, optional=True, example="1000 (0: by time only)"),
                                      help="steps between checkpoints, >= 0 (0: by time only)")
    # at most this long between checkpoints
    save_minutes: float | None = _setting(
        15.0, _Bound(float, 0, optional=True, example="15 (the default; 0: by steps only)"),
        help="minutes between checkpoints, >= 0 (default 15; 0: by steps only)")
    log_every: int = _setting(10, _Bound(int, 1, example="10 (the default)"),
                              help="steps between metrics lines, >= 1 (default 10)")
    # model init (when composing) and data order
    seed: int = _setting(0, _Bound(int, 0, MAX_SEED, example="0"), help="0 to 2**32-1 (default 0)")
    threads: int | None = _setting(
        None, _Bound(int, 1, MAX_THREADS, optional=True, example=f"{os.cpu_count() or 1} (this machine's cores)"),
        help="torch CPU threads, 1 to 1024")
    # default: cuda when present (cuda:LOCAL_RANK under torchrun), else cpu
    device: str | None = _setting(
        None, help="cpu, cuda or cuda:N, a device this machine has (default: cuda when present)")
    # data-loading processes (0: in the training process)
    workers: int = _setting(
        0, _Bound(int, 0, MAX_WORKERS, example="0 (the default: load in the training process) or 4"),
        help="data-loading processes, 0 to 64 (default 0)")
    progress: bool = True  # the progress line on stderr
    resume: bool = False  # continue from OUT/checkpoint
    overwrite: bool = False  # start afresh in an OUT that holds an earlier run
    save_final: bool = True  # write OUT/model at the end

    def problems(self, world: int = 1) -> list[Problem]:
        """Every setting that cannot work, each named by its field (``splice train`` maps them to its flags)."""
        settings = dataclasses.fields(self)
        problems = [p for f in settings if f.metadata.get("bound")
                    and (p := f.metadata["bound"].problem(f.name, getattr(self, f.name)))]
        if self.max_steps is None and self.max_minutes is None:
            problems.append(Problem("max_steps", "training needs an end: a step count, a time budget or both",
                                    fix="set max_steps or max_minutes (--max-steps / --max-minutes)"))
        bad = {p.path for p in problems}
        if not {"batch_size", "grad_accum"} & bad and self.batch_size % (world * self.grad_accum):
            problems.append(Problem(
                "batch_size", f"{self.batch_size} does not split into {world} process(es) x {self.grad_accum} "
                "micro-batch(es)", fix=f"make batch_size a multiple of {world * self.grad_accum}"))
        for f in settings:
            options = f.metadata.get("choices")
            if options and getattr(self, f.name) not in options:
                problems.append(Problem(f.name, "not one of the choices", given=getattr(self, f.name),
                                        expected=" | ".join(options), fix=f"use {options[0]}"))
        for name in (f.name for f in settings if isinstance(f.default, bool)):
            if not isinstance(getattr(self, name), bool):
                problems.append(Problem(name, "not a boolean", given=getattr(self, name), expected="True or False",
                                        fix=f"set {name} to True or False"))
        betas = self.betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_BETA.accepts(b) for b in betas)):
            problems.append(Problem("betas", "not two AdamW betas", given=betas, expected="two numbers in [0, 1)",
                                    fix="use (0.9, 0.999)"))
        return problems + [p for p in (_device_problem(self.device), _out_problem(self.out)) if p]

    def check(self, world: int = 1) -> None:
        """An ``InputError`` listing every problem of ``problems``; nothing is loaded or allocated before it."""
        problems = self.problems(world)
        if problems:
            raise InputError(problems, source="the training settings")


def flags() -> list[tuple[str, dict]]:
    """The ``splice train`` flags of ``TrainConfig``, in field order: ``(--flag-name, add_argument keywords)``.
    Each defaults to None, which leaves the field's own default."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("flag"):
            continue
        keywords: dict[str, Any] = {"default": None, "dest": f.name}
        if meta["bound"] is not None:
            keywords["type"] = meta["bound"].kind
        if meta["choices"]:
            keywords["choices"] = list(meta["choices"])
        if meta["help"] is not None:
            keywords["help"] = meta["help"]
        out.append(("--" + f.name.replace("_", "-"), keywords))
    return out


def settings(config: Any, overrides: dict) -> TrainConfig:
    """``config`` with ``overrides`` replacing its fields; anything else is an ``InputError``."""
    if config is not None and not isinstance(config, TrainConfig):
        raise InputError(f"config: a {type(config).__name__}, expected a TrainConfig\n"
                         "    fix: pass TrainConfig(...) or the settings as keyword arguments")
    fields = list(TrainConfig.__dataclass_fields__)
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise InputError([Problem(k, "not a training setting", expected="a field of TrainConfig",
                                  fix="did you mean " + (", ".join(difflib.get_close_matches(k, fields, 3)) or
                                                         "one of " + ", ".join(fields)) + "?")
                          for k in unknown], source="train()")
    return dataclasses.replace(config or TrainConfig(), **overrides)


def _device_problem(device: Any) -> Problem | None:
    """None when ``device`` is None or names a device this machine has; a problem saying what it has otherwise."""
    if device is None:
        return None
    cuda = torch.cuda.device_count()
    have = "cpu" + (f", cuda or cuda:0 to cuda:{cuda - 1}" if cuda else " (no CUDA device here)")
    fix = "leave it out (cuda when present, else cpu) or give one this machine has"
    try:
        d = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except (RuntimeError, ValueError):
        d = None
    if d is None:
        return Problem("device", "not a device name", given=device, expected=have, fix=fix)
    if d.type == "cpu" or (d.type == "cuda" and cuda and (d.index is None or d.index < cuda)):
        return None
    if d.type == "mps" and torch.backends.mps.is_available():
        return None
    return Problem("device", "no such device on this machine", given=device, expected=have, fix=fix)


def _out_problem(out: Any) -> Problem | None:
    """None when ``out`` is (or can be made) a folder: it and every parent that exists are folders."""
    fix = "give a folder path (it is created if missing)"
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        return Problem("out", "not a folder path", given=out, expected="a folder path", fix=fix)
    try:
        path = Path(out)
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    except (OSError, ValueError) as exc:
        return Problem("out", f"not a usable path ({type(exc).__name__})", given=str(out), fix=fix)
    if blocker is None:
        return None
    return Problem("out", f"{'it' if blocker == path else short(str(blocker))} exists and is not a folder",
                   given=str(out), expected="a folder", fix="give another folder, or move the file away")

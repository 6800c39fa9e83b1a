"""Training: ``splice.train.train`` and the loop behind ``splice train`` and ``splice demo``.

    from splice.train import TrainConfig, train
    result = train("examples/demo-captioner.yaml", "shapes", TrainConfig(out="out/run", max_minutes=5))

What the loop does: AdamW (fused where torch has it), linear warm-up then cosine decay, gradient clipping and
accumulation, bf16 autocast where asked (``precision="auto"``: on GPUs that support it), the spec's ``freeze``
(frozen parameters get no gradient and are not given to the optimizer), periodic evaluation, checkpoints and
exact resume, a progress line, metrics as JSONL, and a checkpoint when Ctrl-C (SIGINT) or SIGTERM stops it.

The run folder::

    OUT/metrics.jsonl       one JSON object per log step / evaluation / event
    OUT/data_report.json    rows used and rows skipped (by reason, with examples)
    OUT/checkpoint/         the latest checkpoint: a splice model folder (splice.load reads it) plus
                            trainer_state.json (step, samples seen, time, RNG, config) and optimizer.safetensors
    OUT/model/              the final model (weights, tokenizer, preprocessor), written at the end

Exactness. The batch of step ``s`` is a pure function of the data seed and the number of samples seen, the
learning rate of the step count (with ``max_steps``), and the optimizer and RNG states are saved, so a run
resumed from a checkpoint reproduces the weights of an uninterrupted run bit for bit on CPU. A time budget
(``max_minutes``) sets the schedule from elapsed time instead, which a resume continues but cannot replay.

Several processes. Under ``torchrun --nproc-per-node N`` the model is wrapped in DistributedDataParallel (gloo on
CPU, nccl on GPU). Each step's global batch is split between the processes; the loss is normalised by the
number of label tokens in the whole global batch, so N processes give the same gradients as one process with
the same ``batch_size``. Only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.errors import CheckpointError, InputError, Problem, short
from splice.core.models import shift_right

CHECKPOINT = "checkpoint"
FINAL = "model"
METRICS = "metrics.jsonl"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
STATE_VERSION = 1


@dataclass
class TrainConfig:
    """Everything ``train`` can be told; each field is also a ``splice train`` flag (``--max-steps`` ...)."""

    out: str = "out/train"
    max_steps: int | None = None  # stop after this many optimizer steps (also the schedule's length)
    max_minutes: float | None = None  # stop when the time is spent (the schedule follows the clock)
    batch_size: int = 32  # samples per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1  # micro-batches per step (per process)
    lr: float = 1e-4
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.01  # on matrices and embeddings; never on biases and norms
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16
    eval_every: int | None = None  # steps between evaluations; None: none during training
    eval_at_end: bool = True  # evaluate once more when training ends
    eval_size: int | None = 500  # evaluation samples (None: the whole evaluation set)
    eval_batch_size: int = 100
    save_every: int | None = None  # steps between checkpoints (also one on stopping)
    save_minutes: float | None = 15.0  # at most this long between checkpoints
    log_every: int = 10
    seed: int = 0  # model init (when composing) and data order
    threads: int | None = None  # torch CPU threads
    device: str | None = None  # default: cuda when present (cuda:LOCAL_RANK under torchrun), else cpu
    workers: int = 0  # data-loading processes (0: in the training process)
    progress: bool = True  # the progress line on stderr
    resume: bool = False  # continue from OUT/checkpoint
    overwrite: bool = False  # start afresh in an OUT that holds an earlier run
    save_final: bool = True  # write OUT/model at the end

    def problems(self, world: int = 1) -> list[Problem]:
        """Every setting that cannot work, each named by its field (``splice train`` maps them to its flags)."""
        problems = [p for name, bound in _BOUNDS.items() if (p := bound.problem(name, getattr(self, name)))]
        if self.max_steps is None and self.max_minutes is None:
            problems.append(Problem("max_steps", "training needs an end: a step count, a time budget or both",
                                    fix="set max_steps or max_minutes (--max-steps / --max-minutes)"))
        bad = {p.path for p in problems}
        if not {"batch_size", "grad_accum"} & bad and self.batch_size % (world * self.grad_accum):
            problems.append(Problem(
                "batch_size", f"{self.batch_size} does not split into {world} process(es) x {self.grad_accum} "
                "micro-batch(es)", fix=f"make batch_size a multiple of {world * self.grad_accum}"))
        for name, options in (("schedule", ("cosine", "linear", "constant")), ("precision", ("auto", "fp32", "bf16"))):
            if getattr(self, name) not in options:
                problems.append(Problem(name, "not one of the choices", given=getattr(self, name),
                                        expected=" | ".join(options), fix=f"use {options[0]}"))
        for name in ("eval_at_end", "progress", "resume", "overwrite", "save_final"):
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


MAX_BATCH = 65_536  # samples in one optimizer step (or evaluation batch): far past what a step can hold
MAX_THREADS = 1_024  # torch CPU threads
MAX_WORKERS = 64  # data-loading processes
MAX_SEED = 2**32 - 1  # numpy's seed range


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
        elif type(value) is int or (self.kind is float and _is_number(value)):
            message = "out of range"
        else:
            message = f"not {what}"
        return Problem(name, message, given=value, expected=expected + (" (or unset)" if self.optional else ""),
                       fix=f"use e.g. {self.example}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_BETA = _Bound(float, 0, 0.999999)
_BOUNDS = {
    "max_steps": _Bound(int, 0, optional=True, example="1000"),
    "max_minutes": _Bound(float, 0, above=True, optional=True, example="5"),
    "batch_size": _Bound(int, 1, MAX_BATCH, example="32 (the default)"),
    "grad_accum": _Bound(int, 1, MAX_BATCH, example="1 (the default)"),
    "lr": _Bound(float, 0, above=True, example="1e-4 (the default)"),
    "min_lr_ratio": _Bound(float, 0, 1, example="0 (the default) or 0.1"),
    "warmup_steps": _Bound(int, 0, example="50 (the default)"),
    "weight_decay": _Bound(float, 0, example="0.01 (the default)"),
    "grad_clip": _Bound(float, 0, optional=True, example="1.0 (the default; 0: no clipping)"),
    "eval_every": _Bound(int, 0, optional=True, example="500 (0: only at the end)"),
    "eval_size": _Bound(int, 0, optional=True, example="500 (the default)"),
    "eval_batch_size": _Bound(int, 1, MAX_BATCH, example="100 (the default)"),
    "save_every": _Bound(int, 0, optional=True, example="1000 (0: by time only)"),
    "save_minutes": _Bound(float, 0, optional=True, example="15 (the default; 0: by steps only)"),
    "log_every": _Bound(int, 1, example="10 (the default)"),
    "seed": _Bound(int, 0, MAX_SEED, example="0"),
    "threads": _Bound(int, 1, MAX_THREADS, optional=True, example=f"{os.cpu_count() or 1} (this machine's cores)"),
    "workers": _Bound(int, 0, MAX_WORKERS, example="0 (the default: load in the training process) or 4"),
}


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


@dataclass
class TrainResult:
    model: nn.Module
    step: int
    samples: int
    stopped: str  # max_steps | max_minutes | interrupted
    elapsed_s: float
    loss: float | None  # the last logged training loss
    eval: dict | None  # the last evaluation
    out: Path
    checkpoint: Path | None
    final: Path | None


# -- processes -------------------------------------------------------------------------------------------


def world_size() -> int:
    """The number of processes of this torchrun job (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class _Dist:
    """This process's place in a torchrun job (world 1 without one)."""

    def __init__(self, device: str | None):
        import torch.distributed as dist

        self.dist = dist
        self.world = world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owned = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owned = True
        self.on = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: Tensor) -> Tensor:
        if self.on:
            t = t.to(self.device)
            self.dist.all_reduce(t)
        return t.cpu()

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


# -- model, data, optimizer ------------------------------------------------------------------------------


def _is_model_folder(source: Any) -> bool:
    if not isinstance(source, (str, Path)):
        return False
    p = Path(source)
    return p.is_dir() and ((p / "splice.json").is_file() or (p / "config.json").is_file())


def load_model(source: Any, *, seed: int = 0) -> nn.Module:
    """A model from a module, a saved folder (splice or transformers), a spec file, preset or dict."""
    import splice

    if isinstance(source, nn.Module):
        return source
    if _is_model_folder(source):
        return splice.load(source)
    if isinstance(source, str) and not Path(source).exists() and not source.endswith((".yaml", ".yml", ".json")):
        from splice.core.plugins import get_registry

        if source not in get_registry().compositions:
            return splice.load(source)  # a hub id (or a clear "no such folder")
    return splice.compose(source, seed=seed)


def attach_shapes_tokenizer(model: nn.Module) -> None:
    """Give a model without a tokenizer the shapes set's word-level one, checking that its ids fit."""
    from splice import synthetic

    if getattr(model, "tokenizer", None) is not None:
        return
    need = synthetic.vocab_size()
    vocab = getattr(model.decoder, "vocab_size", None)
    if vocab is not None and vocab < need:
        raise InputError(
            f"the shapes captions need {need} token ids, the decoder has vocab_size {vocab}\n"
            f"    fix: set decoder.config.vocab_size: {need} (see examples/demo-captioner.yaml)"
        )
    model.tokenizer = synthetic.build_tokenizer()
    want = {"decoder_start": synthetic.BOS, "pad": synthetic.PAD, "eos": synthetic.EOS}
    if any(model.tokens.get(k) != v for k, v in want.items()):
        print(f"note: the shapes tokenizer's special ids are {want}; the spec says {model.tokens} (used as given)")


def resolve_data(data: Any, model: nn.Module, cfg: TrainConfig, eval_data: Any = None):
    """(train source, eval source or None, reports) for ``"shapes"``, a folder / JSONL path, or source objects."""
    if isinstance(data, str) and data == "shapes":
        from splice.synthetic import ShapesData

        attach_shapes_tokenizer(model)
        source = ShapesData.for_model(model, seed=cfg.seed)
        return source, (eval_data if eval_data is not None else source), []
    if isinstance(data, (str, Path)):
        from splice.data import load_data

        train_src, eval_src, reports = load_data(data, model, seed=cfg.seed, eval_path=eval_data)
        return train_src, eval_src, reports
    if not hasattr(data, "get"):
        raise InputError(f"data: expected 'shapes', a folder, a .jsonl file or a source with get(); got {type(data).__name__}")
    return data, eval_data, []


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters: matrices and embeddings decay, biases / norms / 1-D parameters do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    if not groups:
        raise InputError("every parameter is frozen: nothing to train\n    fix: remove a part from the spec's freeze list")
    return groups


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / dtype
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then ``schedule`` over progress 0..1 (steps or time)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    p = min(max(progress, 0.0), 1.0)
    r = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        f = r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))
    elif cfg.schedule == "linear":
        f = r + (1 - r) * (1 - p)
    else:
        f = 1.0
    return cfg.lr * warm * f


def autocast_for(precision: str, device: torch.device):
    """A bf16 autocast context (or a no-op) for the resolved precision."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def token_loss_sum(model: nn.Module, pixel_values: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy over the label tokens that are not -100 (the caller divides by the global count)."""
    core = model.module if hasattr(model, "module") else model
    start, pad = core.tokens.get("decoder_start"), core.tokens.get("pad")
    if start is None or pad is None:
        raise InputError(
            f"training needs tokens.decoder_start and tokens.pad in the spec (given {core.tokens})\n"
            "    fix: add them under `tokens:`"
        )
    out = model(pixel_values=pixel_values, decoder_input_ids=shift_right(labels, pad, start))
    logits = out.logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


# -- evaluation ------------------------------------------------------------------------------------------


def _decode(model: nn.Module, row: list[int]) -> str:
    eos = model.tokens.get("eos")
    row = row[1:]  # the start token
    if eos is not None and eos in row:
        row = row[: row.index(eos)]
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return " ".join(map(str, row))
    return " ".join(tok.decode(row, skip_special_tokens=True).split())


@torch.no_grad()
def evaluate(model: nn.Module, source: Any, *, n: int | None = 500, batch_size: int = 100,
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


# -- checkpoints -----------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> tuple[dict, dict[str, Tensor]]:
    import numpy as np

    py = random.getstate()
    npst = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return meta, tensors


def _set_rng_state(meta: dict, tensors: dict[str, Tensor], device: torch.device, rank: int) -> None:
    """Python and numpy from rank 0's state; torch (and CUDA) from this rank's own, saved per process."""
    import numpy as np

    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    mine = rank if f"rng.torch.{rank}" in tensors else 0  # a different number of processes: rank 0's
    torch.set_rng_state(tensors[f"rng.torch.{mine}"])
    if device.type == "cuda" and f"rng.cuda.{mine}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.{mine}"], device)


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    device: torch.device, rng_tensors: dict[str, Tensor] | None = None) -> None:
    """The model (a loadable splice folder) + optimizer, RNG and loop state, written atomically.

    ``rng_tensors``: every process's torch RNG state as ``rng.torch.RANK`` (default: this process's as rank 0).
    """
    from safetensors.torch import save as st_save

    opt = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    for idx, slots in opt["state"].items():
        for name, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value.detach().cpu().contiguous()
    rng_meta, mine = _rng_state(device)
    if rng_tensors is None:
        rng_tensors = {f"{k}.0": v for k, v in mine.items()}
    tensors.update({k: v.cpu() for k, v in rng_tensors.items()})
    full = dict(state, format="splice-train", version=STATE_VERSION, rng=rng_meta,
                param_groups=[{k: v for k, v in g.items()} for g in opt["param_groups"]])
    model.save_pretrained(folder, extra_files={
        STATE: (json.dumps(full, indent=2, default=list) + "\n").encode(),
        OPTIMIZER: st_save(tensors),
    })


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    from safetensors.torch import load_file

    from splice.core.checkpoint import read_json

    state_file = folder / STATE
    if not state_file.is_file():
        raise InputError(f"{folder}: no {STATE}: not a training checkpoint\n"
                         "    fix: resume from the run folder that `splice train --out` wrote")
    state = read_json(state_file)
    if not isinstance(state, dict) or state.get("format") != "splice-train":
        raise CheckpointError(f"{state_file}: not a splice training state\n"
                              "    fix: pass --overwrite to start again (the checkpoint is lost)")
    try:
        return state, load_file(str(folder / OPTIMIZER))
    except Exception as exc:  # safetensors raises its own error types for a missing or corrupt file
        raise CheckpointError(f"{folder / OPTIMIZER}: cannot be read ({type(exc).__name__}: {str(exc)[:200]})\n"
                              "    fix: pass --overwrite to start again (the checkpoint is lost)") from None


def restore_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       device: torch.device, rank: int = 0) -> dict:
    """Weights, optimizer state and RNG from ``folder``; returns the loop state (step, samples, elapsed)."""
    import splice

    state, tensors = read_checkpoint(folder)
    saved = splice.load(folder)
    model.load_state_dict(saved.state_dict())
    if getattr(model, "tokenizer", None) is None:
        model.tokenizer = saved.tokenizer
    try:
        opt_state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = value
        groups = state["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        _set_rng_state(state["rng"], tensors, device, rank)
        if not all(_is_number(state.get(k)) for k in ("step", "samples", "elapsed_s")):
            raise ValueError("step, samples or elapsed_s is not a number")
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{folder / STATE}: the optimizer or loop state does not fit this model and run "
            f"({type(exc).__name__}: {str(exc)[:200]})\n    fix: resume with the spec, freeze list and settings "
            "the run started with, or pass --overwrite to start again") from None
    return state


# -- the progress line -----------------------------------------------------------------------------------


def _clock(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """One line on stderr: rewritten in place on a terminal, printed every 10% otherwise."""

    def __init__(self, enabled: bool, max_steps: int | None, budget_s: float | None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.max_steps, self.budget_s = max_steps, budget_s
        self._last_draw = 0.0
        self._last_decile = -1
        self._width = 0

    def fraction(self, step: int, elapsed: float) -> float:
        f = [step / self.max_steps] if self.max_steps else []
        f += [elapsed / self.budget_s] if self.budget_s else []
        return min(1.0, max(f)) if f else 0.0

    def update(self, step: int, elapsed: float, loss: float | None, lr: float, rate: float, force: bool = False) -> None:
        if not self.enabled:
            return
        frac = self.fraction(step, elapsed)
        now = time.monotonic()
        if self.tty:
            if not force and now - self._last_draw < 0.25:
                return
        else:
            decile = int(frac * 10)
            if not force and decile == self._last_decile:
                return
            self._last_decile = decile
        self._last_draw = now
        bar = "#" * int(frac * 20)
        steps = f"{step}/{self.max_steps}" if self.max_steps else f"{step}"
        left = elapsed / frac - elapsed if frac > 0 else 0.0
        loss_s = f"{loss:.4f}" if loss is not None else "-"
        line = (f"step {steps} {frac:4.0%} |{bar:<20}| loss {loss_s} lr {lr:.2e} {rate:,.0f} samples/s "
                f"{_clock(elapsed)} elapsed, {_clock(left)} left")
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def write(self, message: str) -> None:
        """A line of its own (stdout), clearing the progress line first on a terminal."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
        print(message, flush=True)

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
        self._width = 0


# -- the loop --------------------------------------------------------------------------------------------


class _Micro(torch.utils.data.Dataset):
    """Micro-batch ``j`` of this process, from stream offset ``offset`` on: step ``j // accum``, part ``j % accum``."""

    def __init__(self, source, offset: int, global_batch: int, world: int, rank: int, accum: int):
        self.source, self.offset, self.g = source, offset, global_batch
        self.world, self.rank, self.accum = world, rank, accum
        self.mb = global_batch // (world * accum)

    def positions(self, j: int) -> range:
        step, part = divmod(j, self.accum)
        start = self.offset + step * self.g + (self.rank * self.accum + part) * self.mb
        return range(start, start + self.mb)

    def __len__(self) -> int:  # the DataLoader asks; the sampler is what bounds it
        return 1 << 62

    def __getitem__(self, j: int) -> dict:
        return self.source.get(self.positions(j))


class _Count(torch.utils.data.Sampler):
    def __iter__(self):
        j = 0
        while True:
            yield j
            j += 1


class _Abort(KeyboardInterrupt):
    """The second Ctrl-C: leave at once, without a checkpoint."""


class _Stop:
    """SIGINT / SIGTERM set a flag (the loop stops after the step and saves); a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise _Abort
        self.requested = True
        name = signal.Signals(signum).name
        print(f"\n{name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no handlers, KeyboardInterrupt is still caught
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _print(on: bool, *args) -> None:
    if on:
        print(*args, flush=True)


def _prepare_out(out: Path, cfg: TrainConfig, main: bool) -> Path | None:
    """The checkpoint to resume from (or None); refuses to mix a fresh run into an earlier run's folder."""
    ckpt = out / CHECKPOINT
    if cfg.resume:
        if (ckpt / STATE).is_file():
            return ckpt
        _print(main, f"resume: no checkpoint in {out}/ yet, starting from the beginning")
        return None
    earlier = [p for p in (ckpt, out / METRICS) if p.exists()]
    if earlier and not cfg.overwrite:
        raise InputError(
            f"{out}/ holds an earlier run ({', '.join(p.name for p in earlier)})\n"
            "    fix: pass --resume to continue it, --overwrite to start again, or another --out"
        )
    if earlier and main:
        import shutil

        for p in earlier:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return None


def train(
    model: Any,
    data: Any = "shapes",
    config: TrainConfig | None = None,
    *,
    eval_data: Any = None,
    callbacks: Sequence[Callable[[int, dict], None]] = (),
    **overrides: Any,
) -> TrainResult:
    """Train ``model`` (a module, a saved folder, or a spec) on ``data`` (``"shapes"``, an imagefolder folder, a
    JSONL file, or a source object); ``overrides`` replace fields of ``config``.

    ``callbacks`` are called after every optimizer step with ``(step, info)`` (``info``: loss, lr, grad_norm);
    one that raises ``KeyboardInterrupt`` stops the run like Ctrl-C, with a checkpoint.
    """
    cfg = _settings(config, overrides)
    cfg.check(world_size())  # before anything is loaded, allocated or written
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = _Dist(cfg.device)
    try:
        return _Run(cfg, dist, model, data, eval_data, callbacks).run()
    finally:
        dist.close()


def _settings(config: Any, overrides: dict) -> TrainConfig:
    """``config`` with ``overrides`` replacing its fields; anything else is an ``InputError``."""
    import difflib

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


class _Run:
    def __init__(self, cfg: TrainConfig, dist: _Dist, model: Any, data: Any, eval_data: Any, callbacks):
        self.cfg, self.dist, self.callbacks = cfg, dist, list(callbacks)
        self.main = dist.main
        self.out = Path(cfg.out)
        if self.main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(f"out: {short(str(self.out))} cannot be created ({type(exc).__name__}: "
                                 f"{exc.strerror})\n    fix: give a folder you can write to") from None
        self.resume_from = _prepare_out(self.out, cfg, self.main)
        if dist.on:
            dist.dist.barrier()  # rank 0 may have cleared an earlier run
        torch.manual_seed(cfg.seed)
        self.model = load_model(model, seed=cfg.seed).to(dist.device)
        # the training RNG (dropout): its own stream per process
        torch.manual_seed(cfg.seed + dist.rank)
        self.source, self.eval_source, self.reports = resolve_data(data, self.model, cfg, eval_data)
        self.device = dist.device
        self.precision = resolve_precision(cfg.precision, self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.step, self.samples, self.elapsed0 = 0, 0, 0.0
        self.last_loss: float | None = None
        self.last_eval: dict | None = None
        self.last_eval_step: int | None = None

    # -- bookkeeping --
    def log(self, row: dict) -> None:
        if self.main:
            with open(self.out / METRICS, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def save(self, elapsed: float, reason: str, collective: bool = True) -> Path | None:
        """Rank 0 writes; with ``collective`` every process must call it (their RNG states are gathered)."""
        _, mine = _rng_state(self.device)
        mine = {k: v.cpu() for k, v in mine.items()}
        if self.dist.on and collective:
            gathered: list[Any] = [None] * self.dist.world
            self.dist.dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine] if self.main else []
        if not self.main:
            return None
        rng = {f"{k}.{r}": v for r, g in enumerate(gathered) for k, v in g.items()}
        path = self.out / CHECKPOINT
        state = {"step": self.step, "samples": self.samples, "elapsed_s": elapsed, "world_size": self.dist.world,
                 "config": dataclasses.asdict(self.cfg), "data": self.source.describe() if hasattr(self.source, "describe") else "",
                 "reason": reason}
        save_checkpoint(path, self.model, self.optimizer, state, self.device, rng)
        self.log({"event": "checkpoint", "step": self.step, "path": str(path), "reason": reason})
        return path

    def progress(self, step: int, elapsed: float) -> float:
        cfg = self.cfg
        parts = []
        if cfg.max_steps:
            parts.append(step / cfg.max_steps)
        if cfg.max_minutes:
            parts.append(elapsed / (cfg.max_minutes * 60))
        return max(parts) if parts else 0.0

    def evaluate(self) -> dict | None:
        if self.eval_source is None or not hasattr(self.eval_source, "eval_batches"):
            return None
        if not self.main:
            return None
        result = evaluate(self.model, self.eval_source, n=self.cfg.eval_size, batch_size=self.cfg.eval_batch_size,
                          precision=self.precision, examples=0)
        result.pop("examples")
        self.log({"event": "eval", "step": self.step, **result})
        self.last_eval_step = self.step
        return result

    # -- the loop --
    def run(self) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        self._announce()
        wrapped, batches = self._loader()
        bar = Progress(cfg.progress and self.main, cfg.max_steps, cfg.max_minutes * 60 if cfg.max_minutes else None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        t0 = time.perf_counter() - self.elapsed0
        last_save = time.perf_counter()
        step_time = None  # moving average of one step's seconds, for the time budget
        window = _Window()
        stopped, skipped_rows, collective = None, 0, True
        self._updating = False
        self.model.train()
        try:
            with _Stop() as stop:
                while True:
                    if cfg.max_steps is not None and self.step >= cfg.max_steps:
                        stopped = "max_steps"
                        break
                    t_step = time.perf_counter()
                    micro = [next(batches) for _ in range(cfg.grad_accum)]
                    ntok = sum(int((b["labels"] != -100).sum()) for b in micro if b["labels"] is not None)
                    skipped_rows += sum(len(b.get("errors") or ()) for b in micro)
                    elapsed = time.perf_counter() - t0
                    over = cfg.max_minutes is not None and elapsed + (step_time or 0.0) > cfg.max_minutes * 60
                    ctrl = dist.sum(torch.tensor([float(ntok), float(stop.requested),
                                                  elapsed if self.main else 0.0, float(over and self.main)],
                                                 dtype=torch.float64))
                    if ctrl[1] > 0:
                        stopped = "interrupted"
                        break
                    if ctrl[3] > 0:
                        stopped = "max_minutes"
                        break
                    elapsed, ntok_global = float(ctrl[2]), float(ctrl[0])
                    lr = lr_at(cfg, self.step, self.progress(self.step, elapsed))
                    loss_sum, grad_norm = self._update(wrapped, micro, params, lr, ntok_global)

                    dt = time.perf_counter() - t_step
                    step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
                    save_due = bool(cfg.save_every and self.step % cfg.save_every == 0)
                    late = bool(cfg.save_minutes and time.perf_counter() - last_save > cfg.save_minutes * 60)
                    post = dist.sum(torch.tensor([float(loss_sum), float(late and self.main)], dtype=torch.float64))
                    loss_global = float(post[0]) / max(ntok_global, 1.0)
                    save_due = save_due or bool(post[1] > 0)
                    window.add(loss_global, ntok_global, cfg.batch_size)
                    self._report(window, bar, lr, grad_norm, time.perf_counter() - t0, skipped_rows)
                    if save_due:
                        self.save(time.perf_counter() - t0, "periodic")
                        last_save = time.perf_counter()
                    info = {"loss": loss_global, "lr": lr, "grad_norm": float(grad_norm)}
                    for cb in self.callbacks:
                        try:
                            cb(self.step, info)
                        except KeyboardInterrupt:
                            stop.requested = True
        except KeyboardInterrupt as exc:
            if self._updating or isinstance(exc, _Abort):
                raise  # asked to abort, or stopped inside optimizer.step (half-updated: nothing consistent to save)
            stopped, collective = "interrupted", False  # this process alone: the others may be anywhere
        finally:
            bar.close()
        if self.last_loss is None and window.tokens:
            self.last_loss = window.mean()
        return self._finish(time.perf_counter() - t0, stopped, collective)

    def _announce(self) -> None:
        """Resume if asked, then say what is trained, where and how (stdout and the metrics log)."""
        cfg, dist, model = self.cfg, self.dist, self.model
        if self.resume_from is not None:
            state = restore_checkpoint(self.resume_from, model, self.optimizer, self.device, dist.rank)
            self.step, self.samples, self.elapsed0 = state["step"], state["samples"], state["elapsed_s"]
            _print(self.main, f"resumed from {self.resume_from} at step {self.step} ({self.samples:,} samples seen)")
        for rep in self.reports:
            _print(self.main, rep.summary())
        if self.main and self.reports:
            (self.out / "data_report.json").write_text(json.dumps([r.to_dict() for r in self.reports], indent=2) + "\n")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        _print(self.main, f"training {trainable:,} of {total:,} parameters on {dist.world} x {self.device} "
                          f"({self.precision}, {torch.get_num_threads()} threads); batch {cfg.batch_size} "
                          f"({dist.world} process{'es' if dist.world > 1 else ''} x {cfg.grad_accum} "
                          f"micro-batch{'es' if cfg.grad_accum > 1 else ''} of "
                          f"{cfg.batch_size // (dist.world * cfg.grad_accum)}); lr {cfg.lr} {cfg.schedule}, "
                          f"warm-up {cfg.warmup_steps}")
        self.log({"event": "resume" if self.resume_from else "start", "step": self.step, "world_size": dist.world,
                  "config": dataclasses.asdict(cfg), "trainable_params": trainable, "params": total})

    def _loader(self):
        """The model as the loop calls it (DDP-wrapped when distributed), and the micro-batch iterator."""
        cfg, dist = self.cfg, self.dist
        wrapped = self.model
        if dist.on:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        loader = torch.utils.data.DataLoader(
            _Micro(self.source, self.samples, cfg.batch_size, dist.world, dist.rank, cfg.grad_accum),
            batch_size=None, sampler=_Count(), num_workers=cfg.workers, persistent_workers=False,
            prefetch_factor=2 if cfg.workers else None, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global RNG (dropout) alone
        )
        return wrapped, iter(loader)

    def _update(self, wrapped, micro: list[dict], params: list, lr: float, ntok_global: float) -> tuple[Tensor, Tensor]:
        """One optimizer step over the micro-batches: (this process's loss sum, the global gradient norm)."""
        dist = self.dist
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, b in enumerate(micro):
            if b["labels"] is None:
                continue
            px = b["pixel_values"].to(self.device, non_blocking=True)
            labels = b["labels"].to(self.device, non_blocking=True)
            sync = nullcontext() if (not dist.on or i == len(micro) - 1) else wrapped.no_sync()
            with sync:
                with autocast_for(self.precision, self.device):
                    s = token_loss_sum(wrapped, px, labels)
                # DDP averages gradients over processes: scale so the result is the global token mean
                (s * (dist.world / max(ntok_global, 1.0))).backward()
            loss_sum += s.detach().double().cpu()
        # the global norm is logged either way; max_norm inf measures without clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
        self._updating = True
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples += self.cfg.batch_size
        self._updating = False
        return loss_sum, grad_norm

    def _report(self, window: "_Window", bar: Progress, lr: float, grad_norm: Tensor, elapsed: float,
                skipped_rows: int) -> None:
        """The metrics line every log_every steps, the progress bar every step, an evaluation when due."""
        cfg = self.cfg
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            rate = window.rate()
            self.last_loss = window.mean()
            row = {"step": self.step, "loss": self.last_loss, "lr": lr, "grad_norm": float(grad_norm),
                   "samples": self.samples, "samples_per_s": rate, "elapsed_s": elapsed}
            if skipped_rows:
                row["rows_failed_to_load"] = skipped_rows
            self.log(row)
            bar.update(self.step, elapsed, self.last_loss, lr, rate)
            window.reset()
        else:
            bar.update(self.step, elapsed, window.mean() if window.tokens else self.last_loss, lr, window.rate())
        if cfg.eval_every and self.step % cfg.eval_every == 0:
            self.last_eval = self.evaluate()
            if self.last_eval and self.main:
                bar.write(f"step {self.step} " + format_eval(self.last_eval))

    def _finish(self, elapsed: float, stopped: str, collective: bool) -> TrainResult:
        """The last checkpoint, the final evaluation and model, and the closing line."""
        cfg, dist = self.cfg, self.dist
        ckpt = self.save(elapsed, stopped, collective)
        self.log({"event": "stop", "step": self.step, "reason": stopped, "elapsed_s": elapsed})
        final = fresh = None
        if stopped != "interrupted":
            if cfg.eval_at_end and self.last_eval_step != self.step:
                self.last_eval = fresh = self.evaluate()
            if cfg.save_final and self.main:
                final = self.out / FINAL
                self.model.save_pretrained(final)
        if dist.on and collective:
            dist.dist.barrier()
        if self.main:
            msg = {"max_steps": f"reached max_steps {cfg.max_steps}", "max_minutes": f"spent max_minutes {cfg.max_minutes}",
                   "interrupted": "interrupted"}[stopped]
            print(f"stopped at step {self.step} ({msg}) after {_clock(elapsed)}; checkpoint: {ckpt}"
                  + (f"; model: {final}" if final else "") + ("; resume with --resume" if stopped == "interrupted" else ""),
                  flush=True)
            if fresh:
                print(format_eval(fresh), flush=True)
        return TrainResult(model=self.model, step=self.step, samples=self.samples, stopped=stopped, elapsed_s=elapsed,
                           loss=self.last_loss, eval=self.last_eval, out=self.out, checkpoint=ckpt, final=final)


class _Window:
    """Loss and throughput since the last metrics line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.tokens, self.samples, self.t = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, tokens: float, samples: int) -> None:
        self.loss += loss * tokens
        self.tokens += int(tokens)
        self.samples += samples

    def mean(self) -> float:
        return self.loss / max(self.tokens, 1)

    def rate(self) -> float:
        return self.samples / max(time.perf_counter() - self.t, 1e-9)


def format_eval(result: dict) -> str:
    parts = [f"eval: loss {result['loss']:.4f}, exact match {result['exact_match']:.1%} on {result['n']}"]
    for cat, r in result.get("by_category", {}).items():
        parts.append(f"{cat} {r['exact_match']:.1%} ({r['n']})")
    return parts[0] + (" — " + ", ".join(parts[1:]) if len(parts) > 1 else "")

"""The run folder and its resume checkpoint: ``OUT/checkpoint`` is a splice model folder (``splice.load`` reads
it) plus ``trainer_state.json`` (step, samples seen, time, RNG, config) and ``optimizer.safetensors``."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from splice.core.errors import CheckpointError, InputError, clip
from splice.train.config import TrainConfig, is_number

CHECKPOINT = "checkpoint"
FINAL = "model"
METRICS = "metrics.jsonl"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
STATE_VERSION = 1


def prepare_out(out: Path, cfg: TrainConfig, main: bool) -> Path | None:
    """The checkpoint to resume from (or None); refuses to mix a fresh run into an earlier run's folder."""
    ckpt = out / CHECKPOINT
    if cfg.resume:
        if (ckpt / STATE).is_file():
            return ckpt
        if main:
            print(f"resume: no checkpoint in {out}/ yet, starting from the beginning", flush=True)
        return None
    earlier = [p for p in (ckpt, out / METRICS) if p.exists()]
    if earlier and not cfg.overwrite:
        raise InputError(
            f"{out}/ holds an earlier run ({', '.join(p.name for p in earlier)})\n"
            "    fix: pass --resume to continue it, --overwrite to start again, or another --out"
        )
    if earlier and main:
        for p in earlier:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return None


def rng_state(device: torch.device) -> tuple[dict, dict[str, Tensor]]:
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
    rng_meta, mine = rng_state(device)
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
        raise CheckpointError(f"{folder / OPTIMIZER}: cannot be read ({type(exc).__name__}: {clip(str(exc), 200)})\n"
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
        if not all(is_number(state.get(k)) for k in ("step", "samples", "elapsed_s")):
            raise ValueError("step, samples or elapsed_s is not a number")
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{folder / STATE}: the optimizer or loop state does not fit this model and run "
            f"({type(exc).__name__}: {clip(str(exc), 200)})\n    fix: resume with the spec, freeze list and settings "
            "the run started with, or pass --overwrite to start again") from None
    return state


"""One optimizer step's parts: the loss, the optimizer and its parameter groups, the learning-rate schedule and
the precision."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from splice.core.errors import InputError
from splice.train.config import TrainConfig


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


def trained(model: nn.Module):
    """The model under a DistributedDataParallel wrapper: the ``ComposedModel`` whose training contract
    (``training_weight``, ``training_loss_sum``) the loop follows."""
    from splice.core.models import ComposedModel

    core = model.module if hasattr(model, "module") else model
    if not isinstance(core, ComposedModel):
        raise InputError(f"model: a {type(core).__name__} is not a splice model, so the trainer does not know its loss\n"
                         "    fix: train a model from splice.compose / splice.load, or subclass splice.kinds.ComposedModel")
    return core


def token_loss_sum(model: nn.Module, pixel_values: Tensor, labels: Tensor) -> Tensor:
    """The summed loss of one batch as the model's kind defines it (``ComposedModel.training_loss_sum``): for an
    encoder-decoder, the cross-entropy over the label tokens that are not -100 (the caller divides by the global
    count, ``training_weight``)."""
    return trained(model).training_loss_sum(model, {"pixel_values": pixel_values, "labels": labels})

"""The training loop: ``train`` checks the settings, then a ``_Run`` goes from the model and data to the result.

``_Run.run`` reads top to bottom: announce (resuming first if asked), build the loader, then one ``_step`` after
another until one says why to stop, then ``_finish`` (the last checkpoint, evaluation and model). Each step:
agree with the other processes whether to go on, update, agree on the loss and on a checkpoint, report.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from splice.core.errors import InputError, short
from splice.train.checkpoint import (CHECKPOINT, FINAL, METRICS, rng_state, prepare_out, restore_checkpoint,
                                     save_checkpoint)
from splice.train.config import TrainConfig, settings
from splice.train.distributed import Count, Dist, Micro, world_size
from splice.train.inputs import load_model, resolve_data
from splice.train.optim import autocast_for, lr_at, make_optimizer, resolve_precision, trained
from splice.train.progress import Progress, Window, clock
from splice.train.scoring import evaluate, format_eval
from splice.train.stopping import Abort, Stop


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
    cfg = settings(config, overrides)
    cfg.check(world_size())  # before anything is loaded, allocated or written
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = Dist(cfg.device)
    try:
        return _Run(cfg, dist, model, data, eval_data, callbacks).run()
    finally:
        dist.close()


def _print(on: bool, *args) -> None:
    if on:
        print(*args, flush=True)


class _Run:
    """One run: its settings, processes, model, data and optimizer, and where the loop stands."""

    def __init__(self, cfg: TrainConfig, dist: Dist, model: Any, data: Any, eval_data: Any, callbacks):
        self.cfg, self.dist, self.callbacks = cfg, dist, list(callbacks)
        self.main = dist.main
        self.out = Path(cfg.out)
        if self.main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(f"out: {short(str(self.out))} cannot be created ({type(exc).__name__}: "
                                 f"{exc.strerror})\n    fix: give a folder you can write to") from None
        self.resume_from = prepare_out(self.out, cfg, self.main)
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
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step, self.samples, self.elapsed0 = 0, 0, 0.0
        self.last_loss: float | None = None
        self.last_eval: dict | None = None
        self.last_eval_step: int | None = None
        self.step_time: float | None = None  # moving average of one step's seconds, for the time budget
        self.skipped_rows = 0
        self._updating = False  # inside optimizer.step: an interrupt there leaves nothing consistent to save

    # -- the loop, top to bottom --

    def run(self) -> TrainResult:
        cfg = self.cfg
        self._announce()
        wrapped, batches = self._loader()
        budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
        self.bar = Progress(cfg.progress and self.main, cfg.max_steps, budget_s)
        self.t0 = time.perf_counter() - self.elapsed0  # the run's clock counts the time before a resume
        self.last_save = time.perf_counter()
        self.window = Window()
        stopped, collective = None, True
        self.model.train()
        try:
            with Stop() as stop:
                while stopped is None:
                    stopped = self._step(wrapped, batches, stop)
        except KeyboardInterrupt as exc:
            if self._updating or isinstance(exc, Abort):
                raise  # asked to abort, or stopped inside optimizer.step (half-updated: nothing consistent to save)
            stopped, collective = "interrupted", False  # this process alone: the others may be anywhere
        finally:
            self.bar.close()
        if self.last_loss is None and self.window.tokens:
            self.last_loss = self.window.mean()
        return self._finish(self._elapsed(), stopped, collective)

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
            Micro(self.source, self.samples, cfg.batch_size, dist.world, dist.rank, cfg.grad_accum),
            batch_size=None, sampler=Count(), num_workers=cfg.workers, persistent_workers=False,
            prefetch_factor=2 if cfg.workers else None, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global RNG (dropout) alone
        )
        return wrapped, iter(loader)

    def _step(self, wrapped, batches, stop: Stop) -> str | None:
        """One optimizer step (None); or, before taking it, why the run stops: max_steps, interrupted, max_minutes."""
        cfg = self.cfg
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            return "max_steps"
        started = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        self.skipped_rows += sum(len(b.get("errors") or ()) for b in micro)
        stopped, elapsed, tokens = self._agree_to_go_on(micro, stop)
        if stopped:
            return stopped
        lr = lr_at(cfg, self.step, self.progress(self.step, elapsed))
        loss_sum, grad_norm = self._update(wrapped, micro, lr, tokens)
        took = time.perf_counter() - started
        self.step_time = took if self.step_time is None else 0.9 * self.step_time + 0.1 * took
        loss, save_due = self._agree_on_loss_and_save(loss_sum, tokens)
        self.window.add(loss, tokens, cfg.batch_size)
        self._report(lr, grad_norm)
        if save_due:
            self.save(self._elapsed(), "periodic")
            self.last_save = time.perf_counter()
        self._call_back({"loss": loss, "lr": lr, "grad_norm": float(grad_norm)}, stop)
        return None

    def _agree_to_go_on(self, micro: list[dict], stop: Stop) -> tuple[str | None, float, float]:
        """What every process agrees on before a step: whether to stop (a signal in any process, or rank 0's clock
        past the budget), rank 0's elapsed seconds, and the global weight of the step's loss (label tokens for a
        captioner: the model's ``training_weight``)."""
        cfg = self.cfg
        core = trained(self.model)
        tokens = sum(core.training_weight(b) for b in micro if b["labels"] is not None)
        elapsed = self._elapsed()
        over = cfg.max_minutes is not None and elapsed + (self.step_time or 0.0) > cfg.max_minutes * 60
        ctrl = self.dist.sum(torch.tensor([float(tokens), float(stop.requested), elapsed if self.main else 0.0,
                                           float(over and self.main)], dtype=torch.float64))
        stopped = "interrupted" if ctrl[1] > 0 else "max_minutes" if ctrl[3] > 0 else None
        return stopped, float(ctrl[2]), float(ctrl[0])

    def _update(self, wrapped, micro: list[dict], lr: float, ntok_global: float) -> tuple[Tensor, Tensor]:
        """One optimizer step over the micro-batches: (this process's loss sum, the global gradient norm)."""
        dist = self.dist
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, b in enumerate(micro):
            if b["labels"] is None:
                continue
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in b.items()}
            sync = nullcontext() if (not dist.on or i == len(micro) - 1) else wrapped.no_sync()
            with sync:
                with autocast_for(self.precision, self.device):
                    s = trained(wrapped).training_loss_sum(wrapped, batch)
                # DDP averages gradients over processes: scale so the result is the global mean
                (s * (dist.world / max(ntok_global, 1.0))).backward()
            loss_sum += s.detach().double().cpu()
        # the global norm is logged either way; max_norm inf measures without clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf"))
        self._updating = True
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples += self.cfg.batch_size
        self._updating = False
        return loss_sum, grad_norm

    def _agree_on_loss_and_save(self, loss_sum: Tensor, tokens: float) -> tuple[float, bool]:
        """The step's global mean loss, and whether a checkpoint is due (by steps, or by rank 0's clock)."""
        cfg = self.cfg
        due = bool(cfg.save_every and self.step % cfg.save_every == 0)
        late = bool(cfg.save_minutes and time.perf_counter() - self.last_save > cfg.save_minutes * 60)
        post = self.dist.sum(torch.tensor([float(loss_sum), float(late and self.main)], dtype=torch.float64))
        return float(post[0]) / max(tokens, 1.0), due or bool(post[1] > 0)

    def _report(self, lr: float, grad_norm: Tensor) -> None:
        """The metrics line every log_every steps, the progress bar every step, an evaluation when due."""
        cfg, window, bar, elapsed = self.cfg, self.window, self.bar, self._elapsed()
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            rate = window.rate()
            self.last_loss = window.mean()
            row = {"step": self.step, "loss": self.last_loss, "lr": lr, "grad_norm": float(grad_norm),
                   "samples": self.samples, "samples_per_s": rate, "elapsed_s": elapsed}
            if self.skipped_rows:
                row["rows_failed_to_load"] = self.skipped_rows
            self.log(row)
            bar.update(self.step, elapsed, self.last_loss, lr, rate)
            window.reset()
        else:
            bar.update(self.step, elapsed, window.mean() if window.tokens else self.last_loss, lr, window.rate())
        if cfg.eval_every and self.step % cfg.eval_every == 0:
            self.last_eval = self._evaluate()
            if self.last_eval and self.main:
                bar.write(f"step {self.step} " + format_eval(self.last_eval))

    def _call_back(self, info: dict, stop: Stop) -> None:
        """The callbacks; one that raises ``KeyboardInterrupt`` stops the run like Ctrl-C."""
        for cb in self.callbacks:
            try:
                cb(self.step, info)
            except KeyboardInterrupt:
                stop.requested = True

    def _finish(self, elapsed: float, stopped: str, collective: bool) -> TrainResult:
        """The last checkpoint, the final evaluation and model, and the closing line."""
        cfg, dist = self.cfg, self.dist
        ckpt = self.save(elapsed, stopped, collective)
        self.log({"event": "stop", "step": self.step, "reason": stopped, "elapsed_s": elapsed})
        final = fresh = None
        if stopped != "interrupted":
            if cfg.eval_at_end and self.last_eval_step != self.step:
                self.last_eval = fresh = self._evaluate()
            if cfg.save_final and self.main:
                final = self.out / FINAL
                self.model.save_pretrained(final)
        if dist.on and collective:
            dist.dist.barrier()
        if self.main:
            msg = {"max_steps": f"reached max_steps {cfg.max_steps}",
                   "max_minutes": f"spent max_minutes {cfg.max_minutes}", "interrupted": "interrupted"}[stopped]
            print(f"stopped at step {self.step} ({msg}) after {clock(elapsed)}; checkpoint: {ckpt}"
                  + (f"; model: {final}" if final else "")
                  + ("; resume with --resume" if stopped == "interrupted" else ""), flush=True)
            if fresh:
                print(format_eval(fresh), flush=True)
        return TrainResult(model=self.model, step=self.step, samples=self.samples, stopped=stopped, elapsed_s=elapsed,
                           loss=self.last_loss, eval=self.last_eval, out=self.out, checkpoint=ckpt, final=final)

    # -- bookkeeping --

    def _elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def progress(self, step: int, elapsed: float) -> float:
        """How far the run is, 0..1: by steps, by time, or the further of the two."""
        cfg = self.cfg
        parts = []
        if cfg.max_steps:
            parts.append(step / cfg.max_steps)
        if cfg.max_minutes:
            parts.append(elapsed / (cfg.max_minutes * 60))
        return max(parts) if parts else 0.0

    def log(self, row: dict) -> None:
        if self.main:
            with open(self.out / METRICS, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def save(self, elapsed: float, reason: str, collective: bool = True) -> Path | None:
        """Rank 0 writes; with ``collective`` every process must call it (their RNG states are gathered)."""
        _, mine = rng_state(self.device)
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
                 "config": dataclasses.asdict(self.cfg),
                 "data": self.source.describe() if hasattr(self.source, "describe") else "", "reason": reason}
        save_checkpoint(path, self.model, self.optimizer, state, self.device, rng)
        self.log({"event": "checkpoint", "step": self.step, "path": str(path), "reason": reason})
        return path

    def _evaluate(self) -> dict | None:
        if self.eval_source is None or not hasattr(self.eval_source, "eval_batches"):
            return None
        if not self.main:
            return None
        result = evaluate(self.model, self.eval_source, n=self.cfg.eval_size, batch_size=self.cfg.eval_batch_size,
                          precision=self.precision, examples=0)
        result.pop("examples", None)
        self.log({"event": "eval", "step": self.step, **result})
        self.last_eval_step = self.step
        return result

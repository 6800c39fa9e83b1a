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

The package, by module: ``config`` (``TrainConfig``: each setting's default, bound and ``splice train`` flag),
``loop`` (``train`` and the loop, top to bottom), ``optim`` (loss, optimizer, schedule, precision), ``inputs``
(the model and data to train on), ``scoring`` (evaluation), ``checkpoint`` (the run folder and resume),
``progress`` (the progress line), ``distributed`` (torchrun processes and their share of a batch), ``stopping``
(Ctrl-C and SIGTERM).
"""

from splice.train.checkpoint import (CHECKPOINT, FINAL, METRICS, OPTIMIZER, STATE, STATE_VERSION, read_checkpoint,
                                     restore_checkpoint, save_checkpoint)
from splice.train.config import MAX_BATCH, MAX_SEED, MAX_THREADS, MAX_WORKERS, TrainConfig
from splice.train.distributed import world_size
from splice.train.inputs import attach_shapes_tokenizer, load_model, resolve_data
from splice.train.loop import TrainResult, train
from splice.train.optim import autocast_for, lr_at, make_optimizer, param_groups, resolve_precision, token_loss_sum
from splice.train.progress import Progress
from splice.train.scoring import evaluate, format_eval

__all__ = [
    "CHECKPOINT", "FINAL", "MAX_BATCH", "MAX_SEED", "MAX_THREADS", "MAX_WORKERS", "METRICS", "OPTIMIZER", "STATE",
    "STATE_VERSION", "Progress", "TrainConfig", "TrainResult", "attach_shapes_tokenizer", "autocast_for", "evaluate",
    "format_eval", "load_model", "lr_at", "make_optimizer", "param_groups", "read_checkpoint", "resolve_data",
    "resolve_precision", "restore_checkpoint", "save_checkpoint", "token_loss_sum", "train", "world_size",
]

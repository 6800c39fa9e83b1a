"""Running ``splice`` under torchrun from a test: several CPU processes (gloo), one thread each."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun_cli(args: list[str], *, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m splice.cli ARGS``, output captured."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
         "splice.cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


def train_one_and_two(spec_file, tmp_path) -> tuple[subprocess.CompletedProcess, list[list[dict]], list[dict]]:
    """``splice train SPEC`` on shapes for 3 steps of a global batch of 8 in one process, then under torchrun
    with two: (the torchrun run, each run's logged step rows, each final model's state dict)."""
    import json

    import splice
    from splice.cli import main

    common = ["train", str(spec_file), "--data", "shapes", "--max-steps", "3", "--batch-size", "8", "--lr", "1e-3",
              "--warmup-steps", "1", "--log-every", "1", "--threads", "1", "--no-progress", "--eval-size", "8"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    two = torchrun_cli([*common, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    rows, states = [], []
    for run in ("one", "two"):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        rows.append([r for r in map(json.loads, lines) if "loss" in r and "event" not in r])
        states.append(splice.load(tmp_path / run / "model").state_dict())
    return two, rows, states

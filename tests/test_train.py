"""The training loop: exact resume, accumulation, freeze policies, time budget, Ctrl-C, several processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import splice
from splice.train import TrainConfig, lr_at, read_checkpoint, train

from multiprocess import train_one_and_two

# Tiny: trains a step in milliseconds. Dropout stays on (GPT-2's default 0.1) so resume must restore the RNG.
SPEC = {
    "encoder": {"name": "vit", "config": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
                                          "pos_embed_init": "sincos"}},
    "decoder": {"name": "gpt2", "config": {"vocab_size": 23, "n_positions": 12, "n_embd": 32, "n_layer": 1, "n_head": 2}},
    "cross_attention": {"kind": "standard", "layers": "all"},
    "tokens": {"decoder_start": 1, "pad": 0, "eos": 2},
}
# Without dropout, splitting a batch (accumulation, processes) changes nothing but float rounding.
NO_DROPOUT = {**SPEC, "decoder": {"name": "gpt2", "config": {**SPEC["decoder"]["config"], "resid_pdrop": 0.0,
                                                              "embd_pdrop": 0.0, "attn_pdrop": 0.0}}}
QUIET = dict(progress=False, eval_at_end=False, save_final=False, batch_size=8, lr=1e-3, warmup_steps=2, log_every=1,
             threads=1)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splice.cli", *args], capture_output=True, text=True, **kw)


def _steps(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r and "event" not in r]


def _stop_at(step: int):
    def cb(s, info):
        if s == step:
            raise KeyboardInterrupt

    return cb


def test_resume_continues_bit_for_bit(tmp_path):
    straight = train(SPEC, "shapes", TrainConfig(out=str(tmp_path / "a"), max_steps=6, grad_accum=2, **QUIET))
    first = train(SPEC, "shapes", TrainConfig(out=str(tmp_path / "b"), max_steps=6, grad_accum=2, **QUIET),
                  callbacks=[_stop_at(3)])
    assert first.stopped == "interrupted" and first.step == 3
    state, tensors = read_checkpoint(tmp_path / "b" / "checkpoint")
    assert state["step"] == 3 and state["samples"] == 24 and "rng.torch.0" in tensors
    resumed = train(SPEC, "shapes", TrainConfig(out=str(tmp_path / "b"), max_steps=6, grad_accum=2, resume=True, **QUIET))
    assert resumed.step == 6 and resumed.stopped == "max_steps"
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses_a = [r["loss"] for r in _steps(tmp_path / "a")]
    losses_b = [r["loss"] for r in _steps(tmp_path / "b")]
    assert losses_a == losses_b  # steps 1-3 before the stop, 4-6 after the resume
    events = [json.loads(l).get("event") for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert events.count("resume") == 1


def test_a_checkpoint_is_a_loadable_model(tmp_path):
    result = train(SPEC, "shapes", TrainConfig(out=str(tmp_path), max_steps=2, **{**QUIET, "save_final": True}))
    for folder in (result.checkpoint, result.final):
        loaded = splice.load(folder)
        assert loaded.tokenizer is not None and loaded.tokenizer.get_vocab()["[EOS]"] == 2
        for name, t in result.model.state_dict().items():
            assert torch.equal(t, loaded.state_dict()[name])


def test_accumulation_equals_one_big_batch(tmp_path):
    cfg = dict(QUIET, max_steps=3)
    cfg.pop("batch_size")
    one = train(NO_DROPOUT, "shapes", TrainConfig(out=str(tmp_path / "one"), batch_size=16, **cfg))
    acc = train(NO_DROPOUT, "shapes", TrainConfig(out=str(tmp_path / "acc"), batch_size=16, grad_accum=4, **cfg))
    la = [r["loss"] for r in _steps(tmp_path / "one")]
    lb = [r["loss"] for r in _steps(tmp_path / "acc")]
    assert la == pytest.approx(lb, abs=1e-5)
    for name, t in one.model.state_dict().items():
        assert torch.allclose(t, acc.model.state_dict()[name], atol=1e-4), name


LIT_SPEC = {**SPEC, "decoder": {"name": "gpt2", "config": {**SPEC["decoder"]["config"], "n_embd": 48, "n_head": 2}}}


@pytest.mark.parametrize("freeze", [["encoder"], ["decoder"], ["encoder", "decoder"]], ids=["encoder", "decoder", "lit"])
def test_freeze_policies(tmp_path, freeze):
    spec = {**LIT_SPEC, "freeze": freeze}  # widths differ: a projection exists
    before = {k: v.clone() for k, v in splice.compose(spec, seed=0).state_dict().items()}
    result = train(spec, "shapes", TrainConfig(out=str(tmp_path), max_steps=2, **QUIET))
    model = result.model
    assert model.enc_to_dec_proj is not None
    cross = {id(p) for m in model.cross_attention_modules for p in m.parameters()}
    names = dict(model.named_parameters())
    changed = {n for n, p in names.items() if not torch.equal(p.detach(), before[n])}

    def part(name: str) -> str:
        if name.startswith("enc_to_dec_proj."):
            return "projection"
        if id(names[name]) in cross:
            return "cross_attention"
        return name.split(".")[0]

    for name, p in names.items():
        frozen = part(name) in freeze or name == "encoder.model.pos_embed" and "encoder" in freeze
        assert p.requires_grad == (not frozen), name
        if frozen:
            assert name not in changed and p.grad is None, name
    assert {part(n) for n in changed} == {"encoder", "decoder", "cross_attention", "projection"} - set(freeze)
    if freeze == ["encoder", "decoder"]:  # LiT: only adapters and projection train
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapters = sum(p.numel() for m in model.cross_attention_modules for p in m.parameters())
        assert trainable == adapters + sum(p.numel() for p in model.enc_to_dec_proj.parameters())


def test_everything_frozen_is_an_error(tmp_path):
    spec = {**LIT_SPEC, "freeze": ["encoder", "decoder", "cross_attention", "projection"]}
    with pytest.raises(splice.InputError, match="every parameter is frozen"):
        train(spec, "shapes", TrainConfig(out=str(tmp_path), max_steps=1, **QUIET))


def test_time_budget_stops_the_run(tmp_path):
    t0 = time.perf_counter()
    result = train(SPEC, "shapes", TrainConfig(out=str(tmp_path), max_minutes=0.04, **QUIET))
    assert result.stopped == "max_minutes" and result.step > 0
    assert time.perf_counter() - t0 < 30
    assert result.elapsed_s <= 0.04 * 60 + 3.0  # stops before a step that would overrun (steps vary under load)
    last = _steps(tmp_path)[-1]
    assert last["lr"] < 1e-3 * 0.5  # the cosine follows the clock down


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 0.09) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.09)))
    assert lr_at(cfg, 50, 0.5) == pytest.approx(0.5)
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.0)
    assert lr_at(TrainConfig(lr=1.0, warmup_steps=0, schedule="constant", min_lr_ratio=0.1), 5, 0.9) == 1.0
    assert lr_at(TrainConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.1), 5, 1.0) == pytest.approx(0.1)


def test_an_earlier_run_is_not_overwritten_by_accident(tmp_path):
    train(SPEC, "shapes", TrainConfig(out=str(tmp_path), max_steps=1, **QUIET))
    with pytest.raises(splice.InputError, match="--resume"):
        train(SPEC, "shapes", TrainConfig(out=str(tmp_path), max_steps=1, **QUIET))
    again = train(SPEC, "shapes", TrainConfig(out=str(tmp_path), max_steps=1, overwrite=True, **QUIET))
    assert again.step == 1 and len(_steps(tmp_path)) == 1


def test_settings_are_checked(tmp_path):
    with pytest.raises(splice.InputError, match="max_steps or max_minutes"):
        train(SPEC, "shapes", TrainConfig(out=str(tmp_path), **QUIET))
    with pytest.raises(splice.InputError, match="multiple of 3"):
        train(SPEC, "shapes", TrainConfig(out=str(tmp_path), max_steps=1, grad_accum=3, **QUIET))


def test_periodic_eval_and_checkpoints_are_logged(tmp_path):
    result = train(SPEC, "shapes", TrainConfig(out=str(tmp_path), max_steps=4, eval_every=2, eval_size=20,
                                               save_every=2, **{**QUIET, "eval_at_end": True}))
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert set(evals[0]["by_category"]) <= {"single", "count", "relation"} and evals[0]["n"] == 20
    assert [r["step"] for r in rows if r.get("event") == "checkpoint"] == [2, 4, 4]
    assert result.eval == {k: v for k, v in evals[-1].items() if k not in ("event", "step")}
    step_rows = _steps(tmp_path)
    assert all({"loss", "lr", "grad_norm", "samples_per_s", "elapsed_s"} <= r.keys() for r in step_rows)


@pytest.fixture
def spec_file(tmp_path) -> Path:
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(NO_DROPOUT))
    return path


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, spec_file, capsys):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "splice.cli", "train", str(spec_file), "--data", "shapes", "--out", str(out),
         "--max-steps", "100000", "--batch-size", "4", "--log-every", "1", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / "metrics.jsonl").is_file() and len(_steps(out)) >= 3:
                break
            if proc.poll() is not None:
                pytest.fail(f"training ended early: {proc.communicate()}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "SIGINT" in stderr and "resume with --resume" in stdout
    state, _ = read_checkpoint(out / "checkpoint")
    step = state["step"]
    assert step >= 3 and state["reason"] == "interrupted"
    assert max(r["step"] for r in _steps(out)) == step
    from splice.cli import main

    capsys.readouterr()
    assert main(["train", str(spec_file), "--data", "shapes", "--out", str(out), "--resume", "--max-steps",
                 str(step + 2), "--batch-size", "4", "--log-every", "1", "--threads", "1", "--no-progress"]) == 0
    assert f"resumed from {out / 'checkpoint'} at step {step}" in capsys.readouterr().out
    assert read_checkpoint(out / "checkpoint")[0]["step"] == step + 2


def test_two_processes_match_one(tmp_path, spec_file):
    """torchrun with 2 CPU processes (gloo) vs 1 process, same global batch: the same losses."""
    two, (rows_one, rows_two), (a, b) = train_one_and_two(spec_file, tmp_path)
    assert "2 x cpu" in two.stdout and two.stdout.count("stopped at step 3") == 1  # rank 0 alone reports
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    assert [r["loss"] for r in rows_two] == pytest.approx([r["loss"] for r in rows_one], abs=1e-5)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_train_cli_on_an_imagefolder_reports_bad_rows(tmp_path, spec_file, capsys):
    from splice import synthetic

    data = synthetic.write_imagefolder(tmp_path / "data", 24, image_size=32)
    with open(data / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps({"file_name": "gone.png", "text": "a red circle"}) + "\n")
        fh.write(json.dumps({"file_name": "000000.png", "text": ""}) + "\n")
    tok = tmp_path / "tokenizer.json"
    tok.write_text(synthetic.build_tokenizer().to_str())
    out = tmp_path / "run"
    from splice.cli import main

    assert main(["train", str(spec_file), "--data", str(data), "--tokenizer", str(tok), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--threads", "1", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "missing file: 1" in stdout and "empty text: 1" in stdout
    report = json.loads((out / "data_report.json").read_text())
    assert report[0]["by_reason"] == {"missing file": 1, "empty text": 1} and report[0]["used"] == 24
    assert "exact match" in stdout  # evaluated on the held-out row
    assert splice.load(out / "model").tokenizer is not None


def test_modules_stay_fsdp_wrappable():
    """FSDP2 (fully_shard) over the blocks and the root: forward, backward and generate run (1 CPU process)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = splice.compose(SPEC, seed=0)
        for block in [*model.encoder.model.blocks, *model.decoder.h]:
            fully_shard(block)
        fully_shard(model)
        register_fsdp_forward_method(model, "generate")
        out = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([[4, 6, 12, 2], [5, 7, 16, 2]]))
        out.loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert model.generate(torch.randn(2, 3, 32, 32), max_new_tokens=3).shape == (2, 4)
    finally:
        dist.destroy_process_group()

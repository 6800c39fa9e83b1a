"""The `splice` command, called in-process through its main()."""

from __future__ import annotations

import json
from pathlib import Path


import splice
from splice.cli import main

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_list_and_json(capsys):
    assert main(["list", "--kind", "encoder"]) == 0
    out = capsys.readouterr().out
    assert "vit" in out and "swin" in out and "gpt2" not in out
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    kinds = {c["kind"] for c in data["components"]}
    assert {"encoder", "decoder", "adapter", "projection", "preset"} <= kinds


def test_describe(capsys):
    assert main(["describe", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "n_embd" in out and "tiny" in out and "cross-attention" in out
    assert main(["describe", "vit-gpt2-tiny"]) == 0
    assert "projection linear" in capsys.readouterr().out
    assert main(["describe", "gtp2"]) == 1
    assert "did you mean 'gpt2'" in capsys.readouterr().err


def test_validate_exit_codes(tmp_path, capsys):
    assert main(["validate", str(EXAMPLES / "vit-gpt2-tiny.yaml")]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoder: {name: vitt}\ndecoder: {name: gpt2, config: {n_layers: 2}}\nprojection: none\n")
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "encoder.name" in out and "did you mean 'vit'" in out
    assert "decoder.config.n_layers" in out and "did you mean 'n_layer'" in out
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text("encoder: [unclosed\n")
    assert main(["validate", str(broken)]) == 1
    assert "cannot parse" in capsys.readouterr().out


def test_build_then_load(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["build", str(EXAMPLES / "vit-gpt2-tiny.yaml"), "--out", str(out), "--seed", "3"]) == 0
    assert (out / "splice.json").is_file() and (out / "model.safetensors").is_file()
    model = splice.load(out)
    again = splice.compose(str(EXAMPLES / "vit-gpt2-tiny.yaml"), seed=3)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "CompositionSpec"
    assert {"encoder", "decoder", "cross_attention", "projection", "tokens", "freeze"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_train_flags_are_the_training_config(capsys):
    """`splice train`'s setting flags are generated from TrainConfig: each is a field, with its help and type."""
    import pytest

    from splice.cli import _parser
    from splice.train import TrainConfig

    settings = ["max_steps", "max_minutes", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps",
                "schedule", "weight_decay", "grad_clip", "precision", "eval_every", "eval_size", "save_every",
                "save_minutes", "log_every", "seed", "threads", "device", "workers"]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name in settings + ["out", "resume", "overwrite"]:
        assert "--" + name.replace("_", "-") in text
    args = _parser().parse_args(["train", "m", "--data", "shapes", "--out", "o", "--lr", "0.5", "--seed", "3",
                                 "--schedule", "linear", "--device", "cpu"])
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    assert given == {"out": "o", "lr": 0.5, "seed": 3, "schedule": "linear", "device": "cpu", "resume": False,
                     "overwrite": False}
    assert all(getattr(args, name) is None for name in settings if name not in given)

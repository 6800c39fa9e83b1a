"""Save -> load is bit-exact for every registered component's tiny variant; bad files give CheckpointError."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import splice
from splice.core.plugins import get_registry

registry = get_registry()


def _tiny(kind: str, name: str) -> dict:
    return {"name": name, "config": dict(registry.get(kind, name).tiny or {})}


def tiny_specs():
    """Every encoder with the first decoder, every decoder with the first encoder, every adapter kind, and
    every tiny composition preset: a new plugin is covered without editing this test."""
    encoders, decoders = registry.names("encoder"), registry.names("decoder")
    specs = {}
    for enc in encoders:
        specs[f"{enc}+{decoders[0]}"] = {"encoder": _tiny("encoder", enc), "decoder": _tiny("decoder", decoders[0])}
    for dec in decoders:
        specs[f"{encoders[0]}+{dec}"] = {"encoder": _tiny("encoder", encoders[0]), "decoder": _tiny("decoder", dec)}
    for kind in registry.names("adapter"):
        specs[f"adapter-{kind}"] = {"encoder": _tiny("encoder", "vit"), "decoder": _tiny("decoder", "gpt2"),
                                    "cross_attention": {"kind": kind, "layers": "every-2"}}
    for name in registry.compositions:
        if "tiny" in name:
            specs[name] = name
    return specs


SPECS = tiny_specs()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip_is_bit_exact(name, tmp_path):
    model = splice.compose(SPECS[name], seed=0).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = splice.load(tmp_path / "m")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not loaded.loading_report.missing and not loaded.loading_report.unexpected
    size = model.encoder.preprocessing.image_size
    px = torch.randn(1, model.encoder.preprocessing.in_chans, *size)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        a = model(pixel_values=px, decoder_input_ids=ids).logits
        b = loaded(pixel_values=px, decoder_input_ids=ids).logits
    # the weights are bit-identical; BLAS may still sum in another order for memory-mapped (differently
    # aligned) tensors, so outputs agree to float rounding rather than bit for bit
    assert (a - b).abs().max().item() <= 1e-6


def _metadata(folder) -> dict:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.metadata()


def _rerecord(folder) -> None:
    """Record the folder's files anew in splice.json, as a save would have."""
    from splice.core.files import describe_files

    config = json.loads((folder / "splice.json").read_text())
    config["files"] = {k: v for k, v in describe_files(folder).items() if k != "splice.json"}
    (folder / "splice.json").write_text(json.dumps(config))


@pytest.fixture
def saved(tmp_path):
    model = splice.compose("vit-gpt2-tiny", seed=0)
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def test_truncated_file(saved):
    _, folder = saved
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(splice.CheckpointError, match="(?s)model.safetensors.*truncated or corrupted"):
        splice.load(folder)


def test_garbage_header(saved):
    _, folder = saved
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(splice.CheckpointError, match="model.safetensors"):
        splice.load(folder)


def test_config_disagrees_with_weights(saved):
    _, folder = saved
    cfg = json.loads((folder / "splice.json").read_text())
    cfg["spec"]["decoder"]["config"]["n_embd"] = 64
    (folder / "splice.json").write_text(json.dumps(cfg))
    with pytest.raises(splice.CheckpointError) as e:
        splice.load(folder)
    assert "decoder.wte.weight" in str(e.value) and "(99, 32)" in str(e.value) and "(99, 64)" in str(e.value)


def test_missing_tensor_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = saved
    tensors = load_file(folder / "model.safetensors")
    del tensors["decoder.ln_f.weight"]
    save_file(tensors, folder / "model.safetensors", metadata=_metadata(folder))
    _rerecord(folder)  # as if saved that way: the checksums match, the tensor is still missing
    with pytest.raises(splice.CheckpointError, match="missing.*decoder.ln_f.weight"):
        splice.load(folder)
    model = splice.load(folder, strict=False)
    assert model.loading_report.initialised == ["decoder.ln_f.weight"]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(splice.CheckpointError, match="neither splice.json"):
        splice.load(tmp_path)
    with pytest.raises(splice.CheckpointError, match="no such folder"):
        splice.load(tmp_path / "nope" / "deeper")


def test_save_replaces_atomically(saved):
    model, folder = saved
    model.decoder.ln_f.bias.data += 1
    model.save_pretrained(folder)  # over an existing checkpoint
    assert torch.equal(splice.load(folder).decoder.ln_f.bias, model.decoder.ln_f.bias)
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".")) == []


def test_killed_mid_save_leaves_previous_checkpoint(saved):
    """A process killed while writing leaves the old folder whole (the new one is only a temp folder)."""
    model, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code = textwrap.dedent(f"""
        import os, signal, safetensors.torch, splice
        real = safetensors.torch.save_file
        def dying(tensors, filename, metadata=None):
            real(dict(list(tensors.items())[:3]), filename, metadata=metadata)  # part of the file is on disk
            os.kill(os.getpid(), signal.SIGKILL)
        safetensors.torch.save_file = dying
        m = splice.compose("vit-gpt2-tiny", seed=1)
        m.save_pretrained({str(folder)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    loaded = splice.load(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_export_refuses_what_transformers_cannot_express(tmp_path):
    spec = {"encoder": {"name": "vit", "config": registry.get("encoder", "vit").tiny},
            "decoder": {"name": "gpt2", "config": registry.get("decoder", "gpt2").tiny},
            "cross_attention": {"kind": "gated", "layers": "every-2"}, "projection": "mlp"}
    with pytest.raises(splice.CheckpointError) as e:
        splice.export_transformers(splice.compose(spec), tmp_path / "x")
    assert "gated" in str(e.value) and "mlp" in str(e.value) and "save_pretrained" in str(e.value)
    assert not (tmp_path / "x").exists()


def test_load_in_bf16(saved):
    model, folder = saved
    low = splice.load(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    out = low(pixel_values=torch.randn(1, 3, 32, 32, dtype=torch.bfloat16), decoder_input_ids=torch.zeros(1, 2, dtype=torch.long))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_missing_shard_is_named(tmp_path):
    """A sharded transformers folder whose index names a shard that is not there."""
    from safetensors.torch import load_file, save_file

    from splice.core.checkpoint import lazy_weights

    model = splice.compose("vit-gpt2-tiny", seed=0)
    model.save_pretrained(tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, tmp_path / "m" / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names[:half]}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in names[half:]})
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(splice.CheckpointError, match="model-00002-of-00002.safetensors are missing"):
        lazy_weights(tmp_path / "m")


def test_truncated_tensor_is_named(saved):
    from splice.core.checkpoint import read_header

    _, folder = saved
    f = folder / "model.safetensors"
    header, start = read_header(f)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(splice.CheckpointError, match=f"tensor '{last}' ends at byte"):
        read_header(f)  # what a folder without a size record (splice 0.1, transformers) reports
    with pytest.raises(splice.CheckpointError, match="truncated or corrupted"):
        splice.load(folder)


def test_generation_defaults_travel_with_the_model(tmp_path):
    model = splice.compose("vit-gpt2-tiny", seed=0)
    model.generation_defaults.update(max_length=5, num_beams=2)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "generation.json").read_text()) == {"max_length": 5, "num_beams": 2}
    loaded = splice.load(tmp_path / "m")
    assert loaded.generate(torch.randn(1, 3, 32, 32), eos_token_id=[]).shape == (1, 5)


@pytest.mark.slow
def test_lazy_tensors_read_a_tensor_over_2_gib(tmp_path):
    """One unbuffered read stops near 2 GiB on Linux: the reader loops until the tensor is complete."""
    from splice.core.checkpoint import LazyTensors

    n = (2 << 30) + 4096  # bytes, just over what a single read returns
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.seek(8 + len(header) + n - 1)
        f.write(b"\x07")  # sparse: zeros, then one marker byte at the very end
    t = LazyTensors([path])["w"]
    assert t.numel() == n and int(t[-1]) == 7

"""transformers VisionEncoderDecoder folders in every on-disk form: .bin (read with weights_only=True),
sharded safetensors, a hub repo id from the local cache (offline), generation_config.json."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import splice

transformers = pytest.importorskip("transformers")

from oracle import tiny_ved  # noqa: E402


@pytest.fixture(scope="module")
def hf_model():
    return tiny_ved()


def _same(hf, ours):
    px = torch.randn(2, 3, 32, 32)
    ids = torch.randint(0, 98, (2, 5))
    with torch.no_grad():
        return (hf(pixel_values=px, decoder_input_ids=ids).logits - ours(pixel_values=px, decoder_input_ids=ids).logits).abs().max().item() <= 1e-4


def test_sharded(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert _same(hf_model, splice.load(tmp_path))


def test_pytorch_bin_with_weights_only(hf_model, tmp_path):
    """A 4.x-style pytorch_model.bin (written here with torch.save of the state dict, tied lm_head included)."""
    hf_model.config.save_pretrained(tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    ours = splice.load(tmp_path)
    assert _same(hf_model, ours)
    # a pickle that is not plain tensors is refused, never executed
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(splice.CheckpointError, match="cannot read it safely"):
        splice.load(tmp_path)


def test_hub_repo_id_from_cache(hf_model, tmp_path, monkeypatch):
    folder = tmp_path / "src"
    hf_model.save_pretrained(folder)
    json.loads((folder / "generation_config.json").read_text())
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "hub" / "models--someone--tiny-captioner"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    ours = splice.load("someone/tiny-captioner")
    assert _same(hf_model, ours)
    assert ours.generation_defaults.get("decoder_start_token_id") == 98 or ours.tokens["decoder_start"] == 98
    with pytest.raises(splice.CheckpointError, match="someone/absent"):
        splice.load("someone/absent")


def test_generation_config_is_honoured(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    gen["max_length"] = 6
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    ours = splice.load(tmp_path)
    out = ours.generate(torch.randn(1, 3, 32, 32), eos_token_id=[])
    assert out.shape == (1, 6)

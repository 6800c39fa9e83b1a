"""Warm start: pretrained encoder + pretrained decoder from folders written by transformers and timm (and
through huggingface_hub's cache, offline), new cross-attention initialised, a loading report by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import splice

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from oracle import perturb  # noqa: E402


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    gpt2 = perturb(transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4)))
    gpt2.save_pretrained(root / "gpt2")
    vit = perturb(transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)))
    vit.save_pretrained(root / "vit")
    t = perturb(timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10))
    (root / "timm").mkdir()
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, root / "timm" / "model.safetensors")
    (root / "timm" / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224", "num_classes": 10}))
    return root, gpt2, vit, t


def _spec(enc_pretrained, dec_pretrained, enc_config=None):
    return {
        "encoder": {"name": "vit", "pretrained": enc_pretrained,
                    "config": enc_config or {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}},
        "decoder": {"name": "gpt2", "pretrained": dec_pretrained},
        "tokens": {"decoder_start": 98, "pad": 0, "eos": 98},
    }


def test_transformers_folders(parts):
    root, gpt2, vit, _ = parts
    model = splice.compose(_spec(str(root / "vit"), str(root / "gpt2"), enc_config={}), seed=0).eval()
    # the decoder's config came from the checkpoint's config.json
    assert model.decoder.hidden_size == 32 and model.decoder.vocab_size == 99
    report = model.loading_report
    assert not report.missing
    assert set(report.initialised) == {n for n in model.state_dict() if "crossattention" in n or n.startswith("enc_to_dec_proj")}
    assert any("pooler" in n for n in report.unused)
    px = torch.randn(2, 3, 32, 32)
    ids = torch.randint(0, 98, (2, 5))
    with torch.no_grad():
        assert (model.encoder(px).last_hidden_state - vit(pixel_values=px).last_hidden_state).abs().max() <= 1e-4
        assert (model.decoder(ids).logits - gpt2(input_ids=ids).logits).abs().max() <= 1e-4
    with pytest.raises(splice.CheckpointError, match="unused"):
        splice.compose(_spec(str(root / "vit"), str(root / "gpt2"), enc_config={}), strict=True)


def test_timm_layout_and_single_file(parts):
    root, gpt2, _, t = parts
    model = splice.compose(_spec(str(root / "timm"), str(root / "gpt2" / "model.safetensors")), seed=0).eval()
    assert {"encoder.head.weight", "encoder.head.bias"} <= set(model.loading_report.unused)
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (model.encoder(px).last_hidden_state - t.forward_features(px)).abs().max() <= 1e-5
        assert (model.decoder(torch.tensor([[1, 2, 3]])).logits - gpt2(input_ids=torch.tensor([[1, 2, 3]])).logits).abs().max() <= 1e-4


def test_hub_cache_offline(parts, tmp_path, monkeypatch):
    """A repo id resolved from huggingface_hub's cache layout with HF_HUB_OFFLINE=1 (no network here)."""
    root, gpt2, _, _ = parts
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--someone--tiny-gpt2" / "snapshots" / commit
    shutil.copytree(root / "gpt2", snap)
    (cache / "models--someone--tiny-gpt2" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-gpt2" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    model = splice.compose(_spec(False, "someone/tiny-gpt2"), seed=0).eval()
    with torch.no_grad():
        assert (model.decoder(torch.tensor([[5, 6]])).logits - gpt2(input_ids=torch.tensor([[5, 6]])).logits).abs().max() <= 1e-4
    plan = splice.validate(_spec(False, "someone/not-cached"))
    assert [p.path for p in plan.problems] == [] or any("decoder.pretrained" == p.path for p in plan.problems)
    with pytest.raises(splice.SpliceError, match="not in the local cache"):
        splice.compose(_spec(False, "someone/not-cached"))


def test_bad_sources(parts, tmp_path):
    root, *_ = parts
    plan = splice.validate(_spec(False, str(tmp_path / "nowhere")))
    assert any(p.path == "decoder.pretrained" for p in plan.problems)
    with pytest.raises(splice.CheckpointError, match="none of its"):
        splice.compose(_spec(str(root / "gpt2"), False))  # GPT-2 weights offered to a ViT


def test_bart_model_file_fills_embeddings_from_shared(tmp_path):
    """A BartModel (hub facebook/bart-*) folder: shared.weight fills the decoder embedding and the tied head,
    which transformers' BartForCausalLM.from_pretrained leaves random; the report says so."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40)
    bart = perturb(transformers.BartModel(cfg))
    bart.save_pretrained(tmp_path / "bart")
    spec = {"encoder": {"name": "vit", "config": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3}},
            "decoder": {"name": "bart", "pretrained": str(tmp_path / "bart")}, "tokens": {"decoder_start": 2, "pad": 1, "eos": 2}}
    model = splice.compose(spec, seed=0)
    assert torch.equal(model.decoder.embed_tokens.weight, bart.shared.weight)
    assert any("shared.weight" in n and "random" in n for n in model.loading_report.notes)
    assert any(n.startswith("decoder.encoder.") for n in model.loading_report.unused)
    assert "note:" in str(model.loading_report)

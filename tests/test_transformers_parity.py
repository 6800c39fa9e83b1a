"""splice.load on folders written by transformers' VisionEncoderDecoderModel: same logits, same loss, same
greedy tokens."""

from __future__ import annotations

import pytest
import torch

import splice

transformers = pytest.importorskip("transformers")

from oracle import tiny_ved  # noqa: E402


def _ved(tmp_path, enc_width, dec_width, *, seed=0):
    model = tiny_ved(enc_width=enc_width, dec_width=dec_width, vocab=101, n_positions=40, tokens=(100, 0, 100),
                     seed=seed, bos_token_id=100, eos_token_id=100)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("enc_width,dec_width", [(48, 48), (48, 32)], ids=["same-width", "projection"])
def test_ved_vit_gpt2_parity(tmp_path, enc_width, dec_width):
    hf = _ved(tmp_path, enc_width, dec_width)
    ours = splice.load(tmp_path)
    assert (ours.enc_to_dec_proj is not None) == (enc_width != dec_width)
    report = ours.loading_report
    assert not report.missing and not report.unexpected
    assert any("pooler" in n for n in report.unused)  # ViTModel's pooler has no place in a captioner

    g = torch.Generator().manual_seed(1)
    px = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(0, 100, (3, 7), generator=g)
    labels = ids.clone()
    labels[0, 5:] = -100
    with torch.no_grad():
        a = hf(pixel_values=px, decoder_input_ids=ids)
        b = ours(pixel_values=px, decoder_input_ids=ids)
        assert (a.logits - b.logits).abs().max().item() <= 1e-4
        a = hf(pixel_values=px, labels=labels)
        b = ours(pixel_values=px, labels=labels)
        assert (a.logits - b.logits).abs().max().item() <= 1e-4
        assert abs(a.loss.item() - b.loss.item()) <= 1e-5
        assert (a.encoder_last_hidden_state - b.encoder_last_hidden_state).abs().max().item() <= 1e-4


def test_ved_greedy_matches_transformers(tmp_path):
    hf = _ved(tmp_path, 48, 32, seed=3)
    ours = splice.load(tmp_path)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.generate(pixel_values=px, max_new_tokens=8, do_sample=False, num_beams=1)
    got = ours.generate(px, max_new_tokens=8)
    assert got.tolist() == want.tolist()


def test_src_never_imports_transformers(tmp_path):
    import subprocess
    import sys

    _ved(tmp_path, 48, 32)
    code = (
        "import sys, torch, splice\n"
        f"m = splice.load({str(tmp_path)!r})\n"
        "m(pixel_values=torch.randn(1, 3, 32, 32), decoder_input_ids=torch.zeros(1, 2, dtype=torch.long))\n"
        "import splice.cli\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout

"""splice vs transformers on the same weights, in one process, interleaved: decoding, encoder, training step.

    .venv/bin/python bench/generate.py [--runs 5] [--tokens 32] [--threads 2] [--only NAME ...]

The base pair is ViT-B/16 (224) + GPT-2 small with cross-attention in every layer, random weights, fp32; the
tiny pair is width 128 with 2+2 layers (pure framework overhead). transformers builds the pair and saves it;
splice loads that folder, so both run the same weights. Each case alternates transformers and splice runs and
reports medians. Decoding reuses precomputed encoder outputs, so ms/token is the decoder alone. Both libraries
keep the end-of-sequence token and get ``min_new_tokens=--tokens``, so every run decodes exactly --tokens tokens
and pays for the same processors and end-of-sequence bookkeeping a real caption does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_pair(folder: Path, *, tiny: bool):
    import transformers

    torch.manual_seed(0)
    if tiny:
        enc = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=512)
        dec = transformers.GPT2Config(vocab_size=1000, n_positions=128, n_embd=128, n_layer=2, n_head=4,
                                      add_cross_attention=True, is_decoder=True)
    else:
        enc = transformers.ViTConfig()
        dec = transformers.GPT2Config(add_cross_attention=True, is_decoder=True)
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = cfg.pad_token_id = cfg.eos_token_id = dec.vocab_size - 1
    hf = transformers.VisionEncoderDecoderModel(config=cfg).eval()
    hf.save_pretrained(folder)
    import splice

    ours = splice.load(folder).eval()
    return hf, ours, enc.image_size, dec.vocab_size


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(name, hf_fn, ours_fn, runs, per=1.0, unit="ms"):
    hf_fn(), ours_fn()  # warm up both
    a, b = [], []
    for _ in range(runs):
        a.append(timed(hf_fn) / per * 1000)
        b.append(timed(ours_fn) / per * 1000)
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"| {name} | {ma:.2f} {unit} | {mb:.2f} {unit} | {ma / mb:.2f}× |", flush=True)
    return ma, mb


def decode_cases(hf, ours, size, vocab, runs, tokens, tiny, repeat=1):
    from transformers.modeling_outputs import BaseModelOutput

    label = "tiny pair" if tiny else "base pair"
    cases = [(1, 1, "greedy, batch 1, ms/token"), (8, 1, "greedy, batch 8, ms/step"), (1, 4, "beam 4, batch 1, ms/step")]
    if tiny:
        cases = cases[:1]
    for batch, beams, what in cases:
        px = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            enc_hf = hf.encoder(pixel_values=px).last_hidden_state
            enc_ours = ours.encode(px)
        kw = dict(max_new_tokens=tokens, num_beams=beams)

        def run_hf():
            for _ in range(repeat):
                with torch.inference_mode():
                    out = hf.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc_hf), do_sample=False,
                                      min_new_tokens=tokens, early_stopping=False, **kw)
                assert out.shape[1] == tokens + 1, out.shape

        def run_ours():
            for _ in range(repeat):
                out = ours.generate(encoder_outputs=enc_ours, min_new_tokens=tokens, early_stopping=False, **kw)
                assert out.shape[1] == tokens + 1, out.shape

        compare(f"{label}: {what}", run_hf, run_ours, runs, per=tokens * repeat)


def forward_cases(hf, ours, size, vocab, runs):
    px1 = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        compare("encoder forward, batch 1", lambda: hf.encoder(pixel_values=px1), lambda: ours.encode(px1), runs)
    px = torch.randn(8, 3, size, size)
    labels = torch.randint(0, vocab - 1, (8, 32))
    with torch.inference_mode():
        compare("teacher-forced forward + loss, batch 8 × 32", lambda: hf(pixel_values=px, labels=labels),
                lambda: ours(pixel_values=px, labels=labels), runs)

    def step_fn(model):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step():
            out = model(pixel_values=px, labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    compare("training step (fused AdamW), batch 8 × 32", step_fn(hf), step_fn(ours), max(3, runs // 2))
    hf.eval(), ours.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=["tiny", "decode", "forward"], choices=["tiny", "decode", "forward"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"{args.runs} runs, medians\n")
    print("| case | transformers | splice | speed-up |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        if "tiny" in args.only:
            hf, ours, size, vocab = build_pair(Path(tmp) / "tiny", tiny=True)
            decode_cases(hf, ours, size, vocab, args.runs * 2, args.tokens, tiny=True, repeat=10)
            del hf, ours
        if "decode" in args.only or "forward" in args.only:
            hf, ours, size, vocab = build_pair(Path(tmp) / "base", tiny=False)
            if "decode" in args.only:
                decode_cases(hf, ours, size, vocab, args.runs, args.tokens, tiny=False)
            if "forward" in args.only:
                forward_cases(hf, ours, size, vocab, args.runs)


if __name__ == "__main__":
    main()

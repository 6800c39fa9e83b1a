"""Loading the base pair (ViT-B/16 + GPT-2 small with cross-attention): peak memory and time, splice vs
transformers, each load in a fresh process.

    .venv/bin/python bench/load.py [--runs 3] [--workdir /tmp/splice-bench-load]

Peak RSS is measured from the post-import baseline (the kernel's high-water mark is reset with
/proc/self/clear_refs after imports) to after every weight has been read once (so memory-mapped weights count as
they will in use), and reported as a multiple of the parameter bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

PROBE = textwrap.dedent("""
    import json, os, sys, time, torch
    torch.set_num_threads(2)
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    kind, folder = sys.argv[1], sys.argv[2]
    if kind == "transformers":
        import transformers
        transformers.logging.set_verbosity_error()
        load = lambda: transformers.VisionEncoderDecoderModel.from_pretrained(folder)
    else:
        import splice, splice.core.checkpoint, splice.plugins.timm_vision, splice.plugins.gpt2, timm
        splice.validate("vit-gpt2-tiny")  # plugins loaded: part of the import baseline
        verify = kind != "splice-noverify"  # the SHA-256 check of a splice folder's files, on by default
        load = lambda: splice.load(folder, verify=verify)
    import gc; gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
    base = rss("VmRSS:")
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    # read every weight once, so memory-mapped tensors count as resident as they would in use
    with torch.no_grad():
        total = sum(float(p.float().sum()) for p in model.parameters())
    peak = rss("VmHWM:")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak_over_base": peak - base, "param_bytes": params}))
""")


def make_checkpoints(workdir: Path) -> tuple[Path, Path]:
    ved, native = workdir / "ved", workdir / "splice"
    if ved.is_dir() and native.is_dir() and '"files"' in (native / "splice.json").read_text():
        return ved, native  # (a splice folder saved before checksums is made again)
    shutil.rmtree(native, ignore_errors=True)
    code = textwrap.dedent(f"""
        import torch, transformers, splice
        torch.manual_seed(0)
        enc = transformers.ViTConfig()  # ViT-B/16, 224
        dec = transformers.GPT2Config(add_cross_attention=True, is_decoder=True)  # GPT-2 small
        cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        cfg.decoder_start_token_id = cfg.pad_token_id = cfg.eos_token_id = 50256
        transformers.VisionEncoderDecoderModel(config=cfg).save_pretrained({str(ved)!r})
        splice.load({str(ved)!r}).save_pretrained({str(native)!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    return ved, native


def probe(kind: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, kind, str(folder)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/splice-bench-load")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ved, native = make_checkpoints(workdir)
    cases = [("transformers", "transformers", ved), ("splice: splice folder", "splice", native),
             ("splice: splice folder, verify=False", "splice-noverify", native),
             ("splice: transformers folder", "splice", ved)]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in cases}
    for _ in range(args.runs):  # interleaved
        for name, kind, folder in cases:
            results[name].append(probe(kind, folder))
    print(f"| load (fresh process, {args.runs} runs, medians) | time s | peak RSS over baseline | × param bytes |")
    print("|---|---|---|---|")
    base_time = None
    for name, runs in results.items():
        t = statistics.median(r["seconds"] for r in runs)
        peak = statistics.median(r["peak_over_base"] for r in runs)
        params = runs[0]["param_bytes"]
        base_time = base_time or t
        print(f"| {name} | {t:.2f} ({t / base_time:.2f}× transformers) | {peak / 2**20:.0f} MiB | {peak / params:.2f}× |")
    print(f"\nparameter bytes: {params / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

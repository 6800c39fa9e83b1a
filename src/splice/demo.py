"""``splice demo``: the embedded default, end to end on a tiny pair.

For now: validate the bundled tiny spec, compose it, save, load it back, and run a forward pass with labels
and a greedy decode on random images — printing the plan and what came out.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch


def bundled_spec() -> str:
    """The tiny ViT + GPT-2 spec shipped with splice (the composition preset ``vit-gpt2-tiny``)."""
    return "vit-gpt2-tiny"


def run(spec: str | None = None, out: str = "out/demo") -> int:
    import splice

    spec = spec or bundled_spec()
    t0 = time.perf_counter()
    plan = splice.validate(spec)
    print(plan.summary())
    plan.raise_for_problems()

    model = splice.compose(spec, seed=0).eval()
    print(f"\ncomposed {model.num_parameters():,} parameters")
    model.save_pretrained(out)
    files = ", ".join(sorted(p.name for p in Path(out).iterdir()))
    print(f"saved to {out}/ ({files})")

    loaded = splice.load(out)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    print(f"loaded back: {loaded.loading_report.__str__().splitlines()[0]}; identical weights: {same}")

    size = loaded.encoder.preprocessing.image_size
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, *size, generator=g)
    vocab = loaded.decoder.vocab_size
    labels = torch.randint(1, vocab - 1, (2, 6), generator=g)
    with torch.no_grad():
        out_a = model(pixel_values=pixel_values, labels=labels)
        out_b = loaded(pixel_values=pixel_values, labels=labels)
    print(
        f"forward with labels: logits {tuple(out_b.logits.shape)}, loss {out_b.loss.item():.4f} "
        f"(ln(vocab) = {torch.log(torch.tensor(float(vocab))).item():.4f}); "
        f"max |Δlogits| saved vs loaded = {(out_a.logits - out_b.logits).abs().max().item():.2e}"
    )
    ids = loaded.generate(pixel_values, max_new_tokens=8)
    print(f"greedy decode (8 new tokens, random weights so the ids mean nothing yet):")
    for row in ids.tolist():
        print(f"  {row}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0

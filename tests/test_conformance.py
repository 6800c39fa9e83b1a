"""Every built-in component passes the conformance kit (splice.testing), from its tiny config; a third-party plugin
is covered the same way in a test file of its own (tests/test_starter_plugin.py).

What a built-in does not do is listed in KNOWN, with why, as a strict xfail: it stays visible, and the day it is
fixed the test says so."""

from __future__ import annotations

import pytest

import splice.testing
from splice.core.plugins import get_registry

_VED_POSITIONS = ("positions count from the past whatever the padding, as transformers' VisionEncoderDecoderModel "
                  "does for this family (its generate gives a left-padded prompt other tokens than the same prompt "
                  "unpadded); following the mask would break that parity")
KNOWN = {
    ("encoder", "beit", "gradients"): "fc_norm (transformers' BEiT pooler norm) is kept for checkpoints and the "
                                      "dual encoder's pooling; the tokens do not read it",
    ("encoder", "timm", "gradients"): "the timm model's head norm is kept for checkpoints; the tokens do not read it",
    **{("decoder", name, "positions"): _VED_POSITIONS for name in ("gpt2", "bert", "bart_decoder", "mbart", "trocr")},
}


def _cases():
    for case in splice.testing.conformance_cases(package="splice"):
        why = KNOWN.get((case.kind, case.name, case.check))
        marks = [pytest.mark.xfail(raises=splice.testing.ConformanceError, strict=True, reason=why)] if why else []
        yield pytest.param(case, id=str(case), marks=marks)


@pytest.mark.parametrize("case", list(_cases()))
def test_builtin_conforms(case):
    case.run()


@pytest.mark.parametrize("decoder", ["gpt2", "bart_decoder", "llama"])
def test_pairs(decoder):
    splice.testing.check_pair("vit", decoder)


def test_every_builtin_is_covered():
    registry = get_registry()
    covered = {(c.kind, c.name) for c in splice.testing.conformance_cases(package="splice")}
    for kind in splice.testing.CHECKS:
        assert {(kind, e.name) for e in registry.entries(kind) if e.dist == "splice"} <= covered
    assert KNOWN.keys() <= {(c.kind, c.name, c.check) for c in splice.testing.conformance_cases(package="splice")}

"""Fixtures for the native decoders' tests: the family under test and its oracle/ours pairs (decoder_cases.py)."""

from __future__ import annotations

import pytest

from decoder_cases import CASES


@pytest.fixture(scope="module")
def case(request):
    """The family under test: a parameter (test_decoders.py), else the test module's ``CASE``."""
    return CASES[request.param] if hasattr(request, "param") else request.module.CASE


@pytest.fixture(scope="module")
def cross_pair(case, tmp_path_factory):
    """(oracle, ours, config.json, tensors): cross-attention in every layer (an adapter's, or BART's own)."""
    return case.pair(tmp_path_factory.mktemp(f"{case.name}x"))


@pytest.fixture(scope="module")
def plain_pair(case, tmp_path_factory):
    """Another seed, and without cross-attention where a family can do without."""
    return case.pair(tmp_path_factory.mktemp(case.name), seed=3, cross=False)

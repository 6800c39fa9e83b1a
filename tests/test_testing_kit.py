"""The conformance kit (splice.testing) catches each broken component of tests/fixtures/splice_broken with a
message naming the check and the component; the pytest helper lists one case per check and component."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from splice import testing

BROKEN = Path(__file__).parent / "fixtures" / "splice_broken"
CAUGHT = {  # component -> (role, the check that catches it, what its message says)
    "broken_width": ("encoder", "widths", "declares hidden_size 16, but last_hidden_state is (2, 16, 12)"),
    "broken_cache": ("decoder", "cache", "logits with the KV cache"),
    "broken_padding": ("decoder", "padding", "padding leaks into real tokens"),
    "broken_reload": ("decoder", "save_load", "gives logits that differ"),
}


@pytest.fixture(scope="module")
def broken():
    sys.path.insert(0, str(BROKEN))
    try:
        module = importlib.import_module("splice_broken")
        with testing.plugins(module):
            yield module
    finally:
        sys.path.remove(str(BROKEN))
        sys.modules.pop("splice_broken", None)


@pytest.mark.parametrize("name", sorted(CAUGHT))
def test_each_fault_is_caught_by_its_check(broken, name):
    kind, check, says = CAUGHT[name]
    with pytest.raises(testing.ConformanceError) as e:
        testing.CHECKS[kind][check](kind, name)
    text = str(e.value)
    assert f"conformance check '{check}' failed for {kind} '{name}' from plugin 'splice_broken'" in text, text
    assert says in text and "fix: " in text, text
    assert isinstance(e.value, AssertionError) and (e.value.check, name in e.value.component) == (check, True)


@pytest.mark.parametrize("name", sorted(CAUGHT))
def test_the_whole_kit_fails_each(broken, name):
    with pytest.raises(testing.ConformanceError, match=name):
        testing.check(CAUGHT[name][0], name)


def test_each_fault_is_only_its_own(broken):
    # the faults are one each: the broken decoders pass the checks aimed at the others
    testing.check("decoder", "broken_cache", checks=("widths", "gradients", "padding", "save_load"))
    testing.check("decoder", "broken_padding", checks=("widths", "gradients", "cache", "beams", "save_load"))
    testing.check("decoder", "broken_reload", checks=("widths", "gradients", "cache", "padding", "positions"))
    testing.check("encoder", "honest_cnn")


def test_beams_catch_a_cache_that_forgets(broken):
    with pytest.raises(testing.ConformanceError, match="'beams' failed for decoder 'broken_cache'.*beam search"):
        testing.check_beams("decoder", "broken_cache")


def test_pair_check_names_the_pair(broken):
    testing.check_pair("honest_cnn", "broken_reload", adapters=("gated",))
    with pytest.raises(testing.ConformanceError, match="'pair' failed for broken_width \\+ starter_lm: with adapter "
                       "'gated': compose refused the pair: .*declares hidden_size 16"):
        testing.check_pair("broken_width", "starter_lm")


def test_cases_cover_every_check_of_a_plugin(broken):
    cases = list(testing.conformance_cases(plugin="splice_broken"))
    assert {str(c) for c in cases} >= {"decoder:broken_cache:cache", "encoder:broken_width:widths"}
    assert len(cases) == 2 * len(testing.CHECKS["encoder"]) + 3 * len(testing.CHECKS["decoder"])
    assert not list(testing.conformance_cases(plugin="no such plugin"))


def test_a_check_that_does_not_apply_is_a_skip(broken):
    assert testing.check_hf_export("decoder", "broken_cache").endswith("has no transformers export half "
                                                                       "(HFInterop.state_dict_to_hf and config_to_hf)")
    with pytest.raises(pytest.skip.Exception):
        testing.Case("hf_export", "decoder", "broken_cache").run()

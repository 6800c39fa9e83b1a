"""Generation options as one validated object (issue 13, item 5): ``GenerationOptions`` checks every option
``generate`` takes against its bound, refuses a misspelt name with a did-you-mean, and is what ``generate``, a
splice folder's ``generation.json`` and a transformers ``generation_config.json`` all go through."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import splice
from splice.core.checkpoint import checked_generation
from splice.core.errors import CheckpointError, InputError
from splice.core.generation import GENERATION_OPTIONS, GenerationOptions
from splice.core.plugins import get_registry

V, START, PAD, EOS = 99, 2, 1, 2  # the tiny GPT-2's vocabulary and the spec's tokens
PX = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # the tiny ViT's image size


@pytest.fixture(scope="module")
def model():
    registry = get_registry()
    spec = {"encoder": {"name": "vit", "config": registry.get("encoder", "vit").tiny},
            "decoder": {"name": "gpt2", "config": registry.get("decoder", "gpt2").tiny},
            "tokens": {"decoder_start": START, "pad": PAD, "eos": EOS}}
    return splice.compose(spec, seed=0).eval()


# ---- misspelt options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given,meant", [
    ("num_beam", "num_beams"), ("max_new_token", "max_new_tokens"), ("tempreature", "temperature"),
    ("top_p_", "top_p"), ("decoder_input_id", "decoder_input_ids"),  # generate's other arguments are known too
])
def test_misspelt_option_gets_did_you_mean(model, given, meant):
    with pytest.raises(InputError) as info:
        model.generate(PX, **{given: 3})
    text = str(info.value)
    assert text.startswith(f"generate({given}=...): unknown generation argument")
    assert f"did you mean {meant!r}? Pass {meant}=... instead" in text
    assert "expected one of max_new_tokens, max_length" in text
    assert "seed" in text  # what is allowed names every argument


def test_unknown_option_without_a_close_name(model):
    with pytest.raises(InputError) as info:
        model.generate(PX, flux_capacitor=True)
    assert "flux_capacitor" in str(info.value) and "remove 'flux_capacitor'" in str(info.value)


def test_every_unknown_option_reported_at_once(model):
    with pytest.raises(InputError) as info:
        model.generate(PX, num_beam=2, max_new_token=3)
    assert [p.path for p in info.value.problems] == ["generate(num_beam=...)", "generate(max_new_token=...)"]


def test_from_mapping_refuses_or_ignores_unknown_names():
    with pytest.raises(InputError, match="did you mean 'num_beams'"):
        GenerationOptions.from_mapping({"num_beam": 3})
    ignored = GenerationOptions.from_mapping({"num_beam": 3, "num_beams": 2}, unknown="ignore")
    assert ignored == GenerationOptions(num_beams=2)


# ---- each option's bound ---------------------------------------------------------------------------------------

# per option: a value beyond its bound (the options that take either one id or a list get a bad list too)
OUT_OF_BOUNDS = {
    "max_new_tokens": [0, 1.5, "5"], "max_length": [1, -3], "min_new_tokens": [-1], "min_length": [-1, 2.0],
    "num_beams": [0, 1.5, True], "num_return_sequences": [0], "do_sample": ["yes", 1],
    "temperature": [float("nan"), float("inf"), "hot", 10**400], "top_k": [-1, 1.5], "top_p": [0.0, 1.5, float("nan")],
    "length_penalty": [11.0, -11.0, float("nan")], "early_stopping": ["sometimes", 1],
    "no_repeat_ngram_size": [-1], "repetition_penalty": [0.0, -1.0, float("inf")],
    "eos_token_id": [-1, [2, -1], "2"], "pad_token_id": [-1, 1.5], "decoder_start_token_id": [-1, 1.5],
    "forced_bos_token_id": [-1], "forced_eos_token_id": [-1, [], [3, "x"]],
}
CASES = [(name, value) for name, values in OUT_OF_BOUNDS.items() for value in values]


def test_every_option_has_a_bound_case():
    assert set(OUT_OF_BOUNDS) == set(GENERATION_OPTIONS) == {f.name for f in dataclasses.fields(GenerationOptions)}


@pytest.mark.parametrize("name,value", CASES, ids=[f"{n}={v!r}"[:40] for n, v in CASES])
def test_each_bound_is_refused(model, name, value):
    with pytest.raises(InputError) as info:
        GenerationOptions(**{name: value})
    problem = info.value.problems[0]
    assert problem.path == f"generate({name}=...)" and problem.expected and problem.fix
    with pytest.raises(InputError) as info:
        model.generate(PX, **{name: value})
    assert str(info.value).startswith(f"generate({name}=...)"), str(info.value)


def test_every_bad_option_reported_at_once():
    with pytest.raises(InputError) as info:
        GenerationOptions(num_beams=0, top_p=2.0)
    assert [p.path for p in info.value.problems] == ["generate(num_beams=...)", "generate(top_p=...)"]


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_return_sequences=2), "num_return_sequences"),  # greedy: every copy would be the same
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
])
def test_bounds_between_options(model, kwargs, name):
    options = GenerationOptions(**kwargs)  # each option alone is within its bound
    with pytest.raises(InputError, match=rf"generate\({name}=\.\.\.\)"):
        options.resolve(prompt_len=1)
    with pytest.raises(InputError, match=rf"generate\({name}=\.\.\.\)"):
        model.generate(PX, **kwargs)


def test_temperature_zero_is_ignored_when_greedy():
    assert GenerationOptions(temperature=0.0).resolve(prompt_len=1).temperature == 0.0


# ---- the object --------------------------------------------------------------------------------------------------


def test_options_round_trip(model):
    options = GenerationOptions(max_new_tokens=4, num_beams=3, num_return_sequences=2, length_penalty=0.8,
                                early_stopping="never", no_repeat_ngram_size=2, eos_token_id=[EOS, 7],
                                forced_eos_token_id=7)
    assert GenerationOptions.from_mapping(options.to_dict()) == options
    assert GenerationOptions.from_mapping(json.loads(json.dumps(options.to_dict()))) == options
    assert hash(options) == hash(GenerationOptions.from_mapping(options.to_dict()))
    assert GenerationOptions().to_dict() == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.num_beams = 1
    # an object's options decode exactly as the same keyword arguments
    want = model.generate(PX, max_new_tokens=4, num_beams=3, num_return_sequences=2, length_penalty=0.8,
                          early_stopping="never", no_repeat_ngram_size=2, eos_token_id=[EOS, 7], forced_eos_token_id=7)
    assert torch.equal(model.generate(PX, **options.to_dict()), want)


def test_explicit_options_over_defaults():
    defaults = GenerationOptions(max_new_tokens=5, num_beams=4, top_k=7)
    merged = GenerationOptions(max_length=9, num_beams=2).over(defaults)
    # the length is taken whole from the explicit side: its max_length wins over the default max_new_tokens
    assert merged == GenerationOptions(max_length=9, num_beams=2, top_k=7)
    assert merged.over(defaults) == merged
    s = merged.resolve(prompt_len=1, tokens={"eos": EOS, "pad": PAD})
    assert (s.max_length, s.length_from, s.num_beams, s.top_k, s.eos, s.pad) == (9, "max_length", 2, 7, [EOS], PAD)


def test_model_defaults_go_through_the_options(model):
    model.generation_defaults = {"num_beams": 0}
    try:
        with pytest.raises(InputError, match=r"generate\(num_beams=\.\.\.\)"):
            model.generate(PX, max_new_tokens=2)
        model.generation_defaults = {"max_new_tokens": 2, "eos_token_id": [], "bos_token_id": 5}  # other keys: left
        assert model.generate(PX).shape == (1, 3)
    finally:
        model.generation_defaults = {}


def test_saved_generation_file_goes_through_the_options(tmp_path):
    path = tmp_path / "generation.json"
    data = {"num_beams": 2, "top_p": 0.9, "bos_token_id": 0, "transformers_version": "5.0"}
    assert checked_generation(path, data) == data  # keys generate does not take are kept as they are
    for bad, option in (({"top_p": 2}, "top_p"), ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
                        ({"decoder_start_token_id": "x"}, "decoder_start_token_id")):
        with pytest.raises(CheckpointError) as info:
            checked_generation(Path(path), bad)
        assert "generation.json" in str(info.value) and option in str(info.value)

"""Generation against transformers 5's ``generate``, token for token.

For every registered decoder that can describe itself to transformers, transformers builds a tiny
VisionEncoderDecoderModel (ViT + that decoder with cross-attention, a 24-token vocabulary, weights perturbed so
captions depend on the image), saves it, and ``splice.load`` reads the folder. The end-of-sequence token is
picked from what the model actually generates, so that sequences end at different steps and padding shows.
Every decoder runs the core checks (greedy, beams, processors, prompts, encoder outputs, sampling); the option
matrices run on GPT2 only, since the search loops do not depend on the decoder.
"""

from __future__ import annotations

import collections
import json
from types import SimpleNamespace

import pytest
import torch

import splice
from splice.core.errors import InputError
from splice.core.generation import KVCache
from splice.core.plugins import get_registry

transformers = pytest.importorskip("transformers")

from oracle import reads_context  # noqa: E402

VOCAB, PAD = 24, 0
START = VOCAB - 1
DECODERS = [  # every decoder transformers can pair with a vision encoder
    e.name for e in get_registry().entries("decoder")
    if e.hf is not None and getattr(e.hf, "config_to_hf", None) is not None and e.tiny is not None
    and reads_context(e)
]
assert "gpt2" in DECODERS


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine the thread hand-offs dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(model, seed, scale):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _hf_ved(decoder: str, *, seed: int = 0, scale: float = 0.3):
    entry = get_registry().get("decoder", decoder)
    values = entry.config_cls(**{**entry.tiny, "vocab_size": VOCAB}).model_dump()
    hf_dec = {**entry.hf.config_to_hf(values), "bos_token_id": START, "eos_token_id": None, "pad_token_id": PAD}
    dec = transformers.AutoConfig.for_model(hf_dec.pop("model_type"), **hf_dec)
    enc = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=48)
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = START, PAD, None
    torch.manual_seed(seed)
    model = transformers.VisionEncoderDecoderModel(config=cfg).eval()
    _perturb(model, seed, scale)
    return model


def _eos_candidates(tokens: list[list[int]]) -> list[int]:
    """Tokens ranked by how differently they would end the rows: distinct first positions, then rows reached."""
    first: dict[int, dict[int, int]] = collections.defaultdict(dict)
    for r, row in enumerate(tokens):
        for i, t in enumerate(row):
            first[t].setdefault(r, i)
    ranked = sorted((t for t in first if t not in (PAD, START)),
                    key=lambda t: (len(set(first[t].values())), len(first[t])), reverse=True)
    return ranked


def _meaningful(hf, px, eos: int) -> bool:
    with torch.no_grad():
        greedy = hf.generate(pixel_values=px, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
        beams = hf.generate(pixel_values=px, max_new_tokens=10, num_beams=3, num_return_sequences=2, eos_token_id=eos,
                            pad_token_id=PAD, length_penalty=1.5, early_stopping=False)
    ends = _end_steps(greedy, [eos])
    return (len(set(ends)) >= 2 and any(e is not None and e < greedy.shape[1] - 2 for e in ends)
            and any(e is not None for e in _end_steps(beams, [eos])))


def _pair(decoder: str, folder) -> SimpleNamespace:
    hf = _hf_ved(decoder)
    px = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        free = hf.generate(pixel_values=px, max_new_tokens=12, eos_token_id=[], pad_token_id=PAD + 1)
    eos = _eos_candidates(free[:, 1:].tolist())
    # the first candidate (of the best few) that makes the tests mean something: greedy rows end at different
    # steps and beam search returns an ended row too (random tiny decoders can repeat one token forever)
    chosen = next((t for t in eos[:8] if _meaningful(hf, px, t)), eos[0])
    eos = [chosen] + [t for t in eos if t != chosen]
    hf.config.eos_token_id = hf.config.decoder.eos_token_id = hf.generation_config.eos_token_id = eos[0]
    hf.save_pretrained(folder)
    ours = splice.load(folder)
    assert ours.tokens["eos"] == eos[0]
    return SimpleNamespace(name=decoder, hf=hf, ours=ours, px=px, eos=eos, folder=folder)


@pytest.fixture(scope="module", params=DECODERS)
def pair(request, tmp_path_factory):
    """Every decoder with transformers interop: the core parity checks."""
    return _pair(request.param, tmp_path_factory.mktemp(f"ved-{request.param}"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """GPT2 only: the full option matrices (the loops are decoder-agnostic; this keeps the suite fast)."""
    return _pair("gpt2", tmp_path_factory.mktemp("ved-gpt2-matrix"))


def _both(pair, **kwargs):
    with torch.no_grad():
        want = pair.hf.generate(pixel_values=pair.px, **kwargs)
    got = pair.ours.generate(pair.px, **kwargs)
    assert got.dtype == torch.long
    assert got.tolist() == want.tolist(), f"{pair.name} {kwargs}\nwant {want.tolist()}\ngot  {got.tolist()}"
    return got


def _end_steps(ids: torch.Tensor, eos: list[int], prompt: int = 1) -> list[int | None]:
    out = []
    for row in ids[:, prompt:].tolist():
        out.append(next((i for i, t in enumerate(row) if t in eos), None))
    return out


# ---- every decoder ----------------------------------------------------------------------------------------


def test_greedy_matches_transformers(pair):
    got = _both(pair, max_new_tokens=12, do_sample=False)
    ends = _end_steps(got, [pair.eos[0]])
    # the test means something: rows end at different steps, and a finished row is padded
    assert len(set(ends)) >= 2 and any(e is not None and e < got.shape[1] - 2 for e in ends), ends
    assert PAD in got[:, 2:].flatten().tolist()


def test_beam_search_matches_transformers(pair):
    for length_penalty, early_stopping in ((0.7, True), (1.5, False)):
        got = _both(pair, max_new_tokens=10, num_beams=3, length_penalty=length_penalty,
                    early_stopping=early_stopping, num_return_sequences=2)
        assert got.shape[0] == 10
    assert any(e is not None for e in _end_steps(got, [pair.eos[0]]))


def test_processors_match_transformers(pair):
    for num_beams in (1, 3):
        got = _both(pair, max_new_tokens=12, num_beams=num_beams, no_repeat_ngram_size=3, repetition_penalty=1.3,
                    min_new_tokens=3)
        assert all(e is None or e >= 3 for e in _end_steps(got, [pair.eos[0]]))


def test_decoder_prompt_matches_transformers(pair):
    prompt = torch.tensor([[START, 3, 4]] * 5)
    for num_beams in (1, 3):
        _both(pair, decoder_input_ids=prompt, max_new_tokens=8, num_beams=num_beams)
        # a prompt without decoder_start gets it prepended, as in transformers
        got = _both(pair, decoder_input_ids=prompt[:, 1:], max_new_tokens=8, num_beams=num_beams)
        assert got[:, :3].tolist() == prompt.tolist()


def test_left_padded_prompt_matches_transformers(pair):
    ids = torch.tensor([[PAD, PAD, START, 3], [PAD, START, 5, 6], [START, 7, 8, 9], [PAD, PAD, START, 2],
                        [START, 1, 2, 3]])
    mask = (torch.arange(4)[None, :] >= torch.tensor([2, 1, 0, 2, 0])[:, None]).long()
    for num_beams in (1, 2):
        kw = dict(decoder_input_ids=ids, decoder_attention_mask=mask, max_new_tokens=6, num_beams=num_beams,
                  repetition_penalty=1.5)
        with torch.no_grad():
            want = pair.hf.generate(pixel_values=pair.px, **kw)
        assert pair.ours.generate(pair.px, **kw).tolist() == want.tolist()


def test_encoder_outputs_reuse(pair):
    with torch.no_grad():
        hf_enc = pair.hf.encoder(pixel_values=pair.px)
        want = pair.hf.generate(encoder_outputs=hf_enc, max_new_tokens=8, num_beams=2)
    enc = pair.ours.encode(pair.px)
    got = pair.ours.generate(encoder_outputs=enc, max_new_tokens=8, num_beams=2)
    assert got.tolist() == want.tolist()
    assert pair.ours.generate(pair.px, max_new_tokens=8, num_beams=2).tolist() == got.tolist()
    again = pair.ours.generate(encoder_outputs=enc.last_hidden_state, max_new_tokens=8, num_beams=2)
    assert again.tolist() == got.tolist()


def test_sampling_matches_transformers_under_the_same_seed(pair):
    """Same processors, same float32 probabilities, same draws from torch's global generator."""
    for option in (dict(temperature=0.7, top_p=0.9), dict(num_beams=2, top_k=6)):
        kw = dict(do_sample=True, max_new_tokens=10, **option)
        torch.manual_seed(11)
        with torch.no_grad():
            want = pair.hf.generate(pixel_values=pair.px, **kw)
        torch.manual_seed(11)
        assert pair.ours.generate(pair.px, **kw).tolist() == want.tolist(), option


# ---- option matrices (GPT2) -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
def test_default_length_is_20_new_tokens(gpt2):
    got = _both(gpt2, eos_token_id=[])
    assert got.shape == (5, 21)
    _both(gpt2, max_length=9, eos_token_id=[])


def test_several_eos_ids_and_pad(gpt2):
    eos = gpt2.eos[:2]
    got = _both(gpt2, max_new_tokens=12, eos_token_id=eos, pad_token_id=5)
    ends = _end_steps(got, eos)
    assert any(e is not None for e in ends)
    assert {got[r, 1 + e].item() for r, e in enumerate(ends) if e is not None} == set(eos)  # both ids end rows
    _both(gpt2, max_new_tokens=12, eos_token_id=eos, num_beams=3, num_return_sequences=2)


@pytest.mark.parametrize("length_penalty,early_stopping,num_return", [
    (0.7, True, 2), (1.5, False, 2), (1.5, "never", 3), (0.5, "never", 1), (1.0, False, 1), (-0.5, True, 1),
])
def test_beam_search_options_match_transformers(gpt2, length_penalty, early_stopping, num_return):
    got = _both(gpt2, max_new_tokens=10, num_beams=3, length_penalty=length_penalty,
                early_stopping=early_stopping, num_return_sequences=num_return)
    assert got.shape[0] == 5 * num_return


def test_beam_search_finishes_hypotheses(gpt2):
    got = _both(gpt2, max_new_tokens=10, num_beams=4, num_return_sequences=4)
    assert any(e is not None for e in _end_steps(got, [gpt2.eos[0]]))


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beam_search_stops_when_transformers_does(gpt2, monkeypatch, early_stopping):
    """Same decoder steps as transformers: the loop ends as soon as no hypothesis can change."""
    steps = collections.Counter()
    for side, module in (("hf", gpt2.hf.decoder), ("ours", gpt2.ours.decoder)):
        def counting(*a, _side=side, _forward=module.forward, **k):
            steps[_side] += 1
            return _forward(*a, **k)

        monkeypatch.setattr(module, "forward", counting)
    px = gpt2.px[[0, 1, 3]]  # images whose beams all finish early
    with torch.no_grad():
        want = gpt2.hf.generate(pixel_values=px, max_new_tokens=14, num_beams=3, early_stopping=early_stopping)
    got = gpt2.ours.generate(px, max_new_tokens=14, num_beams=3, early_stopping=early_stopping)
    assert got.tolist() == want.tolist()
    assert steps["ours"] == steps["hf"], dict(steps)
    assert steps["ours"] < 14 or early_stopping == "never", dict(steps)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("option", [
    dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1), dict(repetition_penalty=1.6),
    dict(repetition_penalty=0.7), dict(min_new_tokens=5), dict(min_length=4),
    dict(forced_bos_token_id=3, forced_eos_token_id=4),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_processor_options_match_transformers(gpt2, option, num_beams):
    got = _both(gpt2, max_new_tokens=12, num_beams=num_beams, **option)
    if "min_new_tokens" in option:
        assert all(e is None or e >= option["min_new_tokens"] for e in _end_steps(got, [gpt2.eos[0]]))
    if "forced_bos_token_id" in option:
        assert set(got[:, 1].tolist()) == {3}


@pytest.mark.parametrize("num_beams", [1, 3])
def test_forced_eos_first_token_ends_despite_min_length(gpt2, num_beams):
    """forced_bos acts after the min-length ban, so it can force eos at once: those rows end there."""
    got = _both(gpt2, forced_bos_token_id=gpt2.eos[0], min_new_tokens=3, max_new_tokens=6, num_beams=num_beams)
    assert set(got[:, 1].tolist()) == {gpt2.eos[0]}


def test_no_repeat_ngram_really_bans(gpt2):
    got = gpt2.ours.generate(gpt2.px, max_new_tokens=12, no_repeat_ngram_size=2, eos_token_id=[])
    for row in got.tolist():
        bigrams = list(zip(row, row[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_decoder_prompt_with_processors_and_max_length(gpt2):
    prompt = torch.tensor([[START, 3, 4]] * 5)
    for num_beams in (1, 3):
        # the prompt counts for repetition penalty and no-repeat n-grams
        _both(gpt2, decoder_input_ids=prompt, max_new_tokens=8, num_beams=num_beams, repetition_penalty=1.4,
              no_repeat_ngram_size=2)
        # max_length counts the prompt (pad_token_id: transformers' beam search fails on eos=[] with pad 0)
        got = _both(gpt2, decoder_input_ids=prompt, max_length=7, num_beams=num_beams, eos_token_id=[], pad_token_id=5)
        assert got.shape[1] == 7


def test_encoder_runs_once_per_image(gpt2, monkeypatch):
    calls = []
    encoder = gpt2.ours.encoder
    original = encoder.forward

    def counting(pixel_values, *a, **k):
        calls.append(pixel_values.shape[0])
        return original(pixel_values, *a, **k)

    monkeypatch.setattr(encoder, "forward", counting)
    gpt2.ours.generate(gpt2.px, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert calls == [5]


def test_sampling_is_reproducible(gpt2):
    kw = dict(do_sample=True, max_new_tokens=10, temperature=1.5, eos_token_id=[])
    a = gpt2.ours.generate(gpt2.px, seed=1, **kw)
    b = gpt2.ours.generate(gpt2.px, seed=1, **kw)
    c = gpt2.ours.generate(gpt2.px, seed=2, **kw)
    d = gpt2.ours.generate(gpt2.px, generator=torch.Generator().manual_seed(1), **kw)
    assert a.tolist() == b.tolist() == d.tolist()
    assert a.tolist() != c.tolist()


def test_top_k_1_sampling_is_greedy(gpt2):
    greedy = gpt2.ours.generate(gpt2.px, max_new_tokens=10)
    sampled = gpt2.ours.generate(gpt2.px, max_new_tokens=10, do_sample=True, top_k=1, temperature=0.7, seed=3)
    assert sampled.tolist() == greedy.tolist()


@pytest.mark.parametrize("option", [
    dict(), dict(temperature=0.6, top_k=5), dict(top_p=0.8, top_k=0), dict(top_p=0.5, temperature=1.3),
    dict(num_return_sequences=3, top_k=8), dict(num_beams=3, top_k=6), dict(num_beams=3, num_return_sequences=2),
    dict(repetition_penalty=1.4, no_repeat_ngram_size=2),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_sampling_options_match_transformers(gpt2, option):
    kw = dict(do_sample=True, max_new_tokens=10, **option)
    torch.manual_seed(11)
    with torch.no_grad():
        want = gpt2.hf.generate(pixel_values=gpt2.px, **kw)
    torch.manual_seed(11)
    got = gpt2.ours.generate(gpt2.px, **kw)
    assert got.tolist() == want.tolist()


def test_generation_config_json_is_honoured(gpt2, tmp_path):
    gen = gpt2.hf.generation_config
    saved = dict(gen.to_diff_dict())
    gen.num_beams, gen.max_length, gen.no_repeat_ngram_size, gen.length_penalty = 3, 9, 2, 0.8
    try:
        gpt2.hf.save_pretrained(tmp_path)
        with torch.no_grad():
            want = gpt2.hf.generate(pixel_values=gpt2.px)
    finally:
        for key in ("num_beams", "max_length", "no_repeat_ngram_size", "length_penalty"):
            setattr(gen, key, saved.get(key))
    assert json.loads((tmp_path / "generation_config.json").read_text())["num_beams"] == 3
    ours = splice.load(tmp_path)
    assert ours.generation_defaults["num_beams"] == 3
    got = ours.generate(gpt2.px)
    assert got.tolist() == want.tolist()
    assert got.shape[1] <= 9
    assert got.tolist() != ours.generate(gpt2.px, num_beams=1).tolist()
    # explicit arguments still win over the folder's defaults
    greedy = ours.generate(gpt2.px, num_beams=1, max_new_tokens=4, no_repeat_ngram_size=0)
    with torch.no_grad():
        assert greedy.tolist() == gpt2.hf.generate(pixel_values=gpt2.px, num_beams=1, max_new_tokens=4).tolist()


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,word", [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(num_beams=0), "num_beams"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_length=1), "max_length"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(eos_token_id=-3), "eos_token_id"),
    (dict(seed=1, generator=torch.Generator()), "seed"),
    (dict(decoder_input_ids=torch.ones(2, 3, dtype=torch.long)), "decoder_input_ids"),
    (dict(num_beam=3), "num_beams"),  # a typo: did you mean
    (dict(forced_eos_token_id=[]), "forced_eos_token_id"),
    (dict(max_new_tokens=500), "max_new_tokens"),  # beyond the decoder's positions: caught before decoding
    (dict(max_length=500), "max_length"),
])
def test_bad_arguments_raise_input_error(gpt2, kwargs, word):
    with pytest.raises(InputError) as info:
        gpt2.ours.generate(gpt2.px[:1], **kwargs)
    text = str(info.value)
    assert word in text and "expected" in text and "fix" in text


def test_no_pixels_no_encoder_outputs(gpt2):
    with pytest.raises(InputError, match="pixel_values"):
        gpt2.ours.generate(max_new_tokens=3)


# ---- the cache --------------------------------------------------------------------------------------------


def test_kv_cache_reorder_and_repeat():
    cache = KVCache(num_layers=2, max_len=6)
    k = torch.randn(2, 3, 4, 5)
    v = torch.randn(2, 3, 4, 5)
    for layer in range(2):
        cache.update(layer, k, v)
    cache.advance(4)
    cache.cross[0] = (torch.randn(2, 3, 7, 5), torch.randn(2, 3, 7, 5))
    cache.repeat_interleave(3)
    assert cache.k[0].shape == (6, 3, 6, 5) and cache.cross[0][0].shape == (6, 3, 7, 5) and cache.cross[1] is None
    assert torch.equal(cache.k[1][:, :, :4], k.repeat_interleave(3, 0))
    index = torch.tensor([5, 5, 0, 2, 1, 3])
    before = cache.k[0][:, :, :4].clone()
    cache.reorder(index)
    assert torch.equal(cache.k[0][:, :, :4], before[index])
    keys, _ = cache.update(0, torch.zeros(6, 3, 1, 5), torch.zeros(6, 3, 1, 5))
    assert keys.shape == (6, 3, 5, 5) and torch.equal(keys[:, :, :4], before[index])
    cache.reorder(torch.arange(6).flip(0))
    assert torch.equal(cache.k[0][:, :, :4], before[index].flip(0))
    with pytest.raises(ValueError):
        cache.update(1, torch.zeros(6, 3, 3, 5), torch.zeros(6, 3, 3, 5))


def test_generated_ids_can_be_training_labels(gpt2):
    """Decoding runs in inference mode, but what it returns is a normal tensor: usable as labels for a step."""
    ids = gpt2.ours.generate(gpt2.px, max_new_tokens=4)
    assert not ids.is_inference()
    model = gpt2.ours
    model.train()
    try:
        model(pixel_values=gpt2.px, labels=ids).loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()

"""Hostile runtime inputs to the model API: ``forward``, ``encode`` and ``generate`` with tensors and options an
adversarial user would pass. Every case either works (and the result is checked) or raises one clear
``InputError`` naming the argument; none escapes as a raw torch error, none hangs or runs out of memory.

Two tiny composed pairs: ViT + GPT-2 (an adapter's cross-attention, a projection 48 -> 32) and ViT + BART (native
cross-attention).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import splice
from splice.core.errors import InputError
from splice.core.interfaces import EncoderOutput
from splice.core.plugins import get_registry

DECODERS = ("gpt2", "bart_decoder")
V = 99  # both tiny decoders' vocabulary
START, PAD, EOS = 2, 1, 2
NAN, INF = float("nan"), float("inf")


def _spec(decoder: str) -> dict:
    registry = get_registry()
    return {"encoder": {"name": "vit", "config": registry.get("encoder", "vit").tiny},
            "decoder": {"name": decoder, "config": registry.get("decoder", decoder).tiny},
            "tokens": {"decoder_start": START, "pad": PAD, "eos": EOS}}


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only costs hand-offs on a shared machine
    built = {name: splice.compose(_spec(name), seed=0).eval() for name in DECODERS}
    yield built
    torch.set_num_threads(threads)


@pytest.fixture(params=DECODERS)
def m(request, models):
    return models[request.param]


PX = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, C, H, W) the tiny ViT's size
IDS = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(1))  # (B, T)
ENC = torch.randn(2, 17, 48, generator=torch.Generator().manual_seed(2))  # (B, N, D_enc)


def _nan_at_one_pixel():
    px = PX.clone()
    px[1, 2, 7, 7] = NAN
    return px


def _labels(fill):
    out = IDS.clone()
    out[0, 1] = fill
    return out


# ---- inputs that must be refused, each an InputError naming the argument ---------------------------------------

def _fwd(**kw):
    """A forward call: the good pixels and labels, with ``kw`` replacing them (None drops one)."""
    return lambda m: m(**{"pixel_values": PX, "labels": IDS, **kw})


FORWARD_ERRORS = {
    # pixels: type, dtype, rank, channels, size, values, device
    "pixels as a list": ("pixel_values", _fwd(pixel_values=PX.tolist())),
    "pixels as numpy": ("pixel_values", _fwd(pixel_values=PX.numpy())),
    "pixels int64": ("pixel_values", _fwd(pixel_values=(PX * 100).long())),
    "pixels uint8": ("pixel_values", _fwd(pixel_values=torch.zeros(2, 3, 32, 32, dtype=torch.uint8))),
    "pixels bool": ("pixel_values", _fwd(pixel_values=PX > 0)),
    "pixels complex": ("pixel_values", _fwd(pixel_values=PX.to(torch.complex64))),
    "pixels 3-D": ("pixel_values", _fwd(pixel_values=PX[0])),
    "pixels 5-D": ("pixel_values", _fwd(pixel_values=PX[None])),
    "pixels 2-D": ("pixel_values", _fwd(pixel_values=PX[0, 0])),
    "pixels 0-D": ("pixel_values", _fwd(pixel_values=torch.tensor(0.5))),
    "pixels 1 channel": ("pixel_values", _fwd(pixel_values=PX[:, :1])),
    "pixels 4 channels": ("pixel_values", _fwd(pixel_values=torch.cat([PX, PX[:, :1]], 1))),
    "pixels channels last": ("pixel_values", _fwd(pixel_values=PX.permute(0, 2, 3, 1))),
    "pixels 16x16": ("pixel_values", _fwd(pixel_values=PX[:, :, :16, :16])),
    "pixels 32x48": ("pixel_values", _fwd(pixel_values=torch.randn(2, 3, 32, 48))),
    "pixels all NaN": ("pixel_values", _fwd(pixel_values=PX * NAN)),
    "pixels one NaN": ("pixel_values", _fwd(pixel_values=_nan_at_one_pixel())),
    "pixels +Inf": ("pixel_values", _fwd(pixel_values=PX * INF)),
    "pixels -Inf and +Inf": ("pixel_values", _fwd(pixel_values=PX.sign() * INF)),
    "pixels fp16 NaN": ("pixel_values", _fwd(pixel_values=(PX * NAN).half())),
    "pixels fp64 beyond fp32": ("pixel_values", _fwd(pixel_values=PX.double() * 1e300)),
    "pixels on meta": ("pixel_values", _fwd(pixel_values=PX.to("meta"))),
    "no pixels, no encoder outputs": ("pixel_values", _fwd(pixel_values=None)),
    "encode a list": ("pixel_values", lambda m: m.encode([[1.0, 2.0]])),
    "encode NaN": ("pixel_values", lambda m: m.encode(PX * NAN)),
    # labels
    "labels 1-D": ("labels", _fwd(labels=IDS[0])),
    "labels 0-D": ("labels", _fwd(labels=torch.tensor(3))),
    "labels 3-D": ("labels", _fwd(labels=IDS[:, :, None])),
    "labels empty (B, 0)": ("labels", _fwd(labels=IDS[:, :0])),
    "labels float": ("labels", _fwd(labels=IDS.float())),
    "labels bool": ("labels", _fwd(labels=IDS > 50)),
    "labels as a list": ("labels", _fwd(labels=IDS.tolist())),
    "labels as numpy": ("labels", _fwd(labels=IDS.numpy())),
    "labels = vocab size": ("labels", _fwd(labels=_labels(V))),
    "labels huge": ("labels", _fwd(labels=_labels(2**40))),
    "labels -1": ("labels", _fwd(labels=_labels(-1))),
    "labels -101": ("labels", _fwd(labels=_labels(-101))),
    "labels' last token out of vocab": ("labels", _fwd(labels=torch.cat([IDS, IDS[:, :1] + V], 1))),
    "labels batch 1 for 2 images": ("labels", _fwd(labels=IDS[:1])),
    "labels batch 3 for 2 images": ("labels", _fwd(labels=torch.cat([IDS, IDS[:1]]))),
    "labels longer than positions": ("labels", _fwd(labels=torch.randint(3, V, (2, 65)))),
    "labels on meta": ("labels", _fwd(labels=IDS.to("meta"))),
    "labels and decoder_input_ids differ": ("labels", _fwd(decoder_input_ids=IDS[:, :3])),
    # decoder inputs
    "decoder_input_ids float": ("decoder_input_ids", _fwd(labels=None, decoder_input_ids=IDS.float())),
    "decoder_input_ids list": ("decoder_input_ids", _fwd(labels=None, decoder_input_ids=[[1, 2]])),
    "decoder_input_ids 1-D": ("decoder_input_ids", _fwd(labels=None, decoder_input_ids=IDS[0])),
    "decoder_input_ids = vocab size": ("decoder_input_ids", _fwd(labels=None, decoder_input_ids=_labels(V))),
    "decoder_input_ids -100": ("decoder_input_ids", _fwd(labels=None, decoder_input_ids=_labels(-100))),
    "decoder_input_ids batch mismatch": ("decoder_input_ids", _fwd(labels=None, decoder_input_ids=IDS[:1])),
    "decoder_input_ids on meta": ("decoder_input_ids", _fwd(labels=None, decoder_input_ids=IDS.to("meta"))),
    "neither labels nor decoder_input_ids": ("decoder_input_ids", _fwd(labels=None)),
    "decoder_attention_mask list": ("decoder_attention_mask", _fwd(decoder_attention_mask=[[1] * 5] * 2)),
    "decoder_attention_mask shape": ("decoder_attention_mask", _fwd(decoder_attention_mask=torch.ones(2, 3))),
    "decoder_attention_mask on meta": ("decoder_attention_mask",
                                       _fwd(decoder_attention_mask=torch.ones(2, 5, device="meta"))),
    # encoder outputs given by the user
    "encoder_outputs width 40": ("encoder_outputs", _fwd(encoder_outputs=ENC[..., :40])),
    "encoder_outputs width 32 (the decoder's)": ("encoder_outputs", _fwd(encoder_outputs=ENC[..., :32])),
    "encoder_outputs 2-D pooled": ("encoder_outputs", _fwd(encoder_outputs=ENC[:, 0])),
    "encoder_outputs 4-D": ("encoder_outputs", _fwd(encoder_outputs=ENC[None])),
    "encoder_outputs no tokens": ("encoder_outputs", _fwd(encoder_outputs=ENC[:, :0])),
    "encoder_outputs int": ("encoder_outputs", _fwd(encoder_outputs=ENC.long())),
    "encoder_outputs NaN": ("encoder_outputs", _fwd(encoder_outputs=ENC * NAN)),
    "encoder_outputs empty tuple": ("encoder_outputs", _fwd(encoder_outputs=())),
    "encoder_outputs a string": ("encoder_outputs", _fwd(encoder_outputs="features")),
    "encoder_outputs without a tensor": ("encoder_outputs", _fwd(encoder_outputs=EncoderOutput(None))),
    "encoder_outputs on meta": ("encoder_outputs", _fwd(encoder_outputs=ENC.to("meta"))),
    "encoder_outputs batch 3, labels 2": ("labels", _fwd(encoder_outputs=torch.cat([ENC, ENC[:1]]))),
}


@pytest.mark.parametrize("case", sorted(FORWARD_ERRORS))
def test_forward_refuses(hostile, m, case):
    name, fn = FORWARD_ERRORS[case]
    err = hostile.check(case, lambda: fn(m), expect="error")
    assert isinstance(err, InputError) and str(err).startswith(name), str(err)


def _gen(**kw):
    return lambda m: m.generate(PX, **kw)


GENERATE_ERRORS = {
    "temperature NaN": ("temperature", _gen(do_sample=True, temperature=NAN)),
    "temperature NaN, greedy": ("temperature", _gen(temperature=NAN)),
    "temperature Inf": ("temperature", _gen(do_sample=True, temperature=INF)),
    "temperature 0, sampling": ("temperature", _gen(do_sample=True, temperature=0)),
    "temperature -1, sampling": ("temperature", _gen(do_sample=True, temperature=-1.0)),
    "temperature a string": ("temperature", _gen(do_sample=True, temperature="hot")),
    "temperature 10**400": ("temperature", _gen(do_sample=True, temperature=10**400)),
    "top_k -1": ("top_k", _gen(do_sample=True, top_k=-1)),
    "top_k 1.5": ("top_k", _gen(do_sample=True, top_k=1.5)),
    "top_p 0": ("top_p", _gen(do_sample=True, top_p=0.0)),
    "top_p 1.5": ("top_p", _gen(do_sample=True, top_p=1.5)),
    "top_p NaN": ("top_p", _gen(do_sample=True, top_p=NAN)),
    "repetition_penalty NaN": ("repetition_penalty", _gen(repetition_penalty=NAN)),
    "repetition_penalty Inf": ("repetition_penalty", _gen(repetition_penalty=INF)),
    "repetition_penalty 0": ("repetition_penalty", _gen(repetition_penalty=0.0)),
    "length_penalty NaN": ("length_penalty", _gen(num_beams=2, length_penalty=NAN)),
    "length_penalty -Inf": ("length_penalty", _gen(num_beams=2, length_penalty=-INF)),
    "length_penalty 1e9 (length ** 1e9 overflows a float)": ("length_penalty", _gen(num_beams=2, length_penalty=1e9)),
    "length_penalty 400": ("length_penalty", _gen(num_beams=2, length_penalty=400.0)),
    "num_beams 0": ("num_beams", _gen(num_beams=0)),
    "num_beams 1.5": ("num_beams", _gen(num_beams=1.5)),
    "num_beams 10**6": ("num_beams", _gen(num_beams=10**6)),
    "num_beams vocab + 1": ("num_beams", _gen(num_beams=V + 1, max_new_tokens=2)),
    "num_return_sequences 0": ("num_return_sequences", _gen(num_return_sequences=0)),
    "num_return_sequences 10**9 sampled": ("num_return_sequences", _gen(do_sample=True, num_return_sequences=10**9)),
    "num_return_sequences > num_beams": ("num_return_sequences", _gen(num_beams=2, num_return_sequences=3)),
    "num_return_sequences 2, greedy": ("num_return_sequences", _gen(num_return_sequences=2)),
    "max_new_tokens 0": ("max_new_tokens", _gen(max_new_tokens=0)),
    "max_new_tokens -1": ("max_new_tokens", _gen(max_new_tokens=-1)),
    "max_new_tokens 10**12": ("max_new_tokens", _gen(max_new_tokens=10**12)),
    "max_new_tokens 1.5": ("max_new_tokens", _gen(max_new_tokens=1.5)),
    "max_new_tokens '5'": ("max_new_tokens", _gen(max_new_tokens="5")),
    "max_length 1 (the prompt)": ("max_length", _gen(max_length=1)),
    "max_length 10**12": ("max_length", _gen(max_length=10**12)),
    "min_new_tokens -1": ("min_new_tokens", _gen(min_new_tokens=-1)),
    "no_repeat_ngram_size -1": ("no_repeat_ngram_size", _gen(no_repeat_ngram_size=-1)),
    "do_sample 'yes'": ("do_sample", _gen(do_sample="yes")),
    "early_stopping 'sometimes'": ("early_stopping", _gen(num_beams=2, early_stopping="sometimes")),
    "forced_bos_token_id = vocab size": ("forced_bos_token_id", _gen(forced_bos_token_id=V)),
    "forced_bos_token_id -1": ("forced_bos_token_id", _gen(forced_bos_token_id=-1)),
    "forced_eos_token_id = vocab size": ("forced_eos_token_id", _gen(forced_eos_token_id=V)),
    "forced_eos_token_id -1": ("forced_eos_token_id", _gen(forced_eos_token_id=-1)),
    "forced_eos_token_id []": ("forced_eos_token_id", _gen(forced_eos_token_id=[])),
    "eos_token_id = vocab size": ("eos_token_id", _gen(eos_token_id=V)),
    "eos_token_id [2, vocab size]": ("eos_token_id", _gen(eos_token_id=[2, V])),
    "eos_token_id -1": ("eos_token_id", _gen(eos_token_id=-1)),
    "pad_token_id = vocab size": ("pad_token_id", _gen(pad_token_id=V)),
    "pad_token_id -1": ("pad_token_id", _gen(pad_token_id=-1)),
    "decoder_start_token_id = vocab size": ("decoder_start_token_id", _gen(decoder_start_token_id=V)),
    "decoder_start_token_id -1": ("decoder_start_token_id", _gen(decoder_start_token_id=-1)),
    "decoder_start_token_id 1.5": ("decoder_start_token_id", _gen(decoder_start_token_id=1.5)),
    "seed 2**64": ("seed", _gen(do_sample=True, seed=2**64)),
    "seed '0'": ("seed", _gen(do_sample=True, seed="0")),
    "seed and generator": ("seed", _gen(do_sample=True, seed=0, generator=torch.Generator())),
    "generator not a Generator": ("generator", _gen(do_sample=True, generator=123)),
    "misspelt option": ("tempreature", _gen(tempreature=0.7)),
    "decoder_input_ids = vocab size": ("decoder_input_ids", _gen(decoder_input_ids=_labels(V))),
    "decoder_input_ids float": ("decoder_input_ids", _gen(decoder_input_ids=IDS.float())),
    "decoder_input_ids list": ("decoder_input_ids", _gen(decoder_input_ids=[[2, 5]])),
    "decoder_input_ids on meta": ("decoder_input_ids", _gen(decoder_input_ids=IDS.to("meta"))),
    "decoder_attention_mask alone": ("decoder_attention_mask", _gen(decoder_attention_mask=torch.ones(2, 3))),
    "decoder_attention_mask shape": ("decoder_attention_mask",
                                     _gen(decoder_input_ids=IDS, decoder_attention_mask=torch.ones(2, 3))),
    "pixels NaN": ("pixel_values", lambda m: m.generate(PX * NAN)),
    "pixels numpy": ("pixel_values", lambda m: m.generate(PX.numpy())),
    "pixels wrong size": ("pixel_values", lambda m: m.generate(PX[:, :, :16])),
    "pixels on meta": ("pixel_values", lambda m: m.generate(PX.to("meta"))),
    "nothing to caption": ("pixel_values", lambda m: m.generate()),
    "encoder_outputs width 40": ("encoder_outputs", lambda m: m.generate(encoder_outputs=ENC[..., :40])),
    "encoder_outputs 2-D": ("encoder_outputs", lambda m: m.generate(encoder_outputs=ENC[:, 0])),
    "encoder_outputs NaN": ("encoder_outputs", lambda m: m.generate(encoder_outputs=ENC * NAN)),
    "encoder_outputs no tokens": ("encoder_outputs", lambda m: m.generate(encoder_outputs=ENC[:, :0], num_beams=2)),
}


@pytest.mark.parametrize("case", sorted(GENERATE_ERRORS))
def test_generate_refuses(hostile, m, case):
    name, fn = GENERATE_ERRORS[case]
    err = hostile.check(case, lambda: fn(m), expect="error")
    assert isinstance(err, InputError), str(err)
    assert str(err).startswith((name, f"generate({name}=")), str(err)


# ---- legitimate inputs: they work, and the result is right -----------------------------------------------------


def _logits(m, **kw):
    with torch.no_grad():
        return m(**kw).logits


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_pixels_are_cast(hostile, m, dtype):
    px = PX.to(dtype)
    got = hostile.check(f"{dtype} pixels", lambda: _logits(m, pixel_values=px, labels=IDS), expect="ok")
    want = _logits(m, pixel_values=px.float(), labels=IDS)  # the same values in the model's dtype
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if dtype == torch.float64:  # fp64 -> fp32 is exact for fp32-born pixels: the fp32 logits
        torch.testing.assert_close(got, _logits(m, pixel_values=PX, labels=IDS), atol=1e-5, rtol=0)
        caption = hostile.check("fp64 pixels, generate", lambda: m.generate(px, max_new_tokens=4), expect="ok")
        assert torch.equal(caption, m.generate(PX, max_new_tokens=4))


def test_fp64_encoder_outputs_are_cast(hostile, m):
    got = hostile.check("fp64 encoder outputs", lambda: _logits(m, encoder_outputs=ENC.double(), labels=IDS),
                        expect="ok")
    torch.testing.assert_close(got, _logits(m, encoder_outputs=ENC, labels=IDS), atol=1e-5, rtol=0)


def test_every_form_of_encoder_outputs(hostile, m):
    want = m.generate(PX, max_new_tokens=4, num_beams=2)
    enc = m.encode(PX)
    for form in (enc, enc.last_hidden_state, (enc.last_hidden_state,), [enc.last_hidden_state]):
        got = hostile.check(f"encoder_outputs as {type(form).__name__}",
                            lambda: m.generate(encoder_outputs=form, max_new_tokens=4, num_beams=2), expect="ok")
        assert torch.equal(got, want)


def test_narrow_integer_ids(hostile, m):
    want = m(pixel_values=PX, labels=IDS)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        got = hostile.check(f"{dtype} labels", lambda: m(pixel_values=PX, labels=IDS.to(dtype)), expect="ok")
        assert torch.equal(got.loss, want.loss)
        got = hostile.check(f"{dtype} decoder_input_ids",
                            lambda: _logits(m, pixel_values=PX, decoder_input_ids=IDS.to(dtype)), expect="ok")
        assert torch.equal(got, _logits(m, pixel_values=PX, decoder_input_ids=IDS))


def test_empty_batch(hostile, m):
    out = hostile.check("empty batch, forward", lambda: m(pixel_values=PX[:0], labels=IDS[:0]), expect="ok")
    assert out.logits.shape == (0, 5, V) and out.loss.item() == 0.0
    for kw in ({}, {"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2},
               {"do_sample": True, "num_return_sequences": 2}, {"decoder_input_ids": IDS[:0, :3]}):
        ids = hostile.check(f"empty batch, generate {kw}", lambda: m.generate(PX[:0], **kw), expect="ok")
        assert ids.shape == (0, 3 if "decoder_input_ids" in kw else 1) and ids.dtype == torch.long
    ids = hostile.check("empty encoder outputs, beams",
                        lambda: m.generate(encoder_outputs=ENC[:0], num_beams=2), expect="ok")
    assert ids.shape == (0, 1)


def test_all_ignored_labels_give_zero_loss_and_zero_gradient(hostile, m):
    ignored = torch.full_like(IDS, -100)
    m.zero_grad()
    with pytest.warns(UserWarning, match="all 10 labels are -100"):
        out = hostile.check("all labels -100", lambda: m(pixel_values=PX, labels=ignored), expect="ok")
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(bool((g == 0).all()) for g in grads)
    m.zero_grad(set_to_none=True)


def test_some_ignored_labels_keep_transformers_mean(hostile, m):
    labels = IDS.clone()
    labels[:, 3:] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = hostile.check("some labels -100", lambda: m(pixel_values=PX, labels=labels), expect="ok")
    want = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    assert torch.equal(out.loss, want)


LEGITIMATE_GENERATE = {
    "top_k larger than the vocabulary": dict(do_sample=True, top_k=10**9, seed=0),
    "num_beams = vocabulary": dict(num_beams=V, max_new_tokens=2),
    "min_new_tokens beyond max_new_tokens": dict(min_new_tokens=10**12, max_new_tokens=3),
    "no_repeat_ngram_size beyond the length": dict(no_repeat_ngram_size=10**9, max_new_tokens=3),
    "temperature 0 while greedy (ignored)": dict(temperature=0.0, max_new_tokens=3),
    "seed 2**64 - 1": dict(do_sample=True, seed=2**64 - 1, max_new_tokens=3),
    "eos_token_id [] (none)": dict(eos_token_id=[], max_new_tokens=3),
    "numpy float temperature": dict(do_sample=True, temperature=np.float64(0.7), seed=0, max_new_tokens=3),
}


@pytest.mark.parametrize("case", sorted(LEGITIMATE_GENERATE))
def test_generate_accepts(hostile, m, case):
    kw = LEGITIMATE_GENERATE[case]
    ids = hostile.check(case, lambda: m.generate(PX, **kw), expect="ok")
    assert ids.shape[0] == 2 and ids[:, 0].eq(START).all()
    assert int(ids.min()) >= 0 and int(ids.max()) < V


def test_empty_decoder_inputs_give_empty_logits(hostile, m):
    logits = hostile.check("decoder_input_ids (B, 0)",
                           lambda: _logits(m, pixel_values=PX, decoder_input_ids=IDS[:, :0]), expect="ok")
    assert logits.shape == (2, 0, V)

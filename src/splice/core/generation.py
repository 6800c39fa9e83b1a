"""Decoding: the options (``GenerationOptions``, checked in one place) and the search loops (greedy, sampling, beam
search, beam sampling). The key/value cache is ``splice.core.cache``.

The loops reproduce transformers 5's ``generate`` for encoder-decoder models token for token: the same logits
processors in the same order (repetition penalty, no-repeat n-grams, minimum length; then, when sampling,
temperature, top-k, top-p), greedy/sampling on the processed logits, beam search on processed log-probabilities
with transformers' vectorised beam bookkeeping (``2 * num_beams`` candidates, finished-hypothesis pool, length
penalty, ``early_stopping`` heuristics). What differs is the plumbing:

* the encoder runs once per image and the decoder prompt is read once per image; the cache (self-attention K/V
  and the cross-attention K/V the decoder projects on that first call) is then repeated for the beams or the
  returned sequences, instead of running the prompt and projecting the context once per beam;
* the self-attention cache is preallocated and reordered in place between two buffers;
* the output is one preallocated buffer, written one column per step (no ``torch.cat``);
* the processors work in place, without vocabulary-sized masks where a scatter does the job.

``generate_from_prompt`` runs the same loops for a decoder-only model whose first step is its own (the prefix-LM
kind: the image features spliced into the prompt's embeddings fill the cache; the later steps feed one token at a
time).
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from splice.core.cache import KVCache
from splice.core.errors import InputError, Problem
from splice.core.inputs import check_mask, check_token_ids, input_error

__all__ = ["GENERATION_OPTIONS", "GenerationOptions", "GenerationSettings", "KVCache", "generate",
           "generate_from_prompt", "resolve_settings"]

_NEG = -1.0e9  # transformers' "impossible" beam score


# ---- options and settings ----------------------------------------------------------------------------------

# transformers' own defaults (GenerationConfig._get_default_generation_params), for what nothing else sets
_HF_DEFAULTS: dict[str, Any] = dict(
    min_length=0, do_sample=False, early_stopping=False, num_beams=1, temperature=1.0, top_k=50, top_p=1.0,
    repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0, num_return_sequences=1,
)
_DEFAULT_NEW_TOKENS = 20  # transformers: with no max_length anywhere, 20 new tokens
MAX_LENGTH_PENALTY = 10.0  # |length_penalty|: length ** 10 stays finite for any position count splice accepts
_OTHER_ARGS = ("pixel_values", "decoder_input_ids", "decoder_attention_mask", "encoder_outputs", "generator", "seed")


def _bad(name: str, given: Any, expected: str, fix: str) -> InputError:
    return input_error(f"generate({name}=...)", "invalid generation argument", given=given, expected=expected, fix=fix)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    """A finite int or float (NaN, Inf and ints too large for a float are not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _at_least(low: int) -> Callable[[Any], bool]:
    return lambda x: _is_int(x) and x >= low


def _token_ids(x: Any, *, empty: bool) -> bool:
    """A token id >= 0, or a list of them (``empty``: the empty list too)."""
    if _is_int(x):
        return x >= 0
    return isinstance(x, (list, tuple)) and (empty or len(x) > 0) and all(_is_int(i) and i >= 0 for i in x)


# each option's own bound: (accepts, expected, fix). Bounds between options (num_return_sequences and num_beams,
# temperature when sampling) and those against the model (the vocabulary, the prompt, the positions, the memory)
# are checked when a call resolves its settings (``GenerationOptions.resolve``, ``generate``).
_BOUNDS: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "max_new_tokens": (_at_least(1), "an integer >= 1", "ask for at least one new token"),
    "max_length": (_at_least(2), "an integer >= 2 (it counts the prompt, at least the start token)",
                   "max_length counts the prompt too; raise it, or pass max_new_tokens instead"),
    "min_new_tokens": (_at_least(0), "an integer >= 0", "pass the number of new tokens before eos"),
    "min_length": (_at_least(0), "an integer >= 0", "pass the shortest total length (prompt included)"),
    "num_beams": (_at_least(1), "an integer >= 1", "use 1 for greedy/sampling, 2 or more for beam search"),
    "num_return_sequences": (_at_least(1), "an integer >= 1", "ask for one or more sequences per image"),
    "do_sample": (lambda x: isinstance(x, bool), "True or False", "do_sample=True samples; False decodes greedily"),
    "temperature": (_is_real, "a finite number (> 0 when sampling)",
                    "use a positive temperature; for greedy decoding pass do_sample=False instead of temperature=0"),
    "top_k": (_at_least(0), "an integer >= 0 (0 switches top-k off)", "pass e.g. top_k=50, or top_k=0"),
    "top_p": (lambda x: _is_real(x) and 0 < x <= 1, "a number in (0, 1]",
              "pass e.g. top_p=0.9, or top_p=1.0 to switch it off"),
    # a beam's score is divided by length ** length_penalty: beyond the bound that overflows a float
    "length_penalty": (lambda x: _is_real(x) and abs(x) <= MAX_LENGTH_PENALTY,
                       f"a number in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}] (> 0 favours long beams, "
                       "< 0 short ones)", "pass e.g. length_penalty=1.0 (released models use 0.6 to 2)"),
    "early_stopping": (lambda x: isinstance(x, bool) or (isinstance(x, str) and x == "never"),
                       "True, False or 'never'",
                       "True stops when num_beams hypotheses are done; False/'never' keep searching while it may help"),
    "no_repeat_ngram_size": (_at_least(0), "an integer >= 0 (0 switches it off)", "pass e.g. 3"),
    "repetition_penalty": (lambda x: _is_real(x) and x > 0,
                           "a finite number > 0 (1.0 switches it off; > 1 discourages repeats)",
                           "pass e.g. repetition_penalty=1.2"),
    "eos_token_id": (functools.partial(_token_ids, empty=True), "a token id >= 0, a list of them, or [] for none",
                     "pass the id(s) of the end-of-sequence token(s)"),
    "pad_token_id": (_at_least(0), "a token id >= 0", "pass the id that fills finished sequences"),
    "decoder_start_token_id": (_at_least(0), "a token id >= 0",
                               "pass the id the decoder starts from (tokens.decoder_start in the spec)"),
    "forced_bos_token_id": (_at_least(0), "a token id >= 0", "pass the id, or leave it None"),
    "forced_eos_token_id": (functools.partial(_token_ids, empty=False), "a token id >= 0 or a non-empty list of them",
                            "pass the id(s), or leave it None"),
}


@dataclass(frozen=True)
class GenerationOptions:
    """Every option ``generate`` takes, in one validated object: the one place generation options are checked.

    ``model.generate(**kwargs)``, a splice folder's ``generation.json`` and a transformers folder's
    ``generation_config.json`` all go through it. Making one checks each option against its own bound
    (``InputError`` naming the option, what was given, what is expected and the fix, every bad option at once);
    ``from_mapping`` refuses a name that is no option with a did-you-mean. None means "not set": the model's
    generation defaults, then its tokens, then transformers' defaults decide. ``resolve`` checks what needs the
    options together and the prompt (``num_return_sequences`` against ``num_beams``, a positive temperature when
    sampling, ``max_length`` beyond the prompt); ``generate`` then checks them against the model (token ids in the
    vocabulary, lengths within its positions, buffers within memory).

    ``GenerationOptions.from_mapping(opts.to_dict()) == opts``; ``model.generate(px, **opts.to_dict())`` decodes
    with them.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens
    min_new_tokens: int | None = None
    min_length: int | None = None  # prompt + new tokens below which eos is forbidden
    num_beams: int | None = None
    num_return_sequences: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None
    no_repeat_ngram_size: int | None = None
    repetition_penalty: float | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # () means no eos
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        problems = []
        for name, value in self.to_dict().items():
            accepts, expected, fix = _BOUNDS[name]
            if not accepts(value):
                problems.append(_bad(name, value, expected, fix).problems[0])
            elif isinstance(value, list):  # a tuple, so the object stays hashable and compares as it round-trips
                object.__setattr__(self, name, tuple(value))
        if problems:
            raise InputError(problems)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], *, unknown: Literal["refuse", "ignore"] = "refuse",
                     also: tuple[str, ...] = ()) -> GenerationOptions:
        """The options of ``options`` (None values: not set). A name that is no option (nor one of ``also``, the
        other arguments of the caller) is refused with a did-you-mean (``unknown="refuse"``) or left out
        (``unknown="ignore"``: a generation_config.json holds many more keys than generate takes)."""
        strange = [name for name in options if name not in _BOUNDS and name not in also]
        if strange and unknown == "refuse":
            raise InputError([_unknown_problem(str(name), (*GENERATION_OPTIONS, *also)) for name in strange])
        return cls(**{name: value for name, value in options.items() if name in _BOUNDS})

    def to_dict(self) -> dict[str, Any]:
        """The options that are set (not None), by name."""
        return {name: getattr(self, name) for name in _BOUNDS if getattr(self, name) is not None}

    def over(self, defaults: GenerationOptions) -> GenerationOptions:
        """These options, with ``defaults`` for those not set. The length (``max_new_tokens`` or ``max_length``) is
        taken whole from the side that sets one, so an explicit ``max_length`` wins over a default
        ``max_new_tokens``."""
        merged = {**defaults.to_dict(), **self.to_dict()}
        if self.max_new_tokens is not None or self.max_length is not None:
            merged.update(max_new_tokens=self.max_new_tokens, max_length=self.max_length)
        return GenerationOptions(**merged)

    def resolve(self, prompt_len: int, tokens: Mapping[str, Any] | None = None) -> GenerationSettings:
        """The settings of one call with a ``prompt_len``-token prompt: options not set come from ``tokens``
        (``eos``, ``pad``) and transformers' defaults; options that bound each other are checked."""
        tokens = tokens or {}
        max_len, min_len, length_from = _lengths(self, prompt_len)
        eos = self.eos_token_id if self.eos_token_id is not None else tokens.get("eos")
        eos_list = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        pad = _first(self.pad_token_id, tokens.get("pad"), eos_list[0] if eos_list else None)  # as transformers
        forced_eos = self.forced_eos_token_id
        return GenerationSettings(
            max_length=max_len, min_length=min_len, eos=eos_list, pad=pad, prompt_len=prompt_len,
            length_from=length_from, forced_bos=self.forced_bos_token_id,
            forced_eos=None if forced_eos is None else [forced_eos] if _is_int(forced_eos) else list(forced_eos),
            **_search(self))

    def _get(self, name: str) -> Any:
        """The option, or transformers' default when it is not set."""
        value = getattr(self, name)
        return _HF_DEFAULTS.get(name) if value is None else value


GENERATION_OPTIONS = tuple(_BOUNDS)  # every option generate takes, in its order


def _unknown_problem(name: str, known: tuple[str, ...]) -> Problem:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    fix = f"did you mean {close[0]!r}? Pass {close[0]}=... instead" if close else f"remove {name!r}"
    return Problem(f"generate({name}=...)", "unknown generation argument", expected="one of " + ", ".join(known),
                   fix=fix)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


@dataclass
class GenerationSettings:
    """Every knob of one generate call, resolved (explicit > generation defaults > tokens > transformers)."""

    max_length: int  # prompt + new tokens
    min_length: int  # prompt + new tokens below which eos is forbidden
    num_beams: int
    num_return_sequences: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    length_penalty: float
    early_stopping: bool | str
    no_repeat_ngram_size: int
    repetition_penalty: float
    eos: list[int]  # empty: no end-of-sequence token, every sequence runs to max_length
    pad: int | None
    prompt_len: int
    length_from: str = "max_length"  # which argument set max_length: max_new_tokens, max_length, or default
    forced_bos: int | None = None  # the token forced right after a one-token prompt (mBART-style language ids)
    forced_eos: list[int] | None = None  # the token(s) forced as the last one when max_length is reached


def resolve_settings(model, options: GenerationOptions | Mapping[str, Any], prompt_len: int,
                     decoder: Any = None) -> GenerationSettings:
    """The settings of one call: ``options`` (explicit), over ``model.generation_defaults``, ``model.tokens`` and
    transformers' defaults, every value checked (``InputError`` with what was given, what is expected, and the
    fix), token ids against the vocabulary of ``decoder`` (default: ``model.decoder``)."""
    s = _with_defaults(model, options).resolve(prompt_len, getattr(model, "tokens", None))
    decoder = getattr(model, "decoder", None) if decoder is None else decoder
    _fit_vocabulary(s, getattr(decoder, "vocab_size", None))
    return s


def _with_defaults(model, options: GenerationOptions | Mapping[str, Any]) -> GenerationOptions:
    """``options`` over ``model.generation_defaults`` (applying it twice changes nothing)."""
    if not isinstance(options, GenerationOptions):
        options = GenerationOptions.from_mapping(options)
    defaults = getattr(model, "generation_defaults", None) or {}
    return options.over(GenerationOptions.from_mapping(defaults, unknown="ignore")) if defaults else options


def _lengths(o: GenerationOptions, prompt_len: int) -> tuple[int, int, str]:
    """(max_length, min_length, which option set max_length), both lengths counting the prompt."""
    if o.max_new_tokens is not None:  # max_new_tokens > max_length > 20 new tokens
        max_len, length_from = prompt_len + o.max_new_tokens, "max_new_tokens"
    elif o.max_length is not None:
        max_len, length_from = o.max_length, "max_length"
        if max_len <= prompt_len:
            raise _bad("max_length", max_len, f"an integer > the decoder prompt length ({prompt_len})",
                       "max_length counts the prompt too; raise it, or pass max_new_tokens instead")
    else:
        max_len, length_from = prompt_len + _DEFAULT_NEW_TOKENS, "default"
    if o.min_new_tokens is not None:  # like transformers, min_new_tokens takes precedence over min_length
        min_len = prompt_len + o.min_new_tokens
    else:
        min_len = o._get("min_length")
    return max_len, min_len, length_from


def _search(o: GenerationOptions) -> dict[str, Any]:
    """Beams, sampling and score shaping, as ``GenerationSettings`` fields; the bounds between options checked."""
    num_beams, do_sample, num_return = o._get("num_beams"), o._get("do_sample"), o._get("num_return_sequences")
    if num_beams == 1 and not do_sample and num_return > 1:
        raise _bad("num_return_sequences", num_return, "1 with greedy decoding (every copy would be the same)",
                   "use num_beams >= num_return_sequences (beam search) or do_sample=True")
    if num_beams > 1 and num_return > num_beams:
        raise _bad("num_return_sequences", num_return, f"at most num_beams ({num_beams})",
                   f"raise num_beams to {num_return} or ask for fewer sequences")
    temperature = o._get("temperature")
    if do_sample and temperature <= 0:  # ignored (as transformers) when greedy
        raise _bad("temperature", temperature, "a finite number > 0",
                   "use a positive temperature; for greedy decoding pass do_sample=False instead of temperature=0")
    return dict(num_beams=num_beams, num_return_sequences=num_return, do_sample=do_sample,
                temperature=float(temperature), top_k=o._get("top_k"), top_p=float(o._get("top_p")),
                length_penalty=float(o._get("length_penalty")), early_stopping=o._get("early_stopping"),
                no_repeat_ngram_size=o._get("no_repeat_ngram_size"),
                repetition_penalty=float(o._get("repetition_penalty")))


def _fit_vocabulary(s: GenerationSettings, vocab: Any) -> None:
    """Every token id the search writes or forces lies in the decoder's vocabulary, and num_beams fits it."""
    named = (("eos_token_id", s.eos), ("pad_token_id", [] if s.pad is None else [s.pad]),
             ("forced_bos_token_id", [] if s.forced_bos is None else [s.forced_bos]),
             ("forced_eos_token_id", s.forced_eos or []))
    for name, ids in named:  # from model.tokens when no option set them: checked here
        if not all(_is_int(i) and i >= 0 for i in ids):
            raise _bad(name, ids[0] if len(ids) == 1 else ids, "token ids >= 0", "pass the id(s) of the token(s)")
    if not _is_int(vocab):
        return
    for name, ids in named:
        if any(i >= vocab for i in ids):
            raise _bad(name, ids[0] if len(ids) == 1 else ids, f"token ids < vocab_size ({vocab})",
                       f"use ids of the decoder's vocabulary (0 .. {vocab - 1})")
    if s.num_beams > vocab:
        raise _bad("num_beams", s.num_beams, f"at most vocab_size ({vocab}): the first step has only {vocab} "
                   "continuations to fill the beams with", f"use num_beams <= {vocab} (4 to 8 is usual)")


# ---- logits processors -------------------------------------------------------------------------------------


class _Processors:
    """transformers' processors for these settings, in its order, applied in place to (N, V) float32 scores.

    ``seqs[:, :cur]`` are the tokens so far (prompt included), one row per score row.
    """

    def __init__(self, s: GenerationSettings, device, prompt_pad: Tensor | None):
        self.s = s
        self.eos = torch.tensor(s.eos, dtype=torch.long, device=device) if s.eos else None
        self.forced_eos = None if s.forced_eos is None else torch.tensor(s.forced_eos, dtype=torch.long, device=device)
        # repetition penalty ignores left padding of the prompt: transformers maps those positions to a spare
        # column; reusing a real token of the row instead (penalised anyway) gives the same scores
        self.prompt_pad = prompt_pad  # (N,) count of leading padding per row, or None
        self.min_keep = (len(s.eos) + 1 if s.eos else 2) if s.num_beams > 1 else 1
        # False: every processor is off for these settings, and calling them would only cost time
        self.active = (s.repetition_penalty != 1.0 or s.no_repeat_ngram_size > 0 or s.min_length > s.prompt_len
                       or s.forced_bos is not None or s.forced_eos is not None or s.do_sample)

    def __call__(self, scores: Tensor, seqs: Tensor, cur: int) -> Tensor:
        s = self.s
        if s.repetition_penalty != 1.0:
            ids = seqs[:, :cur]  # (N, cur)
            if self.prompt_pad is not None:
                first = ids.gather(1, self.prompt_pad[:, None])  # (N, 1) the first real token
                positions = torch.arange(cur, device=ids.device)
                ids = torch.where(positions[None, :] < self.prompt_pad[:, None], first, ids)
            seen = scores.gather(1, ids)  # (N, cur)
            seen = torch.where(seen < 0, seen * s.repetition_penalty, seen / s.repetition_penalty)
            scores.scatter_(1, ids, seen)  # repeated ids write the same value
        n = s.no_repeat_ngram_size
        if n > 0 and cur >= n:
            ids = seqs[:, :cur]
            windows = ids.unfold(1, n, 1)  # (N, cur-n+1, n)
            prefix = ids[:, cur + 1 - n :]  # (N, n-1) the n-gram an appended token would complete
            hit = (windows[..., :-1] == prefix[:, None, :]).all(-1)  # (N, W)
            inf = torch.tensor(float("inf"), device=scores.device, dtype=scores.dtype)
            # a min-scatter: banned tokens get -inf, the others min(score, +inf) = score (no (N, V) mask)
            scores.scatter_reduce_(1, windows[..., -1], torch.where(hit, -inf, inf), reduce="amin")
        if self.eos is not None and cur < s.min_length:
            scores.index_fill_(1, self.eos, float("-inf"))
        if s.forced_bos is not None and cur == 1:
            scores.fill_(float("-inf"))[:, s.forced_bos] = 0
        if self.forced_eos is not None and cur == s.max_length - 1:
            scores.fill_(float("-inf")).index_fill_(1, self.forced_eos, 0)
        if s.do_sample:
            if s.temperature != 1.0:
                scores.div_(s.temperature)
            if s.top_k != 0:
                k = min(max(s.top_k, self.min_keep), scores.shape[-1])
                kth = torch.topk(scores, k).values[:, -1:]  # (N, 1)
                scores.masked_fill_(scores < kth, float("-inf"))
            if s.top_p < 1.0:
                ordered, order = torch.sort(scores, descending=False)  # (N, V)
                drop = ordered.softmax(-1).cumsum(-1) <= (1 - s.top_p)
                drop[:, -self.min_keep :] = False
                scores.masked_fill_(drop.scatter(1, order, drop), float("-inf"))
        return scores


# ---- generate ----------------------------------------------------------------------------------------------


def _outside_inference_mode(fn):
    """Run ``fn`` under ``torch.inference_mode`` (the fastest decoding) and hand back a normal tensor: an
    inference tensor could not be used later as training labels or anywhere autograd records."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            ids = fn(*args, **kwargs)
        return ids.clone()  # (N, L) token ids: a copy of a few hundred integers

    return wrapper


@_outside_inference_mode
def generate(
    model,
    pixel_values: Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int | None = None,
    min_length: int | None = None,
    num_beams: int | None = None,
    num_return_sequences: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    no_repeat_ngram_size: int | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
    forced_bos_token_id: int | None = None,
    forced_eos_token_id: int | list[int] | None = None,
    decoder_input_ids: Tensor | None = None,
    decoder_attention_mask: Tensor | None = None,
    encoder_outputs: Any = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    **unknown: Any,
) -> Tensor:
    """Caption token ids, as transformers' ``generate`` returns them: (B * num_return_sequences, prompt + new).

    Greedy by default; ``num_beams > 1`` beam search; ``do_sample=True`` sampling (with beams: beam sampling).
    An argument left ``None`` comes from ``model.generation_defaults`` (a splice folder's generation.json, or a transformers
    folder's generation_config.json), then ``model.tokens``, then transformers' defaults (20 new tokens, top_k 50
    when sampling, ...). The prompt defaults to ``decoder_start``; a ``decoder_input_ids`` prompt that does not
    start with it gets it prepended, as in transformers; ``decoder_attention_mask`` marks left padding.
    Sequences that end early are padded with ``pad_token_id``. Sampling draws from ``generator`` (or a fresh
    one seeded with ``seed``), else from torch's global generator.

    Inputs are checked as ``model.forward`` checks them (``splice.core.inputs.check_pixels``: fp16/bf16/fp64
    pixels are cast, NaN/Inf pixels refused), and every option before anything is allocated: token ids must fit
    the vocabulary, numbers must be finite, num_beams <= vocab_size, and a search whose buffers would not fit in
    the device's free memory (at most ``MAX_DECODE_BYTES``) is refused (``_fit_memory``). Tensors must be on the
    model's device. An empty batch gives (0, prompt length) ids without running the decoder.

    The options go through ``GenerationOptions`` (``model.generate(px, **options.to_dict())`` passes an object's);
    a name that is none of these arguments is refused with a did-you-mean.
    """
    options = _with_defaults(model, GenerationOptions.from_mapping(dict(
        max_new_tokens=max_new_tokens, max_length=max_length, min_new_tokens=min_new_tokens, min_length=min_length,
        num_beams=num_beams, num_return_sequences=num_return_sequences, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, length_penalty=length_penalty, early_stopping=early_stopping,
        no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, decoder_start_token_id=decoder_start_token_id,
        forced_bos_token_id=forced_bos_token_id, forced_eos_token_id=forced_eos_token_id, **unknown,
    ), also=_OTHER_ARGS))

    # -- the image context: the encoder runs once per image
    context = model.context(model.encoder_hidden(pixel_values, encoder_outputs))  # (B, N, D_ctx)
    device = context.device

    # -- the decoder prompt and the settings, all checked before anything is allocated
    start = _start_token(model, options.decoder_start_token_id, getattr(model, "generation_defaults", None) or {})
    prompt, prompt_mask = _prompt(decoder_input_ids, decoder_attention_mask, start, context,
                                  model.decoder.vocab_size)
    s = resolve_settings(model, options, prompt.shape[1])
    generator = _generator(generator, seed, device)
    _fit_positions(s, model.decoder, options)
    _fit_memory(s, model.decoder, context)
    return _decode(s, model.decoder, prompt, prompt_mask, context, generator)


@_outside_inference_mode
def generate_from_prompt(model, decoder, prompt: Tensor, prompt_mask: Tensor | None,
                         prefill: Callable[[KVCache], Tensor], *, generator: torch.Generator | None = None,
                         seed: int | None = None, **options: Any) -> Tensor:
    """Decoding for a decoder-only model whose first step is its own (the prefix-LM kind: the image features
    spliced into the prompt's embeddings): (B * num_return_sequences, P + new) token ids, the prompt first.

    ``prompt`` (B, P) are the prompt's token ids, checked by the caller, left-padded as ``prompt_mask`` (B, P)
    says (None: no padding); ``prefill(cache)`` runs the whole prompt through ``decoder`` once per row, filling
    ``cache`` (a ``KVCache`` of ``len(decoder.layer_specs())`` layers), and returns the next-token logits (B, V).
    Every later step feeds ``decoder`` one token per row with the cache, as ``generate`` does. The options are
    ``generate``'s (over ``model.generation_defaults`` and ``model.tokens``), checked the same way; the image
    positions are part of the prompt, so ``max_length`` counts them."""
    options = _with_defaults(model, GenerationOptions.from_mapping(options))
    s = resolve_settings(model, options, prompt.shape[1], decoder)
    generator = _generator(generator, seed, prompt.device)
    _fit_positions(s, decoder, options)
    home = next((p for p in decoder.parameters() if p.is_floating_point()), None)
    _fit_memory(s, decoder, prompt.new_empty((prompt.shape[0], 0), dtype=home.dtype if home is not None else None))
    return _decode(s, decoder, prompt, prompt_mask, None, generator, first=prefill)


def _decode(s: GenerationSettings, decoder, prompt: Tensor, prompt_mask: Tensor | None, context: Tensor | None,
            generator: torch.Generator | None, first: Callable[[KVCache], Tensor] | None = None) -> Tensor:
    """The prompt run once (``first``, else ``decoder`` on the ids), then the search the settings ask for."""
    B = prompt.shape[0]
    if B == 0:  # nothing to decode: the empty prompt, as wide as it is
        return prompt
    prompt, logits, step, processors = _prefill(decoder, s, prompt, prompt_mask, context, first)
    if s.num_beams > 1:
        return _beam_search(s, prompt, logits, step, processors, generator, B)
    return _greedy_or_sample(s, prompt, logits, step, processors, generator)


def _start_token(model, given: int | None, defaults: dict) -> int:
    start = given
    for value in (defaults.get("decoder_start_token_id"), model.tokens.get("decoder_start"),
                  defaults.get("bos_token_id")):
        start = value if start is None else start
    if start is None:
        raise InputError("tokens.decoder_start is not set, so generation has no first token\n"
                         "    fix: add `tokens: {decoder_start: <id>}` to the spec, or pass decoder_start_token_id")
    vocab = model.decoder.vocab_size
    if not _is_int(start) or not 0 <= start < vocab:
        raise _bad("decoder_start_token_id", start, f"a token id in [0, {vocab - 1}] (vocab_size={vocab})",
                   "pass the id the decoder starts from (tokens.decoder_start in the spec)")
    return start


def _generator(generator: torch.Generator | None, seed: Any, device) -> torch.Generator | None:
    if generator is not None and seed is not None:
        raise _bad("seed", seed, "either generator or seed, not both", "drop one of them")
    if seed is not None:
        if not _is_int(seed) or not -(2**63) <= seed < 2**64:
            raise _bad("seed", seed, "an integer in [-2**63, 2**64)", "pass e.g. seed=0")
        generator = torch.Generator(device=device).manual_seed(seed)
    if generator is not None and (not isinstance(generator, torch.Generator)
                                  or generator.device.type != torch.device(device).type):
        raise _bad("generator", generator, f"a torch.Generator on {torch.device(device).type}, where the model is",
                   f"pass torch.Generator(device={str(device)!r}).manual_seed(...), or seed=...")
    return generator


def _fit_positions(s: GenerationSettings, decoder, options: GenerationOptions) -> None:
    """Shorten a default max_length to the decoder's positions; an asked-for length that does not fit raises."""
    P = s.prompt_len
    limit = getattr(decoder, "max_positions", None)  # the longest sequence the decoder reads
    if _is_int(limit) and s.max_length - 1 > limit:  # the last token is never fed back
        if s.length_from == "default" and limit + 1 > P:
            s.max_length = limit + 1
        else:
            raise _bad(s.length_from, getattr(options, s.length_from, None) or s.max_length,
                       f"prompt + new tokens <= {limit + 1}: the decoder reads at most {limit} positions",
                       f"ask for at most {limit + 1 - P} new tokens (max_length <= {limit + 1})")


MAX_DECODE_BYTES = 1 << 40  # the bound on decoding buffers where a device's free memory cannot be read
_READ_FREE_FROM = 1 << 30  # smaller estimates pass without reading the free memory: a normal call costs nothing


def _fit_memory(s: GenerationSettings, decoder, context: Tensor) -> None:
    """Refuse, before allocating, a search whose buffers cannot fit (``num_beams=10**6`` must be an InputError,
    not an allocator failure or the OOM killer).

    The estimate is per decoded row (B x num_beams, or B x num_return_sequences): a few float32 (rows, V) score
    tensors, the self-attention cache of max_length positions (two buffers when beams reorder it), the
    cross-attention K/V of the N context tokens, and the int64 ids. Above 1 GiB it is compared with the free
    memory of the device (CUDA: ``torch.cuda.mem_get_info`` plus what torch's allocator holds unused; CPU:
    MemAvailable, or the cgroup's limit when lower), else with ``MAX_DECODE_BYTES``.
    """
    B, N = context.shape[0], context.shape[1]
    rows = B * (s.num_beams if s.num_beams > 1 else s.num_return_sequences)
    widths = sum(spec.width for spec in decoder.layer_specs())  # K and V of every layer, per position
    buffers = 2 if s.num_beams > 1 else 1
    per_row = (4 * 4 * decoder.vocab_size + 2 * widths * context.element_size() * (buffers * s.max_length + N)
               + 3 * 8 * s.max_length)
    need = rows * per_row
    if need <= _READ_FREE_FROM:
        return
    free = _free_memory(context.device)
    limit = MAX_DECODE_BYTES if free is None else min(free, MAX_DECODE_BYTES)
    if need > limit:
        name, given = (("num_beams", s.num_beams) if s.num_beams > 1 else
                       ("num_return_sequences", s.num_return_sequences) if s.num_return_sequences > 1 else
                       ("max_length", s.max_length))
        raise _bad(name, given, f"a search that fits in memory: {B} image(s) x {rows // max(B, 1):,} row(s) x "
                   f"{s.max_length} positions need about {need / 2**30:,.1f} GiB, and {limit / 2**30:,.1f} GiB is "
                   f"free on {context.device}", "lower num_beams, num_return_sequences or max_new_tokens, or "
                   "decode fewer images per call")


def _free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``, or None where that cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:  # a container's limit (cgroup v2)
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), int(g.read())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _prefill(decoder, s: GenerationSettings, prompt: Tensor, prompt_mask: Tensor | None, context: Tensor | None,
             first: Callable[[KVCache], Tensor] | None = None):
    """Run the prompt once per image (``first(cache)`` when given: the caller's own first step), then repeat its
    cache for the beams / returned samples.

    Returns the (N, P) prompts, their next logits (N, V), ``step`` (the next logits after more tokens) and the
    logits processors."""
    P = prompt.shape[1]
    expand = s.num_beams if s.num_beams > 1 else s.num_return_sequences
    cache = KVCache(len(decoder.layer_specs()), s.max_length)
    if first is not None:
        logits = first(cache).contiguous()  # (B, V)
    else:
        out = decoder(prompt, context=context, attention_mask=prompt_mask, cache=cache)
        logits = out.logits[:, -1].contiguous()  # (B, V); a copy when P > 1, so the prompt's logits can go
        del out
    if expand > 1:
        cache.repeat_interleave(expand)
        if context is not None:
            context = context.repeat_interleave(expand, dim=0)  # (B*e, N, D) for decoders that re-read it
        logits = logits.repeat_interleave(expand, dim=0)  # (B*e, V)
        prompt = prompt.repeat_interleave(expand, dim=0)
        if prompt_mask is not None:
            prompt_mask = prompt_mask.repeat_interleave(expand, dim=0)
    mask = None
    if prompt_mask is not None:  # (N, max_length) ones after the prompt; each step passes a view of it
        mask = prompt_mask.new_ones(prompt.shape[0], s.max_length)
        mask[:, :P] = prompt_mask
    prompt_pad = None if prompt_mask is None else (prompt_mask != 0).int().argmax(dim=1)  # (N,)
    processors = _Processors(s, prompt.device, prompt_pad)

    def step(tokens: Tensor, cur: int, reorder: Tensor | None = None) -> Tensor:
        """The next logits (N, V) after appending ``tokens`` (N, 1); ``reorder`` first picks the cache rows."""
        if reorder is not None:
            cache.reorder(reorder)
        am = None if mask is None else mask[:, :cur]
        return decoder(tokens, context=context, attention_mask=am, cache=cache).logits[:, -1]

    return prompt, logits, step, processors


def _prompt(ids: Any, mask: Any, start: int, context: Tensor, vocab: int) -> tuple[Tensor, Tensor | None]:
    """(B, P) decoder prompt and its (B, P) mask, or None when no position is padding; both checked (integer ids
    in the vocabulary, one row per image, on the context's device)."""
    B = context.shape[0]
    if ids is None:
        if mask is not None:
            raise _bad("decoder_attention_mask", tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__,
                       "no mask without decoder_input_ids",
                       "pass the decoder_input_ids it belongs to, or drop it")
        return torch.full((B, 1), start, dtype=torch.long, device=context.device), None
    ids = check_token_ids("decoder_input_ids", ids, B, vocab, context)[0].long()
    if mask is not None:
        check_mask(mask, tuple(ids.shape), context)
        mask = mask.long()
    if ids.shape[1] == 0 or (B > 0 and bool((ids[:, 0] != start).all())):
        # transformers: a prompt that does not start with decoder_start gets it prepended
        ids = torch.cat([ids.new_full((B, 1), start), ids], dim=1)
        if mask is not None:
            mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)
    if mask is not None and bool((mask != 0).all()):
        mask = None  # nothing is padding: the decoder's plain causal path gives the same result, faster
    return ids, mask


def _greedy_or_sample(s: GenerationSettings, prompt: Tensor, logits: Tensor, step, processors: _Processors,
                      generator: torch.Generator | None) -> Tensor:
    N, P = prompt.shape
    seqs = prompt.new_full((N, s.max_length), s.pad if s.pad is not None else 0)  # the output buffer
    seqs[:, :P] = prompt
    eos = processors.eos
    unfinished = torch.ones(N, dtype=torch.bool, device=prompt.device)
    pad = torch.tensor(s.pad if s.pad is not None else 0, device=prompt.device)
    # below min_length the processors ban eos, so no row can end and the bookkeeping can wait; a forced first
    # token (forced_bos, applied after the ban) may be eos, so it is tracked from the start then
    track_from = s.min_length if s.forced_bos is None else 0
    cur = P
    while True:
        scores = logits.float()  # float32 as transformers (a no-op for fp32 models)
        if processors.active:
            scores = processors(scores, seqs, cur)
        if s.do_sample:
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)  # (N,)
        else:
            nxt = scores.argmax(-1)  # (N,)
        if eos is not None and cur >= track_from:
            nxt = torch.where(unfinished, nxt, pad)
            unfinished &= ~torch.isin(nxt, eos)
        seqs[:, cur] = nxt
        cur += 1
        if cur >= s.max_length or (eos is not None and cur > track_from and not bool(unfinished.any())):
            return seqs[:, :cur].contiguous()
        logits = step(seqs[:, cur - 1 : cur], cur)


def _candidates(logp: Tensor, keep: int, do_sample: bool, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The ``keep`` continuations (score, flat index) of each image's (B, K * V) scores, best first."""
    if not do_sample:
        return torch.topk(logp, keep)
    idx = torch.multinomial(logp.softmax(-1), keep, generator=generator)  # (B, keep), no replacement
    # best first: the first K positions stand for "the K best", and in drawn order a lower-scoring draw could take
    # a hypothesis slot from a better one (transformers' vectorised beam search did that from 4.5x to 5.23; 4.45's
    # beam sample and 5.24 sort)
    top, order = logp.gather(1, idx).sort(dim=-1, descending=True)
    return top, idx.gather(1, order)


def _may_improve(s: GenerationSettings, running_scores: Tensor, hyp_scores: Tensor, hyp_done: Tensor,
                 cur: int) -> Tensor:
    """(B, 1): can the best running beam still beat the worst hypothesis? (transformers' heuristic per
    early_stopping)"""
    if s.early_stopping == "never" and s.length_penalty > 0.0:
        best_len = s.max_length - s.prompt_len
    else:
        best_len = cur - s.prompt_len
    best_running = running_scores[:, :1] / (best_len ** s.length_penalty)  # (B, 1)
    worst_hyp = torch.where(hyp_done, hyp_scores.min(dim=1, keepdim=True).values, _NEG)  # (B, K)
    return (best_running > worst_hyp).any(-1, keepdim=True)


def _beam_search(s: GenerationSettings, prompt: Tensor, logits: Tensor, step, processors: _Processors,
                 generator: torch.Generator | None, B: int) -> Tensor:
    """transformers' vectorised beam search: the best ``keep`` continuations of all beams, the best
    ``num_beams`` unfinished ones run on, finished ones enter a per-image pool of ``num_beams`` hypotheses."""
    K, L, P = s.num_beams, s.max_length, s.prompt_len
    N, V = logits.shape
    device = prompt.device
    eos = processors.eos
    keep = max(2, 1 + len(s.eos)) * K  # enough candidates that K survive even if the best all end here
    top_k_mask = torch.arange(keep, device=device) < K  # only the first K candidates may become hypotheses
    # transformers fills unused positions with `pad or eos[0]` (so a pad of 0 reads as eos[0]), -1 without eos
    fill = (s.pad or s.eos[0]) if s.eos else -1
    running = prompt.new_full((B, K, L), fill)  # (B, K, L)
    running[:, :, :P] = prompt.view(B, K, P)
    hyps = running.clone()  # finished hypotheses, best first
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = _NEG  # all beams start identical: only the first may expand at step one
    hyp_scores = torch.full((B, K), _NEG, device=device)
    hyp_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
    running_src = torch.full((B, K, L - P), -1, dtype=torch.int32, device=device)  # flat beam row per new token
    hyp_src = running_src.clone()
    offset = (torch.arange(B, device=device) * K)[:, None]  # (B, 1)
    cur = P
    while True:
        logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
        logp = processors(logp, running.view(N, L), cur)
        logp = logp.view(B, K, V).add_(running_scores[:, :, None]).view(B, K * V)
        top, idx = _candidates(logp, keep, s.do_sample, generator)  # (B, keep) each, best first
        beam = idx // V  # (B, keep) which beam each candidate extends
        token = idx % V
        cand = running.gather(1, beam[:, :, None].expand(B, keep, L))  # (B, keep, L)
        cand[:, :, cur] = token
        cand_src = running_src.gather(1, beam[:, :, None].expand(B, keep, L - P))
        cand_src[:, :, cur - P] = (beam + offset).to(torch.int32)
        if cur + 1 >= L:
            ends = torch.ones(B, keep, dtype=torch.bool, device=device)
        elif eos is not None:
            ends = torch.isin(token, eos)
        else:
            ends = torch.zeros(B, keep, dtype=torch.bool, device=device)

        # the K best candidates that did not end run on
        alive = top + ends.to(torch.float32) * _NEG
        pick = torch.topk(alive, K)[1]  # (B, K)
        running = cand.gather(1, pick[:, :, None].expand(B, K, L))
        running_scores = alive.gather(1, pick)
        running_src = cand_src.gather(1, pick[:, :, None].expand(B, K, L - P))

        # candidates among the first K that ended compete for the hypothesis pool, length-penalised
        ended = ends & top_k_mask
        score = top / ((cur + 1 - P) ** s.length_penalty)
        if s.early_stopping is True:
            score += hyp_done.all(-1, keepdim=True).to(torch.float32) * _NEG
        score += (~can_improve).to(torch.float32) * _NEG
        score += (~ended) * _NEG
        pool_scores = torch.cat((hyp_scores, score), dim=1)  # (B, K + keep)
        pick = torch.topk(pool_scores, K)[1]
        hyps = torch.cat((hyps, cand), dim=1).gather(1, pick[:, :, None].expand(B, K, L))
        hyp_scores = pool_scores.gather(1, pick)
        hyp_src = torch.cat((hyp_src, cand_src), dim=1).gather(1, pick[:, :, None].expand(B, K, L - P))
        hyp_done = torch.cat((hyp_done, ended), dim=1).gather(1, pick)

        cur += 1
        can_improve = can_improve & _may_improve(s, running_scores, hyp_scores, hyp_done, cur)
        go_on = can_improve.any() & ~ends.all()
        if s.early_stopping is True:
            go_on = go_on & ~hyp_done.all()
        if not bool(go_on):
            break
        rows = running_src[:, :, cur - 1 - P].reshape(N).long()  # the cache row each running beam continues
        logits = step(running.view(N, L)[:, cur - 1 : cur], cur, reorder=rows)

    R = s.num_return_sequences
    hyps = hyps[:, :R].reshape(B * R, L)
    new = int((hyp_src[:, :R].reshape(B * R, L - P) >= 0).sum(1).max())
    return hyps[:, : P + new].contiguous()

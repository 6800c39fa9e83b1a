"""The conformance kit: check a registered component against splice's contract, from its ``tiny`` config.

    from splice import testing
    testing.check("decoder", "my_lm")                       # every check for that role; raises ConformanceError
    testing.check_cache("decoder", "my_lm")                 # one check
    testing.check_pair("my_cnn", "my_lm")                   # the pair with each adapter kind

    @testing.parametrize(plugin="my_plugin")                # pytest: one test per (check, component)
    def test_conformance(case):
        case.run()

Each check raises ``ConformanceError`` (an ``AssertionError``) whose message names the check and the component
(its plugin and package), says what was found and what was expected. A check that does not apply (a decoder that
refuses padded batches with a ``SpliceError``; no transformers export half) returns the reason, and ``Case.run``
turns it into a pytest skip. The checks, per role (``CHECKS``):

- ``validate``: the component validates on the meta device, with a partner (``PARTNERS``) where it needs one;
- ``widths``: declared widths (``hidden_size``, ``vocab_size``, ``layer_specs``) against the real outputs;
- ``gradients``: forward + backward, every trainable parameter gets a finite gradient;
- ``cache``: decoding with the KV cache (a prompt, then one token at a time) equals recomputing the whole sequence,
  logits and greedy tokens;
- ``beams``: beam search with the cache picks the tokens beam search picks when every step recomputes the sequence;
- ``padding``: padding never leaks into the real tokens (right padding: their outputs as without padding; left
  padding: their outputs do not depend on what the masked positions hold);
- ``positions``: positions follow the attention mask (``cumsum(mask) - 1``, as transformers' decoder-only
  ``generate``), so a left-padded row's real tokens get the outputs they have without padding;
- ``save_load``: ``save_pretrained`` then ``splice.load`` is bit-exact (tensors; logits to float rounding);
- ``hf_export``: with ``HFInterop``'s export half, the checkpoint and config go to transformers' names and back
  unchanged; a pair exported with ``splice.export_transformers`` reads back through ``splice.load`` (the
  transformers-layout reader) with the same logits. The kit never imports transformers (a test-only oracle):
  parity with transformers itself is for the plugin's own tests.

Everything runs on the CPU in a few seconds per component; decoding checks run in float64 so that rounding cannot
flip a greedy or beam choice.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["CHECKS", "PARTNERS", "Case", "ConformanceError", "check", "check_beams", "check_cache",
           "check_gradients", "check_hf_export", "check_padding", "check_pair", "check_positions", "check_save_load",
           "check_validate", "check_widths", "conformance_cases", "parametrize", "plugins"]

PARTNERS = {"encoder": ("vit", "starter_cnn", "toyconv"), "decoder": ("gpt2", "starter_lm", "tinyllama")}
ATOL = 1e-6  # float64 decoding checks; float32 reloads compare to this too (BLAS may sum in another order)


class ConformanceError(AssertionError):
    """A component broke the contract: ``check`` names the check, ``component`` the component and its plugin."""

    def __init__(self, check: str, component: str, message: str, fix: str = ""):
        self.check, self.component = check, component
        text = f"conformance check '{check}' failed for {component}: {message}"
        super().__init__(text + (f"\n    fix: {fix}" if fix else ""))


# -- the component, built from its tiny config ------------------------------------------------------------------


def _entry(kind: str, name: str):
    from splice.core.plugins import get_registry

    return get_registry().get(kind, name)


def _who(kind: str, name: str) -> str:
    from splice.core.roles import who

    return who(_entry(kind, name))


def _fail(check: str, kind: str, name: str, message: str, fix: str = "") -> ConformanceError:
    return ConformanceError(check, _who(kind, name), message, fix or "see docs/writing-a-plugin.md, 'The protocols'")


def _tiny(kind: str, name: str) -> dict:
    return dict(_entry(kind, name).tiny or {})


def _build(kind: str, name: str, seed: int = 0) -> nn.Module:
    entry = _entry(kind, name)
    torch.manual_seed(seed)
    return entry.builder(entry.make_config(entry.tiny)).eval()


def _partner(kind: str) -> str:
    from splice.core.plugins import get_registry

    registry = get_registry()
    for name in PARTNERS[kind]:
        if registry.has(kind, name):
            return name
    return registry.names(kind)[0]


def _tokens(vocab: int) -> dict:
    return {"decoder_start": vocab - 1, "pad": 0, "eos": vocab - 2}


def pair_spec(encoder: str, decoder: str, adapter: str | None = "standard") -> dict:
    """The encoder-decoder spec of two components' tiny variants (``adapter=None``: the decoder's own)."""
    dec = _entry("decoder", decoder)
    vocab = dec.make_config(dec.tiny).model_dump().get("vocab_size", 99)
    spec = {"encoder": {"name": encoder, "config": _tiny("encoder", encoder)},
            "decoder": {"name": decoder, "config": _tiny("decoder", decoder)}, "tokens": _tokens(int(vocab))}
    if adapter is not None and not getattr(_build("decoder", decoder), "native_cross_attention", False):
        spec["cross_attention"] = {"kind": adapter, "layers": "all"}
    return spec


def _pair_for(kind: str, name: str, adapter: str | None = "standard") -> dict:
    if kind == "encoder":
        return pair_spec(name, _partner("decoder"), adapter)
    if kind == "decoder":
        return pair_spec(_partner("encoder"), name, adapter)
    return pair_spec(_partner("encoder"), _partner("decoder"), name)  # an adapter


def _decoder_with_slots(name: str, seed: int = 0) -> tuple[nn.Module, int]:
    """The decoder from its tiny config with the ``standard`` adapter in every slot (unless it has its own), and
    the context width it reads."""
    decoder = _build("decoder", name, seed)
    context_width = getattr(decoder, "context_width", decoder.hidden_size) if decoder.native_cross_attention else 24
    if not decoder.native_cross_attention:
        adapter = _entry("adapter", "standard")
        kind = adapter.builder(adapter.make_config({}))
        for spec in decoder.layer_specs():
            decoder.install_cross_attention(spec.index, kind.build(spec, context_width))
    return decoder.eval(), context_width


def _ids(B: int, T: int, vocab: int, low: int = 1, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, max(vocab, low + 1), (B, T), generator=g)


def _close(a: Tensor, b: Tensor, atol: float = ATOL) -> tuple[bool, float]:
    if a.shape != b.shape:
        return False, math.inf
    d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    return d <= atol * max(1.0, b.double().abs().max().item() if b.numel() else 1.0), d


# -- the checks ------------------------------------------------------------------------------------------------


def check_validate(kind: str, name: str) -> None:
    """The component validates (meta device and role checks), paired with a partner where its role needs one."""
    if kind == "text_encoder":
        from splice.core.roles import check_role

        problems: list = []
        check_role(_entry(kind, name), _build(kind, name), "text", problems)
    else:
        import splice

        problems = list(splice.validate(_pair_for(kind, name)).problems)
    if problems:
        raise _fail("validate", kind, name, "; ".join(str(p) for p in problems))


def check_widths(kind: str, name: str) -> None:
    """Declared widths against the real outputs of a batch of two."""
    if kind == "adapter":
        return _adapter_widths(name)
    module = _build(kind, name)
    with torch.no_grad():
        if kind == "encoder":
            return _encoder_widths(module, name)
        vocab, D = module.vocab_size, module.hidden_size
        ids = _ids(2, 5, vocab)
        if kind == "text_encoder":
            out = module(ids, attention_mask=torch.ones_like(ids))
            _shape("widths", kind, name, "last_hidden_state", out.last_hidden_state, (2, 5, D))
            if out.pooler_output is not None:
                _shape("widths", kind, name, "pooler_output", out.pooler_output, (2, D))
            return None
        specs = module.layer_specs()
        for s in specs:
            if s.width % s.heads:
                raise _fail("widths", kind, name, f"layer {s.index}: heads {s.heads} do not divide width {s.width}")
        out = module(ids)
        _shape("widths", kind, name, "logits", out.logits, (2, 5, vocab))
        if out.hidden_states is not None:
            _shape("widths", kind, name, "hidden_states", out.hidden_states, (2, 5, D))
    return None


def _shape(check: str, kind: str, name: str, what: str, t: Any, want: tuple) -> None:
    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
    if got != want:
        raise _fail(check, kind, name, f"{what} is {got}, expected {want} (from the widths it declares)")


def _encoder_widths(module: nn.Module, name: str) -> None:
    pre = module.preprocessing
    px = torch.randn(2, pre.in_chans, *pre.image_size)
    out = module(px, output_hidden_states=True)
    last = out.last_hidden_state
    if not isinstance(last, Tensor) or last.dim() != 3 or last.shape[0] != 2 or last.shape[-1] != module.hidden_size:
        got = tuple(last.shape) if isinstance(last, Tensor) else type(last).__name__
        raise _fail("widths", "encoder", name, f"it declares hidden_size {module.hidden_size}, but "
                    f"last_hidden_state is {got}", "make hidden_size the width of last_hidden_state (B, N, D)")
    for i, h in enumerate(out.hidden_states or ()):
        if not isinstance(h, Tensor) or h.dim() != 3 or h.shape[0] != 2:
            raise _fail("widths", "encoder", name, f"hidden_states[{i}] is not a (B, N_i, D_i) tensor",
                        "return each stage's tokens, (B, N_i, D_i), each at its own width")
    if out.pooler_output is not None:
        _shape("widths", "encoder", name, "pooler_output", out.pooler_output, (2, module.hidden_size))


def _adapter_widths(name: str) -> None:
    from splice.core.interfaces import LayerSpec

    entry = _entry("adapter", name)
    kind = entry.builder(entry.make_config({}))
    for norm_kind in ("layer", "rms"):
        spec = LayerSpec(0, 16, 4, "pre", 1e-5, norm_kind=norm_kind)
        module = kind.build(spec, 24).eval()
        x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 24)
        with torch.no_grad():
            out, kv = module(x, context=ctx), module.context_kv(ctx)
            _shape("widths", "adapter", name, "the slot's output", out, (2, 3, 16))
            if len(kv) != 2 or any(t.dim() != 4 or t.shape[0] != 2 or t.shape[2] != 5 for t in kv):
                raise _fail("widths", "adapter", name, "context_kv did not return (k, v), each (B, heads, N, hs)")
            ok, d = _close(module(x, kv=kv), out)
        if not ok:
            raise _fail("widths", "adapter", name, f"forward with kv differs from forward with context by {d:.3g}")


def check_gradients(kind: str, name: str) -> None:
    """Forward + backward: every trainable parameter gets a finite gradient."""
    g = torch.Generator().manual_seed(1)
    if kind == "adapter":
        module = check_widths_module(name)
        outputs = [module(torch.randn(2, 3, 16), context=torch.randn(2, 5, 24))]
    elif kind == "encoder":
        module = _build(kind, name)
        pre = module.preprocessing
        out = module(torch.randn(2, pre.in_chans, *pre.image_size, generator=g), output_hidden_states=True)
        outputs = [out.last_hidden_state, *(out.hidden_states or ()), out.pooler_output]
    elif kind == "decoder":
        module, width = _decoder_with_slots(name)
        out = module(_ids(2, 5, module.vocab_size), context=torch.randn(2, 4, width, generator=g))
        outputs = [out.logits, out.hidden_states]
    else:
        module = _build(kind, name)
        ids = _ids(2, 5, module.vocab_size)
        out = module(ids, attention_mask=torch.ones_like(ids))
        outputs = [out.last_hidden_state, out.pooler_output]
    loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in outputs if isinstance(t, Tensor))
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    bad = [n for n, p in module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if missing or bad:
        raise _fail("gradients", kind, name, f"no gradient for {missing[:5]}" if missing else
                    f"non-finite gradient for {bad[:5]}", "every trainable parameter must take part in forward "
                    "(or be frozen with requires_grad=False, or be a buffer)")


def check_widths_module(name: str) -> nn.Module:
    """The module an adapter builds for a 16-wide, 4-head pre-norm layer reading a 24-wide context."""
    from splice.core.interfaces import LayerSpec

    entry = _entry("adapter", name)
    return entry.builder(entry.make_config({})).build(LayerSpec(0, 16, 4, "pre", 1e-5), 24)


def check_cache(kind: str, name: str) -> None:
    """Cached decoding equals recomputation: logits of a prompt then one token at a time, and greedy tokens."""
    from splice.core.cache import KVCache

    decoder, width = _decoder_with_slots(name)
    decoder = decoder.double()
    ids = _ids(2, 9, decoder.vocab_size)
    ctx = torch.randn(2, 4, width, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        full = decoder(ids, context=ctx).logits
        cache = KVCache(num_layers=len(decoder.layer_specs()), max_len=9)
        parts, start = [], 0
        for n in (4, 1, 1, 2, 1):
            parts.append(decoder(ids[:, start:start + n], context=ctx if start == 0 else None, cache=cache).logits)
            start += n
    ok, d = _close(torch.cat(parts, 1), full)
    if not ok:
        raise _fail("cache", kind, name, f"logits with the KV cache (a 4-token prompt, then 1, 1, 2, 1 tokens) differ "
                    f"from one forward over all 9 tokens by {d:.3g}", "store every layer's keys/values with "
                    "cache.update(layer, k, v) and attend to all it returns; offset positions by cache.length; call "
                    "cache.advance(T) once per forward")
    _same_tokens("cache", kind, name, num_beams=1)


def check_beams(kind: str, name: str) -> None:
    """Beam search with the cache picks the tokens of beam search that recomputes the whole sequence each step."""
    _same_tokens("beams", kind, name, num_beams=3)


class _Recompute(nn.Module):
    """A decoder that runs ``inner`` over the whole sequence at every step: the uncached reference.

    It keeps the token ids in the cache it is given (one layer, one head, width 1), so that ``generate``'s
    reorder and repeat of the cache move the ids exactly as they move the real decoder's keys/values."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.hidden_size, self.vocab_size = inner.hidden_size, inner.vocab_size
        self.max_positions, self.native_cross_attention = inner.max_positions, inner.native_cross_attention

    def layer_specs(self):
        from splice.core.interfaces import LayerSpec

        return [LayerSpec(0, 1, 1, "pre", 1e-5)]

    def forward(self, input_ids, context=None, context_mask=None, attention_mask=None, cache=None):
        from splice.core.interfaces import DecoderOutput

        T = input_ids.shape[1]
        ids = input_ids
        if cache is not None:
            stored = input_ids.to(torch.float64)[:, None, :, None]  # (B, 1, T, 1): ids are exact in float64
            ids = cache.update(0, stored, stored)[0][:, 0, :, 0].long()  # (B, L)
            cache.advance(T)
        out = self.inner(ids, context=context, context_mask=context_mask, attention_mask=attention_mask)
        hidden = None if out.hidden_states is None else out.hidden_states[:, -T:]
        return DecoderOutput(logits=out.logits[:, -T:], cache=cache, hidden_states=hidden)


class _Swapped:
    """``model`` with another decoder, for ``splice.core.generation.generate``."""

    def __init__(self, model, decoder):
        self._model, self.decoder = model, decoder

    def __getattr__(self, name):
        return getattr(self._model, name)


def _same_tokens(check: str, kind: str, name: str, *, num_beams: int) -> None:
    import splice
    from splice.core.generation import generate

    model = splice.compose(_pair_for(kind, name), seed=0).eval().double()
    pre = model.encoder.preprocessing
    px = torch.randn(2, pre.in_chans, *pre.image_size, generator=torch.Generator().manual_seed(3),
                     dtype=torch.float64)
    options = dict(max_new_tokens=6, num_beams=num_beams, eos_token_id=[], do_sample=False)
    cached = generate(model, px, **options)
    reference = generate(_Swapped(model, _Recompute(model.decoder)), px, **options)
    if cached.tolist() != reference.tolist():
        what = "greedy" if num_beams == 1 else f"beam search ({num_beams} beams)"
        raise _fail(check, kind, name, f"{what} with the KV cache gave {cached.tolist()}, recomputing every step "
                    f"gave {reference.tolist()}", "the cache must reproduce a full forward: keep every layer's K/V, "
                    "follow cache.reorder / repeat_interleave (splice's KVCache does), offset positions by the past")


def check_padding(kind: str, name: str) -> str | None:
    """Padding never leaks into the real tokens: right padding leaves their outputs as without padding, and under
    left padding they do not depend on what the masked positions hold."""
    module, pad, width, rows = _padding_module(kind, name)
    try:
        right, mask = _padded(kind, module, rows, "right", pad, width)
        alone = _alone(kind, module, rows, pad, width)
        left, left_mask = _padded(kind, module, rows, "left", pad, width)
        junk = _ids(2, 8, module.vocab_size, low=pad + 1, seed=7)
        other, _ = _padded(kind, module, rows, "left", pad, width, fill=junk)
    except _Refused as exc:
        return str(exc)
    for b, row in enumerate(rows):
        ok, d = _close(right[b][mask[b].bool()], alone[b])
        if not ok:
            raise _fail("padding", kind, name, f"right padding changed the real tokens' outputs by {d:.3g} (row {b}: "
                        f"{len(row)} real tokens of 8)", "hide padding keys with the attention mask")
        real = left_mask[b].bool()
        ok, d = _close(other[b][real], left[b][real])
        if not ok and getattr(module, "pad_token_id", None) is not None:  # it reads padding from its ids (RoBERTa)
            ok = _left_gaps(kind, module, rows, pad, width)[b][0]
        if not ok:
            raise _fail("padding", kind, name, f"under left padding, the real tokens' outputs changed by {d:.3g} when "
                        f"only the masked positions' ids changed (row {b}): padding leaks into real tokens",
                        "hide padding keys with the attention mask (1 = real, 0 = padding), past and new tokens")
    return None


def check_positions(kind: str, name: str) -> str | None:
    """Positions follow the attention mask (transformers' decoder-only ``generate``: ``cumsum(mask) - 1``): a
    left-padded row gives its real tokens the outputs they have without padding."""
    module, pad, width, rows = _padding_module(kind, name)
    gaps = _left_gaps(kind, module, rows, pad, width)
    if isinstance(gaps, str):
        return gaps
    for b, (ok, d) in enumerate(gaps):
        if not ok:
            raise _fail("positions", kind, name, f"left padding moved the real tokens' outputs by {d:.3g} (row {b}: "
                        f"{len(rows[b])} real tokens of 8): positions do not follow the attention mask",
                        "count positions over real tokens only: cumsum(attention_mask) - 1, from the past too")
    return None


def _left_gaps(kind: str, module: nn.Module, rows: list[Tensor], pad: int,
               width: int) -> list[tuple[bool, float]] | str:
    """Per row, whether its real tokens left-padded match them unpadded (and by how much they differ); or why the
    module refused padding."""
    try:
        left, mask = _padded(kind, module, rows, "left", pad, width)
        alone = _alone(kind, module, rows, pad, width)
    except _Refused as exc:
        return str(exc)
    return [_close(left[b][mask[b].bool()], alone[b]) for b in range(len(rows))]


class _Refused(Exception):
    """The component refused a padded batch with a SpliceError: padding checks do not apply."""


def _padding_module(kind: str, name: str) -> tuple[nn.Module, int, int, list[Tensor]]:
    """The module in float64, its padding id (``pad_token_id`` when it reads one), its context width, and two rows
    of real token ids (5 and 8 long)."""
    module, width = _decoder_with_slots(name) if kind == "decoder" else (_build(kind, name), 0)
    pad = int(getattr(module, "pad_token_id", 0) or 0)
    rows = [_ids(1, 5, module.vocab_size, low=pad + 1, seed=4)[0], _ids(1, 8, module.vocab_size, low=pad + 1)[0]]
    return module.to(torch.float64), pad, width, rows


def _alone(kind: str, module: nn.Module, rows: list[Tensor], pad: int, width: int) -> list[Tensor]:
    """Each row's outputs without padding."""
    return [_padded(kind, module, [row], "right", pad, width, b, length=len(row))[0][0] for b, row in enumerate(rows)]


def _padded(kind: str, module: nn.Module, rows: list[Tensor], side: str, pad: int, width: int, first: int = 0,
            fill: Tensor | None = None, length: int = 8) -> tuple[Tensor, Tensor]:
    """Outputs (B, length, .) of ``rows`` padded to ``length`` on ``side`` (masked positions hold ``pad``, or
    ``fill``'s ids), and the mask; ``first``: the row of the context the first row reads."""
    from splice.core.errors import SpliceError

    B = len(rows)
    ids = torch.full((B, length), pad) if fill is None else fill[:B, :length].clone()
    mask = torch.zeros(B, length, dtype=torch.long)
    for b, row in enumerate(rows):
        where = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[b, where], mask[b, where] = row, 1
    ctx = torch.randn(2, 4, width, generator=torch.Generator().manual_seed(5), dtype=torch.float64)[first:first + B]
    try:
        with torch.no_grad():
            return _text_out(kind, module, ids, mask, ctx), mask
    except SpliceError as exc:
        raise _Refused(f"{type(module).__name__} refuses padded batches: {str(exc).splitlines()[0]}") from exc


def _text_out(kind: str, module: nn.Module, ids: Tensor, mask: Tensor | None, ctx: Tensor) -> Tensor:
    if kind == "decoder":
        return module(ids, context=ctx, attention_mask=mask).logits
    mask = torch.ones_like(ids) if mask is None else mask
    return module(ids, attention_mask=mask).last_hidden_state


def check_save_load(kind: str, name: str) -> None:
    """``save_pretrained`` then ``splice.load``: the same tensors bit for bit, and the same logits."""
    import splice

    model = splice.compose(_pair_for(kind, name), seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "m")
        loaded = splice.load(Path(tmp) / "m")
        _same_model("save_load", kind, name, model, loaded, "splice.load of what save_pretrained wrote")
    return None


def _same_model(check: str, kind: str, name: str, model, loaded, what: str, tensors: bool = True) -> None:
    a, b = model.state_dict(), loaded.state_dict()
    if tensors:
        changed = sorted(set(a) ^ set(b)) or [k for k in a if not torch.equal(a[k], b[k])]
        if changed:
            raise _fail(check, kind, name, f"{what} changed the tensors {changed[:5]}",
                        "give every tensor the forward reads a persistent place in state_dict")
    pre = model.encoder.preprocessing
    px = torch.randn(2, pre.in_chans, *pre.image_size, generator=torch.Generator().manual_seed(6))
    ids = _ids(2, 4, model.decoder.vocab_size - 2)
    with torch.no_grad():
        ok, d = _close(loaded(pixel_values=px, decoder_input_ids=ids).logits,
                       model(pixel_values=px, decoder_input_ids=ids).logits, 1e-5)
    if not ok:
        raise _fail(check, kind, name, f"{what} gives logits that differ by {d:.3g}", "compute every value the "
                    "forward reads from the saved tensors or the config (a random buffer drawn at build time is "
                    "not saved: make it persistent, or derive it in init_non_persistent_buffers())")


def check_hf_export(kind: str, name: str) -> str | None:
    """With ``HFInterop``'s export half: config and tensors to transformers' names and back unchanged; a pair
    exported by ``splice.export_transformers`` reads back through ``splice.load`` with the same logits."""
    entry = _entry(kind, name)
    hf = entry.hf
    if hf is None or hf.state_dict_to_hf is None or hf.config_to_hf is None:
        return f"{_who(kind, name)} has no transformers export half (HFInterop.state_dict_to_hf and config_to_hf)"
    values = entry.make_config(entry.tiny).model_dump()
    hf_config = hf.config_to_hf(values)
    again = entry.make_config(hf.config_from_hf(hf_config)).model_dump()
    differ = {k: (values[k], again.get(k)) for k in values if k in again and again[k] != values[k]}
    if differ:
        raise _fail("hf_export", kind, name, f"config_from_hf(config_to_hf(config)) changed {differ}")
    module = _build(kind, name)
    state = module.state_dict()
    mapped = hf.state_dict_from_hf(hf.state_dict_to_hf(state, hf_config), hf_config)[0]
    changed = [k for k in state if k in mapped and not torch.equal(mapped[k], state[k])]
    lost = [k for k in state if k not in mapped and not _tied(module, k)]
    if changed or lost:
        raise _fail("hf_export", kind, name, f"state_dict_from_hf(state_dict_to_hf(sd)) changed {changed[:5]}, lost "
                    f"{lost[:5]}", "make the two mappings inverse (splice.core.keymap's tables are)")
    return _export_pair(kind, name)


def _tied(module: nn.Module, key: str) -> bool:
    """Whether ``key`` shares its storage with another tensor of the module (a tied head)."""
    state = module.state_dict(keep_vars=True)
    t = state[key]
    return any(k != key and v.data_ptr() == t.data_ptr() for k, v in state.items())


def _export_pair(kind: str, name: str) -> str | None:
    import splice
    from splice.core.errors import SpliceError

    model = splice.compose(_pair_for(kind, name), seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        try:
            splice.export_transformers(model, folder)
        except SpliceError as exc:
            return f"the pair {_pair_names(kind, name)} is not exportable: {str(exc).splitlines()[0]}"
        _same_model("hf_export", kind, name, model, splice.load(folder), "splice.load of what "
                    "export_transformers wrote", tensors=False)
    return None


def _pair_names(kind: str, name: str) -> str:
    spec = _pair_for(kind, name)
    return f"{spec['encoder']['name']} + {spec['decoder']['name']}"


def check_pair(encoder: str, decoder: str, adapters: tuple[str, ...] | None = None) -> None:
    """``encoder`` with ``decoder`` through each adapter kind (or the decoder's own cross-attention): composes,
    trains one step's forward/backward with a finite loss, and generates."""
    import splice
    from splice.core.errors import SpliceError
    from splice.core.plugins import get_registry

    native = getattr(_build("decoder", decoder), "native_cross_attention", False)
    kinds = [None] if native else list(adapters or get_registry().names("adapter"))
    for adapter in kinds:
        where = f"with adapter {adapter!r}" if adapter else "with its own cross-attention"
        try:
            model = splice.compose(pair_spec(encoder, decoder, adapter), seed=0).train()
        except SpliceError as exc:
            raise ConformanceError("pair", f"{encoder} + {decoder}",
                                   f"{where}: compose refused the pair: {exc}") from exc
        pre = model.encoder.preprocessing
        px = torch.randn(2, pre.in_chans, *pre.image_size)
        labels = _ids(2, 4, model.decoder.vocab_size - 2)
        loss = model(pixel_values=px, labels=labels).loss
        if not torch.isfinite(loss):
            raise ConformanceError("pair", f"{encoder} + {decoder}", f"{where}: the loss is {loss.item()}")
        loss.backward()
        with torch.no_grad():
            out = model.eval().generate(px, max_new_tokens=3, eos_token_id=[])
        if tuple(out.shape) != (2, 4):
            raise ConformanceError("pair", f"{encoder} + {decoder}", f"{where}: generate gave {tuple(out.shape)}, "
                                   "expected (2, 4) (the start token and 3 new ones)")


# -- every check, and pytest --------------------------------------------------------------------------------------

CHECKS: dict[str, dict[str, Callable[[str, str], str | None]]] = {
    "encoder": {"validate": check_validate, "widths": check_widths, "gradients": check_gradients,
                "save_load": check_save_load, "hf_export": check_hf_export},
    "decoder": {"validate": check_validate, "widths": check_widths, "gradients": check_gradients,
                "cache": check_cache, "beams": check_beams, "padding": check_padding, "positions": check_positions,
                "save_load": check_save_load,
                "hf_export": check_hf_export},
    "text_encoder": {"validate": check_validate, "widths": check_widths, "gradients": check_gradients,
                     "padding": check_padding},
    "adapter": {"validate": check_validate, "widths": check_widths, "gradients": check_gradients,
                "save_load": check_save_load},
}


def check(kind: str, name: str, checks: tuple[str, ...] | None = None) -> list[str]:
    """Run every check of ``kind`` (or those named) on component ``name``; returns the reasons of skipped ones."""
    skipped = []
    for check_name, fn in CHECKS[kind].items():
        if checks is None or check_name in checks:
            reason = fn(kind, name)
            if reason:
                skipped.append(f"{check_name}: {reason}")
    return skipped


@dataclass(frozen=True)
class Case:
    """One (check, component): ``run()`` raises ConformanceError, or skips (under pytest) a check that does not
    apply."""

    check: str
    kind: str
    name: str

    def run(self) -> None:
        reason = CHECKS[self.kind][self.check](self.kind, self.name)
        if reason:
            import pytest

            pytest.skip(reason)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}:{self.check}"


def conformance_cases(kind: str | None = None, *, names: tuple[str, ...] | None = None, plugin: str | None = None,
                      package: str | None = None, checks: tuple[str, ...] | None = None) -> Iterator[Case]:
    """Every (check, component) of the registry, or of one role, some names, one plugin (its name as ``splice
    list`` shows it), one package (``"splice"``: the built-ins), some checks."""
    from splice.core.plugins import get_registry

    registry = get_registry()
    for role in CHECKS:
        if kind not in (None, role):
            continue
        for entry in registry.entries(role):
            picked = plugin in (None, entry.plugin) and package in (None, entry.dist)
            if picked and (names is None or entry.name in names):
                for check_name in CHECKS[role]:
                    if checks is None or check_name in checks:
                        yield Case(check_name, role, entry.name)


def parametrize(kind: str | None = None, **filters: Any):
    """``@splice.testing.parametrize(plugin="mine")``: a pytest test taking ``case`` runs once per check and
    component (filters as ``conformance_cases``)."""
    import pytest

    return pytest.mark.parametrize("case", list(conformance_cases(kind, **filters)), ids=str)


@contextlib.contextmanager
def plugins(*modules: Any) -> Iterator[None]:
    """Inside: the registry holds the built-ins, the installed plugins and ``modules`` (each a plugin module), so
    the kit can check a plugin that is not installed."""
    from splice.core import plugins as p

    saved = p._cached
    p._cached = p.build_registry(extra_plugins=modules)
    try:
        yield
    finally:
        p._cached = saved


"""Each built component checked against its role: the Protocol's attributes, then a dry forward.

``validate`` calls ``check_role`` on every component it builds. The dry forward runs on a copy of the module: with
real zero weights when it is small (up to ``REAL_DRY_FORWARD`` parameters), else on the meta device (no memory,
shapes only; meta ops run through Python reference kernels, about 1 s for a ViT-B + GPT-2 pair). A module that
cannot run on meta (an op without a meta kernel, a check that reads values) is not dry-run. ``splice.load`` runs
the attribute checks only (``unchecked``): the folder's tensors are checked against the model instead, and a load
stays as fast as reading the weights.

The dry forward catches a declared width that differs from the real one, a wrong return type and a vocabulary
that disagrees with the logits. Each finding is one ``Problem`` naming the component, its plugin and the package
that installed it.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from splice.core.errors import Problem, Shown, SpliceError, clip
from splice.core.interfaces import LayerSpec, Preprocessing
from splice.core.meta import init_meta_buffers
from splice.core.plugins import BUILD_TIMEOUT_ENV, DEFAULT_BUILD_TIMEOUT, run_plugin_code, time_limit
from splice.core.registry import Entry

REAL_DRY_FORWARD = 1 << 22  # parameters (16 MiB in fp32): a component that cannot run on meta is dry-run on zeros up to this
_DRY_TOKENS = 2  # the text length of a dry forward
ROLE_NAMES = {"encoder": "vision encoder", "decoder": "text decoder", "text_encoder": "text encoder"}
_SKIPPED = object()
_CHECKING = contextvars.ContextVar("splice_dry_forward", default=True)


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Inside: no dry forward (the attribute checks still run). ``splice.load`` plans under it."""
    token = _CHECKING.set(False)
    try:
        yield
    finally:
        _CHECKING.reset(token)


def who(entry: Entry) -> str:
    """``decoder 'gpt2' from plugin 'x' (package 'y')``: the component and where it came from."""
    package = f" (package {entry.dist!r})" if entry.dist else ""
    return f"{entry.kind} {entry.name!r} from plugin {entry.plugin!r}{package}"


def lie(entry: Entry, path: str, message: str, *, given: Any = None, expected: str = "") -> Problem:
    """A Problem for a component that does not do what its role (or its own declaration) says."""
    return Problem(path, f"{who(entry)}: {message}", given=given, expected=expected,
                   fix=f"fix the plugin {entry.plugin!r} (its author's to fix), or pick another {entry.kind}; "
                   f"SPLICE_DISABLE_PLUGINS={entry.plugin} switches it off", error="plugin")


def check_role(entry: Entry, module: Any, path: str, problems: list[Problem]) -> bool:
    """Whether ``module`` (built by ``entry``, parameters possibly on meta) fills its role; problems appended."""
    check = _CHECKS.get(entry.kind)
    if check is None:
        return True
    before = len(problems)
    if not isinstance(module, nn.Module):
        problems.append(lie(entry, path, "its builder did not return an nn.Module", given=Shown(type(module).__name__),
                            expected=f"an nn.Module that is a {ROLE_NAMES[entry.kind]}"))
        return False
    check(entry, module, path, problems)
    return len(problems) == before


def _int_attrs(entry: Entry, module: nn.Module, path: str, names: tuple[str, ...], problems: list[Problem]) -> bool:
    for name in names:
        value = getattr(module, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(lie(entry, path, f"the module has no positive int `{name}`",
                                given=Shown(short_value(value)), expected=f"an int > 0 ({ROLE_NAMES[entry.kind]} "
                                "protocol)"))
            return False
    return True


def short_value(value: Any) -> str:
    return type(value).__name__ if not isinstance(value, (int, float, str)) else clip(repr(value), 60)


def _dry(entry: Entry, module: nn.Module, path: str, what: str, call: Callable[[nn.Module, str], Any],
         problems: list[Problem]) -> Any:
    """``call(twin, device)`` on a copy of ``module``: a small module on real zeros (fast: meta ops run through
    Python reference kernels), a large one on the meta device (shapes only, no memory). ``_SKIPPED`` when it
    cannot run (no meta kernel for an op, a check that reads values), or when checks are off (``unchecked``);
    None (with a problem) when the forward fails."""
    if not _CHECKING.get():
        return _SKIPPED
    limit = time_limit(BUILD_TIMEOUT_ENV, DEFAULT_BUILD_TIMEOUT)
    small = sum(p.numel() for p in module.parameters()) <= REAL_DRY_FORWARD
    for device in ("cpu", "meta") if small else ("meta",):
        twin = _twin(module, device)
        if twin is None:
            continue

        def run(twin=twin, device=device):
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # a tiny forward: thread start-up would cost more than the work
            try:
                with torch.no_grad():
                    return call(twin, device)
            finally:
                torch.set_num_threads(threads)

        value, exc = run_plugin_code(run, limit)
        if exc is None:
            return value
        if device == "meta" and "meta" in str(exc).lower() and not isinstance(exc, SpliceError):
            return _SKIPPED  # an op without a meta kernel, or one that reads values: shapes cannot be checked
        text = clip(" ".join(str(exc).split()), 300)
        problems.append(lie(entry, path, f"its forward fails on {what}: {type(exc).__name__}: {text}",
                            expected=f"a {ROLE_NAMES.get(entry.kind, entry.kind)} that runs on any valid input"))
        return None
    return _SKIPPED


def _twin(module: nn.Module, device: str) -> nn.Module | None:
    """A copy to dry-run: wholly on meta (buffers too), or with real zero parameters (None: buffers that cannot
    be recomputed from them)."""
    if device == "meta":
        return copy.deepcopy(module).eval().to("meta")
    twin = copy.deepcopy(module).eval()
    for sub in twin.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:
                sub._parameters[name] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), requires_grad=False)
    try:
        init_meta_buffers(twin)  # buffers derived from the (meta) parameters, recomputed
    except SpliceError:
        return None
    return twin


def _tensor(value: Any) -> bool:
    return isinstance(value, Tensor)


def _check_encoder(entry: Entry, module: nn.Module, path: str, problems: list[Problem]) -> None:
    if not _int_attrs(entry, module, path, ("hidden_size",), problems):
        return
    pre = getattr(module, "preprocessing", None)
    if not isinstance(pre, Preprocessing):
        problems.append(lie(entry, path, "the module has no `preprocessing` (a splice.Preprocessing)",
                            given=Shown(type(pre).__name__), expected="a splice.Preprocessing"))
        return
    (H, W), C = pre.image_size, pre.in_chans
    out = _dry(entry, module, path, f"a ({1}, {C}, {H}, {W}) image", lambda m, d: m(torch.zeros(1, C, H, W, device=d)),
               problems)
    if out is None or out is _SKIPPED:
        return
    hidden = getattr(out, "last_hidden_state", None)
    if not _tensor(hidden):
        problems.append(lie(entry, path, "its forward returned no `last_hidden_state` tensor",
                            given=Shown(type(out).__name__), expected="a splice.EncoderOutput"))
    elif hidden.dim() != 3 or hidden.shape[0] != 1:
        problems.append(lie(entry, path, "its forward returned tokens of the wrong shape",
                            given=Shown(str(tuple(hidden.shape))), expected="(B, N, D) with B = 1"))
    elif hidden.shape[-1] != module.hidden_size:
        problems.append(lie(entry, path, f"it declares hidden_size {module.hidden_size}, but its forward returns "
                            f"tokens of width {hidden.shape[-1]}", given=module.hidden_size,
                            expected=f"hidden_size {hidden.shape[-1]}, the width it returns"))


def _check_decoder(entry: Entry, module: nn.Module, path: str, problems: list[Problem]) -> None:
    if not _int_attrs(entry, module, path, ("hidden_size", "vocab_size", "max_positions"), problems):
        return
    try:
        specs = module.layer_specs()
        specs = list(specs) if not isinstance(specs, (str, bytes)) else specs
    except Exception as exc:  # noqa: BLE001 - a plugin's method broke
        problems.append(lie(entry, path, f"layer_specs() raised {type(exc).__name__}: {clip(str(exc), 200)}",
                            expected="a list of splice.LayerSpec"))
        return
    if not isinstance(specs, list) or not all(isinstance(s, LayerSpec) for s in specs):
        problems.append(lie(entry, path, "layer_specs() did not return a list of splice.LayerSpec",
                            given=Shown(type(specs).__name__), expected="a list of splice.LayerSpec"))
        return
    V, D = module.vocab_size, module.hidden_size
    out = _dry(entry, module, path, f"(1, {_DRY_TOKENS}) token ids",
               lambda m, d: m(torch.zeros(1, _DRY_TOKENS, dtype=torch.long, device=d)), problems)
    if out is None or out is _SKIPPED:
        return
    logits = getattr(out, "logits", None)
    if not _tensor(logits):
        problems.append(lie(entry, path, "its forward returned no `logits` tensor", given=Shown(type(out).__name__),
                            expected="a splice.DecoderOutput"))
    elif tuple(logits.shape[:2]) != (1, _DRY_TOKENS) or logits.dim() != 3:
        problems.append(lie(entry, path, "its forward returned logits of the wrong shape",
                            given=Shown(str(tuple(logits.shape))), expected=f"(B, T, V) = (1, {_DRY_TOKENS}, {V})"))
    elif logits.shape[-1] != V:
        problems.append(lie(entry, path, f"it declares vocab_size {V}, but its logits cover {logits.shape[-1]} "
                            "tokens", given=V, expected=f"vocab_size {logits.shape[-1]}, the logits' last dimension"))
    elif _tensor(getattr(out, "hidden_states", None)) and out.hidden_states.shape[-1] != D:
        problems.append(lie(entry, path, f"it declares hidden_size {D}, but its hidden states have width "
                            f"{out.hidden_states.shape[-1]}", given=D, expected=f"hidden_size {out.hidden_states.shape[-1]}"))


def _check_text_encoder(entry: Entry, module: nn.Module, path: str, problems: list[Problem]) -> None:
    if not _int_attrs(entry, module, path, ("hidden_size", "vocab_size", "max_positions"), problems):
        return
    D = module.hidden_size

    def call(m: nn.Module, d: str) -> Any:
        ids = torch.zeros(1, _DRY_TOKENS, dtype=torch.long, device=d)
        return m(ids, attention_mask=torch.ones(1, _DRY_TOKENS, dtype=torch.long, device=d))

    out = _dry(entry, module, path, f"(1, {_DRY_TOKENS}) token ids", call, problems)
    if out is None or out is _SKIPPED:
        return
    hidden, pooled = getattr(out, "last_hidden_state", None), getattr(out, "pooler_output", None)
    if not _tensor(hidden):
        problems.append(lie(entry, path, "its forward returned no `last_hidden_state` tensor",
                            given=Shown(type(out).__name__), expected="a splice.TextEncoderOutput"))
    elif tuple(hidden.shape) != (1, _DRY_TOKENS, D):
        problems.append(lie(entry, path, f"its forward returned states of shape {tuple(hidden.shape)}",
                            given=D, expected=f"(1, {_DRY_TOKENS}, {D}) for its declared hidden_size {D}"))
    elif pooled is not None and (not _tensor(pooled) or tuple(pooled.shape) != (1, D)):
        problems.append(lie(entry, path, "its pooled output has the wrong shape or type",
                            given=Shown(str(tuple(pooled.shape)) if _tensor(pooled) else type(pooled).__name__),
                            expected=f"None or a (1, {D}) tensor"))


_CHECKS = {"encoder": _check_encoder, "decoder": _check_decoder, "text_encoder": _check_text_encoder}


def check_output_width(entry: Entry, module: Any, path: str, in_width: int, out_width: int,
                       problems: list[Problem]) -> bool:
    """A projection (or any token map) built for ``in_width -> out_width``: a dry forward on (1, 3, in_width)."""
    if not isinstance(module, nn.Module):
        problems.append(lie(entry, path, "it did not build an nn.Module", given=Shown(type(module).__name__),
                            expected="an nn.Module mapping (B, N, D_in) to (B, N, D_out)"))
        return False
    out = _dry(entry, module, path, f"(1, 3, {in_width}) tokens",
               lambda m, d: m(torch.zeros(1, 3, in_width, device=d)), problems)
    if out is None:
        return False
    if out is not _SKIPPED and (not _tensor(out) or tuple(out.shape) != (1, 3, out_width)):
        shown = str(tuple(out.shape)) if _tensor(out) else type(out).__name__
        problems.append(lie(entry, path, f"built for widths {in_width} -> {out_width}, it returns {shown}",
                            given=Shown(shown), expected=f"a (1, 3, {out_width}) tensor"))
        return False
    return True


def check_cross_attention(entry: Entry, module: Any, spec: LayerSpec, context_width: int, path: str,
                          problems: list[Problem]) -> bool:
    """The module an adapter built for one decoder layer: a dry forward of (1, 2, width) text states against a
    (1, 3, context_width) context must keep the text's shape, and ``context_kv`` must exist."""
    if not isinstance(module, nn.Module) or not callable(getattr(module, "context_kv", None)):
        problems.append(lie(entry, path, "its build() did not return a cross-attention module (an nn.Module with "
                            "context_kv)", given=Shown(type(module).__name__), expected="a splice CrossAttention"))
        return False
    D = spec.width

    def call(m: nn.Module, d: str) -> Any:
        return m(torch.zeros(1, _DRY_TOKENS, D, device=d), context=torch.zeros(1, 3, context_width, device=d))

    out = _dry(entry, module, path, f"(1, {_DRY_TOKENS}, {D}) states and a (1, 3, {context_width}) context", call,
               problems)
    if out is None:
        return False
    if out is not _SKIPPED and (not _tensor(out) or tuple(out.shape) != (1, _DRY_TOKENS, D)):
        shown = str(tuple(out.shape)) if _tensor(out) else type(out).__name__
        problems.append(lie(entry, path, f"built for layer {spec.index} (width {D}), it returns {shown}",
                            given=Shown(shown), expected=f"a (1, {_DRY_TOKENS}, {D}) tensor"))
        return False
    return True

"""The matrix multiply behind every ``nn.Linear`` of splice's own modules, picked per call on the CPU.

Stock ``F.linear`` on a CPU runs through the BLAS torch was built with (MKL). On the 2-core AMD EPYC we develop
on, oneDNN's fp32 kernel (``torch.ops.mkldnn._linear_pointwise``, the one torch's own compiler emits for CPU
linears) does the same product about 2× faster: 1.5-2.5× for the few rows of a decoding step, where reading the
weights is the whole cost, and about 2.2× for the large products of an encoder forward or a training step
(``docs/benchmarks.md``). It reads the ordinary ``(out, in)`` weight in place: nothing is repacked or copied, so
memory stays at one copy of the weights.

``linear`` uses it only where it is a pure speed-up and the result is the same product (within fp32 rounding):

- a CPU fp32 input and weight (plain tensors, a dense bias), not under CPU autocast, and not inside
  ``torch.compile`` (which picks its own), tracing, ``torch.func`` transforms or forward-mode AD;
- a product big enough that the faster kernel beats its ~10 µs call overhead (a 512 × 512 weight for one row);
- with autograd too: the backward products (input and weight gradients) go through oneDNN as well, in a custom
  autograd function that is differentiable once (a second derivative needs ``SPLICE_FAST_LINEAR=0``);

and falls back to ``F.linear`` everywhere else (GPUs, bf16, tiny layers). ``SPLICE_FAST_LINEAR=0`` in the
environment (read at import) or ``torch.backends.mkldnn.flags(enabled=False)`` turns it off.

``Linear`` is ``nn.Linear`` with this forward (same parameters, same state-dict names); the native decoders and
the adapters build theirs from it. ``use_fast_linear(module)`` gives the same forward to the plain ``nn.Linear``
layers of a module built elsewhere (timm's encoders). A third-party plugin may use either, or neither.
``use_stock_linear(model)`` turns them all back into plain ``nn.Linear`` (for tools that match by exact class).

The private torch APIs, behind one seam. The fast path reads three APIs torch does not promise to keep: the op
``torch.ops.mkldnn._linear_pointwise`` (called as ``op(x, weight, bias, "none", [], "")``), and, to know when to
stay away, ``torch._C._are_functorch_transforms_active`` and ``torch.autograd.forward_ad._current_level``. Only
``_resolve`` looks them up, once at import: it tries each on a tiny input with a known answer (the op also with the
transposed weight view the backward pass gives it), and keeps the two callables in module globals (the forward-AD
level changes, so ``_fast`` reads it from torch, once it is known to be there). If one is missing or answers
otherwise, ``FAST_LINEAR`` is False for the rest of the process, every product takes ``F.linear``, and one
``KernelFallbackWarning`` names the API and the torch version. The op failing later on a product the fast path took
(forward or backward) does the same after recomputing that product with the stock kernel, so the caller gets the
same result and no error; an error that ``F.linear`` raises too is the input's, and propagates as without splice.
The per-call cost is the ``FAST_LINEAR`` check that was always there: the ``try`` around the op costs nothing in
Python >= 3.11 while nothing raises. A torch build without oneDNN at all is not a changed API: the fast path is
silently off there. ``SPLICE_FAST_LINEAR=0`` skips the look-up, and so the warning.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as _forward_ad
from torch.autograd.function import once_differentiable

from splice.core.errors import clip

__all__ = ["linear", "Linear", "use_fast_linear", "use_stock_linear", "dropout", "FAST_LINEAR",
           "KernelFallbackWarning"]

# rows x weight elements from which oneDNN wins on small products (measured on a 2-core EPYC; see the module doc);
# a single row counts as 4, because a lone matrix-vector product is bound by reading the weight, where it wins early
_MIN_WORK = 1 << 20
_MIN_WEIGHT = _MIN_WORK // 4  # smaller weights always take F.linear
_PLAIN = (Tensor, nn.Parameter)


class KernelFallbackWarning(UserWarning):
    """A private torch API behind splice's fast CPU linear is missing or changed: ``F.linear`` does every product
    from then on. Results are unchanged, only CPU speed is affected; ``SPLICE_FAST_LINEAR=0`` silences it."""


# --- the seam: the only code that looks up a private torch API; _resolve sets these, _disable clears FAST_LINEAR ---
_OP_NAME = "torch.ops.mkldnn._linear_pointwise"
_ONEDNN_LINEAR = None  # the op, once resolved and tried
_functorch_active = None  # torch._C._are_functorch_transforms_active, once resolved and tried
FAST_LINEAR: bool = False  # the one check each call pays
_warned = False  # the fallback warning is given once per process


def _op_answers_right() -> bool:
    """The op on a tiny product with an exact answer: with a bias, and without one on a transposed weight view."""
    op = torch.ops.mkldnn._linear_pointwise
    on = {"dtype": torch.float32, "device": "cpu"}  # whatever default dtype or device the importer has set
    x = torch.tensor([[1.0, 2.0, 3.0]], **on)  # (1, 3)
    w = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]], **on)  # (3, 4)
    b = torch.tensor([0.0, 0.0, 0.0, 1.0], **on)
    with torch.no_grad():
        return (op(x, w.t().contiguous(), b, "none", [], "").tolist() == [[1.0, 2.0, 3.0, 7.0]]
                and op(x, w.t(), None, "none", [], "").tolist() == [[1.0, 2.0, 3.0, 6.0]])


_CHECKS = (  # each private API, with a call that answers True where it is there and behaves as splice expects
    (_OP_NAME, _op_answers_right),
    ("torch._C._are_functorch_transforms_active",
     lambda: isinstance(torch._C._are_functorch_transforms_active(), bool)),
    ("torch.autograd.forward_ad._current_level", lambda: isinstance(_forward_ad._current_level, int)),
)


def _resolve() -> None:
    """Look up and try every private API once (at import, and from ``_reset_for_tests``); the fast path is on only
    if all are there and behave. Import never fails here: any error turns the fast path off, with the warning."""
    global _ONEDNN_LINEAR, _functorch_active, FAST_LINEAR
    _ONEDNN_LINEAR = _functorch_active = None
    FAST_LINEAR = False
    if os.environ.get("SPLICE_FAST_LINEAR", "1") == "0" or not torch.backends.mkldnn.is_available():
        return  # turned off, or a build without oneDNN: nothing to look up, nothing to warn about
    for name, check in _CHECKS:
        try:
            ok = check()
        except Exception as exc:  # missing (AttributeError), or called with another signature
            _disable(name, exc)
            return
        if not ok:
            _disable(name, "answers differently than this splice expects")
            return
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise
    _functorch_active = torch._C._are_functorch_transforms_active
    FAST_LINEAR = True


def _disable(api: str, why: Exception | str) -> None:
    """Turn the fast path off for the rest of the process; the first time, say so with one warning."""
    global FAST_LINEAR, _warned
    FAST_LINEAR = False
    if _warned:
        return
    _warned = True
    if isinstance(why, Exception):
        why = f"failed with {type(why).__name__}: {clip(str(why))}"
    warnings.warn(KernelFallbackWarning(
        f"splice's fast CPU linear is off for the rest of this process: {api} {why} (torch {torch.__version__}). "
        "Every linear layer now runs through torch's F.linear: results are unchanged, only CPU speed is affected. "
        "Set SPLICE_FAST_LINEAR=0 in the environment to silence this warning."), stacklevel=3)


def _reset_for_tests() -> None:
    """Forget a fallback and its warning, and resolve the private APIs again (for tests that simulate a torch
    without them; after the simulation ends, this restores the fast path)."""
    global _warned
    _warned = False
    _resolve()


_resolve()


def _fast(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether oneDNN takes this product (the conditions in the module doc)."""
    return (
        FAST_LINEAR
        # plain tensors only: fx proxies, DTensor, fake and other subclasses keep F.linear's own handling
        and type(x) is Tensor
        and type(weight) in _PLAIN
        and weight.numel() >= _MIN_WEIGHT  # tiny layers leave here
        and x.dim() >= 2
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and (bias is None or (type(bias) in _PLAIN and bias.dtype == torch.float32 and bias.device.type == "cpu"
                              and bias.dim() == 1 and bias.is_contiguous()))  # oneDNN reads the bias densely
        and x.numel() > 0
        and max(x.numel() // x.shape[-1], 4) * weight.numel() >= _MIN_WORK
        and weight.layout == torch.strided
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not _functorch_active()  # torch.func.grad / vmap / jvp
        and _forward_ad._current_level < 0  # forward-mode AD: no tangent formula here
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    if not _fast(x, weight, bias):
        return F.linear(x, weight, bias)
    try:
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _OneDNNLinear.apply(x, weight, bias)
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    except Exception as exc:  # a changed private op: this product through F.linear, then always
        out = F.linear(x, weight, bias)  # if the stock kernel fails too, the input is at fault: its error stands
        _disable(_OP_NAME, exc)
        return out


class _OneDNNLinear(torch.autograd.Function):
    """The same product with its three backward products through oneDNN too (training). Differentiable once:
    a second derivative (``create_graph=True`` through a linear layer) needs ``SPLICE_FAST_LINEAR=0``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        need_x, need_w = ctx.needs_input_grad[:2]
        # as F.linear: the input is kept only for the weight's gradient, the weight only for the input's
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        ctx.has_bias = bias is not None
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")  # (..., out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors  # each None where its gradient partner is not needed
        dx, dw = _backward_products(grad, x, weight)
        db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # (out,)
        return dx, dw, db


def _backward_products(grad: Tensor, x: Tensor | None, weight: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The input's gradient ``grad @ weight`` (if the weight was kept) and the weight's ``grad^T @ x`` (if the input
    was): through oneDNN while the fast path is on, else, or if the op fails, through the stock kernels."""
    grad2 = grad.reshape(-1, grad.shape[-1])  # (M, out)
    x2 = None if x is None else x.reshape(-1, x.shape[-1])  # (M, in)
    if FAST_LINEAR:
        try:  # each product as a linear: grad with the (in, out) view of the weight; (out, M) grad with (in, M) x
            return (None if weight is None else _ONEDNN_LINEAR(grad, weight.t(), None, "none", [], ""),  # (..., in)
                    None if x2 is None else _ONEDNN_LINEAR(grad2.t(), x2.t(), None, "none", [], ""))  # (out, in)
        except Exception as exc:  # a changed private op: the stock products below, then always
            stock = _backward_products_stock(grad, grad2, x2, weight)  # if these fail too, their error stands
            _disable(_OP_NAME, exc)
            return stock
    return _backward_products_stock(grad, grad2, x2, weight)


def _backward_products_stock(grad: Tensor, grad2: Tensor, x2: Tensor | None,
                             weight: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """``_backward_products`` through the stock kernels, as ``F.linear``'s own backward computes them."""
    return (None if weight is None else grad.matmul(weight),  # (..., in)
            None if x2 is None else grad2.t().mm(x2))  # (out, in)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``splice.core.kernels.linear``."""

    def forward(self, x: Tensor) -> Tensor:
        if self.in_features * self.out_features < _MIN_WEIGHT:
            return F.linear(x, self.weight, self.bias)  # the common tiny case, one call shorter
        return linear(x, self.weight, self.bias)


def use_fast_linear(module: nn.Module) -> nn.Module:
    """Give every plain ``nn.Linear`` in ``module`` (exactly that class, not a subclass with its own forward)
    ``Linear``'s forward, in place; parameters, names and ``isinstance(m, nn.Linear)`` are unchanged."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return module


def use_stock_linear(module: nn.Module) -> nn.Module:
    """The reverse of ``use_fast_linear``: every ``Linear`` in ``module`` becomes a plain ``nn.Linear``, in place.
    For tools that match layers by exact class, e.g. ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear})``."""
    for m in module.modules():
        if type(m) is Linear:
            m.__class__ = nn.Linear
    return module


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)``, returning ``x`` itself at once in eval or for ``p == 0``: decoding calls
    it a dozen times a step, where an ``nn.Dropout`` module would cost a module call each time for nothing."""
    return F.dropout(x, p, True) if training and p > 0 else x

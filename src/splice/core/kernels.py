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
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as _forward_ad
from torch.autograd.function import once_differentiable

__all__ = ["linear", "Linear", "use_fast_linear", "use_stock_linear", "dropout", "FAST_LINEAR"]

_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
FAST_LINEAR: bool = _ONEDNN_LINEAR is not None and os.environ.get("SPLICE_FAST_LINEAR", "1") != "0"

# rows x weight elements from which oneDNN wins on small products (measured on a 2-core EPYC; see the module doc);
# a single row counts as 4, because a lone matrix-vector product is bound by reading the weight, where it wins early
_MIN_WORK = 1 << 20
_MIN_WEIGHT = _MIN_WORK // 4  # smaller weights always take F.linear
_PLAIN = (Tensor, nn.Parameter)
# private torch hooks, read defensively: a torch without them simply never reports the state they detect
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


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
        and getattr(_forward_ad, "_current_level", -1) < 0  # forward-mode AD: no tangent formula here
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    if not _fast(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


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
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad2 = grad.reshape(-1, grad.shape[-1])  # (M, out)
        dx = dw = db = None
        if need_x:  # grad @ weight, as a linear with the (in, out) view of the weight
            dx = _ONEDNN_LINEAR(grad, weight.t(), None, "none", [], "")  # (..., in)
        if need_w:  # grad^T @ x, as a linear of the (out, M) gradient with the (in, M) input
            dw = _ONEDNN_LINEAR(grad2.t(), x.reshape(-1, x.shape[-1]).t(), None, "none", [], "")  # (out, in)
        if ctx.has_bias and need_b:
            db = grad2.sum(0)  # (out,)
        return dx, dw, db


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

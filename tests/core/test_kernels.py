"""splice.core.kernels: oneDNN's linear where it is faster, the stock F.linear everywhere else, the same numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from splice.core import kernels
from splice.core.kernels import KernelFallbackWarning, Linear, linear, use_fast_linear, use_stock_linear

pytestmark = [pytest.mark.skipif(not kernels.FAST_LINEAR, reason="this torch build has no oneDNN linear"),
              # on the real torch the fast path never falls back: a fallback here is a bug, not a slow-down
              pytest.mark.filterwarnings("error::splice.core.kernels.KernelFallbackWarning")]

BIG = (640, 512)  # (out, in): above the size from which oneDNN takes over
SMALL = (96, 64)


def _ops(fn) -> set[str]:
    """The aten/mkldnn operators ``fn`` ran, as the profiler saw them."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _operands(shape, rows=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    out, inp = shape
    return (torch.randn(*rows, inp, generator=g), torch.randn(out, inp, generator=g) * 0.05,
            torch.randn(out, generator=g))


@pytest.mark.parametrize("rows", [(1, 1), (3, 5), (7,)], ids=["one-token", "batch-x-time", "2d"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_inference_matches_f_linear_and_takes_onednn(rows, with_bias):
    x, w, b = _operands(BIG, rows)
    b = b if with_bias else None
    with torch.inference_mode():
        got = linear(x, w, b)
        want = F.linear(x, w, b)
        assert "mkldnn::_linear_pointwise" in _ops(lambda: linear(x, w, b))
    assert got.shape == want.shape == (*rows, BIG[0])
    assert (got - want).abs().max().item() <= 1e-4


def test_small_products_keep_the_stock_kernel():
    x, w, b = _operands(SMALL, (1, 1))
    with torch.inference_mode():
        ops = _ops(lambda: linear(x, w, b))
    assert "mkldnn::_linear_pointwise" not in ops and "aten::linear" in ops


@pytest.mark.filterwarnings("ignore:TF32")
def test_other_dtypes_and_autocast_keep_the_stock_kernel():
    x, w, b = _operands(BIG)
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x.double(), w.double(), b.double()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear(x, w, b)
        assert out.dtype == torch.bfloat16  # autocast decided, as for nn.Linear
        with torch.backends.mkldnn.flags(enabled=False):
            assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x, w, b))


@pytest.mark.parametrize("frozen_weight", [False, True])
def test_training_gradients_match_f_linear(frozen_weight):
    x, w, b = _operands(BIG)
    grads = []
    for fn in (linear, F.linear):
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        ws.requires_grad_(not frozen_weight)
        out = fn(xs, ws, bs)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append((out.detach(), xs.grad, ws.grad, bs.grad))
    (o1, gx1, gw1, gb1), (o2, gx2, gw2, gb2) = grads
    assert (o1 - o2).abs().max().item() <= 1e-4
    assert (gx1 - gx2).abs().max().item() <= 1e-4
    assert (gb1 - gb2).abs().max().item() <= 1e-4
    assert (gw1 is None) == (gw2 is None) == frozen_weight
    if not frozen_weight:
        assert (gw1 - gw2).abs().max().item() <= 1e-4


def test_training_runs_onednn_forward_and_backward():
    x, w, b = _operands(BIG)
    w.requires_grad_(True)

    def step():
        linear(x, w, b).sum().backward()

    ops = _ops(step)
    assert "mkldnn::_linear_pointwise" in ops
    assert not {"aten::addmm", "aten::mm"} & ops  # neither direction fell back to the BLAS kernel


def test_linear_module_is_a_drop_in_nn_linear():
    torch.manual_seed(0)
    ours, stock = Linear(*reversed(BIG)), nn.Linear(*reversed(BIG))
    stock.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 3, BIG[1])
    with torch.no_grad():
        assert (ours(x) - stock(x)).abs().max().item() <= 1e-4


def test_use_fast_linear_converts_plain_linears_only():
    class Custom(nn.Linear):  # a subclass with its own forward (LoRA, quantised, ...) is left alone
        pass

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), nn.Sequential(nn.Linear(4, 2)))
    names_before = list(model.state_dict())
    use_fast_linear(model)
    assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)] == [Linear, Custom, Linear]
    assert list(model.state_dict()) == names_before


def test_environment_switch_turns_it_off():
    code = ("import torch; from splice.core import kernels; x = torch.randn(2, 512); w = torch.randn(640, 512)\n"
            "from torch.profiler import profile\n"
            "with torch.inference_mode(), profile() as p: kernels.linear(x, w)\n"
            "print(kernels.FAST_LINEAR, 'mkldnn::_linear_pointwise' in {e.key for e in p.key_averages()})")
    env = {**os.environ, "SPLICE_FAST_LINEAR": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["False", "False"]


def test_wide_decoder_matches_transformers_through_onednn(tmp_path):
    """A VED wide enough that every decoder projection takes oneDNN: same logits, loss and greedy tokens."""
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from oracle import tiny_ved

    import splice

    hf = tiny_ved(enc_width=48, dec_width=512, vocab=600, n_positions=24, tokens=(599, 0, 599), scale=0.05)
    hf.save_pretrained(tmp_path)
    ours = splice.load(tmp_path)
    g = torch.Generator().manual_seed(1)
    px = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(0, 599, (2, 6), generator=g)
    with torch.inference_mode():
        a, b = hf(pixel_values=px, labels=ids), ours(pixel_values=px, labels=ids)
        assert "mkldnn::_linear_pointwise" in _ops(lambda: ours(pixel_values=px, labels=ids))
        want = hf.generate(pixel_values=px, max_new_tokens=8, do_sample=False, num_beams=1)
    assert (a.logits - b.logits).abs().max().item() <= 1e-4
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5
    assert ours.generate(px, max_new_tokens=8).tolist() == want.tolist()


def test_strided_or_broadcast_bias_keeps_the_stock_kernel():
    x, w, b = _operands(BIG)
    for bias in (torch.randn(2 * BIG[0])[::2], torch.randn(1).expand(BIG[0])):
        with torch.inference_mode():
            assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x, w, bias))
            assert (linear(x, w, bias) - F.linear(x, w, bias)).abs().max().item() <= 1e-4


def test_frozen_weight_does_not_keep_the_input():
    """As F.linear: only a weight that needs a gradient keeps the layer's input for backward."""
    x, w, b = _operands(BIG)
    with torch.inference_mode():
        x = x.clone()  # an inference tensor cannot be saved for backward: this fails if it is kept
    b.requires_grad_(True)
    linear(x, w, b).sum().backward()
    assert torch.equal(b.grad, torch.full_like(b, x.numel() // x.shape[-1]))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.func uses torch.jit.script internally
def test_tracing_and_transforms_keep_the_stock_kernel():
    layer = Linear(*reversed(BIG))
    traced = torch.fx.symbolic_trace(layer)  # a proxy is not a tensor: F.linear records the call
    x = torch.randn(2, BIG[1])
    with torch.no_grad():
        assert (traced(x) - layer(x)).abs().max().item() <= 1e-4
    params = {k: v.detach() for k, v in layer.named_parameters()}
    grad = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)
    assert torch.allclose(grad["bias"], torch.full((BIG[0],), 2.0))
    import torch.autograd.forward_ad as fwAD

    with torch.no_grad(), fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, torch.ones_like(x)))).tangent
    assert tangent is not None and torch.allclose(tangent, F.linear(torch.ones_like(x), layer.weight), atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao is deprecated
def test_use_stock_linear_lets_dynamic_quantization_find_the_layers():
    model = nn.Sequential(Linear(*reversed(BIG)), nn.ReLU(), Linear(BIG[0], 8))
    x = torch.randn(2, BIG[1])
    with torch.no_grad():
        want = model(x)
    use_stock_linear(model)
    assert [type(m) for m in model if isinstance(m, nn.Linear)] == [nn.Linear, nn.Linear]
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert type(quantized[0]).__module__.startswith("torch.ao.nn.quantized")
    with torch.no_grad():
        assert (quantized(x) - want).abs().max().item() < 0.1 * want.abs().max().item()


# --- the seam: a torch whose private APIs are missing or changed (simulated) falls back to F.linear, once ---


def _close(a, b) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= 1e-4


def _matches_f_linear():
    """``linear`` and ``Linear`` against ``F.linear``: inference, and a training step's output and gradients."""
    x, w, b = _operands(BIG)
    with torch.inference_mode():
        for rows in ((1, 1), (3, 5)):
            xr = torch.randn(*rows, BIG[1])
            assert _close(linear(xr, w, b), F.linear(xr, w, b)) and _close(linear(xr, w), F.linear(xr, w))
    grads = []
    for fn in (linear, F.linear):
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        out = fn(xs, ws, bs)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append((out.detach(), xs.grad, ws.grad, bs.grad))
    assert all(_close(a, b) for a, b in zip(*grads))
    layer, stock = Linear(*reversed(BIG)), nn.Linear(*reversed(BIG))
    stock.load_state_dict(layer.state_dict())
    for m in (layer, stock):
        m(x).square().sum().backward()
    assert _close(layer.weight.grad, stock.weight.grad) and _close(layer.bias.grad, stock.bias.grad)


def _runs_onednn() -> bool:
    x, w, b = _operands(BIG)
    with torch.inference_mode():
        return "mkldnn::_linear_pointwise" in _ops(lambda: linear(x, w, b))


@pytest.fixture
def other_torch(monkeypatch):
    """``monkeypatch`` for simulating another torch; afterwards the real APIs are resolved again: fast path back."""
    yield monkeypatch
    monkeypatch.undo()
    kernels._reset_for_tests()
    assert kernels.FAST_LINEAR and _runs_onednn()


def _without_op(mp):
    mp.setattr(torch.ops, "mkldnn", types.SimpleNamespace())  # torch.ops.mkldnn._linear_pointwise: AttributeError


def _op_with_new_signature(mp):
    def _linear_pointwise(x, w, b, attr):  # a release that dropped two arguments
        raise AssertionError("never reached: the call has the old argument count")

    mp.setattr(torch.ops, "mkldnn", types.SimpleNamespace(_linear_pointwise=_linear_pointwise))


SIMULATED_AT_IMPORT = {
    "op-missing": (_without_op, "torch.ops.mkldnn._linear_pointwise"),
    "op-signature-changed": (_op_with_new_signature, "torch.ops.mkldnn._linear_pointwise"),
    "functorch-check-missing": (lambda mp: mp.delattr(torch._C, "_are_functorch_transforms_active"),
                                "torch._C._are_functorch_transforms_active"),
    "forward-ad-level-missing": (lambda mp: mp.delattr(kernels._forward_ad, "_current_level"),
                                 "torch.autograd.forward_ad._current_level"),
}


@pytest.mark.parametrize("simulate", list(SIMULATED_AT_IMPORT))
def test_a_missing_or_changed_private_api_falls_back_with_one_warning(simulate, other_torch):
    patch, api = SIMULATED_AT_IMPORT[simulate]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a second warning would be recorded, not swallowed
        with other_torch.context() as mp:  # torch itself needs some of them (backward reads the functorch check):
            patch(mp)  # missing only while splice resolves them, as when importing splice under that torch
            kernels._reset_for_tests()
        assert not kernels.FAST_LINEAR
        for _ in range(3):
            _matches_f_linear()
    assert [type(w.message) for w in caught] == [KernelFallbackWarning]
    message = str(caught[0].message)
    assert api in message and torch.__version__ in message
    assert "results are unchanged" in message and "SPLICE_FAST_LINEAR=0" in message


def test_an_op_that_raises_when_called_recomputes_with_f_linear(other_torch):
    calls = []

    def changed(*args):
        calls.append(1)
        raise TypeError("_linear_pointwise(): argument 'attr' must be int, not str")

    other_torch.setattr(kernels, "_ONEDNN_LINEAR", changed)  # resolved fine, fails when called
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _matches_f_linear()
    assert [type(w.message) for w in caught] == [KernelFallbackWarning]
    assert "TypeError" in str(caught[0].message) and "attr" in str(caught[0].message)
    assert not kernels.FAST_LINEAR and len(calls) == 1  # off for the rest of the process after the first failure


def test_an_op_that_raises_in_backward_only_recomputes_the_gradients(other_torch):
    real = kernels._ONEDNN_LINEAR

    def fails_on_views(x, w, b, *rest):  # the backward passes transposed views; the forward does not
        if not w.is_contiguous():
            raise RuntimeError("mkldnn::_linear_pointwise: weight must be contiguous")
        return real(x, w, b, *rest)

    other_torch.setattr(kernels, "_ONEDNN_LINEAR", fails_on_views)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _matches_f_linear()
        _matches_f_linear()
    assert [type(w.message) for w in caught] == [KernelFallbackWarning]
    assert "RuntimeError" in str(caught[0].message) and not kernels.FAST_LINEAR


def test_an_error_f_linear_raises_too_stands_and_keeps_the_fast_path():
    x, w, _ = _operands(BIG)
    with torch.inference_mode(), pytest.raises(RuntimeError):
        linear(x[..., :-1], w)  # shapes that do not multiply: the input's fault, not the op's
    assert kernels.FAST_LINEAR and _runs_onednn()  # and no warning: the module's filter makes one an error


def test_the_environment_switch_silences_the_fallback(other_torch):
    _without_op(other_torch)
    other_torch.setenv("SPLICE_FAST_LINEAR", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels._reset_for_tests()
        _matches_f_linear()
    assert caught == [] and not kernels.FAST_LINEAR

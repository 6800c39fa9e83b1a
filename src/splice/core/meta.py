"""Building modules with their parameters on the meta device: what ``validate`` and loading build first.

The lowest layer of model building: it knows torch and nothing of splice's components. ``params_on_meta`` makes
every parameter created inside it a meta tensor (no memory) while buffers stay real; ``init_meta_buffers``
recomputes the buffers that were derived from meta parameters once real ones are assigned.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from splice.core.errors import SpliceError


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device; buffers stay real.

    Buffers are small and often computed in ``__init__`` (relative position indices, masks), so keeping them
    real means a meta-built module only needs its parameters assigned to be complete.
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    # random initialisation of a meta tensor computes nothing, but torch runs it through its Python reference
    # kernels (most of validate's time); skip it for meta tensors
    own = {name: torch.Tensor.__dict__.get(name) for name in _RANDOM_INIT}  # None: inherited from the C base
    for name in _RANDOM_INIT:
        setattr(torch.Tensor, name, _skip_on_meta(getattr(torch.Tensor, name)))
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        for name, method in own.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)


_RANDOM_INIT = ("normal_", "uniform_", "erfinv_", "clamp_", "mul_", "add_", "bernoulli_", "exponential_", "log_normal_")


def _skip_on_meta(method: Any) -> Any:
    def init(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self if self.is_meta else method(self, *args, **kwargs)

    return init


def init_meta_buffers(model: nn.Module) -> None:
    """Recompute buffers that were derived from meta parameters, once the parameters are real.

    Uses timm's convention: a module whose non-persistent buffers depend on its parameters' device offers
    ``init_non_persistent_buffers()`` (timm's Swin block calls it ``_init_buffers``).
    """
    for name, module in model.named_modules():
        if any(b is not None and b.device.type == "meta" for b in module.buffers(recurse=False)):
            init = getattr(module, "init_non_persistent_buffers", None) or getattr(module, "_init_buffers", None)
            if init is None:
                raise SpliceError(
                    f"module {name!r} ({type(module).__name__}) has buffers on the meta device and no "
                    "init_non_persistent_buffers() to recompute them\n"
                    "    fix: in the plugin, compute such buffers in init_non_persistent_buffers()"
                )
            init()

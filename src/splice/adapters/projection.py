"""Projections from the encoder's width to the decoder's context width.

``linear`` is transformers' ``enc_to_dec_proj`` (a Linear with bias), which ``projection: auto`` inserts exactly
when the widths differ. ``mlp`` is LLaVA's two-layer projector.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from splice import hookimpl
from splice.core.kernels import Linear
from splice.plugins._shared import FFNWidth


class LinearConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bias: bool = True


class MLPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: FFNWidth | None = None  # default: the output width
    act: Literal["gelu", "relu", "silu"] = "gelu"
    bias: bool = True


class MLPProjection(nn.Module):
    def __init__(self, in_width: int, out_width: int, hidden: int | None = None, act: str = "gelu", bias: bool = True):
        super().__init__()
        hidden = hidden or out_width
        self.fc1 = Linear(in_width, hidden, bias=bias)
        self.act = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}[act]()
        self.fc2 = Linear(hidden, out_width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D_enc) -> (B, N, D_ctx)
        return self.fc2(self.act(self.fc1(x)))


def build_linear(config: LinearConfig):
    """One Linear layer (transformers' enc_to_dec_proj)."""
    return lambda in_width, out_width: Linear(in_width, out_width, bias=config.bias)


def build_mlp(config: MLPConfig):
    """Linear, activation, Linear (LLaVA-style projector)."""
    return lambda in_width, out_width: MLPProjection(in_width, out_width, config.hidden, config.act, config.bias)


@hookimpl
def register_projections(register):
    register("linear", build_linear, LinearConfig, tiny={})
    register("mlp", build_mlp, MLPConfig, tiny={})

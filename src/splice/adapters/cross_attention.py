"""The built-in cross-attention kinds: what an adapter puts in a decoder layer's empty slot.

``standard``  multi-head cross-attention in the decoder family's own layout: pre-norm (GPT2:
              ``x + o_proj(attn(q_proj(norm(x)), k, v))``) or post-norm (BERT: ``norm(x + o_proj(attn(...)))``),
              chosen by the layer's ``LayerSpec.norm``, so transformers checkpoints map onto it; the norm is a
              LayerNorm, or an RMSNorm (no bias) for a family that uses those (``LayerSpec.norm_kind``, LLaMA).
``gated``     Flamingo-style: always pre-norm, and the output is scaled by ``tanh(gate)`` with a scalar ``gate``
              initialised to 0, so a pretrained decoder's output is exactly unchanged at step 0.

Both satisfy ``splice.core.interfaces.CrossAttention``: ``context_kv(context)`` projects the context once
(generation stores it in ``KVCache.cross``) and ``forward(hidden, context, context_mask, kv)`` returns the new
hidden state, residual and norms included.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from splice import hookimpl
from splice.core.kernels import Linear, dropout
from splice.core.interfaces import LayerSpec
from splice.plugins._shared import bounded_real

__all__ = [
    "STANDARD_PARAMS",
    "StandardParams",
    "StandardCrossAttention",
    "GatedCrossAttention",
    "StandardAdapter",
    "GatedAdapter",
    "StandardConfig",
    "GatedConfig",
    "build_standard",
    "build_gated",
    "context_attention_mask",
]


class StandardParams(NamedTuple):
    """The state-dict names of a ``StandardCrossAttention``, relative to the module (the decoder layer's slot).

    A decoder's checkpoint table spells the standard adapter's tensors through ``STANDARD_PARAMS``, e.g. GPT-2's
    ``Row("ln_cross_attn.weight", "crossattention." + STANDARD_PARAMS.norm_weight, (D,))``, so a rename here
    reaches every table. Iterating gives all ten names; with ``bias=False`` the four projection biases are absent.
    A test checks these against the module's real ``state_dict``.
    """

    norm_weight: str
    norm_bias: str
    q_weight: str
    q_bias: str
    k_weight: str
    k_bias: str
    v_weight: str
    v_bias: str
    out_weight: str
    out_bias: str


STANDARD_PARAMS = StandardParams(
    "norm.weight", "norm.bias", "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
    "v_proj.weight", "v_proj.bias", "o_proj.weight", "o_proj.bias",
)


def context_attention_mask(context_mask: Tensor | None) -> Tensor | None:
    """(B, N) with 1 = attend -> boolean (B, 1, 1, N) for ``scaled_dot_product_attention`` (True = attend)."""
    if context_mask is None:
        return None
    return context_mask[:, None, None, :].bool()  # (B, 1, 1, N)


class StandardCrossAttention(nn.Module):
    """Multi-head attention from the text (queries) to the context (keys, values), non-causal."""

    def __init__(
        self,
        width: int,
        heads: int,
        context_width: int,
        *,
        norm: Literal["pre", "post"] = "pre",
        eps: float = 1e-5,
        bias: bool = True,
        dropout: float = 0.0,
        norm_kind: Literal["layer", "rms"] = "layer",
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"cross-attention width {width} is not divisible by {heads} heads")
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
        self.width, self.heads, self.head_size = width, heads, width // heads
        self.context_width = context_width  # the decoder checks context.shape[-1] against this
        self.norm_position = norm
        self.dropout_p = dropout
        if norm_kind not in ("layer", "rms"):
            raise ValueError(f"norm_kind must be 'layer' or 'rms', got {norm_kind!r}")
        self.norm = nn.LayerNorm(width, eps=eps) if norm_kind == "layer" else nn.RMSNorm(width, eps=eps)
        self.q_proj = Linear(width, width, bias=bias)
        self.k_proj = Linear(context_width, width, bias=bias)
        self.v_proj = Linear(context_width, width, bias=bias)
        self.o_proj = Linear(width, width, bias=bias)
        self.reset_parameters()

    @classmethod
    def from_spec(cls, spec: LayerSpec, context_width: int, **kwargs) -> "StandardCrossAttention":
        return cls(
            spec.width, spec.heads, context_width, norm=spec.norm, eps=spec.eps, bias=spec.bias,
            dropout=spec.dropout, norm_kind=getattr(spec, "norm_kind", "layer"), **kwargs,
        )

    def reset_parameters(self) -> None:
        # the GPT2/BERT convention: N(0, 0.02) weights, zero biases, identity norm
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.norm.reset_parameters()

    def _split_heads(self, x: Tensor) -> Tensor:
        B, S, _ = x.shape
        return x.view(B, S, self.heads, self.head_size).transpose(1, 2)  # (B, nh, S, hs)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        k = self._split_heads(self.k_proj(context))  # (B, nh, N, hs)
        v = self._split_heads(self.v_proj(context))  # (B, nh, N, hs)
        return k, v

    def _attend(
        self, x: Tensor, context: Tensor | None, context_mask: Tensor | None, kv: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        """``o_proj(attn(q_proj(x), k, v))`` without residual or norm."""
        if kv is None:
            if context is None:
                raise ValueError("cross-attention needs either `context` or precomputed `kv`")
            kv = self.context_kv(context)
        k, v = kv  # (B, nh, N, hs)
        B, T, D = x.shape
        q = self._split_heads(self.q_proj(x))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=context_attention_mask(context_mask),  # (B, 1, 1, N) or None
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=False,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return dropout(self.o_proj(y), self.dropout_p, self.training)  # (B, T, D)

    def _branch(self, y: Tensor) -> Tensor:
        """The pre-norm attention output as it joins the residual stream: unchanged here, gated in ``gated``."""
        return y

    def forward(
        self,
        hidden: Tensor,  # (B, T, D)
        context: Tensor | None = None,  # (B, N, D_ctx)
        context_mask: Tensor | None = None,  # (B, N)
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if self.norm_position == "pre":
            return hidden + self._branch(self._attend(self.norm(hidden), context, context_mask, kv))  # (B, T, D)
        return self.norm(hidden + self._attend(hidden, context, context_mask, kv))  # (B, T, D)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, context_width={self.context_width}, norm={self.norm_position!r}"


class GatedCrossAttention(StandardCrossAttention):
    """Pre-norm cross-attention whose output passes through ``tanh(gate)``.

    ``gate`` is one scalar per module (as in Flamingo's attention gate), initialised to ``init_gate`` (0 by
    default): ``x + tanh(gate) * o_proj(attn(q_proj(norm(x)), k, v))``. At 0 the module is the identity, so
    installing it leaves a pretrained decoder's output exactly unchanged until training moves the gate.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        context_width: int,
        *,
        eps: float = 1e-5,
        bias: bool = True,
        dropout: float = 0.0,
        init_gate: float = 0.0,
        norm_kind: Literal["layer", "rms"] = "layer",
    ):
        super().__init__(width, heads, context_width, norm="pre", eps=eps, bias=bias, dropout=dropout,
                         norm_kind=norm_kind)
        self.gate = nn.Parameter(torch.tensor(float(init_gate)))  # () scalar

    @classmethod
    def from_spec(cls, spec: LayerSpec, context_width: int, **kwargs) -> "GatedCrossAttention":
        # always pre-norm whatever the family does: the gate must see the un-normalised residual stream
        return cls(spec.width, spec.heads, context_width, eps=spec.eps, bias=spec.bias, dropout=spec.dropout,
                   norm_kind=getattr(spec, "norm_kind", "layer"), **kwargs)

    def _branch(self, y: Tensor) -> Tensor:
        return torch.tanh(self.gate) * y  # (B, T, D); forward is the standard kind's pre-norm path

    def extra_repr(self) -> str:
        return f"heads={self.heads}, context_width={self.context_width}, gated"


# ---- adapters (what the registry's builders return) -------------------------------------------------------


class StandardConfig(BaseModel):
    """The ``standard`` kind has no options: its layout follows the decoder layer's ``LayerSpec``."""

    model_config = ConfigDict(extra="forbid")


Gate = bounded_real(-100, 100, "the gate is tanh(init_gate), already within 1e-8 of +-1 beyond +-10")


class GatedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    init_gate: Gate = Field(0.0, description="initial value of the scalar gate; tanh(0) = 0 keeps the LM unchanged")


class StandardAdapter:
    """Builds a ``StandardCrossAttention`` for one decoder layer."""

    def build(self, spec: LayerSpec, context_width: int) -> nn.Module:
        return StandardCrossAttention.from_spec(spec, context_width)

    def __repr__(self) -> str:
        return "StandardAdapter()"


class GatedAdapter:
    """Builds a ``GatedCrossAttention`` for one decoder layer."""

    def __init__(self, init_gate: float = 0.0):
        if not math.isfinite(init_gate):
            raise ValueError(f"init_gate must be finite, got {init_gate!r}")
        self.init_gate = init_gate

    def build(self, spec: LayerSpec, context_width: int) -> nn.Module:
        return GatedCrossAttention.from_spec(spec, context_width, init_gate=self.init_gate)

    def __repr__(self) -> str:
        return f"GatedAdapter(init_gate={self.init_gate})"


def build_standard(config: StandardConfig) -> StandardAdapter:
    return StandardAdapter()


def build_gated(config: GatedConfig) -> GatedAdapter:
    return GatedAdapter(init_gate=config.init_gate)


@hookimpl
def register_adapters(register):
    register(
        "standard", build_standard, StandardConfig, tiny={},
        description="multi-head cross-attention in the decoder family's own layout (pre- or post-norm); "
        "transformers checkpoints load into it",
    )
    register(
        "gated", build_gated, GatedConfig, tiny={},
        description="Flamingo-style pre-norm cross-attention behind a zero-initialised tanh gate: "
        "the pretrained decoder is unchanged at step 0",
    )

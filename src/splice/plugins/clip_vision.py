"""CLIP's vision tower (transformers' ``CLIPVisionModel``) as a splice vision encoder: the image side of CLIP, and
the vision tower of LLaVA and VipLlava.

A ViT with a class token, learned positions, a LayerNorm before the first layer (``pre_layrnorm``, transformers'
spelling) and pre-norm layers whose MLP uses quick-GELU (``x * sigmoid(1.702 x)``) by default. What ``forward``
returns means what transformers' ``CLIPVisionModel`` returns:

- ``last_hidden_state``: the last layer's tokens (B, 1 + g*g, D), class token first, *no* final norm;
- ``pooler_output``: the class token through ``post_layernorm`` (B, D), CLIP's image vector before its projection
  (what transformers' VisionTextDualEncoderModel reads as ``vision_outputs[1]``);
- ``hidden_states`` (when asked for): the embeddings after ``pre_layrnorm``, then each layer's output, index for
  index (``num_hidden_layers + 1`` entries; ``hidden_states[-2]`` is the penultimate layer, LLaVA's
  ``vision_feature_layer``; VipLlava concatenates ``[-2, -5, -8, -11, 6]``).

The patch grid is ``image_size // patch_size`` a side: as transformers' convolution, the last ``image_size %
patch_size`` rows and columns of pixels are never read. Images must be ``image_size`` square (transformers'
position interpolation is not offered).

Module names are transformers' own, so the checkpoint table maps each tensor to itself with its shape checked. Files
of transformers 4, and of the whole CLIP model (``model_type: clip``, e.g. openai/clip-vit-base-patch32, read through
its ``vision_config``), put ``vision_model.`` before the names; it is removed on reading, and the text tower and
projections of a ``clip`` file are expected unused tensors. Defaults are transformers' ``CLIPVisionConfig``
(ViT-B/32 at 224 px); LLaVA's tower is ``image_size: 336, patch_size: 14, hidden_size: 1024,
intermediate_size: 4096, num_hidden_layers: 24, num_attention_heads: 16``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from splice import HFInterop, hookimpl
from splice.core.errors import ConfigError, Problem
from splice.core.inputs import check_pixels
from splice.core.interfaces import EncoderOutput, Preprocessing
from splice.core.kernels import Linear
from splice.core.keymap import Row, from_hf, to_hf
from splice.plugins._shared import (
    ACTIVATION_FNS, MAX_WEIGHT, Eps, FFNWidth, Heads, InitStd, Layers, Probability, Width, bounded_real,
    check_heads_divide, split_heads,
)
# the bounds of the timm ViT's config (docs/limits.md): a global-attention encoder's token count, the image
from splice.plugins.timm_vision import MAX_TOKENS, Channels, ImageSize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's image_mean and image_std
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: Tensor) -> Tensor:
    """transformers' ``quick_gelu`` (OpenAI CLIP's activation)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {**ACTIVATION_FNS, "quick_gelu": quick_gelu}
Activation = Literal["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"]
InitFactor = bounded_real(0, 100, "a scale on every initial standard deviation; CLIP uses 1")

# ----------------------------------------------------------------------------------------------------------------
# Config


class ClipVisionConfig(BaseModel):
    """transformers' ``CLIPVisionConfig`` (same field names; ``projection_dim`` belongs to CLIPModel's projection,
    not to the tower, and is not read). Defaults are ViT-B/32 at 224 px, as transformers'."""

    model_config = ConfigDict(extra="forbid")

    image_size: ImageSize = Field(224, description="pixels a side: images are image_size square")
    patch_size: ImageSize = Field(32, description="pixels a side of a patch; the grid is image_size // patch_size a "
                                  "side (the remaining pixels are not read, as in transformers)")
    num_channels: Channels = 3
    hidden_size: Width = 768
    intermediate_size: FFNWidth = 3072
    num_hidden_layers: Layers = 12
    num_attention_heads: Heads = 12
    hidden_act: Activation = Field("quick_gelu", description="the MLP's activation: OpenAI CLIP's quick_gelu, or "
                                   "exact gelu (e.g. LAION's OpenCLIP towers)")
    layer_norm_eps: Eps = 1e-5
    attention_dropout: Probability = 0.0
    initializer_range: InitStd = 0.02
    initializer_factor: InitFactor = 1.0

    @model_validator(mode="after")
    def _fits(self) -> "ClipVisionConfig":
        check_heads_divide("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        grid = self.image_size // self.patch_size
        if grid == 0:
            raise ValueError(f"patch_size {self.patch_size} is larger than image_size {self.image_size}, so the image "
                             f"holds no patch; expected patch_size <= image_size; fix: a patch_size of at most "
                             f"{self.image_size}")
        if grid * grid + 1 > MAX_TOKENS:
            raise ValueError(f"image_size {self.image_size} // patch_size {self.patch_size} is a {grid}x{grid} grid of "
                             f"{grid * grid:,} patches; expected at most {MAX_TOKENS - 1:,}; fix: a larger "
                             "patch_size or a smaller image_size (docs/limits.md)")
        weight = self.hidden_size * self.num_channels * self.patch_size**2
        if weight > MAX_WEIGHT:
            raise ValueError(f"the patch embedding (hidden_size x num_channels x patch_size^2) would hold {weight:,} "
                             f"weights; expected at most {MAX_WEIGHT:,}; fix: a smaller patch_size, num_channels or "
                             "hidden_size (docs/limits.md)")
        return self


# ----------------------------------------------------------------------------------------------------------------
# The module


class Embeddings(nn.Module):
    """The class token and the patches, plus a learned position each: (B, 1 + g*g, D)."""

    def __init__(self, channels: int, width: int, image_size: int, patch: int):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.patch_embedding = nn.Conv2d(channels, width, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch) ** 2 + 1, width)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, g*g, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1 + g*g, D)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj = Linear(width, width), Linear(width, width), Linear(width, width)
        self.out_proj = Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B,nh,N,hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B,nh,N,hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, width: int, inner: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = Linear(width, inner), Linear(inner, width), ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D)


class Layer(nn.Module):
    """One pre-norm encoder layer: attention, then the MLP, each after a LayerNorm and added back."""

    def __init__(self, width: int, heads: int, inner: int, act: str, eps: float, dropout: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = Attention(width, heads, dropout)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, inner, act)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # (B, N, D)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """The layers, held as ``encoder.layers`` (transformers' names)."""

    def __init__(self, layers: list[Layer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class ClipVisionEncoder(nn.Module):
    """``last_hidden_state`` (B, 1 + g*g, D) without a final norm, ``pooler_output`` (B, D) the normed class token,
    ``hidden_states`` transformers' tuple; see the module docstring."""

    def __init__(self, *, image_size: int, patch_size: int, num_channels: int, hidden_size: int,
                 intermediate_size: int, num_hidden_layers: int, num_attention_heads: int, hidden_act: str,
                 layer_norm_eps: float, attention_dropout: float, initializer_range: float, initializer_factor: float):
        super().__init__()
        D = hidden_size
        self.embeddings = Embeddings(num_channels, D, image_size, patch_size)
        self.pre_layrnorm = nn.LayerNorm(D, eps=layer_norm_eps)
        self.encoder = Encoder([Layer(D, num_attention_heads, intermediate_size, hidden_act, layer_norm_eps,
                                      attention_dropout) for _ in range(num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(D, eps=layer_norm_eps)
        self.hidden_size = D
        self.fixed_size = True  # the positions are learned for one grid
        mean, std = (CLIP_MEAN, CLIP_STD) if num_channels == 3 else ((sum(CLIP_MEAN) / 3,) * num_channels,
                                                                      (sum(CLIP_STD) / 3,) * num_channels)
        # CLIPImageProcessor resizes the short side to image_size and crops the centre; a folder's own
        # preprocessor_config.json says so, and wins over this
        self.preprocessing = Preprocessing(image_size=(image_size, image_size), mean=mean, std=std,
                                           interpolation="bicubic", crop_pct=1.0, in_chans=num_channels)
        self._init_weights(initializer_range * initializer_factor, initializer_factor, num_hidden_layers)

    def _init_weights(self, std: float, factor: float, layers: int) -> None:
        """transformers' CLIP init (zero biases and identity norms are torch's and transformers' alike)."""
        D = self.hidden_size
        deep = D**-0.5 * (2 * layers) ** -0.5 * factor  # what feeds the residual stream gets smaller with depth
        nn.init.normal_(self.embeddings.class_embedding, std=D**-0.5 * factor)
        nn.init.normal_(self.embeddings.patch_embedding.weight, std=std)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=std)
        for layer in self.encoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj, s in ((attn.q_proj, deep), (attn.k_proj, deep), (attn.v_proj, deep),
                            (attn.out_proj, D**-0.5 * factor), (mlp.fc1, (2 * D) ** -0.5 * factor), (mlp.fc2, deep)):
                nn.init.normal_(proj.weight, std=s)
                nn.init.zeros_(proj.bias)

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> EncoderOutput:
        x = self.pre_layrnorm(self.embeddings(check_pixels(pixel_values, self)))  # (B, N, D), N = 1 + g*g
        seen = [x] if output_hidden_states else None  # kept only when asked for: each is a (B, N, D) tensor
        for layer in self.encoder.layers:
            x = layer(x)  # (B, N, D)
            if seen is not None:
                seen.append(x)
        return EncoderOutput(x, tuple(seen) if seen is not None else None,
                             pooler_output=self.post_layernorm(x[:, 0]))  # (B, D)


def build_clip_vision(cfg: ClipVisionConfig) -> ClipVisionEncoder:
    return ClipVisionEncoder(**cfg.model_dump())


# ----------------------------------------------------------------------------------------------------------------
# transformers interop

_HF = dict(ClipVisionConfig().model_dump())  # transformers' CLIPVisionConfig defaults, field for field


def _reject(field: str, value: Any, expected: str, fix: str) -> ConfigError:
    return ConfigError([Problem(field, "transformers CLIP vision setting splice's clip_vision does not read",
                                given=value, expected=expected, fix=fix)])


def _tower(hf: dict) -> dict:
    """The vision tower's config: a ``clip`` (CLIPModel) config's ``vision_config``, else the config itself."""
    if hf.get("model_type") != "clip":
        return hf
    vision = hf.get("vision_config") or {}
    if not isinstance(vision, dict):
        raise _reject("vision_config", vision, "a mapping (CLIPModel's vision tower settings)",
                      "save the config again with transformers")
    return vision


def _side(value: Any, field: str) -> Any:
    """An ``image_size`` / ``patch_size`` as one number: transformers' CLIP computes with one (a square)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise _reject(field, value, "one number, or [n, n] (CLIP's grid is square)",
                          f"use a square {field}; transformers' CLIPVisionModel cannot run another either")
        return value[0]
    return value


def _config_from_hf(hf: dict) -> dict:
    c = {**_HF, **{k: v for k, v in _tower(hf).items() if k in _HF and v is not None}}
    if c["hidden_act"] not in ACTIVATIONS:
        raise _reject("hidden_act", c["hidden_act"], f"one of {sorted(ACTIVATIONS)}",
                      "use a checkpoint with one of these activations")
    return dict(c, image_size=_side(c["image_size"], "image_size"), patch_size=_side(c["patch_size"], "patch_size"))


def _config_to_hf(v: dict) -> dict:
    return dict(model_type="clip_vision_model", **{k: v[k] for k in _HF})


def _table(hf: dict) -> list[Row]:
    """transformers' names are ours: each row copies a tensor as it is, its shape checked against the config."""
    c = _config_from_hf(hf)
    D, inner, P = c["hidden_size"], c["intermediate_size"], c["patch_size"]
    rows = [Row("embeddings.class_embedding", "embeddings.class_embedding", (D,)),
            Row("embeddings.patch_embedding.weight", "embeddings.patch_embedding.weight", (D, c["num_channels"], P, P)),
            Row("embeddings.position_embedding.weight", "embeddings.position_embedding.weight",
                ((c["image_size"] // P) ** 2 + 1, D))]
    shapes = {"pre_layrnorm": (D,), "post_layernorm": (D,)}
    for i in range(c["num_hidden_layers"]):
        layer = f"encoder.layers.{i}"
        shapes.update({f"{layer}.layer_norm1": (D,), f"{layer}.layer_norm2": (D,),
                       f"{layer}.mlp.fc1": (inner, D), f"{layer}.mlp.fc2": (D, inner)})
        shapes.update({f"{layer}.self_attn.{p}_proj": (D, D) for p in ("q", "k", "v", "out")})
    for name, shape in shapes.items():  # a LayerNorm's weight and bias are (D,); a Linear's bias is its rows
        rows += [Row(f"{name}.weight", f"{name}.weight", shape), Row(f"{name}.bias", f"{name}.bias", shape[:1])]
    return rows


def _config_line(hf: dict) -> str:
    c = _config_from_hf(hf)
    return ", ".join(f"{k}={c[k]}" for k in ("image_size", "patch_size", "hidden_size", "intermediate_size",
                                             "num_hidden_layers"))


HF = HFInterop(
    model_types=("clip_vision_model", "clip"),
    config_from_hf=_config_from_hf,
    config_to_hf=_config_to_hf,
    state_dict_from_hf=lambda sd, hf: from_hf(sd, _table(hf), lambda k: k.removeprefix("vision_model."),
                                              _config_line(hf)),
    state_dict_to_hf=lambda sd, hf: to_hf(sd, _table(hf), layout="CLIPVisionModel",
                                          fix="export a clip_vision encoder built by splice"),
    # transformers 4 files carry the (derived) position ids; a CLIPModel or CLIPVisionModelWithProjection file also
    # holds the text tower, the projections and the logit scale, which have no place in a vision encoder
    ignorable=(r"(?:.*\.)?position_ids", r"text_model\..+", r"(?:visual|text)_projection\.weight", r"logit_scale"),
)

# 10 layers, so that VipLlava's default feature layers [-2, -5, -8, -11, 6] all exist in the tiny tower
TINY = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=10,
            num_attention_heads=2)


@hookimpl
def register_encoders(register):
    register("clip_vision", build_clip_vision, ClipVisionConfig, aliases=("clip-vision",), tiny=dict(TINY), hf=HF,
             description="CLIP's vision tower (CLIPVisionModel: class token, pre-layernorm, quick-GELU), the tower "
                         "of LLaVA and VipLlava; reads transformers CLIP vision and CLIP checkpoints")

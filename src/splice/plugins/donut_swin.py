"""DonutSwin (transformers' ``DonutSwinModel``) as a splice vision encoder: the encoder of Donut and Nougat.

A Swin Transformer for document images: a rectangular input (Donut reads 2560 x 1920, Nougat 896 x 672), the last
stage's tokens with no final norm. Native rather than timm because parity needs transformers' own padding, which
timm's ``SwinTransformer`` does differently:

- the image is zero-padded on the right and bottom up to a multiple of the patch;
- each block zero-pads its normed feature map up to a window multiple *before* the cyclic shift (timm shifts, then
  pads), attends over the padded windows (padding tokens are keys too; the shift mask covers the padded map), and
  crops back;
- a stage whose shorter side is no larger than the window uses no shift (on both axes; timm decides per axis);
- patch merging pads an odd height or width by one row or column.

Checkpoints read and written here are transformers' ``donut-swin`` layout, separate query/key/value fused into one
``qkv`` projection. Defaults are naver-clova-ix/donut-base's encoder.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, BeforeValidator, Field, model_validator
from torch import Tensor, nn

from splice import HFInterop, hookimpl
from splice.core.errors import ConfigError, Problem
from splice.core.inputs import check_pixels
from splice.core.interfaces import EncoderOutput, Preprocessing
from splice.core.keymap import Row, from_hf, to_hf
from splice.core.roles import REAL_DRY_FORWARD
from splice.plugins._shared import ACTIVATION_FNS, MAX_WEIGHT, Layers, Width, check_build_memory
# the bounds of the timm Swin's config (docs/limits.md), so Donut's and Nougat's encoders fit the same way
from splice.plugins.timm_vision import (
    INDEX_COPIES, MAX_PATCHES, MAX_STAGES, Channels, ImageSize, SwinStages, check_swin_stages, swin_table,
)

FORWARD_COPIES = 3  # a stage's shift mask, its attention scores and their softmax, per window pair and head


def _pair(v: Any) -> Any:
    """``img_size`` as given: one number is a square, ``[H, W]`` a rectangle (each side checked as a size)."""
    if not isinstance(v, (list, tuple)):
        return (v, v)
    if len(v) != 2:
        raise ValueError(f"img_size has {len(v)} entries; expected one number (a square) or [height, width]; fix: "
                         "write img_size as [height, width], e.g. [2560, 1920]")
    return v


ImageSides = Annotated[tuple[ImageSize, ImageSize], BeforeValidator(_pair)]


def stage_sizes(img_size: tuple[int, int], patch_size: int, stages: int) -> list[tuple[int, int]]:
    """Each stage's token grid (H, W): the patch grid of the padded image, then halved (rounding up) per merge."""
    h, w = (math.ceil(s / patch_size) for s in img_size)
    sizes = [(h, w)]
    for _ in range(stages - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


class _Image(BaseModel):
    """The image fields, declared before the stages'."""

    img_size: ImageSides = Field((2560, 1920), description="(H, W), or one number for a square")
    patch_size: ImageSize = 4
    in_chans: Channels = 3
    embed_dim: Width = 128


class DonutSwinConfig(SwinStages, _Image):
    """transformers' DonutSwin; defaults are naver-clova-ix/donut-base's encoder (2560 x 1920, window 10).

    ``layer_norm_eps`` is the blocks'; the patch-embedding and merging norms use 1e-5, as transformers' do.
    """

    depths: tuple[Layers, ...] = Field(default=(2, 2, 14, 2), min_length=1, max_length=MAX_STAGES)
    window_size: ImageSize = 10
    hidden_act: Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"] = "gelu"

    @model_validator(mode="after")
    def _fits(self) -> "DonutSwinConfig":
        self._check_stages()
        self._check_widths()
        check_build_memory(
            self._build_bytes(), "relative position indexes, and the shift masks and attention scores of the dry "
            "forward validate runs on a small model", "img_size / patch_size, window_size, num_heads and depths",
            "a smaller img_size or larger patch_size, a smaller window_size, or fewer heads")
        return self

    def _check_stages(self) -> None:
        if len(self.num_heads) != len(self.depths):
            raise ValueError(f"num_heads has {len(self.num_heads)} entries but depths has {len(self.depths)}; "
                             f"expected one head count per stage; fix: give num_heads {len(self.depths)} values")
        sizes = stage_sizes(self.img_size, self.patch_size, len(self.depths))
        h, w = sizes[0]
        if h * w > MAX_PATCHES:
            raise ValueError(f"img_size {list(self.img_size)} / patch_size {self.patch_size} is a {h}x{w} grid of "
                             f"{h * w:,} patches; expected at most {MAX_PATCHES:,}; fix: a larger patch_size or a "
                             "smaller img_size (docs/limits.md)")
        for i, (h, w) in enumerate(sizes):
            if min(h, w) < self.window_size:  # transformers' relative position bias then no longer fits the window
                raise ValueError(
                    f"stage {i} is {h}x{w} tokens, shorter than window_size {self.window_size} on one side; expected "
                    f"every stage ({', '.join(f'{a}x{b}' for a, b in sizes)}) at least window_size on its shorter "
                    f"side (transformers' DonutSwin cannot run it either); fix: window_size at most "
                    f"{min(min(s) for s in sizes)}, a larger img_size, or fewer stages")

    def _check_widths(self) -> None:
        check_swin_stages(self.embed_dim, self.depths, self.mlp_ratio)
        for i, heads in enumerate(self.num_heads):
            width = self.embed_dim * 2**i
            if width % heads:
                raise ValueError(f"num_heads {heads} (stage {i}) does not divide the stage width {width}; expected a "
                                 f"divisor of {width}; fix: change num_heads or embed_dim")
        weight = self.embed_dim * self.in_chans * self.patch_size**2
        if weight > MAX_WEIGHT:
            raise ValueError(f"the patch embedding (embed_dim x in_chans x patch_size^2) would hold {weight:,} "
                             f"weights; expected at most {MAX_WEIGHT:,}; fix: a smaller patch_size, in_chans or "
                             "embed_dim (docs/limits.md)")

    def _build_bytes(self) -> int:
        """An int64 index over each block's window pairs; and, for a model small enough that validate's dry forward
        runs on real zeros (else it runs on the meta device), the largest stage's float32 shift mask and one block's
        attention scores over every window pair of its padded map."""
        ws, biggest = self.window_size, 0
        if self._parameters() <= REAL_DRY_FORWARD:
            for (h, w), heads in zip(stage_sizes(self.img_size, self.patch_size, len(self.depths)), self.num_heads):
                padded = math.ceil(h / ws) * ws * math.ceil(w / ws) * ws
                biggest = max(biggest, FORWARD_COPIES * 4 * padded * ws**2 * (heads + 1))
        return sum(self.depths) * 8 * INDEX_COPIES * ws**4 + biggest

    def _parameters(self) -> int:
        """About how many parameters the blocks and merges hold (weights only)."""
        total = self.embed_dim * self.in_chans * self.patch_size**2
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            d = self.embed_dim * 2**i
            total += depth * (4 * d * d + 2 * d * int(d * self.mlp_ratio) + (2 * self.window_size - 1) ** 2 * heads)
            total += 8 * d * d if i < len(self.depths) - 1 else 0
        return total


# ----------------------------------------------------------------------------------------------------------------
# The module


def relative_position_index(ws: int) -> Tensor:
    """For each pair of a window's tokens, the row of the bias table of their offset: (ws*ws, ws*ws), int64."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 2), offsets from 0
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def window_partition(x: Tensor, ws: int) -> Tensor:
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).transpose(2, 3)  # (B, H/ws, W/ws, ws, ws, C)
    return x.reshape(-1, ws * ws, C)  # (B*nW, ws*ws, C)


def window_reverse(windows: Tensor, ws: int, H: int, W: int) -> Tensor:
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C).transpose(2, 3)  # (B, H/ws, ws, W/ws, ws, C)
    return x.reshape(-1, H, W, C)


def shift_mask(H: int, W: int, ws: int, shift: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """transformers' shifted-window mask over a padded (H, W) map: 0 within a region, -100 across: (nW, N, N)."""
    h = torch.arange(H, device=device)
    w = torch.arange(W, device=device)
    h_region = (h >= H - ws).long() + (h >= H - shift).long()
    w_region = (w >= W - ws).long() + (w >= W - shift).long()
    regions = (h_region[None, :, None, None] * 3 + w_region[None, None, :, None]).to(dtype)  # (1, H, W, 1)
    windows = window_partition(regions, ws).squeeze(-1)  # (nW, N)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)  # (nW, N, N)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, ws: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.ws = heads, ws
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(ws), persistent=False)

    def init_non_persistent_buffers(self) -> None:
        self.relative_position_index = relative_position_index(self.ws).to(self.relative_position_bias_table.device)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        BW, N, C = x.shape  # (B*nW, N, C), N = ws*ws
        q, k, v = self.qkv(x).view(BW, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (BW, nh, N, hs)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, nh)
        bias = bias.view(N, N, self.heads).permute(2, 0, 1)  # (nh, N, N)
        if mask is not None:
            nW = mask.shape[0]
            bias = bias + mask.unsqueeze(1)  # (nW, nh, N, N)
            q, k, v = (t.view(BW // nW, nW, self.heads, N, -1) for t in (q, k, v))  # (B, nW, nh, N, hs)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.reshape(BW, self.heads, N, -1).transpose(1, 2).reshape(BW, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), ACTIVATION_FNS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One Swin block at a fixed stage resolution: window size and shift are settled at construction."""

    def __init__(self, dim: int, heads: int, ws: int, shift: int, size: tuple[int, int], mlp_ratio: float,
                 qkv_bias: bool, act: str, eps: float):
        super().__init__()
        self.ws, self.shift, self.size = ws, shift, size
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, heads, ws, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        (H, W), ws, s = self.size, self.ws, self.shift
        B, _, C = x.shape  # (B, H*W, C)
        h = F.pad(self.norm1(x).view(B, H, W, C), (0, 0, 0, -W % ws, 0, -H % ws))  # (B, Hp, Wp, C), zeros
        Hp, Wp = h.shape[1:3]
        if s:
            h = torch.roll(h, shifts=(-s, -s), dims=(1, 2))
        h = window_reverse(self.attn(window_partition(h, ws), mask if s else None), ws, Hp, Wp)  # (B, Hp, Wp, C)
        if s:
            h = torch.roll(h, shifts=(s, s), dims=(1, 2))
        x = x + h[:, :H, :W].reshape(B, H * W, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, size: tuple[int, int]):
        super().__init__()
        self.size = size
        self.norm = nn.LayerNorm(4 * dim)  # transformers' default eps, whatever layer_norm_eps says
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        (H, W), (B, _, C) = self.size, x.shape
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))  # (B, H', W', C), even sides
        x = torch.cat([x[:, r::2, c::2] for c in range(2) for r in range(2)], dim=-1)  # (B, H'/2, W'/2, 4C)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))  # (B, H'/2 * W'/2, 2C)


class Stage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, ws: int, size: tuple[int, int], merge: bool, **block: Any):
        super().__init__()
        # transformers: a stage no larger than the window on its shorter side is one window row, never shifted
        shift = 0 if min(size) <= ws else ws // 2
        self.ws, self.shift, self.size = ws, shift, size
        self.blocks = nn.ModuleList(Block(dim, heads, ws, shift * (i % 2), size, **block) for i in range(depth))
        self.downsample = PatchMerging(dim, size) if merge else None

    def forward(self, x: Tensor) -> Tensor:
        mask = None
        if self.shift and len(self.blocks) > 1:  # every second block is shifted; they share one mask
            H, W = (math.ceil(n / self.ws) * self.ws for n in self.size)
            mask = shift_mask(H, W, self.ws, self.shift, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)  # transformers' default eps, whatever layer_norm_eps says

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch
        x = F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p))  # zeros right and bottom, to patch multiples
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))  # (B, h*w, D)


class DonutSwinEncoder(nn.Module):
    """The encoder: ``last_hidden_state`` is the last stage's tokens (B, h*w, D), row-major, with no final norm.

    ``hidden_states`` are transformers': the patch embeddings, then each stage's output after its patch merging
    (so the last equals ``last_hidden_state``).
    """

    def __init__(self, *, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int,
                 depths: tuple[int, ...], num_heads: tuple[int, ...], window_size: int, mlp_ratio: float,
                 qkv_bias: bool, hidden_act: str, layer_norm_eps: float):
        super().__init__()
        sizes = stage_sizes(img_size, patch_size, len(depths))
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.layers = nn.ModuleList(  # transformers' and timm's name for the stages
            Stage(embed_dim * 2**i, depth, num_heads[i], window_size, sizes[i], merge=i < len(depths) - 1,
                  mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, act=hidden_act, eps=layer_norm_eps)
            for i, depth in enumerate(depths))
        self.hidden_size = embed_dim * 2 ** (len(depths) - 1)
        self.fixed_size = True
        # Donut's image processor normalises with 0.5 / 0.5 and resizes bilinearly; a folder's own
        # preprocessor_config.json says what it was trained with
        self.preprocessing = Preprocessing(image_size=tuple(img_size), mean=(0.5,) * in_chans, std=(0.5,) * in_chans,
                                           interpolation="bilinear", crop_pct=1.0, in_chans=in_chans)

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> EncoderOutput:
        x = self.patch_embed(check_pixels(pixel_values, self))  # (B, h*w, D)
        seen = [x]
        for stage in self.layers:
            x = stage(x)  # (B, h*w / 4, 2D) after a merge
            seen.append(x)
        return EncoderOutput(x, tuple(seen) if output_hidden_states else None)


def build_donut_swin(cfg: DonutSwinConfig) -> DonutSwinEncoder:
    return DonutSwinEncoder(**cfg.model_dump())


# ----------------------------------------------------------------------------------------------------------------
# transformers interop

_HF = dict(image_size=224, patch_size=4, num_channels=3, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
           window_size=7, mlp_ratio=4.0, qkv_bias=True, hidden_act="gelu", use_absolute_embeddings=False,
           layer_norm_eps=1e-5)


def _reject(field: str, value: Any, expected: str, fix: str) -> ConfigError:
    return ConfigError([Problem(field, "transformers DonutSwin setting splice's donut_swin does not read", given=value,
                                expected=expected, fix=fix)])


def _config_from_hf(hf: dict) -> dict:
    c = {**_HF, **hf}
    if c["use_absolute_embeddings"]:  # transformers adds (1, patches + 1, D) to (B, patches, D): it cannot run
        raise _reject("use_absolute_embeddings", True, "false (as every released Donut and Nougat)",
                      "set use_absolute_embeddings to false in config.json")
    patch = c["patch_size"]
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise _reject("patch_size", patch, "square patches (one int)", "use a checkpoint with square patches")
        patch = patch[0]
    if c["hidden_act"] not in ACTIVATION_FNS:
        raise _reject("hidden_act", c["hidden_act"], f"one of {sorted(ACTIVATION_FNS)}",
                      "use a checkpoint with one of these activations")
    size = c["image_size"]
    return dict(img_size=tuple(size) if isinstance(size, (list, tuple)) else (size, size), patch_size=patch,
                in_chans=c["num_channels"], embed_dim=c["embed_dim"], depths=tuple(c["depths"]),
                num_heads=tuple(c["num_heads"]), window_size=c["window_size"], mlp_ratio=c["mlp_ratio"],
                qkv_bias=c["qkv_bias"], hidden_act=c["hidden_act"], layer_norm_eps=c["layer_norm_eps"])


def _config_to_hf(v: dict) -> dict:
    return dict(model_type="donut-swin", image_size=list(v["img_size"]), patch_size=v["patch_size"],
                num_channels=v["in_chans"], embed_dim=v["embed_dim"], depths=list(v["depths"]),
                num_heads=list(v["num_heads"]), window_size=v["window_size"], mlp_ratio=v["mlp_ratio"],
                qkv_bias=v["qkv_bias"], hidden_act=v["hidden_act"], layer_norm_eps=v["layer_norm_eps"],
                use_absolute_embeddings=False)


def _merged_at_stage_end(name: str) -> str:
    """timm merges patches at the start of stage s + 1; here, as in transformers, at the end of stage s."""
    return re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample.", name)


def _table(hf: dict) -> list[Row]:
    """transformers' names (the same on disk and in memory) -> ours: the timm Swin's table (query/key/value fused
    into ``qkv``), merges moved to the end of their stage, and no final norm."""
    rows = [row for row in swin_table({**_HF, **hf}) if row.ours not in (("norm.weight",), ("norm.bias",))]
    return [dataclasses.replace(row, ours=tuple(map(_merged_at_stage_end, row.ours))) for row in rows]


def _state_dict_to_hf(sd: dict[str, Tensor], hf: dict) -> dict[str, Tensor]:
    out = to_hf(sd, _table(hf), layout="donut-swin", fix="export a donut_swin encoder built by splice")
    # transformers' files carry each block's (constant) index; writing it spares a 'missing keys' note on load
    index = relative_position_index(int({**_HF, **hf}["window_size"]))
    for key in [k for k in out if k.endswith(".relative_position_bias_table")]:
        out[key.replace("_bias_table", "_index")] = index.clone()
    return out


HF = HFInterop(
    model_types=("donut-swin",),
    config_from_hf=_config_from_hf,
    config_to_hf=_config_to_hf,
    state_dict_from_hf=lambda sd, hf: from_hf(sd, _table(hf), lambda k: k.removeprefix("donut."), "donut-swin"),
    state_dict_to_hf=_state_dict_to_hf,
    # the pooler has no weights; an index is recomputed; a masked-image-modeling token has no place in an encoder
    ignorable=(r"(?:.*\.)?relative_position_index", r"embeddings\.mask_token", r"pooler\..+"),
)

TINY = dict(img_size=[40, 56], patch_size=4, embed_dim=8, depths=[1, 1, 2], num_heads=[2, 2, 4], window_size=3)


@hookimpl
def register_encoders(register):
    register("donut_swin", build_donut_swin, DonutSwinConfig, aliases=("donut-swin",), tiny=dict(TINY), hf=HF,
             description="DonutSwin (Donut, Nougat): Swin with a rectangular input, no final norm; reads "
                         "transformers DonutSwin")

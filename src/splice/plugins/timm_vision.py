"""ViT, DeiT, BEiT, Swin, and any other timm model, as splice vision encoders.

Every family builds a timm model with ``pretrained=False, num_classes=0`` and wraps it in ``TimmEncoder``, which
turns ``forward_features`` into tokens ``(B, N, D)``. Each family also knows how to read (and write) the
checkpoints transformers saves, so ``google/vit-*``, ``facebook/deit-*``, ``microsoft/beit-*`` and
``microsoft/swin-*`` encoders load into the same modules.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import Tensor, nn

from splice import HFInterop, hookimpl
from splice.core.errors import ConfigError, InputError, Problem, clip, short
from splice.core.interfaces import EncoderOutput, Preprocessing
from splice.core.kernels import use_fast_linear
from splice.core.keymap import Row, from_hf, to_hf
from splice.plugins._shared import (
    MAX_FFN, MAX_HEADS, MAX_LAYERS, MAX_WEIGHT, MAX_WIDTH, Eps, Heads, Layers, Width,
    bounded_int, bounded_real, check_build_memory,
)

# ----------------------------------------------------------------------------------------------------------------
# The module


class TimmEncoder(nn.Module):
    """A timm model read as a sequence of tokens.

    ``hidden_states`` (when asked for) are the input of the first block or stage followed by the output of
    each one, before any final norm, as transformers reports them. Swin stages end before their patch merging
    (timm merges at the start of the next stage). Models without a ``blocks``/``stages``/``layers`` list
    return only the last tokens.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        hidden_size: int,
        preprocessing: Preprocessing,
        channels_last: bool = False,
        fixed_size: bool = True,
    ):
        super().__init__()
        self.model = use_fast_linear(model)  # timm's nn.Linear layers get splice's CPU inference kernel
        self.hidden_size = hidden_size
        self.preprocessing = preprocessing
        self.channels_last = channels_last  # 4-D features are (B, H, W, C) rather than (B, C, H, W)
        self.fixed_size = fixed_size  # False for convnets, which take any image size

    def _tokens(self, x: Tensor) -> Tensor:
        if x.ndim == 3:
            return x  # (B, N, D)
        assert x.ndim == 4, f"timm returned features of shape {tuple(x.shape)}"
        if not self.channels_last:
            x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        return x.flatten(1, 2)  # (B, H*W, C)

    def _check(self, pixel_values: Any) -> None:
        c = self.preprocessing.in_chans
        h, w = self.preprocessing.image_size
        want = f"(B, {c}, {h}, {w})" if self.fixed_size else f"(B, {c}, H, W)"
        if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4:
            given = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise InputError(
                f"pixel_values: given {given}; expected a 4-D tensor {want}\n"
                "    fix: batch single images with pixel_values.unsqueeze(0); pass channels first"
            )
        shape = tuple(pixel_values.shape)
        if not pixel_values.is_floating_point():
            raise InputError(
                f"pixel_values: given dtype {pixel_values.dtype}; expected a floating point tensor {want}\n"
                f"    fix: convert to float and normalise with mean {self.preprocessing.mean}, "
                f"std {self.preprocessing.std}"
            )
        if shape[1] != c:
            raise InputError(
                f"pixel_values: given shape {shape} ({shape[1]} channels); expected {want}\n"
                f"    fix: pass {c}-channel images channels first (B, C, H, W), or build the encoder with in_chans"
            )
        if self.fixed_size and shape[2:] != (h, w):
            raise InputError(
                f"pixel_values: given shape {shape} ({shape[2]}x{shape[3]} images); expected {want}\n"
                f"    fix: resize images to {h}x{w} (the encoder's preprocessing), or build it with img_size"
            )

    def _block_list(self) -> nn.Module | None:
        for name in ("blocks", "stages", "layers"):
            blocks = getattr(self.model, name, None)
            if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
                return blocks
        return None

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> EncoderOutput:
        self._check(pixel_values)
        blocks = self._block_list() if output_hidden_states else None
        if blocks is None:
            last = self._tokens(self.model.forward_features(pixel_values))  # (B, N, D)
            return EncoderOutput(last, (last,) if output_hidden_states else None)
        # Hooks read the blocks' outputs without copying timm's forward (which differs per family).
        seen: list[Tensor] = []
        handles = [blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))]
        handles += [b.register_forward_hook(lambda m, args, out: seen.append(out)) for b in blocks]
        try:
            last = self._tokens(self.model.forward_features(pixel_values))  # (B, N, D)
        finally:
            for h in handles:
                h.remove()
        return EncoderOutput(last, tuple(self._tokens(t) for t in seen))


def _sides(img_size: int | tuple[int, int]) -> tuple[int, int]:
    """``img_size`` as (H, W): one number is a square."""
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


def _preprocessing(model: nn.Module, img_size: int | tuple[int, int] | None, in_chans: int) -> Preprocessing:
    from timm.data import resolve_data_config

    data = resolve_data_config({}, model=model)
    # timm's data config describes the pretrained weights (224 px); the model we built may be another size.
    h, w = _sides(img_size) if img_size else tuple(data["input_size"][-2:])
    mean, std = tuple(data["mean"]), tuple(data["std"])
    if len(mean) != in_chans:  # e.g. a 1-channel model built from an RGB config: use the average
        mean = (sum(mean) / len(mean),) * in_chans
        std = (sum(std) / len(std),) * in_chans
    return Preprocessing(
        image_size=(int(h), int(w)),
        mean=mean,
        std=std,
        interpolation=str(data.get("interpolation", "bicubic")),
        crop_pct=float(data.get("crop_pct", 1.0)),
        in_chans=in_chans,
    )


# ----------------------------------------------------------------------------------------------------------------
# Configs


def _check_patch(img_size: int | tuple[int, int], patch_size: int) -> None:
    for side in sorted(set(_sides(img_size))):
        if side % patch_size:
            lo, hi = side // patch_size * patch_size, (side // patch_size + 1) * patch_size
            raise ValueError(
                f"img_size {side} is not divisible by patch_size {patch_size}; expected a multiple of "
                f"{patch_size}; fix: use img_size {lo or hi} or {hi}, or a patch_size that divides {side}"
            )


def _check_heads(width: int, heads: int, where: str = "") -> None:
    if width % heads:
        divisors = [d for d in range(1, min(width, 64) + 1) if width % d == 0]
        raise ValueError(
            f"num_heads {heads}{where} does not divide the width {width}; expected a divisor of {width} "
            f"(e.g. {', '.join(map(str, divisors[-4:]))}); fix: change num_heads or the width"
        )


def _checked_against(other: str, check: Callable[[Any, Any], None]) -> Callable[..., Any]:
    """A field validator: ``check(<the other field>, value)``, once ``other`` has itself validated."""

    def validate(cls, v: Any, info: ValidationInfo) -> Any:
        if other in info.data:
            check(info.data[other], v)
        return v

    return validate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Bounds of the vision configs (docs/limits.md has the table and why); widths, layers, heads and the build-memory
# limit are shared with the decoders (plugins/_shared.py).
MAX_IMAGE = 8192  # pixels a side; Donut reads 2560 x 1920
MAX_CHANNELS = 256  # input channels; hyperspectral imagery has about 200 bands
MAX_TOKENS = 16384  # patches of a global-attention encoder (ViT, DeiT, BEiT); ViT-H/14 at 518 px has 1369
MAX_PATCHES = 2**20  # patches of a windowed encoder (Swin) at its first stage; Donut's is 640 x 480
MAX_STAGES = 8  # Swin stages; released models have 4
# What building a buffer allocates, in copies of it: timm computes an integer index through int64 temporaries
# (4 more copies at the peak), a float mask through two masked_fill copies.
INDEX_COPIES = 5
MASK_COPIES = 3

ImageSize = bounded_int(1, MAX_IMAGE, "Donut reads 2560 x 1920 images")
Channels = bounded_int(1, MAX_CHANNELS, "hyperspectral imagery has about 200 bands")
MlpRatio = bounded_real(0, 64, "the MLP is int(width * mlp_ratio) wide; released models use 2.6 to 8", lo_open=True)
LayerScale = bounded_real(0, 10, "released models start layer scale at 1e-6 to 1")


class _Patches(_Strict):
    """The fields every patch-embedding family (ViT-like and Swin) starts with: the image, its patches, the width.

    ``max_tokens`` bounds the patch grid; ``check_size`` is each family's own bound on what building costs.
    """

    max_tokens: ClassVar[int] = MAX_TOKENS
    img_size: ImageSize = 224
    patch_size: ImageSize = 16
    in_chans: Channels = 3
    embed_dim: Width = 768

    _patch_fits = field_validator("patch_size")(_checked_against("img_size", _check_patch))

    @model_validator(mode="after")
    def _bounded(self) -> "_Patches":
        gh, gw = (side // self.patch_size for side in _sides(self.img_size))
        if gh * gw > self.max_tokens:
            raise ValueError(
                f"img_size {self.img_size} / patch_size {self.patch_size} is a {gh}x{gw} grid of "
                f"{gh * gw:,} patches; expected at most {self.max_tokens:,}; fix: a larger patch_size or a "
                f"smaller img_size (docs/limits.md)")
        weight = self.embed_dim * self.in_chans * self.patch_size**2
        if weight > MAX_WEIGHT:
            raise ValueError(
                f"the patch embedding (embed_dim x in_chans x patch_size^2) would hold {weight:,} weights; expected "
                f"at most {MAX_WEIGHT:,}; fix: a smaller patch_size, in_chans or embed_dim (docs/limits.md)")
        self.check_size()
        return self

    def check_size(self) -> None:
        """A family's own bounds (raises ``ValueError``): its MLP width, what building it allocates."""

    @staticmethod
    def _check_mlp(width: int, mlp_ratio: float, where: str = "") -> None:
        hidden = int(width * mlp_ratio)
        if not 1 <= hidden <= MAX_FFN:
            raise ValueError(
                f"the MLP would be int({width} x mlp_ratio {mlp_ratio:g}) = {hidden:,} wide{where}; expected 1 to "
                f"{MAX_FFN:,}; fix: choose mlp_ratio between {1 / width:.3g} and {MAX_FFN / width:g}")


class _PatchTransformer(_Patches):
    """The fields every ViT-like family shares; defaults are ViT-B/16 at 224 px."""

    depth: Layers = 12
    num_heads: Heads = 12
    mlp_ratio: MlpRatio = 4.0
    layer_norm_eps: Eps = 1e-6  # timm's; transformers' ViT and BEiT use 1e-12 (read from config.json)

    _heads_fit = field_validator("num_heads")(_checked_against("embed_dim", _check_heads))

    def check_size(self) -> None:
        self._check_mlp(self.embed_dim, self.mlp_ratio)


class ViTConfig(_PatchTransformer):
    """A plain ViT (timm ``vit_base_patch16_224``); ``img_size`` is one side (a square) or ``[H, W]``."""

    img_size: ImageSize | tuple[ImageSize, ImageSize] = 224
    qkv_bias: bool = True
    pos_embed_init: Literal["learned", "sincos"] = Field(
        "learned", description="learned: timm's random init; sincos: fixed 2-D sin-cos values (MAE), prefix tokens 0"
    )
    pos_embed_trainable: bool = Field(True, description="false: the position embedding is not trained")

    @field_validator("pos_embed_init")
    @classmethod
    def _sincos_width(cls, v: str, info: ValidationInfo) -> str:
        width = info.data.get("embed_dim")
        if v == "sincos" and width is not None and width % 4:
            raise ValueError(
                f"pos_embed_init 'sincos' needs embed_dim divisible by 4 (a sin and a cos per axis); given "
                f"embed_dim {width}; fix: use embed_dim {width // 4 * 4 or 4} or {width // 4 * 4 + 4}, or 'learned'"
            )
        return v


class DeiTConfig(ViTConfig):
    """DeiT without distillation token: a ViT trained differently (timm ``deit_base_patch16_224``)."""


class DeiTDistilledConfig(ViTConfig):
    """DeiT with class and distillation tokens (timm ``deit_base_distilled_patch16_224``)."""


class BEiTConfig(_PatchTransformer):
    """BEiT (timm ``beit_base_patch16_224``); q and v always have biases, k never."""

    init_values: LayerScale | None = 0.1  # layer scale; 0 or None: none
    use_abs_pos_emb: bool = False
    use_rel_pos_bias: bool = True  # one table per block
    use_shared_rel_pos_bias: bool = False  # one table for all blocks
    use_mean_pooling: bool = True  # True: no final norm on the tokens (it sits after pooling, as fc_norm)

    def check_size(self) -> None:
        super().check_size()
        # each relative position table comes with an int64 index over every pair of (patches + 1) tokens
        tokens = (self.img_size // self.patch_size) ** 2 + 1
        tables = self.depth * self.use_rel_pos_bias + self.use_shared_rel_pos_bias
        check_build_memory(
            tables * 8 * INDEX_COPIES * tokens**2, f"relative position indexes: {tables} of {tokens:,}^2 entries",
            "img_size / patch_size, depth and use_rel_pos_bias",
            "a larger patch_size or smaller img_size (the index grows with the 4th power of img_size / patch_size), "
            "fewer layers, or use_shared_rel_pos_bias: true with use_rel_pos_bias: false (one table for all blocks)")


class SwinStages(_Strict):
    """The stage fields of Swin-like encoders (``swin``, ``donut_swin``); each declares its image fields first."""

    depths: tuple[Layers, ...] = Field(default=(2, 2, 18, 2), min_length=1, max_length=MAX_STAGES)
    num_heads: tuple[Heads, ...] = Field(default=(4, 8, 16, 32), min_length=1, max_length=MAX_STAGES)
    window_size: ImageSize = 7
    mlp_ratio: MlpRatio = 4.0
    qkv_bias: bool = True
    layer_norm_eps: Eps = 1e-5


class SwinConfig(SwinStages, _Patches):  # _Patches' fields first: the stage validators read img_size and patch_size
    """Swin Transformer (timm ``swin_base_patch4_window7_224`` by default)."""

    max_tokens: ClassVar[int] = MAX_PATCHES  # windowed attention: the patch grid may be large
    patch_size: ImageSize = 4
    embed_dim: Width = 128

    @field_validator("depths")
    @classmethod
    def _stages_fit(cls, v: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        if "img_size" in info.data and "patch_size" in info.data:
            grid, halvings = info.data["img_size"] // info.data["patch_size"], 2 ** (len(v) - 1)
            if grid % halvings:
                raise ValueError(
                    f"{len(v)} stages halve the {grid}x{grid} patch grid {len(v) - 1} times, which needs a "
                    f"grid divisible by {halvings}; given img_size {info.data['img_size']}, patch_size "
                    f"{info.data['patch_size']}; fix: use img_size a multiple of "
                    f"{halvings * info.data['patch_size']}, or fewer stages"
                )
        return v

    @field_validator("num_heads")
    @classmethod
    def _heads_fit(cls, v: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        depths = info.data.get("depths")
        if depths is not None and len(v) != len(depths):
            raise ValueError(
                f"num_heads has {len(v)} entries but depths has {len(depths)}; expected one head count per "
                f"stage; fix: give num_heads {len(depths)} values"
            )
        if "embed_dim" in info.data:
            for i, heads in enumerate(v):
                _check_heads(info.data["embed_dim"] * 2**i, heads, where=f" (stage {i})")
        return v

    @field_validator("window_size")
    @classmethod
    def _window_fits(cls, v: int, info: ValidationInfo) -> int:
        if not {"img_size", "patch_size", "depths"} <= info.data.keys():
            return v
        grid = info.data["img_size"] // info.data["patch_size"]
        for i in range(len(info.data["depths"])):
            res = grid // 2**i
            # A stage no larger than the window uses one window of its own size (timm and transformers agree).
            if res > v and res % v:
                raise ValueError(
                    f"stage {i} is {res}x{res} tokens, not a multiple of window_size {v}; expected each "
                    f"stage resolution ({[grid // 2**j for j in range(len(info.data['depths']))]}) to be a "
                    f"multiple of the window or no larger than it; fix: change window_size or img_size"
                )
        return v

    def check_size(self) -> None:
        check_swin_stages(self.embed_dim, self.depths, self.mlp_ratio)
        check_build_memory(
            self._buffer_bytes(), "relative position indexes and shifted-window attention masks",
            "img_size / patch_size, window_size and depths",
            "a smaller img_size or larger patch_size (the masks grow with the patch grid times window_size^2), "
            "a smaller window_size, or fewer blocks in the first stages")

    def _buffer_bytes(self) -> int:
        """Each block has an int64 relative position index over its window's token pairs; each shifted block (every
        second one, in a stage larger than the window) a float32 attention mask over every window's pairs."""
        grid, total = self.img_size // self.patch_size, 0
        for i, depth in enumerate(self.depths):
            res = grid // 2**i
            window = min(res, self.window_size)  # a stage no larger than the window is one window
            total += depth * 8 * INDEX_COPIES * window**4
            if res > self.window_size:
                total += depth // 2 * 4 * MASK_COPIES * res**2 * window**2
        return total


def check_swin_stages(embed_dim: int, depths: tuple[int, ...], mlp_ratio: float) -> None:
    """What Swin-like stages (``swin``, ``donut_swin``) may cost (raises ``ValueError``): the blocks validate builds,
    the last stage's width (it doubles per stage), the first and last stages' MLP widths."""
    stages, blocks = len(depths), sum(depths)
    if blocks > MAX_LAYERS:
        raise ValueError(
            f"depths {list(depths)} add up to {blocks} blocks; expected at most {MAX_LAYERS} (validate "
            f"builds every block); fix: fewer blocks per stage (docs/limits.md)")
    last = embed_dim * 2 ** (stages - 1)
    if last > MAX_WIDTH:
        raise ValueError(
            f"the last of {stages} stages would be embed_dim x 2^{stages - 1} = {last:,} wide; expected at most "
            f"{MAX_WIDTH:,}; fix: a smaller embed_dim or fewer stages (docs/limits.md)")
    _Patches._check_mlp(embed_dim, mlp_ratio, " in the first stage")
    _Patches._check_mlp(last, mlp_ratio, " in the last stage")


class TimmConfig(_Strict):
    """Any timm architecture whose ``forward_features`` gives tokens or a feature map.

    Its numbers are bounded here, key by key (``TIMM_KWARGS``); what they build depends on the architecture, so the
    builder first builds it on the meta device and checks its buffers and largest weight (``_check_probe``).
    """

    model: str = Field(min_length=1, max_length=200)
    kwargs: dict[str, Any] = Field(default_factory=dict, max_length=64)  # passed to timm.create_model
    img_size: ImageSize | None = None  # None: the architecture's default; convnets take any size

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        timm = _timm()
        if not timm.is_model(v):
            close = difflib.get_close_matches(v, timm.list_models(), n=3, cutoff=0.6)
            raise ValueError(
                f"timm has no architecture {short(v)}; expected a name from timm.list_models()"
                + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
                + "; fix: check the spelling, or upgrade timm"
            )
        return v

    @field_validator("kwargs")
    @classmethod
    def _allowed(cls, v: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted({"pretrained", "num_classes", "img_size"} & v.keys())
        if reserved:
            raise ValueError(
                f"kwargs sets {reserved}, which splice controls; expected other timm arguments; fix: remove "
                "them (img_size has its own field; weights come from the spec's `pretrained`)"
            )
        for key, value in v.items():
            if key not in TIMM_KWARGS:
                close = difflib.get_close_matches(str(key), sorted(TIMM_KWARGS), n=1, cutoff=0.6)
                raise ValueError(
                    f"kwargs.{short(key, 60)} is not an architecture option splice passes to timm (files, pretrained "
                    "overlays, feature extraction and layer factories are never taken from a spec); expected one "
                    f"of {', '.join(sorted(TIMM_KWARGS))}; fix: "
                    + (f"did you mean {close[0]!r}?" if close else "remove it"))
            expected = _kwarg_expected(key, value)
            if expected:
                raise ValueError(f"kwargs.{key} is {short(value, 60)}; expected {expected}; fix: give `{key}` such a "
                                 "value (docs/limits.md)")
        return v


# What a spec may pass to timm.create_model: architecture options with plain values, each key's numbers within a
# bound (lo, hi, integers only), its flag a boolean, or its word one of a few. Nothing names a file, a pretrained
# config or a class to build.
_FLAG = "a boolean"
_LAYER_KEYS = ("depth", "depths", "layers")
TIMM_KWARGS: dict[str, tuple[float, float, bool] | frozenset[str] | str] = {
    **dict.fromkeys(_LAYER_KEYS, (0, MAX_LAYERS, True)),
    **dict.fromkeys(("embed_dim", "embed_dims", "dims", "widths", "num_features", "head_hidden_size", "stem_width",
                     "stem_chs", "channels"), (1, MAX_WIDTH, True)),
    "num_heads": (1, MAX_HEADS, True),
    "in_chans": (1, MAX_CHANNELS, True),
    **dict.fromkeys(("patch_size", "window_size", "kernel_sizes", "output_stride"), (1, MAX_IMAGE, True)),
    "reg_tokens": (0, 1024, True),
    **dict.fromkeys(("mlp_ratio", "mlp_ratios", "width_multiplier"), (0.01, 64, False)),
    **dict.fromkeys(("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
                     "patch_drop_rate"), (0, 1, False)),
    **dict.fromkeys(("init_values", "layer_scale_init_value", "ls_init_value"), (0, 10, False)),
    **dict.fromkeys(("qkv_bias", "qk_norm", "class_token", "no_embed_class", "pre_norm", "final_norm", "fc_norm",
                     "dynamic_img_size", "dynamic_img_pad", "use_abs_pos_emb", "use_rel_pos_bias",
                     "use_shared_rel_pos_bias", "conv_mlp", "use_grn", "conv_bias", "use_pos_emb",
                     "strict_img_size"), _FLAG),
    "global_pool": frozenset({"", "avg", "max", "avgmax", "catavgmax", "token", "map"}),
    "pos_embed": frozenset({"learn", "none", ""}),
}


def _kwarg_expected(key: str, value: Any) -> str | None:
    """What ``kwargs.<key>`` takes, when ``value`` is not that; None when it is."""
    rule = TIMM_KWARGS[key]
    if isinstance(rule, frozenset):
        return None if isinstance(value, str) and value in rule else f"one of {sorted(rule)}"
    if rule == _FLAG:
        return None if isinstance(value, bool) else "true or false"
    lo, hi, integers = rule
    numbers = _numbers(value)
    fits = numbers is not None and all(
        (isinstance(x, int) or not integers) and math.isfinite(x) and lo <= x <= hi for x in numbers)
    if not fits:
        return f"{'an integer' if integers else 'a number'} in [{lo:g}, {hi:g}], or a list of at most 64 of them"
    if key in _LAYER_KEYS and sum(numbers) > MAX_LAYERS:
        return f"layer counts adding up to at most {MAX_LAYERS} (validate builds every layer)"
    return None


def _numbers(value: Any, depth: int = 0) -> list[int | float] | None:
    """The numbers of a number, or of a list of them (nested at most twice, 64 long); None for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, (list, tuple)) or len(value) > 64 or depth >= 2:
        return None
    out: list[int | float] = []
    for item in value:
        numbers = _numbers(item, depth + 1)
        if numbers is None:
            return None
        out += numbers
    return out


# ----------------------------------------------------------------------------------------------------------------
# Builders


def _norm(eps: float) -> Callable[..., nn.Module]:
    return functools.partial(nn.LayerNorm, eps=eps)


def _patch_kwargs(cfg: _PatchTransformer | SwinConfig) -> dict[str, Any]:
    """timm's arguments for the fields ViT-like families and Swin share."""
    return dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        norm_layer=_norm(cfg.layer_norm_eps),
    )


def _vit_kwargs(cfg: _PatchTransformer) -> dict[str, Any]:
    return dict(_patch_kwargs(cfg), depth=cfg.depth)


def _wrap(model: nn.Module, cfg: Any, hidden_size: int, **kw: Any) -> TimmEncoder:
    pre = _preprocessing(model, cfg.img_size, cfg.in_chans)
    return TimmEncoder(model, hidden_size=hidden_size, preprocessing=pre, **kw)


def _timm():
    """timm, imported when a model is built or a timm name checked: `splice list` and `--help` do not pay for it."""
    import timm

    return timm


def _create(arch: str, **kwargs: Any) -> nn.Module:
    return _timm().create_model(arch, pretrained=False, num_classes=0, **kwargs)


def _position_embedding(model: nn.Module, cfg: ViTConfig) -> nn.Module:
    """``pos_embed_init`` / ``pos_embed_trainable``: a small ViT learns spatial relations far faster from fixed
    2-D sin-cos positions than from timm's random ones (docs/training.md)."""
    pos = model.pos_embed  # (1, prefix + H*W, D)
    if cfg.pos_embed_init == "sincos" and pos.device.type != "meta":
        from timm.layers import build_sincos2d_pos_embed

        grid = list(model.patch_embed.grid_size)
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        with torch.no_grad():
            pos.zero_()  # the class (and distillation) token positions stay 0
            pos[0, prefix:] = build_sincos2d_pos_embed(grid, dim=pos.shape[-1])  # (H*W, D)
    pos.requires_grad_(cfg.pos_embed_trainable)
    return model


def build_vit(cfg: ViTConfig) -> TimmEncoder:
    model = _create("vit_base_patch16_224", qkv_bias=cfg.qkv_bias, **_vit_kwargs(cfg))
    return _wrap(_position_embedding(model, cfg), cfg, cfg.embed_dim)


def build_deit(cfg: DeiTConfig) -> TimmEncoder:
    model = _create("deit_base_patch16_224", qkv_bias=cfg.qkv_bias, **_vit_kwargs(cfg))
    return _wrap(_position_embedding(model, cfg), cfg, cfg.embed_dim)


def build_deit_distilled(cfg: DeiTDistilledConfig) -> TimmEncoder:
    model = _create("deit_base_distilled_patch16_224", qkv_bias=cfg.qkv_bias, **_vit_kwargs(cfg))
    return _wrap(_position_embedding(model, cfg), cfg, cfg.embed_dim)


def build_beit(cfg: BEiTConfig) -> TimmEncoder:
    model = _create(
        "beit_base_patch16_224",
        init_values=cfg.init_values or 0.0,  # not None: create_model drops None kwargs (the base arch has 0.1)
        use_abs_pos_emb=cfg.use_abs_pos_emb,
        use_rel_pos_bias=cfg.use_rel_pos_bias,
        use_shared_rel_pos_bias=cfg.use_shared_rel_pos_bias,
        # 'avg' moves the final norm after pooling (fc_norm), so forward_features returns un-normed tokens,
        # which is what transformers' BeitModel.last_hidden_state is with use_mean_pooling.
        global_pool="avg" if cfg.use_mean_pooling else "token",
        **_vit_kwargs(cfg),
    )
    return _wrap(model, cfg, cfg.embed_dim)


def build_swin(cfg: SwinConfig) -> TimmEncoder:
    model = _create(
        "swin_base_patch4_window7_224",
        depths=cfg.depths,
        window_size=cfg.window_size,
        qkv_bias=cfg.qkv_bias,
        **_patch_kwargs(cfg),
    )
    return _wrap(model, cfg, cfg.embed_dim * 2 ** (len(cfg.depths) - 1), channels_last=True)


def _create_timm(cfg: TimmConfig, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` for the generic component; ``img_size`` only where the architecture takes it."""
    try:
        if cfg.img_size is not None:
            try:
                return _create(cfg.model, img_size=cfg.img_size, **kwargs)
            except TypeError as e:
                if "img_size" not in str(e):
                    raise
        return _create(cfg.model, **kwargs)  # a convnet: it takes any image size
    except Exception as e:  # noqa: BLE001 - timm checks its arguments with asserts, TypeErrors, ZeroDivision...
        raise ConfigError(
            [Problem("encoder.config.kwargs" if kwargs else "encoder.config.img_size",
                     f"timm.create_model({cfg.model!r}) rejected them: {type(e).__name__}: {clip(str(e))}",
                     given=kwargs or cfg.img_size, expected=f"arguments that timm's {cfg.model} accepts",
                     fix=f"check the signature of the {cfg.model} model class in timm")]
        ) from e


def _check_probe(cfg: TimmConfig, kwargs: dict[str, Any]) -> None:
    """Build the architecture on the meta device (nothing is allocated) and refuse it when building it for real
    would allocate more than ``BUILD_MEMORY_LIMIT`` for its buffers, or hold a weight over ``MAX_WEIGHT``."""
    with torch.device("meta"):
        probe = _create_timm(cfg, kwargs)
    estimate = sum(b.numel() * b.element_size() * (MASK_COPIES if b.is_floating_point() else INDEX_COPIES)
                   for b in probe.buffers())
    largest = max((p.numel() for p in probe.parameters()), default=0)
    path = "encoder.config." + ("img_size" if cfg.img_size is not None and not kwargs else "kwargs")
    try:
        check_build_memory(estimate, f"the buffers of timm's {cfg.model}", "img_size and kwargs",
                           "a smaller img_size or window, fewer layers, or another architecture")
        if largest > MAX_WEIGHT:
            raise ValueError(f"timm's {cfg.model} would hold a weight of {largest:,} elements; expected at most "
                             f"{MAX_WEIGHT:,}; fix: smaller widths, kernels or patches in kwargs (docs/limits.md)")
    except ValueError as e:
        raise ConfigError([Problem(path, str(e), given=kwargs or cfg.img_size)]) from None


def build_timm(cfg: TimmConfig) -> TimmEncoder:
    kwargs = dict(cfg.kwargs)
    if cfg.img_size is not None or kwargs:  # an architecture's own defaults are sizes timm released
        _check_probe(cfg, kwargs)
    model = _create_timm(cfg, kwargs)
    patch_embed = getattr(model, "patch_embed", None)
    # Transformers fix their positions at construction; convnets (no patch_embed) accept any size.
    fixed = patch_embed is not None and getattr(patch_embed, "strict_img_size", True)
    img = cfg.img_size or (model.patch_embed.img_size[0] if patch_embed is not None else None)
    pre = _preprocessing(model, img, int(kwargs.get("in_chans", 3)))
    # Swin-like models say NHWC through `output_fmt`; convnets have no such attribute and are NCHW.
    channels_last = str(getattr(model, "output_fmt", "NCHW")) == "NHWC"
    return TimmEncoder(model, hidden_size=int(model.num_features), preprocessing=pre, channels_last=channels_last,
                       fixed_size=bool(fixed))


# ----------------------------------------------------------------------------------------------------------------
# transformers interop: configs


_HF_VIT = dict(image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12,
               num_attention_heads=12, intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12,
               qkv_bias=True)
_HF_BEIT = dict(_HF_VIT, use_absolute_position_embeddings=False, use_relative_position_bias=False,
                use_shared_relative_position_bias=False, layer_scale_init_value=0.1, use_mean_pooling=True)
_HF_SWIN = dict(image_size=224, patch_size=4, num_channels=3, embed_dim=96, depths=[2, 2, 6, 2],
                num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0, qkv_bias=True, hidden_act="gelu",
                use_absolute_embeddings=False, layer_norm_eps=1e-5)


def _reject(field: str, value: Any, supported: str) -> ConfigError:
    return ConfigError([Problem(field, "transformers setting that timm cannot express", given=value,
                                expected=supported, fix="use a checkpoint with the supported setting")])


def _square(c: dict, field: str) -> int:
    v = c[field]
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise _reject(field, v, "a square size (one int, or equal height and width)")
        v = v[0]
    return int(v)


def _size(c: dict, field: str) -> int | tuple[int, int]:
    """A ViT's ``image_size``: one int for a square, else (H, W)."""
    v = c[field]
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise _reject(field, v, "one int, or [height, width]")
        return int(v[0]) if v[0] == v[1] else (int(v[0]), int(v[1]))
    return int(v)


def _gelu(c: dict) -> None:
    if c["hidden_act"] not in ("gelu", "gelu_python"):
        raise _reject("hidden_act", c["hidden_act"], "'gelu' (exact GELU, timm's default)")


def _vit_config_from_hf(hf: dict, rectangular: bool = True) -> dict:
    c = {**_HF_VIT, **hf}
    _gelu(c)
    width, inner = int(c["hidden_size"]), int(c["intermediate_size"])
    ratio = inner / width
    if int(width * ratio) != inner:  # timm sizes the MLP as int(width * mlp_ratio)
        raise _reject("intermediate_size", inner, f"a size timm can express as int({width} * mlp_ratio)")
    return dict(img_size=_size(c, "image_size") if rectangular else _square(c, "image_size"),
                patch_size=_square(c, "patch_size"),
                in_chans=int(c["num_channels"]), embed_dim=width, depth=int(c["num_hidden_layers"]),
                num_heads=int(c["num_attention_heads"]), mlp_ratio=ratio, qkv_bias=bool(c["qkv_bias"]),
                layer_norm_eps=float(c["layer_norm_eps"]))


def _beit_config_from_hf(hf: dict) -> dict:
    c = {**_HF_BEIT, **hf}
    out = _vit_config_from_hf(c, rectangular=False)  # timm's BEiT takes a square
    del out["qkv_bias"]  # BEiT has q and v biases whatever qkv_bias says
    layer_scale = c["layer_scale_init_value"]
    return dict(out, init_values=float(layer_scale) if layer_scale and layer_scale > 0 else None,
                use_abs_pos_emb=bool(c["use_absolute_position_embeddings"]),
                use_rel_pos_bias=bool(c["use_relative_position_bias"]),
                use_shared_rel_pos_bias=bool(c["use_shared_relative_position_bias"]),
                use_mean_pooling=bool(c["use_mean_pooling"]))


def _swin_config_from_hf(hf: dict) -> dict:
    c = {**_HF_SWIN, **hf}
    _gelu(c)
    if c["use_absolute_embeddings"]:
        raise _reject("use_absolute_embeddings", True, "false (timm's Swin has no absolute position embedding)")
    # transformers' Swin uses LayerNorm's default eps (1e-5) for the patch-embedding and patch-merging norms
    # whatever layer_norm_eps says; every released checkpoint uses 1e-5, where the two agree exactly.
    return dict(img_size=_square(c, "image_size"), patch_size=_square(c, "patch_size"),
                in_chans=int(c["num_channels"]), embed_dim=int(c["embed_dim"]), depths=tuple(c["depths"]),
                num_heads=tuple(c["num_heads"]), window_size=_square(c, "window_size"),
                mlp_ratio=float(c["mlp_ratio"]), qkv_bias=bool(c["qkv_bias"]),
                layer_norm_eps=float(c["layer_norm_eps"]))


def _vit_config_to_hf(v: dict, model_type: str = "vit") -> dict:
    size = v["img_size"]
    return dict(model_type=model_type, image_size=list(size) if isinstance(size, (list, tuple)) else size,
                patch_size=v["patch_size"], num_channels=v["in_chans"],
                hidden_size=v["embed_dim"], num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"],
                intermediate_size=int(v["embed_dim"] * v["mlp_ratio"]), hidden_act="gelu",
                layer_norm_eps=v["layer_norm_eps"], qkv_bias=v.get("qkv_bias", True))


def _beit_config_to_hf(v: dict) -> dict:
    return dict(_vit_config_to_hf(v, "beit"), layer_scale_init_value=v["init_values"] or 0.0,
                use_absolute_position_embeddings=v["use_abs_pos_emb"], use_relative_position_bias=v["use_rel_pos_bias"],
                use_shared_relative_position_bias=v["use_shared_rel_pos_bias"], use_mean_pooling=v["use_mean_pooling"])


def _swin_config_to_hf(v: dict) -> dict:
    return dict(model_type="swin", image_size=v["img_size"], patch_size=v["patch_size"], num_channels=v["in_chans"],
                embed_dim=v["embed_dim"], depths=list(v["depths"]), num_heads=list(v["num_heads"]),
                window_size=v["window_size"], mlp_ratio=v["mlp_ratio"], qkv_bias=v["qkv_bias"],
                layer_norm_eps=v["layer_norm_eps"], hidden_act="gelu", use_absolute_embeddings=False)


# ----------------------------------------------------------------------------------------------------------------
# transformers interop: state dicts
#
# Each family lists, for the given config, a table (``splice.core.keymap``) of (transformers name, timm name) rows
# copied as they are, and rows that fuse transformers' separate query/key/value into timm's ``qkv``. Reading and
# writing use the same table both ways. Shapes are left to the loader, which compares every tensor with the module.

# transformers-5 in-memory names (and save_original_format=False files) -> the on-disk names; first match wins.
_V5_TO_DISK = [
    *((rf"^layers\.(\d+)\.attention\.{v5}\.", rf"encoder.layer.\1.attention.{disk}.") for v5, disk in (
        ("q_proj", "attention.query"), ("k_proj", "attention.key"), ("v_proj", "attention.value"),
        ("o_proj", "output.dense"))),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.relative_position_bias\.", r"encoder.layer.\1.attention.attention.relative_position_bias."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),  # layernorm_before/after, lambda_1/2
    (r"^shared_position_bias\.", "encoder.relative_position_bias."),
    *((rf"^(encoder\.layers\.\d+\.blocks\.\d+\.attention)\.{v5}\.", rf"\1.{disk}.") for v5, disk in (
        ("q_proj", "self.query"), ("k_proj", "self.key"), ("v_proj", "self.value"), ("o_proj", "output.dense"),
        ("relative_position_bias", "self"))),
    (r"^(encoder\.layers\.\d+\.blocks\.\d+)\.mlp\.fc1\.", r"\1.intermediate.dense."),
    (r"^(encoder\.layers\.\d+\.blocks\.\d+)\.mlp\.fc2\.", r"\1.output.dense."),
]
_TASK_PREFIX = re.compile(r"^(vit|deit|beit|swin)\.")  # from *ForImageClassification checkpoints


def _disk_name(key: str) -> str:
    key = _TASK_PREFIX.sub("", key)
    for pattern, repl in _V5_TO_DISK:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _wb(hf: str, ours: str, bias: bool = True) -> list[Row]:
    return [Row(f"{hf}.weight", f"{ours}.weight")] + ([Row(f"{hf}.bias", f"{ours}.bias")] if bias else [])


def _qkv(hf: str, ours: str, kind: str) -> Row:
    """transformers' separate ``{hf}.query/key/value.{kind}`` fused into timm's ``{ours}.qkv.{kind}`` (3 * D first)."""
    return Row(tuple(f"{hf}.{n}.{kind}" for n in ("query", "key", "value")), f"{ours}.qkv.{kind}", op="fuse")


def _vit_table(c: dict, family: str) -> list[Row]:
    rows = [Row("embeddings.cls_token", "cls_token")]
    rows += _wb("embeddings.patch_embeddings.projection", "patch_embed.proj")
    if family == "deit_distilled":
        rows.append(Row("embeddings.distillation_token", "dist_token"))
    if family != "beit" or c["use_absolute_position_embeddings"]:
        rows.append(Row("embeddings.position_embeddings", "pos_embed"))
    if family == "beit" and c["use_shared_relative_position_bias"]:
        rows.append(Row("encoder.relative_position_bias.relative_position_bias_table",
                         "rel_pos_bias.relative_position_bias_table"))
    for i in range(int(c["num_hidden_layers"])):
        hf, ours = f"encoder.layer.{i}", f"blocks.{i}"
        att = f"{hf}.attention.attention"
        rows += _wb(f"{hf}.layernorm_before", f"{ours}.norm1") + _wb(f"{hf}.layernorm_after", f"{ours}.norm2")
        rows += _wb(f"{hf}.attention.output.dense", f"{ours}.attn.proj")
        rows += _wb(f"{hf}.intermediate.dense", f"{ours}.mlp.fc1") + _wb(f"{hf}.output.dense", f"{ours}.mlp.fc2")
        rows.append(_qkv(att, f"{ours}.attn", "weight"))
        if family != "beit":
            if c["qkv_bias"]:
                rows.append(_qkv(att, f"{ours}.attn", "bias"))
            continue
        # BEiT: no key bias (timm keeps a zero k_bias buffer), optional layer scale and per-block bias table.
        rows += [Row(f"{att}.query.bias", f"{ours}.attn.q_bias"), Row(f"{att}.value.bias", f"{ours}.attn.v_bias")]
        if c["layer_scale_init_value"] and c["layer_scale_init_value"] > 0:
            rows += [Row(f"{hf}.lambda_1", f"{ours}.gamma_1"), Row(f"{hf}.lambda_2", f"{ours}.gamma_2")]
        if c["use_relative_position_bias"]:
            rows.append(Row(f"{att}.relative_position_bias.relative_position_bias_table",
                             f"{ours}.attn.relative_position_bias_table"))
    if family == "beit" and c["use_mean_pooling"]:
        rows += _wb("pooler.layernorm", "fc_norm")
    else:
        rows += _wb("layernorm", "norm")
    return rows


def swin_table(c: dict) -> list[Row]:
    """transformers' Swin names -> timm's (``donut_swin`` reads its own layout through it too)."""
    rows = _wb("embeddings.patch_embeddings.projection", "patch_embed.proj")
    rows += _wb("embeddings.norm", "patch_embed.norm")
    stages = len(c["depths"])
    for s, depth in enumerate(c["depths"]):
        for b in range(depth):
            hf, ours = f"encoder.layers.{s}.blocks.{b}", f"layers.{s}.blocks.{b}"
            rows += _wb(f"{hf}.layernorm_before", f"{ours}.norm1") + _wb(f"{hf}.layernorm_after", f"{ours}.norm2")
            rows.append(Row(f"{hf}.attention.self.relative_position_bias_table",
                             f"{ours}.attn.relative_position_bias_table"))
            rows += _wb(f"{hf}.attention.output.dense", f"{ours}.attn.proj")
            rows += _wb(f"{hf}.intermediate.dense", f"{ours}.mlp.fc1") + _wb(f"{hf}.output.dense", f"{ours}.mlp.fc2")
            rows += [_qkv(f"{hf}.attention.self", f"{ours}.attn", kind)
                      for kind in (("weight", "bias") if c["qkv_bias"] else ("weight",))]
        if s < stages - 1:
            # transformers merges patches at the END of stage s; timm at the START of stage s + 1.
            rows += _wb(f"encoder.layers.{s}.downsample.reduction", f"layers.{s + 1}.downsample.reduction", bias=False)
            rows += _wb(f"encoder.layers.{s}.downsample.norm", f"layers.{s + 1}.downsample.norm")
    rows += _wb("layernorm", "norm")
    return rows


_TIMM_ONLY = "export an encoder whose config transformers can express, or export to timm format instead"


def _hf(model_types: tuple[str, ...], family: str) -> HFInterop:
    def table(hf: dict) -> list[Row]:
        if family == "swin":
            rows = swin_table({**_HF_SWIN, **hf})
        else:
            rows = _vit_table({**(_HF_BEIT if family == "beit" else _HF_VIT), **hf}, family)
        return [row.prefixed(ours="model.") for row in rows]  # TimmEncoder keeps the timm model as .model

    config_from_hf = {"swin": _swin_config_from_hf, "beit": _beit_config_from_hf}.get(family, _vit_config_from_hf)
    config_to_hf = {"swin": _swin_config_to_hf, "beit": _beit_config_to_hf,
                    "deit_distilled": lambda v: _vit_config_to_hf(v, "deit")}.get(family, _vit_config_to_hf)
    return HFInterop(
        config_to_hf=config_to_hf,
        model_types=model_types,
        config_from_hf=config_from_hf,
        state_dict_from_hf=lambda sd, hf: from_hf(sd, table(hf), _disk_name, family),
        state_dict_to_hf=lambda sd, hf: to_hf(sd, table(hf), layout=family, fix=_TIMM_ONLY),
        # the base model's pooler has no place in an encoder; transformers 4.x files carry derived buffers
        # (position ids, Swin's relative_position_index) that timm computes itself
        ignorable=(r"pooler\..+", r"(?:.*\.)?position_ids", r"(?:.*\.)?relative_position_index"),
    )


# ----------------------------------------------------------------------------------------------------------------
# Registration

_TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


@hookimpl
def register_encoders(register):
    register("vit", build_vit, ViTConfig, aliases=("vision_transformer",), tiny=dict(_TINY_VIT),
             hf=_hf(("vit",), "vit"), description="Vision Transformer (timm); reads transformers ViT checkpoints")
    register("deit", build_deit, DeiTConfig, tiny=dict(_TINY_VIT), hf=_hf((), "deit"),
             description="DeiT without distillation token (timm); hub DeiT checkpoints of this kind are model_type vit")
    register("deit_distilled", build_deit_distilled, DeiTDistilledConfig, aliases=("deit-distilled",),
             tiny=dict(_TINY_VIT), hf=_hf(("deit",), "deit_distilled"),
             description="DeiT with class and distillation tokens (timm); reads transformers DeiT checkpoints")
    register("beit", build_beit, BEiTConfig, tiny=dict(_TINY_VIT), hf=_hf(("beit",), "beit"),
             description="BEiT with relative position bias and layer scale (timm); reads transformers BEiT")
    register("swin", build_swin, SwinConfig, aliases=("swin_transformer",),
             tiny=dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4),
             hf=_hf(("swin",), "swin"),
             description="Swin Transformer (timm), last stage as tokens; reads transformers Swin checkpoints")
    register("timm", build_timm, TimmConfig,
             tiny=dict(model="convnext_atto", kwargs={"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}, img_size=32),
             description="any timm architecture by name; feature maps are flattened to tokens")

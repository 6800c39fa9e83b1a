"""ViT, DeiT, BEiT, Swin, and any other timm model, as splice vision encoders.

Every family builds a timm model with ``pretrained=False, num_classes=0`` and wraps it in ``TimmEncoder``, which
turns ``forward_features`` into tokens ``(B, N, D)``. Each family also knows how to read (and write) the
checkpoints transformers saves, so ``google/vit-*``, ``facebook/deit-*``, ``microsoft/beit-*`` and
``microsoft/swin-*`` encoders load into the same modules.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Any, Callable, Literal

import timm
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
)
from timm.data import resolve_data_config
from torch import Tensor, nn

from splice import HFInterop, hookimpl
from splice.core.errors import CheckpointError, ConfigError, InputError, Problem
from splice.core.interfaces import EncoderOutput, Preprocessing
from splice.core.kernels import use_fast_linear

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


def _preprocessing(model: nn.Module, img_size: int | None, in_chans: int) -> Preprocessing:
    data = resolve_data_config({}, model=model)
    # timm's data config describes the pretrained weights (224 px); the model we built may be another size.
    h, w = (img_size, img_size) if img_size else tuple(data["input_size"][-2:])
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


def _check_patch(img_size: int, patch_size: int) -> None:
    if img_size % patch_size:
        lo, hi = img_size // patch_size * patch_size, (img_size // patch_size + 1) * patch_size
        raise ValueError(
            f"img_size {img_size} is not divisible by patch_size {patch_size}; expected a multiple of "
            f"{patch_size}; fix: use img_size {lo or hi} or {hi}, or a patch_size that divides {img_size}"
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


class _Patches(_Strict):
    """The fields every patch-embedding family (ViT-like and Swin) starts with: the image, its patches, the width."""

    img_size: PositiveInt = 224
    patch_size: PositiveInt = 16
    in_chans: PositiveInt = 3
    embed_dim: PositiveInt = 768

    _patch_fits = field_validator("patch_size")(_checked_against("img_size", _check_patch))


class _PatchTransformer(_Patches):
    """The fields every ViT-like family shares; defaults are ViT-B/16 at 224 px."""

    depth: PositiveInt = 12
    num_heads: PositiveInt = 12
    mlp_ratio: PositiveFloat = 4.0
    layer_norm_eps: PositiveFloat = 1e-6  # timm's; transformers' ViT and BEiT use 1e-12 (read from config.json)

    _heads_fit = field_validator("num_heads")(_checked_against("embed_dim", _check_heads))


class ViTConfig(_PatchTransformer):
    """A plain ViT (timm ``vit_base_patch16_224``)."""

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

    init_values: NonNegativeFloat | None = 0.1  # layer scale; 0 or None: none
    use_abs_pos_emb: bool = False
    use_rel_pos_bias: bool = True  # one table per block
    use_shared_rel_pos_bias: bool = False  # one table for all blocks
    use_mean_pooling: bool = True  # True: no final norm on the tokens (it sits after pooling, as fc_norm)


class SwinConfig(_Patches):
    """Swin Transformer (timm ``swin_base_patch4_window7_224`` by default)."""

    patch_size: PositiveInt = 4
    embed_dim: PositiveInt = 128
    depths: tuple[PositiveInt, ...] = Field(default=(2, 2, 18, 2), min_length=1)
    num_heads: tuple[PositiveInt, ...] = Field(default=(4, 8, 16, 32), min_length=1)
    window_size: PositiveInt = 7
    mlp_ratio: PositiveFloat = 4.0
    qkv_bias: bool = True
    layer_norm_eps: PositiveFloat = 1e-5

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


class TimmConfig(_Strict):
    """Any timm architecture whose ``forward_features`` gives tokens or a feature map."""

    model: str = Field(min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to timm.create_model
    img_size: PositiveInt | None = None  # None: the architecture's default; convnets take any size

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        if not timm.is_model(v):
            close = difflib.get_close_matches(v, timm.list_models(), n=3, cutoff=0.6)
            raise ValueError(
                f"timm has no architecture {v!r}; expected a name from timm.list_models()"
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
                    f"kwargs.{str(key)[:60]} is not an architecture option splice passes to timm (files, pretrained "
                    "overlays, feature extraction and layer factories are never taken from a spec); expected one "
                    f"of {', '.join(sorted(TIMM_KWARGS))}; fix: "
                    + (f"did you mean {close[0]!r}?" if close else "remove it"))
            choices = TIMM_KWARGS[key]
            if not (value in choices if isinstance(value, str) else _plain(value)):
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                raise ValueError(
                    f"kwargs.{key} is {shown}; expected "
                    + (f"one of {sorted(choices)} or a number" if choices else "a number, a boolean or a list of them")
                    + f"; fix: give `{key}` a plain value")
        return v


def _plain(value: Any) -> bool:
    """A number, a boolean, or a (nested, short) list of them: what an architecture option is."""
    if isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, (list, tuple)) and len(value) <= 64 and all(_plain(x) for x in value)


# What a spec may pass to timm.create_model: architecture options with plain values. Strings only where a key
# takes a word, and then only the listed words. Nothing names a file, a pretrained config or a class to build.
TIMM_KWARGS: dict[str, frozenset[str]] = {
    **dict.fromkeys((
        "depth", "depths", "embed_dim", "embed_dims", "dims", "widths", "layers", "num_heads", "mlp_ratio",
        "mlp_ratios", "qkv_bias", "qk_norm", "in_chans", "patch_size", "window_size", "drop_rate",
        "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "patch_drop_rate", "init_values",
        "class_token", "no_embed_class", "reg_tokens", "pre_norm", "final_norm", "fc_norm", "dynamic_img_size",
        "dynamic_img_pad", "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias",
        "layer_scale_init_value", "ls_init_value", "output_stride", "stem_width", "kernel_sizes", "conv_mlp",
        "use_grn", "head_hidden_size", "num_features", "channels", "width_multiplier", "stem_chs",
        "conv_bias", "use_pos_emb", "strict_img_size",
    ), frozenset()),
    "global_pool": frozenset({"", "avg", "max", "avgmax", "catavgmax", "token", "map"}),
    "pos_embed": frozenset({"learn", "none", ""}),
}


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


def _create(arch: str, **kwargs: Any) -> nn.Module:
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


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


def build_timm(cfg: TimmConfig) -> TimmEncoder:
    kwargs = dict(cfg.kwargs)
    try:
        if cfg.img_size is not None:
            try:
                model = _create(cfg.model, img_size=cfg.img_size, **kwargs)
            except TypeError as e:
                if "img_size" not in str(e):
                    raise
                model = _create(cfg.model, **kwargs)  # a convnet: it takes any image size
        else:
            model = _create(cfg.model, **kwargs)
    except (TypeError, ValueError, AssertionError, IndexError) as e:
        raise ConfigError(
            [Problem("kwargs", f"timm.create_model({cfg.model!r}) rejected them: {e}", given=kwargs,
                     expected=f"arguments that timm's {cfg.model} accepts",
                     fix=f"check the signature of the {cfg.model} model class in timm")]
        ) from e
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


def _gelu(c: dict) -> None:
    if c["hidden_act"] not in ("gelu", "gelu_python"):
        raise _reject("hidden_act", c["hidden_act"], "'gelu' (exact GELU, timm's default)")


def _vit_config_from_hf(hf: dict) -> dict:
    c = {**_HF_VIT, **hf}
    _gelu(c)
    width, inner = int(c["hidden_size"]), int(c["intermediate_size"])
    ratio = inner / width
    if int(width * ratio) != inner:  # timm sizes the MLP as int(width * mlp_ratio)
        raise _reject("intermediate_size", inner, f"a size timm can express as int({width} * mlp_ratio)")
    return dict(img_size=_square(c, "image_size"), patch_size=_square(c, "patch_size"),
                in_chans=int(c["num_channels"]), embed_dim=width, depth=int(c["num_hidden_layers"]),
                num_heads=int(c["num_attention_heads"]), mlp_ratio=ratio, qkv_bias=bool(c["qkv_bias"]),
                layer_norm_eps=float(c["layer_norm_eps"]))


def _beit_config_from_hf(hf: dict) -> dict:
    c = {**_HF_BEIT, **hf}
    out = _vit_config_from_hf(c)
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
    return dict(model_type=model_type, image_size=v["img_size"], patch_size=v["patch_size"], num_channels=v["in_chans"],
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
# Each family lists (transformers name, timm name) pairs for the given config, plus fused tensors
# (timm name, [q, k, v] transformers names). Reading and writing are the same tables used both ways.

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


Pairs = list[tuple[str, str]]
Fused = list[tuple[str, list[str]]]


def _wb(hf: str, ours: str, bias: bool = True) -> Pairs:
    return [(f"{hf}.weight", f"{ours}.weight")] + ([(f"{hf}.bias", f"{ours}.bias")] if bias else [])


def _vit_tables(c: dict, family: str) -> tuple[Pairs, Fused]:
    pairs: Pairs = [("embeddings.cls_token", "cls_token")]
    pairs += _wb("embeddings.patch_embeddings.projection", "patch_embed.proj")
    if family == "deit_distilled":
        pairs.append(("embeddings.distillation_token", "dist_token"))
    if family != "beit" or c["use_absolute_position_embeddings"]:
        pairs.append(("embeddings.position_embeddings", "pos_embed"))
    if family == "beit" and c["use_shared_relative_position_bias"]:
        pairs.append(("encoder.relative_position_bias.relative_position_bias_table",
                      "rel_pos_bias.relative_position_bias_table"))
    fused: Fused = []
    for i in range(int(c["num_hidden_layers"])):
        hf, ours = f"encoder.layer.{i}", f"blocks.{i}"
        att = f"{hf}.attention.attention"
        pairs += _wb(f"{hf}.layernorm_before", f"{ours}.norm1") + _wb(f"{hf}.layernorm_after", f"{ours}.norm2")
        pairs += _wb(f"{hf}.attention.output.dense", f"{ours}.attn.proj")
        pairs += _wb(f"{hf}.intermediate.dense", f"{ours}.mlp.fc1") + _wb(f"{hf}.output.dense", f"{ours}.mlp.fc2")
        fused.append((f"{ours}.attn.qkv.weight", [f"{att}.{n}.weight" for n in ("query", "key", "value")]))
        if family != "beit":
            if c["qkv_bias"]:
                fused.append((f"{ours}.attn.qkv.bias", [f"{att}.{n}.bias" for n in ("query", "key", "value")]))
            continue
        # BEiT: no key bias (timm keeps a zero k_bias buffer), optional layer scale and per-block bias table.
        pairs += [(f"{att}.query.bias", f"{ours}.attn.q_bias"), (f"{att}.value.bias", f"{ours}.attn.v_bias")]
        if c["layer_scale_init_value"] and c["layer_scale_init_value"] > 0:
            pairs += [(f"{hf}.lambda_1", f"{ours}.gamma_1"), (f"{hf}.lambda_2", f"{ours}.gamma_2")]
        if c["use_relative_position_bias"]:
            pairs.append((f"{att}.relative_position_bias.relative_position_bias_table",
                          f"{ours}.attn.relative_position_bias_table"))
    if family == "beit" and c["use_mean_pooling"]:
        pairs += _wb("pooler.layernorm", "fc_norm")
    else:
        pairs += _wb("layernorm", "norm")
    return pairs, fused


def _swin_tables(c: dict) -> tuple[Pairs, Fused]:
    pairs = _wb("embeddings.patch_embeddings.projection", "patch_embed.proj")
    pairs += _wb("embeddings.norm", "patch_embed.norm")
    fused: Fused = []
    stages = len(c["depths"])
    for s, depth in enumerate(c["depths"]):
        for b in range(depth):
            hf, ours = f"encoder.layers.{s}.blocks.{b}", f"layers.{s}.blocks.{b}"
            pairs += _wb(f"{hf}.layernorm_before", f"{ours}.norm1") + _wb(f"{hf}.layernorm_after", f"{ours}.norm2")
            pairs.append((f"{hf}.attention.self.relative_position_bias_table",
                          f"{ours}.attn.relative_position_bias_table"))
            pairs += _wb(f"{hf}.attention.output.dense", f"{ours}.attn.proj")
            pairs += _wb(f"{hf}.intermediate.dense", f"{ours}.mlp.fc1") + _wb(f"{hf}.output.dense", f"{ours}.mlp.fc2")
            for kind in ("weight", "bias") if c["qkv_bias"] else ("weight",):
                qkv = [f"{hf}.attention.self.{n}.{kind}" for n in ("query", "key", "value")]
                fused.append((f"{ours}.attn.qkv.{kind}", qkv))
        if s < stages - 1:
            # transformers merges patches at the END of stage s; timm at the START of stage s + 1.
            pairs += _wb(f"encoder.layers.{s}.downsample.reduction", f"layers.{s + 1}.downsample.reduction", bias=False)
            pairs += _wb(f"encoder.layers.{s}.downsample.norm", f"layers.{s + 1}.downsample.norm")
    pairs += _wb("layernorm", "norm")
    return pairs, fused


def _from_hf(sd: dict[str, Tensor], pairs: Pairs, fused: Fused) -> tuple[dict[str, Tensor], list[str]]:
    by_disk = {_disk_name(k): k for k in sd}  # on-disk name -> the name we were given
    used: set[str] = set()
    mapped: dict[str, Tensor] = {}
    for hf, ours in pairs:
        if hf in by_disk:
            mapped[f"model.{ours}"] = sd[by_disk[hf]]
            used.add(hf)
    for ours, parts in fused:
        present = [p for p in parts if p in by_disk]
        if not present:
            continue  # missing: the loader reports model.<ours> as missing
        if len(present) < 3:
            missing = sorted(set(parts) - set(present))
            raise CheckpointError(f"{missing[0]}: missing, but {present[0]} is there; expected query, key and "
                                  "value together; fix: use a complete checkpoint")
        q, k, v = (sd[by_disk[p]] for p in parts)  # each (D, D) or (D,)
        if not (q.shape == k.shape == v.shape):
            raise CheckpointError(f"{parts[0]}: shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} for "
                                  "query, key, value; expected three equal shapes; fix: check the checkpoint "
                                  "matches its config.json")
        mapped[f"model.{ours}"] = torch.cat([q, k, v], 0)  # (3D, D) or (3D,)
        used.update(parts)
    unused = [orig for disk, orig in by_disk.items() if disk not in used]
    return mapped, unused


def _to_hf(sd: dict[str, Tensor], pairs: Pairs, fused: Fused) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    done: set[str] = set()
    for hf, ours in pairs:
        if f"model.{ours}" in sd:
            out[hf] = sd[f"model.{ours}"]
            done.add(f"model.{ours}")
    for ours, parts in fused:
        t = sd.get(f"model.{ours}")
        if t is None:
            continue
        if t.shape[0] % 3:
            raise CheckpointError(f"model.{ours}: first dimension {t.shape[0]} is not 3 * width; expected fused "
                                  "query, key, value; fix: export a model built by this plugin")
        out.update(zip(parts, t.chunk(3, 0)))  # 3 x (D, D) or (D,)
        done.add(f"model.{ours}")
    left = sorted(set(sd) - done)
    if left:
        raise CheckpointError(f"{left[0]}: no transformers name for it ({len(left)} such tensors); expected an "
                              "encoder whose config transformers can express; fix: export to timm format instead")
    return out


def _hf(model_types: tuple[str, ...], family: str) -> HFInterop:
    def tables(hf: dict) -> tuple[Pairs, Fused]:
        if family == "swin":
            return _swin_tables({**_HF_SWIN, **hf})
        return _vit_tables({**(_HF_BEIT if family == "beit" else _HF_VIT), **hf}, family)

    config_from_hf = {"swin": _swin_config_from_hf, "beit": _beit_config_from_hf}.get(family, _vit_config_from_hf)
    config_to_hf = {"swin": _swin_config_to_hf, "beit": _beit_config_to_hf,
                    "deit_distilled": lambda v: _vit_config_to_hf(v, "deit")}.get(family, _vit_config_to_hf)
    return HFInterop(
        config_to_hf=config_to_hf,
        model_types=model_types,
        config_from_hf=config_from_hf,
        state_dict_from_hf=lambda sd, hf: _from_hf(sd, *tables(hf)),
        state_dict_to_hf=lambda sd, hf: _to_hf(sd, *tables(hf)),
        ignorable=(r"pooler\..+", r"(?:.*\.)?position_ids"),  # the base model's pooler has no place in an encoder
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

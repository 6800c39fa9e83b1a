"""Bounded validate: every numeric field of every built-in encoder and decoder refuses hostile values with a clean
problem, and the sizes issue 12 named (BEiT at 512 px / patch 4, depth 100000, a 0xfff... width, mlp_ratio inf,
timm kwargs) are refused in seconds, before anything is built. The bounds are in docs/limits.md.

Each case goes through ``splice.validate`` under the harness's time bound; a plan with problems is raised as its
SpliceError, so the harness checks that every problem has a dotted path and a fix.
"""

from __future__ import annotations

import copy
import math
import re

import pytest

import splice
from splice.core.errors import SpliceError, error_for
from splice.core.plugins import get_registry
from splice.plugins import timm_vision as tv
from splice.plugins._shared import MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH

SECONDS = 20  # per case: a refused config never builds; an accepted one is tiny
FAST = 5  # the named cases: refused before building, so in well under a second

# what a user may write for a number: each is refused, or (0, "12", None) refused or accepted by the field's type
HOSTILE = [0, -1, 10**30, 2**64, math.inf, math.nan, True, "12", 1e308, [1], None]
ALWAYS_REFUSED = (-1, 10**30, 2**64, math.inf, math.nan, True, 1e308, [1])

REGISTRY = get_registry()
BUILT_IN = {kind: {e.name: e for e in REGISTRY.entries(kind) if e.dist == "splice" and e.tiny is not None}
            for kind in ("encoder", "decoder")}
TINY_ENCODER = ("vit", BUILT_IN["encoder"]["vit"].tiny)
TINY_DECODER = ("gpt2", BUILT_IN["decoder"]["gpt2"].tiny)


def _spec(role: str, name: str, config: dict) -> dict:
    """A spec with ``config`` for the ``role`` part and the other part tiny."""
    enc, dec = ((name, config), TINY_DECODER) if role == "encoder" else (TINY_ENCODER, (name, config))
    return {"encoder": {"name": enc[0], "config": enc[1]}, "decoder": {"name": dec[0], "config": dec[1]},
            "cross_attention": {"kind": "standard", "layers": "all"}, "projection": "auto",
            "tokens": {"decoder_start": 1, "pad": 0, "eos": 2}}


def _validated(spec: dict):
    """The plan, or its problems raised as one SpliceError (which the harness checks for paths and fixes)."""
    plan = splice.validate(spec)
    if plan.problems:
        raise error_for(plan.problems)
    return plan


def _numeric_fields(config_cls) -> list[str]:
    """Fields that take a number (or a tuple of them), from their annotations."""
    return [name for name, field in config_cls.model_fields.items()
            if re.search(r"\b(int|float)\b", str(field.annotation))]


def _with(tiny: dict, config_cls, field: str, value) -> dict:
    """The tiny config with ``field`` set to ``value``: a tuple field gets it as its first entry."""
    config = copy.deepcopy(tiny)
    if str(config_cls.model_fields[field].annotation).startswith("tuple"):
        rest = list(config.get(field, config_cls.model_fields[field].default))[1:]
        config[field] = [value, *rest]
    else:
        config[field] = value
    return config


def _refused(hostile, case: str, role: str, spec: dict, seconds: float = SECONDS) -> SpliceError:
    got = hostile.check(case, lambda: _validated(spec), expect="error", seconds=seconds)
    assert any(p.path.startswith(f"{role}.config") for p in got.problems), f"{case}: {got}"
    return got


def _always_refused(value, annotation) -> bool:
    """Whether no field of this type takes ``value`` (a list is an answer where the field takes a list)."""
    return value in ALWAYS_REFUSED and not (isinstance(value, list) and "list" in str(annotation))


@pytest.mark.parametrize("role,name", [(r, n) for r in BUILT_IN for n in sorted(BUILT_IN[r])])
def test_every_numeric_field_refuses_hostile_values(hostile, role, name):
    entry = BUILT_IN[role][name]
    fields = _numeric_fields(entry.config_cls)
    assert fields, f"{name}: no numeric fields found"
    for field in fields:
        for value in HOSTILE:
            spec = _spec(role, name, _with(entry.tiny, entry.config_cls, field, value))
            case = f"{role} {name}.{field} = {value!r}"
            if _always_refused(value, entry.config_cls.model_fields[field].annotation):
                _refused(hostile, case, role, spec)
            else:
                hostile.check(case, lambda: _validated(spec), seconds=SECONDS)


# ---- the cases issue 12 named: refused in seconds, before anything is built ----------------------------------

NAMED = [
    ("BEiT at img_size 512, patch_size 4", "encoder", "beit",
     dict(img_size=512, patch_size=4, embed_dim=48, depth=2, num_heads=3), "relative position"),
    ("ViT depth 100000", "encoder", "vit", dict(TINY_ENCODER[1], depth=100000), "depth"),
    ("BEiT depth 100000", "encoder", "beit", dict(TINY_ENCODER[1], depth=100000), "depth"),
    ("Swin depths [100000, 2]", "encoder", "swin", dict(BUILT_IN["encoder"]["swin"].tiny, depths=[100000, 2]),
     "depths"),
    ("Swin 64 blocks per stage", "encoder", "swin", dict(BUILT_IN["encoder"]["swin"].tiny, depths=[64, 66]),
     "add up to"),
    ("ViT embed_dim 0xffffffffffffffffffff", "encoder", "vit", dict(TINY_ENCODER[1], embed_dim=0xFFFFFFFFFFFFFFFFFFFF),
     "embed_dim"),
    ("ViT mlp_ratio .inf", "encoder", "vit", dict(TINY_ENCODER[1], mlp_ratio=math.inf), "mlp_ratio"),
    ("ViT mlp_ratio nan", "encoder", "vit", dict(TINY_ENCODER[1], mlp_ratio=math.nan), "mlp_ratio"),
    ("ViT mlp_ratio 1e-9 (an MLP of width 0)", "encoder", "vit", dict(TINY_ENCODER[1], mlp_ratio=1e-9), "MLP"),
    ("ViT img_size 10**9", "encoder", "vit", dict(TINY_ENCODER[1], img_size=10**9), "img_size"),
    ("ViT a 4096x4096 patch grid", "encoder", "vit", dict(TINY_ENCODER[1], img_size=8192, patch_size=2), "grid"),
    ("ViT patch embedding of 2**36 weights", "encoder", "vit",
     dict(img_size=8192, patch_size=4096, embed_dim=16384, in_chans=256, depth=1, num_heads=1), "patch embedding"),
    ("Swin final width 16384 x 8", "encoder", "swin",
     dict(BUILT_IN["encoder"]["swin"].tiny, embed_dim=MAX_WIDTH), "wide"),
    ("Swin 4096 px with patch 4, window 32", "encoder", "swin",
     dict(img_size=4096, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=32), "masks"),
    ("GPT-2 n_layer 100000", "decoder", "gpt2", dict(TINY_DECODER[1], n_layer=100000), "n_layer"),
    ("GPT-2 vocab_size 2**40", "decoder", "gpt2", dict(TINY_DECODER[1], vocab_size=2**40), "vocab_size"),
    ("GPT-2 n_positions 2**31", "decoder", "gpt2", dict(TINY_DECODER[1], n_positions=2**31), "n_positions"),
    ("GPT-2 n_head 2**64", "decoder", "gpt2", dict(TINY_DECODER[1], n_head=2**64), "n_head"),
    ("BERT width 0xfff...", "decoder", "bert",
     dict(BUILT_IN["decoder"]["bert"].tiny, hidden_size=0xFFFFFFFFFFFFFFFFFFFF), "hidden_size"),
    ("BART eos_token_id a list of 1000 ids", "decoder", "bart_decoder",
     dict(BUILT_IN["decoder"]["bart_decoder"].tiny, eos_token_id=list(range(1000))), "eos_token_id"),
]


@pytest.mark.parametrize("case,role,name,config,says", NAMED, ids=[c[0] for c in NAMED])
def test_named_sizes_are_refused_fast(hostile, case, role, name, config, says):
    got = _refused(hostile, case, role, _spec(role, name, config), seconds=FAST)
    assert says in str(got), f"{case}: {got}"


TIMM = BUILT_IN["encoder"]["timm"].tiny
TIMM_CASES = [
    ("kwargs act_layer: nope", dict(TIMM, kwargs={"act_layer": "nope"}), "act_layer"),
    ("kwargs features_only: true", dict(TIMM, kwargs={"features_only": True}), "features_only"),
    ("kwargs img_size: 10**9", dict(TIMM, kwargs={"img_size": 10**9}), "img_size"),
    ("img_size 10**9", dict(TIMM, img_size=10**9), "img_size"),
    ("kwargs depths [10**9, 1, 1, 1]", dict(TIMM, kwargs={**TIMM["kwargs"], "depths": [10**9, 1, 1, 1]}), "depths"),
    ("kwargs depths adding up to 400", dict(TIMM, kwargs={**TIMM["kwargs"], "depths": [100] * 4}), "adding up"),
    ("kwargs dims 0xfff...", dict(TIMM, kwargs={**TIMM["kwargs"], "dims": [0xFFFFFFFFFFFFFFFFFFFF] * 4}), "dims"),
    ("kwargs mlp_ratio inf", dict(model="vit_tiny_patch16_224", kwargs={"mlp_ratio": math.inf}), "mlp_ratio"),
    ("kwargs drop_path_rate nan", dict(TIMM, kwargs={"drop_path_rate": math.nan}), "drop_path_rate"),
    ("kwargs qkv_bias 7", dict(model="vit_tiny_patch16_224", kwargs={"qkv_bias": 7}), "qkv_bias"),
    ("kwargs num_heads True", dict(model="vit_tiny_patch16_224", kwargs={"num_heads": True}), "num_heads"),
    ("kwargs depths nested 5 deep", dict(TIMM, kwargs={"depths": [[[[[1]]]]]}), "depths"),
    ("kwargs num_heads 0 (timm divides by it)", dict(model="vit_tiny_patch16_224", kwargs={"num_heads": 0}),
     "num_heads"),
    ("timm BEiT at 2048 px: buffers refused from a meta-device probe",
     dict(model="beit_base_patch16_224", img_size=2048), "GiB"),
    ("timm Swin window 512 at 2048 px", dict(model="swin_tiny_patch4_window7_224", img_size=2048,
                                              kwargs={"window_size": 512}), "GiB"),
    ("a 300-character model name", dict(model="v" * 300), "model"),
]


@pytest.mark.parametrize("case,config,says", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_generic_timm_is_bounded(hostile, case, config, says):
    got = _refused(hostile, case, "encoder", _spec("encoder", "timm", config), seconds=FAST + 5)
    assert says in str(got), f"{case}: {got}"


# ---- what released checkpoints need is accepted ------------------------------------------------------------

RELEASED = [
    ("ViT-H/14 at 518", tv.ViTConfig, dict(img_size=518, patch_size=14, embed_dim=1280, depth=32, num_heads=16)),
    ("ViT-22B", tv.ViTConfig, dict(img_size=224, patch_size=14, embed_dim=6144, depth=48, num_heads=48)),
    ("BEiT-large 384", tv.BEiTConfig, dict(img_size=384, patch_size=16, embed_dim=1024, depth=24, num_heads=16)),
    ("BEiT-large 512", tv.BEiTConfig, dict(img_size=512, patch_size=16, embed_dim=1024, depth=24, num_heads=16)),
    ("Swin-L 384", tv.SwinConfig, dict(img_size=384, patch_size=4, embed_dim=192, depths=(2, 2, 18, 2),
                                       num_heads=(6, 12, 24, 48), window_size=12)),
    ("Donut's Swin (square 2560)", tv.SwinConfig, dict(img_size=2560, patch_size=4, embed_dim=128,
                                                       depths=(2, 2, 14, 2), num_heads=(4, 8, 16, 32), window_size=10)),
    ("Nougat's Swin (square 896)", tv.SwinConfig, dict(img_size=896, patch_size=4, embed_dim=128,
                                                       depths=(2, 2, 14, 2), num_heads=(4, 8, 16, 32), window_size=7)),
]


@pytest.mark.parametrize("case,config_cls,values", RELEASED, ids=[c[0] for c in RELEASED])
def test_released_encoder_sizes_are_accepted(case, config_cls, values):
    config_cls(**values)


def test_released_decoder_sizes_and_presets_are_accepted():
    dec = {n: e.config_cls for n, e in BUILT_IN["decoder"].items()}
    dec["gpt2"](n_embd=1600, n_layer=48, n_head=25)  # GPT-2 XL
    dec["bart_decoder"](d_model=1024, decoder_layers=12, decoder_attention_heads=16, decoder_ffn_dim=4096)
    dec["gpt2"](vocab_size=MAX_VOCAB, n_positions=MAX_POSITIONS, n_embd=MAX_WIDTH, n_layer=MAX_LAYERS, n_head=128)
    dec["bert"](vocab_size=256000, hidden_size=16384, num_hidden_layers=126, num_attention_heads=128,
                intermediate_size=53248, max_position_embeddings=131072)  # LLaMA-3-405B's sizes
    for preset in REGISTRY.presets.values():
        REGISTRY.get(preset.kind, preset.family).config_cls(**preset.config)


def test_widest_accepted_pair_validates_in_seconds(hostile):
    """The largest widths, vocabulary and positions with a modest depth: parameters stay on the meta device."""
    spec = _spec("decoder", "gpt2", dict(vocab_size=MAX_VOCAB, n_positions=MAX_POSITIONS, n_embd=MAX_WIDTH,
                                         n_layer=4, n_head=128))
    plan = hostile.check("widest gpt2", lambda: _validated(spec), expect="ok", seconds=FAST * 2)
    assert plan.decoder.params > 10**10

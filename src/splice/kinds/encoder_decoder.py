"""The encoder-decoder composition kind: a vision encoder, an optional projection and a text decoder with
cross-attention (transformers' VisionEncoderDecoderModel). The first kind, registered through ``register_kinds``
like any third party's.

Its plan owns every dimension: it reads the encoder's and decoder's widths from the built modules, decides the
projection, builds each cross-attention module from the decoder's layer specs, and checks token ids and lengths.
Its transformers layout is ``vision-encoder-decoder`` (``splice.core.transformers_format``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel
from torch import nn

import splice
from splice.core.composer import Part, build_part, plugin_call, resolve_part
from splice.core.configs import checked_config
from splice.core.errors import Problem, unknown_problem
from splice.core.kinds import Kind, Plan, TransformersFormat
from splice.core.meta import params_on_meta
from splice.core.models import EncoderDecoderModel
from splice.core.plugins import get_registry
from splice.core.registry import Entry
from splice.core.roles import check_cross_attention, check_output_width
from splice.core.spec import CompositionSpec
from splice.core.transformers_format import VED_MODEL_TYPE, export_ved, spec_from_ved_config, split_state

KIND = "encoder-decoder"


@dataclass
class EncoderDecoderPlan(Plan):
    """The encoder-decoder kind's plan: the two parts, the projection and the cross-attention layers."""

    encoder: Part | None = None
    decoder: Part | None = None
    adapter: Entry | None = None
    adapter_config: BaseModel | None = None
    projection: str | None = None  # None: the context is the encoder output as is
    projection_reason: str = ""
    projection_config: BaseModel | None = None
    context_width: int = 0
    decoder_layers: int = 0
    cross_attention: dict[int, str] = field(default_factory=dict)  # layer -> kind ("native" for built-in)

    def components(self) -> list[Part]:
        return [p for p in (self.encoder, self.decoder) if p is not None]

    def resolved_spec(self) -> dict:
        """The spec with presets expanded into full component configs (what ``splice.json`` stores)."""
        out = super().resolved_spec()
        out["cross_attention"]["config"] = self.adapter_config.model_dump(mode="json") if self.adapter_config else {}
        return out

    def summary(self) -> str:
        lines = [f"splice plan{f' for {self.source}' if self.source else ''}"]
        for part in self.components():
            lines.extend(part.summary_lines())
        if self.encoder and self.decoder:
            proj = self.projection or "none (identity)"
            lines.append(f"  projection {proj} — {self.projection_reason}")
            lines.append(f"  context width {self.context_width}")
            if self.cross_attention:
                kinds: dict[str, list[int]] = {}
                for layer, kind in sorted(self.cross_attention.items()):
                    kinds.setdefault(kind, []).append(layer)
                desc = "; ".join(f"{k} in layers {_ranges(v)}" for k, v in kinds.items())
                lines.append(f"  cross-attention {desc} (of {self.decoder_layers})")
            else:
                lines.append(f"  cross-attention none (of {self.decoder_layers} layers)")
        if self.params:
            p = self.params
            lines.append(
                f"  parameters total {p['total']:,} | new {p['new']:,} | frozen {p['frozen']:,} "
                f"(encoder {p['encoder']:,}, decoder {p['decoder']:,}, cross-attention {p['cross_attention']:,}, "
                f"projection {p['projection']:,})"
            )
        return "\n".join(lines + self.problem_lines())


def _ranges(layers: list[int]) -> str:
    return ", ".join(str(i) for i in layers)




def _layers_from_spec(layers, n: int, problems: list[Problem]) -> list[int]:
    if layers == "all":
        return list(range(n))
    if layers == "none":
        return []
    if isinstance(layers, str):  # every-N
        step = int(layers.split("-")[1])
        return list(range(0, n, step))
    bad = [i for i in layers if i >= n]
    if bad:
        problems.append(
            Problem(
                "cross_attention.layers",
                f"layer indices {bad} do not exist",
                given=layers,
                expected=f"indices in 0..{n - 1} (the decoder has {n} layers)",
                fix="drop the out-of-range indices",
                error="incompatible",
            )
        )
    return sorted(i for i in layers if i < n)



def _decide(plan: EncoderDecoderPlan, encoder: nn.Module, decoder: nn.Module) -> None:
    """Every dimension check, recorded in the plan."""
    spec, problems = plan.spec, plan.problems
    enc, dec = plan.encoder, plan.decoder
    width, width_from = _context_width(plan, decoder)
    plan.context_width = width
    enc_from = f"encoder {enc.family!r} hidden_size"
    if spec.projection_kind == "auto":
        if enc.width != width:
            plan.projection, plan.projection_reason = "linear", f"widths differ: {enc.width} ({enc_from}) -> {width}"
        else:
            plan.projection_reason = f"widths match ({enc.width})"
    elif spec.projection_kind == "none":
        if enc.width != width:
            problems.append(
                Problem(
                    "projection",
                    f"`projection: none` but the widths differ: {enc.width} from the {enc_from}, "
                    f"{width} from the {width_from}",
                    given="none",
                    expected="equal widths, or a projection",
                    fix="use `projection: auto` (or linear / mlp), `cross_attention: {context_width: encoder}` (the "
                    "cross-attention reads the encoder's width), or pick components of equal width",
                    error="incompatible",
                )
            )
        plan.projection_reason = "none requested"
    else:
        plan.projection, plan.projection_reason = spec.projection_kind, "requested"

    _decide_layers(plan, decoder)

    vocab = getattr(decoder, "vocab_size", None)
    for name, value in spec.tokens.model_dump().items():
        if value is not None and vocab is not None and value >= vocab:
            problems.append(
                Problem(
                    f"tokens.{name}",
                    f"token id {value} is outside the decoder's vocabulary",
                    given=value,
                    expected=f"an id in 0..{vocab - 1} (decoder {dec.family!r} vocab_size {vocab})",
                    fix=f"use an id below {vocab}, or enlarge the decoder's vocabulary",
                    error="incompatible",
                )
            )
    max_pos = getattr(decoder, "max_positions", None)
    if spec.max_length is not None and max_pos is not None and spec.max_length > max_pos:
        problems.append(
            Problem(
                "max_length",
                f"max_length {spec.max_length} exceeds the decoder's {max_pos} positions",
                given=spec.max_length,
                expected=f"at most {max_pos}",
                fix="lower max_length, or raise the decoder's position count",
                error="incompatible",
            )
        )


def _context_width(plan: EncoderDecoderPlan, decoder: nn.Module) -> tuple[int, str]:
    """The width the cross-attention keys/values read, and where it comes from: a native decoder's own
    ``context_width`` (TrOCR's ``cross_attention_hidden_size``), else the spec's ``cross_attention.context_width``:
    the decoder's width (the encoder's tokens projected to it when they differ, as transformers) or the encoder's
    (the adapters read the encoder's tokens as they are)."""
    dec = plan.decoder
    if getattr(decoder, "native_cross_attention", False):
        width = getattr(decoder, "context_width", None)
        if isinstance(width, int) and not isinstance(width, bool) and width > 0:
            return width, f"decoder {dec.family!r} context_width (the input width of its cross-attention)"
        return dec.width, f"decoder {dec.family!r} hidden_size (its cross-attention context width)"
    if plan.spec.cross_attention.context_width == "encoder":
        return plan.encoder.width, "encoder's width (cross_attention.context_width: encoder)"
    return dec.width, f"decoder {dec.family!r} hidden_size (its cross-attention context width)"


def _decide_layers(plan: EncoderDecoderPlan, decoder: nn.Module) -> None:
    """Which decoder layers get cross-attention, and whether their heads fit."""
    spec, problems, dec = plan.spec, plan.problems, plan.decoder
    layer_specs = list(decoder.layer_specs())
    plan.decoder_layers = len(layer_specs)
    if getattr(decoder, "native_cross_attention", False):
        ca = spec.cross_attention
        if ca.kind != "standard" or ca.layers != "all" or ca.context_width != "decoder":
            problems.append(
                Problem(
                    "cross_attention",
                    f"decoder {dec.family!r} has its own (native) cross-attention in every layer; adapters cannot replace it",
                    given=spec.cross_attention.model_dump(),
                    expected="kind: standard, layers: all (context_width: its own)",
                    fix="remove the cross_attention block for this decoder",
                    error="incompatible",
                )
            )
        plan.cross_attention = {s.index: "native" for s in layer_specs}
    else:
        before = len(problems)
        chosen = _layers_from_spec(spec.cross_attention.layers, len(layer_specs), problems)
        if not chosen and len(problems) == before:
            problems.append(
                Problem("cross_attention.layers", "no decoder layer gets cross-attention, so the text never sees the image",
                        given=spec.cross_attention.layers, expected="at least one layer",
                        fix="use `layers: all`, `every-N` or a list of layer indices")
            )
        plan.cross_attention = {i: spec.cross_attention.kind for i in chosen}
        for s in layer_specs:
            if s.index in plan.cross_attention and s.width % s.heads:
                problems.append(
                    Problem("decoder.config", f"layer {s.index}: {s.heads} heads do not divide width {s.width}",
                            fix="choose a head count that divides the width", error="incompatible")
                )


def _join(plan: EncoderDecoderPlan, encoder: nn.Module, decoder: nn.Module, *,
          check: bool = False) -> EncoderDecoderModel | None:
    """The whole model from its parts; None (with the problems in the plan) when a plugin's builder fails.
    ``check`` (validate) dry-runs the projection and the first cross-attention module against their widths."""
    problems = plan.problems
    proj = None
    if plan.projection is not None:
        entry = get_registry().get("projection", plan.projection)
        config = plan.projection_config or entry.make_config()
        widths = plan.encoder.width, plan.context_width
        proj = plugin_call(problems, entry, "projection", lambda: entry.builder(config)(*widths))
        if proj is not None and check:
            check_output_width(entry, proj, "projection", *widths, problems)
    installed: list[nn.Module] = []
    if not getattr(decoder, "native_cross_attention", False):
        installed = plugin_call(problems, plan.adapter, "cross_attention.kind",
                                lambda: _adapters(plan, decoder, check)) or []
    if problems:
        return None
    spec = plan.resolved_spec()
    model = EncoderDecoderModel(encoder, decoder, proj, tokens=spec["tokens"], spec=spec, cross_attention=installed)
    if plan.spec.max_length is not None:
        model.generation_defaults["max_length"] = plan.spec.max_length
    model.freeze(plan.spec.freeze)
    return model


def _adapters(plan: EncoderDecoderPlan, decoder: nn.Module, check: bool) -> list[nn.Module]:
    adapter = plan.adapter.builder(plan.adapter_config)
    specs = {s.index: s for s in decoder.layer_specs()}
    installed = []
    for layer in sorted(plan.cross_attention):
        module = adapter.build(specs[layer], plan.context_width)
        if check and not installed and not check_cross_attention(plan.adapter, module, specs[layer], plan.context_width,
                                                                 "cross_attention.kind", plan.problems):
            return []
        decoder.install_cross_attention(layer, module)
        installed.append(module)
    return installed


def _count(plan: EncoderDecoderPlan, model: EncoderDecoderModel) -> None:
    cross = sum(p.numel() for m in model.cross_attention_modules for p in m.parameters())
    enc = sum(p.numel() for p in model.encoder.parameters())
    dec = sum(p.numel() for p in model.decoder.parameters()) - cross
    proj = sum(p.numel() for p in model.enc_to_dec_proj.parameters()) if model.enc_to_dec_proj is not None else 0
    plan.encoder.params, plan.decoder.params = enc, dec
    new = cross + proj + (enc if plan.encoder.pretrained is False else 0) + (dec if plan.decoder.pretrained is False else 0)
    plan.params = {
        "total": enc + dec + cross + proj,
        "new": new,
        "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "encoder": enc,
        "decoder": dec,
        "cross_attention": cross,
        "projection": proj,
    }




# -- validate / assemble ------------------------------------------------------------------------------


def validate(spec: CompositionSpec, source: str | None = None) -> EncoderDecoderPlan:
    """Resolve both parts, the adapter and the projection, build everything on the meta device and decide every
    dimension; the problems are in the plan."""
    registry = get_registry()
    plan = EncoderDecoderPlan(spec=spec, source=source, kind=KIND)
    problems = plan.problems
    plan.encoder = resolve_part("encoder", spec.encoder, problems, registry=registry)
    plan.decoder = resolve_part("decoder", spec.decoder, problems, registry=registry)
    if registry.has("adapter", spec.cross_attention.kind):
        plan.adapter = registry.get("adapter", spec.cross_attention.kind)
        plan.adapter_config = checked_config(plan.adapter, spec.cross_attention.config, "cross_attention.config", problems)
    else:
        problems.append(registry.missing_problem("adapter", spec.cross_attention.kind, path="cross_attention.kind"))
    proj = spec.projection_kind
    if proj not in ("auto", "none"):
        if not registry.has("projection", proj):
            problems.append(unknown_problem("projection", proj, ["auto", "none", *registry.names("projection")],
                                            path="projection"))
        else:
            plan.projection_config = checked_config(registry.get("projection", proj), spec.projection_config,
                                                    "projection.config", problems)
    if plan.encoder is None or plan.decoder is None or problems:
        return plan
    with params_on_meta():
        built = _build_parts(plan)
    if built is None:
        return plan
    _decide(plan, *built)
    if plan.problems or plan.adapter is None:
        return plan
    with params_on_meta():
        model = _join(plan, *built, check=True)
    if model is not None:
        _count(plan, model)
        plan.meta_model = model
    return plan


def _build_parts(plan: EncoderDecoderPlan) -> tuple[nn.Module, nn.Module] | None:
    """The encoder and decoder modules, each checked against its role; None (with the problems) when one fails."""
    encoder = build_part(plan.encoder, plan.problems)
    decoder = build_part(plan.decoder, plan.problems)
    return None if encoder is None or decoder is None else (encoder, decoder)


def assemble(plan: EncoderDecoderPlan) -> EncoderDecoderModel:
    """The planned model, built anew (real weights, or meta when the caller builds under ``params_on_meta``)."""
    built = _build_parts(plan)
    model = _join(plan, *built) if built is not None else None
    plan.raise_for_problems()
    assert model is not None
    return model


@splice.hookimpl
def register_kinds(register):
    register(Kind(
        name=KIND, spec_model=CompositionSpec, validate=validate, assemble=assemble, model_class=EncoderDecoderModel,
        formats=(TransformersFormat("VisionEncoderDecoder", model_types=(VED_MODEL_TYPE,),
                                    architectures=("VisionEncoderDecoderModel",), spec_from_config=spec_from_ved_config,
                                    split_state=split_state, export=export_ved),),
        description="a vision encoder, a projection and a text decoder with cross-attention (captioning, OCR)",
    ))

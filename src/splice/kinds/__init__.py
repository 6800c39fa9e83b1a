"""Composition kinds, and what a plugin needs to write one.

A kind is registered by a plugin's ``register_kinds`` hook as a ``Kind``; ``docs/writing-a-kind.md`` walks
through a whole one (``tests/fixtures/splice_classifier``). The pieces a kind plans and builds with:

- ``Plan`` (or a subclass), ``Part`` and ``ComponentSpec`` (a spec's ``name`` / ``pretrained`` / ``config`` block);
- ``resolve_part(role, spec_part, problems, kind=...)``: a registered name, preset or timm model, config checked;
- ``build_part(part, problems)``: the plugin's builder, checked against its role (a dry forward);
- ``plugin_call(problems, entry, path, fn)``: any other plugin code, its exceptions turned into problems;
- ``params_on_meta()``: build without allocating parameters (what ``validate`` does);
- ``ComposedModel``: the base of a kind's model (spec, save_pretrained, freeze, tokenizer, image processor, and the
  training contract ``splice.train`` follows; ``CaptionEncoding`` says how its captions become token rows).

``splice.kinds.encoder_decoder`` is the built-in ``encoder-decoder`` kind.
"""

from splice.core.composer import Part, build_part, count_params, plugin_call, resolve_part
from splice.core.kinds import DEFAULT_KIND, Kind, Plan, TransformersFormat
from splice.core.meta import params_on_meta
from splice.core.models import CaptionEncoding, ComposedModel
from splice.core.spec import ComponentSpec

__all__ = ["CaptionEncoding", "ComponentSpec", "ComposedModel", "DEFAULT_KIND", "Kind", "Part", "Plan", "TransformersFormat",
           "build_part", "count_params", "params_on_meta", "plugin_call", "resolve_part"]

"""Composition kinds: what a plugin gives splice to add a way of joining components.

A kind (``encoder-decoder``, and later dual encoder, prefix LM, single stream, or a third party's) is registered
through the ``register_kinds`` hook as a ``Kind``: its spec model (the spec's ``kind:`` picks it), ``validate``
(the plan, found without weights), ``assemble`` (the model, with real weights), its model class, and the
transformers folder layouts it reads and writes. The composer, ``splice.load`` and ``splice.export_transformers``
know kinds only through this record; the built-in ``encoder-decoder`` kind (``splice.kinds.encoder_decoder``)
registers through the same hook as a third party would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from pydantic import BaseModel
from torch import nn

from splice.core.errors import Problem, error_for

DEFAULT_KIND = "encoder-decoder"  # a spec without `kind:`


@dataclass(frozen=True)
class TransformersFormat:
    """A folder layout written by transformers' ``save_pretrained`` that a kind reads (and may write).

    ``splice.load`` picks the format whose ``model_types`` holds the folder's ``config.json`` ``model_type``, or
    whose ``architectures`` shares a name with its ``architectures`` list.

    - ``spec_from_config(config, source) -> (spec, generation)``: a spec (a dict, as a YAML file would hold it)
      for the folder's ``config.json``, and the generation defaults it implies. Raise a ``SpliceError`` naming the
      field (``source`` is the file's path, for messages).
    - ``split_state(source, tensors, plan, config) -> (state, unused, unexpected, notes)``: the folder's tensors
      (a read-only mapping, read lazily) in the planned model's ``state_dict`` names; ``unused``: tensors with no
      place that are expected (a pooler); ``unexpected``: any other tensor without a place (a strict load fails);
      ``notes``: lines for the loading report.
    - ``export(model, path)``: write a folder transformers loads (None: this kind does not export).
    """

    name: str
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    spec_from_config: Callable[[dict, str], tuple[dict, dict]] | None = None
    split_state: Callable[[str, Mapping, Any, dict], tuple[dict, list, list, list]] | None = None
    export: Callable[[Any, Any], None] | None = None

    def reads(self, config: Mapping) -> bool:
        if config.get("model_type") in self.model_types:
            return True
        archs = config.get("architectures")
        return isinstance(archs, list) and any(isinstance(a, str) and a in self.architectures for a in archs)


@dataclass(frozen=True)
class Kind:
    """One composition kind, as a plugin registers it: ``register(splice.Kind(...))`` in ``register_kinds``.

    - ``spec_model``: a pydantic model with a ``kind`` field (``Literal["<name>"]``) and the kind's keys; use
      ``extra="forbid"`` so that a misspelt key gets a did-you-mean.
    - ``validate(spec, source) -> Plan``: check the parsed spec and plan the model without allocating weights
      (components built under ``splice.core.meta.params_on_meta``); every finding goes in ``plan.problems``, and a
      plan without problems carries ``meta_model``, the model with its parameters on the meta device (what
      ``splice.load`` fills).
    - ``assemble(plan) -> nn.Module``: the planned model with real, randomly initialised weights. The model has
      ``spec`` (the resolved spec, saved in ``splice.json``, with ``kind``), ``generation_defaults`` (a dict) and
      ``tokenizer`` / ``image_processor`` attributes (None when it has none).
    - ``model_class``: the class ``assemble`` returns.
    - ``formats``: the transformers layouts it reads and writes.
    """

    name: str
    spec_model: type[BaseModel]
    validate: Callable[[BaseModel, str | None], "Plan"]
    assemble: Callable[["Plan"], nn.Module]
    model_class: type
    formats: tuple[TransformersFormat, ...] = ()
    description: str = ""


@dataclass
class Plan:
    """What ``compose`` would build, found without allocating weights. Every kind's plan is one of these (or a
    subclass that adds the kind's own decisions).

    ``parts`` are the resolved components (``splice.core.composer.Part``), each warm-started from its ``weights``
    when it names some; ``lines`` are the kind's own lines for ``summary``."""

    spec: BaseModel | None
    source: str | None = None
    kind: str = DEFAULT_KIND
    parts: list = field(default_factory=list)
    params: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    meta_model: nn.Module | None = None  # the model on the meta device (params only)
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        if self.problems:
            raise error_for(self.problems, source=self.source)

    def components(self) -> list:
        """The resolved components (``Part``s), in the spec's order."""
        return list(self.parts)

    def resolved_spec(self) -> dict:
        """The spec with presets expanded into full component configs (what ``splice.json`` stores)."""
        assert self.spec is not None
        out = self.spec.model_dump(mode="json")  # its `kind` included
        for part in self.components():
            out[part.role] = {"name": part.family, "pretrained": False, "config": part.config.model_dump(mode="json")}
        return out

    def summary(self) -> str:
        lines = [f"splice plan ({self.kind}){f' for {self.source}' if self.source else ''}"]
        for part in self.components():
            lines.extend(part.summary_lines())
        lines.extend(f"  {line}" for line in self.lines)
        if self.params:
            lines.append("  parameters " + " | ".join(f"{k} {v:,}" for k, v in self.params.items()))
        return "\n".join(lines + self.problem_lines())

    def problem_lines(self) -> list[str]:
        if not self.problems:
            return ["  ok"]
        return [f"  {len(self.problems)} problem(s):"] + [
            "    - " + str(pr).replace("\n", "\n      ") for pr in self.problems]

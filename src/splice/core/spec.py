"""The composition spec: what a YAML file may say, and how its problems are reported.

Validation has two stages. This module does the first (the spec's own structure, ``extra="forbid"``); the
composer does the second (each component's own ``Config``). Both report through ``Problem`` with a dotted path.
A spec can only name registered components: nothing in it is imported or executed.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator

from splice.core.errors import ConfigError, Problem


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentSpec(_Strict):
    """An encoder or decoder: a registered name (or preset), its weights, and config overrides."""

    name: str = Field(description="a registered component or a named preset (`splice list`)")
    pretrained: Union[bool, str] = Field(
        False, description="false (random init) | true (the preset's weights) | a hub id | a local path"
    )
    config: dict[str, Any] = Field(default_factory=dict, description="checked by the component's own Config")


_LAYERS_RE = re.compile(r"^(all|none|every-[1-9][0-9]*)$")


class CrossAttentionSpec(_Strict):
    """Which cross-attention kind (a registered adapter) goes into which decoder layers."""

    kind: str = Field("standard", description="a registered adapter kind: standard | gated | ...")
    layers: Union[str, list[NonNegativeInt]] = Field(
        "all", description="all | none | every-N (layers 0, N, 2N, ...) | an explicit list of layer indices"
    )
    config: dict[str, Any] = Field(default_factory=dict, description="options of the adapter kind")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, str) and not _LAYERS_RE.match(v):
            raise ValueError("layers must be 'all', 'none', 'every-N' (N ≥ 1) or a list of layer indices")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError(f"layers lists an index twice: {v}")
        return v


class TokensSpec(_Strict):
    """Special token ids of the decoder's vocabulary."""

    decoder_start: NonNegativeInt | None = Field(None, description="first decoder token (labels are shifted right onto it)")
    pad: NonNegativeInt | None = Field(None, description="padding id (replaces -100 in shifted labels)")
    eos: NonNegativeInt | None = Field(None, description="end of sequence: generation stops here")


class ProjectionSpec(_Strict):
    """A projection with options, e.g. ``{kind: mlp, config: {hidden: 1024, act: gelu}}``."""

    kind: str = Field(description="a registered projection: linear | mlp | ...")
    config: dict[str, Any] = Field(default_factory=dict, description="options of that projection")


Freezable = Literal["encoder", "decoder", "cross_attention", "projection"]


class CompositionSpec(_Strict):
    """A vision encoder joined to a text decoder."""

    kind: Literal["encoder-decoder"] = "encoder-decoder"
    encoder: ComponentSpec
    decoder: ComponentSpec
    cross_attention: CrossAttentionSpec = Field(default_factory=CrossAttentionSpec)
    projection: Union[str, ProjectionSpec] = Field(
        "auto",
        description="auto (a Linear exactly when widths differ, as transformers does) | none | linear | mlp "
        "| another registered projection, or {kind, config} to set its options",
    )

    @property
    def projection_kind(self) -> str:
        return self.projection if isinstance(self.projection, str) else self.projection.kind

    @property
    def projection_config(self) -> dict:
        return {} if isinstance(self.projection, str) else dict(self.projection.config)
    tokens: TokensSpec = Field(default_factory=TokensSpec)
    freeze: list[Freezable] = Field(default_factory=list, description="parts whose weights are not trained")
    max_length: PositiveInt | None = Field(
        None, description="longest decoder sequence to be asked for; checked against the decoder's positions"
    )


def schema() -> dict:
    """The JSON Schema of a composition spec."""
    return CompositionSpec.model_json_schema()


# -- reading -------------------------------------------------------------------------------------------


def read_spec_source(source: Any) -> tuple[dict, str | None]:
    """A spec as a plain dict, from a path (YAML/JSON), a composition preset name, a dict or a spec object."""
    if isinstance(source, CompositionSpec):
        return source.model_dump(), None
    if isinstance(source, dict):
        return source, None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file():
            text = path.read_text()
            try:
                data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
            except (yaml.YAMLError, json.JSONDecodeError) as exc:
                raise ConfigError(
                    [Problem("", f"cannot parse {path}: {exc}", fix="fix the YAML/JSON syntax")], source=str(path)
                ) from None
            if not isinstance(data, dict):
                raise ConfigError(
                    [Problem("", "a spec must be a mapping", given=type(data).__name__, expected="a YAML mapping")],
                    source=str(path),
                )
            return data, str(path)
        from splice.core.plugins import get_registry

        registry = get_registry()
        if str(source) in registry.compositions:
            return dict(registry.compositions[str(source)]), f"preset {source}"
        close = difflib.get_close_matches(str(source), list(registry.compositions), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(
            [
                Problem(
                    "",
                    f"{str(source)!r} is neither a spec file nor a composition preset{hint}",
                    expected="a path to a .yaml/.json spec or a preset from `splice list --kind preset`",
                    fix="check the path, or pick a preset name",
                )
            ]
        )
    raise ConfigError(f"cannot read a spec from {type(source).__name__}: give a path, a preset name, a dict or a CompositionSpec")


def parse_spec(source: Any) -> CompositionSpec:
    """Stage one: the spec's structure. Raises ``ConfigError`` listing every problem at once."""
    data, where = read_spec_source(source)
    try:
        return CompositionSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, model=CompositionSpec), source=where) from None


def problems_from_validation(exc: ValidationError, *, prefix: str = "", model: type[BaseModel] | None = None) -> list[Problem]:
    """pydantic's errors as Problems with dotted paths, expectations and fixes."""
    problems: list[Problem] = []
    union_seen: dict[str, Problem] = {}
    for err in exc.errors():
        loc = [str(x) for x in err["loc"]]
        if len(loc) > 1 and _UNION_BRANCH.match(loc[-1]):
            # one problem per field, not one per member of a Union
            path = ".".join([prefix, *loc[:-1]] if prefix else loc[:-1])
            if path in union_seen:
                old = union_seen[path]
                merged = Problem(path, old.message, given=old.given, expected=f"{old.expected} or {loc[-1]}", fix=old.fix)
                problems[problems.index(old)] = merged
                union_seen[path] = merged
            else:
                union_seen[path] = Problem(path, "wrong type", given=err.get("input"), expected=loc[-1], fix=f"give `{loc[-2]}` one of the expected types")
                problems.append(union_seen[path])
            continue
        path = ".".join([prefix, *loc] if prefix else loc)
        kind = err["type"]
        given = err.get("input")
        if kind == "extra_forbidden":
            allowed = _allowed_fields(model, err["loc"][:-1])
            close = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.5)
            fix = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}" if allowed else "remove it"
            problems.append(Problem(path, "unknown key", expected="one of the documented keys", fix=fix))
        elif kind == "missing":
            problems.append(Problem(path, "required key is missing", fix=f"add `{loc[-1]}`"))
        else:
            msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            expected = ""
            if "expected" in err.get("ctx", {}):
                expected = str(err["ctx"]["expected"])
            if not err["loc"] or isinstance(given, (dict, list)) and len(repr(given)) > 60:
                given = None  # a whole config: the message itself names the values
            field_name = next((part for part in reversed(loc) if not part.isdigit()), "")
            problems.append(Problem(path, msg, given=given, expected=expected, fix=_fix_for(kind, field_name)))
    return problems


_UNION_BRANCH = re.compile(r"^(bool|str|int|float|none|list\[.*\]|dict\[.*\]|tuple\[.*\]|literal\[.*\])$")


def _allowed_fields(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    for part in loc:
        if model is None:
            return []
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model is not None else []


def _fix_for(kind: str, name: str) -> str:
    if kind.startswith(("int_", "float_", "bool_", "string_")) or kind in ("int_type", "literal_error"):
        return f"give `{name}` a value of the expected type"
    if kind.startswith(("greater_than", "less_than")):
        return f"choose a value for `{name}` within the bounds"
    return ""

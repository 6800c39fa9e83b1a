"""The composition spec: what a YAML file may say, and how its problems are reported.

Validation has two stages. The composer does the first with the kind's spec model (for the encoder-decoder kind,
``CompositionSpec`` here: the spec's own structure, ``extra="forbid"``), then the second (each component's own
``Config``). Both report through ``Problem`` with a dotted path.
A spec can only name registered components: nothing in it is imported or executed.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator

from splice.core.errors import ConfigError, Problem, Shown, clip, short


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
    context_width: Literal["decoder", "encoder"] = Field(
        "decoder", description="the width the adapters' keys/values read: decoder (the encoder's tokens projected "
        "to the decoder's width when they differ, as transformers) | encoder (the encoder's tokens as they are, no "
        "projection). A decoder with native cross-attention says its own (TrOCR: cross_attention_hidden_size)")

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
        None, description="longest decoder sequence (prompt + new tokens): checked against the decoder's positions, "
        "and generate's default length (an argument overrides it)"
    )


def schema() -> dict:
    """The JSON Schema of a composition spec."""
    return CompositionSpec.model_json_schema()


# -- reading -------------------------------------------------------------------------------------------


MAX_SPEC_BYTES = 1 << 20  # a spec is a few hundred bytes; 1 MiB is far beyond any real one
MAX_SPEC_VALUES = 10_000  # values in the spec once YAML aliases are expanded
MAX_SPEC_DEPTH = 32  # nesting of mappings and lists
MAX_INT = 2**63 - 1  # no size or id in a spec is larger


def read_spec_source(source: Any) -> tuple[dict, str | None]:
    """A spec as a plain dict, from a path (YAML/JSON), a composition preset name, a dict or a spec object (any
    kind's).

    Whatever the source, the data is bounded before anything else reads it: size, nesting, expanded YAML aliases,
    huge integers and non-finite numbers are refused with the dotted path where they are."""
    if isinstance(source, BaseModel):  # a CompositionSpec, or another kind's spec object
        return source.model_dump(), None
    if isinstance(source, dict):
        _check_bounds(source, None)
        return source, None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if _is_file(path):
            data = _parse_file(path)
            _check_bounds(data, str(path))
            return data, str(path)
        return _preset(str(source))
    raise ConfigError([Problem("spec", "cannot read a spec from this type", given=Shown(type(source).__name__),
                               expected="a path, a preset name, a dict or a spec object",
                               fix="pass the path of a .yaml/.json spec, a preset name or a dict")])


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a file
        return False


def _parse_file(path: Path) -> dict:
    def refuse(message: str, fix: str, expected: str = "") -> ConfigError:
        return ConfigError([Problem("spec", message, expected=expected, fix=fix)], source=str(path))

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise refuse(f"cannot read the file: {exc.strerror}", "check the path and its permissions") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise refuse("the file is larger than 1 MiB", "a spec is a short YAML file: check that this is one",
                     expected=f"at most {MAX_SPEC_BYTES:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise refuse(f"byte {raw[exc.start]:#04x} at line {line} is not UTF-8", "save the spec as UTF-8 text",
                     expected="UTF-8 text") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise refuse(f"cannot parse it: {clip(str(exc), 400)}", "fix the YAML/JSON syntax at the place named") from None
    except RecursionError:
        raise refuse("it is nested too deeply to parse", f"a spec nests at most {MAX_SPEC_DEPTH} levels") from None
    except ValueError as exc:  # an integer literal of thousands of digits
        raise refuse(f"a value cannot be read: {clip(str(exc), 200)}", "write sizes and ids as ordinary integers") from None
    if not isinstance(data, dict):
        raise ConfigError([Problem("spec", "a spec must be a mapping", given=Shown(type(data).__name__),
                                   expected="a YAML mapping with encoder: and decoder:",
                                   fix="start from `splice schema` or an example in examples/")], source=str(path))
    return data


def _check_bounds(data: Any, source: str | None) -> None:
    """Walk the data once, with a budget: refuse alias bombs, deep nesting, huge ints and NaN/inf by path."""
    budget = [MAX_SPEC_VALUES]
    problems: list[Problem] = []

    def walk(value: Any, path: str, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0 or len(problems) >= 10:
            return
        if depth > MAX_SPEC_DEPTH:
            problems.append(Problem(path, "nested too deeply", expected=f"at most {MAX_SPEC_DEPTH} levels",
                                    fix="a spec's values are flat: check this entry"))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{_key(key)}" if path else _key(key), depth + 1)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}.{i}" if path else str(i), depth + 1)
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(Problem(path, "not a finite number", given=value, expected="a finite number",
                                    fix=f"give `{path.rsplit('.', 1)[-1]}` an ordinary number"))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            problems.append(Problem(path, "integer too large", given=value, expected=f"at most {MAX_INT:,}",
                                    fix=f"give `{path.rsplit('.', 1)[-1]}` a realistic value"))

    walk(data, "", 0)
    if budget[0] < 0:
        problems.insert(0, Problem("spec", f"the spec expands to more than {MAX_SPEC_VALUES:,} values "
                                   "(YAML anchors and aliases repeat values)",
                                   expected=f"at most {MAX_SPEC_VALUES:,} values",
                                   fix="write the spec without nested aliases"))
    if problems:
        raise ConfigError(problems, source=source)


def _key(key: Any) -> str:
    return key if isinstance(key, str) and len(key) <= 40 else short(key, 40)


def _preset(name: str) -> tuple[dict, str]:
    from splice.core.plugins import get_registry

    registry = get_registry()
    if name in registry.compositions:
        return dict(registry.compositions[name]), f"preset {name}"
    close = difflib.get_close_matches(name[:200], list(registry.compositions), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise ConfigError([Problem("spec", f"neither a spec file nor a composition preset{hint}", given=name,
                               expected="a path to a .yaml/.json spec or a preset from `splice list --kind preset`",
                               fix="check the path, or pick a preset name")])


def problems_from_validation(exc: ValidationError, *, prefix: str = "", model: type[BaseModel] | None = None,
                             describe: str = "`splice schema`") -> list[Problem]:
    """pydantic's errors as Problems with dotted paths, expectations and fixes.

    ``describe`` names where the allowed values are listed (a component's `splice describe NAME`)."""
    problems: list[Problem] = []
    union_seen: dict[str, Problem] = {}
    for err in exc.errors(include_url=False):
        loc = [_key(x) if isinstance(x, str) else str(x) for x in err["loc"]]
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
        path = ".".join([prefix, *loc] if prefix else loc) or prefix or "spec"
        problems.append(_problem(err, path, loc, model, describe))
    return problems


def _problem(err: dict, path: str, loc: list[str], model: type[BaseModel] | None, describe: str) -> Problem:
    kind = err["type"]
    given = err.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_fields(model, err["loc"][:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.5)
        fix = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}" if allowed else "remove it"
        return Problem(path, "unknown key", expected="one of the documented keys", fix=fix)
    if kind == "missing":
        return Problem(path, "required key is missing", fix=f"add `{loc[-1]}`")
    msg = clip(err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, "), 600)
    expected = str(err.get("ctx", {}).get("expected", ""))
    if not err["loc"] or isinstance(given, (dict, list)) and len(short(given)) > 60:
        given = None  # a whole config: the message itself names the values
    field_name = next((part for part in reversed(loc) if not part.isdigit()), "") or "the value"
    return Problem(path, msg, given=given, expected=expected, fix=_fix_for(kind, field_name, describe))


_UNION_BRANCH = re.compile(r"^(bool|str|int|float|none|list\[.*\]|dict\[.*\]|tuple\[.*\]|literal\[.*\])$")


def _allowed_fields(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    for part in loc:
        if model is None:
            return []
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model is not None else []


def _fix_for(kind: str, name: str, describe: str) -> str:
    if kind in ("literal_error", "enum"):
        return f"give `{name}` one of the expected values"
    if kind.endswith(("_type", "_parsing")):
        return f"give `{name}` a value of the expected type ({describe} lists each field)"
    if kind.startswith(("greater_than", "less_than", "multiple_of", "finite_number")):
        return f"choose a value for `{name}` within the bounds"
    if kind.startswith(("too_short", "too_long")):
        return f"give `{name}` as many items as expected"
    return f"change `{name}` as the message says ({describe} lists the allowed values)"

"""The errors splice raises for user mistakes.

Every message says what was given, what was expected, and how to fix it. Internal invariants use
``assert``; anything a user can cause is one of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Problem:
    """One problem found in a spec or config: where, what was given, what was expected, the fix."""

    path: str
    message: str
    given: Any = None
    expected: str = ""
    fix: str = ""
    error: str = "config"  # which SpliceError subclass this problem belongs to: config|unknown|incompatible|plugin

    def __post_init__(self) -> None:
        # a problem quotes what was given; a huge value (an anchor bomb, a tensor) is kept as its bounded repr,
        # so that neither the message nor `--json` output renders it whole
        if not _small(self.given):
            object.__setattr__(self, "given", Shown(short(self.given)))

    def __str__(self) -> str:
        parts = [f"{self.path or '<root>'}: {self.message}"]
        if self.given is not None:
            parts.append(f"given {short(self.given)}")
        if self.expected:
            parts.append(f"expected {self.expected}")
        line = "; ".join(parts)
        if self.fix:
            line += f"\n    fix: {self.fix}"
        return line


class SpliceError(Exception):
    """Base class of every error splice raises for bad input.

    Takes a message, or a list of ``Problem`` (all the problems found at once, each with its dotted path).
    """

    def __init__(self, problems: "Sequence[Problem] | str", *, source: str | None = None):
        if isinstance(problems, str):
            self.problems = [Problem(path="", message=problems)]
            self.source = source
            super().__init__(problems)
            return
        self.problems = list(problems)
        self.source = source
        if len(self.problems) == 1 and not source:
            text = str(self.problems[0])
        else:
            head = f"{len(self.problems)} problem(s)" + (f" in {source}" if source else "")
            text = head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class ConfigError(SpliceError):
    """A spec or component config is malformed."""


class UnknownComponentError(SpliceError):
    """A name that no plugin registered; the message lists close matches."""

    @classmethod
    def for_name(cls, kind: str, name: str, known: Sequence[str], *, path: str = "",
                 list_kind: str | None = None) -> "UnknownComponentError":
        return cls([unknown_problem(kind, name, known, path=path, list_kind=list_kind)])


def unknown_problem(kind: str, name: str, known: Sequence[str], *, path: str = "", list_kind: str | None = None) -> Problem:
    import difflib

    close = difflib.get_close_matches(str(name)[:100], list(known), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "no registered name is close"
    return Problem(
        path=path,
        message=f"unknown {kind} {short(name)} ({hint})",
        expected=f"a registered {kind}",
        fix=f"`splice list{_kind_flag(kind if list_kind is None else list_kind)}` shows them; "
        f"or install the plugin that provides {short(name, 40)}",
        error="unknown",
    )


class IncompatibleComponentsError(SpliceError):
    """Two components that cannot be joined as asked (widths, heads, vocabulary, positions)."""


class CheckpointError(SpliceError):
    """A checkpoint that cannot be read or does not fit the model: names the file and the tensor."""


class PluginError(SpliceError):
    """A plugin broke a rule of the plugin API (for example two plugins registering one name)."""


class InputError(SpliceError):
    """Tensors passed at run time that do not fit the model (shape, dtype, image size, token ids)."""


GIVEN_LIMIT = 80


class Shown(str):
    """A value already rendered for a message: its repr is the text itself."""

    def __repr__(self) -> str:
        return str(self)


def _small(value: Any, budget: list[int] | None = None) -> bool:
    """True for plain JSON-like values of a few dozen items at most (kept as they are in a Problem)."""
    budget = [40] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        return False
    if value is None or isinstance(value, (bool, float, Shown)):
        return True
    if isinstance(value, int):
        return value.bit_length() <= 64
    if isinstance(value, str):
        return len(value) <= GIVEN_LIMIT
    if isinstance(value, (list, tuple)):
        return all(_small(v, budget) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _small(k, budget) and _small(v, budget) for k, v in value.items())
    return False


def clip(text: str, limit: int = 300) -> str:
    """A message (plain text, not a repr) cut to ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: Any, limit: int = GIVEN_LIMIT) -> str:
    """``repr(value)`` cut to about ``limit`` characters, without rendering more than that.

    Error messages quote what the user gave; a value can be huge (a YAML anchor bomb, a 5,000-digit int, a
    tensor), so the repr is built piece by piece and stops once it is long enough.
    """
    out: list[str] = []
    _short_into(value, out, limit, depth=0)
    return clip("".join(out), limit)


def _short_into(value: Any, out: list[str], limit: int, depth: int) -> None:
    used = sum(map(len, out))
    if used > limit:
        return
    if isinstance(value, (dict, list, tuple, set, frozenset)) and depth < 8:
        items = list(value.items()) if isinstance(value, dict) else value
        ends = "{}" if isinstance(value, (dict, set, frozenset)) else "[]" if isinstance(value, list) else "()"
        out.append(ends[0])
        for i, item in enumerate(items):
            if sum(map(len, out)) > limit:
                out.append("...")
                break
            if i:
                out.append(", ")
            if isinstance(value, dict):
                _short_into(item[0], out, limit, depth + 1)
                out.append(": ")
                _short_into(item[1], out, limit, depth + 1)
            else:
                _short_into(item, out, limit, depth + 1)
        out.append(ends[1])
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        out.append(f"<an int of about {int(value.bit_length() * 0.30103)} digits>")
    elif isinstance(value, (str, bytes)) and len(value) > limit:
        out.append(repr(value[: limit // 2]) + f"... ({len(value):,} {'characters' if isinstance(value, str) else 'bytes'})")
    elif isinstance(value, (dict, list, tuple, set, frozenset)):
        out.append("...")
    else:
        try:
            text = repr(value)
        except Exception:  # a hostile __repr__ must not replace the error being reported
            text = f"<{type(value).__name__}>"
        out.append(text if len(text) <= limit else text[:limit] + "...")


def _kind_flag(kind: str) -> str:
    return f" --kind {kind}" if kind in ("encoder", "decoder", "adapter", "projection", "preset") else ""


_BY_KIND = {"config": ConfigError, "unknown": UnknownComponentError, "incompatible": IncompatibleComponentsError,
            "plugin": PluginError}


def error_for(problems: Sequence[Problem], *, source: str | None = None) -> SpliceError:
    """One exception for a list of problems: the subclass of the first problem, every problem in the message."""
    return _BY_KIND.get(problems[0].error, ConfigError)(problems, source=source)

"""The errors splice raises for user mistakes.

Every message says what was given, what was expected, and how to fix it. Internal invariants use
``assert``; anything a user can cause is one of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


class SpliceError(Exception):
    """Base class of every error splice raises for bad input."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a spec or config: where, what was given, what was expected, the fix."""

    path: str
    message: str
    given: Any = None
    expected: str = ""
    fix: str = ""

    def __str__(self) -> str:
        parts = [f"{self.path or '<root>'}: {self.message}"]
        if self.given is not None:
            parts.append(f"given {self.given!r}")
        if self.expected:
            parts.append(f"expected {self.expected}")
        line = "; ".join(parts)
        if self.fix:
            line += f"\n    fix: {self.fix}"
        return line


class ConfigError(SpliceError):
    """A spec or component config is malformed. Holds every problem found, not only the first."""

    def __init__(self, problems: Sequence[Problem] | str, *, source: str | None = None):
        if isinstance(problems, str):
            problems = [Problem(path="", message=problems)]
        self.problems = list(problems)
        self.source = source
        head = f"{len(self.problems)} problem(s)" + (f" in {source}" if source else "")
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class UnknownComponentError(SpliceError):
    """A name that no plugin registered; the message lists close matches."""

    def __init__(self, kind: str, name: str, known: Sequence[str], *, path: str | None = None):
        import difflib

        self.kind, self.name, self.path = kind, name, path
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
        where = f"{path}: " if path else ""
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "no close match"
        msg = (
            f"{where}unknown {kind} {name!r}; {hint}\n"
            f"    fix: use one of the registered {kind}s (`splice list --kind {kind}`), "
            f"or install the plugin that provides it"
        )
        self.suggestions = close
        super().__init__(msg)


class IncompatibleComponentsError(SpliceError):
    """Two components that cannot be joined as asked (widths, heads, vocabulary, positions)."""


class CheckpointError(SpliceError):
    """A checkpoint that cannot be read or does not fit the model: names the file and the tensor."""


class PluginError(SpliceError):
    """A plugin broke a rule of the plugin API (for example two plugins registering one name)."""


class InputError(SpliceError):
    """Tensors passed at run time that do not fit the model (shape, dtype, image size, token ids)."""

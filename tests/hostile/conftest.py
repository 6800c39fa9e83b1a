"""The hostile-input harness: every case must end in a result or one clear ``SpliceError``, within a time bound.

``hostile.check(case, fn)`` runs ``fn()`` under a wall-clock alarm and sorts the outcome:

- **ok**: it returned (the input was legitimate, or handled);
- **clean**: it raised a ``SpliceError`` whose message is bounded and says how to fix it, and every ``Problem``
  it carries has a path and a fix line;
- **escape**: any other exception, or a ``SpliceError`` without a fix / path / with an unbounded message;
- **hang**: it ran past its time bound.

Escapes and hangs fail the test. The counts of every group are printed at the end of the run (and written to
``$SPLICE_HOSTILE_REPORT`` as JSON when set): ``docs/reliability.md`` quotes them.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter, defaultdict
from typing import Any, Callable

import pytest

from splice.core.errors import SpliceError

MESSAGE_LIMIT = 4000  # characters: an error message is read by a person
TALLY: dict[str, Counter] = defaultdict(Counter)


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` in the code under test swallows it."""


def quality(exc: SpliceError) -> str | None:
    """What is wrong with a SpliceError as a message for a person, or None."""
    text = str(exc)
    if len(text) > MESSAGE_LIMIT:
        return f"message of {len(text):,} characters"
    for p in exc.problems:
        if p.path == "" and len(exc.problems) > 1:
            return f"a problem without a path: {p}"
        if not p.fix and "fix:" not in p.message and "fix:" not in text:
            return f"a problem without a fix: {p}"
    return None


class Hostile:
    def __init__(self, group: str):
        self.group = group

    def check(self, case: str, fn: Callable[[], Any], *, seconds: float = 30.0, expect: str | None = None) -> Any:
        """Run one case; return its result or the SpliceError it raised. ``expect``: "ok" or "error" if known."""
        outcome, value = self._run(fn, seconds)
        TALLY[self.group]["cases"] += 1
        TALLY[self.group][outcome] += 1
        if outcome == "hang":
            pytest.fail(f"{case}: ran past {seconds:g} s")
        if outcome == "escape":
            raise AssertionError(f"{case}: not a clean SpliceError: {type(value).__name__}: {str(value)[:2000]}") from (
                value if isinstance(value, BaseException) else None
            )
        if expect == "ok" and outcome != "ok":
            raise AssertionError(f"{case}: expected it to work, got {type(value).__name__}: {value}")
        if expect == "error" and outcome != "clean":
            raise AssertionError(f"{case}: expected a SpliceError, it returned {value!r:.300}")
        return value

    def _run(self, fn: Callable[[], Any], seconds: float) -> tuple[str, Any]:
        def alarm(signum, frame):
            raise Hang()

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return "ok", fn()
        except Hang:
            return "hang", None
        except SpliceError as exc:
            bad = quality(exc)
            return ("escape", AssertionError(f"{bad} in {type(exc).__name__}: {str(exc)[:1000]}")) if bad else ("clean", exc)
        except Exception as exc:
            return "escape", exc
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


@pytest.fixture
def hostile(request) -> Hostile:
    """A Hostile counting under the test module's name (specs, checkpoint, runtime, cli, plugins)."""
    return Hostile(request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"))


def pytest_terminal_summary(terminalreporter):
    if not TALLY:
        return
    terminalreporter.section("hostile inputs")
    for group, c in sorted(TALLY.items()):
        terminalreporter.write_line(
            f"{group:<12} {c['cases']:>6} cases: {c['ok']:>5} handled, {c['clean']:>5} clean errors, "
            f"{c['escape']:>3} escapes, {c['hang']:>3} hangs"
        )
    report = os.environ.get("SPLICE_HOSTILE_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({g: dict(c) for g, c in TALLY.items()}, f, indent=2)

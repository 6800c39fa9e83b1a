"""A component's config, checked: every failure (including a plugin's own fault) becomes a ``Problem``.

Used by the composer (spec values) and by pretrained sources (the values a checkpoint's config.json implies), so
both report a bad value the same way, with the path, the plugin and a fix.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from splice.core.errors import Problem, SpliceError, clip
from splice.core.registry import Entry
from splice.core.spec import problems_from_validation


def checked_config(entry: Entry, values: Any, path: str, problems: list[Problem]) -> BaseModel | None:
    """``entry.config_cls`` validated from ``values``; every failure becomes a Problem at ``path``.

    A validator that raises anything but pydantic's own errors is a fault of the plugin, and is reported so."""
    try:
        return entry.config_cls.model_validate(values)
    except ValidationError as exc:
        problems.extend(problems_from_validation(exc, prefix=path, model=entry.config_cls,
                                                 describe=f"`splice describe {entry.name}`"))
    except SpliceError as exc:
        problems.extend(placed(exc, path))
    except Exception as exc:  # noqa: BLE001 - a plugin's validator broke; say whose
        problems.append(plugin_fault(entry, path, "its config class", exc))
    return None


def plugin_fault(entry: Entry, path: str, where: str, exc: BaseException) -> Problem:
    """A Problem for an exception a plugin raised where it should have returned or raised a SpliceError."""
    return Problem(
        path,
        f"{entry.kind} {entry.name!r} from plugin {entry.plugin!r}{f' (package {entry.dist!r})' if entry.dist else ''} "
        f"failed in {where}: "
        f"{type(exc).__name__}: {clip(str(exc), 300)}",
        expected="a built component, or a SpliceError naming the problem",
        fix=f"report this to the author of plugin {entry.plugin!r}, or pick another {entry.kind}; "
        f"SPLICE_DISABLE_PLUGINS={entry.plugin} switches it off",
        error="plugin",
    )


def placed(exc: SpliceError, path: str) -> list[Problem]:
    """The problems of a SpliceError, each given ``path`` when it had none, and a fix line when it had none."""
    out = []
    for p in exc.problems:
        fix = p.fix or ("" if "fix:" in p.message else "see the message")
        message = f"{exc.source}: {p.message}" if exc.source else p.message
        out.append(Problem(p.path or path, message, given=p.given, expected=p.expected, fix=fix, error=p.error))
    return out

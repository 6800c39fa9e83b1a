"""The parity tests mean something only against the pinned oracle: a venv with other versions says so here,
instead of as a parity failure somewhere else."""
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints" / "test.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints/test.txt: {line!r} is not an exact pin (name==version)"
            pins[name.strip()] = pinned.strip()
    return pins


def test_the_oracle_is_pinned():
    pins = _pins()
    assert "transformers" in pins
    assert "torch" not in pins, "torch comes from the machine's own build (see the Makefile)"


@pytest.mark.parametrize("name", sorted(_pins()))
def test_installed_version_matches_the_pin(name):
    try:
        have = version(name)
    except PackageNotFoundError:
        pytest.fail(f"{name} is pinned in constraints/test.txt but not installed; run `make clean test`")
    assert have == _pins()[name], (
        f"{name} {have} is installed but the tests are pinned to {_pins()[name]} (constraints/test.txt); "
        f"run `make clean test` for the pinned stack, or move the pin in its own commit")

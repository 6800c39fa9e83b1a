"""Shared fixtures. The third-party fixture plugins (tests/fixtures/splice_toyconv, splice_tinyllama) are installed into the venv
by the test setup (`make test`); if it is missing we install them here, so a bare `pytest` works too."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for dist, folder in (("splice-toyconv", "splice_toyconv"), ("splice-tinyllama", "splice_tinyllama"),
                         ("splice-starter", "splice_starter")):
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                 str(FIXTURES / folder)],
                check=True,
            )
            importlib.invalidate_caches()


@pytest.fixture
def fresh_registry(monkeypatch):
    """Reload plugins for this test (after changing SPLICE_DISABLE_PLUGINS or sys.path), and again after it."""
    from splice.core.plugins import reset_registry

    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def no_entry_points(monkeypatch, fresh_registry):
    """Only the built-in plugins: switches every entry-point plugin off."""
    monkeypatch.setenv("SPLICE_DISABLE_PLUGINS", "all-external")
    from splice.core.plugins import reset_registry

    reset_registry()
    yield

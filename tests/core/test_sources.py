"""The one source resolver (issue 13): what a source names, without the network, and the errors it gives."""

from __future__ import annotations

import pytest

from splice.core.errors import CheckpointError
from splice.core.sources import fetch, parse


def test_a_local_path_a_hub_id_and_neither(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    assert parse(str(tmp_path / "model")).path == tmp_path / "model"
    hub = parse("owner/name@v2")
    assert (hub.repo, hub.revision, hub.path) == ("owner/name", "v2", None)
    assert parse("owner/name", revision="main").revision == "main"
    assert parse("model/missing").repo is None  # `model` is a local folder: a missing local path, not a hub id
    assert parse("./a/b").repo is None and parse("nothing-here").repo is None
    with pytest.raises(CheckpointError, match="no such file or folder"):
        fetch(parse("nothing-here"), what="pretrained source")


@pytest.mark.parametrize("bad", [None, 42, "a\x00b", "p" * 5000])
def test_what_is_not_a_source_is_refused_with_a_fix(bad):
    with pytest.raises(CheckpointError, match="fix:"):
        parse(bad)


def test_a_hub_id_offline_names_the_cache(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="not in the local cache"):
        fetch(parse("nobody/nothing"), what="cannot load")

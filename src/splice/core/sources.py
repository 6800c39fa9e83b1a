"""Where a model, or a component's weights, come from: a local path or a hub id ``owner/name[@revision]``.

The one resolver behind ``splice.load``, ``splice caption``, ``splice train MODEL`` and warm start (a spec's
``pretrained:``; a preset's ``pretrained: true`` names one of these too). ``parse`` says what a source is without
touching the network; ``fetch`` turns it into a local path, downloading from the hub only what splice reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from splice.core.errors import CheckpointError, clip, short

HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "pytorch_model*.bin"]  # not TensorFlow/Flax extras
MAX_SOURCE = 4096  # characters: longer than any path a file system takes


@dataclass(frozen=True)
class Source:
    text: str
    path: Path | None = None  # an existing local file or folder
    repo: str | None = None  # a hub id
    revision: str | None = None


def parse(value: object, *, revision: str | None = None, what: str = "source") -> Source:
    """What ``value`` names: an existing local path, a hub id (``owner/name``, ``@revision`` optional), or neither."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str) or "\x00" in text or len(text) > MAX_SOURCE:
        raise CheckpointError(f"{what} {short(value)}: not a path or a hub id\n    expected: a folder, or a hub repo "
                              "id (owner/name)\n    fix: pass the folder that model.save_pretrained wrote")
    path = Path(os.path.expanduser(text))
    try:
        if path.exists():
            return Source(text, path=path)
    except OSError as exc:  # a name too long for the file system, a loop of links, no permission
        raise CheckpointError(f"{what} {short(text)}: cannot be used as a path ({exc.strerror or exc})\n"
                              "    fix: check the path") from None
    repo, _, rev = text.partition("@") if "@" in text else (text, "", "")
    if is_hub_id(repo):
        return Source(text, repo=repo, revision=revision or rev or None)
    return Source(text)


def is_hub_id(text: str) -> bool:
    """``owner/name``, unless ``owner`` is a local folder (then it is a missing local path)."""
    return (text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))
            and not Path(text.split("/")[0]).is_dir())


def fetch(source: Source, *, what: str = "source", config_only: bool = False) -> Path:
    """A local path for the source: the path itself, or the hub snapshot (``config.json`` alone when
    ``config_only``: its folder is returned)."""
    if source.path is not None:
        return source.path
    if source.repo is None:
        raise CheckpointError(f"{what} {short(source.text)}: no such file or folder\n    fix: check the path")
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if config_only:
            return Path(hf_hub_download(source.repo, "config.json", revision=source.revision)).parent
        return Path(snapshot_download(source.repo, revision=source.revision, allow_patterns=HUB_FILES))
    except Exception as exc:  # noqa: BLE001 - every hub failure is the same thing to the user: no such source here
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = ("it is not in the local cache (HF_HUB_OFFLINE is set)" if offline
                else "it is not a local folder, and the hub could not provide it")
        raise CheckpointError(
            f"{what} {short(source.text)}: {hint} ({type(exc).__name__}: {clip(str(exc), 200)})\n"
            "    fix: check the path or repo id; offline, download it once with network access "
            "(then HF_HUB_OFFLINE=1 uses the cache)"
        ) from None

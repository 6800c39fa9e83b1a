"""Files on disk, under everything else: folders written atomically, checksums, names kept inside a folder.

A save never deletes what it did not write. It builds the new folder beside the target and swaps the two in one
step (Linux: ``renameat2(RENAME_EXCHANGE)``), so the target path always holds a whole checkpoint, old or new.
It replaces an existing folder only when that folder is one splice wrote (it holds the kind's marker file and
nothing but the names splice writes there). Saves to one target are serialised by a lock beside it. Each save
first removes what a killed save to the same target left behind, and it fsyncs the files and both folders.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

from splice.core.errors import CheckpointError, short

try:
    import fcntl
except ImportError:  # not POSIX: saves to one target are not serialised
    fcntl = None

# the marks of splice's own temporary folders beside a target (the first two: splice 0.1's names)
_LEFTOVER_TAGS = (".tmp-", ".old-", ".splice-tmp-", ".splice-old-")


def inside(folder: Path, name: object, *, what: str) -> Path:
    """``folder / name`` for a plain file name that a folder's own metadata gives; anything that could lead
    elsewhere (an absolute path, ``..``, a separator) is refused. Symbolic links inside the folder are followed,
    as the hub's cache is made of them."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name
            or os.path.isabs(name) or len(name) > 255):
        raise CheckpointError(
            f"{what} names {short(name, 120)}, which is not a file inside {folder}\n"
            "    expected: a plain file name in the same folder\n"
            "    fix: the folder's metadata was edited or made elsewhere; download or save it again")
    return folder / name


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in large blocks (hashlib releases the GIL while it hashes)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        view = memoryview(buf)
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


def describe_files(folder: Path) -> dict[str, dict]:
    """``{name: {"bytes": size, "sha256": digest}}`` for the regular files of a folder."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file()}


def verify_files(folder: Path, listed: object, *, source: str, check_hash: bool = True) -> None:
    """Check a folder's files against the ``{name: {bytes, sha256}}`` record written with them."""
    if not isinstance(listed, dict):
        raise CheckpointError(f"{source}: `files` is {type(listed).__name__}, expected a mapping of file name to "
                              "size and checksum\n    fix: save the model again")
    for name, info in listed.items():
        path = inside(folder, name, what=f"{source}: `files`")
        if not isinstance(info, dict) or type(info.get("bytes")) is not int or not isinstance(info.get("sha256"), str):
            raise CheckpointError(f"{source}: `files.{name}` is {short(info)}, expected {{bytes: int, sha256: str}}\n"
                                  "    fix: save the model again")
        if not path.is_file():
            what = "missing" if not path.exists() and not path.is_symlink() else "not a regular file"
            raise CheckpointError(f"{path}: listed in {source} but {what}\n    fix: copy or download the whole folder")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, but {info['bytes']} were saved: the file is truncated or corrupted\n"
                                  "    fix: copy or download the folder again")
        if check_hash and sha256_file(path) != info["sha256"]:
            raise CheckpointError(
                f"{path}: its SHA-256 differs from the one saved with it: the file is corrupted or was changed\n"
                "    fix: copy or download the folder again (or load with verify=False to skip the check)")


# -- writing a folder ------------------------------------------------------------------------------------


def write_folder(target: str | os.PathLike, fill: Callable[[Path], None], *, marker: str, owned: Iterable[str],
                 what: str = "checkpoint") -> None:
    """Write a folder through ``fill(tmp)`` and put it at ``target`` in one step.

    ``target`` may exist only as an empty folder or as a folder splice wrote: ``marker`` is in it and every
    entry is a file named in ``owned``. Anything else there is the user's, and the save is refused.
    """
    target = Path(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _disk_error(exc, target, what) from None
    with _locked(parent, target.name):
        _remove_leftovers(parent, target.name)
        _check_replaceable(target, marker, set(owned), what)
        tmp = parent / f".{target.name}.splice-tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            fill(tmp)
            for f in tmp.iterdir():
                _fsync(f)
            _fsync(tmp)
            _install(tmp, target)
            _fsync(parent)
        except BaseException as exc:  # Ctrl-C included: nothing half written stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
                raise _disk_error(exc, target, what) from None
            raise


def _disk_error(exc: BaseException, target: Path, what: str) -> CheckpointError:
    code = getattr(exc, "errno", None)
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.EFBIG: "the file is larger than allowed"}.get(code)
    if reason is None and "No space left" in str(exc):
        reason = "the disk is full"
    detail = reason or f"{type(exc).__name__}: {exc}"
    return CheckpointError(
        f"cannot save the {what} to {target}: {detail}\n"
        f"    nothing was changed at {target} (a {what} already there is intact)\n"
        "    fix: free space, or save to a folder you can write to")


def _check_replaceable(target: Path, marker: str, owned: set[str], what: str) -> None:
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise CheckpointError(f"cannot save the {what} to {target}: it exists and is not a folder\n"
                              "    fix: choose another path, or remove it yourself")
    entries = sorted(target.iterdir())
    if not entries:
        return
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries
               if p.name not in owned or p.is_symlink() or not p.is_file()]
    if not foreign and (target / marker).is_file():
        return
    listed = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
    why = f"it holds files splice did not write ({listed})" if foreign else f"it is not a splice {what} (no {marker})"
    raise CheckpointError(
        f"cannot save the {what} to {target}: {why}\n"
        "    expected: a new or empty folder, or one that an earlier save wrote (it is replaced whole)\n"
        "    fix: save into a new folder, or move those files out first")


def _remove_leftovers(parent: Path, name: str) -> None:
    """Temporary folders of earlier saves to this target that were killed before they could clean up."""
    prefixes = tuple(f".{name}{tag}" for tag in _LEFTOVER_TAGS)
    with contextlib.suppress(OSError):
        for p in parent.iterdir():
            if p.name.startswith(prefixes) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


def _install(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):  # target now holds the new folder, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # no atomic exchange here: two renames, with a moment where target is absent (its old copy is at `old`)
    old = target.parent / f".{target.name}.splice-old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync(path: Path) -> None:
    if path.is_dir() and os.name != "posix":
        return  # folders cannot be opened for fsync there
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(parent: Path, name: str) -> Iterator[None]:
    """One save at a time to ``parent/name``: a lock file beside it, removed when the save ends."""
    if fcntl is None:
        yield
        return
    lock = parent / f".{name}.splice-lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise _disk_error(exc, parent / name, "checkpoint") from None
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a save already running
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False  # the previous holder removed it after we opened it: lock the new one
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)

"""Files on disk: the one way tlearn writes a file (whole or not at all) and the one way it digests one."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tlearn.errors import OutputError

# what a disk answers when it will not take a file: full, over quota, read-only, not permitted, too large, failing
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO})


def cache_root() -> Path:
    """$TLEARN_CACHE, else $XDG_CACHE_HOME/tlearn, else ~/.cache/tlearn."""
    if os.environ.get("TLEARN_CACHE"):
        return Path(os.environ["TLEARN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "tlearn"


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (the GIL is released while hashing)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@contextmanager
def disk_refusals(path: str | Path, option: str | None = None) -> Iterator[None]:
    """An OSError of the disk under `path` (DISK_ERRNOS) raised inside as one OutputError that names `path` and the
    `option` that chose it: the one way every output reports a full or read-only disk."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS or not _about(exc, Path(path).parent):
            raise
        given = f" ({option})" if option else ""
        instead = f"choose another {option}" if option else "choose another place"
        raise OutputError(f"cannot write {path}{given}: {exc.strerror or exc}; nothing was left there: free some "
                          f"space, or {instead}") from None


def _about(exc: OSError, folder: Path) -> bool:
    """Whether `exc` concerns a file under `folder` (a write's ENOSPC names no file): not some other file's trouble,
    such as an input that cannot be read."""
    if exc.filename is None:
        return True
    try:
        return Path(os.path.abspath(os.fsdecode(exc.filename))).is_relative_to(os.path.abspath(folder))
    except (TypeError, ValueError):
        return False


@contextmanager
def temporary_beside(path: str | Path, option: str | None = None) -> Iterator[str]:
    """A temporary file name next to `path` (same file system, so a rename onto `path` is atomic), readable by
    others (0644, not mkstemp's 0600: model folders and caches are shared), removed on exit if still there. A disk
    that refuses it (full, read-only) is an OutputError naming `path` and `option` (see disk_refusals)."""
    path = Path(path)
    tmp = None
    try:
        with disk_refusals(path, option):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            os.chmod(tmp, 0o644)
            yield tmp
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_atomically(path: str | Path, write: Callable[[str], object], option: str | None = None) -> Path:
    """Call `write(temporary name)`, then rename it onto `path`: readers see the old file or the new, never half."""
    with temporary_beside(path, option) as tmp:
        write(tmp)
        os.replace(tmp, path)
    return Path(path)


def fsync_tree(folder: Path) -> None:
    """Files made readable by all (0644) and flushed to disk, then the folder itself."""
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            os.chmod(path, 0o644)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def swap_in(staging: Path, target: Path) -> None:
    """Put `staging` at `target`. An existing target is exchanged with it in one renameat2 call (Linux), so a
    kill at any moment leaves either the old model or the new one there; the old one is then removed."""
    if not target.exists():
        os.rename(staging, target)
        return
    if not _exchange(staging, target):  # not Linux, or a file system without RENAME_EXCHANGE
        old = staging.with_name(staging.name.replace(".new-", ".old-"))
        os.rename(target, old)
        os.rename(staging, target)
        staging = old
    shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0

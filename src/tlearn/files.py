"""Files on disk: the one way tlearn writes a file (whole or not at all) and the one way it digests one."""
from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (the GIL is released while hashing)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@contextmanager
def temporary_beside(path: str | Path) -> Iterator[str]:
    """A temporary file name next to `path` (same file system, so a rename onto `path` is atomic), readable by
    others (0644, not mkstemp's 0600: model folders and caches are shared), removed on exit if still there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomically(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(temporary name)`, then rename it onto `path`: readers see the old file or the new, never half."""
    with temporary_beside(path) as tmp:
        write(tmp)
        os.replace(tmp, path)
    return Path(path)

"""On-disk cache of pooled backbone features, keyed by (backbone key, file content hash).

SQLite gives atomic commits (a killed run loses at most the batch in flight) and safe concurrent readers;
vectors are stored as raw float32 bytes with a checksum, never pickled. Nothing read back is trusted blindly:
a vector whose checksum does not match, or that is not finite, counts as absent and is computed again; a
database that is not one any more is moved aside and started afresh (it is derived data); a folder that cannot
be used is a TlearnError that names it.
"""
from __future__ import annotations

import hashlib
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tlearn.errors import TlearnError
from tlearn.files import cache_root, sha256_file, write_atomically

DATABASE = "features.sqlite"


def default_cache_dir() -> Path:
    """$TLEARN_CACHE, else $XDG_CACHE_HOME/tlearn, else ~/.cache/tlearn."""
    return cache_root()


class CacheError(TlearnError):
    """The cache folder cannot be used (not a folder, read-only, disk full)."""


class FeatureCache:
    """Feature vectors of one backbone configuration (`key`), stored under `directory`."""

    def __init__(self, key: str, directory: Path | None = None):
        self.key = key
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        with self._failing_as_cache_error("open"):
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                self._db = _open(self.directory / DATABASE)
            except sqlite3.DatabaseError as exc:  # truncated or overwritten: derived data, start again
                if isinstance(exc, sqlite3.OperationalError):  # locked, read-only, disk full: not damage
                    raise
                aside = self.directory / f"{DATABASE}.damaged-{int(time.time())}"
                (self.directory / DATABASE).rename(aside)
                print(f"the feature cache {self.directory / DATABASE} was damaged ({exc}); moved to {aside.name} "
                      "and started afresh", file=sys.stderr)
                self._db = _open(self.directory / DATABASE)

    def get_many(self, hashes: list[str]) -> dict[str, np.ndarray]:
        """The cached vectors among `hashes` whose checksum matches and that are finite and not all zero."""
        found = {}
        for content, blob, check in self._select("content, vector, checksum", "vectors", hashes):
            vector = np.frombuffer(blob, dtype=np.float32)
            if check == _checksum(blob) and np.isfinite(vector).all() and vector.any():
                found[content] = vector
        return found

    def put_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        rows = []
        for h, v in items:
            blob = np.ascontiguousarray(v, dtype=np.float32).tobytes()
            rows.append((self.key, h, blob, _checksum(blob)))
        with self._failing_as_cache_error("write to"), self._db:
            self._db.executemany("INSERT OR REPLACE INTO vectors (model, content, vector, checksum) "
                                 "VALUES (?, ?, ?, ?)", rows)

    def failures(self, hashes: list[str]) -> dict[str, str]:
        """The reasons files among `hashes` could not be decoded, as recorded by put_failures."""
        return dict(self._select("content, reason", "failures", hashes))

    def put_failures(self, items: list[tuple[str, str]]) -> None:
        with self._failing_as_cache_error("write to"), self._db:
            self._db.executemany("INSERT OR REPLACE INTO failures (model, content, reason) VALUES (?, ?, ?)",
                                 [(self.key, h, reason) for h, reason in items])

    def backbone_state(self) -> dict[str, np.ndarray] | None:
        """The backbone tensors stored with these features by `put_backbone_state`, or None (also when the file
        no longer matches the SHA-256 recorded beside it)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = self._backbone_file()
        try:
            if sha256_file(path) != path.with_suffix(".sha256").read_text().strip():
                return None
            return load_file(path)
        except (FileNotFoundError, SafetensorError, OSError, ValueError):
            return None

    def has_backbone_state(self) -> bool:
        """Whether backbone tensors were kept here (not checked: `backbone_state` checks them)."""
        return self._backbone_file().is_file()

    def put_backbone_state(self, state: dict[str, np.ndarray]) -> None:
        """Keep the backbone's tensors beside its features: a re-train on cached features then builds no network."""
        from safetensors.numpy import save_file

        path = self._backbone_file()
        if self.backbone_state() is None:
            with self._failing_as_cache_error("write to"):
                write_atomically(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                                                             tmp))
                write_atomically(path.with_suffix(".sha256"), lambda tmp: Path(tmp).write_text(sha256_file(path)))

    def _select(self, columns: str, table: str, hashes: list[str]):
        unique = sorted(set(hashes))
        with self._failing_as_cache_error("read"):
            for start in range(0, len(unique), 500):
                chunk = unique[start:start + 500]
                yield from self._db.execute(f"SELECT {columns} FROM {table} WHERE model = ? AND content IN "
                                            f"({','.join('?' * len(chunk))})", [self.key, *chunk]).fetchall()

    def _backbone_file(self) -> Path:
        # The tensor names are timm's: another timm version may name them differently.
        from importlib.metadata import PackageNotFoundError, version

        try:
            timm = version("timm")
        except PackageNotFoundError:
            timm = "none"
        return self.directory / "backbones" / f"{self.key}-timm{timm}.safetensors"

    @contextmanager
    def _failing_as_cache_error(self, verb: str):
        try:
            yield
        except (OSError, sqlite3.OperationalError) as exc:
            raise CacheError(f"cannot {verb} the feature cache in {self.directory} ({exc}); choose another folder "
                             "with --cache-dir or $TLEARN_CACHE") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS vectors (model TEXT NOT NULL, content TEXT NOT NULL, "
               "vector BLOB NOT NULL, checksum TEXT NOT NULL, PRIMARY KEY (model, content))")
    # files that could not be decoded: remembered too, so a dataset with a bad file still re-trains from cache
    db.execute("CREATE TABLE IF NOT EXISTS failures (model TEXT NOT NULL, content TEXT NOT NULL, "
               "reason TEXT NOT NULL, PRIMARY KEY (model, content))")
    return db


def _checksum(blob: bytes) -> str:
    return hashlib.blake2b(blob, digest_size=8).hexdigest()

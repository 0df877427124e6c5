"""On-disk cache of pooled backbone features, keyed by (backbone key, file content hash).

SQLite gives atomic commits (a killed run loses at most the batch in flight) and safe concurrent readers;
vectors are stored as raw float32 bytes with a checksum, never pickled. The cache is derived data, and nothing read
back is trusted blindly:
- a vector whose checksum does not match, or that is not finite, counts as absent and is computed again;
- a database that is damaged (a torn write or a bad sector anywhere in it, found by SQLite's quick check when it is
  opened or by any later read), is not SQLite any more, or was written by another cache version is moved aside with
  its WAL and started afresh, with a warning;
- a disk that refuses to store more (full, read-only, an I/O error) costs the cache, not the run: a warning, and
  the run goes on without storing (reading what the cache held, where it still can);
- only a --cache-dir that is not a folder is an error (CacheError), which names it.
"""
from __future__ import annotations

import atexit
import hashlib
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tlearn.errors import TlearnError
from tlearn.files import cache_root, sha256_file, write_atomically

DATABASE = "features.sqlite"
CACHE_VERSION = 1  # PRAGMA user_version of the database; another value: written by another layout, started afresh
SCHEMA = {"vectors": ("model", "content", "vector", "checksum"), "failures": ("model", "content", "reason")}


def default_cache_dir() -> Path:
    """$TLEARN_CACHE, else $XDG_CACHE_HOME/tlearn, else ~/.cache/tlearn."""
    return cache_root()


class CacheError(TlearnError):
    """The cache folder cannot be used (not a folder)."""


class StaleCache(Exception):
    """A database file that is not this cache's any more: damaged, not SQLite, or of another version."""


class FeatureCache:
    """Feature vectors of one backbone configuration (`key`), stored under `directory`."""

    def __init__(self, key: str, directory: Path | None = None):
        self.key = key
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.path = self.directory / DATABASE
        self.storing = True  # False once the disk refused a write (or the cache could not be opened for writing)
        self._scratch: Path | None = None
        if self.directory.exists() and not self.directory.is_dir():
            raise CacheError(f"cannot open the feature cache in {self.directory}: it is not a folder; choose "
                             "another folder with --cache-dir or $TLEARN_CACHE")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._db = self._open_checked()
        except (OSError, sqlite3.OperationalError) as exc:  # read-only, full, or not ours to write
            self._db = _open_read_only(self.path) or _open(":memory:")
            self.stop_storing(exc)

    def _open_checked(self) -> sqlite3.Connection:
        try:
            return _open(self.path, check=True)
        except StaleCache as stale:
            self._move_aside(str(stale))
            return _open(self.path)

    def _move_aside(self, why: str) -> None:
        """The database and its WAL (which must never be replayed onto a fresh one) moved aside, with a warning."""
        aside = self.directory / f"{DATABASE}.damaged-{int(time.time())}"
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{self.path}{suffix}")
            if part.exists():
                part.rename(f"{aside}{suffix}")
        _warn(f"the feature cache {self.path} {why}; moved to {aside.name} and started afresh (its features are "
              "computed again)")

    @property
    def engines(self) -> Path:
        """Where exported engines are kept: beside the features, or, once the disk refused a write, a temporary
        folder of this process (removed at exit; a model folder copies its engine before)."""
        if self.storing:
            return self.directory / "engines"
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="tlearn-engines-"))
            atexit.register(shutil.rmtree, self._scratch, True)
        return self._scratch

    def stop_storing(self, exc: BaseException) -> None:
        """Go on without storing anything more here (one warning): the disk refused a write."""
        if self.storing:
            self.storing = False
            _warn(f"the feature cache in {self.directory} cannot store features ({exc}): going on without storing "
                  "them (a next run computes them again); free space there, or choose another folder with "
                  "--cache-dir or $TLEARN_CACHE")

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
        self._write("INSERT OR REPLACE INTO vectors (model, content, vector, checksum) VALUES (?, ?, ?, ?)", rows)

    def failures(self, hashes: list[str]) -> dict[str, str]:
        """The reasons files among `hashes` could not be decoded, as recorded by put_failures."""
        return dict(self._select("content, reason", "failures", hashes))

    def put_failures(self, items: list[tuple[str, str]]) -> None:
        self._write("INSERT OR REPLACE INTO failures (model, content, reason) VALUES (?, ?, ?)",
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
        if self.storing and self.backbone_state() is None:
            try:
                write_atomically(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                                                             tmp))
                write_atomically(path.with_suffix(".sha256"), lambda tmp: Path(tmp).write_text(sha256_file(path)))
            except OSError as exc:
                self.stop_storing(exc)

    def _select(self, columns: str, table: str, hashes: list[str]) -> list[tuple]:
        unique, rows = sorted(set(hashes)), []
        try:
            for start in range(0, len(unique), 500):
                chunk = unique[start:start + 500]
                rows += self._db.execute(f"SELECT {columns} FROM {table} WHERE model = ? AND content IN "
                                         f"({','.join('?' * len(chunk))})", [self.key, *chunk]).fetchall()
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):  # locked past the timeout, an I/O error: as if nothing were cached
                _warn(f"cannot read the feature cache {self.path} ({exc}): computing the features again")
                return []
            self._start_afresh(exc)
            return []
        return rows

    def _write(self, statement: str, rows: list[tuple]) -> None:
        if not self.storing or not rows:
            return
        for attempt in (1, 2):
            try:
                with self._db:
                    self._db.executemany(statement, rows)
                return
            except sqlite3.DatabaseError as exc:
                if not _is_damage(exc) or attempt == 2:
                    self.stop_storing(exc)
                    return
                self._start_afresh(exc)
            except OSError as exc:
                self.stop_storing(exc)
                return

    def _start_afresh(self, exc: BaseException) -> None:
        """A database found damaged while in use: moved aside, and a fresh one opened in its place."""
        self._db.close()
        try:
            self._move_aside(f"is damaged ({exc})")
            self._db = _open(self.path)
        except (OSError, sqlite3.Error) as error:
            self._db = _open(":memory:")
            self.stop_storing(error)

    def _backbone_file(self) -> Path:
        # The tensor names are timm's: another timm version may name them differently.
        from importlib.metadata import PackageNotFoundError, version

        try:
            timm = version("timm")
        except PackageNotFoundError:
            timm = "none"
        # v2: with the ImageNet classifier's tensors (files without them would hide it from a re-train)
        return self.directory / "backbones" / f"{self.key}-timm{timm}-v2.safetensors"

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(path: Path | str, check: bool = False) -> sqlite3.Connection:
    """The cache database at `path`, its tables made if absent. With `check`: StaleCache when the file is damaged
    (SQLite's quick check, which reads every page: ~0.1 s per 50 MB), not SQLite, or of another CACHE_VERSION."""
    db = sqlite3.connect(path, timeout=60)
    try:
        if check:
            _check(db)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS vectors (model TEXT NOT NULL, content TEXT NOT NULL, "
                   "vector BLOB NOT NULL, checksum TEXT NOT NULL, PRIMARY KEY (model, content))")
        # files that could not be decoded: remembered too, so a dataset with a bad file still re-trains from cache
        db.execute("CREATE TABLE IF NOT EXISTS failures (model TEXT NOT NULL, content TEXT NOT NULL, "
                   "reason TEXT NOT NULL, PRIMARY KEY (model, content))")
        db.execute(f"PRAGMA user_version = {CACHE_VERSION}")
        db.commit()
    except BaseException:
        db.close()
        raise
    return db


def _check(db: sqlite3.Connection) -> None:
    try:
        verdict = db.execute("PRAGMA quick_check").fetchall()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {name: tuple(row[1] for row in db.execute(f"PRAGMA table_info({name})")) for name in SCHEMA}
    except sqlite3.DatabaseError as exc:
        if not _is_damage(exc):
            raise
        raise StaleCache(f"is not a readable database ({exc})") from None
    if verdict != [("ok",)]:
        raise StaleCache(f"is damaged ({'; '.join(str(row[0]) for row in verdict[:3])})")
    if version not in (0, CACHE_VERSION) or any(columns and columns != SCHEMA[name]
                                                for name, columns in tables.items()):
        raise StaleCache(f"was written by another version of tlearn (cache version {version}, this one writes "
                         f"{CACHE_VERSION})")


def _open_read_only(path: Path) -> sqlite3.Connection | None:
    """The database as it is, for reading only (a read-only disk or folder), or None when that fails too."""
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        _check(db)
        return db if all(db.execute(f"PRAGMA table_info({name})").fetchall() for name in SCHEMA) else None
    except (sqlite3.Error, StaleCache):
        return None


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """A fault of the file itself (malformed, not a database), not of the disk or another writer (full, read-only,
    locked, I/O), which OperationalError reports."""
    return not isinstance(exc, sqlite3.OperationalError) or "malformed" in str(exc) or "not a database" in str(exc)


_WARNED: set[str] = set()  # a train opens the cache several times (views, backbones): each warning is said once


def _warn(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


def _checksum(blob: bytes) -> str:
    return hashlib.blake2b(blob, digest_size=8).hexdigest()

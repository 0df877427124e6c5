"""On-disk cache of pooled backbone features, keyed by (backbone key, file content hash).

SQLite gives atomic commits (a killed run loses at most the batch in flight) and safe concurrent readers;
vectors are stored as raw float32 bytes, never pickled.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np

from tlearn.files import write_atomically


def default_cache_dir() -> Path:
    """$TLEARN_CACHE, else $XDG_CACHE_HOME/tlearn, else ~/.cache/tlearn."""
    if os.environ.get("TLEARN_CACHE"):
        return Path(os.environ["TLEARN_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return base / "tlearn"


class FeatureCache:
    """Feature vectors of one backbone configuration (`key`), stored under `directory`."""

    def __init__(self, key: str, directory: Path | None = None):
        self.key = key
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.directory / "features.sqlite", timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS features (model TEXT NOT NULL, content TEXT NOT NULL, "
                         "dim INTEGER NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (model, content))")
        # files that could not be decoded: remembered too, so a dataset with a bad file still re-trains from cache
        self._db.execute("CREATE TABLE IF NOT EXISTS failures (model TEXT NOT NULL, content TEXT NOT NULL, "
                         "reason TEXT NOT NULL, PRIMARY KEY (model, content))")

    def get_many(self, hashes: list[str]) -> dict[str, np.ndarray]:
        """The cached vectors among `hashes` (a vector that is not finite is treated as absent)."""
        found = {content: np.frombuffer(blob, dtype=np.float32)
                 for content, dim, blob in self._select("content, dim, vector", "features", hashes)
                 if len(blob) == 4 * dim}
        return {h: v for h, v in found.items() if np.isfinite(v).all() and v.any()}

    def failures(self, hashes: list[str]) -> dict[str, str]:
        """The reasons files among `hashes` could not be decoded, as recorded by put_failures."""
        return dict(self._select("content, reason", "failures", hashes))

    def put_failures(self, items: list[tuple[str, str]]) -> None:
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO failures (model, content, reason) VALUES (?, ?, ?)",
                                 [(self.key, h, reason) for h, reason in items])

    def _select(self, columns: str, table: str, hashes: list[str]):
        unique = sorted(set(hashes))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            yield from self._db.execute(f"SELECT {columns} FROM {table} WHERE model = ? AND content IN "
                                        f"({','.join('?' * len(chunk))})", [self.key, *chunk])

    def put_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO features (model, content, dim, vector) VALUES (?, ?, ?, ?)",
                [(self.key, h, int(v.shape[0]), np.ascontiguousarray(v, dtype=np.float32).tobytes()) for h, v in items])

    def backbone_state(self) -> dict[str, np.ndarray] | None:
        """The backbone tensors stored with these features by `put_backbone_state`, or None."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(self._backbone_file())
        except (FileNotFoundError, SafetensorError, OSError):
            return None

    def put_backbone_state(self, state: dict[str, np.ndarray]) -> None:
        """Keep the backbone's tensors beside its features: a re-train on cached features then builds no network."""
        from safetensors.numpy import save_file

        path = self._backbone_file()
        if not path.exists():
            write_atomically(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp))

    def _backbone_file(self) -> Path:
        # The tensor names are timm's: another timm version may name them differently.
        from importlib.metadata import version

        return self.directory / "backbones" / f"{self.key}-timm{version('timm')}.safetensors"

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

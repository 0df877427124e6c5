"""What identifies an image file: the SHA-256 of its bytes and a perceptual hash of its picture.

The perceptual hash (imagehash's 64-bit DCT hash of a reduced decode) finds the same photo re-encoded, resized or
lightly edited; splits keep such near-duplicates together and the doctor reports them. Both hashes, and the
reason a file cannot be decoded, are a function of the bytes alone, so they are computed once and kept in a small
SQLite table in the cache folder, keyed by content hash.
"""
from __future__ import annotations

import hashlib
import sqlite3
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import imagehash
import numpy as np

from tlearn.data.decode import DecodeError, decode_bytes, read_regular_file
from tlearn.files import cache_root

NEAR_DUPLICATE_BITS = 4  # max Hamming distance between the 64-bit perceptual hashes of near-duplicates
METHOD = "phash8-draft128-v1"  # names how `phash` is computed: a change of method must not reuse old rows
DRAFT_SIZE = (128, 128)  # JPEGs are decoded at no less than this (DCT scaling): the hash looks at 32x32


@dataclass(frozen=True)
class Fingerprint:
    sha256: str | None  # None when the file cannot be read
    phash: int | None  # None when it cannot be decoded
    problem: str | None = None  # why not, in words

    @property
    def usable(self) -> bool:
        return self.phash is not None


def fingerprint_bytes(content: bytes) -> Fingerprint:
    """The fingerprint of one file's bytes."""
    sha256 = hashlib.sha256(content).hexdigest()
    try:
        image = decode_bytes(content, draft_size=DRAFT_SIZE)
    except DecodeError as exc:
        return Fingerprint(sha256, None, exc.reason)
    return Fingerprint(sha256, int(str(imagehash.phash(image)), 16))


def fingerprint_files(paths: Sequence[Path], cache_dir: Path | None = None,
                      workers: int = 2) -> dict[Path, Fingerprint]:
    """The fingerprint of each file, keyed by path; decoded only when its content is not in the cache yet."""
    with ThreadPoolExecutor(workers) as pool:
        hashed = dict(zip(paths, pool.map(_read_hash, paths)))
        store = _Store.open(cache_dir)
        try:
            known = store.get_many([f.sha256 for f in hashed.values() if f.sha256])
            missing = {f.sha256: path for path, f in hashed.items() if f.sha256 and f.sha256 not in known}
            computed = dict(zip(missing, pool.map(_fingerprint_file, missing.values())))
            store.put_many([f for f in computed.values() if f.sha256 is not None])
        finally:
            store.close()
    known.update(computed)
    return {path: known.get(f.sha256, f) if f.sha256 else f for path, f in hashed.items()}


def near_pairs(codes: Sequence[int], max_bits: int = NEAR_DUPLICATE_BITS) -> list[tuple[int, int, int]]:
    """(i, j, bits) for every i < j whose codes differ in at most `max_bits` bits.

    Pigeonhole: split the 64 bits into max_bits + 1 bands; two codes that close agree on at least one whole band,
    so only codes sharing a band are compared (near-linear, where comparing all pairs is quadratic).
    """
    bands = max_bits + 1
    widths = [64 // bands + (b < 64 % bands) for b in range(bands)]
    candidates: set[tuple[int, int]] = set()
    shift = 0
    for width in widths:
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, code in enumerate(codes):
            buckets[(code >> shift) & ((1 << width) - 1)].append(i)
        for members in buckets.values():
            candidates.update((a, b) for k, a in enumerate(members) for b in members[k + 1:])
        shift += width
    if not candidates:
        return []
    pairs = np.array(sorted(candidates), dtype=np.int64)
    array = np.array(codes, dtype=np.uint64)
    bits = np.bitwise_count(array[pairs[:, 0]] ^ array[pairs[:, 1]])
    keep = bits <= max_bits
    return [(int(i), int(j), int(d)) for (i, j), d in zip(pairs[keep], bits[keep])]


def _read_hash(path: Path) -> Fingerprint:
    """The content hash alone (or why the file cannot be read): enough to look the rest up in the cache."""
    try:
        return Fingerprint(hashlib.sha256(read_regular_file(path)).hexdigest(), None)
    except DecodeError as exc:
        return Fingerprint(None, None, exc.reason)


def _fingerprint_file(path: Path) -> Fingerprint:
    try:
        return fingerprint_bytes(read_regular_file(path))
    except DecodeError as exc:  # changed or removed since it was hashed
        return Fingerprint(None, None, exc.reason)


class _Store:
    """The fingerprints table; a cache folder that cannot be used gives a store that remembers nothing."""

    def __init__(self, db: sqlite3.Connection | None):
        self._db = db

    @classmethod
    def open(cls, cache_dir: Path | None) -> _Store:
        directory = Path(cache_dir) if cache_dir is not None else cache_root()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(directory / "fingerprints.sqlite", timeout=60)
            db.execute("CREATE TABLE IF NOT EXISTS fingerprints (method TEXT NOT NULL, content TEXT NOT NULL, "
                       "phash TEXT, problem TEXT, PRIMARY KEY (method, content))")
        except (OSError, sqlite3.Error):
            return cls(None)
        return cls(db)

    def get_many(self, hashes: list[str]) -> dict[str, Fingerprint]:
        found: dict[str, Fingerprint] = {}
        unique = sorted(set(hashes))
        for start in range(0, len(unique), 500) if self._db else ():
            chunk = unique[start:start + 500]
            try:
                rows = self._db.execute(f"SELECT content, phash, problem FROM fingerprints WHERE method = ? AND "
                                        f"content IN ({','.join('?' * len(chunk))})", [METHOD, *chunk]).fetchall()
            except sqlite3.Error:
                return found
            found.update((content, Fingerprint(content, int(phash, 16) if phash else None, problem))
                         for content, phash, problem in rows)
        return found

    def put_many(self, fingerprints: list[Fingerprint]) -> None:
        if not self._db or not fingerprints:
            return
        rows = [(METHOD, f.sha256, f"{f.phash:016x}" if f.phash is not None else None, f.problem)
                for f in fingerprints]
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO fingerprints VALUES (?, ?, ?, ?)", rows)
        except sqlite3.Error:
            pass  # a read-only or full cache only costs a re-computation next time

    def close(self) -> None:
        if self._db:
            self._db.close()

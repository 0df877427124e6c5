"""Carved splits that do not move and do not leak, and the leaks of splits a user made.

Each image's split is a function of its content and the seed: a uniform number drawn from the SHA-256 of
(seed, content hash) is compared with the split fractions, per class. Adding, removing or breaking other files
never moves it. Exact and near-duplicates within a class form a group that goes to one split, the split of the
group's smallest content hash.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tlearn.data.fingerprints import Fingerprint, near_pairs
from tlearn.errors import DatasetError

K_FOLDS = 5  # cross-validation folds of train for every choice (tlearn.train.choices); fewer when a class is small


@dataclass(frozen=True, order=True)
class Leak:
    """Two images, exact or near-duplicates (perceptual hash), in different splits."""

    paths: tuple[Path, Path]
    splits: tuple[str, str]
    bits: int  # Hamming distance of their perceptual hashes; 0 for the same picture


def carve(by_class: dict[str, list[Path]], prints: dict[Path, Fingerprint], fractions: dict[str, float],
          seed: int, source: str) -> dict[str, dict[str, list[Path]]]:
    """Split each class into "train" and the splits of `fractions` (name -> share of the images, in order).

    Every carved split gets at least one group of each class when the class has more than one; raise
    DatasetError when a class has fewer images than splits.
    """
    carved: dict[str, dict[str, list[Path]]] = {name: {} for name in ("train", *fractions)}
    for cls in sorted(by_class):
        files = by_class[cls]
        if len(files) < len(carved):
            plural = "" if len(files) == 1 else "s"
            raise DatasetError(f"class {cls!r} has only {len(files)} image{plural} in {source}: at least "
                             f"{len(carved)} are needed to carve a {' and a '.join(fractions)} split; add images or "
                             f"provide {' and '.join(f'a {name}/' for name in fractions)} folder")
        placed: dict[str, list[tuple[float, list[Path]]]] = {name: [] for name in carved}
        for group in near_groups(files, prints):
            draw = _uniform(seed, min(prints[p].sha256 for p in group))
            placed[_split_of(draw, fractions)].append((draw, group))
        _fill_empty_splits(placed, fractions)
        for name, groups in placed.items():
            carved[name][cls] = sorted(p for _, group in groups for p in group)
    return carved


def find_leaks(assigned: dict[str, list[Path]], prints: dict[Path, Fingerprint]) -> list[Leak]:
    """Pairs of exact or near-duplicate images (any class) that sit in different splits."""
    items = [(split, path) for split, paths in assigned.items() for path in paths if prints[path].usable]
    pairs = near_pairs([prints[path].phash for _, path in items])
    return sorted(Leak((items[i][1], items[j][1]), (items[i][0], items[j][0]), bits)
                  for i, j, bits in pairs if items[i][0] != items[j][0])


def near_groups(files: list[Path], prints: dict[Path, Fingerprint]) -> list[list[Path]]:
    """Files joined when their perceptual hashes are near (exact copies share theirs), transitively."""
    parent = list(range(len(files)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in near_pairs([prints[p].phash for p in files]):
        parent[root(i)] = root(j)
    groups: dict[int, list[Path]] = {}
    for i, path in enumerate(files):
        groups.setdefault(root(i), []).append(path)
    return list(groups.values())


def _uniform(seed: int, content: str) -> float:
    """A number in [0, 1) fixed by the seed and the content hash alone."""
    digest = hashlib.sha256(f"tlearn-split:{seed}:{content}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _split_of(draw: float, fractions: dict[str, float]) -> str:
    edge = 0.0
    for name, share in fractions.items():
        edge += share
        if draw < edge:
            return name
    return "train"


def _fill_empty_splits(placed: dict[str, list[tuple[float, list[Path]]]], fractions: dict[str, float]) -> None:
    """A carved split that drew no group of this class takes train's group of smallest draw (the nearest to the
    carved splits' range), as long as train keeps one; only small classes ever need it."""
    for name in fractions:
        if not placed[name] and len(placed["train"]) > 1:
            placed["train"].sort(key=lambda item: item[0])
            placed[name].append(placed["train"].pop(0))

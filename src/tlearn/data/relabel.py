"""Fixing labels without losing anything.

A relabel file is a CSV with the header `path,label`: each row gives an image (relative to the dataset root, as
`tlearn doctor --labels` prints it) the class it should have. `tlearn train --relabel FILE` honours it without
moving a file; `tlearn relabel DATA FILE` moves the files between class folders, recording every move in a journal
(DATA/.tlearn/relabel-journal.json) first, so that `tlearn relabel DATA --undo` puts them back. Nothing is
deleted; a name already taken in the target folder gets a new name (recorded), never an overwrite. Every row is
checked before anything moves: a missing file, a class that does not exist or a malformed row is refused by line.
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tlearn.data.layout import SPLIT_OF
from tlearn.errors import DatasetError

JOURNAL = Path(".tlearn") / "relabel-journal.json"


@dataclass(frozen=True)
class Relabel:
    path: Path  # absolute, inside the dataset root
    label: str
    line: int


def read_relabel_file(file: str | Path, root: str | Path) -> list[Relabel]:
    """The rows of a relabel CSV, each path resolved inside `root` and existing; DatasetError names a bad line."""
    file, root = Path(file), Path(root).expanduser()
    try:
        with open(file, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise DatasetError(f"cannot read the relabel file {file} ({exc.strerror or exc})") from None
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["path", "label"]:
        raise DatasetError(f"{file}: the first line must be the header path,label")
    base = Path(os.path.abspath(root))
    found, seen = [], {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(f"{file} line {number}: expected path,label")
        given, label = Path(row[0].strip()), row[1].strip()
        path = Path(os.path.abspath(given if given.is_absolute() else base / given))  # ".." resolved, links kept
        try:
            path.relative_to(base)
        except ValueError:
            raise DatasetError(f"{file} line {number}: {given} is not inside the dataset folder {root}") from None
        if not path.is_file():
            raise DatasetError(f"{file} line {number}: {given} does not exist in {root}")
        if path in seen:
            raise DatasetError(f"{file} line {number}: {given} is listed again (first on line {seen[path]})")
        seen[path] = number
        found.append(Relabel(path, label, number))
    return found


def check_labels(relabels: list[Relabel], classes: list[str], file: str | Path) -> None:
    for r in relabels:
        if r.label not in classes:
            raise DatasetError(f"{file} line {r.line}: class {r.label!r} does not exist (classes: "
                               f"{', '.join(classes)})")


def class_folder_of(path: Path, root: Path) -> Path:
    """The class folder an image sits in: the first folder under the root (or under its split folder)."""
    parts = path.relative_to(root).parts
    depth = 2 if len(parts) > 2 and parts[0].lower() in SPLIT_OF else 1
    return root.joinpath(*parts[:depth])


def plan_moves(relabels: list[Relabel], root: Path) -> list[tuple[Path, Path]]:
    """(from, to) for each image whose folder is not already its new class; a free name in the target folder."""
    moves, taken = [], set()
    for r in relabels:
        source = r.path
        current = class_folder_of(source, root)
        if current.name == r.label:
            continue
        target_dir = current.parent / r.label
        target = target_dir / source.relative_to(current)
        n = 1
        while target.exists() or target in taken:
            target = target.with_name(f"{target.stem.split('.relabel')[0]}.relabel{n}{target.suffix}")
            n += 1
        taken.add(target)
        moves.append((source, target))
    return moves


def relabel_folders(root: str | Path, file: str | Path, classes: list[str]) -> list[tuple[Path, Path]]:
    """Move the files a relabel CSV names into their new class folders; the journal is written first."""
    root = Path(os.path.abspath(Path(root).expanduser()))
    relabels = read_relabel_file(file, root)
    check_labels(relabels, classes, file)
    moves = plan_moves(relabels, root)
    if not moves:
        return []
    journal = _read_journal(root) if (root / JOURNAL).exists() else []
    journal.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "file": str(file),
                    "moves": [[str(a.relative_to(root)), str(b.relative_to(root))] for a, b in moves]})
    _write_journal(root, journal)
    for source, target in moves:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # appeared since the plan: never overwrite
            raise DatasetError(f"{target} appeared while relabelling; nothing overwritten (undo with --undo)")
        os.rename(source, target)
    return moves


def undo_last(root: str | Path) -> list[tuple[Path, Path]]:
    """Put back the files the last `relabel` moved (newest run first); refuses before moving anything when a file
    is missing from both places or both places are taken."""
    root = Path(os.path.abspath(Path(root).expanduser()))
    if not (root / JOURNAL).exists():
        raise DatasetError(f"nothing to undo: {root / JOURNAL} does not exist (no relabel was run on {root})")
    journal = _read_journal(root)
    if not journal:
        raise DatasetError(f"nothing to undo: the journal {root / JOURNAL} is empty")
    last = journal[-1]
    back = []
    for original, moved in reversed(last["moves"]):
        a, b = root / original, root / moved
        if b.exists() and not a.exists():
            back.append((b, a))
        elif not (a.exists() and not b.exists()):  # both there, or neither: a person must look
            raise DatasetError(f"cannot undo: {original} and {moved} are {'both' if a.exists() else 'neither'} "
                               "there; nothing was moved")
    for source, target in back:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, target)
    _write_journal(root, journal[:-1])
    return back


def _read_journal(root: Path) -> list[dict]:
    try:
        journal = json.loads((root / JOURNAL).read_text(encoding="utf-8", errors="surrogateescape"))
        if not isinstance(journal, list) or not all(isinstance(e, dict) and isinstance(e.get("moves"), list)
                                                    for e in journal):
            raise ValueError("not a list of runs")
        return journal
    except (OSError, ValueError) as exc:
        raise DatasetError(f"the relabel journal {root / JOURNAL} is not readable ({exc}); nothing was moved") \
            from None


def _write_journal(root: Path, journal: list[dict]) -> None:
    path = root / JOURNAL
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(journal, indent=1, ensure_ascii=False), encoding="utf-8", errors="surrogateescape")
    os.replace(tmp, path)

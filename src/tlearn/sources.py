"""What `tlearn predict SRC...` reads: folders, globs, manifests (text or CSV lists of paths) and object-store URIs.

Every SRC expands to image locations (local paths as strings, object-store objects as URIs) in a stable order,
each once; a SRC that names nothing is reported, not raised, so a prediction job writes a row for it.
"""
from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tlearn.data.decode import is_image_path
from tlearn.data.discovery import walk_images

MANIFEST_EXTENSIONS = frozenset({".txt", ".csv", ".tsv", ".lst"})
GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class Missing:
    """A SRC (or a manifest line) that names no readable file."""

    source: str
    reason: str


@dataclass
class Sources:
    """The image locations a list of SRC expands to, in order, each once; and what named nothing."""

    files: list[str] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)

    def without(self, done: set[str]) -> "Sources":
        """These sources less the locations in `done` (a resumed job's rows already written)."""
        return Sources([f for f in self.files if f not in done], [m for m in self.missing if m.source not in done])


def expand_sources(sources: Sequence[str | os.PathLike]) -> Sources:
    """Folders (recursive, links to folders followed once: tlearn.data.discovery), globs (`**` recursive),
    manifests (.txt/.csv/.tsv/.lst: one path per line, or a `path` column; relative paths are relative to the
    manifest's folder), single files of any kind, and URIs (`s3://`, `gs://`, `file://`... through pyarrow's
    filesystems). Local paths come out absolute (links kept as named)."""
    seen: dict[str, None] = {}
    missing: list[Missing] = []
    for source in sources:
        for location in _expand_one(str(source), missing, manifest_allowed=True):
            seen.setdefault(location, None)
    return Sources(list(seen), list({m.source: m for m in missing}.values()))  # one row per location


def is_uri(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def _expand_one(source: str, missing: list[Missing], manifest_allowed: bool) -> Iterator[str]:
    if source.startswith("file://"):
        source = source[len("file://"):]
    if is_uri(source):
        yield from _expand_uri(source, missing)
        return
    # absolute: the path column then names the file wherever the job ran (Ray workers do not share our cwd)
    path = Path(os.path.abspath(os.path.expanduser(source)))
    if any(c in source for c in GLOB_CHARACTERS) and not path.exists():
        matches = sorted(glob.glob(str(path), recursive=True))
        files = [m for m in matches if os.path.isfile(m) and is_image_path(Path(m))]
        if not files:
            missing.append(Missing(source, "the pattern matches no image file"))
        yield from files
    elif path.is_dir():
        scan = walk_images(path)  # links to folders followed, loops and unusable files named
        missing.extend(Missing(str(s.path), s.reason) for s in scan.skipped)
        yield from (str(p) for p in scan.images)
    elif path.is_file() and manifest_allowed and path.suffix.lower() in MANIFEST_EXTENSIONS:
        for entry in read_manifest(path):
            yield from _expand_one(entry, missing, manifest_allowed=False)
    elif path.is_file():
        yield str(path)
    else:
        missing.append(Missing(str(path), "no such file or folder"))


def read_manifest(path: Path) -> list[str]:
    """The paths a manifest lists: a CSV/TSV with a `path` column, else the first field of each line; blank lines
    and lines starting with # are skipped; relative paths are taken from the manifest's folder."""
    text = path.read_text(encoding="utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return []
    if path.suffix.lower() in (".csv", ".tsv"):
        rows = list(csv.reader(lines, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
        header = [h.strip().lower() for h in rows[0]]
        column = header.index("path") if "path" in header else 0
        entries = [row[column].strip() for row in (rows[1:] if "path" in header else rows) if row]
    else:
        entries = [line.strip() for line in lines]
    return [_resolve(entry, path.parent) for entry in entries if entry]


def _resolve(entry: str, base: Path) -> str:
    if "://" in entry or os.path.isabs(os.path.expanduser(entry)):
        return entry
    return str(base / entry)


def _expand_uri(uri: str, missing: list[Missing]) -> Iterable[str]:
    """Objects under a URI (one object, a prefix searched recursively, or a glob in the last parts)."""
    import fnmatch

    from pyarrow import fs

    scheme = uri.split("://", 1)[0]
    pattern = uri if any(c in uri for c in GLOB_CHARACTERS) else None
    base = uri[:min(uri.index(c) for c in GLOB_CHARACTERS if c in uri)].rsplit("/", 1)[0] if pattern else uri
    try:
        filesystem, root = fs.FileSystem.from_uri(base)
        info = filesystem.get_file_info(root)
        if info.type == fs.FileType.File and pattern is None:
            return [uri]
        if info.type != fs.FileType.Directory:
            missing.append(Missing(uri, "no such object or prefix"))
            return []
        listing = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as exc:
        missing.append(Missing(uri, f"cannot list it ({exc})"))
        return []
    found = sorted(f"{scheme}://{i.path}" for i in listing
                   if i.type == fs.FileType.File and is_image_path(Path(i.path)))
    if pattern:
        found = [f for f in found if fnmatch.fnmatchcase(f, pattern)]
        if not found:
            missing.append(Missing(uri, "the pattern matches no image object"))
    return found

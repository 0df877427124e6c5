"""Walk a dataset folder: the image files under each folder, and every file passed over, with the reason.

Symbolic links to folders are followed (with a loop guard on real paths); broken or looping links, unreadable
folders, special files (FIFO, device, socket) and image formats tlearn cannot read are reported by name, never
dropped in silence. Folders that tlearn wrote (a model folder, a report) are not data.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from tlearn.data.decode import file_kind, is_image_path, unsupported_reason

REPORT_MARKER = "<title>tlearn report"  # how report.html written by tlearn begins its title


@dataclass(frozen=True)
class Skipped:
    """A file or folder passed over, and why, in words a user can act on."""

    path: Path
    reason: str
    kind: str = "skipped"  # "unreadable": an image file that cannot be decoded (the doctor quarantines it)


@dataclass
class Scan:
    """What a walk found: image files (sorted), other files, and what was skipped."""

    images: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)  # files without an image extension
    skipped: list[Skipped] = field(default_factory=list)

    def extend(self, other: Scan) -> None:
        self.images += other.images
        self.ignored += other.ignored
        self.skipped += other.skipped


def sub_folders(folder: Path, scan: Scan) -> list[Path]:
    """The visible sub-folders of `folder` (links followed, sorted by name), leaving out tlearn's own outputs;
    the files beside them go to `scan.ignored`, what cannot be used to `scan.skipped`."""
    folders = []
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as exc:
        scan.skipped.append(Skipped(folder, f"cannot list folder ({exc.strerror or exc})"))
        return []
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            continue
        if _is_dir(entry.path):
            if _leads_back(path, folder):
                scan.skipped.append(Skipped(path, f"symbolic link loop (leads back to {os.path.realpath(path)})"))
            elif is_tlearn_output(path):
                scan.skipped.append(Skipped(path, "written by tlearn (a model or report folder), not data"))
            else:
                folders.append(path)
        elif (problem := _file_problem(path)) is not None:
            scan.skipped.append(Skipped(path, problem))
        else:
            scan.ignored.append(path)
    return folders


def walk_images(folder: Path, stop_at: Path | None = None) -> Scan:
    """Every image file under `folder` (recursively, following links to folders); `stop_at`, an ancestor such
    as the dataset root, is never walked into again through a link."""
    scan = Scan()
    visited = {os.path.realpath(folder)} | ({os.path.realpath(stop_at)} if stop_at else set())

    def unreadable(exc: OSError) -> None:
        scan.skipped.append(Skipped(Path(exc.filename or folder), f"cannot list folder ({exc.strerror or exc})"))

    for directory, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        dirs[:] = sorted(d for d in dirs if _follow(Path(directory, d), Path(directory), visited, scan))
        for name in sorted(files):
            path = Path(directory, name)
            if name.startswith("."):
                continue
            problem = _file_problem(path)
            if problem is not None:
                scan.skipped.append(Skipped(path, problem))
            elif is_image_path(path):
                scan.images.append(path)
            else:
                scan.ignored.append(path)
    return scan


def is_tlearn_output(folder: Path) -> bool:
    """True for a folder tlearn wrote: a model folder (config.json of format tlearn-bundle) or a report."""
    try:
        with open(folder / "config.json", encoding="utf-8") as handle:
            if json.load(handle).get("format") == "tlearn-bundle":
                return True
    except (OSError, ValueError, AttributeError):
        pass
    try:
        with open(folder / "report.html", encoding="utf-8", errors="replace") as handle:
            return REPORT_MARKER in handle.read(4096)
    except OSError:
        return False


def _follow(path: Path, parent: Path, visited: set[str], scan: Scan) -> bool:
    """Whether the walk goes into sub-folder `path` of `parent`: not hidden, not tlearn's output, not a folder
    seen before or one that holds the walk itself (a link to an ancestor)."""
    if path.name.startswith("."):
        return False
    if is_tlearn_output(path):
        scan.skipped.append(Skipped(path, "written by tlearn (a model or report folder), not data"))
        return False
    real = os.path.realpath(path)
    if real in visited or _leads_back(path, parent):
        scan.skipped.append(Skipped(path, f"symbolic link loop (leads back to {real}, already included)"))
        return False
    visited.add(real)
    return True


def _leads_back(path: Path, parent: Path) -> bool:
    """True when sub-folder `path` of `parent` is really `parent` or one of its ancestors (a link loop)."""
    real, here = os.path.realpath(path), os.path.realpath(parent)
    return here == real or here.startswith(real.rstrip(os.sep) + os.sep)


def _file_problem(path: Path) -> str | None:
    """Why a non-folder entry cannot be used (broken link, special file, unsupported format), else None."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            what = "symbolic link loop" if exc.errno == errno.ELOOP else "broken symbolic link"
            return f"{what} (-> {os.readlink(path)})"
        return f"cannot read file ({exc.strerror or exc})"
    if not stat.S_ISREG(info.st_mode):
        return f"not a regular file ({file_kind(info.st_mode)})"
    return unsupported_reason(path)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def find_images(paths: list[Path]) -> tuple[list[Path], list[Skipped]]:
    """Files as given (decoding decides whether they are images), folders searched recursively for images;
    missing paths, special files, links that lead nowhere and unsupported formats are named, in input order."""
    files: list[Path] = []
    problems: list[Skipped] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if _is_dir(os.fspath(path)):
            scan = walk_images(path)
            files += scan.images
            problems += scan.skipped
        elif not os.path.lexists(path):
            problems.append(Skipped(path, "no such file or folder"))
        elif (problem := _file_problem(path)) is not None:
            problems.append(Skipped(path, problem))
        else:
            files.append(path)
    return files, problems

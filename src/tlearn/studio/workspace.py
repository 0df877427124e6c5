"""The studio's workspace on disk: one folder per project, one sub-folder per class (tlearn's dataset layout).

Every name a request gives is one plain path component, and every path is resolved (links followed) and must
stay inside the workspace: `..`, an absolute path or a symlink that leads out is refused before anything is read
or written. An upload is identified and decoded with the bomb guard before a byte is saved; each file is saved
whole (a temporary file, then a hard link that never replaces a file already there), and a request that fails
leaves no file of its own behind.
"""
from __future__ import annotations

import os
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tlearn.data.decode import DecodeError, decode_bytes
from tlearn.data.discovery import walk_images
from tlearn.errors import InvalidParameter
from tlearn.files import temporary_beside
from tlearn.serve.decoding import identify
from tlearn.serve.limits import Rejection

STUDIO_DIR = ".studio"  # the studio's own files (job states, logs, models); never a project
MAX_NAME = 100
# what Pillow identified -> the extension the file is saved with (tlearn's datasets read these)
SAVED_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif",
                 "TIFF": ".tif"}


@dataclass(frozen=True)
class Upload:
    """One file of an upload request: the name the browser gave it and its bytes."""

    filename: str
    content: bytes


@dataclass(frozen=True)
class ClassFolder:
    name: str
    images: int

    def to_dict(self) -> dict:
        return {"name": self.name, "images": self.images}


class Workspace:
    """The folder `tlearn studio` serves: its projects, and the one place paths from requests are checked."""

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise InvalidParameter(f"the workspace {root} is not a folder: give a folder (it holds the projects)")
        self.root = Path(os.path.realpath(root))

    @property
    def studio_dir(self) -> Path:
        """The studio's own folder, checked like any other: a `.studio` linked elsewhere is refused (403)."""
        return self.inside(self.root / STUDIO_DIR, STUDIO_DIR)

    # ---- paths ---------------------------------------------------------------------------------------------
    def inside(self, path: Path, shown: str) -> Path:
        """`path` with every link resolved, or 403 when that leads outside the workspace."""
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self.root):
            raise Rejection(403, "workspace", f"{shown!r} leads outside the workspace (a symbolic link to "
                                              "elsewhere): only folders inside it can be used")
        return real

    def project_dir(self, project: str, *, exists: bool = True) -> Path:
        """The folder of project `project` (a plain name), resolved inside the workspace; 404 if absent."""
        path = self.inside(self.root / check_name(project, "project"), project)
        if exists and not path.is_dir():
            raise Rejection(404, "project", f"no project named {project!r} in the workspace")
        return path

    def class_dir(self, project: str, name: str, *, exists: bool = True) -> Path:
        folder = self.project_dir(project)
        path = self.inside(folder / check_name(name, "class"), f"{project}/{name}")
        if exists and not path.is_dir():
            raise Rejection(404, "class", f"project {project!r} has no class named {name!r}")
        return path

    def models_dir(self, project: str) -> Path:
        """Where the studio keeps `project`'s trained versions (1, 2, ...): beside the projects, never inside a
        class folder."""
        name = check_name(project, "project")
        return self.inside(self.studio_dir / "models" / name, f"{STUDIO_DIR}/models/{name}")

    def versions(self, project: str) -> list[int]:
        """The numbers of the project's trained versions (folders holding a model), oldest first."""
        folder = self.models_dir(project)
        if not folder.is_dir():
            return []
        numbers = [int(e.name) for e in os.scandir(folder) if e.name.isdigit() and not e.is_symlink()
                   and os.path.isfile(os.path.join(e.path, "config.json"))]
        return sorted(numbers)

    def model_dir(self, project: str, version: int | None = None) -> Path:
        """The folder of version `version` of the project's model (None: the newest); 404 for no such version.
        A project never trained gives the folder its first version would have (no config.json in it)."""
        known = self.versions(project)
        if version is None:
            version = known[-1] if known else 1
        elif version not in known:
            raise Rejection(404, "version", f"project {project!r} has no trained version {version} (versions: "
                                            f"{', '.join(map(str, known)) or 'none yet'})")
        return self.inside(self.models_dir(project) / str(version), f"{STUDIO_DIR}/models/{project}/{version}")

    def next_version(self, project: str) -> tuple[int, Path]:
        """The number and folder of the project's next train: one past every folder there, failed ones included
        (a number is never given twice)."""
        folder = self.models_dir(project)
        taken = [int(e.name) for e in os.scandir(folder) if e.name.isdigit()] if folder.is_dir() else []
        number = max(taken, default=0) + 1
        return number, self.inside(folder / str(number), f"{STUDIO_DIR}/models/{project}/{number}")

    # ---- reading -------------------------------------------------------------------------------------------
    def projects(self) -> list[str]:
        """Names of the project folders (not hidden, not links leading out of the workspace), sorted."""
        return _usable_folders(self.root, self)

    def classes(self, project: str) -> list[ClassFolder]:
        folder = self.project_dir(project)
        return [ClassFolder(name, len(walk_images(folder / name).images)) for name in _usable_folders(folder, self)]

    # ---- changes -------------------------------------------------------------------------------------------
    def create_project(self, project: str) -> Path:
        return _make_folder(self.project_dir(project, exists=False), f"project {project!r}")

    def create_class(self, project: str, name: str) -> Path:
        return _make_folder(self.class_dir(project, name, exists=False), f"class {name!r} of {project!r}")

    def rename_class(self, project: str, name: str, new: str) -> Path:
        """Rename a class folder (409 when the new name is taken); its photos move with it."""
        source, target = self.class_dir(project, name), self.class_dir(project, new, exists=False)
        if os.path.lexists(target):
            raise Rejection(409, "exists", f"class {new!r} of {project!r} already exists")
        os.rename(source, target)
        return target

    def discard(self, project: str, relative: str, path: Path) -> Path:
        """Move a class folder or a photo of the project out of it, into the studio's bin (never deleted: the
        answer names where it went)."""
        bin_dir = self.inside(self.studio_dir / "bin" / check_name(project, "project"), f"{STUDIO_DIR}/bin")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = bin_dir / stamp / relative
        for n in range(2, 10_000):
            if not os.path.lexists(target):
                break
            target = bin_dir / f"{stamp}-{n}" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)  # the same file system (the workspace): a move, whole or not at all
        return target

    def images(self, project: str, name: str) -> list[str]:
        """The photos of a class, as paths relative to the project ('class/file'), sorted."""
        folder = self.class_dir(project, name)
        return sorted(p.relative_to(folder.parent).as_posix() for p in walk_images(folder).images)

    def save_images(self, project: str, name: str, uploads: list[Upload], max_pixels: int) -> list[str]:
        """Save every upload into the class folder under a free name, or none of them (4xx for the first bad one).

        Each file is identified and fully decoded first; it is saved with its own bytes and the extension of the
        format it really is, under the browser's base name made safe."""
        folder = self.class_dir(project, name)
        extensions = [image_extension(u, i, max_pixels) for i, u in enumerate(uploads)]
        saved: list[Path] = []
        try:
            for upload, extension in zip(uploads, extensions):
                saved.append(_save_new(folder, safe_stem(upload.filename), extension, upload.content))
        except BaseException:
            for path in saved:  # a disk that filled up half-way: the request leaves nothing
                path.unlink(missing_ok=True)
            raise
        return [p.name for p in saved]


def check_name(name: str, what: str) -> str:
    """`name` if it is one plain, visible path component; 400 otherwise (`..`, a path, a hidden name...)."""
    if not isinstance(name, str) or not name.strip():
        raise Rejection(400, "name", f"a {what} needs a name")
    if name in (".", "..") or "/" in name or "\\" in name or os.path.isabs(name):
        raise Rejection(400, "name", f"{name!r:.80} is a path, not a {what} name: give a plain name (no '/', no "
                                     "'..')")
    if name.startswith(".") or name != name.strip():
        raise Rejection(400, "name", f"{what} name {name!r:.80} may not begin with '.' or a space")
    if len(name) > MAX_NAME or any(unicodedata.category(c).startswith("C") for c in name):
        raise Rejection(400, "name", f"{what} name {name!r:.80} is over {MAX_NAME} characters or holds control "
                                     "characters")
    return name


def image_extension(upload: Upload, index: int, max_pixels: int) -> str:
    """The extension `upload` is saved with, once it is identified from its header and decoded whole: 415 for
    what is not an image tlearn's datasets read, 413 for more pixels than `max_pixels` (checked before decoding),
    422 for a corrupt or truncated image."""
    kind = identify(upload.content, index, max_pixels)
    if kind not in SAVED_FORMATS:
        raise Rejection(415, "image-format", f"image {index} ({upload.filename!r:.60}): a {kind} image, which "
                                             "tlearn's datasets do not read: convert it to JPEG or PNG", index=index)
    try:
        decode_bytes(upload.content, upload.filename, max_pixels=max_pixels)
    except DecodeError as exc:
        raise Rejection(422, "decodable-image", f"image {index} ({upload.filename!r:.60}): {exc.reason}",
                        index=index) from None
    return SAVED_FORMATS[kind]


def safe_stem(filename: str) -> str:
    """The base name of a browser's file name without its extension, reduced to letters, digits, ' ', '-', '_'
    and '.' (never a path, never hidden); 'photo' when nothing is left."""
    base = PurePosixPath(str(filename).replace("\\", "/")).name
    stem = re.sub(r"[^\w .-]+", "_", base.rsplit(".", 1)[0] if "." in base[1:] else base).strip(" ._")
    return stem[:80] or "photo"


def _save_new(folder: Path, stem: str, extension: str, content: bytes) -> Path:
    """Write `content` to folder/stem+extension, or stem-2, -3... when taken: whole, and never over a file."""
    with temporary_beside(folder / f"{stem}{extension}") as tmp:
        with open(tmp, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        for n in range(1, 10_000):
            target = folder / (f"{stem}{extension}" if n == 1 else f"{stem}-{n}{extension}")
            try:
                os.link(tmp, target)  # fails on any existing name, a link included: nothing is replaced
                return target
            except FileExistsError:
                continue
    raise Rejection(409, "file-name", f"{stem}{extension}: too many files of that name in {folder.name!r}")


def _make_folder(path: Path, what: str) -> Path:
    if os.path.lexists(path):
        raise Rejection(409, "exists", f"{what} already exists")
    path.mkdir(parents=False)
    return path


def _usable_folders(parent: Path, workspace: Workspace) -> list[str]:
    names = []
    for entry in sorted(os.scandir(parent), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if Path(os.path.realpath(entry.path)).is_relative_to(workspace.root):
            names.append(entry.name)
    return names

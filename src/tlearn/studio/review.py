"""The studio's review and deploy routes: the test metrics as tables, suspect labels with their thumbnails, a
label fixed with a click (tlearn's relabel journal, undoable), the model exported to ONNX for download, and the
snippets that use it.

Every path a request names is relative to its project, resolved (links followed) and must stay inside it; a
relabel is written as a one-row CSV in the studio's own folder, then moved by tlearn.data.relabel (journal first).
"""
from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
import mimetypes
import os
import re
import threading
import zipfile
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal, Optional
from urllib.parse import quote

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tlearn.data.decode import IMAGE_EXTENSIONS
from tlearn.files import write_atomically
from tlearn.serve.limits import Rejection
from tlearn.studio.workspace import Workspace, check_name

ONNX_NAME = "model.onnx"
OPENVINO_NAME = "model.xml"  # and model.bin beside it
ExportFormat = Annotated[Literal["onnx", "openvino"], Query(description="onnx: one ONNX file; openvino: OpenVINO IR")]


class Move(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(max_length=1000)
    label: str = Field(max_length=200)


def review_router(workspace: Workspace, jobs) -> APIRouter:
    api = APIRouter(prefix="/api/projects/{project}", tags=["review"])
    exporting = threading.Lock()  # one export at a time: each is a torch export and a check

    def trained(project: str, version: int | None = None) -> Path:
        workspace.project_dir(project)
        folder = workspace.model_dir(project, version)
        if not (folder / "config.json").is_file():
            raise Rejection(409, "model", f"project {project!r} has no trained model yet: train it first")
        return folder

    @api.get("/versions", summary="Every trained version of the project's model, oldest first, with what it was "
                                  "trained with and its scores (test and cross-validated): what the page compares.")
    def versions(project: str) -> dict:
        workspace.project_dir(project)
        return {"project": project,
                "versions": [_version_summary(n, workspace.model_dir(project, n)) for n in workspace.versions(project)]}

    @api.get("/review", summary="The trained model's test metrics: per-class precision/recall/F1/support and the "
                                "confusion matrix (rows: true class, columns: predicted).")
    def review(project: str, version: Optional[int] = Query(None, ge=1)) -> dict:
        folder = trained(project, version)
        try:
            metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise Rejection(409, "metrics", f"the model of {project!r} has no readable metrics.json") from None
        test = metrics.get("test") or {}
        classes = test.get("classes") or _config_classes(folder)
        per_class = test.get("per_class") or {}
        return {"project": project, "version": int(folder.name), "classes": classes, "n": test.get("n"),
                "accuracy": test.get("accuracy"),
                "ci95": (test.get("ci95") or {}).get("accuracy"), "macro_f1": test.get("macro_f1"),
                "per_class": [{"class": name, **per_class[name]} for name in classes if name in per_class],
                "confusion_matrix": test.get("confusion_matrix") or []}

    @api.post("/export", summary="Export the trained model to one ONNX file (format=onnx) or OpenVINO IR "
                                 "(format=openvino: model.xml + model.bin) in its model folder, verified against "
                                 "the torch model; the answer says how to download and use it.")
    def export(project: str, version: Optional[int] = Query(None, ge=1), format: ExportFormat = "onnx") -> dict:
        import tlearn

        folder = trained(project, version)
        if not exporting.acquire(blocking=False):
            raise Rejection(409, "one-export", "an export is already running: wait for it to end")
        try:
            model = tlearn.load(folder, progress=False)
            check = model.export_openvino(folder / OPENVINO_NAME) if format == "openvino" else \
                model.export(folder / ONNX_NAME)
        finally:
            exporting.release()
        files = _export_files(folder, format)
        return {"project": project, "version": int(folder.name), "format": format,
                "file": files[0].name, "bytes": sum(f.stat().st_size for f in files),
                "download": f"/api/projects/{quote(project, safe='')}/export?version={folder.name}&format={format}",
                "check": _plain(check), "snippets": snippets(folder)}

    @api.get("/export", summary="Download the exported model (attachment): the ONNX file, or for OpenVINO a zip "
                                "of model.xml and model.bin; 404 before an export.")
    def download(project: str, version: Optional[int] = Query(None, ge=1),
                 format: ExportFormat = "onnx") -> Response:
        folder = trained(project, version)
        files = [workspace.inside(f, f"{project}/{f.name}") for f in _export_files(folder, format)]
        if not all(f.is_file() for f in files):
            raise Rejection(404, "export", f"the model of {project!r} is not exported to {format} yet: export it "
                                           "first")
        headers = {"Cache-Control": "no-store"}
        if format == "onnx":
            return FileResponse(files[0], media_type="application/octet-stream", filename=f"{project}.onnx",
                                headers=headers)
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
            for f in files:
                zipped.write(f, f"{project}-openvino/{f.name}")
        name = quote(f"{project}-openvino.zip")
        return Response(archive.getvalue(), media_type="application/zip",
                        headers={**headers, "Content-Disposition": f"attachment; filename*=utf-8''{name}"})

    @api.get("/snippets", summary="Copy-paste lines that serve and use the trained model.")
    def snippet(project: str, version: Optional[int] = Query(None, ge=1)) -> dict:
        return snippets(trained(project, version))

    @api.get("/dockerfile", summary="A Dockerfile that puts this model into tlearn's serving image (the torch-free "
                                    "install), with the commands that build and run it.")
    def dockerfile(project: str, version: Optional[int] = Query(None, ge=1)) -> dict:
        return docker_files(project, trained(project, version))

    @api.get("/suspects", summary="Training images whose label the model's out-of-fold probabilities contradict, "
                                  "most suspect first.")
    async def suspects(project: str) -> dict:
        import tlearn

        folder = await asyncio.to_thread(trained, project)
        data = workspace.project_dir(project)
        report = await asyncio.to_thread(tlearn.suspect_labels, data, folder, cache_dir=None, progress=False)
        return {"project": project, "images": report.images, "source": report.source,
                "classes": report.classes,
                "suspects": [{**_plain(s), "thumbnail": image_url(project, s.path)}
                             for s in report.suspects]}

    @api.get("/image", summary="One image of the project (a thumbnail's source), by its path in the project.")
    def image(project: str, path: str = Query(max_length=1000)) -> FileResponse:
        real = project_file(workspace, project, path)
        if real.suffix.lower() not in IMAGE_EXTENSIONS:
            raise Rejection(400, "path", f"{path!r:.80} is not an image")
        media = mimetypes.guess_type(real.name)[0] or "application/octet-stream"
        return FileResponse(real, media_type=media, headers={"Cache-Control": "no-store",
                                                             "X-Content-Type-Options": "nosniff"})

    @api.post("/relabel", summary="Move one image to another class folder (journaled: undo puts it back).")
    def relabel(project: str, body: Move) -> dict:
        from tlearn.data.relabel import relabel_folders

        data = workspace.project_dir(project)
        jobs.refuse_while_running(project, "move photos")
        classes = [c.name for c in workspace.classes(project)]
        label = check_name(body.label, "class")
        if label not in classes:
            raise Rejection(400, "class", f"project {project!r} has no class {label!r} (classes: "
                                          f"{', '.join(classes)})")
        real = project_file(workspace, project, body.path)
        relative = real.relative_to(data).as_posix()
        folder = workspace.studio_dir / "relabel"
        folder.mkdir(parents=True, exist_ok=True)
        sheet = workspace.inside(folder / f"{check_name(project, 'project')}.csv", f".studio/relabel/{project}.csv")
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([["path", "label"], [relative, label]])
        write_atomically(sheet, lambda tmp: Path(tmp).write_text(text.getvalue(), encoding="utf-8"))
        moves = relabel_folders(data, sheet, classes)
        return {"project": project, "moves": _moves(moves, data)}

    @api.post("/relabel/undo", summary="Undo the project's last relabel (from its journal).")
    def undo(project: str) -> dict:
        from tlearn.data.relabel import undo_last

        data = workspace.project_dir(project)
        jobs.refuse_while_running(project, "move photos")
        return {"project": project, "moves": _moves(undo_last(data), data)}

    return api


def project_file(workspace: Workspace, project: str, path: str) -> Path:
    """The file `path` (relative, '/'-separated) names in the project, resolved; 400 for `..`, an absolute or a
    hidden path, 403 for one that leads out of the project, 404 for no such file."""
    data = workspace.project_dir(project)
    given = PurePosixPath(path.replace("\\", "/"))
    if not path.strip() or given.is_absolute() or os.path.isabs(path) or any(
            part in ("..", ".") or part.startswith(".") for part in given.parts):
        raise Rejection(400, "path", f"{path!r:.80} is not a path inside the project (no '..', no absolute or "
                                     "hidden path)")
    real = Path(os.path.realpath(data.joinpath(*given.parts)))
    if not real.is_relative_to(data) or real == data:
        raise Rejection(403, "workspace", f"{path!r:.80} leads outside the project")
    if not real.is_file():
        raise Rejection(404, "path", f"project {project!r} has no file {path!r:.80}")
    return real


def _version_summary(number: int, folder: Path) -> dict:
    """One version as the compare table shows it: when, how, and its scores (None for what it lacks)."""
    def read(name: str) -> dict:
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8"))
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    config, metrics = read("config.json"), read("metrics.json")
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    backbone = config.get("backbone") if isinstance(config.get("backbone"), dict) else {}
    test, cv = metrics.get("test") or {}, metrics.get("cv") or {}
    return {"version": number, "created": config.get("created"), "backbone": backbone.get("name"),
            "recipe": training.get("recipe"), "recipe_asked": training.get("recipe_asked"),
            "fine_tuned": bool(backbone.get("fine_tuned_sha256")),
            "classes": config.get("classes") or [],
            "images": {"train": len((config.get("split") or {}).get("files", {}).get("train", [])),
                       "test": test.get("n")},
            "test": {"accuracy": test.get("accuracy"), "ci95": (test.get("ci95") or {}).get("accuracy"),
                     "balanced_accuracy": test.get("balanced_accuracy"),
                     "recall": {c: v.get("recall") for c, v in (test.get("per_class") or {}).items()}},
            "cv": {"accuracy": cv.get("accuracy"), "balanced_accuracy": cv.get("balanced_accuracy"),
                   "folds": (cv.get("folds") or {}).get("k")}}


def docker_files(project: str, folder: Path) -> dict:
    """A Dockerfile deriving from tlearn's serving image (the repository's Dockerfile, `make image`) with this
    model copied in, and the lines that build and run it; the model folder is the build context."""
    image = re.sub(r"[^a-z0-9_.-]+", "-", project.lower()).strip("-.") or "model"
    text = ("# the model's own image: tlearn's serving image (torch-free) with this model folder in it\n"
            "# build tlearn-serve first, from tlearn's source: make image\n"
            "FROM tlearn-serve\n"
            "COPY --chown=10001:10001 . /model\n"
            f'CMD ["--name", "{image}"]\n')
    return {"dockerfile": text,
            "build": f"docker build -t tlearn-{image} -f - {_shell(str(folder))} <<'EOF'\n{text}EOF",
            "run": f"docker run --rm -p 127.0.0.1:8000:8000 tlearn-{image}"}


def _export_files(folder: Path, format: str) -> list[Path]:
    if format == "openvino":
        return [folder / OPENVINO_NAME, (folder / OPENVINO_NAME).with_suffix(".bin")]
    return [folder / ONNX_NAME]


def snippets(folder: Path) -> dict:
    model = str(folder)
    return {"serve": f"tlearn serve {_shell(model)}",
            "curl": "curl -F file=@photo.jpg http://127.0.0.1:8000/v1/predict",
            "python": "import tlearn\n\n"
                      f"model = tlearn.load({model!r})\n"
                      "print(model.predict([\"photo.jpg\"], top_k=3))"}


def _shell(text: str) -> str:
    import shlex

    return shlex.quote(text)


def image_url(project: str, path: str) -> str:
    """The address of one photo of a project (the thumbnails' source), both parts escaped."""
    return f"/api/projects/{quote(project, safe='')}/image?path={quote(path, safe='/')}"


def _moves(moves, root: Path) -> list[list[str]]:
    out = []
    for a, b in moves:
        a, b = Path(a), Path(b)
        out.append([str(a.relative_to(root)) if a.is_absolute() else str(a),
                    str(b.relative_to(root)) if b.is_absolute() else str(b)])
    return out


def _plain(value) -> dict:
    if dataclasses.is_dataclass(value):
        return json.loads(json.dumps(dataclasses.asdict(value), default=str))
    return {"value": str(value)}


def _config_classes(folder: Path) -> list[str]:
    try:
        return list(json.loads((folder / "config.json").read_text(encoding="utf-8"))["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return []

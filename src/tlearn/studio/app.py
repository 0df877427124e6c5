"""The studio's FastAPI app: the page, projects and classes, uploads, the train job and its live log, predictions.

Every route sits behind StudioGuard (token, Host, Origin); every refusal is JSON {"error": ..., "limit": ...,
"status": ...} with a 4xx status, raised before anything on disk changes.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from importlib.resources import files
from typing import Annotated, Optional

from fastapi import APIRouter, Body, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tlearn.errors import OutputError, TlearnError
from tlearn.serve.app import add_errors
from tlearn.serve.decoding import identify
from tlearn.serve.inputs import check_image_count, encoded_images, multipart_files
from tlearn.serve.limits import Rejection, read_body
from tlearn.studio.guard import StudioGuard, StudioSettings
from tlearn.studio.jobs import TrainJobs, TrainOptions
from tlearn.studio.review import image_url, review_router
from tlearn.studio.serving import ModelServers
from tlearn.studio.workspace import Upload, Workspace

log = logging.getLogger("uvicorn.error")  # configured by uvicorn: our lines go where its own go

EVENT_POLL_S = 0.3  # how often a live log looks for new lines
TOP_K = 5
# the page is one file with its script and style inline; it may load nothing from anywhere else
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' blob: data:; connect-src 'self'; form-action 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


class Named(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=200)


def create_app(settings: StudioSettings) -> FastAPI:
    """The studio over `settings.workspace`; its jobs are `app.state.jobs`."""
    workspace = Workspace(settings.workspace)
    jobs = TrainJobs(workspace)
    models = ModelCache(workspace)
    servers = ModelServers(workspace)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.gather(asyncio.to_thread(jobs.stop_all), asyncio.to_thread(servers.stop_all))

    app = FastAPI(title="tlearn studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jobs, app.state.servers = jobs, servers
    _add_errors(app)
    app.add_middleware(StudioGuard, settings=settings)
    app.include_router(_projects_router(workspace, jobs, settings))
    app.include_router(_train_router(workspace, jobs))
    app.include_router(_serve_router(workspace, servers))
    app.include_router(_predict_router(models, settings))
    app.include_router(review_router(workspace, jobs))

    page = files("tlearn.studio").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        response = HTMLResponse(page, headers=PAGE_HEADERS)
        # the guard let this request in, so it carries the token: the page's own requests then carry it as a cookie
        response.set_cookie(settings.cookie, settings.token, httponly=True, samesite="lax", path="/")
        return response

    return app


def _projects_router(workspace: Workspace, jobs: TrainJobs, settings: StudioSettings) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["projects"])

    def project_json(name: str) -> dict:
        job = jobs.last(name)
        return {"name": name, "classes": [c.to_dict() for c in workspace.classes(name)],
                "job": job.to_dict() if job else None,
                "model": (workspace.model_dir(name) / "config.json").is_file(), "versions": workspace.versions(name)}

    @api.get("/projects", summary="Every project with its classes, image counts and last train.")
    def projects() -> dict:
        return {"workspace": str(workspace.root), "projects": [project_json(p) for p in workspace.projects()],
                "limits": {"max_body_bytes": settings.max_body_bytes, "max_images": settings.max_images}}

    @api.post("/projects", status_code=201, summary="Create an empty project (a folder in the workspace).")
    def create_project(body: Named) -> dict:
        workspace.create_project(body.name)
        return project_json(body.name)

    @api.get("/projects/{project}", summary="One project: its classes with their image counts, its last train.")
    def project(project: str) -> dict:
        workspace.project_dir(project)
        return project_json(project)

    @api.post("/projects/{project}/classes", status_code=201, summary="Create a class (a sub-folder).")
    def create_class(project: str, body: Named) -> dict:
        workspace.create_class(project, body.name)
        return project_json(project)

    @api.post("/projects/{project}/classes/{name}/images", status_code=201,
              summary="Add photos to a class: multipart files, each decoded (bomb guard) before any is saved.")
    async def upload(project: str, name: str, request: Request) -> dict:
        await asyncio.to_thread(workspace.class_dir, project, name)  # 4xx before the body is read
        uploads = await _uploads(request, settings)
        saved = await asyncio.to_thread(workspace.save_images, project, name, uploads, settings.max_pixels)
        return {"saved": saved, **project_json(project)}

    @api.get("/projects/{project}/classes/{name}/images", summary="The photos of a class (paths in the project, "
                                                                   "with their thumbnails' addresses).")
    def class_images(project: str, name: str) -> dict:
        paths = workspace.images(project, name)
        return {"project": project, "class": name,
                "images": [{"path": p, "thumbnail": image_url(project, p)} for p in paths]}

    @api.patch("/projects/{project}/classes/{name}", summary="Rename a class (its folder); 409 when the name is "
                                                             "taken or a train runs.")
    def rename_class(project: str, name: str, body: Named) -> dict:
        workspace.class_dir(project, name)
        jobs.refuse_while_running(project, "change its photos")
        workspace.rename_class(project, name, body.name)
        return project_json(project)

    @api.delete("/projects/{project}/classes/{name}", summary="Move a class with its photos to the studio's bin "
                                                              "(.studio/bin: nothing is deleted).")
    def delete_class(project: str, name: str) -> dict:
        folder = workspace.class_dir(project, name)
        jobs.refuse_while_running(project, "change its photos")
        kept = workspace.discard(project, name, folder)
        return {"binned": str(kept.relative_to(workspace.root)), **project_json(project)}

    @api.delete("/projects/{project}/image", summary="Move one photo to the studio's bin (.studio/bin).")
    def delete_image(project: str, path: str = Query(max_length=1000)) -> dict:
        from tlearn.studio.review import project_file

        real = project_file(workspace, project, path)
        jobs.refuse_while_running(project, "change its photos")
        relative = real.relative_to(workspace.project_dir(project)).as_posix()
        kept = workspace.discard(project, relative, real)
        return {"binned": str(kept.relative_to(workspace.root)), **project_json(project)}

    @api.get("/projects/{project}/doctor", summary="tlearn doctor on the project: unreadable files, duplicates "
                                                   "(exact and near) across classes and splits, too few photos, "
                                                   "each finding with its photos' thumbnails.")
    async def doctor(project: str) -> dict:
        from tlearn.data.doctor import examine_dataset

        data = await asyncio.to_thread(workspace.project_dir, project)
        report = await asyncio.to_thread(examine_dataset, data, progress=False)
        found = report.to_dict()
        for finding in found["findings"]:
            finding["images"] = [{"path": p, "thumbnail": image_url(project, p)} for p in finding["paths"]
                                 if (data / p).is_file()]
        found["root"] = project
        return found

    return api


def _serve_router(workspace: Workspace, servers: ModelServers) -> APIRouter:
    api = APIRouter(prefix="/api/projects/{project}/serve", tags=["serve"])

    @api.post("", status_code=202, summary="Start `tlearn serve` for a version of the model (newest by default) "
                                           "on a free loopback port; replaces the project's running server.")
    def start(project: str, version: Optional[int] = Query(None, ge=1)) -> dict:
        return servers.start(project, version).to_dict()

    @api.get("", summary="The project's server: starting, ready (its /readyz answers) or stopped.")
    def state(project: str) -> dict:
        return servers.state(project).to_dict()

    @api.delete("", summary="Stop the project's server.")
    def stop(project: str) -> dict:
        workspace.project_dir(project)
        return servers.stop(project).to_dict()

    return api


def _train_router(workspace: Workspace, jobs: TrainJobs) -> APIRouter:
    api = APIRouter(prefix="/api/projects/{project}/train", tags=["train"])

    @api.post("", status_code=202, summary="Start `tlearn train` on the project (409 while one runs).")
    def start(project: str, body: Annotated[Optional[dict], Body()] = None) -> dict:
        return jobs.start(project, TrainOptions.from_json(body or {})).to_dict()

    @api.get("", summary="The project's running or last train.")
    def state(project: str) -> dict:
        workspace.project_dir(project)
        job = jobs.last(project)
        if job is None:
            raise Rejection(404, "job", f"project {project!r} has not been trained in this workspace")
        return job.to_dict()

    @api.delete("", summary="Cancel the project's running train.")
    def cancel(project: str) -> dict:
        return jobs.cancel(project).to_dict()

    @api.get("/events", summary="Server-sent events: the train's state, each line of its log (id: its offset), "
                                "and 'end' with the final state.")
    def events(project: str, request: Request) -> StreamingResponse:
        workspace.project_dir(project)
        last_id = request.headers.get("last-event-id", "0")
        offset = int(last_id) if last_id.isdigit() else 0
        return StreamingResponse(_events(jobs, project, offset), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return api


async def _events(jobs: TrainJobs, project: str, offset: int):
    job = await asyncio.to_thread(jobs.last, project)
    yield _event("state", job.to_dict() if job else None)
    while True:
        job = await asyncio.to_thread(jobs.last, project)  # before the log: a finished job's log is then whole
        lines, offset = await asyncio.to_thread(jobs.read_log, project, offset)
        for position, text in lines:
            yield _event("log", text, position)
        if job is None or job.state != "running":
            if lines:
                continue  # a long log: read it to its end before the last state
            yield _event("end", job.to_dict() if job else None)  # the page closes the stream on this one
            return
        await asyncio.sleep(EVENT_POLL_S)


def _event(kind: str, data, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n"


def _predict_router(models: "ModelCache", settings: StudioSettings) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["predict"])

    @api.post("/projects/{project}/predict", summary="The top classes of one image (multipart file or raw "
                                                     "image/* body) by the project's trained model.")
    async def predict(project: str, request: Request) -> dict:
        predictor = await asyncio.to_thread(models.get, project)
        body = await read_body(request, settings)
        image = (await encoded_images(request.headers, body, 1))[0]
        identify(image, 0, settings.max_pixels)  # the header alone: the Predictor then decodes it
        row = (await asyncio.to_thread(predictor.predict, [image], TOP_K))[0]
        if not hasattr(row, "top"):
            raise Rejection(422, "decodable-image", f"image 0: {row.reason}", index=0)
        return {"project": project, "label": row.top_label,
                "top": [{"label": label, "score": score} for label, score in row.top],
                "classes": predictor.classes, "heatmap_png": await asyncio.to_thread(_heatmap, predictor, image,
                                                                                      settings.max_pixels)}

    @api.get("/projects/{project}/test-images", summary="The model's test photos with given and predicted class "
                                                       "and confidence, least confident first (a confusion cell's "
                                                       "photos: filter by given and predicted).")
    async def test_images(project: str, version: Optional[int] = Query(None, ge=1),
                          given: Optional[str] = Query(None, max_length=200),
                          predicted: Optional[str] = Query(None, max_length=200)) -> dict:
        rows = await asyncio.to_thread(models.test_images, project, version)
        chosen = [r for r in rows if (given is None or r["given"] == given) and
                  (predicted is None or r["predicted"] == predicted)]
        return {"project": project, "images": [{**r, "thumbnail": image_url(project, r["path"])} for r in chosen]}

    @api.post("/projects/{project}/explain", summary="The heat map of one photo of the project (its path) for its "
                                                     "top class or a class named, as base64 PNG.")
    async def explain(project: str, path: str = Query(max_length=1000), version: Optional[int] = Query(None, ge=1),
                      class_: Optional[str] = Query(None, alias="class", max_length=200)) -> dict:
        from tlearn.serve.explain import explained
        from tlearn.studio.review import project_file

        predictor = await asyncio.to_thread(models.get, project, version)
        image = (await asyncio.to_thread(project_file, models.workspace, project, path)).read_bytes()
        explanation, png = await asyncio.to_thread(explained, predictor, image, class_, settings.max_pixels)
        import base64

        return {"project": project, "path": path, "class": explanation.label,
                "probability": explanation.probability, "heatmap_png": base64.b64encode(png).decode("ascii")}

    return api


def _heatmap(predictor, image: bytes, max_pixels: int) -> str | None:
    """The top-1 class's heat map over the photo, as base64 PNG; None when the model has no feature map."""
    import base64

    from tlearn.serve.explain import explained

    try:
        _, png = explained(predictor, image, None, max_pixels)
    except Rejection:
        return None
    return base64.b64encode(png).decode("ascii")


class ModelCache:
    """The Predictor of each project's trained model, loaded once per model folder (a new train: a new folder)."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[tuple[int, int], object]] = {}
        self._tests: dict[str, tuple[object, list[dict]]] = {}

    def get(self, project: str, version: int | None = None):
        from tlearn.predict import Predictor

        self.workspace.project_dir(project)
        folder = self.workspace.model_dir(project, version)
        name = f"{project}/{folder.name}"
        with self._lock:
            try:
                info = os.stat(folder / "config.json")
            except FileNotFoundError:
                raise Rejection(409, "model", f"project {project!r} has no trained model yet: train it first") \
                    from None
            key = (info.st_ino, info.st_mtime_ns)
            cached = self._loaded.get(name)
            if cached is None or cached[0] != key:
                self._loaded[name] = (key, Predictor.load(folder, batch_size=1))
            return self._loaded[name][1]

    def test_images(self, project: str, version: int | None = None) -> list[dict]:
        """The model's own test photos, each with its given and predicted class and the calibrated probability of
        the prediction (what a confusion cell opens), least confident first; computed once per model folder."""
        from tlearn.bundle import Bundle

        predictor = self.get(project, version)
        folder = self.workspace.model_dir(project, version)
        name = f"{project}/{folder.name}"
        with self._lock:
            if name in self._tests and self._tests[name][0] is predictor:
                return self._tests[name][1]
        bundle = Bundle.load(folder, tensors=False)
        data = self.workspace.project_dir(project)
        rows = []
        recorded = bundle.split.get("files", {}).get("test", [])
        names = bundle.split.get("classes") or bundle.classes
        present = [(relative, label) for relative, label in recorded if (data / relative).is_file()]
        for (relative, label), row in zip(present, predictor.predict([data / r for r, _ in present], 1)):
            if hasattr(row, "top"):
                given = label if isinstance(label, str) else names[int(label)]
                rows.append({"path": relative, "given": given, "predicted": row.top_label,
                             "confidence": float(row.top[0][1])})
        rows.sort(key=lambda r: r["confidence"])
        with self._lock:
            self._tests[name] = (predictor, rows)
        return rows


async def _uploads(request: Request, settings: StudioSettings) -> list[Upload]:
    """The files of a multipart upload: 413 over --max-body-mb or --max-images, 400 for none or a bad body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise Rejection(415, "content-type", f"upload photos as multipart/form-data files, not "
                                             f"{content_type or '(no content type)'!r}")
    body = await read_body(request, settings)
    uploads = [Upload(name or "photo", content)
               for name, content in await multipart_files(request.headers, body, settings.max_images)]
    check_image_count(len(uploads), settings.max_images)
    return uploads


def _add_errors(app: FastAPI) -> None:
    """tlearn serve's JSON refusals, and a user's error (a setting out of range) as a 400 naming it."""
    add_errors(app)

    @app.exception_handler(TlearnError)
    async def user_error(request: Request, exc: TlearnError) -> JSONResponse:
        status = 507 if isinstance(exc, OutputError) else 400
        refused = Rejection(status, type(exc).__name__, str(exc))
        return JSONResponse(refused.body(), status_code=refused.status)

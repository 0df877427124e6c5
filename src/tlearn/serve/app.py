"""The FastAPI application: health, metrics, the web page, the protocol routers, and errors as JSON."""
from __future__ import annotations

import contextlib
import json
import logging
import time
from importlib.resources import files
from typing import Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from tlearn.serve import explain, kserve, torchserve, v1
from tlearn.serve.limits import Rejection, ServeSettings, check_token
from tlearn.serve.service import InferenceService

log = logging.getLogger("uvicorn.error")  # configured by uvicorn: our lines go where its own go


def create_app(predictor, settings: ServeSettings) -> FastAPI:
    """An app serving `predictor` (see tlearn.predict.Predictor); its service is `app.state.service`."""
    service = InferenceService(predictor, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()
        log.info("tlearn serve: answered %d of the %d requests received", service.answered, service.received)

    # the schema and its docs page are routes of their own, so that they ask for the token like every other route
    # that tells what the server holds
    app = FastAPI(title=f"tlearn: {settings.name}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service
    add_errors(app, on_rejection=lambda limit: service.metrics.rejections.labels(limit).inc())
    app.add_middleware(RequestMetrics, service=service)

    def authorised(request: Request) -> None:
        check_token(settings, request)

    secured = [Depends(authorised)]
    app.include_router(_health_router(service))
    app.include_router(kserve.public_router(service))
    app.include_router(torchserve.public_router(service))
    app.include_router(v1.router(service), dependencies=secured)
    app.include_router(explain.router(service), dependencies=secured)
    app.include_router(kserve.router(service), dependencies=secured)
    app.include_router(torchserve.router(service), dependencies=secured)

    @app.get("/metrics", dependencies=secured, include_in_schema=False)
    def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/openapi.json", dependencies=secured, include_in_schema=False)
    def schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=secured, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    page = files("tlearn.serve").joinpath("page.html").read_text(encoding="utf-8")
    page = page.replace("__TLEARN_MODEL_NAME__", json.dumps(settings.name).replace("</", "<\\/"))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def _health_router(service: InferenceService) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    def healthz() -> dict:
        return {"status": "alive"}

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        state = "draining" if service.draining else "ready" if service.ready else "warming up"
        return JSONResponse({"status": state}, status_code=200 if state == "ready" else 503)

    return router


def add_errors(app: FastAPI, on_rejection: Callable[[str], None] = lambda limit: None) -> None:
    """Every refusal is JSON naming its limit (`on_rejection(limit)` counts it); an unexpected error is a bare 500
    (the traceback goes to the log)."""

    @app.exception_handler(Rejection)
    async def rejected(request: Request, exc: Rejection) -> JSONResponse:
        on_rejection(exc.limit)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return await rejected(request, Rejection(400, "parameters", message))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return await rejected(request, Rejection(exc.status_code, "route", str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal server error (see the server log)", "limit": "internal",
                             "status": 500}, status_code=500)


class RequestMetrics:
    """ASGI middleware: counts every HTTP answer by route template and status, and times it."""

    def __init__(self, app, service: InferenceService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, complete = time.perf_counter(), 500, False
        self.service.received += 1

        async def sending(message):
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            complete = complete or (message["type"] == "http.response.body" and not message.get("more_body"))

        try:
            await self.app(scope, receive, sending)
        finally:
            self.service.answered += complete
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            self.service.metrics.observe_request(name, status, time.perf_counter() - started)

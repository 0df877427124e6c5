"""TorchServe-style `POST /predictions/{name}` (what people try with `curl -T photo.jpg`) and `GET /ping`."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from tlearn.serve.inputs import encoded_images
from tlearn.serve.limits import read_body
from tlearn.serve.v1 import known


def router(service) -> APIRouter:
    api = APIRouter(tags=["torchserve"])

    # PUT too: `curl -T photo.jpg URL`, TorchServe's own example, uploads with PUT
    @api.api_route("/predictions/{name}", methods=["POST", "PUT"], summary="One image -> {label: probability} "
                   "(top 5, best first); several (multipart) -> a list of those, in order.")
    @api.api_route("/predictions/{name}/{version}", methods=["POST", "PUT"], include_in_schema=False)
    async def predictions(name: str, request: Request, top_k: Annotated[int, Query(ge=1)] = 5,
                          version: str | None = None):
        known(service, name)
        body = await read_body(request, service.settings)
        images = await encoded_images(request.headers, body, service.settings.max_images)
        ranked = service.ranked(await service.classify(images), top_k, None)
        answers = [dict(p.top) for p in ranked]
        return answers[0] if len(answers) == 1 else answers

    return api


def public_router(service) -> APIRouter:
    api = APIRouter(tags=["torchserve"])

    @api.get("/ping", summary="TorchServe's health check (no token needed).")
    def ping() -> JSONResponse:
        healthy = service.ready and not service.draining
        return JSONResponse({"status": "Healthy" if healthy else "Unhealthy"}, status_code=200 if healthy else 503)

    return api

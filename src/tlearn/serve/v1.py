"""`POST /v1/predict` (multipart files, a raw image body, or TF Serving / KServe v1 JSON) and the model card."""
from __future__ import annotations

from typing import Annotated, Optional

from fastapi import APIRouter, Query, Request

from tlearn.serve.inputs import encoded_images
from tlearn.serve.limits import Rejection, read_body

TopK = Annotated[int, Query(ge=1, description="Labels per image, best first.")]
MinConfidence = Annotated[Optional[float], Query(ge=0, le=1, description="Label 'uncertain' below this calibrated "
                                                                         "top probability [default: the server's].")]


def router(service) -> APIRouter:
    api = APIRouter(tags=["v1"])

    async def predict(request: Request, top_k: TopK = 1, min_confidence: MinConfidence = None) -> dict:
        body = await read_body(request, service.settings)
        images = await encoded_images(request.headers, body, service.settings.max_images)
        probabilities = await service.classify(images)
        return {"predictions": [prediction_json(p) for p in service.ranked(probabilities, top_k, min_confidence)],
                "model": service.identity}

    api.add_api_route("/v1/predict", predict, methods=["POST"],
                      summary="Classify images: multipart files (any field name), a raw image/* body, or JSON "
                              '{"instances": [{"b64": ...}]}; predictions in input order.')

    @api.post("/v1/models/{name}:predict", summary="KServe v1 spelling of /v1/predict.")
    async def predict_named(name: str, request: Request, top_k: TopK = 1,
                            min_confidence: MinConfidence = None) -> dict:
        known(service, name)
        return await predict(request, top_k, min_confidence)

    @api.get("/v1/models/{name}", summary="The model card: classes, backbone, metrics with CIs, weights source.")
    def model(name: str) -> dict:
        known(service, name)
        return {"name": name, "ready": service.ready, "card": service.card()}

    return api


def prediction_json(prediction) -> dict:
    return {"label": prediction.label, "score": prediction.score, "uncertain": prediction.uncertain,
            "top_k": [{"label": label, "score": score} for label, score in prediction.top]}


def known(service, name: str) -> None:
    if name != service.settings.name:
        raise Rejection(404, "model-name", f"no model named {name!r} here; this server serves "
                                           f"{service.settings.name!r}")

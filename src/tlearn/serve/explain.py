"""`POST /v1/explain`: the heat map of one image (a class activation map), as JSON with the overlay, or a PNG."""
from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from tlearn.data.decode import DecodeError
from tlearn.errors import BundleError, EngineError, InvalidParameter
from tlearn.serve.inputs import encoded_images
from tlearn.serve.limits import Rejection, read_body

ClassName = Annotated[Optional[str], Query(alias="class", description="Class to explain [default: the top-1].")]
Format = Annotated[Literal["json", "png"], Query(description="json: the map and the overlay (base64 PNG); png: "
                                                             "the overlay alone.")]


def router(service) -> APIRouter:
    api = APIRouter(tags=["explain"])

    @api.post("/v1/explain", summary="Where the evidence for a class lies in one image (multipart file, raw "
                                     'image/* body, or JSON {"instances": [{"b64": ...}]}): the class, its '
                                     "probability, the map on the model's feature grid over its crop box, and the "
                                     "overlay as PNG.")
    async def explain(request: Request, class_: ClassName = None, format: Format = "json"):
        body = await read_body(request, service.settings)
        images = await encoded_images(request.headers, body, service.settings.max_images)
        if len(images) != 1:
            raise Rejection(400, "images", f"explain takes one image per request, not {len(images)}")
        service.decoder.check_header(images[0], 0)
        with service.admission:
            try:
                async with asyncio.timeout(service.settings.timeout_s):
                    explanation, png = await asyncio.get_running_loop().run_in_executor(
                        service.decoder.pool, explained, service.predictor, images[0], class_,
                        service.settings.max_pixels)
            except TimeoutError:
                raise Rejection(504, "timeout-s", f"no answer within {service.settings.timeout_s:g} s "
                                                  "(--timeout-s)") from None
        if format == "png":
            return Response(png, media_type="image/png")
        return {"explanation": {**explanation.to_dict(), "source": "<image 0>"},
                "overlay_png": base64.b64encode(png).decode("ascii"), "model": service.identity}

    return api


def explained(predictor, image: bytes, class_: str | None, max_pixels: int):
    """(Explanation, overlay PNG) of one encoded image; refusals as Rejections."""
    from tlearn.explain import overlay_png, shown_picture

    try:
        explanation = predictor.explain(image, class_, max_pixels=max_pixels)
        return explanation, overlay_png(shown_picture(image), explanation)
    except InvalidParameter as exc:
        raise Rejection(400, "class", str(exc)) from None
    except DecodeError as exc:
        raise Rejection(422, "decodable-image", f"image 0: {exc.reason}", index=0) from None
    except (BundleError, EngineError) as exc:
        raise Rejection(501, "feature-map", str(exc)) from None

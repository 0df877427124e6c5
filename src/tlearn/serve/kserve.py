"""KServe v2 / Open Inference Protocol over HTTP, with the binary tensor extension (what tritonclient sends).

Input: one tensor named `image`, either BYTES of shape [N] (encoded JPEG/PNG/..., as OpenVINO Model Server takes
them; in JSON each element is base64) or UINT8 RGB pixels of shape [N, H, W, 3]. Outputs: `probabilities` FP32
[N, classes] (calibrated) and `label` BYTES [N] (the top class).
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

import tlearn
from tlearn.serve.inputs import check_image_count, decode_b64
from tlearn.serve.limits import Rejection, json_count, json_object, parse_json, read_body
from tlearn.serve.v1 import known

INPUT = "image"
OUTPUTS = ("probabilities", "label")
HEADER_LENGTH = "Inference-Header-Content-Length"


def public_router(service) -> APIRouter:
    api = APIRouter(tags=["kserve-v2"])

    @api.get("/v2", summary="Server metadata.")
    def server() -> dict:
        return {"name": "tlearn", "version": getattr(tlearn, "__version__", ""), "extensions": ["binary_tensor_data"]}

    @api.get("/v2/health/live")
    def live() -> dict:
        return {"live": True}

    @api.get("/v2/health/ready")
    def ready() -> JSONResponse:
        ok = service.ready and not service.draining
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    return api


def router(service) -> APIRouter:
    api = APIRouter(tags=["kserve-v2"])
    paths = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")

    def metadata(name: str, version: str | None = None) -> dict:
        known(service, name)
        size, classes = service.predictor.input_size, len(service.classes)
        return {"name": name, "versions": ["1"], "platform": f"tlearn_{service.identity['engine'] or 'engine'}",
                "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1],
                            "parameters": {"also_accepts": {"datatype": "UINT8", "shape": [-1, -1, -1, 3]},
                                           "model_input_size": [size, size]}}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
                            {"name": "label", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"classes": service.classes}}

    def model_ready(name: str, version: str | None = None) -> JSONResponse:
        known(service, name)
        ok = service.ready and not service.draining
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        known(service, name)
        body = await read_body(request, service.settings)
        # JSON tensors can be megabytes of numbers: parsed in a thread, the event loop keeps serving
        call = await asyncio.to_thread(parse_infer, body, request.headers.get(HEADER_LENGTH), service.settings)
        probabilities = await service.classify(call.images)
        labels = [service.classes[i] for i in probabilities.argmax(axis=1)]
        return encode_outputs(call, name, probabilities.astype(np.float32), labels)

    for path in paths:
        api.add_api_route(path, metadata, methods=["GET"], summary="Model metadata: inputs and outputs.")
        api.add_api_route(path + "/ready", model_ready, methods=["GET"])
        api.add_api_route(path + "/infer", infer, methods=["POST"], summary="Inference (JSON or binary tensors).")
    return api


@dataclass
class InferCall:
    id: str | None
    images: list[bytes | np.ndarray]
    outputs: list[tuple[str, bool]]   # (name, as binary)


def parse_infer(body: bytes, header_length: str | None, settings) -> InferCall:
    """The request's images and the outputs it asks for; 400 on anything the protocol does not allow."""
    split = _header_length(header_length, len(body))
    request = json_object(parse_json(memoryview(body)[:split], "v2-request"), "the request", "v2-request")
    inputs, wanted = request.get("inputs"), request.get("outputs")
    binary_default = request_flag(json_object(request.get("parameters"), "parameters", "v2-request"),
                                  "binary_data_output", False)
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict) \
            or inputs[0].get("name") != INPUT:
        raise Rejection(400, "v2-inputs", f"send exactly one input tensor, named {INPUT!r}")
    images = _images(inputs[0], memoryview(body)[split:], settings)
    if wanted is not None and (not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted)):
        raise Rejection(400, "v2-outputs", 'outputs must be a list of objects such as {"name": "label"}')
    outputs = [(o.get("name"), request_flag(json_object(o.get("parameters"), "an output's parameters",
                                                        "v2-outputs"), "binary_data", binary_default))
               for o in wanted] if wanted else [(name, binary_default) for name in OUTPUTS]
    unknown = [name for name, _ in outputs if name not in OUTPUTS]
    if unknown:
        raise Rejection(400, "v2-outputs", f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
    return InferCall(request.get("id"), images, outputs)


def request_flag(parameters: dict, name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise Rejection(400, "v2-request", f"parameter {name} must be true or false, not {value!r:.40}")
    return value


def _header_length(value: str | None, body_length: int) -> int:
    if value is None:
        return body_length
    if not value.isdigit() or int(value) > body_length:
        raise Rejection(400, "v2-request", f"{HEADER_LENGTH} {value!r} does not fit a body of {body_length} bytes")
    return int(value)


def _images(tensor: dict, binary: memoryview, settings) -> list[bytes | np.ndarray]:
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool)
                                                                  and d >= 0 for d in shape):
        raise Rejection(400, "v2-inputs", f"input shape {shape!r} is not a list of sizes")
    check_image_count(shape[0], settings.max_images)
    size = json_object(tensor.get("parameters"), "the input's parameters", "v2-inputs").get("binary_data_size")
    size = None if size is None else json_count(size, "binary_data_size", "v2-inputs")
    raw = bytes(binary[:size]) if size is not None else None
    if size is not None and len(raw) != size:
        raise Rejection(400, "v2-inputs", f"binary_data_size {size} is larger than the binary data sent")
    if datatype == "BYTES":
        items = _split_bytes(raw) if raw is not None else [decode_b64(s, i) for i, s in
                                                            enumerate(_flat_strings(tensor.get("data")))]
        if len(items) != int(np.prod(shape)) or not (len(shape) == 1 or shape[1:] == [1]):
            raise Rejection(400, "v2-inputs", f"BYTES input must have shape [N] with N elements, got {shape} and "
                                              f"{len(items)} elements")
        return items
    if datatype == "UINT8":
        return _pixel_arrays(raw, tensor.get("data"), shape, settings.max_pixels)
    raise Rejection(415, "v2-datatype", f"input datatype {datatype!r}: send BYTES (encoded images) or UINT8 "
                                        "pixels [N, H, W, 3]")


def _split_bytes(raw: bytes) -> list[bytes]:
    """The v2 binary BYTES layout: each element is a 4-byte little-endian length followed by its bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise Rejection(400, "v2-inputs", "truncated BYTES tensor (a length prefix is cut)")
        length = int.from_bytes(raw[offset:offset + 4], "little")
        offset += 4
        if offset + length > len(raw):
            raise Rejection(400, "v2-inputs", "truncated BYTES tensor (an element is shorter than its length)")
        items.append(raw[offset:offset + length])
        offset += length
    return items


def _flat_strings(data) -> list[str]:
    flat = np.asarray(data if data is not None else [], dtype=object).ravel().tolist()
    if not all(isinstance(s, str) for s in flat):
        raise Rejection(400, "v2-inputs", "BYTES data in JSON must be base64 strings")
    return flat


def _pixel_arrays(raw: bytes | None, data, shape: list[int], max_pixels: int) -> list[np.ndarray]:
    if len(shape) != 4 or shape[3] != 3:
        raise Rejection(400, "v2-inputs", f"UINT8 input must have shape [N, H, W, 3], got {shape}")
    if shape[1] * shape[2] > max_pixels:
        raise Rejection(413, "max-pixels", f"{shape[1]}x{shape[2]} pixels per image, over the limit of "
                                           f"{max_pixels:,} (--max-pixels)")
    try:
        flat = np.frombuffer(raw, np.uint8) if raw is not None else np.asarray(data, np.uint8).ravel()
        return list(flat.reshape(shape))
    except (ValueError, TypeError, OverflowError) as exc:
        raise Rejection(400, "v2-inputs", f"UINT8 data does not match shape {shape} ({exc})") from None


def encode_outputs(call: InferCall, name: str, probabilities: np.ndarray, labels: list[str]) -> Response:
    """JSON, or JSON header + binary tensors (with Inference-Header-Content-Length) when any output asks for it."""
    tensors = {"probabilities": ("FP32", list(probabilities.shape), probabilities),
               "label": ("BYTES", [len(labels)], labels)}
    outputs, blobs = [], []
    for output, binary in call.outputs:
        datatype, shape, value = tensors[output]
        entry = {"name": output, "datatype": datatype, "shape": shape}
        if binary:
            blob = value.astype("<f4").tobytes() if datatype == "FP32" else b"".join(
                len(s.encode()).to_bytes(4, "little") + s.encode() for s in value)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = value.ravel().tolist() if datatype == "FP32" else list(value)
        outputs.append(entry)
    header = {"model_name": name, "model_version": "1", "outputs": outputs}
    if call.id is not None:
        header["id"] = call.id
    text = json.dumps(header).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(text + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(text))})

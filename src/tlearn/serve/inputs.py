"""Turn an HTTP request into the encoded images it carries: multipart files, a raw image body, or JSON base64.

Used by the v1 and TorchServe routes (the KServe v2 route reads its own tensor format, see kserve.py).
"""
from __future__ import annotations

import asyncio
import base64
import binascii

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from tlearn.serve.limits import Rejection, parse_json

RAW_TYPES = ("image/", "application/octet-stream")


async def encoded_images(headers: Headers, body: bytes, max_images: int) -> list[bytes]:
    """The images of one request, in order; 415 for a content type we do not read, 413 for too many images."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        images = [content for _, content in await multipart_files(headers, body, max_images)]
    elif content_type == "application/json":
        images = await asyncio.to_thread(_json_instances, body)  # base64 of megabytes: off the event loop
    elif content_type.startswith(RAW_TYPES) or (not content_type and body):
        images = [body]
    else:
        raise Rejection(415, "content-type", f"unsupported content type {content_type or '(none)'!r}: send "
                                             "multipart/form-data files, a raw image/* body, or JSON "
                                             '{"instances": [{"b64": ...}]}')
    return check_count(images, max_images)


def check_count(images: list[bytes], max_images: int) -> list[bytes]:
    check_image_count(len(images), max_images)
    return images


def check_image_count(count: int, max_images: int) -> None:
    if count == 0:
        raise Rejection(400, "images", "the request holds no image")
    if count > max_images:
        raise Rejection(413, "max-images", f"{count} images in one request, over the limit of {max_images} "
                                           "(--max-images)")


async def multipart_files(headers: Headers, body: bytes, max_images: int) -> list[tuple[str | None, bytes]]:
    """(file name as the client gave it, bytes) of every file of a multipart body, in order; 413 past
    `max_images`, 400 for a malformed body."""
    async def stream():
        yield body

    # one more file than allowed is enough to know the request is over the limit
    parser = MultiPartParser(headers, stream(), max_files=max_images + 1, max_fields=1000)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in str(exc):
            raise Rejection(413, "max-images", f"more than {max_images} images in one request (--max-images)")
        raise Rejection(400, "multipart", f"malformed multipart body ({exc})") from None
    try:
        return [(item.filename, await item.read()) for _, item in form.multi_items() if isinstance(item, UploadFile)]
    finally:
        await form.close()


def _json_instances(body: bytes) -> list[bytes]:
    document = parse_json(body, "json")
    try:
        instances = document["instances"]
        if not isinstance(instances, list):
            raise TypeError("instances is not a list")
        return [decode_b64(_b64_field(item), i) for i, item in enumerate(instances)]
    except (ValueError, KeyError, TypeError) as exc:
        raise Rejection(400, "json", 'JSON body must be {"instances": [{"b64": "<base64 image>"}, ...]} '
                                     f"({type(exc).__name__}: {exc})") from None


def _b64_field(item) -> str:
    # TF Serving / KServe v1 spell it {"b64": ...}, or {"image_bytes": {"b64": ...}} in Google's samples
    if isinstance(item, dict) and "image_bytes" in item:
        item = item["image_bytes"]
    if not isinstance(item, dict) or not isinstance(item.get("b64"), str):
        raise TypeError(f"instance {item!r:.60} has no 'b64' string")
    return item["b64"]


def decode_b64(text: str, index: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Rejection(400, "base64", f"image {index} is not valid base64", index=index) from None

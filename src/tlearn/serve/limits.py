"""What a request may cost: the server's settings, the refusal every limit answers with, admission and auth."""
from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass, fields

from starlette.requests import Request

from tlearn.errors import InvalidParameter, check_range


@dataclass(frozen=True)
class ServeSettings:
    """Every knob of `tlearn serve`, checked once at start-up."""

    name: str                            # the model's name in URLs
    max_batch: int = 16                  # most images per engine call
    batch_timeout_ms: float = 5.0        # how long the first image of a batch waits for company
    max_body_mb: float = 20.0            # request body limit
    max_images: int = 32                 # images per request
    max_pixels: int = 40_000_000         # decoded pixels per image (decompression-bomb guard)
    queue: int = 64                      # requests admitted at once (decoding, waiting or running)
    timeout_s: float = 10.0              # per request, from admission to answer
    token: str | None = None             # bearer token; None: no auth
    min_confidence: float | None = None  # default threshold under which a prediction is "uncertain"
    decode_threads: int = 2              # threads decoding images

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name not in ("name", "token", "min_confidence"):
                check_range(f"--{f.name.replace('_', '-')}", getattr(self, f.name), 0, low_open=True)
        if self.min_confidence is not None:
            check_range("--min-confidence", self.min_confidence, 0.0, 1.0)
        if not self.name or "/" in self.name:
            raise InvalidParameter(f"--name must be a non-empty name without '/', not {self.name!r}")
        if self.token is not None and not self.token.strip():
            raise InvalidParameter("the token (--token or $TLEARN_TOKEN) is empty, which would leave the server "
                                   "open to anyone: give a token, or unset TLEARN_TOKEN to serve without one")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1_000_000)


class Rejection(Exception):
    """A request refused on purpose: its HTTP status, the limit (or check) it broke and why, in words.

    Rendered as {"error": message, "limit": name, "status": code[, "index": i]}: `error` is a string so that
    KServe v2 clients, which read that key, show the message.
    """

    def __init__(self, status: int, limit: str, message: str, index: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.limit, self.message, self.index = status, limit, message, index
        self.headers = headers or {}

    def body(self) -> dict:
        body = {"error": self.message, "limit": self.limit, "status": self.status}
        if self.index is not None:
            body["index"] = self.index
        return body


def check_token(settings: ServeSettings, request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer <token>` (compared in constant time)."""
    if settings.token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
        raise Rejection(401, "token", "missing or wrong token: send 'Authorization: Bearer <token>'",
                        headers={"WWW-Authenticate": "Bearer"})


def parse_json(body: bytes | memoryview, limit: str) -> object:
    """The JSON document of a request body; 400 (naming `limit`) for anything that is not JSON, including a document
    nested deeper than the parser's recursion limit (about 1,000 levels) or text that is not UTF-8."""
    try:
        return json.loads(bytes(body))
    except RecursionError:
        raise Rejection(400, limit, "the JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Rejection(400, limit, f"the body is not valid JSON ({exc})") from None


def json_object(value, what: str, limit: str) -> dict:
    """`value` if it is a JSON object (absent: {}), else 400 naming `what`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Rejection(400, limit, f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def json_count(value, what: str, limit: str) -> int:
    """`value` if it is a whole number >= 0 (not a string, a float or a boolean), else 400 naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Rejection(400, limit, f"{what} must be a whole number >= 0, not {value!r:.40}")
    return value


async def read_body(request: Request, settings: ServeSettings) -> bytes:
    """The whole body, or 413 when it is over --max-body-mb (declared or streamed), 408 when it takes longer
    than --timeout-s to arrive.

    An oversized body is still read (and dropped) up to twice the limit, so that the client, which sends its whole
    body before reading, gets the 413 instead of a reset connection; beyond that the connection is simply closed.
    """
    try:
        async with asyncio.timeout(settings.timeout_s):
            return await _bounded_body(request, settings.max_body_bytes)
    except TimeoutError:
        raise Rejection(408, "timeout-s", f"the request body did not arrive within {settings.timeout_s:g} s "
                                          "(--timeout-s)") from None


async def _bounded_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else None
    if declared is not None and declared > 2 * max_bytes:
        raise _too_large(declared, max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= max_bytes:
            chunks.append(chunk)
        elif size > 2 * max_bytes:
            break
    if size > max_bytes:
        raise _too_large(max(size, declared or 0), max_bytes)
    return b"".join(chunks)


def _too_large(size: int, max_bytes: int) -> Rejection:
    return Rejection(413, "max-body-mb", f"request body of {size:,} bytes or more is over the limit of "
                                         f"{max_bytes:,} bytes (--max-body-mb)")


class Admission:
    """Counts requests in the pipeline; past `limit` a request is refused at once (503, Retry-After)."""

    def __init__(self, limit: int):
        self.limit, self.in_flight = limit, 0

    def __enter__(self) -> "Admission":
        if self.in_flight >= self.limit:
            raise Rejection(503, "queue", f"server busy: {self.in_flight} requests already queued (--queue "
                                          f"{self.limit}); retry shortly", headers={"Retry-After": "1"})
        self.in_flight += 1
        return self

    def __exit__(self, *exc) -> None:
        self.in_flight -= 1

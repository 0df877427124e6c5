"""Who may ask the studio anything: its settings, the token on every request, Host and Origin checks.

Every request carries the token, as `Authorization: Bearer T` or as the cookie the page gets when it is opened
with ?token=T (the URL `tlearn studio` prints). A request that changes something (POST, PUT, PATCH, DELETE) must
also come from the studio's own origin when it says where it comes from: another site's page that posts to it is
refused even with the cookie. Bound to loopback, the Host header must name loopback too, so that a site whose
name resolves to 127.0.0.1 (DNS rebinding) is refused.
"""
from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import quote

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from tlearn.errors import InvalidParameter, check_range
from tlearn.serve.limits import Rejection

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


@dataclass(frozen=True)
class StudioSettings:
    """Every knob of `tlearn studio`, checked once at start-up. `token` None: a random one is made."""

    workspace: Path
    host: str = "127.0.0.1"
    port: int = 0                        # 0: any free port (the one bound is filled in before the app is built)
    token: str | None = None
    max_body_mb: float = 50.0            # one request's body (an upload of photos)
    max_images: int = 200                # photos per upload request
    max_pixels: int = 40_000_000         # decoded pixels per image, checked from the header (bomb guard)
    timeout_s: float = 60.0              # for a request body to arrive

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in ("max_body_mb", "max_images", "max_pixels", "timeout_s"):
                check_range(f"--{f.name.replace('_', '-')}", getattr(self, f.name), 0, low_open=True)
        check_range("--port", self.port, 0, 65535)
        if self.token is not None and not self.token.strip():
            raise InvalidParameter("--token is empty, which would leave the studio open to anyone: give a token, "
                                   "or leave --token out to have one made")
        if self.token is None:
            object.__setattr__(self, "token", secrets.token_urlsafe(24))

    @property
    def max_body_bytes(self) -> int:  # read by tlearn.serve.limits.read_body, as ServeSettings' is
        return int(self.max_body_mb * 1_000_000)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def cookie(self) -> str:
        # cookies are shared by every port of a host: one name per port, so two studios do not log each other out
        return f"tlearn-studio-{self.port}"

    def url(self, host: str | None = None) -> str:
        """The URL to open, token included."""
        host = host or self.host
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"http://{host}:{self.port}/?token={quote(self.token, safe='')}"

    def allowed_hosts(self) -> frozenset[str] | None:
        """Host headers accepted (None: any, for a bind wider than loopback, where the token is the guard)."""
        if not self.loopback:
            return None
        bound = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return frozenset(f"{name}:{self.port}" for name in {*LOOPBACK_NAMES, bound})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class StudioGuard:
    """ASGI middleware in front of every route: Host, token, then Origin for a change; refusals as JSON."""

    def __init__(self, app, settings: StudioSettings):
        self.app, self.settings = app, settings
        self.hosts = settings.allowed_hosts()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        try:
            self.check(HTTPConnection(scope), scope.get("method", "GET"))
        except Rejection as refused:
            response = JSONResponse(refused.body(), status_code=refused.status, headers=refused.headers)
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, request: HTTPConnection, method: str) -> None:
        host = request.headers.get("host", "")
        if self.hosts is not None and host.lower() not in self.hosts:
            raise Rejection(403, "host", f"Host {host!r:.80} is not this studio's address: open the URL "
                                         "`tlearn studio` printed")
        if not self.authorised(request):
            raise Rejection(401, "token", "missing or wrong token: open the URL `tlearn studio` printed (it ends "
                                          "in ?token=...), or send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
        origin = request.headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and origin.lower() != f"http://{host.lower()}":
            raise Rejection(403, "origin", f"a {method} from another site ({origin!r:.80}) is refused: changes "
                                           "come from the studio's own page")

    def authorised(self, request: HTTPConnection) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        candidates = [given.strip()] if scheme.lower() == "bearer" else []
        candidates.append(request.cookies.get(self.settings.cookie, ""))
        if request.url.path == "/":
            candidates.append(request.query_params.get("token", ""))
        expected = self.settings.token.encode()
        return any(c and hmac.compare_digest(c.encode(), expected) for c in candidates)

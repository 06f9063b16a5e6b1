"""Pure-ASGI middleware: request id + client address in the request context, Prometheus metrics by route
template, and a cap on request body size."""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Callable

from prometheus_client import REGISTRY
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core.metrics import RequestMetrics
from services.core.request_context import RequestContext, reset_request, set_request

# requests and latency by method and route template: plain counts exported by a collector (services/core/metrics.py:
# ~0.5 µs a request where prometheus_client's Counter + Histogram took ~5-7 µs, on the edge's fast lane too)
HTTP_METRICS = RequestMetrics(
    "vecta_http_requests",
    "HTTP requests",
    "vecta_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REGISTRY.register(HTTP_METRICS)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Request ids: 32 hex characters like a uuid4's, from a random per-process prefix and a counter (a uuid4 costs a
# getrandom system call and an object per request; ids need to be unique, not secret).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


def request_id_from(value: bytes | None) -> str:
    """The client's ``X-Request-Id`` when it is well formed, else a new id."""
    if value is not None:
        candidate = value.decode("latin-1")
        if _REQUEST_ID.match(candidate):
            return candidate
    return new_request_id()


def observe(method: str, route: str, status: int, seconds: float) -> None:
    """Record one request in the metrics."""
    HTTP_METRICS.observe((method, route), status, seconds)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        user_agent = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value
            elif name == b"user-agent":
                user_agent = value.decode("latin-1")[:300]
        request_id = request_id_from(rid)
        client = scope.get("client")
        ctx = RequestContext(request_id=request_id, ip=client[0] if client else None, user_agent=user_agent)
        token = set_request(ctx)
        status = 500
        started = time.perf_counter()
        rid_header = (b"x-request-id", request_id.encode())

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            reset_request(token)
            observe(scope["method"], route_template(scope) or "<unmatched>", status, time.perf_counter() - started)


def route_template(scope: Scope) -> str | None:
    """The matched route's full path template (``/v1/orgs/{org_id}``), or None when no route matched.

    FastAPI >= 0.16x includes routers lazily: ``scope["route"]`` is then the route as declared in its router
    (without the include prefix) and the full template is on the effective route context.
    """
    if "vecta.route" in scope:  # served by the data-plane edge, past the router
        return str(scope["vecta.route"])
    effective = (scope.get("fastapi") or {}).get("effective_route_context")
    for candidate in (getattr(effective, "starlette_route", None), effective, scope.get("route")):
        path = getattr(candidate, "path_format", None) or getattr(candidate, "path", None)
        if isinstance(path, str) and path:
            return path
    return None


class BodySizeLimitMiddleware:
    """Answers 413 before reading more than ``max_bytes`` of a request body (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: Callable[[str], bool] = lambda path: False) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(scope, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(scope, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        import orjson

        from services.core.errors import PROBLEM_CONTENT_TYPE, problem_for_status

        body = orjson.dumps(
            problem_for_status(
                413, f"request body exceeds {self.max_bytes} bytes", "payload_too_large", scope.get("path")
            )
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                    (b"content-length", b"%d" % len(body)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass

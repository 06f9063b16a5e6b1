"""One place that turns every error into an RFC 9457 problem document."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from services.api.middleware import route_template
from services.core import audit
from services.core.errors import PROBLEM_CONTENT_TYPE, Forbidden, VectaError, problem_for_status

log = logging.getLogger("vecta.api")

_HTTP_CODES = {
    404: "route_not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def problem_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=body["status"], media_type=PROBLEM_CONTENT_TYPE, headers=headers)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or ".".join(str(p) for p in loc)


def validation_problem(exc: RequestValidationError, instance: str) -> dict[str, Any]:
    errors = []
    for err in exc.errors():
        loc = err.get("loc", ())
        where = loc[0] if loc else "body"
        errors.append({"field": _loc(loc), "in": where, "message": err.get("msg", "invalid")})
    if errors:
        first = errors[0]
        detail = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
        if len(errors) > 1:
            detail += f" (and {len(errors) - 1} more)"
    else:
        detail = "invalid request"
    body = problem_for_status(400, detail, "validation_error", instance)
    body["errors"] = errors
    return body


_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def _audit_denied(request: Request, exc: VectaError) -> None:
    """A refused mutation is audited in a transaction of its own (the request's was rolled back)."""
    subject = getattr(request.state, "subject", None)
    if subject is None:
        return
    template = route_template(request.scope) or request.url.path
    params = request.path_params
    try:
        async with request.app.state.db.transaction() as session:
            audit.record(
                session,
                action=f"{request.method} {template}",
                org_id=params.get("org_id"),
                actor_type=subject.kind,
                actor_id=subject.id,
                target_id=next((v for k, v in params.items() if k.endswith("_id") and k != "org_id"), None),
                result="denied",
                details={"reason": exc.detail},
            )
    except Exception:
        log.exception("could not write the audit record of a denied request")


def install(app: FastAPI) -> None:
    @app.exception_handler(VectaError)
    async def _vecta(request: Request, exc: VectaError) -> Response:
        if isinstance(exc, Forbidden) and request.method in _MUTATING:
            await _audit_denied(request, exc)
        return problem_response(exc.problem(request.url.path), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return problem_response(validation_problem(exc, request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route for {request.method} {request.url.path}"
        return problem_response(
            problem_for_status(exc.status_code, detail, code, request.url.path), dict(exc.headers or {})
        )

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            problem_for_status(500, "an internal error occurred; it has been logged", "internal_error")
        )

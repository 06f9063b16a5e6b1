"""Typed error hierarchy, rendered as RFC 9457 problem documents by one handler.

Every error the API (or the engine) raises on purpose is a :class:`VectaError` subclass. Each carries an HTTP
status, a stable machine-readable ``code`` and a human ``detail``. ``problem()`` renders the body;
``services.api.errors`` (and the engine's server) turn it into an ``application/problem+json`` response.
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://docs.vecta.dev/errors/"


class VectaError(Exception):
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal Server Error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.default_code
        self.headers = headers or {}
        self.extra = extra or {}

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


class BadRequest(VectaError):
    status = 400
    title = "Bad Request"
    default_code = "bad_request"


class Unauthorized(VectaError):
    status = 401
    title = "Unauthorized"
    default_code = "unauthorized"

    def __init__(self, detail: str = "Missing or invalid credentials", **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(detail, **kw)


class PaymentRequired(VectaError):
    status = 402
    title = "Payment Required"
    default_code = "payment_required"


class Forbidden(VectaError):
    status = 403
    title = "Forbidden"
    default_code = "forbidden"


class NotFound(VectaError):
    status = 404
    title = "Not Found"
    default_code = "not_found"


class MethodNotAllowed(VectaError):
    status = 405
    title = "Method Not Allowed"
    default_code = "method_not_allowed"


class Conflict(VectaError):
    status = 409
    title = "Conflict"
    default_code = "conflict"


class PayloadTooLarge(VectaError):
    status = 413
    title = "Payload Too Large"
    default_code = "payload_too_large"


class UnsupportedMediaType(VectaError):
    status = 415
    title = "Unsupported Media Type"
    default_code = "unsupported_media_type"


class Unprocessable(VectaError):
    status = 422
    title = "Unprocessable Content"
    default_code = "unprocessable"


class TooManyRequests(VectaError):
    status = 429
    title = "Too Many Requests"
    default_code = "rate_limited"

    def __init__(self, detail: str, *, retry_after: int = 1, **kw: Any) -> None:
        headers = dict(kw.pop("headers", None) or {})
        headers["Retry-After"] = str(max(1, int(retry_after)))
        super().__init__(detail, headers=headers, **kw)


class ServiceUnavailable(VectaError):
    status = 503
    title = "Service Unavailable"
    default_code = "unavailable"

    def __init__(self, detail: str, *, retry_after: int = 5, **kw: Any) -> None:
        headers = dict(kw.pop("headers", None) or {})
        headers["Retry-After"] = str(max(1, int(retry_after)))
        super().__init__(detail, headers=headers, **kw)


STATUS_TITLES: dict[int, str] = {
    cls.status: cls.title
    for cls in (
        BadRequest,
        Unauthorized,
        PaymentRequired,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        Unprocessable,
        TooManyRequests,
        ServiceUnavailable,
    )
}
STATUS_TITLES[500] = VectaError.title


def problem_for_status(status: int, detail: str, code: str, instance: str | None = None) -> dict[str, Any]:
    """A problem body for a status that did not come from a VectaError (e.g. an unknown route)."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": STATUS_TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    return body

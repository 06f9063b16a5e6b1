"""Per-request context (request id, client ip) and the buffer of tasks to enqueue after the commit."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestContext:
    request_id: str
    ip: str | None = None
    user_agent: str | None = None
    pending_tasks: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("vecta_request", default=None)


def current_request() -> RequestContext | None:
    return _current.get()


def set_request(ctx: RequestContext | None) -> contextvars.Token[RequestContext | None]:
    return _current.set(ctx)


def reset_request(token: contextvars.Token[RequestContext | None]) -> None:
    _current.reset(token)

"""structlog configuration: key-value lines for people, JSON for machines (``VECTA_LOG_JSON=true``).
Anything that looks like a secret is masked before a line is written."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

from services.core.request_context import current_request
from services.core.settings import get_settings

_SECRET = re.compile(r"(vk_[A-Za-z0-9]+_[A-Za-z0-9]{6})[A-Za-z0-9]+|(eyJ[\w-]+\.[\w-]+)\.[\w-]+|(vr_|vi_)[\w-]+")
_SECRET_KEYS = ("password", "secret", "token", "authorization", "api_key", "data_key")


def _mask(value: str) -> str:
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2) or m.group(3) or "") + "…", value)


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for k, v in list(event.items()):
        if any(s in k.lower() for s in _SECRET_KEYS):
            event[k] = "[redacted]"
        elif isinstance(v, str):
            event[k] = _mask(v)
    return event


def _request_id(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    ctx = current_request()
    if ctx is not None:
        event.setdefault("request_id", ctx.request_id)
    return event


class _MaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _mask(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_mask(a) if isinstance(a, str) else a for a in record.args)
        return True


_configured = False


def configure_logging() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    settings = get_settings()
    renderer: Any = (
        structlog.processors.JSONRenderer() if settings.log_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _request_id,
        _redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler.addFilter(_MaskingFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

"""The audit log: one row per mutating control-plane action (and per denied attempt).

Rows are written in the request's transaction for successes (so an action and its audit record commit together)
and in a transaction of their own for denials and failures (which roll the request back). ``details`` must never
hold a secret: callers pass identifiers and changed field names, and ``record`` drops keys that look secret.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Index, String
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from services.core.db import Base, utcnow
from services.core.ids import new_id
from services.core.request_context import current_request

_SECRET_WORDS = ("password", "secret", "token", "key_material", "api_key", "authorization", "hash")


class AuditLog(Base):
    __tablename__ = "audit_logs"
    __table_args__ = (Index("ix_audit_logs_org_created", "org_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str | None] = mapped_column(String(40))
    actor_type: Mapped[str] = mapped_column(String(16))  # user | api_key | anonymous | system
    actor_id: Mapped[str | None] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str | None] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(String(64))
    result: Mapped[str] = mapped_column(String(16))  # success | denied | failure
    ip: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


def scrub(details: dict[str, Any] | None) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for k, v in (details or {}).items():
        if any(word in k.lower() for word in _SECRET_WORDS):
            continue
        clean[k] = scrub(v) if isinstance(v, dict) else v
    return clean


def build(
    *,
    action: str,
    org_id: str | None,
    actor_type: str,
    actor_id: str | None,
    target_type: str | None = None,
    target_id: str | None = None,
    result: str = "success",
    details: dict[str, Any] | None = None,
) -> AuditLog:
    ctx = current_request()
    return AuditLog(
        id=new_id("aud"),
        org_id=org_id,
        actor_type=actor_type,
        actor_id=actor_id,
        action=action,
        target_type=target_type,
        target_id=target_id,
        result=result,
        ip=ctx.ip if ctx else None,
        request_id=ctx.request_id if ctx else None,
        details=scrub(details),
        created_at=utcnow(),
    )


def record(session: AsyncSession, **kwargs: Any) -> AuditLog:
    row = build(**kwargs)
    session.add(row)
    return row

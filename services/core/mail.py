"""Transactional email through an outbox.

A message is a row in ``email_outbox`` written in the same transaction as the action that causes it; the
``mail.send`` task (enqueued after the commit) delivers it over SMTP, or into ``VECTA_HOME/mail`` with the embedded
``file`` backend, and marks it sent. ``mail.sweep`` (Celery beat) re-enqueues anything left pending, so a message is
never lost because a broker message was. Delivery is at-least-once; the row's status makes re-delivery rare.
"""

from __future__ import annotations

import datetime as dt
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

from sqlalchemy import String, Text, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, Session, mapped_column

from services.core.celery_app import celery_app, enqueue
from services.core.db import Base, get_database, utcnow
from services.core.ids import new_id
from services.core.settings import Settings, get_settings

MAX_ATTEMPTS = 8


class EmailOutbox(Base):
    __tablename__ = "email_outbox"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    to_address: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(String(300))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending|sent|failed
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]


def queue_email(session: AsyncSession, to: str, subject: str, body: str) -> EmailOutbox:
    row = EmailOutbox(id=new_id("mail"), to_address=to, subject=subject, body=body, status="pending", attempts=0)
    session.add(row)
    enqueue("mail.send", row.id)
    return row


def _message(settings: Settings, row: EmailOutbox) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = settings.email_from
    msg["To"] = row.to_address
    msg["Subject"] = row.subject
    msg["Message-ID"] = make_msgid(idstring=row.id, domain="vecta.local")
    msg.set_content(row.body)
    return msg


def deliver(settings: Settings, msg: EmailMessage, outbox_id: str) -> None:
    if settings.email_backend == "file":
        settings.mail_dir.mkdir(parents=True, exist_ok=True)
        path = settings.mail_dir / f"{outbox_id}.eml"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(bytes(msg))
        tmp.replace(path)
        return
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout_seconds) as smtp:
        if settings.smtp_starttls:
            smtp.starttls(context=ssl.create_default_context())
        if settings.smtp_username:
            smtp.login(settings.smtp_username, settings.smtp_password.get_secret_value())
        smtp.send_message(msg)


def _claim(session: Session, outbox_id: str) -> EmailOutbox | None:
    row = session.get(EmailOutbox, outbox_id, with_for_update=True)
    if row is None or row.status != "pending":
        return None
    return row


@celery_app.task(name="mail.send", bind=True, max_retries=MAX_ATTEMPTS, acks_late=True)
def send_email(self: Any, outbox_id: str) -> str:
    settings = get_settings()
    db = get_database()
    with db.sync_transaction() as session:
        row = _claim(session, outbox_id)
        if row is None:
            return "skipped"
        msg = _message(settings, row)
        try:
            deliver(settings, msg, row.id)
        except (OSError, smtplib.SMTPException) as exc:
            row.attempts += 1
            row.last_error = f"{type(exc).__name__}: {exc}"[:500]
            if row.attempts >= MAX_ATTEMPTS:
                row.status = "failed"
                return "failed"
            session.commit()
            raise self.retry(exc=exc, countdown=min(300, 2**row.attempts)) from exc
        row.status = "sent"
        row.attempts += 1
        row.sent_at = utcnow()
    return "sent"


@celery_app.task(name="mail.sweep")
def sweep() -> int:
    """Re-enqueue pending messages older than a minute (their broker message may have been lost)."""
    cutoff = utcnow() - dt.timedelta(minutes=1)
    with get_database().sync_transaction() as session:
        ids = list(
            session.scalars(
                select(EmailOutbox.id)
                .where(EmailOutbox.status == "pending", EmailOutbox.created_at < cutoff)
                .limit(500)
            )
        )
    for outbox_id in ids:
        send_email.delay(outbox_id)
    return len(ids)

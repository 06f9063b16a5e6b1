"""The Celery app and enqueue-after-commit.

Production: Redis as broker. Embedded default (no Redis): kombu's SQLAlchemy transport on a SQLite file under
``VECTA_HOME``, consumed by a worker process that ``vecta up`` starts, so tasks still run in the background and a
task enqueued while no worker is up waits in the broker instead of being dropped.

Tasks are named ``domain.verb``, take ids, open their own database session and are idempotent. During a request,
``enqueue`` only buffers; the request's session dependency sends the buffer after the commit and drops it on
rollback.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Transport as SqlaTransport

from services.core.request_context import current_request
from services.core.settings import get_settings

log = logging.getLogger(__name__)

# services.core.models first: it imports every table, so foreign keys across domains resolve in the worker.
TASK_MODULES = [
    "services.core.models",
    "services.core.mail",
    "services.control_plane.clusters.tasks",
    "services.control_plane.backups.tasks",
    "services.control_plane.imports.tasks",
    "services.control_plane.keys.tasks",
]


class QuickSQLiteTransport(SqlaTransport):
    """kombu's SQLAlchemy transport, polled every 50 ms instead of every second when idle: a task waits at most
    that long for an idle worker (cluster create and resume are user-visible waits). One small SELECT per
    poll; the polling interval cannot be a transport option here (those go to ``create_engine``)."""

    polling_interval = 0.05


TRANSPORT_ALIASES["vecta-sqla"] = f"{__name__}:QuickSQLiteTransport"


def broker_url(settings: Any) -> str:
    url = str(settings.celery_broker_url)
    return "vecta-sqla+" + url.removeprefix("sqla+") if url.startswith("sqla+") else url


def _make_app() -> Celery:
    settings = get_settings()
    app = Celery("vecta", include=TASK_MODULES)
    app.conf.update(
        broker_url=broker_url(settings),
        task_ignore_result=True,
        task_acks_late=True,  # a task whose worker dies mid-way is redelivered (tasks are idempotent)
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_always_eager=settings.celery_eager,
        broker_connection_retry_on_startup=True,
        # Redis: redeliver an unacknowledged task after an hour. (The SQLAlchemy transport of the embedded
        # default hands these options to create_engine, so they are only set for Redis.)
        broker_transport_options=(
            {"visibility_timeout": 3600} if settings.celery_broker_url.startswith("redis") else {}
        ),
        # Publishing is bounded: a request never hangs on a broken broker (what was not sent is re-sent by
        # the sweepers from the database rows it concerns).
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        beat_schedule={
            "mail.sweep": {"task": "mail.sweep", "schedule": 60.0},
            "cluster.reconcile": {"task": "cluster.reconcile", "schedule": settings.reconcile_interval_seconds},
            "backup.sweep": {"task": "backup.sweep", "schedule": 300.0},
            "keys.check": {"task": "keys.check", "schedule": settings.key_check_interval_seconds},
            "imports.sweep": {"task": "imports.sweep", "schedule": 60.0},
        },
        timezone="UTC",
    )
    return app


celery_app = _make_app()


def reconfigure() -> None:
    """Re-read settings (tests and ``vecta up`` change the environment after import)."""
    settings = get_settings()
    celery_app.conf.update(
        broker_url=broker_url(settings),
        task_always_eager=settings.celery_eager,
        broker_transport_options=(
            {"visibility_timeout": 3600} if settings.celery_broker_url.startswith("redis") else {}
        ),
    )


def enqueue(task_name: str, *args: Any, **kwargs: Any) -> None:
    ctx = current_request()
    if ctx is not None:
        ctx.pending_tasks.append((task_name, args, kwargs))
        return
    send(task_name, args, kwargs)


def send(task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if celery_app.conf.task_always_eager:
        celery_app.tasks[task_name].apply(args=args, kwargs=kwargs)
        return
    try:
        celery_app.send_task(task_name, args=args, kwargs=kwargs, retry=True)
    except Exception:  # the broker is down: the row stays pending and a sweeper re-sends it
        log.exception("could not enqueue %s", task_name)

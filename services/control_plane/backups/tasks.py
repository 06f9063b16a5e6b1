"""Backup tasks: take a snapshot, purge a deleted backup's objects, and the policy sweep (Celery beat).

In-place restores run through the cluster task driver (``backup.restore`` in ``clusters.tasks``), since they move
the cluster through RESTORING like any other lifecycle step.
"""

from __future__ import annotations

import datetime as dt
import logging

import httpx
from sqlalchemy import select

from services.auth.keyprovider import KeyUnavailable
from services.control_plane.backups.models import Backup, BackupPolicy
from services.control_plane.backups.service import new_backup
from services.control_plane.clusters.models import Cluster, Job
from services.control_plane.clusters.state import Status
from services.control_plane.clusters.tasks import engine_call, engine_token
from services.control_plane.keys.clusterkeys import sealed_keys
from services.control_plane.provisioners.base import ProvisionError
from services.core.celery_app import celery_app
from services.core.db import get_database, utcnow
from services.core.errors import Conflict
from services.core.ids import new_id
from services.core.objectstore import ObjectStoreError, open_object_store

log = logging.getLogger(__name__)


@celery_app.task(name="backup.create", acks_late=True, ignore_result=True)
def create_backup(backup_id: str, job_id: str) -> str:
    db = get_database()
    with db.sync_transaction() as s:
        backup, job = s.get(Backup, backup_id), s.get(Job, job_id)
        if backup is None or job is None or backup.status != "CREATING":
            if job is not None and job.status not in ("succeeded", "failed"):
                job.status, job.finished_at = "succeeded", utcnow()
            return "skipped"
        cluster = s.get(Cluster, backup.cluster_id)
        job.status, job.started_at, job.attempts = "running", job.started_at or utcnow(), job.attempts + 1
        if cluster is None or cluster.status != Status.RUNNING.value or not cluster.engine_url:
            reason = f"the cluster is {cluster.status if cluster else 'gone'}, not RUNNING"
            backup.status, backup.status_reason = "FAILED", reason
            job.status, job.error, job.finished_at = "failed", reason, utcnow()
            return "failed"
        token = engine_token(cluster)
        url, uri = cluster.engine_url, backup.uri
    try:
        result = engine_call(url, token, "POST", "/internal/snapshot", {"uri": uri}, timeout=3600)
        error = None
    except (ProvisionError, httpx.HTTPError) as exc:
        result, error = {}, str(exc)[:300]
    with db.sync_transaction() as s:
        backup, job = s.get(Backup, backup_id), s.get(Job, job_id)
        assert backup is not None and job is not None
        if error is not None:
            backup.status, backup.status_reason = "FAILED", f"snapshot failed: {error}"
            job.status, job.error, job.finished_at = "failed", error, utcnow()
            return "failed"
        backup.status, backup.completed_at = "AVAILABLE", utcnow()
        backup.size_bytes = int(result.get("bytes", 0))
        backup.vector_count = int(result.get("vector_count", 0))
        backup.collections = list(result.get("collections", []))
        job.status, job.progress, job.finished_at = "succeeded", 1.0, utcnow()
    return "succeeded"


@celery_app.task(name="backup.purge", acks_late=True, ignore_result=True)
def purge_backup(backup_id: str) -> int:
    with get_database().sync_transaction() as s:
        backup = s.get(Backup, backup_id)
        if backup is None or backup.status != "DELETED":
            return 0
        uri = backup.uri
    base, _, leaf = uri.rstrip("/").rpartition("/")
    store = open_object_store(base)
    removed = 0
    try:
        for key in store.list_keys(leaf + "/"):
            store.delete(key)
            removed += 1
    except ObjectStoreError as exc:  # retried by the next sweep
        log.warning("could not purge backup %s: %s", backup_id, exc)
    return removed


@celery_app.task(name="backup.sweep", ignore_result=True)
def sweep() -> dict[str, int]:
    """Take the backups that policies ask for and expire those past their retention."""
    from services.core.celery_app import send

    now = utcnow()
    started = expired = 0
    db = get_database()
    to_send: list[tuple[str, str]] = []
    with db.sync_transaction() as s:
        rows = s.execute(
            select(BackupPolicy, Cluster)
            .join(Cluster, Cluster.id == BackupPolicy.cluster_id)
            .where(BackupPolicy.enabled.is_(True), Cluster.status == Status.RUNNING.value)
        ).all()
        for policy, cluster in rows:
            due = policy.last_run_at is None or policy.last_run_at + dt.timedelta(hours=policy.every_hours) <= now
            if not due:
                continue
            try:
                backup = new_backup(cluster, "policy", sealed_keys(s, cluster), policy.retention_days)
            except (KeyUnavailable, Conflict) as exc:  # key unusable, or a re-key under way: the next sweep
                log.warning("policy backup of %s skipped: %s", cluster.id, exc)
                continue
            s.add(backup)
            s.flush()
            job = Job(
                id=new_id("job"), org_id=cluster.org_id, kind="backup.create", resource_id=backup.id,
                params={"cluster_id": cluster.id},
            )  # fmt: skip
            s.add(job)
            policy.last_run_at = now
            to_send.append((backup.id, job.id))
            started += 1
        for backup in s.scalars(
            select(Backup).where(Backup.status == "AVAILABLE", Backup.expires_at.is_not(None), Backup.expires_at < now)
        ):
            backup.status, backup.deleted_at = "DELETED", now
            to_send.append((backup.id, ""))
            expired += 1
    for backup_id, job_id in to_send:
        if job_id:
            send("backup.create", (backup_id, job_id), {})
        else:
            send("backup.purge", (backup_id,), {})
    return {"started": started, "expired": expired}

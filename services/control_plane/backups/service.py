"""Backup rules: create (manual), list, describe, delete, restore (into a new cluster or in place), policies."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.keyprovider import local_provider
from services.auth.subject import AuthSubject
from services.control_plane import service as org_service
from services.control_plane.backups.models import Backup, BackupPolicy
from services.control_plane.backups.schemas import BackupOut, BackupPolicyIn, BackupPolicyOut, RestoreIn
from services.control_plane.clusters import repository as cluster_repo
from services.control_plane.clusters import service as clusters
from services.control_plane.clusters import state
from services.control_plane.clusters.models import Cluster, Job
from services.control_plane.clusters.state import Status
from services.core import audit
from services.core.celery_app import enqueue
from services.core.db import utcnow
from services.core.errors import Conflict, NotFound, Unprocessable
from services.core.ids import new_id
from services.core.settings import get_settings


def backup_context(org_id: str, backup_id: str) -> dict[str, str]:
    return {"org_id": org_id, "backup_id": backup_id}


def backup_out(b: Backup) -> BackupOut:
    return BackupOut.model_validate(b)


def _audit(session: AsyncSession, subject: AuthSubject, action: str, org_id: str, target: str, **kw: object) -> None:
    audit.record(
        session, action=action, org_id=org_id, actor_type=subject.kind, actor_id=subject.id,
        target_type="backup" if target.startswith("bkp_") else "cluster", target_id=target, details=dict(kw),
    )  # fmt: skip


def new_backup(cluster: Cluster, kind: str, retention_days: int | None = None) -> Backup:
    """A CREATING backup row for a cluster, carrying a copy of its data key wrapped for the backup."""
    provider = local_provider()
    backup_id = new_id("bkp")
    data_key = provider.unwrap(cluster.data_key_wrapped, clusters.key_context(cluster))
    now = utcnow()
    return Backup(
        id=backup_id,
        org_id=cluster.org_id,
        project_id=cluster.project_id,
        cluster_id=cluster.id,
        kind=kind,
        status="CREATING",
        uri=f"{get_settings().objects_uri.rstrip('/')}/backups/{cluster.id}/{backup_id}",
        collections=[],
        key_provider=provider.name,
        key_version=provider.describe().version,
        data_key_wrapped=provider.wrap(data_key, backup_context(cluster.org_id, backup_id)),
        created_at=now,
        expires_at=now + dt.timedelta(days=retention_days) if retention_days else None,
    )


def backup_job(session: AsyncSession, backup: Backup) -> Job:
    job = Job(
        id=new_id("job"), org_id=backup.org_id, kind="backup.create", resource_id=backup.id,
        params={"cluster_id": backup.cluster_id},
    )  # fmt: skip
    session.add(job)
    enqueue("backup.create", backup.id, job.id)
    return job


async def create_backup(session: AsyncSession, subject: AuthSubject, cluster_id: str) -> tuple[Backup, Job]:
    cluster = await clusters.get_cluster(session, subject, cluster_id, "backup:create")
    if cluster.status != Status.RUNNING.value:
        raise Conflict(
            f"cannot back up: the cluster is {cluster.status}", code="invalid_cluster_state",
            extra={"current_status": cluster.status},
        )  # fmt: skip
    backup = new_backup(cluster, "manual")
    session.add(backup)
    await session.flush()
    job = backup_job(session, backup)
    _audit(session, subject, "backup.create", cluster.org_id, backup.id, cluster_id=cluster.id)
    await session.flush()
    return backup, job


async def list_backups(
    session: AsyncSession, subject: AuthSubject, cluster_id: str, after: str | None, limit: int
) -> Sequence[Backup]:
    cluster = await clusters.get_cluster(session, subject, cluster_id, "cluster:read")
    stmt = select(Backup).where(Backup.cluster_id == cluster.id, Backup.status != "DELETED")
    if after:
        stmt = stmt.where(Backup.id > after)
    return (await session.execute(stmt.order_by(Backup.id).limit(limit + 1))).scalars().all()


async def get_backup(session: AsyncSession, subject: AuthSubject, backup_id: str, privilege: str) -> Backup:
    backup = await session.get(Backup, backup_id)
    if backup is None or backup.status == "DELETED":
        raise NotFound(f"backup {backup_id} not found", code="backup_not_found")
    if not subject.can_see_cluster(backup.org_id, backup.project_id, backup.cluster_id):
        raise NotFound(f"backup {backup_id} not found", code="backup_not_found")
    subject.require_cluster(backup.org_id, backup.project_id, backup.cluster_id, privilege)
    return backup


async def delete_backup(session: AsyncSession, subject: AuthSubject, backup_id: str) -> None:
    backup = await get_backup(session, subject, backup_id, "backup:create")
    if backup.status == "CREATING":
        raise Conflict("the backup is still being created", code="backup_in_progress")
    backup.status, backup.deleted_at = "DELETED", utcnow()
    enqueue("backup.purge", backup.id)
    _audit(session, subject, "backup.delete", backup.org_id, backup.id)


async def restore(session: AsyncSession, subject: AuthSubject, backup_id: str, body: RestoreIn) -> tuple[Cluster, Job]:
    backup = await get_backup(session, subject, backup_id, "backup:restore")
    if backup.status != "AVAILABLE":
        raise Conflict(f"backup {backup.id} is {backup.status}, not AVAILABLE", code="backup_not_available")
    if body.target == "in_place":
        cluster = await clusters.get_cluster(session, subject, backup.cluster_id, "backup:restore")
        state.check(cluster.status, Status.RESTORING, "restore in place")
        cluster.status, cluster.status_reason = Status.RESTORING.value, f"restoring backup {backup.id}"
        job = Job(
            id=new_id("job"), org_id=cluster.org_id, kind="backup.restore", resource_id=cluster.id,
            params={"backup_id": backup.id, "uri": backup.uri},
        )  # fmt: skip
        session.add(job)
        enqueue("backup.restore", cluster.id, job.id)
        _audit(
            session,
            subject,
            "backup.restore",
            cluster.org_id,
            backup.id,
            restore_target="in_place",
            cluster_id=cluster.id,
        )
        await session.flush()
        return cluster, job
    project = await org_service.get_project(session, subject, body.project_id or backup.project_id, "cluster:create")
    if project.org_id != backup.org_id:
        raise Unprocessable("project_id: a backup restores only within its organization", code="cross_org_restore")
    assert body.name is not None
    if await cluster_repo.cluster_by_name(session, project.id, body.name):
        raise Conflict(f"a cluster named {body.name!r} already exists in this project", code="cluster_exists")
    source = await session.get(Cluster, backup.cluster_id)
    provider = local_provider()
    data_key = provider.unwrap(backup.data_key_wrapped, backup_context(backup.org_id, backup.id))
    cluster = Cluster(
        id=new_id("cl"),
        org_id=project.org_id,
        project_id=project.id,
        name=body.name,
        plan=source.plan if source else "dedicated",
        region=source.region if source else "local",
        cu_size=source.cu_size if source else 1,
        replicas=1,
        status=Status.CREATING.value,
        status_reason=f"restoring backup {backup.id}",
        provisioner=get_settings().provisioner,
        key_provider=provider.name,
        engine_state={},
        engine_token_wrapped=b"",
        data_key_wrapped=b"",
    )
    ctx = clusters.key_context(cluster)
    cluster.data_key_wrapped = provider.wrap(data_key, ctx)
    cluster.engine_token_wrapped = clusters.new_engine_token(provider, ctx)
    session.add(cluster)
    await session.flush()
    job = Job(
        id=new_id("job"), org_id=cluster.org_id, kind="cluster.provision", resource_id=cluster.id,
        params={"restore_uri": backup.uri, "backup_id": backup.id},
    )  # fmt: skip
    session.add(job)
    enqueue("cluster.provision", cluster.id, job.id)
    _audit(session, subject, "backup.restore", cluster.org_id, backup.id, restore_target="new", cluster_id=cluster.id)
    await session.flush()
    return cluster, job


def policy_out(cluster_id: str, p: BackupPolicy | None) -> BackupPolicyOut:
    if p is None:
        return BackupPolicyOut(
            cluster_id=cluster_id, enabled=False, every_hours=24, retention_days=7, last_run_at=None, next_run_at=None
        )
    next_run = None
    if p.enabled:
        next_run = (p.last_run_at + dt.timedelta(hours=p.every_hours)) if p.last_run_at else utcnow()
    return BackupPolicyOut(
        cluster_id=cluster_id, enabled=p.enabled, every_hours=p.every_hours, retention_days=p.retention_days,
        last_run_at=p.last_run_at, next_run_at=next_run,
    )  # fmt: skip


async def get_policy(session: AsyncSession, subject: AuthSubject, cluster_id: str) -> BackupPolicyOut:
    cluster = await clusters.get_cluster(session, subject, cluster_id, "cluster:read")
    return policy_out(cluster.id, await session.get(BackupPolicy, cluster.id))


async def put_policy(
    session: AsyncSession, subject: AuthSubject, cluster_id: str, body: BackupPolicyIn
) -> BackupPolicyOut:
    cluster = await clusters.get_cluster(session, subject, cluster_id, "backup:create")
    policy = await session.get(BackupPolicy, cluster.id)
    if policy is None:
        policy = BackupPolicy(cluster_id=cluster.id)
        session.add(policy)
    policy.enabled, policy.every_hours, policy.retention_days = body.enabled, body.every_hours, body.retention_days
    _audit(session, subject, "backup.policy", cluster.org_id, cluster.id, **body.model_dump())
    await session.flush()
    return policy_out(cluster.id, policy)

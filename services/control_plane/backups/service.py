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
from services.control_plane.keys import ring
from services.control_plane.keys import service as keys
from services.control_plane.keys.clusterkeys import SealedKeys, key_context, sealed_from
from services.control_plane.keys.models import EncryptionKey
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


def new_backup(cluster: Cluster, kind: str, keys: SealedKeys, retention_days: int | None = None) -> Backup:
    """A CREATING backup row for a cluster, carrying a copy of its data key wrapped for the backup by the same
    version of the cluster's encryption key (so revoking that key also makes the backup unrestorable). Calls the
    key provider: run it off the event loop. Raises KeyUnavailable."""
    if keys.next is not None:
        raise Conflict(
            "cannot back up while the cluster's data key is being replaced (re-key in progress); retry when "
            "encryption.rekey_in_progress is false",
            code="rekey_in_progress",
        )
    backup_id = new_id("bkp")
    data_key = ring.unwrap(keys.ref, keys.current, keys.context)
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
        key_provider=keys.ref.provider,
        encryption_key_id=keys.ref.key_id,
        key_version=keys.ref.version_label,
        data_key_wrapped=ring.wrap(keys.ref, data_key, backup_context(cluster.org_id, backup_id)),
        created_at=now,
        expires_at=now + dt.timedelta(days=retention_days) if retention_days else None,
    )


async def _cluster_keys(session: AsyncSession, cluster: Cluster) -> SealedKeys:
    return sealed_from(cluster, await ring.load_ref(session, cluster.encryption_key_id, cluster.key_version,
                                                    cluster.org_id))  # fmt: skip


async def _backup_data_key(session: AsyncSession, backup: Backup) -> bytes:
    """The backup's data key, unwrapped by the key version that wrapped it: 409 if that key is unusable."""
    if backup.encryption_key_id is not None:
        key = await session.get(EncryptionKey, backup.encryption_key_id)
        if key is None or key.status == "DELETED":
            raise Conflict(f"backup {backup.id}: its encryption key was deleted", code=keys.KEY_UNAVAILABLE)
        if key.status != "ENABLED":
            raise Conflict(
                f"backup {backup.id}: its encryption key {key.id} is unavailable ({key.status_reason or key.status})",
                code=keys.KEY_UNAVAILABLE,
            )
    version = int(backup.key_version) if backup.encryption_key_id is not None else None
    ref = await ring.load_ref(session, backup.encryption_key_id, version, backup.org_id)
    ctx = backup_context(backup.org_id, backup.id)
    return await keys.call(lambda: ring.unwrap(ref, backup.data_key_wrapped, ctx), f"cannot restore backup {backup.id}")


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
    sealed = await _cluster_keys(session, cluster)
    backup = await keys.call(lambda: new_backup(cluster, "manual", sealed), "cannot back up")
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
        # The restored files are under the backup's data key: it becomes the cluster's data key, wrapped by the
        # current version of the cluster's key (the old data is wiped by the restore in any case).
        data_key = await _backup_data_key(session, backup)
        target = await ring.load_ref(session, cluster.encryption_key_id, None, cluster.org_id)
        ctx = key_context(cluster)
        cluster.data_key_wrapped = await keys.call(lambda: ring.wrap(target, data_key, ctx), "cannot restore")
        cluster.key_version, cluster.data_key_next_wrapped = target.version, None
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
    data_key = await _backup_data_key(session, backup)
    key_id = body.encryption_key_id
    if key_id is None and backup.encryption_key_id is not None and backup.project_id == project.id:
        same = await session.get(EncryptionKey, backup.encryption_key_id)  # stay under the source's key if usable
        key_id = same.id if same is not None and same.status == "ENABLED" and not same.is_default else None
    target = await keys.key_for_new_cluster(session, project, key_id)
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
        key_provider=target.provider,
        encryption_key_id=target.key_id,
        key_version=target.version,
        engine_state={},
        engine_token_wrapped=b"",
        data_key_wrapped=b"",
    )
    ctx = key_context(cluster)
    cluster.data_key_wrapped = await keys.call(lambda: ring.wrap(target, data_key, ctx), "cannot restore")
    cluster.engine_token_wrapped = clusters.new_engine_token(local_provider(), ctx)
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

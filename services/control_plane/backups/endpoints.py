"""Backup routes (thin)."""

from __future__ import annotations

from fastapi import APIRouter, status

from services.auth.deps import DbSession, Pagination, Subject
from services.control_plane.backups import service
from services.control_plane.backups import tasks as _tasks  # noqa: F401 - registers the Celery tasks
from services.control_plane.backups.schemas import (
    BackupAccepted,
    BackupOut,
    BackupPolicyIn,
    BackupPolicyOut,
    RestoreAccepted,
    RestoreIn,
)
from services.core.responses import errors
from services.core.schemas import ListOf

router = APIRouter(prefix="/v1", tags=["backups"])


@router.post(
    "/clusters/{cluster_id}/backups",
    response_model=BackupAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(401, 403, 404, 409),
)
async def create_backup(cluster_id: str, subject: Subject, session: DbSession) -> BackupAccepted:
    backup, job = await service.create_backup(session, subject, cluster_id)
    return BackupAccepted(**service.backup_out(backup).model_dump(), job_id=job.id)


@router.get("/clusters/{cluster_id}/backups", response_model=ListOf[BackupOut], responses=errors(401, 403, 404))
async def list_backups(cluster_id: str, subject: Subject, session: DbSession, page: Pagination) -> ListOf[BackupOut]:
    rows = await service.list_backups(session, subject, cluster_id, page.after, page.limit)
    items, token = page.cut(rows)
    return ListOf[BackupOut](items=[service.backup_out(b) for b in items], next_page_token=token)


@router.get("/backups/{backup_id}", response_model=BackupOut, responses=errors(401, 403, 404))
async def get_backup(backup_id: str, subject: Subject, session: DbSession) -> BackupOut:
    return service.backup_out(await service.get_backup(session, subject, backup_id, "cluster:read"))


@router.delete("/backups/{backup_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(401, 403, 404, 409))
async def delete_backup(backup_id: str, subject: Subject, session: DbSession) -> None:
    await service.delete_backup(session, subject, backup_id)


@router.post(
    "/backups/{backup_id}/restore",
    response_model=RestoreAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(401, 403, 404, 409, 422),
)
async def restore_backup(backup_id: str, body: RestoreIn, subject: Subject, session: DbSession) -> RestoreAccepted:
    cluster, job = await service.restore(session, subject, backup_id, body)
    return RestoreAccepted(cluster_id=cluster.id, job_id=job.id, status=cluster.status)


@router.get("/clusters/{cluster_id}/backup-policy", response_model=BackupPolicyOut, responses=errors(401, 403, 404))
async def get_policy(cluster_id: str, subject: Subject, session: DbSession) -> BackupPolicyOut:
    return await service.get_policy(session, subject, cluster_id)


@router.put("/clusters/{cluster_id}/backup-policy", response_model=BackupPolicyOut, responses=errors(401, 403, 404))
async def put_policy(cluster_id: str, body: BackupPolicyIn, subject: Subject, session: DbSession) -> BackupPolicyOut:
    return await service.put_policy(session, subject, cluster_id, body)

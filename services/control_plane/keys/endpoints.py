"""Encryption-key routes (thin)."""

from __future__ import annotations

from fastapi import APIRouter, status

from services.auth.deps import DbSession, Pagination, Subject
from services.control_plane.keys import service
from services.control_plane.keys import tasks as _tasks  # noqa: F401 - registers the Celery tasks
from services.control_plane.keys.schemas import AwsSetupOut, KeyIn, KeyOut, RotateIn, RotateOut
from services.core.responses import errors
from services.core.schemas import ListOf

router = APIRouter(prefix="/v1", tags=["encryption keys"])


@router.post(
    "/projects/{project_id}/encryption-keys",
    response_model=KeyOut,
    status_code=status.HTTP_201_CREATED,
    responses=errors(401, 403, 404, 422, 503),
)
async def register_key(project_id: str, body: KeyIn, subject: Subject, session: DbSession) -> KeyOut:
    key = await service.register(session, subject, project_id, body)
    return KeyOut(**await service.key_out(session, key))


@router.get("/projects/{project_id}/encryption-keys", response_model=ListOf[KeyOut], responses=errors(401, 403, 404))
async def list_keys(project_id: str, subject: Subject, session: DbSession, page: Pagination) -> ListOf[KeyOut]:
    rows = await service.list_keys(session, subject, project_id, page.after, page.limit)
    items, token = page.cut(rows)
    return ListOf[KeyOut](items=[KeyOut(**await service.key_out(session, k)) for k in items], next_page_token=token)


@router.get(
    "/projects/{project_id}/encryption-keys/aws-setup", response_model=AwsSetupOut, responses=errors(401, 403, 404)
)
async def aws_setup(project_id: str, subject: Subject, session: DbSession) -> AwsSetupOut:
    """What a customer puts in the trust policy of the role Vecta assumes to use their KMS key."""
    return await service.aws_setup(session, subject, project_id)


@router.get("/encryption-keys/{key_id}", response_model=KeyOut, responses=errors(401, 403, 404))
async def get_key(key_id: str, subject: Subject, session: DbSession) -> KeyOut:
    return KeyOut(**await service.key_out(session, await service.get_key(session, subject, key_id, "key:read")))


@router.post(
    "/encryption-keys/{key_id}/rotate", response_model=RotateOut, responses=errors(401, 403, 404, 409, 422, 503)
)
async def rotate_key(key_id: str, subject: Subject, session: DbSession, body: RotateIn | None = None) -> RotateOut:
    key, rewrapped, rekeyed = await service.rotate(session, subject, key_id, body or RotateIn())
    return RotateOut(**await service.key_out(session, key, rewrapped_clusters=rewrapped, rekey_clusters=rekeyed))


@router.delete(
    "/encryption-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(401, 403, 404, 409)
)
async def delete_key(key_id: str, subject: Subject, session: DbSession) -> None:
    await service.delete(session, subject, key_id)

"""API keys: create (never granting more than the creator holds), list, describe, update, revoke, rotate with a
grace period. The secret exists only in the create and rotate answers; the database keeps its HMAC."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from services.auth import repository as auth_repo
from services.auth.crypto import make_api_key, token_hash
from services.auth.models import ApiKey, RoleBinding
from services.auth.subject import AuthSubject
from services.control_plane import repository as repo
from services.control_plane.schemas import ApiKeyIn, ApiKeyPatch
from services.control_plane.service import (
    as_utc,
    audit_action,
    bind_roles,
    resolve_org_role,
    resolve_project_roles,
    resolve_role,
)
from services.core.db import utcnow
from services.core.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from services.core.ids import new_id


async def create_api_key(
    session: AsyncSession, subject: AuthSubject, org_id: str, body: ApiKeyIn
) -> tuple[ApiKey, str, list[RoleBinding]]:
    subject.require_org(org_id, "apikey:manage")
    if body.expires_at is not None and as_utc(body.expires_at) <= utcnow():
        raise Unprocessable("expires_at: must be in the future", code="invalid_expiry")
    org_role = await resolve_org_role(session, subject, org_id, body.org_role) if body.org_role else None
    roles = await resolve_project_roles(session, subject, org_id, body.project_roles)
    if org_role is None and not roles:
        raise Unprocessable("an API key needs an org_role or at least one project role", code="no_roles")
    key_id = new_id("key")
    secret = make_api_key(key_id)
    key = ApiKey(
        id=key_id,
        org_id=org_id,
        name=body.name,
        org_role=org_role.stored if org_role else None,
        secret_hash=token_hash(secret.split("_", 2)[2]),
        created_by=subject.id,
        created_at=utcnow(),
        expires_at=as_utc(body.expires_at) if body.expires_at else None,
    )
    session.add(key)
    await session.flush()
    bind_roles(session, org_id, "api_key", key_id, roles)
    await session.flush()
    audit_action(
        session,
        subject,
        "apikey.create",
        org_id,
        target_type="api_key",
        target_id=key_id,
        details={"name": body.name, "org_role": key.org_role},
    )
    bindings = (await repo.bindings_in_org(session, org_id, "api_key", [key_id]))[key_id]
    return key, secret, bindings


async def get_api_key(session: AsyncSession, subject: AuthSubject, key_id: str, manage: bool = True) -> ApiKey:
    key = await session.get(ApiKey, key_id)
    if key is None or not subject.in_org(key.org_id):
        raise NotFound(f"API key {key_id} not found", code="api_key_not_found")
    if not (subject.kind == "api_key" and subject.id == key_id and not manage):
        subject.require_org(key.org_id, "apikey:manage")
    return key


async def key_bindings(session: AsyncSession, keys: Sequence[ApiKey]) -> dict[str, list[RoleBinding]]:
    out: dict[str, list[RoleBinding]] = {}
    by_org: dict[str, list[str]] = {}
    for k in keys:
        by_org.setdefault(k.org_id, []).append(k.id)
    for org_id, ids in by_org.items():
        out.update(await repo.bindings_in_org(session, org_id, "api_key", ids))
    return out


async def list_api_keys(
    session: AsyncSession, subject: AuthSubject, org_id: str, after: str | None, limit: int
) -> Sequence[ApiKey]:
    subject.require_org(org_id, "apikey:manage")
    return await auth_repo.api_keys_of_org(session, org_id, after, limit)


async def update_api_key(session: AsyncSession, subject: AuthSubject, key_id: str, body: ApiKeyPatch) -> ApiKey:
    key = await get_api_key(session, subject, key_id)
    changed = body.model_dump(exclude_unset=True)
    if "name" in changed:
        if body.name is None:
            raise BadRequest("name: must not be null", code="validation_error")
        key.name = body.name
    if "expires_at" in changed:
        if body.expires_at is not None and as_utc(body.expires_at) <= utcnow():
            raise Unprocessable("expires_at: must be in the future", code="invalid_expiry")
        key.expires_at = as_utc(body.expires_at) if body.expires_at else None
    audit_action(
        session,
        subject,
        "apikey.update",
        key.org_id,
        target_type="api_key",
        target_id=key.id,
        details={"fields": sorted(changed)},
    )
    return key


async def revoke_api_key(session: AsyncSession, subject: AuthSubject, key_id: str) -> ApiKey:
    key = await get_api_key(session, subject, key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    audit_action(session, subject, "apikey.revoke", key.org_id, target_type="api_key", target_id=key.id)
    return key


async def _require_can_hold(session: AsyncSession, subject: AuthSubject, key: ApiKey) -> None:
    """Rotating hands out the key's new secret, so it needs what minting the key would need: no taking over a key
    more privileged than yourself."""
    if key.org_role:
        privileges = (await resolve_role(session, key.org_id, key.org_role, "org")).privileges
        if not subject.can_grant_org_role(key.org_id, privileges):
            raise Forbidden(f"API key {key.id} holds privileges you do not have", code="forbidden")
    for b in (await repo.bindings_in_org(session, key.org_id, "api_key", [key.id]))[key.id]:
        privileges = (await resolve_role(session, key.org_id, b.role, "project")).privileges
        clusters = frozenset(b.cluster_ids) if b.cluster_ids is not None else None
        if not subject.can_grant_project_role(key.org_id, b.project_id, privileges, clusters):
            raise Forbidden(f"API key {key.id} holds privileges you do not have", code="forbidden")


async def rotate_api_key(
    session: AsyncSession, subject: AuthSubject, key_id: str, grace_seconds: int
) -> tuple[ApiKey, str]:
    key = await get_api_key(session, subject, key_id)
    if key.revoked_at is not None:
        raise Conflict(f"API key {key_id} is revoked", code="api_key_revoked")
    await _require_can_hold(session, subject, key)
    now = utcnow()
    secret = make_api_key(key.id)
    key.previous_secret_hash = key.secret_hash if grace_seconds > 0 else None
    key.previous_valid_until = now + dt.timedelta(seconds=grace_seconds) if grace_seconds > 0 else None
    key.secret_hash = token_hash(secret.split("_", 2)[2])
    key.rotated_at = now
    audit_action(
        session,
        subject,
        "apikey.rotate",
        key.org_id,
        target_type="api_key",
        target_id=key.id,
        details={"grace_seconds": grace_seconds},
    )
    return key, secret

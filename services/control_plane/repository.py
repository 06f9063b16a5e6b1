"""All SQL of the control-plane domain (organizations, members, projects, roles, invitations, keys, audit)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import delete, exists, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.models import ApiKey, CustomRole, Membership, RoleBinding, User
from services.control_plane.models import Invitation, Project
from services.core.audit import AuditLog


async def members(
    session: AsyncSession, org_id: str, after: str | None, limit: int
) -> Sequence[tuple[Membership, User]]:
    stmt = select(Membership, User).join(User, User.id == Membership.user_id).where(Membership.org_id == org_id)
    if after:
        stmt = stmt.where(Membership.user_id > after)
    rows = await session.execute(stmt.order_by(Membership.user_id).limit(limit + 1))
    return [(m, u) for m, u in rows]


async def membership(session: AsyncSession, org_id: str, user_id: str) -> Membership | None:
    return await session.get(Membership, (org_id, user_id))


async def count_owners(session: AsyncSession, org_id: str) -> int:
    stmt = select(func.count()).where(Membership.org_id == org_id, Membership.org_role == "org_owner")
    return int((await session.execute(stmt)).scalar_one())


async def bindings_in_org(
    session: AsyncSession, org_id: str, principal_type: str, principal_ids: Sequence[str]
) -> dict[str, list[RoleBinding]]:
    out: dict[str, list[RoleBinding]] = {p: [] for p in principal_ids}
    if not principal_ids:
        return out
    stmt = select(RoleBinding).where(
        RoleBinding.org_id == org_id,
        RoleBinding.principal_type == principal_type,
        RoleBinding.principal_id.in_(principal_ids),
    )
    for b in (await session.execute(stmt.order_by(RoleBinding.project_id))).scalars():
        out[b.principal_id].append(b)
    return out


async def delete_bindings(session: AsyncSession, org_id: str, principal_type: str, principal_id: str) -> None:
    await session.execute(
        delete(RoleBinding).where(
            RoleBinding.org_id == org_id,
            RoleBinding.principal_type == principal_type,
            RoleBinding.principal_id == principal_id,
        )
    )


async def projects_by_ids(session: AsyncSession, org_id: str, ids: Sequence[str]) -> dict[str, Project]:
    if not ids:
        return {}
    stmt = select(Project).where(Project.org_id == org_id, Project.id.in_(list(set(ids))))
    return {p.id: p for p in (await session.execute(stmt)).scalars()}


async def projects_of_org(session: AsyncSession, org_id: str) -> Sequence[Project]:
    stmt = select(Project).where(Project.org_id == org_id).order_by(Project.id)
    return (await session.execute(stmt)).scalars().all()


async def project_by_name(session: AsyncSession, org_id: str, name: str) -> Project | None:
    stmt = select(Project).where(Project.org_id == org_id, Project.name == name)
    return (await session.execute(stmt)).scalar_one_or_none()


async def custom_roles(session: AsyncSession, org_id: str) -> Sequence[CustomRole]:
    stmt = select(CustomRole).where(CustomRole.org_id == org_id).order_by(CustomRole.id)
    return (await session.execute(stmt)).scalars().all()


async def custom_role_by_name(session: AsyncSession, org_id: str, name: str) -> CustomRole | None:
    stmt = select(CustomRole).where(CustomRole.org_id == org_id, CustomRole.name == name)
    return (await session.execute(stmt)).scalar_one_or_none()


async def role_in_use(session: AsyncSession, role_id: str) -> bool:
    for stmt in (
        select(Membership.user_id).where(Membership.org_role == role_id).limit(1),
        # A revoked API key can never be used again: its bindings do not keep a role alive.
        select(RoleBinding.id)
        .where(
            RoleBinding.role == role_id,
            ~exists().where(
                RoleBinding.principal_type == "api_key",
                ApiKey.id == RoleBinding.principal_id,
                ApiKey.revoked_at.is_not(None),
            ),
        )
        .limit(1),
        select(ApiKey.id).where(ApiKey.org_role == role_id, ApiKey.revoked_at.is_(None)).limit(1),
    ):
        if (await session.execute(stmt)).first() is not None:
            return True
    return False


async def invitation_by_hash(session: AsyncSession, token_hash: str) -> Invitation | None:
    stmt = select(Invitation).where(Invitation.token_hash == token_hash).with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def pending_invitations(
    session: AsyncSession, org_id: str, now: dt.datetime, after: str | None, limit: int
) -> Sequence[Invitation]:
    stmt = select(Invitation).where(
        Invitation.org_id == org_id, Invitation.accepted_at.is_(None), Invitation.expires_at > now
    )
    if after:
        stmt = stmt.where(Invitation.id > after)
    return (await session.execute(stmt.order_by(Invitation.id).limit(limit + 1))).scalars().all()


async def audit_logs(
    session: AsyncSession,
    org_id: str,
    *,
    actor: str | None,
    action: str | None,
    since: dt.datetime | None,
    before: str | None,
    limit: int,
) -> Sequence[AuditLog]:
    stmt = select(AuditLog).where(AuditLog.org_id == org_id)
    if actor:
        stmt = stmt.where(AuditLog.actor_id == actor)
    if action:
        if action.endswith(".*"):  # "apikey.*": every action of a domain
            stmt = stmt.where(AuditLog.action.startswith(action[:-1], autoescape=True))
        else:
            stmt = stmt.where(AuditLog.action == action)
    if since:
        stmt = stmt.where(AuditLog.created_at >= since)
    if before:
        stmt = stmt.where(AuditLog.id < before)
    return (await session.execute(stmt.order_by(AuditLog.id.desc()).limit(limit + 1))).scalars().all()

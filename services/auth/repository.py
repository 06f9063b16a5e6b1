"""All SQL of the auth domain."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.models import (
    ApiKey,
    AuthSession,
    CustomRole,
    Membership,
    OneTimeToken,
    RefreshToken,
    RoleBinding,
    User,
)
from services.core.db import utcnow


async def user_by_email(session: AsyncSession, email: str) -> User | None:
    return (await session.execute(select(User).where(User.email == email.lower()))).scalar_one_or_none()


async def memberships_of_user(session: AsyncSession, user_id: str) -> Sequence[Membership]:
    return (await session.execute(select(Membership).where(Membership.user_id == user_id))).scalars().all()


async def bindings_of(session: AsyncSession, principal_type: str, principal_id: str) -> Sequence[RoleBinding]:
    stmt = select(RoleBinding).where(
        RoleBinding.principal_type == principal_type, RoleBinding.principal_id == principal_id
    )
    return (await session.execute(stmt)).scalars().all()


async def custom_roles_by_id(session: AsyncSession, ids: Iterable[str]) -> dict[str, CustomRole]:
    wanted = [i for i in set(ids) if i.startswith("role_")]
    if not wanted:
        return {}
    rows = (await session.execute(select(CustomRole).where(CustomRole.id.in_(wanted)))).scalars().all()
    return {r.id: r for r in rows}


async def refresh_token_by_hash(session: AsyncSession, token_hash: str) -> RefreshToken | None:
    stmt = select(RefreshToken).where(RefreshToken.token_hash == token_hash).with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def revoke_session(session: AsyncSession, session_id: str, reason: str) -> None:
    await session.execute(
        update(AuthSession)
        .where(AuthSession.id == session_id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=utcnow(), revoked_reason=reason)
    )


async def revoke_user_sessions(session: AsyncSession, user_id: str, reason: str) -> None:
    await session.execute(
        update(AuthSession)
        .where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=utcnow(), revoked_reason=reason)
    )


async def one_time_token_by_hash(session: AsyncSession, token_hash: str, purpose: str) -> OneTimeToken | None:
    stmt = (
        select(OneTimeToken)
        .where(OneTimeToken.token_hash == token_hash, OneTimeToken.purpose == purpose)
        .with_for_update()
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def spend_other_tokens(session: AsyncSession, user_id: str, purpose: str) -> None:
    await session.execute(
        update(OneTimeToken)
        .where(OneTimeToken.user_id == user_id, OneTimeToken.purpose == purpose, OneTimeToken.used_at.is_(None))
        .values(used_at=utcnow())
    )


async def api_keys_of_org(session: AsyncSession, org_id: str, after: str | None, limit: int) -> Sequence[ApiKey]:
    stmt = select(ApiKey).where(ApiKey.org_id == org_id)
    if after:
        stmt = stmt.where(ApiKey.id > after)
    return (await session.execute(stmt.order_by(ApiKey.id).limit(limit + 1))).scalars().all()


async def touch_api_keys(session: AsyncSession, seen: dict[str, dt.datetime]) -> None:
    for key_id, when in seen.items():
        await session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id)
            .where((ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < when))
            .values(last_used_at=when)
        )

"""Identity routes (thin): login, refresh, logout, /v1/me, email verification, password reset."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from services.auth import service
from services.auth.authenticate import load_user_subject
from services.auth.deps import AuthCache, DbSession, KVStore, Subject, UserSubject
from services.auth.models import User
from services.auth.schemas import (
    Accepted,
    ApiKeyIdentity,
    EmailIn,
    LoginIn,
    MembershipOut,
    MeOut,
    PasswordChangeIn,
    PasswordResetIn,
    RefreshIn,
    TokenIn,
    TokenPair,
    UserOut,
)
from services.core.errors import NotFound
from services.core.responses import errors

router = APIRouter(prefix="/v1", tags=["identity"])


def user_out(user: User) -> UserOut:
    return UserOut(
        id=user.id,
        email=user.email,
        name=user.name,
        email_verified=user.email_verified_at is not None,
        created_at=user.created_at,
    )


@router.post("/auth/login", response_model=TokenPair, responses=errors(400, 401, 429))
async def login(body: LoginIn, session: DbSession, kv: KVStore) -> TokenPair:
    return await service.login(session, kv, body.email, body.password)


@router.post("/auth/refresh", response_model=TokenPair, responses=errors(400, 401))
async def refresh(body: RefreshIn, session: DbSession, request: Request) -> TokenPair:
    return await service.refresh(session, request.app.state.db, body.refresh_token)


@router.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT, responses=errors(401))
async def logout(subject: UserSubject, session: DbSession, auth: AuthCache) -> None:
    assert subject.user_id is not None
    await service.logout(session, subject.session_id, subject.user_id)
    auth.invalidate()


@router.get("/me", response_model=MeOut, responses=errors(401))
async def me(subject: Subject, request: Request) -> MeOut:
    memberships = [MembershipOut(org_id=o, role=r) for o, r in sorted(subject.org_roles.items())]
    if subject.kind == "api_key":  # answered from the authenticated subject: no database round trip
        assert subject.home_org_id is not None and subject.name is not None
        return MeOut(
            user=None,
            api_key=ApiKeyIdentity(id=subject.id, org_id=subject.home_org_id, name=subject.name),
            memberships=memberships,
        )
    async with request.app.state.db.session() as session:
        user = await session.get(User, subject.id)
    if user is None:
        raise NotFound("user not found", code="user_not_found")
    return MeOut(user=user_out(user), memberships=memberships)


@router.post("/auth/verify-email", response_model=UserOut, responses=errors(400))
async def verify_email(body: TokenIn, session: DbSession) -> UserOut:
    return user_out(await service.verify_email(session, body.token))


@router.post(
    "/auth/verify-email/resend",
    response_model=Accepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(401),
)
async def resend_verification(subject: UserSubject, session: DbSession) -> Accepted:
    user = await session.get(User, subject.id)
    assert user is not None
    if user.email_verified_at is None:
        await service.send_verification(session, user)
    return Accepted(detail="if the address is not verified yet, a new verification email is on its way")


@router.post(
    "/auth/password-reset",
    response_model=Accepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(400),
)
async def request_password_reset(body: EmailIn, session: DbSession) -> Accepted:
    await service.request_password_reset(session, body.email)
    return Accepted(detail="if an account exists for this email, a reset link has been sent")


@router.post(
    "/auth/password-reset/confirm",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(400, 422),
)
async def confirm_password_reset(body: PasswordResetIn, session: DbSession, auth: AuthCache) -> None:
    await service.reset_password(session, body.token, body.new_password)
    auth.invalidate()


@router.post("/auth/password", response_model=TokenPair, responses=errors(400, 401, 422))
async def change_password(
    body: PasswordChangeIn, subject: UserSubject, session: DbSession, auth: AuthCache
) -> TokenPair:
    user = await session.get(User, subject.id)
    assert user is not None
    pair = await service.change_password(session, user, body.current_password, body.new_password)
    auth.invalidate()
    return pair


__all__ = ["load_user_subject", "router"]

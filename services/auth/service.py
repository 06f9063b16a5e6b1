"""Identity rules: users, passwords, console sessions with rotating refresh tokens, emailed one-time tokens,
login throttling. Services flush, never commit: the request owns the transaction."""

from __future__ import annotations

import datetime as dt
import hashlib

from anyio.to_thread import run_sync as to_thread
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth import repository as repo
from services.auth.crypto import hash_password, needs_rehash, random_token, token_hash, verify_password
from services.auth.models import AuthSession, OneTimeToken, RefreshToken, User
from services.auth.schemas import TokenPair
from services.auth.tokens import issue_access_token
from services.core import audit
from services.core.db import Database, utcnow
from services.core.errors import BadRequest, Conflict, TooManyRequests, Unauthorized, Unprocessable
from services.core.ids import new_id
from services.core.kv import KV
from services.core.mail import queue_email
from services.core.request_context import current_request
from services.core.settings import get_settings

VERIFY_EMAIL = "verify_email"
RESET_PASSWORD = "reset_password"


def normalize_email(email: str) -> str:
    return email.strip().lower()


def check_password_policy(password: str, email: str) -> None:
    settings = get_settings()
    if len(password) < settings.password_min_length:
        raise Unprocessable(
            f"password: must be at least {settings.password_min_length} characters", code="weak_password"
        )
    if not password.strip():
        raise Unprocessable("password: must not be only white space", code="weak_password")
    if password.lower() == email.lower():
        raise Unprocessable("password: must not be the email address", code="weak_password")


async def create_user(session: AsyncSession, email: str, password: str, name: str) -> User:
    email = normalize_email(email)
    check_password_policy(password, email)
    if await repo.user_by_email(session, email) is not None:
        raise Conflict("an account with this email already exists", code="email_taken")
    user = User(id=new_id("usr"), email=email, name=name, password_hash=await to_thread(hash_password, password))
    session.add(user)
    await session.flush()
    await send_verification(session, user)
    return user


async def start_session(session: AsyncSession, user: User) -> TokenPair:
    settings = get_settings()
    ctx = current_request()
    now = utcnow()
    auth_session = AuthSession(
        id=new_id("ses"),
        user_id=user.id,
        created_at=now,
        expires_at=now + dt.timedelta(seconds=settings.refresh_token_ttl_seconds),
        ip=ctx.ip if ctx else None,
        user_agent=ctx.user_agent if ctx else None,
    )
    session.add(auth_session)
    await session.flush()
    return await _issue_pair(session, user.id, auth_session)


async def _issue_pair(session: AsyncSession, user_id: str, auth_session: AuthSession) -> TokenPair:
    refresh = "vr_" + random_token(32)
    session.add(
        RefreshToken(
            id=new_id("rt"),
            session_id=auth_session.id,
            token_hash=token_hash(refresh),
            created_at=utcnow(),
            expires_at=auth_session.expires_at,
        )
    )
    access, ttl = issue_access_token(user_id, auth_session.id)
    await session.flush()
    return TokenPair(access_token=access, refresh_token=refresh, expires_in=ttl)


def _throttle_key(email: str) -> str:
    return "login-fail:" + hashlib.sha256(normalize_email(email).encode()).hexdigest()


async def login(session: AsyncSession, kv: KV, email: str, password: str) -> TokenPair:
    """Failed logins are counted per email whether or not an account exists, and past the limit every attempt
    for that email is a 429 with the same body, so throttling never tells which emails have accounts."""
    settings = get_settings()
    key = _throttle_key(email)
    failures, retry_after = await kv.get_int(key)
    if failures >= settings.login_max_failures:
        raise TooManyRequests(
            "too many failed logins for this account; try again later",
            retry_after=retry_after,
            code="login_throttled",
        )
    user = await repo.user_by_email(session, normalize_email(email))
    if not await to_thread(verify_password, user.password_hash if user else None, password) or user is None:
        await kv.incr(key, settings.login_lockout_seconds)
        raise Unauthorized("invalid email or password", code="invalid_credentials")
    await kv.delete(key)
    if needs_rehash(user.password_hash):
        user.password_hash = await to_thread(hash_password, password)
    audit.record(session, action="auth.login", org_id=None, actor_type="user", actor_id=user.id)
    return await start_session(session, user)


async def refresh(session: AsyncSession, db: Database, refresh_token: str) -> TokenPair:
    now = utcnow()
    row = await repo.refresh_token_by_hash(session, token_hash(refresh_token))
    if row is None:
        raise Unauthorized("invalid refresh token", code="invalid_refresh_token")
    auth_session = await session.get(AuthSession, row.session_id)
    if auth_session is None or auth_session.revoked_at is not None or auth_session.expires_at <= now:
        raise Unauthorized("session ended", code="session_revoked")
    # Spend the token with a conditional update so that of two concurrent refreshes exactly one wins.
    spent = await session.execute(
        update(RefreshToken).where(RefreshToken.id == row.id, RefreshToken.used_at.is_(None)).values(used_at=now)
    )
    if spent.rowcount != 1:  # type: ignore[attr-defined]
        # Reuse of a spent token: someone else has it. End the whole family, in its own transaction because
        # this request's transaction is rolled back by the 401 (rolled back first: SQLite has one writer).
        family, user_id = auth_session.id, auth_session.user_id
        await session.rollback()
        async with db.transaction() as s2:
            await repo.revoke_session(s2, family, "refresh_token_reuse")
            audit.record(
                s2,
                action="auth.refresh_token_reuse",
                org_id=None,
                actor_type="user",
                actor_id=user_id,
                target_type="session",
                target_id=family,
                result="denied",
            )
        raise Unauthorized("refresh token already used; the session has been revoked", code="refresh_token_reused")
    if row.expires_at <= now:
        raise Unauthorized("refresh token expired", code="invalid_refresh_token")
    return await _issue_pair(session, auth_session.user_id, auth_session)


async def logout(session: AsyncSession, session_id: str | None, user_id: str) -> None:
    if session_id:
        await repo.revoke_session(session, session_id, "logout")
    audit.record(session, action="auth.logout", org_id=None, actor_type="user", actor_id=user_id)


async def _one_time_token(session: AsyncSession, user: User, purpose: str, ttl: int) -> str:
    await repo.spend_other_tokens(session, user.id, purpose)
    token = random_token(32)
    session.add(
        OneTimeToken(
            id=new_id("ott"),
            user_id=user.id,
            purpose=purpose,
            token_hash=token_hash(token),
            expires_at=utcnow() + dt.timedelta(seconds=ttl),
        )
    )
    await session.flush()
    return token


async def send_verification(session: AsyncSession, user: User) -> None:
    settings = get_settings()
    token = await _one_time_token(session, user, VERIFY_EMAIL, settings.email_token_ttl_seconds)
    queue_email(
        session,
        user.email,
        "Verify your Vecta email address",
        f"Hello {user.name},\n\nConfirm your email address for Vecta:\n\n"
        f"{settings.public_url}/console/verify-email?token={token}\n\n"
        f"Or send this token to POST /v1/auth/verify-email: {token}\n\n"
        f"The link expires in {settings.email_token_ttl_seconds // 3600} hours.\n",
    )


async def _spend(session: AsyncSession, token: str, purpose: str) -> OneTimeToken:
    row = await repo.one_time_token_by_hash(session, token_hash(token), purpose)
    now = utcnow()
    if row is None or row.used_at is not None or row.expires_at <= now:
        raise BadRequest("token is invalid, expired or already used", code="invalid_token")
    spent = await session.execute(
        update(OneTimeToken).where(OneTimeToken.id == row.id, OneTimeToken.used_at.is_(None)).values(used_at=now)
    )
    if spent.rowcount != 1:  # type: ignore[attr-defined]
        raise BadRequest("token is invalid, expired or already used", code="invalid_token")
    return row


async def verify_email(session: AsyncSession, token: str) -> User:
    row = await _spend(session, token, VERIFY_EMAIL)
    user = await session.get(User, row.user_id)
    assert user is not None
    if user.email_verified_at is None:
        user.email_verified_at = utcnow()
    audit.record(session, action="auth.verify_email", org_id=None, actor_type="user", actor_id=user.id)
    return user


async def request_password_reset(session: AsyncSession, email: str) -> None:
    """Always answers the same way; only an existing account gets an email."""
    settings = get_settings()
    user = await repo.user_by_email(session, normalize_email(email))
    if user is None:
        return
    token = await _one_time_token(session, user, RESET_PASSWORD, 3600)
    queue_email(
        session,
        user.email,
        "Reset your Vecta password",
        f"Hello {user.name},\n\nSomeone asked to reset the password of your Vecta account. If it was you:\n\n"
        f"{settings.public_url}/console/reset-password?token={token}\n\n"
        f"Or send this token to POST /v1/auth/password-reset/confirm: {token}\n\n"
        "The link expires in one hour. If it was not you, ignore this email.\n",
    )


async def set_password(session: AsyncSession, user: User, new_password: str) -> None:
    check_password_policy(new_password, user.email)
    user.password_hash = await to_thread(hash_password, new_password)
    user.password_changed_at = utcnow()
    # Every session ends, and with it every access token minted for it (checked on each request).
    await repo.revoke_user_sessions(session, user.id, "password_changed")


async def reset_password(session: AsyncSession, token: str, new_password: str) -> None:
    row = await _spend(session, token, RESET_PASSWORD)
    user = await session.get(User, row.user_id)
    assert user is not None
    await set_password(session, user, new_password)
    if user.email_verified_at is None:  # they proved they read mail sent to this address
        user.email_verified_at = utcnow()
    audit.record(session, action="auth.password_reset", org_id=None, actor_type="user", actor_id=user.id)


async def change_password(session: AsyncSession, user: User, current: str, new_password: str) -> TokenPair:
    if not await to_thread(verify_password, user.password_hash, current):
        raise Unauthorized("current password is wrong", code="invalid_credentials")
    await set_password(session, user, new_password)
    audit.record(session, action="auth.password_change", org_id=None, actor_type="user", actor_id=user.id)
    return await start_session(session, user)

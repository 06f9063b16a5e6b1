"""Bearer token → ``AuthSubject``.

A verified subject is cached in process for at most ``VECTA_AUTH_CACHE_TTL_SECONDS`` (≤ 1 s), keyed by an HMAC of
the whole token, so an authenticated request costs a dictionary lookup and a revocation (of an API key, a session,
or a role change) reaches every process within a second; in the process that made the change it is immediate
(``invalidate``). ``last_used_at`` of API keys is kept in memory and written in batches, never per request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import time
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from services.auth import repository as repo
from services.auth.crypto import parse_api_key, token_hash
from services.auth.models import ApiKey, AuthSession, User
from services.auth.roles import BUILTIN_ROLES
from services.auth.subject import AuthSubject, Binding
from services.auth.tokens import decode_access_token
from services.core.db import Database, utcnow
from services.core.errors import Unauthorized
from services.core.settings import get_settings

log = logging.getLogger(__name__)


async def resolve_roles(session: AsyncSession, role_names: list[str]) -> dict[str, frozenset[str]]:
    custom = await repo.custom_roles_by_id(session, role_names)
    out: dict[str, frozenset[str]] = {}
    for name in role_names:
        if name in BUILTIN_ROLES:
            out[name] = BUILTIN_ROLES[name]
        elif name in custom:
            out[name] = frozenset(custom[name].privileges)
        else:
            out[name] = frozenset()
    return out


async def _bindings(session: AsyncSession, principal_type: str, principal_id: str) -> tuple[Binding, ...]:
    rows = await repo.bindings_of(session, principal_type, principal_id)
    privs = await resolve_roles(session, [r.role for r in rows])
    return tuple(
        Binding(
            org_id=r.org_id,
            project_id=r.project_id,
            role=r.role,
            privileges=privs[r.role],
            cluster_ids=frozenset(r.cluster_ids) if r.cluster_ids is not None else None,
        )
        for r in rows
    )


async def load_user_subject(session: AsyncSession, user: User, session_id: str | None) -> AuthSubject:
    memberships = await repo.memberships_of_user(session, user.id)
    role_privs = await resolve_roles(session, [m.org_role for m in memberships])
    return AuthSubject(
        kind="user",
        id=user.id,
        org_roles={m.org_id: m.org_role for m in memberships},
        org_role_privileges={m.org_id: role_privs[m.org_role] for m in memberships},
        bindings=await _bindings(session, "user", user.id),
        session_id=session_id,
        email=user.email,
    )


async def load_key_subject(session: AsyncSession, key: ApiKey) -> AuthSubject:
    org_roles: dict[str, str] = {}
    org_privs: dict[str, frozenset[str]] = {}
    if key.org_role:
        org_roles[key.org_id] = key.org_role
        org_privs[key.org_id] = (await resolve_roles(session, [key.org_role]))[key.org_role]
    return AuthSubject(
        kind="api_key",
        id=key.id,
        org_roles=org_roles,
        org_role_privileges=org_privs,
        bindings=await _bindings(session, "api_key", key.id),
        name=key.name,
        home_org_id=key.org_id,
    )


def key_secret_matches(key: ApiKey, secret: str, now: dt.datetime) -> Literal["current", "previous"] | None:
    """Which of the key's secrets this is: the current one, or the pre-rotation one within its grace period."""
    digest = token_hash(secret)
    if hmac.compare_digest(digest, key.secret_hash):
        return "current"
    if (
        key.previous_secret_hash is not None
        and key.previous_valid_until is not None
        and now < key.previous_valid_until
        and hmac.compare_digest(digest, key.previous_secret_hash)
    ):
        return "previous"
    return None


class Authenticator:
    """Verifies bearers (API keys, console access tokens) and caches each verification for at most
    ``VECTA_AUTH_CACHE_TTL_SECONDS`` (1 s: a revocation or a role change takes effect within it). ``cached`` (the
    edge's fast lane) verifies a bearer again in the background once half of that has passed, so a key in steady
    use never falls out of the cache and never waits for the database, while no entry is older than the TTL."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._cache: dict[str, tuple[float, AuthSubject, float]] = {}  # hash -> (expires, subject, refresh from)
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_used: dict[str, float] = {}  # API key id -> time.time() of its last use (a float: cheap per request)
        self._flush_lock = asyncio.Lock()

    def invalidate(self) -> None:
        """Forget every cached subject (after a revocation or a role change in this process)."""
        self._cache.clear()

    def cached(self, token: str, cache_key: str | None = None) -> AuthSubject | None:
        """The subject for ``token`` when a verification of it is cached and still fresh, else None (without
        waiting: the edge's fast lane; ``authenticate`` verifies). ``cache_key``: ``token_hash(token)`` when the
        caller has it already (a connection sending the same bearer again)."""
        if cache_key is None:
            cache_key = token_hash(token)
        hit = self._cache.get(cache_key)
        now = time.monotonic()
        if hit is None or hit[0] <= now:
            return None
        subject = hit[1]
        if now >= hit[2] and cache_key not in self._refreshing:
            self._refreshing.add(cache_key)
            task = asyncio.get_running_loop().create_task(self._refresh(token, cache_key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if subject.kind == "api_key":
            self._last_used[subject.id] = time.time()
        return subject

    async def _refresh(self, token: str, cache_key: str) -> None:
        try:
            now = time.monotonic()
            subject, valid_for = await self._verify(token)
            self._remember(cache_key, subject, valid_for, now)
        except Unauthorized:
            self._cache.pop(cache_key, None)  # revoked, expired, session ended: the next request is refused
        except Exception:  # the database is unavailable: the entry expires as usual, and the usual path answers
            log.exception("could not verify a cached credential again")
        finally:
            self._refreshing.discard(cache_key)

    def _remember(self, cache_key: str, subject: AuthSubject, valid_for: float, verified_at: float) -> None:
        ttl = min(get_settings().auth_cache_ttl_seconds, valid_for)
        if ttl > 0:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[cache_key] = (verified_at + ttl, subject, verified_at + ttl / 2)

    async def authenticate(self, token: str) -> AuthSubject:
        cache_key = token_hash(token)
        hit = self._cache.get(cache_key)
        now_mono = time.monotonic()
        if hit is not None and hit[0] > now_mono:
            subject = hit[1]
        else:
            subject, valid_for = await self._verify(token)
            self._remember(cache_key, subject, valid_for, now_mono)
        if subject.kind == "api_key":
            self._last_used[subject.id] = time.time()
        return subject

    async def _verify(self, token: str) -> tuple[AuthSubject, float]:
        now = utcnow()
        parsed = parse_api_key(token)
        if parsed is not None:
            async with self._db.session() as session:
                key = await session.get(ApiKey, parsed.key_id)
                if key is None or key.revoked_at is not None:
                    raise Unauthorized("invalid or revoked API key", code="invalid_api_key")
                if key.expires_at is not None and key.expires_at <= now:
                    raise Unauthorized("API key expired", code="api_key_expired")
                match = key_secret_matches(key, parsed.secret, now)
                if match is None:
                    raise Unauthorized("invalid or revoked API key", code="invalid_api_key")
                limits = [key.expires_at, key.previous_valid_until if match == "previous" else None]
                valid_for = min([(t - now).total_seconds() for t in limits if t is not None], default=3600.0)
                return await load_key_subject(session, key), valid_for
        if token.startswith("vk_"):
            raise Unauthorized("malformed API key", code="invalid_api_key")
        claims = decode_access_token(token)
        if claims is None:
            raise Unauthorized("invalid or expired access token", code="invalid_token")
        async with self._db.session() as session:
            auth_session = await session.get(AuthSession, claims.session_id)
            if auth_session is None or auth_session.user_id != claims.user_id or auth_session.revoked_at:
                raise Unauthorized("session ended", code="session_revoked")
            user = await session.get(User, claims.user_id)
            if user is None:
                raise Unauthorized("invalid or expired access token", code="invalid_token")
            return await load_user_subject(session, user, claims.session_id), claims.expires_at - time.time()

    async def flush_last_used(self) -> None:
        async with self._flush_lock:
            if not self._last_used:
                return
            seen, self._last_used = self._last_used, {}
            try:
                async with self._db.transaction() as session:
                    when = {k: dt.datetime.fromtimestamp(v, dt.UTC) for k, v in seen.items()}
                    await repo.touch_api_keys(session, when)
            except Exception:  # a failed flush must never break serving; retry with the next batch
                log.exception("could not record API key last_used_at")
                for k, v in seen.items():
                    self._last_used.setdefault(k, v)

"""Request dependencies: the transaction, the authenticated subject, pagination.

The request owns the transaction: ``get_session`` commits once the endpoint returns (before the response is sent)
and rolls back on any error; tasks buffered during the request are sent only after that commit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.authenticate import Authenticator
from services.auth.subject import AuthSubject
from services.core.celery_app import send
from services.core.db import Database
from services.core.errors import Unauthorized
from services.core.kv import KV
from services.core.pagination import Page
from services.core.request_context import current_request


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    db: Database = request.app.state.db
    async with db.session() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
    ctx = current_request()
    if ctx is not None and ctx.pending_tasks:
        pending, ctx.pending_tasks = ctx.pending_tasks, []
        for name, args, kwargs in pending:
            await anyio.to_thread.run_sync(send, name, args, kwargs)


DbSession = Annotated[AsyncSession, Depends(_session, scope="function")]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization header must be 'Bearer <token>'", code="invalid_authorization_header")
    return token.strip()


async def _subject(request: Request) -> AuthSubject:
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("missing bearer token", code="missing_credentials")
    authenticator: Authenticator = request.app.state.authenticator
    subject = await authenticator.authenticate(token)
    request.state.subject = subject
    return subject


Subject = Annotated[AuthSubject, Depends(_subject)]


def _user_subject(subject: Subject) -> AuthSubject:
    if subject.kind != "user":
        raise Unauthorized("this route needs a console session, not an API key", code="session_required")
    return subject


UserSubject = Annotated[AuthSubject, Depends(_user_subject)]


def get_kv(request: Request) -> KV:
    kv: KV = request.app.state.kv
    return kv


KVStore = Annotated[KV, Depends(get_kv)]


def _page(
    limit: Annotated[int, Query(ge=1, le=500, description="Page size (default 50, max 500)")] = 50,
    page_token: Annotated[str | None, Query(max_length=200, description="Token from a previous page")] = None,
) -> Page:
    return Page.from_query(limit, page_token)


Pagination = Annotated[Page, Depends(_page)]


def authenticator(request: Request) -> Authenticator:
    a: Authenticator = request.app.state.authenticator
    return a


AuthCache = Annotated[Authenticator, Depends(authenticator)]

"""Database plumbing: the declarative base, engines and sessions (async for the API, sync for Celery tasks)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from sqlalchemy import JSON, DateTime, MetaData, String, TypeDecorator, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from services.core.settings import get_settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset; this puts it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class IdMixin:
    id: Mapped[str] = mapped_column(String(40), primary_key=True)


class TimestampMixin:
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # The busy timeout first: every statement after it, these pragmas included, waits for a lock held by another
    # connection instead of failing at once with "database is locked" (a new connection made while a writer
    # holds the database, e.g. a Celery task committing during a test's heartbeat).
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_async_engine(url: str | None = None) -> AsyncEngine:
    settings = get_settings()
    url = url or settings.async_database_url
    kwargs: dict[str, Any] = {}
    if not url.startswith("sqlite"):
        kwargs.update(pool_size=settings.database_pool_size, max_overflow=20, pool_pre_ping=True)
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def make_sync_engine(url: str | None = None) -> Engine:
    settings = get_settings()
    url = url or settings.sync_database_url
    kwargs: dict[str, Any] = {}
    if not url.startswith("sqlite"):
        kwargs.update(pool_size=5, max_overflow=5, pool_pre_ping=True)
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class Database:
    """Owns the engines of one process; created once (by the app's lifespan or a Celery worker)."""

    def __init__(self, async_url: str | None = None) -> None:
        self.async_engine = make_async_engine(async_url)
        self._sessionmaker = async_sessionmaker(self.async_engine, expire_on_commit=False)
        self._sync_engine: Engine | None = None
        self._sync_sessionmaker: sessionmaker[Session] | None = None

    def session(self) -> AsyncSession:
        return self._sessionmaker()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self._sessionmaker() as session, session.begin():
            yield session

    @property
    def sync_engine(self) -> Engine:
        if self._sync_engine is None:
            from services.core.settings import to_sync_url

            self._sync_engine = make_sync_engine(to_sync_url(str(self.async_engine.url.render_as_string(False))))
            self._sync_sessionmaker = sessionmaker(self._sync_engine, expire_on_commit=False)
        return self._sync_engine

    @contextmanager
    def sync_transaction(self) -> Iterator[Session]:
        _ = self.sync_engine
        assert self._sync_sessionmaker is not None
        with self._sync_sessionmaker() as session, session.begin():
            yield session

    async def dispose(self) -> None:
        await self.async_engine.dispose()
        if self._sync_engine is not None:
            self._sync_engine.dispose()


_db: Database | None = None


def get_database() -> Database:
    global _db
    if _db is None:
        _db = Database()
    return _db


def set_database(db: Database | None) -> None:
    global _db
    _db = db

"""Alembic migrations: upgrade to head, down to base and up again on the test backend (a fresh database of its
own, never the session's), and the models' metadata equals what head builds, so a model change without a new
revision fails here."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from services.cli import alembic_config
from services.core.models import metadata
from tests.conftest import PG_URL


@pytest.fixture
def fresh_url(tmp_path: Path) -> Iterator[str]:
    """A synchronous URL of an empty database on the current test backend."""
    if not PG_URL:
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    name = f"vecta_mig_{uuid.uuid4().hex[:10]}"
    base = make_url(PG_URL).set(drivername="postgresql+psycopg")
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _current(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "render_as_batch": conn.dialect.name == "sqlite"}
            )
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(fresh_url: str) -> None:
    cfg = alembic_config(fresh_url)
    head = ScriptDirectory.from_config(cfg).get_current_head()
    model_tables = set(metadata.tables)
    assert model_tables, "no models registered in services.core.models.metadata"

    command.upgrade(cfg, "head")
    assert _current(fresh_url) == head
    assert model_tables <= _tables(fresh_url)

    command.downgrade(cfg, "base")
    assert _current(fresh_url) is None
    assert _tables(fresh_url) - {"alembic_version"} == set()

    command.upgrade(cfg, "head")
    assert _current(fresh_url) == head
    assert model_tables <= _tables(fresh_url)


def test_each_revision_steps_down_and_up(fresh_url: str) -> None:
    """Every revision on its own: up one, down one, up one (catches a downgrade that breaks a later upgrade)."""
    cfg = alembic_config(fresh_url)
    revisions = list(reversed(list(ScriptDirectory.from_config(cfg).walk_revisions())))
    for rev in revisions:
        command.upgrade(cfg, rev.revision)
        command.downgrade(cfg, rev.down_revision or "base")
        command.upgrade(cfg, rev.revision)
        assert _current(fresh_url) == rev.revision


def test_models_match_head(fresh_url: str) -> None:
    command.upgrade(alembic_config(fresh_url), "head")
    diff = _diff(fresh_url)
    assert diff == [], f"the models differ from the migrations at head (add an Alembic revision): {diff}"

"""Shared fixtures: a migrated database (SQLite by default; PostgreSQL when VECTA_TEST_DATABASE_URL is set),
the app with its lifespan, an httpx client over ASGI, and small builders for users, orgs and keys.

Each test session gets a fresh database: a SQLite file in a temporary folder, or a new PostgreSQL database
created from VECTA_TEST_DATABASE_URL and dropped at the end. Tests build their own tenants with unique emails, so
they never see each other's data.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

_TMP = Path(tempfile.mkdtemp(prefix="vecta-test-"))
PG_URL = os.environ.get("VECTA_TEST_DATABASE_URL", "")
REDIS_URL = os.environ.get("VECTA_TEST_REDIS_URL", "")
_PG_DB = f"vecta_test_{uuid.uuid4().hex[:10]}"


def _database_url() -> str:
    if not PG_URL:
        return f"sqlite+aiosqlite:///{_TMP / 'vecta.db'}"
    url = make_url(PG_URL).set(drivername="postgresql+psycopg")
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{_PG_DB}"'))
    admin.dispose()
    return url.set(database=_PG_DB).render_as_string(hide_password=False)


# Settings are read from the environment when first used: set it before any app module asks.
os.environ.update(
    VECTA_ENV="test",
    VECTA_HOME=str(_TMP / "home"),
    VECTA_DATABASE_URL=_database_url(),
    VECTA_CELERY_EAGER="true",
    VECTA_EMAIL_BACKEND="file",
    VECTA_SECRET_KEY=secrets.token_urlsafe(48),
    VECTA_API_KEY_PEPPER=secrets.token_urlsafe(48),
    VECTA_LOGIN_MAX_FAILURES="5",
    VECTA_LAST_USED_FLUSH_SECONDS="0.2",
)
if REDIS_URL:
    os.environ["VECTA_REDIS_URL"] = REDIS_URL
    os.environ["VECTA_BROKER_URL"] = REDIS_URL
else:
    os.environ.pop("VECTA_REDIS_URL", None)
    os.environ.pop("VECTA_BROKER_URL", None)

from services.core.settings import get_settings, reset_settings  # noqa: E402

reset_settings()


@pytest.fixture(scope="session", autouse=True)
def _fast_password_hashing() -> Iterator[None]:
    """argon2id with production parameters costs ~0.1-0.4 s a hash here; tests hash hundreds of passwords, so
    they use the cheapest argon2id parameters (test_identity checks production parameters separately)."""
    from argon2 import PasswordHasher

    from services.auth import crypto

    original = crypto._hasher
    crypto._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    yield
    crypto._hasher = original


@pytest.fixture(scope="session", autouse=True)
def _stop_engines_at_exit() -> Iterator[None]:
    """Cluster engines run as their own sessions' processes: stop every one started under the test home."""
    yield
    from tests.clusterkit import stop_engines

    stop_engines(_TMP)


@pytest.fixture(scope="session")
def backend() -> str:
    return "postgresql" if PG_URL else "sqlite"


@pytest.fixture(scope="session", autouse=True)
def migrated_db() -> Iterator[str]:
    from alembic import command

    from services.cli import alembic_config

    settings = get_settings()
    settings.ensure_home()
    command.upgrade(alembic_config(settings.sync_database_url), "head")
    yield settings.sync_database_url
    if PG_URL:
        from services.core import db as core_db

        core_db.set_database(None)
        url = make_url(PG_URL).set(drivername="postgresql+psycopg", database="postgres")
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{_PG_DB}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
async def app(migrated_db: str) -> AsyncIterator[Any]:
    from services.api.app import create_app

    application = create_app()
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


def unique_email(tag: str = "user") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}@example.com"


PASSWORD = "correct horse battery staple"


@dataclass
class Tenant:
    """A signed-up user with their organization and its default project."""

    email: str
    user_id: str
    org_id: str
    project_id: str
    access_token: str
    refresh_token: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def signup(client: httpx.AsyncClient, tag: str = "owner", org_name: str | None = "Acme") -> Tenant:
    email = unique_email(tag)
    body: dict[str, Any] = {"email": email, "password": PASSWORD, "name": tag.title()}
    if org_name:
        body["org_name"] = org_name
    r = await client.post("/v1/auth/signup", json=body)
    assert r.status_code == 201, r.text
    data = r.json()
    org_id = data["org"]["id"] if data["org"] else ""
    project_id = ""
    if org_id:
        projects = await client.get(f"/v1/orgs/{org_id}/projects", headers=auth(data["access_token"]))
        assert projects.status_code == 200, projects.text
        project_id = projects.json()["items"][0]["id"]
    return Tenant(email, data["user"]["id"], org_id, project_id, data["access_token"], data["refresh_token"])


async def add_member(
    client: httpx.AsyncClient,
    owner: Tenant,
    org_role: str = "org_member",
    project_roles: list[dict[str, Any]] | None = None,
    tag: str = "member",
) -> Tenant:
    """Invite a new user into the owner's org with the given roles; returns the member, logged in."""
    member = await signup(client, tag=tag, org_name=None)
    r = await client.post(
        f"/v1/orgs/{owner.org_id}/invitations",
        json={"email": member.email, "org_role": org_role, "project_roles": project_roles or []},
        headers=owner.headers,
    )
    assert r.status_code == 201, r.text
    r2 = await client.post(f"/v1/invitations/{r.json()['token']}/accept", headers=member.headers)
    assert r2.status_code == 200, r2.text
    member.org_id = owner.org_id
    member.project_id = owner.project_id
    return member


async def create_key(client: httpx.AsyncClient, owner: Tenant, **body: Any) -> dict[str, Any]:
    body.setdefault("name", "test key")
    body.setdefault("project_roles", [])
    r = await client.post(f"/v1/orgs/{owner.org_id}/api-keys", json=body, headers=owner.headers)
    assert r.status_code == 201, r.text
    return r.json()


def mail_dir() -> Path:
    return get_settings().mail_dir


def find_mail(to: str, subject_contains: str) -> str:
    import email

    for path in sorted(mail_dir().glob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes())
        if msg["To"] == to and subject_contains in (msg["Subject"] or ""):
            payload = msg.get_payload(decode=True)
            return payload.decode() if isinstance(payload, bytes) else str(msg.get_payload())
    raise AssertionError(f"no email to {to} about {subject_contains!r}")

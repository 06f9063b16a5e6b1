"""Role-by-route authorization matrix for every control-plane route.

One organization ("A") is set up once per module with a member for each built-in role (project roles bound on
the default project for a member whose organization role is ``org_member``), a member with a custom organization
role, API keys of each scope, an expired and a revoked key, and a second organization ("B") whose owner and key
act as the other tenant. Every route is called by every principal and the status codes compared with the one
table below. Destructive routes get a fresh target per cell. A route of the app with no row fails the test.
"""

from __future__ import annotations

import datetime as dt
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio
from argon2 import PasswordHasher
from fastapi import FastAPI
from sqlalchemy import select, update

from services.auth import crypto
from services.auth.models import ApiKey, RoleBinding
from services.control_plane.clusters.models import Cluster
from services.core.ids import new_id
from tests.clusterkit import create_cluster, insert_cluster
from tests.conftest import PASSWORD, Tenant, add_member, auth, create_key, signup, unique_email

# Columns (the table's header). Users: own = the org owner; bil, mem = members with org_billing_admin, org_member;
# pad, cad, wri, rea = org_member members with project_admin, cluster_admin, data_writer, data_reader on the
# default project; cus = a member with a custom organization role (org:read, member:read, audit:read,
# apikey:manage). Keys: kor = org-role key (org_owner), kpr = project-role key (project_admin on the default
# project), kcl = cluster-limited key (data_writer on one cluster of the default project). The other tenant:
# oth = the owner of organization B, oky = an org_owner key of B. Then exp = an expired key, rev = a revoked key
# (both org_owner keys of A), non = no credentials.
# THE TABLE: expected status per route (rows) and principal (columns).
MATRIX = """
                                            own bil mem pad cad wri rea cus kor kpr kcl oth oky exp rev non
GET    /v1/me                               200 200 200 200 200 200 200 200 200 200 200 200 200 401 401 401
POST   /v1/auth/logout                      204 204 204 204 204 204 204 204 401 401 401 204 401 401 401 401
POST   /v1/auth/verify-email/resend         202 202 202 202 202 202 202 202 401 401 401 202 401 401 401 401
POST   /v1/auth/password                    200 200 200 200 200 200 200 200 401 401 401 200 401 401 401 401
GET    /v1/orgs/{org_id}                    200 200 200 200 200 200 200 200 200 403 403 404 404 401 401 401
PATCH  /v1/orgs/{org_id}                    200 403 403 403 403 403 403 403 200 403 403 404 404 401 401 401
GET    /v1/orgs/{org_id}/members            200 200 200 200 200 200 200 200 200 403 403 404 404 401 401 401
PATCH  /v1/orgs/{org_id}/members/{user_id}  200 403 403 403 403 403 403 403 200 403 403 404 404 401 401 401
DELETE /v1/orgs/{org_id}/members/{user_id}  204 403 403 403 403 403 403 403 204 403 403 404 404 401 401 401
POST   /v1/orgs/{org_id}/invitations        201 403 403 403 403 403 403 403 201 403 403 404 404 401 401 401
GET    /v1/orgs/{org_id}/invitations        200 200 200 200 200 200 200 200 200 403 403 404 404 401 401 401
DELETE /v1/invitations/{invitation_id}      204 403 403 403 403 403 403 403 204 403 403 404 404 401 401 401
POST   /v1/invitations/{token}/accept       200 200 200 200 200 200 200 200 401 401 401 200 401 401 401 401
GET    /v1/orgs/{org_id}/projects           200 200 200 200 200 200 200 200 200 200 200 404 404 401 401 401
POST   /v1/orgs/{org_id}/projects           201 403 403 403 403 403 403 403 201 403 403 404 404 401 401 401
GET    /v1/projects/{project_id}            200 404 404 200 200 200 200 404 200 200 403 404 404 401 401 401
PATCH  /v1/projects/{project_id}            200 404 404 200 403 403 403 404 200 200 403 404 404 401 401 401
DELETE /v1/projects/{project_id}            204 404 404 204 403 403 403 404 204 204 403 404 404 401 401 401
GET    /v1/orgs/{org_id}/roles              200 200 200 200 200 200 200 200 200 403 403 404 404 401 401 401
POST   /v1/orgs/{org_id}/roles              201 403 403 403 403 403 403 403 201 403 403 404 404 401 401 401
GET    /v1/orgs/{org_id}/roles/{role_id}    200 200 200 200 200 200 200 200 200 403 403 404 404 401 401 401
PATCH  /v1/orgs/{org_id}/roles/{role_id}    200 403 403 403 403 403 403 403 200 403 403 404 404 401 401 401
DELETE /v1/orgs/{org_id}/roles/{role_id}    204 403 403 403 403 403 403 403 204 403 403 404 404 401 401 401
POST   /v1/orgs/{org_id}/api-keys           201 403 403 403 403 403 403 201 201 403 403 404 404 401 401 401
GET    /v1/orgs/{org_id}/api-keys           200 403 403 403 403 403 403 200 200 403 403 404 404 401 401 401
GET    /v1/api-keys/{key_id}                200 403 403 403 403 403 403 200 200 403 403 404 404 401 401 401
PATCH  /v1/api-keys/{key_id}                200 403 403 403 403 403 403 200 200 403 403 404 404 401 401 401
DELETE /v1/api-keys/{key_id}                204 403 403 403 403 403 403 204 204 403 403 404 404 401 401 401
POST   /v1/api-keys/{key_id}/rotate         200 403 403 403 403 403 403 200 200 403 403 404 404 401 401 401
GET    /v1/orgs/{org_id}/audit-logs         200 403 403 403 403 403 403 200 200 403 403 404 404 401 401 401
POST   /v1/projects/{project_id}/clusters   202 404 404 202 202 403 403 404 202 202 403 404 404 401 401 401
GET    /v1/projects/{project_id}/clusters   200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
GET    /v1/clusters/{cluster_id}            200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
PATCH  /v1/clusters/{cluster_id}            202 404 404 202 202 403 403 404 202 202 403 404 404 401 401 401
POST   /v1/clusters/{cluster_id}/suspend    202 404 404 202 202 403 403 404 202 202 403 404 404 401 401 401
POST   /v1/clusters/{cluster_id}/resume     202 404 404 202 202 403 403 404 202 202 403 404 404 401 401 401
DELETE /v1/clusters/{cluster_id}            202 404 404 202 202 403 403 404 202 202 403 404 404 401 401 401
GET    /v1/clusters/{cluster_id}/metrics    200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
GET    /v1/jobs/{job_id}                    200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
POST   /v1/clusters/{cluster_id}/backups    202 404 404 202 202 403 403 404 202 202 403 404 404 401 401 401
GET    /v1/clusters/{cluster_id}/backups    200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
GET    /v1/backups/{backup_id}              200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
DELETE /v1/backups/{backup_id}              204 404 404 204 204 403 403 404 204 204 403 404 404 401 401 401
POST   /v1/backups/{backup_id}/restore      202 404 404 202 202 403 403 404 202 202 403 404 404 401 401 401
GET    /v1/clusters/{cluster_id}/backup-policy
                                            200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
PUT    /v1/clusters/{cluster_id}/backup-policy
                                            200 404 404 200 200 403 403 404 200 200 403 404 404 401 401 401
POST   /v1/projects/{project_id}/encryption-keys
                                            201 404 404 201 403 403 403 404 201 201 403 404 404 401 401 401
GET    /v1/projects/{project_id}/encryption-keys
                                            200 404 404 200 200 403 403 404 200 200 403 404 404 401 401 401
GET    /v1/projects/{project_id}/encryption-keys/aws-setup
                                            200 404 404 200 403 403 403 404 200 200 403 404 404 401 401 401
GET    /v1/encryption-keys/{key_id}         200 404 404 200 200 403 403 404 200 200 403 404 404 401 401 401
POST   /v1/encryption-keys/{key_id}/rotate  200 404 404 200 403 403 403 404 200 200 403 404 404 401 401 401
DELETE /v1/encryption-keys/{key_id}         204 404 404 204 403 403 403 404 204 204 403 404 404 401 401 401
GET    {dp}                                 200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
POST   {dp}                                 201 404 404 201 201 201 403 404 201 201 201 404 404 401 401 401
GET    {dp}/{name}                          200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
DELETE {dp}/{name}                          200 404 404 200 200 403 403 404 200 200 403 404 404 401 401 401
POST   {dp}/{name}/upsert                   200 404 404 200 200 200 403 404 200 200 200 404 404 401 401 401
POST   {dp}/{name}/delete                   200 404 404 200 200 200 403 404 200 200 200 404 404 401 401 401
POST   {dp}/{name}/fetch                    200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
POST   {dp}/{name}/search                   200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
POST   {dp}/{name}/hybrid-search            200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
POST   {dp}/{name}/query                    200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
POST   {dp}/{name}/count                    200 404 404 200 200 200 200 404 200 200 200 404 404 401 401 401
"""
# Data-plane rows: {dp} stands for the edge's prefix; every such row is served by one of the edge's two routes.
DP = "/v1/clusters/{cluster_id}/collections"

# Routes that need no credentials at all (they are tried without them in test_public_routes).
PUBLIC = {
    ("POST", "/v1/auth/signup"),
    ("POST", "/v1/auth/login"),
    ("POST", "/v1/auth/refresh"),
    ("POST", "/v1/auth/verify-email"),
    ("POST", "/v1/auth/password-reset"),
    ("POST", "/v1/auth/password-reset/confirm"),
}


def _parse(table: str) -> dict[tuple[str, str], dict[str, int]]:
    rows: dict[tuple[str, str], dict[str, int]] = {}
    lines: list[str] = []
    for line in table.strip().splitlines()[1:]:  # a row whose path is too long continues on the next line
        if line.startswith(" ") and lines:
            lines[-1] += line
        else:
            lines.append(line)
    for line in lines:
        method, path, *codes = line.split()
        assert len(codes) == len(COLUMNS), f"row {method} {path} has {len(codes)} cells, not {len(COLUMNS)}"
        assert (method, path) not in rows, f"row {method} {path} is listed twice"
        rows[(method, path)] = dict(zip(COLUMNS, map(int, codes), strict=True))
    return rows


COLUMNS = MATRIX.strip().splitlines()[0].split()
EXPECTED = _parse(MATRIX)


def _app_route(row: tuple[str, str]) -> tuple[str, str]:
    """The app route that serves a row: data-plane rows map onto the edge's two routes."""
    method, path = row
    if path == "{dp}":
        return method, DP
    if path.startswith("{dp}/"):
        return method, DP + "{rest:path}"
    return row


def _app_routes(app: FastAPI) -> set[tuple[str, str]]:
    from fastapi import routing

    iterate = getattr(routing, "iter_route_contexts", None)  # FastAPI ≥ 0.165 keeps included routers nested
    routes: list[Any] = list(iterate(app.routes)) if iterate else list(app.routes)
    out = set()
    for r in routes:
        path, methods = getattr(r, "path", None), getattr(r, "methods", None)
        if path and methods and path.startswith("/v1/"):
            out |= {(m, path) for m in methods if m != "HEAD"}
    return out


# -- the world ------------------------------------------------------------------------------------------------
@dataclass
class Who:
    name: str
    token: str | None
    user: Tenant | None = None  # console users can log in again


@dataclass
class World:
    app: FastAPI
    client: httpx.AsyncClient
    owner: Tenant
    other: Tenant
    third: Tenant  # owner of organization C, whose invitations every principal may accept
    custom_role_id: str
    target_role_id: str
    victim_id: str
    target_key_id: str
    who: dict[str, Who] = field(default_factory=dict)
    cluster_id: str = ""  # the matrix cluster: a real engine in the default project, kcl's only cluster
    job_id: str = ""  # its provisioning job
    backup_id: str = ""  # an AVAILABLE backup of it
    encryption_key_id: str = ""  # a managed encryption key of the default project

    @property
    def org_id(self) -> str:
        return self.owner.org_id

    @property
    def project_id(self) -> str:
        return self.owner.project_id

    async def ok(self, method: str, url: str, body: Any = None, tenant: Tenant | None = None) -> Any:
        r = await self.client.request(method, url, json=body, headers=(tenant or self.owner).headers)
        assert r.is_success, f"{method} {url}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    async def fresh_session(self, who: Who) -> str | None:
        """A new console session for a user (so logging it out leaves the principal's own token alone)."""
        if who.user is None:
            return who.token
        r = await self.client.post("/v1/auth/login", json={"email": who.user.email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        token: str = r.json()["access_token"]
        return token

    async def fresh_project(self) -> str:
        """A new project of A bound, for every principal, the way the default project is."""
        project = await self.ok("POST", f"/v1/orgs/{self.org_id}/projects", {"name": f"p-{uuid.uuid4().hex[:8]}"})
        async with self.app.state.db.transaction() as s:
            rows = (await s.execute(select(RoleBinding).where(RoleBinding.project_id == self.project_id))).scalars()
            for b in list(rows):
                s.add(
                    RoleBinding(
                        id=new_id("rb"),
                        org_id=b.org_id,
                        principal_type=b.principal_type,
                        principal_id=b.principal_id,
                        project_id=project["id"],
                        role=b.role,
                        cluster_ids=b.cluster_ids,
                    )
                )
        self.app.state.authenticator.invalidate()
        return str(project["id"])


@pytest.fixture(scope="module")
def cheap_password_hashing() -> Iterator[None]:
    """Argon2id at its production cost takes ~0.4 s per hash here and this module signs up and logs in dozens of
    users; the matrix is about authorization, so it hashes with the cheapest argon2id parameters instead."""
    original = crypto._hasher
    crypto._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    yield
    crypto._hasher = original


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(app: FastAPI, cheap_password_hashing: None) -> AsyncIterator[World]:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50001))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        owner = await signup(client, "mx-owner", "Matrix A")
        other = await signup(client, "mx-other", "Matrix B")
        third = await signup(client, "mx-third", "Matrix C")
        org, prj = owner.org_id, owner.project_id

        async def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
            r = await client.post(url, json=body, headers=owner.headers)
            assert r.status_code == 201, r.text
            data: dict[str, Any] = r.json()
            return data

        custom = await post(
            f"/v1/orgs/{org}/roles",
            {"name": "keykeeper", "privileges": ["org:read", "member:read", "audit:read", "apikey:manage"]},
        )
        target_role = await post(f"/v1/orgs/{org}/roles", {"name": "matrix-target", "privileges": ["data:read"]})
        victim = await add_member(client, owner, tag="mx-victim")
        target_key = await create_key(client, owner, name="target key", org_role="org_member")

        w = World(app, client, owner, other, third, custom["id"], target_role["id"], victim.user_id, target_key["id"])
        # The matrix cluster (Celery is eager: it is RUNNING when created) with a collection and a backup.
        cluster = await create_cluster(client, owner.access_token, prj, name="matrix")
        w.cluster_id, w.job_id = cluster["id"], cluster["job_id"]
        await w.ok("POST", f"/v1/clusters/{w.cluster_id}/collections", SHARED_COLLECTION)
        await w.ok("POST", f"{_dp(w)}/{SHARED}/upsert", {"records": SHARED_RECORDS})
        w.backup_id = (await w.ok("POST", f"/v1/clusters/{w.cluster_id}/backups"))["id"]
        assert (await w.ok("GET", f"/v1/backups/{w.backup_id}"))["status"] == "AVAILABLE"
        w.encryption_key_id = (await w.ok("POST", f"/v1/projects/{prj}/encryption-keys", {"provider": "managed"}))["id"]

        async def member(org_role: str, project_role: str | None = None) -> Tenant:
            roles = [{"project_id": prj, "role": project_role}] if project_role else []
            return await add_member(client, owner, org_role=org_role, project_roles=roles, tag=f"mx-{org_role}")

        users = {
            "own": owner,
            "bil": await member("org_billing_admin"),
            "mem": await member("org_member"),
            "pad": await member("org_member", "project_admin"),
            "cad": await member("org_member", "cluster_admin"),
            "wri": await member("org_member", "data_writer"),
            "rea": await member("org_member", "data_reader"),
            "cus": await member(custom["id"]),
            "oth": other,
        }
        for name, t in users.items():
            w.who[name] = Who(name, t.access_token, t)
        keys = {
            "kor": await create_key(client, owner, org_role="org_owner"),
            "kpr": await create_key(client, owner, project_roles=[{"project_id": prj, "role": "project_admin"}]),
            "kcl": await create_key(
                client,
                owner,
                project_roles=[{"project_id": prj, "role": "data_writer", "cluster_ids": [w.cluster_id]}],
            ),
            "oky": await create_key(client, other, org_role="org_owner"),
            "exp": await create_key(client, owner, org_role="org_owner"),
            "rev": await create_key(client, owner, org_role="org_owner"),
        }
        for name, k in keys.items():
            w.who[name] = Who(name, k["key"])
        # Expire one key (in the database: the API refuses an expiry in the past) and revoke another.
        async with app.state.db.transaction() as s:
            past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
            await s.execute(update(ApiKey).where(ApiKey.id == keys["exp"]["id"]).values(expires_at=past))
        r = await client.delete(f"/v1/api-keys/{keys['rev']['id']}", headers=owner.headers)
        assert r.status_code == 204, r.text
        w.who["non"] = Who("non", None)
        assert set(w.who) == set(COLUMNS)
        try:
            yield w
        finally:
            r = await client.delete(f"/v1/clusters/{w.cluster_id}", headers=owner.headers)
            assert r.status_code == 202, r.text
            assert (await w.ok("GET", f"/v1/clusters/{w.cluster_id}"))["status"] == "DELETED"


# -- how each route is called -----------------------------------------------------------------------------------
@dataclass
class Call:
    url: str
    body: Any = None
    token: str | None = None
    after: Callable[[httpx.Response], Any] | None = None  # may be async
    quiet: bool = False  # drop the background tasks the request sends (no engine for a throwaway cluster)


Prepare = Callable[[World, Who], Awaitable[Call]]


def _simple(url: str, body: Any = None) -> Prepare:
    async def prepare(w: World, who: Who) -> Call:
        return Call(url.format(org=w.org_id, prj=w.project_id), body, who.token)

    return prepare


async def _logout(w: World, who: Who) -> Call:
    return Call("/v1/auth/logout", token=await w.fresh_session(who))


async def _password(w: World, who: Who) -> Call:
    def keep_token(r: httpx.Response) -> None:
        if r.status_code == 200:  # every session of the user ended; the answer is the principal's new session
            who.token = r.json()["access_token"]
            if who.user is not None:
                who.user.access_token = who.token

    return Call("/v1/auth/password", {"current_password": PASSWORD, "new_password": PASSWORD}, who.token, keep_token)


async def _patch_member(w: World, who: Who) -> Call:
    return Call(f"/v1/orgs/{w.org_id}/members/{w.victim_id}", {"org_role": "org_member"}, who.token)


async def _delete_member(w: World, who: Who) -> Call:
    leaver = await add_member(w.client, w.owner, tag="mx-leaver")
    return Call(f"/v1/orgs/{w.org_id}/members/{leaver.user_id}", token=who.token)


async def _create_invitation(w: World, who: Who) -> Call:
    body = {"email": unique_email("mx-invitee"), "org_role": "org_member"}
    return Call(f"/v1/orgs/{w.org_id}/invitations", body, who.token)


async def _delete_invitation(w: World, who: Who) -> Call:
    inv = await w.ok("POST", f"/v1/orgs/{w.org_id}/invitations", {"email": unique_email("mx-invitee")})
    return Call(f"/v1/invitations/{inv['id']}", token=who.token)


async def _accept_invitation(w: World, who: Who) -> Call:
    email = who.user.email if who.user else unique_email("mx-nobody")
    inv = await w.ok("POST", f"/v1/orgs/{w.third.org_id}/invitations", {"email": email}, tenant=w.third)
    return Call(f"/v1/invitations/{inv['token']}/accept", token=who.token)


async def _create_project(w: World, who: Who) -> Call:
    return Call(f"/v1/orgs/{w.org_id}/projects", {"name": f"p-{uuid.uuid4().hex[:8]}"}, who.token)


async def _delete_project(w: World, who: Who) -> Call:
    return Call(f"/v1/projects/{await w.fresh_project()}", token=who.token)


async def _create_role(w: World, who: Who) -> Call:
    return Call(
        f"/v1/orgs/{w.org_id}/roles", {"name": f"r-{uuid.uuid4().hex[:8]}", "privileges": ["data:read"]}, who.token
    )


async def _role(w: World, who: Who) -> Call:
    return Call(f"/v1/orgs/{w.org_id}/roles/{w.target_role_id}", token=who.token)


async def _patch_role(w: World, who: Who) -> Call:
    return Call(f"/v1/orgs/{w.org_id}/roles/{w.target_role_id}", {"description": "matrix target"}, who.token)


async def _delete_role(w: World, who: Who) -> Call:
    role = await w.ok(
        "POST", f"/v1/orgs/{w.org_id}/roles", {"name": f"r-{uuid.uuid4().hex[:8]}", "privileges": ["data:read"]}
    )
    return Call(f"/v1/orgs/{w.org_id}/roles/{role['id']}", token=who.token)


async def _create_key(w: World, who: Who) -> Call:
    return Call(f"/v1/orgs/{w.org_id}/api-keys", {"name": "matrix", "org_role": "org_member"}, who.token)


async def _key(w: World, who: Who) -> Call:
    return Call(f"/v1/api-keys/{w.target_key_id}", token=who.token)


async def _patch_key(w: World, who: Who) -> Call:
    return Call(f"/v1/api-keys/{w.target_key_id}", {"name": "target key"}, who.token)


async def _fresh_key(w: World) -> str:
    key = await create_key(w.client, w.owner, name="matrix victim", org_role="org_member")
    return str(key["id"])


async def _delete_key(w: World, who: Who) -> Call:
    return Call(f"/v1/api-keys/{await _fresh_key(w)}", token=who.token)


async def _rotate_key(w: World, who: Who) -> Call:
    return Call(f"/v1/api-keys/{await _fresh_key(w)}/rotate", {"grace_seconds": 0}, who.token)


# -- clusters, backups and the data plane ---------------------------------------------------------------------
SHARED = "shared"
SHARED_COLLECTION = {
    "name": SHARED,
    "dimension": 4,
    "metric": "cosine",
    "fields": [{"name": "tag", "type": "string", "indexed": True}],
    "text_field": "body",
}
SHARED_RECORDS = [
    {"id": f"s{i}", "vector": [1.0 + i, 2.0, 3.0 - i, 0.5], "metadata": {"tag": "a" if i % 2 else "b"},
     "text": f"matrix record number {i}"}
    for i in range(6)
]  # fmt: skip


def _dp(w: World) -> str:
    return f"/v1/clusters/{w.cluster_id}/collections"


def _on_cluster(suffix: str = "", body: Any = None) -> Prepare:
    async def prepare(w: World, who: Who) -> Call:
        return Call(f"/v1/clusters/{w.cluster_id}{suffix}", body, who.token)

    return prepare


async def _retire(w: World, cluster_id: str) -> None:
    """A throwaway cluster row ends DELETED (the reconciler then leaves it alone)."""
    async with w.app.state.db.transaction() as s:
        await s.execute(update(Cluster).where(Cluster.id == cluster_id).values(status="DELETED"))


def _fresh_cluster(status: str, suffix: str = "", body: Any = None) -> Prepare:
    """A throwaway cluster row with no engine behind it (its tasks fail at once); kcl, whose key is limited to the
    matrix cluster, is pointed at that one instead, where it must be refused before anything changes."""

    async def prepare(w: World, who: Who) -> Call:
        if who.name == "kcl":
            return Call(f"/v1/clusters/{w.cluster_id}{suffix}", body, who.token)
        cluster_id = await insert_cluster(w.app, w.org_id, w.project_id, status)

        async def retire(_: httpx.Response) -> None:
            await _retire(w, cluster_id)

        return Call(f"/v1/clusters/{cluster_id}{suffix}", body, who.token, retire)

    return prepare


def _retire_created(w: World) -> Callable[[httpx.Response], Any]:
    async def after(r: httpx.Response) -> None:
        if r.status_code == 202:
            data = r.json()
            await _retire(w, data.get("cluster_id") or data["id"])

    return after


async def _create_cluster(w: World, who: Who) -> Call:
    body = {"name": f"mx-{uuid.uuid4().hex[:8]}", "plan": "serverless", "region": "local"}
    return Call(f"/v1/projects/{w.project_id}/clusters", body, who.token, _retire_created(w), quiet=True)


async def _job(w: World, who: Who) -> Call:
    return Call(f"/v1/jobs/{w.job_id}", token=who.token)


async def _backup(w: World, who: Who) -> Call:
    return Call(f"/v1/backups/{w.backup_id}", token=who.token)


async def _delete_backup(w: World, who: Who) -> Call:
    backup = await w.ok("POST", f"/v1/clusters/{w.cluster_id}/backups")
    return Call(f"/v1/backups/{backup['id']}", token=who.token)


async def _restore_backup(w: World, who: Who) -> Call:
    body = {"target": "new", "name": f"mx-r-{uuid.uuid4().hex[:8]}", "project_id": w.project_id}
    return Call(f"/v1/backups/{w.backup_id}/restore", body, who.token, _retire_created(w), quiet=True)


async def _encryption_key(w: World, who: Who) -> Call:
    return Call(f"/v1/encryption-keys/{w.encryption_key_id}", token=who.token)


def _fresh_encryption_key(suffix: str) -> Prepare:
    async def prepare(w: World, who: Who) -> Call:
        key = await w.ok("POST", f"/v1/projects/{w.project_id}/encryption-keys", {"provider": "managed"})
        return Call(f"/v1/encryption-keys/{key['id']}{suffix}", token=who.token)

    return prepare


def _data(suffix: str, body: Any = None) -> Prepare:
    async def prepare(w: World, who: Who) -> Call:
        return Call(f"{_dp(w)}{suffix}", body, who.token)

    return prepare


async def _create_collection(w: World, who: Who) -> Call:
    return Call(_dp(w), {"name": f"mx_{uuid.uuid4().hex[:8]}", "dimension": 4, "metric": "l2"}, who.token)


async def _drop_collection(w: World, who: Who) -> Call:
    name = f"mx_{uuid.uuid4().hex[:8]}"
    await w.ok("POST", _dp(w), {"name": name, "dimension": 4, "metric": "l2"})
    return Call(f"{_dp(w)}/{name}", token=who.token)


_VEC = [1.0, 2.0, 3.0, 0.5]

CALLS: dict[tuple[str, str], Prepare] = {
    ("GET", "/v1/me"): _simple("/v1/me"),
    ("POST", "/v1/auth/logout"): _logout,
    ("POST", "/v1/auth/verify-email/resend"): _simple("/v1/auth/verify-email/resend"),
    ("POST", "/v1/auth/password"): _password,
    ("GET", "/v1/orgs/{org_id}"): _simple("/v1/orgs/{org}"),
    ("PATCH", "/v1/orgs/{org_id}"): _simple("/v1/orgs/{org}", {"name": "Matrix A"}),
    ("GET", "/v1/orgs/{org_id}/members"): _simple("/v1/orgs/{org}/members"),
    ("PATCH", "/v1/orgs/{org_id}/members/{user_id}"): _patch_member,
    ("DELETE", "/v1/orgs/{org_id}/members/{user_id}"): _delete_member,
    ("POST", "/v1/orgs/{org_id}/invitations"): _create_invitation,
    ("GET", "/v1/orgs/{org_id}/invitations"): _simple("/v1/orgs/{org}/invitations"),
    ("DELETE", "/v1/invitations/{invitation_id}"): _delete_invitation,
    ("POST", "/v1/invitations/{token}/accept"): _accept_invitation,
    ("GET", "/v1/orgs/{org_id}/projects"): _simple("/v1/orgs/{org}/projects"),
    ("POST", "/v1/orgs/{org_id}/projects"): _create_project,
    ("GET", "/v1/projects/{project_id}"): _simple("/v1/projects/{prj}"),
    ("PATCH", "/v1/projects/{project_id}"): _simple("/v1/projects/{prj}", {"name": "Default"}),
    ("DELETE", "/v1/projects/{project_id}"): _delete_project,
    ("GET", "/v1/orgs/{org_id}/roles"): _simple("/v1/orgs/{org}/roles"),
    ("POST", "/v1/orgs/{org_id}/roles"): _create_role,
    ("GET", "/v1/orgs/{org_id}/roles/{role_id}"): _role,
    ("PATCH", "/v1/orgs/{org_id}/roles/{role_id}"): _patch_role,
    ("DELETE", "/v1/orgs/{org_id}/roles/{role_id}"): _delete_role,
    ("POST", "/v1/orgs/{org_id}/api-keys"): _create_key,
    ("GET", "/v1/orgs/{org_id}/api-keys"): _simple("/v1/orgs/{org}/api-keys"),
    ("GET", "/v1/api-keys/{key_id}"): _key,
    ("PATCH", "/v1/api-keys/{key_id}"): _patch_key,
    ("DELETE", "/v1/api-keys/{key_id}"): _delete_key,
    ("POST", "/v1/api-keys/{key_id}/rotate"): _rotate_key,
    ("GET", "/v1/orgs/{org_id}/audit-logs"): _simple("/v1/orgs/{org}/audit-logs"),
    ("POST", "/v1/projects/{project_id}/clusters"): _create_cluster,
    ("GET", "/v1/projects/{project_id}/clusters"): _simple("/v1/projects/{prj}/clusters"),
    ("GET", "/v1/clusters/{cluster_id}"): _on_cluster(),
    ("PATCH", "/v1/clusters/{cluster_id}"): _fresh_cluster("RUNNING", "", {"cu_size": 2}),
    ("POST", "/v1/clusters/{cluster_id}/suspend"): _fresh_cluster("RUNNING", "/suspend"),
    ("POST", "/v1/clusters/{cluster_id}/resume"): _fresh_cluster("SUSPENDED", "/resume"),
    ("DELETE", "/v1/clusters/{cluster_id}"): _fresh_cluster("RUNNING"),
    ("GET", "/v1/clusters/{cluster_id}/metrics"): _on_cluster("/metrics"),
    ("GET", "/v1/jobs/{job_id}"): _job,
    ("POST", "/v1/clusters/{cluster_id}/backups"): _on_cluster("/backups"),
    ("GET", "/v1/clusters/{cluster_id}/backups"): _on_cluster("/backups"),
    ("GET", "/v1/backups/{backup_id}"): _backup,
    ("DELETE", "/v1/backups/{backup_id}"): _delete_backup,
    ("POST", "/v1/backups/{backup_id}/restore"): _restore_backup,
    ("GET", "/v1/clusters/{cluster_id}/backup-policy"): _on_cluster("/backup-policy"),
    ("PUT", "/v1/clusters/{cluster_id}/backup-policy"): _on_cluster(
        "/backup-policy", {"enabled": False, "every_hours": 24, "retention_days": 7}
    ),
    ("POST", "/v1/projects/{project_id}/encryption-keys"): _simple(
        "/v1/projects/{prj}/encryption-keys", {"provider": "managed"}
    ),
    ("GET", "/v1/projects/{project_id}/encryption-keys"): _simple("/v1/projects/{prj}/encryption-keys"),
    ("GET", "/v1/projects/{project_id}/encryption-keys/aws-setup"): _simple(
        "/v1/projects/{prj}/encryption-keys/aws-setup"
    ),
    ("GET", "/v1/encryption-keys/{key_id}"): _encryption_key,
    ("POST", "/v1/encryption-keys/{key_id}/rotate"): _fresh_encryption_key("/rotate"),
    ("DELETE", "/v1/encryption-keys/{key_id}"): _fresh_encryption_key(""),
    ("GET", "{dp}"): _data(""),
    ("POST", "{dp}"): _create_collection,
    ("GET", "{dp}/{name}"): _data(f"/{SHARED}"),
    ("DELETE", "{dp}/{name}"): _drop_collection,
    ("POST", "{dp}/{name}/upsert"): _data(f"/{SHARED}/upsert", {"records": SHARED_RECORDS[:2]}),
    ("POST", "{dp}/{name}/delete"): _data(f"/{SHARED}/delete", {"ids": ["no-such-id"]}),
    ("POST", "{dp}/{name}/fetch"): _data(f"/{SHARED}/fetch", {"ids": ["s1"]}),
    ("POST", "{dp}/{name}/search"): _data(f"/{SHARED}/search", {"vector": _VEC, "top_k": 3}),
    ("POST", "{dp}/{name}/hybrid-search"): _data(
        f"/{SHARED}/hybrid-search", {"vector": _VEC, "text": "matrix record", "top_k": 3}
    ),
    ("POST", "{dp}/{name}/query"): _data(f"/{SHARED}/query", {"filter": {"tag": "a"}, "limit": 10}),
    ("POST", "{dp}/{name}/count"): _data(f"/{SHARED}/count", {}),
}


# -- the tests ------------------------------------------------------------------------------------------------
def test_table_covers_every_route(app: FastAPI) -> None:
    routes = _app_routes(app)
    assert routes, "no /v1 routes found"
    rows = {_app_route(r) for r in EXPECTED}
    missing = sorted(routes - rows - PUBLIC)
    assert not missing, f"routes without a row in the authorization matrix: {missing}"
    stale = sorted((rows | PUBLIC) - routes)
    assert not stale, f"matrix rows for routes that do not exist: {stale}"
    assert set(CALLS) == set(EXPECTED)


def test_table_never_confirms_another_tenants_resource() -> None:
    for route, row in EXPECTED.items():
        for col in ("oth", "oky", "exp", "rev", "non"):
            assert row[col] != 403, f"{route} answers {col} with 403"
        for col in ("exp", "rev", "non"):
            assert row[col] == 401, f"{route} must refuse {col}"


@pytest.mark.parametrize("route", list(EXPECTED), ids=[f"{m} {p}" for m, p in EXPECTED])
async def test_matrix(world: World, route: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from services.auth import deps

    method = route[0]
    actual: dict[str, int] = {}
    send = deps.send
    for name in COLUMNS:
        who = world.who[name]
        call = await CALLS[route](world, who)
        headers = auth(call.token) if call.token else {}
        monkeypatch.setattr(deps, "send", (lambda *a, **k: None) if call.quiet else send)
        r = await world.client.request(method, call.url, json=call.body, headers=headers)
        monkeypatch.setattr(deps, "send", send)
        actual[name] = r.status_code
        if r.status_code >= 400:
            assert r.headers["content-type"].startswith("application/problem+json"), r.text
            assert r.json()["status"] == r.status_code
        if call.after:
            done = call.after(r)
            if inspect.isawaitable(done):
                await done
    expected = EXPECTED[route]
    wrong = {c: f"expected {expected[c]}, got {actual[c]}" for c in COLUMNS if actual[c] != expected[c]}
    assert not wrong, f"{method} {route[1]}: {wrong}"


async def test_other_tenant_ids_under_own_org_are_404(world: World) -> None:
    """The other tenant addressing A's objects through its own organization's paths still sees nothing."""
    b, h = world.other.org_id, auth(world.who["oth"].token or "")
    c = world.client
    assert (await c.get(f"/v1/orgs/{b}/roles/{world.target_role_id}", headers=h)).status_code == 404
    assert (await c.delete(f"/v1/orgs/{b}/roles/{world.target_role_id}", headers=h)).status_code == 404
    assert (await c.patch(f"/v1/orgs/{b}/members/{world.victim_id}", json={}, headers=h)).status_code == 404
    assert (await c.delete(f"/v1/orgs/{b}/members/{world.victim_id}", headers=h)).status_code == 404
    # Granting a role on A's project through B is refused as an unknown project, not as forbidden.
    body = {"name": "x", "project_roles": [{"project_id": world.project_id, "role": "data_reader"}]}
    r = await c.post(f"/v1/orgs/{b}/api-keys", json=body, headers=h)
    assert r.status_code == 422 and r.json()["code"] == "project_not_found"


async def test_public_routes_need_no_credentials(world: World) -> None:
    c = world.client
    email = unique_email("mx-public")
    r = await c.post("/v1/auth/signup", json={"email": email, "password": PASSWORD, "name": "P", "org_name": "P"})
    assert r.status_code == 201
    r = await c.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert r.status_code == 200
    r = await c.post("/v1/auth/refresh", json={"refresh_token": r.json()["refresh_token"]})
    assert r.status_code == 200
    assert (await c.post("/v1/auth/verify-email", json={"token": "nope"})).status_code == 400
    assert (await c.post("/v1/auth/password-reset", json={"email": email})).status_code == 202
    bad = {"token": "nope", "new_password": "another long passphrase"}
    assert (await c.post("/v1/auth/password-reset/confirm", json=bad)).status_code == 400

"""API keys: format, secrecy, storage as an HMAC, expiry, revocation (in this process and across processes),
rotation with a grace period, batched ``last_used_at``, privilege escalation and cluster-limited bindings."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.auth.models import ApiKey
from services.core.db import Base
from services.core.errors import Forbidden, NotFound
from services.core.settings import get_settings
from tests.conftest import Tenant, add_member, auth, create_key, signup

KEY_RE = re.compile(r"^vk_(?P<id>[0-9a-z]+)_(?P<secret>[A-Za-z0-9]{46})$")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _me(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.get("/v1/me", headers=auth(key))


@contextmanager
def _statements(engine: AsyncEngine) -> Iterator[list[str]]:
    seen: list[str] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", listener)


# -- format and secrecy ---------------------------------------------------------------------------------------
async def test_key_format_and_identity(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    created = await create_key(client, t, name="ci", org_role="org_member")
    m = KEY_RE.match(created["key"])
    assert m, created["key"]
    assert created["id"] == "key_" + m["id"]
    assert created["prefix"] == "vk_" + m["id"] and created["key"].startswith(created["prefix"] + "_")
    assert created["org_id"] == t.org_id and created["created_by"] == t.user_id
    assert created["last_used_at"] is None and created["revoked_at"] is None
    me = await _me(client, created["key"])
    assert me.status_code == 200, me.text
    assert me.json()["user"] is None
    assert me.json()["api_key"] == {"id": created["id"], "org_id": t.org_id, "name": "ci"}
    assert me.json()["memberships"] == [{"org_id": t.org_id, "role": "org_member"}]


async def test_mistyped_or_forged_keys_are_refused(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    key = (await create_key(client, t, org_role="org_member"))["key"]
    flipped = key[:-10] + ("A" if key[-10] != "A" else "B") + key[-9:]  # breaks the checksum
    other_id = key.replace(key[3:8], "zzzzz", 1)  # another key id, same secret
    for bad in (flipped, other_id, key + "x", key[:-1], key.upper(), "vk_" + key.split("_", 2)[2]):
        r = await _me(client, bad)
        assert r.status_code == 401, (bad, r.text)
        assert r.json()["code"] == ("invalid_api_key" if bad.startswith("vk_") else "invalid_token")
    assert (await _me(client, key)).status_code == 200


async def test_secret_shown_only_at_creation_and_rotation(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    created = await create_key(client, t, name="shown once", org_role="org_member")
    secret = created["key"]
    rotated = await client.post(f"/v1/api-keys/{created['id']}/rotate", json={"grace_seconds": 60}, headers=t.headers)
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["key"]
    assert KEY_RE.match(new_secret) and new_secret != secret
    assert new_secret.startswith(created["prefix"] + "_")  # same id, new secret
    for secret_part in (secret.split("_", 2)[2], new_secret.split("_", 2)[2]):
        for url in (
            f"/v1/api-keys/{created['id']}",
            f"/v1/orgs/{t.org_id}/api-keys",
            f"/v1/orgs/{t.org_id}/audit-logs",
            f"/v1/orgs/{t.org_id}/audit-logs?action=apikey.*",
        ):
            r = await client.get(url, headers=t.headers)
            assert r.status_code == 200, r.text
            assert secret_part not in r.text, url
            assert '"key":' not in r.text, url
    one = (await client.get(f"/v1/api-keys/{created['id']}", headers=t.headers)).json()
    assert "key" not in one and one["prefix"] == created["prefix"] and one["rotated_at"] is not None
    actions = [
        e["action"] for e in (await client.get(f"/v1/orgs/{t.org_id}/audit-logs", headers=t.headers)).json()["items"]
    ]
    assert "apikey.create" in actions and "apikey.rotate" in actions


async def test_secret_stored_only_as_hmac(client: httpx.AsyncClient, app: Any) -> None:
    t = await signup(client)
    created = await create_key(client, t, org_role="org_member")
    rotated = (
        await client.post(f"/v1/api-keys/{created['id']}/rotate", json={"grace_seconds": 60}, headers=t.headers)
    ).json()
    pepper = get_settings().secret("api_key_pepper").encode()
    async with app.state.db.session() as s:
        row = await s.get(ApiKey, created["id"])
        assert row is not None
        for key, stored in ((rotated["key"], row.secret_hash), (created["key"], row.previous_secret_hash)):
            secret_part = key.split("_", 2)[2]
            assert stored == hmac.new(pepper, secret_part.encode(), hashlib.sha256).hexdigest()
            assert stored != hashlib.sha256(secret_part.encode()).hexdigest()  # peppered, not a bare hash
        # No column of any table holds either secret (or its secret part) in any form we could search for.
        for table in Base.metadata.sorted_tables:
            rows = (await s.execute(select(table))).all()
            dump = repr(rows)
            for key in (created["key"], rotated["key"]):
                assert key.split("_", 2)[2] not in dump, table.name
        raw = repr((await s.execute(text("SELECT * FROM api_keys"))).all())
        assert created["key"].split("_", 2)[2] not in raw


# -- expiry and revocation ------------------------------------------------------------------------------------
async def test_expired_key_is_refused(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    past = (_now() - dt.timedelta(seconds=5)).isoformat()
    r = await client.post(
        f"/v1/orgs/{t.org_id}/api-keys",
        json={"name": "x", "org_role": "org_member", "expires_at": past},
        headers=t.headers,
    )
    assert r.status_code == 422 and r.json()["code"] == "invalid_expiry"
    expires = _now() + dt.timedelta(seconds=1.5)
    key = await create_key(client, t, org_role="org_member", expires_at=expires.isoformat())
    assert abs(dt.datetime.fromisoformat(key["expires_at"]) - expires) < dt.timedelta(milliseconds=1)
    assert (await _me(client, key["key"])).status_code == 200  # and now cached
    await asyncio.sleep(max(0.0, (expires - _now()).total_seconds()) + 0.05)
    r = await _me(client, key["key"])
    assert r.status_code == 401 and r.json()["code"] == "api_key_expired"
    listed = (await client.get(f"/v1/api-keys/{key['id']}", headers=t.headers)).json()
    assert listed["expires_at"] is not None


async def test_expiry_can_be_changed(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    key = await create_key(client, t, org_role="org_member")
    past = (_now() - dt.timedelta(seconds=5)).isoformat()
    r = await client.patch(f"/v1/api-keys/{key['id']}", json={"expires_at": past}, headers=t.headers)
    assert r.status_code == 422
    later = (_now() + dt.timedelta(days=1)).isoformat()
    r = await client.patch(f"/v1/api-keys/{key['id']}", json={"expires_at": later}, headers=t.headers)
    assert r.status_code == 200 and r.json()["expires_at"] is not None
    assert (await _me(client, key["key"])).status_code == 200


async def test_revocation_is_effective_on_the_next_request(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    key = await create_key(client, t, org_role="org_owner")
    assert (await _me(client, key["key"])).status_code == 200  # cached now
    r = await client.delete(f"/v1/api-keys/{key['id']}", headers=t.headers)
    assert r.status_code == 204
    r = await _me(client, key["key"])
    assert r.status_code == 401 and r.json()["code"] == "invalid_api_key"
    shown = (await client.get(f"/v1/api-keys/{key['id']}", headers=t.headers)).json()
    assert shown["revoked_at"] is not None
    # Revoking twice is fine; rotating a revoked key is not.
    assert (await client.delete(f"/v1/api-keys/{key['id']}", headers=t.headers)).status_code == 204
    r = await client.post(f"/v1/api-keys/{key['id']}/rotate", json={}, headers=t.headers)
    assert r.status_code == 409


async def test_a_key_can_revoke_itself(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    key = await create_key(client, t, org_role="org_owner")
    assert (await client.delete(f"/v1/api-keys/{key['id']}", headers=auth(key["key"]))).status_code == 204
    assert (await _me(client, key["key"])).status_code == 401


@pytest.fixture
async def second_process(migrated_db: str) -> AsyncIterator[httpx.AsyncClient]:
    """Another API process on the same database: its own app, lifespan, engine and authentication cache."""
    from services.api.app import create_app

    app2 = create_app()
    async with app2.router.lifespan_context(app2):
        transport = httpx.ASGITransport(app=app2, client=("127.0.0.1", 50002))
        async with httpx.AsyncClient(transport=transport, base_url="http://second") as c:
            yield c


async def test_revocation_reaches_other_processes_within_a_second(
    client: httpx.AsyncClient, second_process: httpx.AsyncClient
) -> None:
    t = await signup(client)
    key = await create_key(client, t, org_role="org_owner")
    # Warm the second process's cache with the key, then revoke it through the first process.
    assert (await _me(second_process, key["key"])).status_code == 200
    assert (await _me(second_process, key["key"])).status_code == 200
    assert (await client.delete(f"/v1/api-keys/{key['id']}", headers=t.headers)).status_code == 204
    revoked_at = time.monotonic()
    assert (await _me(client, key["key"])).status_code == 401  # this process: at once
    while True:
        r = await _me(second_process, key["key"])
        elapsed = time.monotonic() - revoked_at
        if r.status_code == 401:
            break
        assert r.status_code == 200
        assert elapsed < 1.1, "the second process still accepts a revoked key after 1.1 s"
        await asyncio.sleep(0.02)
    assert elapsed < 1.1
    # It stays refused.
    await asyncio.sleep(0.1)
    assert (await _me(second_process, key["key"])).status_code == 401


async def test_role_change_reaches_other_processes_within_a_second(
    client: httpx.AsyncClient, second_process: httpx.AsyncClient
) -> None:
    owner = await signup(client)
    member = await add_member(client, owner, org_role="org_owner")
    assert (await second_process.get(f"/v1/orgs/{owner.org_id}/audit-logs", headers=member.headers)).status_code == 200
    r = await client.patch(
        f"/v1/orgs/{owner.org_id}/members/{member.user_id}", json={"org_role": "org_member"}, headers=owner.headers
    )
    assert r.status_code == 200, r.text
    changed = time.monotonic()
    while True:
        r = await second_process.get(f"/v1/orgs/{owner.org_id}/audit-logs", headers=member.headers)
        if r.status_code == 403:
            break
        assert r.status_code == 200 and time.monotonic() - changed < 1.1
        await asyncio.sleep(0.02)


# -- rotation -------------------------------------------------------------------------------------------------
async def test_rotation_with_grace(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    key = await create_key(client, t, org_role="org_member")
    old = key["key"]
    assert (await _me(client, old)).status_code == 200
    r = await client.post(f"/v1/api-keys/{key['id']}/rotate", json={"grace_seconds": 2}, headers=t.headers)
    assert r.status_code == 200, r.text
    rotated = r.json()
    new = rotated["key"]
    until = dt.datetime.fromisoformat(rotated["previous_valid_until"])
    assert dt.timedelta(seconds=1) < until - _now() <= dt.timedelta(seconds=2)
    assert (await _me(client, new)).status_code == 200
    assert (await _me(client, old)).status_code == 200  # during the grace period
    await asyncio.sleep((until - _now()).total_seconds() + 0.05)
    r = await _me(client, old)
    assert r.status_code == 401 and r.json()["code"] == "invalid_api_key"
    assert (await _me(client, new)).status_code == 200


async def test_rotation_without_grace_stops_the_old_secret_at_once(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    key = await create_key(client, t, org_role="org_member")
    assert (await _me(client, key["key"])).status_code == 200
    for body in ({"grace_seconds": 0}, {}, None):
        old = key["key"]
        r = await client.post(f"/v1/api-keys/{key['id']}/rotate", json=body, headers=t.headers)
        assert r.status_code == 200, r.text
        key = r.json()
        assert key["previous_valid_until"] is None
        assert (await _me(client, old)).status_code == 401
        assert (await _me(client, key["key"])).status_code == 200


async def test_rotation_grace_is_bounded(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    key = await create_key(client, t, org_role="org_member")
    for grace in (-1, 8 * 24 * 3600):
        r = await client.post(f"/v1/api-keys/{key['id']}/rotate", json={"grace_seconds": grace}, headers=t.headers)
        assert r.status_code == 400 and "grace_seconds" in r.json()["detail"]


# -- last_used_at ---------------------------------------------------------------------------------------------
async def test_last_used_at_is_batched_not_written_per_request(client: httpx.AsyncClient, app: Any) -> None:
    t = await signup(client)
    key = await create_key(client, t, org_role="org_member")
    authenticator = app.state.authenticator
    await authenticator.flush_last_used()
    before = _now()
    # 100 authentications (the first one verifies against the database, the rest hit the cache): no writes.
    with _statements(app.state.db.async_engine) as seen:
        for _ in range(100):
            subject = await authenticator.authenticate(key["key"])
            assert subject.id == key["id"]
    writes = [s for s in seen if not s.lstrip().upper().startswith("SELECT")]
    assert writes == []
    async with app.state.db.session() as s:
        assert (await s.get(ApiKey, key["id"])).last_used_at is None  # type: ignore[union-attr]
    # One flush writes the batch: a single UPDATE for the key.
    with _statements(app.state.db.async_engine) as seen:
        await authenticator.flush_last_used()
    updates = [s for s in seen if s.lstrip().upper().startswith("UPDATE API_KEYS")]
    assert len(updates) == 1
    async with app.state.db.session() as s:
        row = await s.get(ApiKey, key["id"])
        assert row is not None and row.last_used_at is not None and row.last_used_at >= before


async def test_last_used_at_shows_up_after_use(client: httpx.AsyncClient, app: Any) -> None:
    t = await signup(client)
    key = await create_key(client, t, org_role="org_member")
    before = _now()
    with _statements(app.state.db.async_engine) as seen:
        for _ in range(20):
            assert (await _me(client, key["key"])).status_code == 200
    touched = [s for s in seen if s.lstrip().upper().startswith("UPDATE API_KEYS")]
    assert len(touched) < 20 / 2  # flushed in batches (every VECTA_LAST_USED_FLUSH_SECONDS), not per request
    deadline = time.monotonic() + 3
    while True:
        shown = (await client.get(f"/v1/api-keys/{key['id']}", headers=t.headers)).json()
        if shown["last_used_at"] is not None:
            break
        assert time.monotonic() < deadline, "last_used_at never recorded"
        await asyncio.sleep(0.05)
    assert dt.datetime.fromisoformat(shown["last_used_at"]) >= before - dt.timedelta(seconds=1)
    listed = (await client.get(f"/v1/orgs/{t.org_id}/api-keys", headers=t.headers)).json()["items"]
    assert [k["last_used_at"] for k in listed if k["id"] == key["id"]] == [shown["last_used_at"]]


# -- privilege escalation -------------------------------------------------------------------------------------
async def _key_manager(client: httpx.AsyncClient, owner: Tenant) -> Tenant:
    """A member who manages API keys but is not an owner: a custom org role plus data_writer on the project."""
    role = await client.post(
        f"/v1/orgs/{owner.org_id}/roles",
        json={"name": "key-manager", "privileges": ["org:read", "member:read", "apikey:manage"]},
        headers=owner.headers,
    )
    assert role.status_code == 201, role.text
    return await add_member(
        client,
        owner,
        org_role=role.json()["id"],
        project_roles=[{"project_id": owner.project_id, "role": "data_writer"}],
        tag="keymgr",
    )


async def test_no_minting_keys_above_your_own_privileges(client: httpx.AsyncClient) -> None:
    owner = await signup(client)
    mgr = await _key_manager(client, owner)
    url = f"/v1/orgs/{owner.org_id}/api-keys"
    prj = owner.project_id
    refused = [
        {"org_role": "org_owner"},
        {"org_role": "org_billing_admin"},
        {"project_roles": [{"project_id": prj, "role": "project_admin"}]},
        {"project_roles": [{"project_id": prj, "role": "cluster_admin", "cluster_ids": ["cl_x"]}]},
    ]
    for body in refused:
        r = await client.post(url, json={"name": "escalate", **body}, headers=mgr.headers)
        assert r.status_code == 403, (body, r.text)
    big = await client.post(
        f"/v1/orgs/{owner.org_id}/roles",
        json={"name": "big", "privileges": ["org:read", "billing:manage"]},
        headers=owner.headers,
    )
    r = await client.post(url, json={"name": "escalate", "org_role": big.json()["id"]}, headers=mgr.headers)
    assert r.status_code == 403
    allowed = [
        {"org_role": "org_member"},
        {"project_roles": [{"project_id": prj, "role": "data_reader"}]},
        {"project_roles": [{"project_id": prj, "role": "data_writer", "cluster_ids": ["cl_x"]}]},
    ]
    for body in allowed:
        r = await client.post(url, json={"name": "fine", **body}, headers=mgr.headers)
        assert r.status_code == 201, (body, r.text)
    # A key minted by the manager cannot mint an owner key either (it holds no more than it was given).
    mgr_key = await create_key(client, mgr, org_role="key-manager")
    r = await client.post(url, json={"name": "escalate", "org_role": "org_owner"}, headers=auth(mgr_key["key"]))
    assert r.status_code == 403
    # Nor can the manager make themselves owner.
    r = await client.patch(
        f"/v1/orgs/{owner.org_id}/members/{mgr.user_id}", json={"org_role": "org_owner"}, headers=mgr.headers
    )
    assert r.status_code == 403


async def test_no_taking_over_a_more_privileged_key_by_rotating_it(client: httpx.AsyncClient) -> None:
    """Rotation hands out a new secret, so it needs what minting the key would need."""
    owner = await signup(client)
    mgr = await _key_manager(client, owner)
    owner_key = await create_key(client, owner, org_role="org_owner")
    admin_key = await create_key(
        client, owner, project_roles=[{"project_id": owner.project_id, "role": "project_admin"}]
    )
    for k in (owner_key, admin_key):
        r = await client.post(f"/v1/api-keys/{k['id']}/rotate", json={"grace_seconds": 0}, headers=mgr.headers)
        assert r.status_code == 403, r.text
        assert (await _me(client, k["key"])).status_code == 200  # untouched
    small = await create_key(client, owner, org_role="org_member")
    r = await client.post(f"/v1/api-keys/{small['id']}/rotate", json={}, headers=mgr.headers)
    assert r.status_code == 200, r.text


# -- cluster-limited bindings ---------------------------------------------------------------------------------
async def test_cluster_limited_key(client: httpx.AsyncClient, app: Any) -> None:
    t = await signup(client)
    other_project = await client.post(f"/v1/orgs/{t.org_id}/projects", json={"name": "second"}, headers=t.headers)
    assert other_project.status_code == 201
    body = {
        "name": "one cluster",
        "project_roles": [{"project_id": t.project_id, "role": "data_writer", "cluster_ids": ["cl_a", "cl_a", "cl_b"]}],
    }
    r = await client.post(f"/v1/orgs/{t.org_id}/api-keys", json=body, headers=t.headers)
    assert r.status_code == 201, r.text
    key = r.json()
    assert key["project_roles"] == [
        {"project_id": t.project_id, "role": "data_writer", "cluster_ids": ["cl_a", "cl_b"]}
    ]
    assert (await client.get(f"/v1/api-keys/{key['id']}", headers=t.headers)).json()["project_roles"] == key[
        "project_roles"
    ]
    subject = await app.state.authenticator.authenticate(key["key"])
    org, prj = t.org_id, t.project_id
    subject.require_cluster(org, prj, "cl_a", "data:write")
    subject.require_cluster(org, prj, "cl_b", "data:read")
    with pytest.raises(Forbidden):
        subject.require_cluster(org, prj, "cl_a", "cluster:delete")  # not in data_writer
    with pytest.raises(NotFound):
        subject.require_cluster(org, prj, "cl_c", "data:read")  # another cluster of the same project
    with pytest.raises(NotFound):
        subject.require_cluster(org, other_project.json()["id"], "cl_a", "data:read")
    with pytest.raises(Forbidden):
        subject.require_project(org, prj, "cluster:create")  # no project-wide privileges at all
    # Over HTTP: the project is visible (the key is bound to it) but not readable as a whole.
    assert (await client.get(f"/v1/projects/{prj}", headers=auth(key["key"]))).status_code == 403
    assert (await client.get(f"/v1/projects/{other_project.json()['id']}", headers=auth(key["key"]))).status_code == 404
    listed = (await client.get(f"/v1/orgs/{org}/projects", headers=auth(key["key"]))).json()["items"]
    assert [p["id"] for p in listed] == [prj]
    empty = {"name": "x", "project_roles": [{"project_id": prj, "role": "data_reader", "cluster_ids": []}]}
    assert (await client.post(f"/v1/orgs/{org}/api-keys", json=empty, headers=t.headers)).status_code == 400


async def test_key_needs_some_role_and_known_projects(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    stranger = await signup(client, "stranger")
    url = f"/v1/orgs/{t.org_id}/api-keys"
    r = await client.post(url, json={"name": "nothing"}, headers=t.headers)
    assert r.status_code == 422 and r.json()["code"] == "no_roles"
    body = {"name": "x", "project_roles": [{"project_id": stranger.project_id, "role": "data_reader"}]}
    r = await client.post(url, json=body, headers=t.headers)
    assert r.status_code == 422 and r.json()["code"] == "project_not_found"
    r = await client.post(url, json={"name": "x", "org_role": "data_reader"}, headers=t.headers)
    assert r.status_code == 422 and r.json()["code"] == "role_scope_mismatch"

"""The audit log: every mutating control-plane action recorded (actor, action, target, result, IP, request id),
denied attempts too, never a secret; read with ``audit:read``, filtered by actor/action/since, paginated."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import httpx
from sqlalchemy import select

from services.core.audit import AuditLog
from tests.conftest import PASSWORD, add_member, auth, create_key, signup, unique_email
from tests.control_plane.test_orgs import problem


class Recorder:
    """Sends requests with a fresh X-Request-ID each and remembers which id went with which expected action."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.expected: list[tuple[str, str | None, str]] = []  # (action, target_id, request_id)

    async def __call__(
        self, method: str, url: str, headers: dict[str, str], action: str, target: str | None = None, **kw: Any
    ) -> httpx.Response:
        rid = f"test-{uuid.uuid4().hex}"
        r = await self.client.request(method, url, headers={**headers, "X-Request-ID": rid}, **kw)
        assert r.status_code < 300, r.text
        assert r.headers["x-request-id"] == rid
        body = r.json() if r.content else {}
        self.expected.append((action, target or body.get("id"), rid))
        return r


async def _all_logs(client: httpx.AsyncClient, org_id: str, headers: dict[str, str], **params: Any) -> list[dict]:
    out: list[dict] = []
    token = None
    while True:
        q = {**params, "limit": 500, **({"page_token": token} if token else {})}
        r = await client.get(f"/v1/orgs/{org_id}/audit-logs", params=q, headers=headers)
        assert r.status_code == 200, r.text
        out += r.json()["items"]
        token = r.json()["next_page_token"]
        if not token:
            return out


async def test_every_mutation_is_audited_without_secrets(client: httpx.AsyncClient, app: Any) -> None:
    t = await signup(client)
    rec = Recorder(client)
    h = t.headers
    org = f"/v1/orgs/{t.org_id}"

    await rec("PATCH", org, h, "org.update", t.org_id, json={"name": "Renamed", "billing_email": "b@acme.example"})
    prj = (await rec("POST", f"{org}/projects", h, "project.create", json={"name": "audited"})).json()
    await rec("PATCH", f"/v1/projects/{prj['id']}", h, "project.update", prj["id"], json={"name": "audited2"})
    role = (
        await rec("POST", f"{org}/roles", h, "role.create", json={"name": "r1", "privileges": ["data:read"]})
    ).json()
    await rec("PATCH", f"{org}/roles/{role['id']}", h, "role.update", role["id"], json={"privileges": ["cluster:read"]})
    await rec("DELETE", f"{org}/roles/{role['id']}", h, "role.delete", role["id"])

    invitee = await signup(client, tag="invitee", org_name=None)
    inv = (await rec("POST", f"{org}/invitations", h, "invitation.create", json={"email": invitee.email})).json()
    accept_rid = f"test-{uuid.uuid4().hex}"
    r = await client.post(
        f"/v1/invitations/{inv['token']}/accept", headers={**invitee.headers, "X-Request-ID": accept_rid}
    )
    assert r.status_code == 200
    other_inv = (await rec("POST", f"{org}/invitations", h, "invitation.create", json={"email": unique_email()})).json()
    await rec("DELETE", f"/v1/invitations/{other_inv['id']}", h, "invitation.revoke", other_inv["id"])
    await rec(
        "PATCH",
        f"{org}/members/{invitee.user_id}",
        h,
        "member.update",
        invitee.user_id,
        json={"org_role": "org_member"},
    )
    await rec("DELETE", f"{org}/members/{invitee.user_id}", h, "member.remove", invitee.user_id)

    key = (
        await rec("POST", f"{org}/api-keys", h, "apikey.create", json={"name": "ci", "org_role": "org_owner"})
    ).json()
    await rec("PATCH", f"/v1/api-keys/{key['id']}", h, "apikey.update", key["id"], json={"name": "ci2"})
    rotated = (
        await rec("POST", f"/v1/api-keys/{key['id']}/rotate", h, "apikey.rotate", key["id"], json={"grace_seconds": 60})
    ).json()
    # The key acts on its own: the actor is the key.
    by_key = (await rec("POST", f"{org}/projects", auth(rotated["key"]), "project.create", json={"name": "k"})).json()
    await rec("DELETE", f"/v1/projects/{prj['id']}", h, "project.delete", prj["id"])
    await rec("DELETE", f"/v1/api-keys/{key['id']}", h, "apikey.revoke", key["id"])

    logs = await _all_logs(client, t.org_id, h)
    by_rid = {row["request_id"]: row for row in logs}
    for action, target, rid in rec.expected:
        row = by_rid.get(rid)
        assert row is not None, f"no audit record for {action} (request {rid})"
        assert row["action"] == action, row
        assert row["target_id"] == target, row
        assert row["result"] == "success" and row["ip"] == "127.0.0.1" and row["org_id"] == t.org_id
        expected_actor = ("api_key", key["id"]) if target == by_key["id"] else ("user", t.user_id)
        assert (row["actor_type"], row["actor_id"]) == expected_actor, row
        assert dt.datetime.fromisoformat(row["created_at"]).tzinfo is not None
    accepted = by_rid[accept_rid]
    assert accepted["action"] == "invitation.accept" and accepted["actor_id"] == invitee.user_id
    assert accepted["target_id"] == inv["id"]
    # Newest first.
    assert [row["id"] for row in logs] == sorted((row["id"] for row in logs), reverse=True)

    # No secret anywhere in the audit table (not only this org's rows).
    secrets = {
        PASSWORD,
        t.access_token,
        t.refresh_token,
        invitee.access_token,
        inv["token"],
        other_inv["token"],
        key["key"],
        key["key"].rsplit("_", 1)[1],
        rotated["key"],
        rotated["key"].rsplit("_", 1)[1],
    }
    async with app.state.db.session() as session:
        rows = (await session.execute(select(AuditLog))).scalars().all()
    dump = json.dumps(
        [[r.org_id, r.actor_type, r.actor_id, r.action, r.target_type, r.target_id, r.result, r.details] for r in rows]
    )
    assert len(rows) >= len(rec.expected)
    leaked = [s for s in secrets if s in dump]
    assert not leaked, f"secrets in the audit log: {leaked}"
    assert not [s for s in secrets if s in json.dumps(logs)]


async def test_denied_attempts_are_audited(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    member = await add_member(client, t)
    rid = f"deny-{uuid.uuid4().hex}"
    r = await client.patch(
        f"/v1/orgs/{t.org_id}", json={"name": "mine now"}, headers={**member.headers, "X-Request-ID": rid}
    )
    problem(r, 403)
    r = await client.post(f"/v1/orgs/{t.org_id}/projects", json={"name": "nope"}, headers=member.headers)
    problem(r, 403)
    logs = await _all_logs(client, t.org_id, t.headers, actor=member.user_id)
    denied = [row for row in logs if row["result"] == "denied"]
    assert len(denied) == 2, logs
    row = next(row for row in denied if row["request_id"] == rid)
    assert row["action"] == "PATCH /v1/orgs/{org_id}"
    assert row["actor_type"] == "user" and row["actor_id"] == member.user_id and row["ip"] == "127.0.0.1"
    # And the refused change did not happen.
    assert (await client.get(f"/v1/orgs/{t.org_id}", headers=t.headers)).json()["name"] == "Acme"

    # Reading the log needs audit:read.
    problem(await client.get(f"/v1/orgs/{t.org_id}/audit-logs", headers=member.headers), 403)
    other = await signup(client, tag="other")
    problem(await client.get(f"/v1/orgs/{t.org_id}/audit-logs", headers=other.headers), 404)
    key = await create_key(client, t, org_role="org_member")
    problem(await client.get(f"/v1/orgs/{t.org_id}/audit-logs", headers=auth(key["key"])), 403)


async def test_audit_filters_and_pagination(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    member = await add_member(client, t, org_role="org_owner")
    for n in range(3):
        r = await client.post(f"/v1/orgs/{t.org_id}/projects", json={"name": f"p{n}"}, headers=t.headers)
        assert r.status_code == 201
    before_member = dt.datetime.now(dt.UTC)
    for n in range(2):
        r = await client.post(f"/v1/orgs/{t.org_id}/projects", json={"name": f"m{n}"}, headers=member.headers)
        assert r.status_code == 201
    key = await create_key(client, t, org_role="org_member")
    assert (await client.delete(f"/v1/api-keys/{key['id']}", headers=t.headers)).status_code == 204

    everything = await _all_logs(client, t.org_id, t.headers)
    assert len(everything) >= 9  # signup, invitation create/accept, 5 projects, key create/revoke

    by_member = await _all_logs(client, t.org_id, t.headers, actor=member.user_id)
    assert by_member and {row["actor_id"] for row in by_member} == {member.user_id}
    assert [row["action"] for row in by_member].count("project.create") == 2

    created = await _all_logs(client, t.org_id, t.headers, action="project.create")
    assert len(created) == 5 and {row["action"] for row in created} == {"project.create"}
    keys = await _all_logs(client, t.org_id, t.headers, action="apikey.*")
    assert [row["action"] for row in keys] == ["apikey.revoke", "apikey.create"]
    assert await _all_logs(client, t.org_id, t.headers, action="nothing.here") == []

    since = await _all_logs(client, t.org_id, t.headers, since=before_member.isoformat())
    assert {row["action"] for row in since} == {"project.create", "apikey.create", "apikey.revoke"}
    assert len(since) == 4
    combined = await _all_logs(
        client, t.org_id, t.headers, since=before_member.isoformat(), actor=t.user_id, action="project.create"
    )
    assert combined == []
    problem(await client.get(f"/v1/orgs/{t.org_id}/audit-logs", params={"since": "yesterday"}, headers=t.headers), 400)

    # Walk it two at a time: the same rows, in the same order, no duplicates.
    walked: list[str] = []
    token = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"page_token": token} if token else {})}
        r = await client.get(f"/v1/orgs/{t.org_id}/audit-logs", params=params, headers=t.headers)
        page = r.json()
        assert len(page["items"]) <= 2
        walked += [row["id"] for row in page["items"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert walked == [row["id"] for row in everything]

"""Privilege escalation through roles and members: no one ends up holding more than they were given."""

from __future__ import annotations

import httpx

from tests.conftest import Tenant, add_member, auth, create_key, signup


async def _member_with(client: httpx.AsyncClient, owner: Tenant, privileges: list[str], tag: str) -> tuple[Tenant, str]:
    role = await client.post(
        f"/v1/orgs/{owner.org_id}/roles", json={"name": tag, "privileges": privileges}, headers=owner.headers
    )
    assert role.status_code == 201, role.text
    member = await add_member(client, owner, org_role=role.json()["id"], tag=tag)
    return member, role.json()["id"]


async def test_role_manager_cannot_widen_a_role_beyond_their_own_privileges(client: httpx.AsyncClient) -> None:
    owner = await signup(client)
    mgr, role_id = await _member_with(client, owner, ["org:read", "member:read", "role:manage"], "rolemgr")
    url = f"/v1/orgs/{owner.org_id}/roles/{role_id}"
    # Widening their own role (or any role) with privileges they lack would be an escalation.
    for extra in (["billing:manage"], ["apikey:manage"], ["project:delete"]):
        body = {"privileges": ["org:read", "member:read", "role:manage", *extra]}
        r = await client.patch(url, json=body, headers=mgr.headers)
        assert r.status_code == 403, (extra, r.text)
    assert (await client.get(f"/v1/orgs/{owner.org_id}/audit-logs", headers=mgr.headers)).status_code == 403
    shown = (await client.get(url, headers=mgr.headers)).json()
    assert shown["privileges"] == ["member:read", "org:read", "role:manage"]
    # Narrowing is fine, and so is editing a role that already holds more as long as nothing is added.
    big = await client.post(
        f"/v1/orgs/{owner.org_id}/roles",
        json={"name": "big", "privileges": ["org:read", "billing:manage"]},
        headers=owner.headers,
    )
    r = await client.patch(
        f"/v1/orgs/{owner.org_id}/roles/{big.json()['id']}", json={"description": "renamed"}, headers=mgr.headers
    )
    assert r.status_code == 200, r.text
    r = await client.patch(
        f"/v1/orgs/{owner.org_id}/roles/{big.json()['id']}", json={"privileges": ["org:read"]}, headers=mgr.headers
    )
    assert r.status_code == 200, r.text
    # The owner can widen anything.
    r = await client.patch(url, json={"privileges": ["org:read", "member:read", "audit:read"]}, headers=owner.headers)
    assert r.status_code == 200, r.text


async def test_a_key_cannot_widen_its_own_custom_role(client: httpx.AsyncClient) -> None:
    owner = await signup(client)
    role = await client.post(
        f"/v1/orgs/{owner.org_id}/roles",
        json={"name": "robot", "privileges": ["org:read", "role:manage"]},
        headers=owner.headers,
    )
    key = await create_key(client, owner, org_role=role.json()["id"])
    r = await client.patch(
        f"/v1/orgs/{owner.org_id}/roles/{role.json()['id']}",
        json={"privileges": ["org:read", "role:manage", "apikey:manage"]},
        headers=auth(key["key"]),
    )
    assert r.status_code == 403, r.text
    assert (await client.get(f"/v1/orgs/{owner.org_id}/api-keys", headers=auth(key["key"]))).status_code == 403


async def test_member_manager_cannot_promote_or_remove_owners(client: httpx.AsyncClient) -> None:
    owner = await signup(client)
    mgr, _ = await _member_with(client, owner, ["org:read", "member:read", "member:manage"], "membermgr")
    org = owner.org_id
    invite = f"/v1/orgs/{org}/invitations"
    r = await client.post(invite, json={"email": "x-owner@example.com", "org_role": "org_owner"}, headers=mgr.headers)
    assert r.status_code == 403
    body = {
        "email": "x-admin@example.com",
        "project_roles": [{"project_id": owner.project_id, "role": "project_admin"}],
    }
    r = await client.post(invite, json=body, headers=mgr.headers)
    assert r.status_code == 422 and r.json()["code"] == "project_not_found"  # a project they cannot see
    assert (await client.post(invite, json={"email": "x-member@example.com"}, headers=mgr.headers)).status_code == 201
    me = f"/v1/orgs/{org}/members/{mgr.user_id}"
    assert (await client.patch(me, json={"org_role": "org_owner"}, headers=mgr.headers)).status_code == 403
    grant = {"project_roles": [{"project_id": owner.project_id, "role": "data_reader"}]}
    r = await client.patch(me, json=grant, headers=mgr.headers)
    assert r.status_code == 422 and r.json()["code"] == "project_not_found"
    boss = f"/v1/orgs/{org}/members/{owner.user_id}"
    assert (await client.patch(boss, json={"org_role": "org_member"}, headers=mgr.headers)).status_code == 403
    assert (await client.delete(boss, headers=mgr.headers)).status_code == 403
    members = (await client.get(f"/v1/orgs/{org}/members", headers=owner.headers)).json()["items"]
    roles = {m["user_id"]: m["org_role"] for m in members}
    assert roles[owner.user_id] == "org_owner" and roles[mgr.user_id] != "org_owner"

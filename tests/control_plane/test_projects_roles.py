"""Projects (CRUD) and custom roles (create, bind at project scope, in use, delete)."""

from __future__ import annotations

import httpx

from tests.conftest import add_member, create_key, signup
from tests.control_plane.test_orgs import problem


async def test_project_crud(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    r = await client.post(f"/v1/orgs/{t.org_id}/projects", json={"name": "search"}, headers=t.headers)
    assert r.status_code == 201, r.text
    p = r.json()
    assert p["id"].startswith("prj_") and p["org_id"] == t.org_id and p["name"] == "search"

    assert (await client.get(f"/v1/projects/{p['id']}", headers=t.headers)).json() == p
    listed = (await client.get(f"/v1/orgs/{t.org_id}/projects", headers=t.headers)).json()
    assert {x["name"] for x in listed["items"]} == {"Default", "search"}

    problem(
        await client.post(f"/v1/orgs/{t.org_id}/projects", json={"name": "search"}, headers=t.headers),
        409,
        "project_exists",
    )
    problem(
        await client.patch(f"/v1/projects/{p['id']}", json={"name": "Default"}, headers=t.headers),
        409,
        "project_exists",
    )
    r = await client.patch(f"/v1/projects/{p['id']}", json={"name": "retrieval"}, headers=t.headers)
    assert r.status_code == 200 and r.json()["name"] == "retrieval"
    # The old name is free again.
    r2 = await client.post(f"/v1/orgs/{t.org_id}/projects", json={"name": "search"}, headers=t.headers)
    assert r2.status_code == 201

    body = problem(await client.post(f"/v1/orgs/{t.org_id}/projects", json={"name": ""}, headers=t.headers), 400)
    assert "name" in body["detail"]
    body = problem(await client.post(f"/v1/orgs/{t.org_id}/projects", json={}, headers=t.headers), 400)
    assert "name" in body["detail"]

    assert (await client.delete(f"/v1/projects/{p['id']}", headers=t.headers)).status_code == 204
    problem(await client.get(f"/v1/projects/{p['id']}", headers=t.headers), 404, "project_not_found")
    problem(await client.delete(f"/v1/projects/{p['id']}", headers=t.headers), 404)
    # Same name in another org is fine; another org's project is invisible.
    other = await signup(client, tag="other")
    assert (
        await client.post(f"/v1/orgs/{other.org_id}/projects", json={"name": "search"}, headers=other.headers)
    ).status_code == 201
    problem(await client.get(f"/v1/projects/{r2.json()['id']}", headers=other.headers), 404)
    problem(await client.delete(f"/v1/projects/{r2.json()['id']}", headers=other.headers), 404)


async def test_project_permissions(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    second = (await client.post(f"/v1/orgs/{t.org_id}/projects", json={"name": "two"}, headers=t.headers)).json()
    reader = await add_member(client, t, project_roles=[{"project_id": t.project_id, "role": "data_reader"}])
    # A member sees only the projects they hold a role on.
    ids = [p["id"] for p in (await client.get(f"/v1/orgs/{t.org_id}/projects", headers=reader.headers)).json()["items"]]
    assert ids == [t.project_id]
    assert (await client.get(f"/v1/projects/{t.project_id}", headers=reader.headers)).status_code == 200
    problem(await client.get(f"/v1/projects/{second['id']}", headers=reader.headers), 404)
    problem(await client.patch(f"/v1/projects/{t.project_id}", json={"name": "x"}, headers=reader.headers), 403)
    problem(await client.delete(f"/v1/projects/{t.project_id}", headers=reader.headers), 403)
    problem(await client.post(f"/v1/orgs/{t.org_id}/projects", json={"name": "z"}, headers=reader.headers), 403)


async def test_custom_roles(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    listed = (await client.get(f"/v1/orgs/{t.org_id}/roles", headers=t.headers)).json()["items"]
    builtins = {r["name"]: r for r in listed if r["builtin"]}
    assert set(builtins) == {
        "org_owner",
        "org_billing_admin",
        "org_member",
        "project_admin",
        "cluster_admin",
        "data_writer",
        "data_reader",
    }
    assert builtins["data_reader"]["scope"] == "project" and "data:read" in builtins["data_reader"]["privileges"]

    # Unknown privilege: 400 naming it.
    body = problem(
        await client.post(
            f"/v1/orgs/{t.org_id}/roles",
            json={"name": "bad", "privileges": ["data:read", "cluster:explode"]},
            headers=t.headers,
        ),
        400,
        "unknown_privilege",
    )
    assert "cluster:explode" in body["detail"]
    problem(
        await client.post(
            f"/v1/orgs/{t.org_id}/roles", json={"name": "data_reader", "privileges": ["data:read"]}, headers=t.headers
        ),
        409,
        "role_exists",
    )
    body = problem(
        await client.post(f"/v1/orgs/{t.org_id}/roles", json={"name": "x", "privileges": []}, headers=t.headers), 400
    )
    assert "privileges" in body["detail"]

    r = await client.post(
        f"/v1/orgs/{t.org_id}/roles",
        json={"name": "searcher", "description": "reads", "privileges": ["data:read", "cluster:read", "project:read"]},
        headers=t.headers,
    )
    assert r.status_code == 201, r.text
    role = r.json()
    assert role["id"].startswith("role_") and role["builtin"] is False and role["scope"] == "project"
    assert role["privileges"] == ["cluster:read", "data:read", "project:read"]
    problem(
        await client.post(
            f"/v1/orgs/{t.org_id}/roles", json={"name": "searcher", "privileges": ["data:read"]}, headers=t.headers
        ),
        409,
        "role_exists",
    )
    assert (await client.get(f"/v1/orgs/{t.org_id}/roles/{role['id']}", headers=t.headers)).json() == role

    # Bind it to a member at project scope (by id or by name): the member can read the project, not change it.
    member = await add_member(client, t)
    r = await client.patch(
        f"/v1/orgs/{t.org_id}/members/{member.user_id}",
        json={"project_roles": [{"project_id": t.project_id, "role": "searcher"}]},
        headers=t.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["project_roles"] == [{"project_id": t.project_id, "role": role["id"], "cluster_ids": None}]
    assert (await client.get(f"/v1/projects/{t.project_id}", headers=member.headers)).status_code == 200
    problem(await client.patch(f"/v1/projects/{t.project_id}", json={"name": "n"}, headers=member.headers), 403)

    # Updating the role's privileges takes effect on the member's next request.
    r = await client.patch(
        f"/v1/orgs/{t.org_id}/roles/{role['id']}",
        json={"privileges": ["project:read", "project:update"]},
        headers=t.headers,
    )
    assert r.status_code == 200 and r.json()["privileges"] == ["project:read", "project:update"]
    assert (
        await client.patch(f"/v1/projects/{t.project_id}", json={"name": "renamed"}, headers=member.headers)
    ).status_code == 200
    problem(
        await client.patch(f"/v1/orgs/{t.org_id}/roles/{role['id']}", json={"privileges": ["nope"]}, headers=t.headers),
        400,
        "unknown_privilege",
    )

    # In use (by a member, then by an API key): cannot be deleted.
    problem(await client.delete(f"/v1/orgs/{t.org_id}/roles/{role['id']}", headers=t.headers), 409, "role_in_use")
    r = await client.patch(
        f"/v1/orgs/{t.org_id}/members/{member.user_id}", json={"project_roles": []}, headers=t.headers
    )
    assert r.status_code == 200 and r.json()["project_roles"] == []
    key = await create_key(client, t, project_roles=[{"project_id": t.project_id, "role": role["id"]}])
    problem(await client.delete(f"/v1/orgs/{t.org_id}/roles/{role['id']}", headers=t.headers), 409, "role_in_use")
    assert (await client.delete(f"/v1/api-keys/{key['id']}", headers=t.headers)).status_code == 204
    # Members cannot manage roles.
    problem(await client.delete(f"/v1/orgs/{t.org_id}/roles/{role['id']}", headers=member.headers), 403)
    assert (await client.delete(f"/v1/orgs/{t.org_id}/roles/{role['id']}", headers=t.headers)).status_code == 204
    problem(await client.get(f"/v1/orgs/{t.org_id}/roles/{role['id']}", headers=t.headers), 404, "role_not_found")
    names = {r["name"] for r in (await client.get(f"/v1/orgs/{t.org_id}/roles", headers=t.headers)).json()["items"]}
    assert "searcher" not in names

    # Another tenant's role id is unknown in this org.
    other = await signup(client, tag="other")
    theirs = (
        await client.post(
            f"/v1/orgs/{other.org_id}/roles", json={"name": "r", "privileges": ["data:read"]}, headers=other.headers
        )
    ).json()
    problem(await client.get(f"/v1/orgs/{t.org_id}/roles/{theirs['id']}", headers=t.headers), 404)
    problem(
        await client.patch(
            f"/v1/orgs/{t.org_id}/members/{member.user_id}",
            json={"project_roles": [{"project_id": t.project_id, "role": theirs["id"]}]},
            headers=t.headers,
        ),
        422,
        "unknown_role",
    )


async def test_custom_org_role(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    role = (
        await client.post(
            f"/v1/orgs/{t.org_id}/roles",
            json={"name": "auditor", "privileges": ["org:read", "audit:read"]},
            headers=t.headers,
        )
    ).json()
    assert role["scope"] == "org"
    member = await add_member(client, t, org_role=role["id"])
    assert (await client.get(f"/v1/orgs/{t.org_id}/audit-logs", headers=member.headers)).status_code == 200
    problem(await client.get(f"/v1/orgs/{t.org_id}/members", headers=member.headers), 403)

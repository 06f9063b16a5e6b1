"""Organizations, members and invitations through the REST API."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import httpx
from sqlalchemy import update

from services.control_plane.models import Invitation
from tests.conftest import add_member, auth, find_mail, signup, unique_email

PROBLEM = "application/problem+json"


def problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert body["status"] == status
    if code:
        assert body["code"] == code, body
    return body


# -- organization --------------------------------------------------------------------------------------------
async def test_get_and_patch_org(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    r = await client.get(f"/v1/orgs/{t.org_id}", headers=t.headers)
    assert r.status_code == 200
    org = r.json()
    assert org["id"] == t.org_id and org["id"].startswith("org_")
    assert org["name"] == "Acme" and org["billing_email"] is None

    r = await client.patch(
        f"/v1/orgs/{t.org_id}", json={"name": "Acme 2", "billing_email": "billing@acme.example"}, headers=t.headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Acme 2" and r.json()["billing_email"] == "billing@acme.example"
    # Only what is sent changes.
    r = await client.patch(f"/v1/orgs/{t.org_id}", json={"billing_email": None}, headers=t.headers)
    assert r.json()["name"] == "Acme 2" and r.json()["billing_email"] is None
    assert (await client.get(f"/v1/orgs/{t.org_id}", headers=t.headers)).json()["name"] == "Acme 2"

    body = problem(await client.patch(f"/v1/orgs/{t.org_id}", json={"name": None}, headers=t.headers), 400)
    assert "name" in body["detail"]
    body = problem(await client.patch(f"/v1/orgs/{t.org_id}", json={"billing_email": "nope"}, headers=t.headers), 400)
    assert "billing_email" in body["detail"]
    body = problem(await client.patch(f"/v1/orgs/{t.org_id}", json={"nmae": "typo"}, headers=t.headers), 400)
    assert "nmae" in body["detail"]


async def test_org_access_by_role_and_tenant(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    member = await add_member(client, t)
    other = await signup(client, tag="other")
    assert (await client.get(f"/v1/orgs/{t.org_id}", headers=member.headers)).status_code == 200
    problem(await client.patch(f"/v1/orgs/{t.org_id}", json={"name": "x"}, headers=member.headers), 403, "forbidden")
    # Another tenant's organization does not exist for them, whatever the method.
    problem(await client.get(f"/v1/orgs/{t.org_id}", headers=other.headers), 404)
    problem(await client.patch(f"/v1/orgs/{t.org_id}", json={"name": "x"}, headers=other.headers), 404)
    problem(await client.get("/v1/orgs/org_doesnotexist", headers=t.headers), 404)
    problem(await client.get(f"/v1/orgs/{t.org_id}"), 401)


# -- members -------------------------------------------------------------------------------------------------
async def test_members_list_change_role_remove(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    m1 = await add_member(client, t, tag="m1")
    m2 = await add_member(client, t, org_role="org_billing_admin", tag="m2")

    r = await client.get(f"/v1/orgs/{t.org_id}/members", headers=t.headers)
    assert r.status_code == 200
    by_id = {m["user_id"]: m for m in r.json()["items"]}
    assert set(by_id) == {t.user_id, m1.user_id, m2.user_id}
    assert by_id[t.user_id]["org_role"] == "org_owner" and by_id[t.user_id]["email"] == t.email
    assert by_id[m2.user_id]["org_role"] == "org_billing_admin"
    assert r.json()["next_page_token"] is None
    # Members may read the member list (member:read) but not change it.
    assert (await client.get(f"/v1/orgs/{t.org_id}/members", headers=m1.headers)).status_code == 200
    problem(
        await client.patch(
            f"/v1/orgs/{t.org_id}/members/{m2.user_id}", json={"org_role": "org_member"}, headers=m1.headers
        ),
        403,
    )

    r = await client.patch(
        f"/v1/orgs/{t.org_id}/members/{m1.user_id}",
        json={"org_role": "org_billing_admin", "project_roles": [{"project_id": t.project_id, "role": "data_reader"}]},
        headers=t.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["org_role"] == "org_billing_admin"
    assert r.json()["project_roles"] == [{"project_id": t.project_id, "role": "data_reader", "cluster_ids": None}]
    # The new role applies to the member's next request.
    assert (await client.get("/v1/me", headers=m1.headers)).json()["memberships"] == [
        {"org_id": t.org_id, "role": "org_billing_admin"}
    ]
    assert (await client.get(f"/v1/projects/{t.project_id}", headers=m1.headers)).status_code == 200

    problem(
        await client.patch(f"/v1/orgs/{t.org_id}/members/{m1.user_id}", json={"org_role": "nope"}, headers=t.headers),
        422,
        "unknown_role",
    )
    problem(
        await client.patch(
            f"/v1/orgs/{t.org_id}/members/{m1.user_id}", json={"org_role": "data_reader"}, headers=t.headers
        ),
        422,
        "role_scope_mismatch",
    )

    assert (await client.delete(f"/v1/orgs/{t.org_id}/members/{m2.user_id}", headers=t.headers)).status_code == 204
    ids = {m["user_id"] for m in (await client.get(f"/v1/orgs/{t.org_id}/members", headers=t.headers)).json()["items"]}
    assert ids == {t.user_id, m1.user_id}
    # The removed member loses access at once.
    problem(await client.get(f"/v1/orgs/{t.org_id}", headers=m2.headers), 404)
    problem(await client.delete(f"/v1/orgs/{t.org_id}/members/{m2.user_id}", headers=t.headers), 404)
    # A member may leave on their own.
    assert (await client.delete(f"/v1/orgs/{t.org_id}/members/{m1.user_id}", headers=m1.headers)).status_code == 204
    problem(await client.get(f"/v1/orgs/{t.org_id}", headers=m1.headers), 404)


async def test_last_owner_cannot_be_removed_or_demoted(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    member = await add_member(client, t)
    problem(
        await client.patch(
            f"/v1/orgs/{t.org_id}/members/{t.user_id}", json={"org_role": "org_member"}, headers=t.headers
        ),
        409,
        "last_owner",
    )
    problem(await client.delete(f"/v1/orgs/{t.org_id}/members/{t.user_id}", headers=t.headers), 409, "last_owner")
    # A member cannot touch the owner at all.
    problem(await client.delete(f"/v1/orgs/{t.org_id}/members/{t.user_id}", headers=member.headers), 403)

    # With a second owner, one owner may step down; then the other is the last one.
    r = await client.patch(
        f"/v1/orgs/{t.org_id}/members/{member.user_id}", json={"org_role": "org_owner"}, headers=t.headers
    )
    assert r.status_code == 200, r.text
    r = await client.patch(
        f"/v1/orgs/{t.org_id}/members/{t.user_id}", json={"org_role": "org_member"}, headers=t.headers
    )
    assert r.status_code == 200, r.text
    problem(
        await client.delete(f"/v1/orgs/{t.org_id}/members/{member.user_id}", headers=member.headers), 409, "last_owner"
    )
    roles = {
        m["user_id"]: m["org_role"]
        for m in (await client.get(f"/v1/orgs/{t.org_id}/members", headers=member.headers)).json()["items"]
    }
    assert roles == {t.user_id: "org_member", member.user_id: "org_owner"}


async def test_members_pagination(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    members = [await add_member(client, t, tag=f"p{n}") for n in range(4)]
    expected = {t.user_id, *(m.user_id for m in members)}
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if token:
            params["page_token"] = token
        r = await client.get(f"/v1/orgs/{t.org_id}/members", params=params, headers=t.headers)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 2
        seen += [m["user_id"] for m in page["items"]]
        pages += 1
        token = page["next_page_token"]
        if token is None:
            break
    assert pages == 3 and len(seen) == len(set(seen)) == 5 and set(seen) == expected


# -- invitations ---------------------------------------------------------------------------------------------
async def test_invitation_email_and_accept(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    invitee = await signup(client, tag="invitee", org_name=None)
    r = await client.post(
        f"/v1/orgs/{t.org_id}/invitations",
        json={
            "email": invitee.email.upper(),
            "org_role": "org_member",
            "project_roles": [{"project_id": t.project_id, "role": "data_writer"}],
        },
        headers=t.headers,
    )
    assert r.status_code == 201, r.text
    inv = r.json()
    assert inv["id"].startswith("inv_") and inv["token"] and inv["email"] == invitee.email
    assert dt.datetime.fromisoformat(inv["expires_at"]) > dt.datetime.now(dt.UTC)

    # The email is really written (file backend) and carries the token.
    body = find_mail(invitee.email, "invited")
    assert inv["token"] in body
    token = re.search(r"invitations/(vi_[\w-]+)", body).group(1)  # type: ignore[union-attr]
    assert token == inv["token"]

    pending = (await client.get(f"/v1/orgs/{t.org_id}/invitations", headers=t.headers)).json()["items"]
    assert [i["id"] for i in pending] == [inv["id"]] and "token" not in pending[0]

    # Somebody else, logged in, cannot use it.
    stranger = await signup(client, tag="stranger", org_name=None)
    problem(
        await client.post(f"/v1/invitations/{token}/accept", headers=stranger.headers), 403, "invitation_email_mismatch"
    )
    problem(await client.post(f"/v1/invitations/{token}/accept"), 401)

    r = await client.post(f"/v1/invitations/{token}/accept", headers=invitee.headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"org_id": t.org_id, "org_role": "org_member"}
    me = (await client.get("/v1/me", headers=invitee.headers)).json()
    assert me["memberships"] == [{"org_id": t.org_id, "role": "org_member"}]
    assert (await client.get(f"/v1/projects/{t.project_id}", headers=invitee.headers)).status_code == 200
    members = (await client.get(f"/v1/orgs/{t.org_id}/members", headers=t.headers)).json()["items"]
    mine = next(m for m in members if m["user_id"] == invitee.user_id)
    assert mine["project_roles"] == [{"project_id": t.project_id, "role": "data_writer", "cluster_ids": None}]

    # Used: a second accept is refused, and it is no longer pending.
    problem(await client.post(f"/v1/invitations/{token}/accept", headers=invitee.headers), 409, "invitation_accepted")
    assert (await client.get(f"/v1/orgs/{t.org_id}/invitations", headers=t.headers)).json()["items"] == []


async def test_invitation_for_new_signup_and_errors(client: httpx.AsyncClient, app: Any) -> None:
    t = await signup(client)
    email = unique_email("newbie")
    inv = (await client.post(f"/v1/orgs/{t.org_id}/invitations", json={"email": email}, headers=t.headers)).json()
    # The invitee signs up (without an org of their own) and then accepts.
    newbie = await signup_as(client, email)
    r = await client.post(f"/v1/invitations/{inv['token']}/accept", headers=auth(newbie))
    assert r.status_code == 200 and r.json()["org_id"] == t.org_id

    # An unknown token, an expired one, a revoked one: not found.
    problem(await client.post("/v1/invitations/vi_nonsense/accept", headers=t.headers), 404, "invitation_not_found")
    email2 = unique_email("late")
    late = (await client.post(f"/v1/orgs/{t.org_id}/invitations", json={"email": email2}, headers=t.headers)).json()
    async with app.state.db.transaction() as session:
        await session.execute(
            update(Invitation)
            .where(Invitation.id == late["id"])
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    late_user = await signup_as(client, email2)
    problem(await client.post(f"/v1/invitations/{late['token']}/accept", headers=auth(late_user)), 404)
    assert late["id"] not in [
        i["id"] for i in (await client.get(f"/v1/orgs/{t.org_id}/invitations", headers=t.headers)).json()["items"]
    ]

    email3 = unique_email("revoked")
    rev = (await client.post(f"/v1/orgs/{t.org_id}/invitations", json={"email": email3}, headers=t.headers)).json()
    assert (await client.delete(f"/v1/invitations/{rev['id']}", headers=t.headers)).status_code == 204
    problem(
        await client.post(f"/v1/invitations/{rev['token']}/accept", headers=auth(await signup_as(client, email3))), 404
    )

    # Bad input.
    body = problem(
        await client.post(f"/v1/orgs/{t.org_id}/invitations", json={"email": "not-an-email"}, headers=t.headers), 400
    )
    assert body["code"] == "validation_error" and "email" in body["detail"]
    problem(
        await client.post(
            f"/v1/orgs/{t.org_id}/invitations", json={"email": unique_email(), "org_role": "boss"}, headers=t.headers
        ),
        422,
        "unknown_role",
    )
    problem(
        await client.post(
            f"/v1/orgs/{t.org_id}/invitations",
            json={"email": unique_email(), "project_roles": [{"project_id": "prj_nope", "role": "data_reader"}]},
            headers=t.headers,
        ),
        422,
        "project_not_found",
    )
    # Members cannot invite; other tenants cannot see the org.
    member = await add_member(client, t)
    problem(
        await client.post(f"/v1/orgs/{t.org_id}/invitations", json={"email": unique_email()}, headers=member.headers),
        403,
    )
    other = await signup(client, tag="other")
    problem(
        await client.post(f"/v1/orgs/{t.org_id}/invitations", json={"email": unique_email()}, headers=other.headers),
        404,
    )
    # Already a member.
    again = (
        await client.post(f"/v1/orgs/{t.org_id}/invitations", json={"email": member.email}, headers=t.headers)
    ).json()
    problem(
        await client.post(f"/v1/invitations/{again['token']}/accept", headers=member.headers), 409, "already_member"
    )


async def signup_as(client: httpx.AsyncClient, email: str) -> str:
    r = await client.post(
        "/v1/auth/signup", json={"email": email, "password": "correct horse battery staple", "name": "New"}
    )
    assert r.status_code == 201, r.text
    assert r.json()["org"] is None
    token: str = r.json()["access_token"]
    return token

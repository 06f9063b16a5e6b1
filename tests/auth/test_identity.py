from __future__ import annotations

import re

import httpx

from tests.conftest import PASSWORD, auth, find_mail, signup, unique_email


async def test_signup_login_me_refresh_logout(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    me = await client.get("/v1/me", headers=t.headers)
    assert me.status_code == 200
    assert me.json()["user"]["email"] == t.email
    assert me.json()["memberships"] == [{"org_id": t.org_id, "role": "org_owner"}]

    login = await client.post("/v1/auth/login", json={"email": t.email.upper(), "password": PASSWORD})
    assert login.status_code == 200, login.text
    pair = login.json()
    assert pair["token_type"] == "bearer" and pair["expires_in"] > 0

    r1 = await client.post("/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert r1.status_code == 200
    new = r1.json()
    assert new["refresh_token"] != pair["refresh_token"]
    assert (await client.get("/v1/me", headers=auth(new["access_token"]))).status_code == 200

    out = await client.post("/v1/auth/logout", headers=auth(new["access_token"]))
    assert out.status_code == 204
    assert (await client.get("/v1/me", headers=auth(new["access_token"]))).status_code == 401
    again = await client.post("/v1/auth/refresh", json={"refresh_token": new["refresh_token"]})
    assert again.status_code == 401


async def test_refresh_token_reuse_revokes_family(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    first = (await client.post("/v1/auth/refresh", json={"refresh_token": t.refresh_token})).json()
    # The spent token is presented again (a thief replaying it): the whole family ends.
    reuse = await client.post("/v1/auth/refresh", json={"refresh_token": t.refresh_token})
    assert reuse.status_code == 401
    assert reuse.json()["code"] == "refresh_token_reused"
    assert (await client.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})).status_code == 401
    assert (await client.get("/v1/me", headers=auth(first["access_token"]))).status_code == 401


async def test_login_throttled_without_revealing_accounts(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    ghost = unique_email("ghost")
    for email in (t.email, ghost):
        codes = []
        for _ in range(6):
            r = await client.post("/v1/auth/login", json={"email": email, "password": "wrong password!"})
            codes.append(r.status_code)
        assert codes == [401] * 5 + [429]
        assert int(r.headers["retry-after"]) > 0
        assert r.json()["code"] == "login_throttled"
    # Even the right password is refused while throttled.
    r = await client.post("/v1/auth/login", json={"email": t.email, "password": PASSWORD})
    assert r.status_code == 429


async def test_password_policy_and_duplicate_email(client: httpx.AsyncClient) -> None:
    short = await client.post(
        "/v1/auth/signup", json={"email": unique_email(), "password": "short", "name": "x", "org_name": "o"}
    )
    assert short.status_code == 422
    assert "password" in short.json()["detail"]
    t = await signup(client)
    dup = await client.post(
        "/v1/auth/signup", json={"email": t.email, "password": PASSWORD, "name": "x", "org_name": "o"}
    )
    assert dup.status_code == 409


async def test_email_verification(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    body = find_mail(t.email, "Verify")
    token = re.search(r"token=([\w-]+)", body).group(1)  # type: ignore[union-attr]
    r = await client.post("/v1/auth/verify-email", json={"token": token})
    assert r.status_code == 200 and r.json()["email_verified"] is True
    assert (await client.post("/v1/auth/verify-email", json={"token": token})).status_code == 400


async def test_password_reset(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    r = await client.post("/v1/auth/password-reset", json={"email": t.email})
    assert r.status_code == 202
    unknown = await client.post("/v1/auth/password-reset", json={"email": unique_email("nobody")})
    assert unknown.status_code == 202 and unknown.json() == r.json()
    token = re.search(r"token=([\w-]+)", find_mail(t.email, "Reset")).group(1)  # type: ignore[union-attr]
    new_password = "a brand new passphrase"
    ok = await client.post("/v1/auth/password-reset/confirm", json={"token": token, "new_password": new_password})
    assert ok.status_code == 204
    # Old sessions end; old password fails; new one works; the token is single-use.
    assert (await client.get("/v1/me", headers=t.headers)).status_code == 401
    assert (await client.post("/v1/auth/login", json={"email": t.email, "password": PASSWORD})).status_code == 401
    assert (await client.post("/v1/auth/login", json={"email": t.email, "password": new_password})).status_code == 200
    reuse = await client.post("/v1/auth/password-reset/confirm", json={"token": token, "new_password": "x" * 12})
    assert reuse.status_code == 400


def test_production_password_hashes_are_argon2id() -> None:
    from argon2 import PasswordHasher

    from services.auth import crypto

    # The module's own hasher (replaced by a cheap one for the rest of the suite) is argon2id with the library's
    # RFC 9106 defaults.
    real = PasswordHasher()
    digest = real.hash("a password of some length")
    assert digest.startswith("$argon2id$")
    assert crypto.verify_password(digest, "a password of some length")
    assert not crypto.verify_password(digest, "another password")
    assert not crypto.verify_password(None, "a password of some length")

"""Attacks on console session tokens: every forged, expired, misdirected or misused token is a 401."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import jwt
import pytest

from services.auth.tokens import ALGORITHM, AUDIENCE, ISSUER, decode_access_token
from services.core.settings import get_settings
from tests.conftest import Tenant, auth, signup


def _claims(t: Tenant) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(t.access_token, options={"verify_signature": False})
    return claims


def _sign(claims: dict[str, Any], key: str | None = None, algorithm: str = ALGORITHM) -> str:
    return jwt.encode(claims, key if key is not None else get_settings().secret("secret_key"), algorithm=algorithm)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _me(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.get("/v1/me", headers=auth(token))


def _assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == 401 and body["code"]
    assert "Traceback" not in r.text


async def test_a_correctly_signed_token_works(client: httpx.AsyncClient) -> None:
    """Control for the attacks below: the forging helper itself makes tokens the server accepts."""
    t = await signup(client)
    claims = _claims(t)
    assert claims["iss"] == ISSUER and claims["aud"] == AUDIENCE and claims["typ"] == "access"
    claims["jti"] = "re-signed"
    r = await _me(client, _sign(claims))
    assert r.status_code == 200, r.text
    assert r.json()["user"]["id"] == t.user_id


async def test_alg_none(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    claims = _claims(t)
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    for token in (f"{header}.{payload}.", f"{header}.{payload}"):
        _assert_401(await _me(client, token))
    # Same with the original signature left in place.
    _assert_401(await _me(client, f"{header}.{payload}.{t.access_token.split('.')[2]}"))


async def test_wrong_signing_key(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    _assert_401(await _me(client, _sign(_claims(t), key="not-the-server-key-" + "x" * 40)))


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
async def test_other_algorithm_with_the_right_key(client: httpx.AsyncClient, algorithm: str) -> None:
    t = await signup(client)
    _assert_401(await _me(client, _sign(_claims(t), algorithm=algorithm)))


async def test_expired(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    claims = _claims(t)
    now = int(time.time())
    claims.update(iat=now - 3600, nbf=now - 3600, exp=now - 60)
    r = await _me(client, _sign(claims))
    _assert_401(r)
    assert r.json()["code"] == "invalid_token"


async def test_not_yet_valid(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    claims = _claims(t)
    claims.update(nbf=int(time.time()) + 600)
    _assert_401(await _me(client, _sign(claims)))


@pytest.mark.parametrize(
    "change",
    [
        {"aud": "someone-else"},
        {"aud": ["someone-else"]},
        {"iss": "evil"},
        {"typ": "refresh"},
        {"typ": None},
        {"sid": None},
        {"sid": 42},
        {"sub": None},
        {"exp": None},
        {"iat": None},
        {"aud": None},
        {"iss": None},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
async def test_wrong_or_missing_claims(client: httpx.AsyncClient, change: dict[str, Any]) -> None:
    t = await signup(client)
    claims = _claims(t)
    for k, v in change.items():
        if v is None:
            claims.pop(k)
        else:
            claims[k] = v
    _assert_401(await _me(client, _sign(claims)))


async def test_tampered_payload(client: httpx.AsyncClient) -> None:
    victim = await signup(client, "victim")
    attacker = await signup(client, "attacker")
    header, _, signature = attacker.access_token.split(".")
    claims = _claims(attacker)
    claims["sub"] = victim.user_id  # become the victim, keeping the attacker's valid signature
    _assert_401(await _me(client, f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"))
    claims = _claims(attacker)
    claims["exp"] += 10**6  # extend the lifetime
    _assert_401(await _me(client, f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"))


async def test_correctly_signed_token_for_someone_elses_session(client: httpx.AsyncClient) -> None:
    """Even with the signing key, the session id must belong to the subject (defence in depth)."""
    victim = await signup(client, "victim")
    attacker = await signup(client, "attacker")
    claims = _claims(attacker)
    claims["sub"] = victim.user_id
    r = await _me(client, _sign(claims))
    _assert_401(r)
    claims = _claims(attacker)
    claims["sid"] = "ses_doesnotexist"
    _assert_401(await _me(client, _sign(claims)))


async def test_refresh_token_is_not_an_access_token(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    _assert_401(await _me(client, t.refresh_token))
    assert decode_access_token(t.refresh_token) is None


async def test_access_token_is_not_a_refresh_token(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    r = await client.post("/v1/auth/refresh", json={"refresh_token": t.access_token})
    _assert_401(r)
    # And the genuine refresh token still works afterwards (the failed attempt spent nothing).
    ok = await client.post("/v1/auth/refresh", json={"refresh_token": t.refresh_token})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        "eyJhbGciOiJIUzI1NiJ9.e30.",
        "x" * 5000,
        "vk_",
        "vk_abc_def",
        "vr_" + "A" * 43,
        "ünïcödé",
    ],
)
async def test_garbage_tokens(client: httpx.AsyncClient, token: str) -> None:
    _assert_401(await client.get("/v1/me", headers={"Authorization": f"Bearer {token}".encode()}))


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "bearer", "Bearerabc", ""],
)
async def test_malformed_authorization_header(client: httpx.AsyncClient, header: str) -> None:
    r = await client.get("/v1/me", headers={"Authorization": header})
    _assert_401(r)


async def test_malformed_header_with_a_valid_token(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    for header in (f"Basic {t.access_token}", f"Token {t.access_token}", t.access_token):
        _assert_401(await client.get("/v1/me", headers={"Authorization": header}))
    # The scheme is case-insensitive (RFC 6750 / RFC 9110), surrounding white space is tolerated.
    r = await client.get("/v1/me", headers={"Authorization": f"bearer  {t.access_token} "})
    assert r.status_code == 200, r.text


async def test_token_of_a_logged_out_session(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    assert (await _me(client, t.access_token)).status_code == 200  # warm the authenticator's cache
    other = await client.post(
        "/v1/auth/refresh", json={"refresh_token": t.refresh_token}
    )  # a second token of the same session
    assert other.status_code == 200
    second = other.json()["access_token"]
    assert (await _me(client, second)).status_code == 200
    assert (await client.post("/v1/auth/logout", headers=t.headers)).status_code == 204
    for token in (t.access_token, second):
        r = await _me(client, token)
        _assert_401(r)
        assert r.json()["code"] == "session_revoked"
    # Re-signing the logged-out session's claims with the real key does not bring it back.
    _assert_401(await _me(client, _sign(_claims(t) | {"jti": "again"})))


async def test_logout_of_one_session_leaves_the_others(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    from tests.conftest import PASSWORD

    login = await client.post("/v1/auth/login", json={"email": t.email, "password": PASSWORD})
    assert login.status_code == 200
    assert (await client.post("/v1/auth/logout", headers=t.headers)).status_code == 204
    assert (await _me(client, t.access_token)).status_code == 401
    assert (await _me(client, login.json()["access_token"])).status_code == 200

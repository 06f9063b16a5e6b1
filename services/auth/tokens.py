"""Console session access tokens: short-lived HS256 JWTs bound to a session (refresh-token family).

Decoding pins the algorithm, issuer and audience and requires every claim we rely on, so ``alg: none``, a foreign
signing key, an expired or tampered token, or a token minted for another audience all fail the same way.
Refresh tokens are not JWTs: they are opaque random strings stored only as HMACs, so one can never pass as an
access token.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import jwt

from services.core.settings import get_settings

ISSUER = "vecta"
AUDIENCE = "vecta-api"
ALGORITHM = "HS256"


@dataclass(frozen=True)
class AccessClaims:
    user_id: str
    session_id: str
    issued_at: int
    expires_at: int


def issue_access_token(user_id: str, session_id: str) -> tuple[str, int]:
    settings = get_settings()
    now = int(time.time())
    ttl = settings.access_token_ttl_seconds
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": user_id,
        "sid": session_id,
        "typ": "access",
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(payload, settings.secret("secret_key"), algorithm=ALGORITHM), ttl


def decode_access_token(token: str) -> AccessClaims | None:
    try:
        payload = jwt.decode(
            token,
            get_settings().secret("secret_key"),
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            leeway=5,
        )
    except jwt.PyJWTError:
        return None
    if payload.get("typ") != "access" or not isinstance(payload.get("sid"), str):
        return None
    if not isinstance(payload.get("sub"), str):
        return None
    return AccessClaims(payload["sub"], payload["sid"], int(payload["iat"]), int(payload["exp"]))

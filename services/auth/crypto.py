"""Secret material: password hashing (argon2id), token hashing (HMAC-SHA256 with a server-side pepper), and the
API-key format ``vk_<key-id>_<secret>`` whose last six characters are a checksum of the rest, so a mistyped or
forged key is rejected without touching the database."""

from __future__ import annotations

import hmac
import secrets
import zlib
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from services.core.settings import get_settings

_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile
# A hash of a random password: verifying against it costs what a real verification costs, so a login for an
# unknown email takes as long as one for a known email.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)


_pepper: tuple[object, bytes] | None = None  # (the settings object it was read from, the pepper)


def token_hash(secret: str) -> str:
    """HMAC-SHA256 under the pepper. Runs on every authenticated request (the credential cache is keyed by it),
    so the pepper is looked up once per settings object, not per call."""
    global _pepper
    settings = get_settings()
    if _pepper is None or _pepper[0] is not settings:
        _pepper = (settings, settings.secret("api_key_pepper").encode())
    return hmac.digest(_pepper[1], secret.encode(), "sha256").hex()  # one-shot: C all the way


def random_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_ALNUM[r])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), 6)


@dataclass(frozen=True)
class ParsedKey:
    key_id: str  # "key_…"
    secret: str  # the part after the id, checksum included


def make_api_key(key_id: str) -> str:
    assert key_id.startswith("key_")
    secret = "".join(secrets.choice(_ALNUM) for _ in range(40))
    body = f"vk_{key_id.removeprefix('key_')}_{secret}"
    return body + _checksum(body)


def parse_api_key(token: str) -> ParsedKey | None:
    if not token.startswith("vk_") or len(token) > 120:
        return None
    parts = token.split("_")
    if len(parts) != 3 or not parts[1] or len(parts[2]) != 46:
        return None
    body, check = token[:-6], token[-6:]
    if not hmac.compare_digest(_checksum(body), check):
        return None
    return ParsedKey(key_id="key_" + parts[1], secret=parts[2])


def key_prefix(token: str) -> str:
    """What lists show to recognize a key: the id part and the first characters of the secret."""
    parsed = parse_api_key(token)
    assert parsed is not None
    return token[: len("vk_") + len(parsed.key_id) - len("key_") + 1 + 4]

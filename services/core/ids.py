"""Opaque, type-prefixed, roughly time-ordered identifiers (``org_…``, ``usr_…``, ``key_…``).

Ten characters of millisecond timestamp in Crockford base32 followed by 16 random characters: sorting by id is
sorting by creation time, which keyset pagination relies on.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"

PREFIXES = frozenset(
    {
        "org",
        "idk",
        "prj",
        "usr",
        "key",
        "job",
        "bkp",
        "ek",
        "cl",
        "inv",
        "role",
        "rb",
        "ses",
        "rt",
        "aud",
        "mail",
        "ott",
    }
)


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    if prefix not in PREFIXES:
        raise ValueError(f"unknown id prefix {prefix!r}")
    ts = _b32(time.time_ns() // 1_000_000, 10)
    rnd = "".join(secrets.choice(_ALPHABET) for _ in range(16))
    return f"{prefix}_{ts}{rnd}"


def has_prefix(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "_") and len(value) == len(prefix) + 27

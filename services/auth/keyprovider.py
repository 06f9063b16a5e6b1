"""Envelope encryption: key providers wrap per-cluster data keys under a key-encryption key.

``local`` (the embedded default) keeps a 32-byte master key in ``VECTA_HOME/secrets/master.key`` (mode 0600) and
wraps with AES-256-GCM, the encryption context (org and cluster ids) bound as associated data, so a wrapped key
copied onto another cluster's row does not unwrap. The AWS KMS provider (customer-managed keys) implements the
same protocol. Plaintext data keys exist only in memory.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.core.settings import get_settings

_VERSION = b"\x01"


class KeyUnavailable(Exception):
    """The key-encryption key cannot be used (disabled, deleted, unreachable) or the wrapped key is invalid."""


@dataclass(frozen=True)
class KeyState:
    usable: bool
    state: Literal["enabled", "disabled", "pending_deletion", "unreachable"]
    version: str


class KeyProvider(Protocol):
    name: str

    def generate_data_key(self, context: dict[str, str]) -> tuple[bytes, bytes]:
        """A fresh 32-byte data key: (plaintext, wrapped)."""

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes: ...

    def describe(self) -> KeyState: ...


def _aad(context: dict[str, str]) -> bytes:
    return json.dumps(context, sort_keys=True, separators=(",", ":")).encode()


class LocalKeyProvider:
    name = "local"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._aead = AESGCM(_load_or_create(path))

    def generate_data_key(self, context: dict[str, str]) -> tuple[bytes, bytes]:
        key = secrets.token_bytes(32)
        return key, self.wrap(key, context)

    def wrap(self, plaintext: bytes, context: dict[str, str]) -> bytes:
        nonce = secrets.token_bytes(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, _aad(context))

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes:
        if not wrapped.startswith(_VERSION) or len(wrapped) < 1 + 12 + 16:
            raise KeyUnavailable("wrapped key has an unknown format")
        try:
            return self._aead.decrypt(wrapped[1:13], wrapped[13:], _aad(context))
        except InvalidTag:
            raise KeyUnavailable("wrapped key does not belong to this master key or context") from None

    def describe(self) -> KeyState:
        return KeyState(usable=True, state="enabled", version="1")


def _load_or_create(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            data = path.read_bytes()
        else:
            data = secrets.token_bytes(32)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
    if len(data) != 32:
        raise KeyUnavailable(f"{path} does not hold a 32-byte key")
    return data


@lru_cache(maxsize=4)
def local_provider(path: Path | None = None) -> LocalKeyProvider:
    return LocalKeyProvider(path or get_settings().secrets_dir / "master.key")

"""Which key provider wraps what: one version of one encryption key, resolved to a ``KeyProvider``.

Everything here that calls a provider is synchronous (boto3 for AWS KMS); async callers load a ``KeyRef`` with
``load_ref`` and run the provider calls in a worker thread. A ``KeyRef`` is plain data, so it crosses threads and
outlives its session.

Kinds of key:

* ``local``: the deployment's master key itself (``LocalKeyProvider``). Only clusters and backups made before
  encryption keys existed have it (no key id); engine tokens are always wrapped by it.
* ``managed``: a key Vecta holds for a project. Each version is a random 32-byte key-encryption key, stored in
  ``encryption_key_versions.material_wrapped`` wrapped by the master key (bound to org, key id and version);
  data keys are wrapped under it with AES-256-GCM, the encryption context bound as associated data.
* ``aws-kms``: the customer's key in AWS KMS (``AwsKmsKeyProvider``), through their role and the organization's
  external id when ``role_arn`` is set.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.auth.keyprovider import (
    AesGcmKeyProvider,
    AwsKmsKeyProvider,
    KeyProvider,
    KeyState,
    KeyUnavailable,
    local_provider,
)
from services.control_plane.keys.models import EncryptionKey, EncryptionKeyVersion
from services.control_plane.models import Organization


@dataclass(frozen=True)
class KeyRef:
    """One version of one key: what building its provider needs (no plaintext)."""

    key_id: str | None  # None: the deployment's master key (``local``)
    org_id: str
    provider: str  # local | managed | aws-kms
    version: int | None = None
    key_arn: str | None = None
    role_arn: str | None = None
    external_id: str | None = None
    material_wrapped: bytes | None = None

    @property
    def version_label(self) -> str:
        return str(self.version) if self.version is not None else "local"


LOCAL = "local"


def local_ref(org_id: str) -> KeyRef:
    return KeyRef(key_id=None, org_id=org_id, provider=LOCAL)


class ManagedKeyProvider(AesGcmKeyProvider):
    """A Vecta-managed key version: AES-256-GCM under that version's key-encryption key."""

    name = "managed"
    prefix = b"\x03"

    def __init__(self, kek: bytes, version: int) -> None:
        super().__init__(kek, str(version))


def material_context(org_id: str, key_id: str, version: int) -> dict[str, str]:
    return {"org_id": org_id, "key_id": key_id, "version": str(version), "use": "key_encryption_key"}


def new_managed_material(org_id: str, key_id: str, version: int) -> bytes:
    """A fresh key-encryption key for a managed key version, wrapped by the master key (what the row stores)."""
    return local_provider().wrap(secrets.token_bytes(32), material_context(org_id, key_id, version))


_cache: dict[tuple[Any, ...], Any] = {}
_cache_lock = threading.Lock()


def provider_for(ref: KeyRef) -> Any:
    """The provider for ``ref`` (cached per process: boto3 clients take tens of ms to build, and a managed key's
    KEK is unwrapped once). Raises KeyUnavailable for a managed version whose material is gone (key deleted)."""
    if ref.provider == LOCAL:
        return local_provider()
    if ref.provider == "managed":
        if ref.material_wrapped is None or ref.key_id is None or ref.version is None:
            raise KeyUnavailable(f"encryption key {ref.key_id} version {ref.version} no longer exists")
        ck: tuple[Any, ...] = ("managed", ref.key_id, ref.version, ref.material_wrapped)
    elif ref.provider == "aws-kms":
        if not ref.key_arn:
            raise KeyUnavailable(f"encryption key {ref.key_id} version {ref.version} names no AWS KMS key")
        ck = ("aws-kms", ref.key_arn, ref.role_arn, ref.external_id)
    else:
        raise KeyUnavailable(f"unknown key provider {ref.provider!r}")
    with _cache_lock:
        hit = _cache.get(ck)
    if hit is not None:
        return hit
    made: KeyProvider
    if ref.provider == "managed":
        assert ref.key_id is not None and ref.version is not None and ref.material_wrapped is not None
        kek = local_provider().unwrap(ref.material_wrapped, material_context(ref.org_id, ref.key_id, ref.version))
        made = ManagedKeyProvider(kek, ref.version)
    else:
        assert ref.key_arn is not None
        made = AwsKmsKeyProvider(ref.key_arn, role_arn=ref.role_arn, external_id=ref.external_id)
    with _cache_lock:
        if len(_cache) > 1000:
            _cache.clear()
        return _cache.setdefault(ck, made)


def describe(ref: KeyRef) -> KeyState:
    try:
        return provider_for(ref).describe()
    except KeyUnavailable:
        return KeyState(usable=False, state="unreachable", version="")


def unwrap(ref: KeyRef, wrapped: bytes, context: dict[str, str]) -> bytes:
    return provider_for(ref).unwrap(wrapped, context)


def wrap(ref: KeyRef, plaintext: bytes, context: dict[str, str]) -> bytes:
    return provider_for(ref).wrap(plaintext, context)


def generate(ref: KeyRef, context: dict[str, str]) -> tuple[bytes, bytes]:
    return provider_for(ref).generate_data_key(context)


# -- loading refs ---------------------------------------------------------------------------------------------
def _ref_stmt(key_id: str, version: int | None) -> Any:
    stmt = (
        select(EncryptionKey, EncryptionKeyVersion, Organization.kms_external_id)
        .join(EncryptionKeyVersion, EncryptionKeyVersion.key_id == EncryptionKey.id)
        .join(Organization, Organization.id == EncryptionKey.org_id)
        .where(EncryptionKey.id == key_id)
    )
    if version is None:
        return stmt.where(EncryptionKeyVersion.version == EncryptionKey.current_version)
    return stmt.where(EncryptionKeyVersion.version == version)


def _to_ref(row: Any, key_id: str, version: int | None) -> KeyRef:
    if row is None:
        raise KeyUnavailable(f"encryption key {key_id} version {version} not found")
    key, ver, external_id = row
    return KeyRef(
        key_id=key.id,
        org_id=key.org_id,
        provider=key.provider,
        version=ver.version,
        key_arn=ver.key_arn,
        role_arn=ver.role_arn,
        external_id=external_id,
        material_wrapped=ver.material_wrapped,
    )


def load_ref_sync(s: Session, key_id: str | None, version: int | None, org_id: str) -> KeyRef:
    """The ref of ``key_id`` at ``version`` (None: its current version); ``key_id`` None: the master key."""
    if key_id is None:
        return local_ref(org_id)
    return _to_ref(s.execute(_ref_stmt(key_id, version)).first(), key_id, version)


async def load_ref(session: Any, key_id: str | None, version: int | None, org_id: str) -> KeyRef:
    if key_id is None:
        return local_ref(org_id)
    return _to_ref((await session.execute(_ref_stmt(key_id, version))).first(), key_id, version)

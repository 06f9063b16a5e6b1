"""Envelope encryption: key providers wrap per-cluster data keys under a key-encryption key.

``local`` (the embedded default) keeps a 32-byte master key in ``VECTA_HOME/secrets/master.key`` (mode 0600) and
wraps with AES-256-GCM, the encryption context (org and cluster ids) bound as associated data, so a wrapped key
copied onto another cluster's row does not unwrap. ``aws-kms`` (``AwsKmsKeyProvider``: Vecta's key or a
customer-managed key reached through ``sts:AssumeRole`` with the organization's external id) implements the same
protocol. Plaintext data keys exist only in memory.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.core.settings import get_settings

_VERSION = b"\x01"


class KeyUnavailable(Exception):
    """The key-encryption key cannot be used (disabled, deleted, unreachable) or the wrapped key is invalid.
    ``transient``: the provider could not be reached or throttled us (worth retrying; a 503, not a 409)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class KeyState:
    usable: bool
    state: Literal["enabled", "disabled", "pending_deletion", "unreachable"]
    version: str
    reason: str = ""  # why it is not usable (the provider's error), for status_reason and audit rows
    transient: bool = False  # unusable because the provider could not be asked (network, throttling, outage)


class KeyProvider(Protocol):
    name: str

    def generate_data_key(self, context: dict[str, str]) -> tuple[bytes, bytes]:
        """A fresh 32-byte data key: (plaintext, wrapped)."""

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes: ...

    def describe(self) -> KeyState: ...


def _aad(context: dict[str, str]) -> bytes:
    return json.dumps(context, sort_keys=True, separators=(",", ":")).encode()


class AesGcmKeyProvider:
    """Wraps data keys with AES-256-GCM under a key-encryption key held in memory, the encryption context bound
    as associated data. Format: the provider's ``prefix`` byte, nonce (12), ciphertext and tag."""

    name = "aes-gcm"
    prefix = b"\x00"

    def __init__(self, kek: bytes, version: str) -> None:
        self._aead = AESGCM(kek)
        self._version = version

    def generate_data_key(self, context: dict[str, str]) -> tuple[bytes, bytes]:
        key = secrets.token_bytes(32)
        return key, self.wrap(key, context)

    def wrap(self, plaintext: bytes, context: dict[str, str]) -> bytes:
        nonce = secrets.token_bytes(12)
        return self.prefix + nonce + self._aead.encrypt(nonce, plaintext, _aad(context))

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes:
        if not wrapped.startswith(self.prefix) or len(wrapped) < 1 + 12 + 16:
            raise KeyUnavailable(f"wrapped key was not made by the {self.name} key provider")
        try:
            return self._aead.decrypt(wrapped[1:13], wrapped[13:], _aad(context))
        except InvalidTag:
            raise KeyUnavailable(f"wrapped key does not belong to this {self.name} key or context") from None

    def describe(self) -> KeyState:
        return KeyState(usable=True, state="enabled", version=self._version)


class LocalKeyProvider(AesGcmKeyProvider):
    """The deployment's master key, from its file."""

    name = "local"
    prefix = _VERSION

    def __init__(self, path: Path) -> None:
        self._path = path
        super().__init__(_load_or_create(path), "1")


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


# ---------------------------------------------------------------------------------------------------------- AWS KMS
_KMS_VERSION = b"\x02"  # wrapped by AWS KMS: the byte, then KMS's CiphertextBlob
_KMS_STATES: dict[str, Literal["enabled", "disabled", "pending_deletion"]] = {
    "Enabled": "enabled",
    "Disabled": "disabled",
    "PendingDeletion": "pending_deletion",
    "PendingReplicaDeletion": "pending_deletion",
}


_TRANSIENT_CODES = frozenset(
    {"ThrottlingException", "KMSInternalException", "DependencyTimeoutException", "RequestLimitExceeded",
     "ServiceUnavailable", "InternalFailure"}
)  # fmt: skip


def new_external_id() -> str:
    """The ``sts:ExternalId`` Vecta asks a customer to require in the trust policy of the role it assumes (one per
    organization, so another Vecta customer cannot name the same role: the confused-deputy guard)."""
    return "vecta-" + secrets.token_urlsafe(24)


class AwsKmsKeyProvider:
    """A key-encryption key in AWS KMS: Vecta's own key, or a customer-managed key (CMEK) reached by assuming the
    customer's role with the organization's external id. Data keys come from ``GenerateDataKey`` with the org and
    cluster ids as the encryption context (KMS then refuses to decrypt them under any other context).

    KMS's own state is checked before every unwrap (``DescribeKey``): a disabled key, a key scheduled for deletion
    or a key Vecta can no longer reach unwraps nothing, whatever the endpoint would do with the ``Decrypt`` call
    (moto's server, for one, does not enforce key state). Every call has connect/read timeouts and bounded retries;
    failures are ``KeyUnavailable`` naming the AWS error, never a hang."""

    name = "aws-kms"

    def __init__(
        self,
        key_arn: str,
        *,
        region: str | None = None,
        role_arn: str | None = None,
        external_id: str | None = None,
        endpoint_url: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        attempts: int = 3,
    ) -> None:
        import boto3
        from botocore.config import Config

        if role_arn and not external_id:
            raise ValueError("assuming a customer's role needs the organization's external id")
        self.key_arn = key_arn
        self._role_arn = role_arn
        self._external_id = external_id
        self._region = region or _region_of(key_arn)
        self._endpoint = endpoint_url  # None: boto3's own resolution (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_KMS, AWS)
        self._config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": attempts, "mode": "standard"},
        )
        self._session = boto3.session.Session()
        self._kms: object | None = None
        self._kms_expires = 0.0
        self._lock = threading.Lock()

    # -- clients ------------------------------------------------------------------------------------------------
    def _client(self) -> Any:
        with self._lock:
            now = time.time()
            if self._kms is not None and now < self._kms_expires:
                return self._kms
            creds: dict[str, Any] = {}
            expires = float("inf")
            if self._role_arn:
                sts = self._session.client("sts", region_name=self._region, config=self._config)
                got = sts.assume_role(
                    RoleArn=self._role_arn,
                    RoleSessionName="vecta-cmek",
                    ExternalId=self._external_id,
                    DurationSeconds=900,
                )["Credentials"]
                creds = {
                    "aws_access_key_id": got["AccessKeyId"],
                    "aws_secret_access_key": got["SecretAccessKey"],
                    "aws_session_token": got["SessionToken"],
                }
                expires = got["Expiration"].timestamp() - 60  # renewed a minute early
            kwargs: dict[str, Any] = {"region_name": self._region, "config": self._config, **creds}
            if self._endpoint:
                kwargs["endpoint_url"] = self._endpoint
            self._kms = self._session.client("kms", **kwargs)
            self._kms_expires = expires
            return self._kms

    def _call(self, what: str, fn: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(self._client())
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "Unknown")
            msg = exc.response.get("Error", {}).get("Message", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            transient = code in _TRANSIENT_CODES or status >= 500
            raise KeyUnavailable(
                f"AWS KMS {what} of {self.key_arn} failed: {code}: {msg}".rstrip(": "), transient=transient
            ) from None
        except BotoCoreError as exc:  # endpoint unreachable, timeouts, bad credentials chain, ...
            raise KeyUnavailable(
                f"AWS KMS {what} of {self.key_arn} failed: {type(exc).__name__}: {exc}", transient=True
            ) from None

    # -- KeyProvider ---------------------------------------------------------------------------------------------
    def describe(self) -> KeyState:
        try:
            meta = self._call("DescribeKey", lambda kms: kms.describe_key(KeyId=self.key_arn))["KeyMetadata"]
        except KeyUnavailable as exc:
            return KeyState(usable=False, state="unreachable", version="", reason=str(exc), transient=exc.transient)
        state = _KMS_STATES.get(meta.get("KeyState", ""), "disabled")  # Creating, Unavailable, ...: not usable
        reason = "" if state == "enabled" else f"AWS KMS key {self.key_arn} is {meta.get('KeyState', 'not usable')}"
        return KeyState(usable=state == "enabled", state=state, version=meta.get("KeyId", ""), reason=reason)

    def _require_usable(self) -> None:
        st = self.describe()
        if not st.usable:
            raise KeyUnavailable(
                f"AWS KMS key {self.key_arn} is {st.state.replace('_', ' ')}"
                + (f" ({st.reason})" if st.state == "unreachable" and st.reason else ""),
                transient=st.transient,
            )

    def generate_data_key(self, context: dict[str, str]) -> tuple[bytes, bytes]:
        self._require_usable()
        got = self._call(
            "GenerateDataKey",
            lambda kms: kms.generate_data_key(KeyId=self.key_arn, KeySpec="AES_256", EncryptionContext=context),
        )
        return got["Plaintext"], _KMS_VERSION + got["CiphertextBlob"]

    def wrap(self, plaintext: bytes, context: dict[str, str]) -> bytes:
        """Re-wrap an existing data key under this key (rotation to a new key: no data is rewritten)."""
        self._require_usable()
        got = self._call(
            "Encrypt",
            lambda kms: kms.encrypt(KeyId=self.key_arn, Plaintext=plaintext, EncryptionContext=context),
        )
        return _KMS_VERSION + got["CiphertextBlob"]

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes:
        if not wrapped.startswith(_KMS_VERSION) or len(wrapped) < 2:
            raise KeyUnavailable("wrapped key was not made by AWS KMS")
        self._require_usable()
        got = self._call(
            "Decrypt",
            lambda kms: kms.decrypt(CiphertextBlob=wrapped[1:], EncryptionContext=context, KeyId=self.key_arn),
        )
        key = got["Plaintext"]
        if len(key) != 32:
            raise KeyUnavailable("AWS KMS returned a data key that is not 32 bytes")
        return key


def _region_of(arn: str) -> str | None:
    parts = arn.split(":")  # arn:aws:kms:<region>:<account>:key/<id>
    return parts[3] if len(parts) > 4 and parts[0] == "arn" and parts[3] else None

"""The AWS KMS key provider (customer-managed keys, issue 5's first part) against moto's KMS and STS in server mode
on loopback (AWS_ENDPOINT_URL pointing at it): data keys bound to their encryption context, the key's state checked
by Vecta itself before every unwrap (moto does not enforce it on Decrypt), the customer's key reached through
sts:AssumeRole with an external id, and an unreachable endpoint failing fast with a clear error."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from services.auth.keyprovider import AwsKmsKeyProvider, KeyUnavailable, LocalKeyProvider, new_external_id
from tests.awskit import moto_server

CTX = {"org_id": "org_1", "cluster_id": "cl_1"}


@pytest.fixture(scope="module")
def aws() -> Iterator[str]:
    with moto_server() as endpoint:  # AWS_ENDPOINT_URL: KMS and STS
        yield endpoint


@pytest.fixture
def kms(aws: str) -> Any:
    return boto3.client("kms", region_name="us-east-1")


@pytest.fixture
def key_arn(kms: Any) -> str:
    return kms.create_key(Description="customer key")["KeyMetadata"]["Arn"]


def test_data_keys_round_trip_and_are_bound_to_their_context(key_arn: str) -> None:
    p = AwsKmsKeyProvider(key_arn)
    plain, wrapped = p.generate_data_key(CTX)
    assert len(plain) == 32 and plain not in wrapped
    assert p.unwrap(wrapped, CTX) == plain
    with pytest.raises(KeyUnavailable, match="Decrypt"):
        p.unwrap(wrapped, {**CTX, "cluster_id": "cl_2"})  # another cluster's row
    st = p.describe()
    assert st.usable and st.state == "enabled" and st.version and st.version in key_arn
    # re-wrapping the same data key (rotation to another key) gives a blob that unwraps to it
    assert p.unwrap(p.wrap(plain, CTX), CTX) == plain


def test_a_disabled_or_deleted_key_unwraps_nothing_until_enabled(kms: Any, key_arn: str) -> None:
    p = AwsKmsKeyProvider(key_arn)
    plain, wrapped = p.generate_data_key(CTX)
    key_id = key_arn.rsplit("/", 1)[1]  # moto's admin calls take the id
    kms.disable_key(KeyId=key_id)
    assert p.describe().state == "disabled" and not p.describe().usable
    with pytest.raises(KeyUnavailable, match="disabled"):
        p.unwrap(wrapped, CTX)  # moto's Decrypt would still answer: Vecta checks the state itself
    with pytest.raises(KeyUnavailable, match="disabled"):
        p.generate_data_key(CTX)
    kms.enable_key(KeyId=key_id)
    assert p.unwrap(wrapped, CTX) == plain
    kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    assert p.describe().state == "pending_deletion"
    with pytest.raises(KeyUnavailable, match="pending deletion"):
        p.unwrap(wrapped, CTX)
    kms.cancel_key_deletion(KeyId=key_id)  # AWS leaves a cancelled key disabled
    kms.enable_key(KeyId=key_id)
    assert p.unwrap(wrapped, CTX) == plain


def test_a_customer_key_through_an_assumed_role(key_arn: str) -> None:
    ext = new_external_id()
    assert ext.startswith("vecta-") and len(ext) > 30 and ext != new_external_id()
    role = "arn:aws:iam::123456789012:role/vecta-cmek"
    p = AwsKmsKeyProvider(key_arn, role_arn=role, external_id=ext)
    plain, wrapped = p.generate_data_key(CTX)
    assert p.unwrap(wrapped, CTX) == plain
    assert p._kms_expires < float("inf")  # temporary credentials, renewed before they expire
    with pytest.raises(ValueError, match="external id"):
        AwsKmsKeyProvider(key_arn, role_arn=role)


def test_an_unreachable_endpoint_fails_fast_and_says_so(key_arn: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes
    p = AwsKmsKeyProvider(key_arn, endpoint_url=dead, connect_timeout=0.5, read_timeout=0.5, attempts=2)
    t0 = time.monotonic()
    st = p.describe()
    assert st.state == "unreachable" and not st.usable
    with pytest.raises(KeyUnavailable, match="unreachable"):
        p.unwrap(b"\x02blob", CTX)
    assert time.monotonic() - t0 < 10


def test_keys_wrapped_by_another_provider_are_refused(tmp_path: Any, key_arn: str) -> None:
    _, local_wrapped = LocalKeyProvider(tmp_path / "master.key").generate_data_key(CTX)
    with pytest.raises(KeyUnavailable, match="not made by AWS KMS"):
        AwsKmsKeyProvider(key_arn).unwrap(local_wrapped, CTX)

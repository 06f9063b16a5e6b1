"""Encryption keys (issue 5) through the public API, against moto's KMS and STS in server mode on loopback
(AWS_ENDPOINT_URL pointing at it) and real engine processes; on SQLite and, with VECTA_TEST_DATABASE_URL, on
PostgreSQL.

A cluster under a customer-managed key: write and search; rotate, restart the engine, read everything back; disable
the key, the key check suspends the cluster and its data-plane calls fail with the reason; enable it, the same
results come back; the database and the data dir hold no plaintext data key; a backup taken under version 1
restores after rotation to version 2; a re-key replaces the data key while the cluster serves.
"""

from __future__ import annotations

import base64
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import inspect, select, text

from services.auth.keyprovider import KeyState
from services.control_plane.clusters import tasks
from services.control_plane.keys import ring
from services.control_plane.keys import tasks as key_tasks
from services.control_plane.keys.clusterkeys import sealed_keys
from services.control_plane.provisioners.local import LocalProvisioner
from services.core.audit import AuditLog
from services.core.db import get_database
from tests.awskit import moto_server
from tests.clusterkit import (
    alive,
    cluster_row,
    create_cluster,
    dp,
    engine_pids,
    insert_cluster,
    ok,
    records,
    unique_name,
)
from tests.conftest import add_member, signup

DIM = 8
ROLE = "arn:aws:iam::123456789012:role/vecta-cmek"


@pytest.fixture(scope="module")
def kms() -> Iterator[Any]:
    with moto_server():  # AWS_ENDPOINT_URL: KMS and STS
        yield boto3.client("kms", region_name="us-east-1")


def new_kms_key(kms: Any) -> tuple[str, str]:
    meta = kms.create_key(Description="customer key")["KeyMetadata"]
    return meta["Arn"], meta["KeyId"]  # moto's admin calls (disable, enable) take the id


async def search_all(client: httpx.AsyncClient, h: dict[str, str], cid: str, recs: list[dict[str, Any]]) -> list:
    out = []
    for rec in recs[::7]:
        r = ok(await client.post(dp(cid, "/docs/search"), json={"vector": rec["vector"], "top_k": 5}, headers=h))
        out.append([(x["id"], round(x["score"], 5)) for x in r["results"]])
    fetched = ok(await client.post(dp(cid, "/docs/fetch"), json={"ids": [r["id"] for r in recs]}, headers=h))
    out.append(sorted((r["id"], tuple(round(v, 5) for v in r["vector"])) for r in fetched["records"]))
    return out


def engine_pid(cluster_id: str) -> int:
    """The primary's pid (read replicas live under ``<data dir>.replicas``, which the prefix match also finds)."""
    pids = [p for p in engine_pids(LocalProvisioner().data_dir(cluster_id))
            if b"--replica-of" not in Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
    assert len(pids) == 1, pids
    return pids[0]


def kill_engine(cluster_id: str) -> None:
    """SIGKILL the engine: the next heartbeat starts it again, unwrapping the data key afresh."""
    pid = engine_pid(cluster_id)
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not alive(pid):
            break
        import time

        time.sleep(0.02)
    assert tasks.heartbeat(cluster_id) == "restarted"


def plaintext_keys(app: FastAPI, cluster_id: str) -> list[bytes]:
    with get_database().sync_transaction() as s:
        from services.control_plane.clusters.models import Cluster

        c = s.get(Cluster, cluster_id)
        assert c is not None
        current, previous = sealed_keys(s, c).open()
    return [current, *previous]


def assert_no_plaintext(app: FastAPI, cluster_id: str, keys: list[bytes]) -> None:
    """Neither the database (every column of every row, as the driver returns it) nor the data dir hold a data
    key in the clear or in base64; nor does the engine's command line or environment."""
    needles = [k for key in keys for k in (key, base64.b64encode(key), key.hex().encode())]
    with get_database().sync_transaction() as s:
        tables = inspect(s.connection()).get_table_names()
        for table in tables:
            for row in s.execute(text(f'SELECT * FROM "{table}"')).all():
                for value in row:
                    blob = value if isinstance(value, bytes | memoryview) else str(value).encode()
                    blob = bytes(blob)
                    assert not any(n in blob for n in needles), f"plaintext data key in table {table}"
    root = LocalProvisioner().data_dir(cluster_id)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for p in files:
        data = p.read_bytes()
        assert not any(n in data for n in needles), f"plaintext data key in {p}"
    pid = engine_pid(cluster_id)
    for what in ("cmdline", "environ"):
        data = Path(f"/proc/{pid}/{what}").read_bytes()
        assert not any(n in data for n in needles), f"data key in the engine's {what}"


async def test_key_api_contract(client: httpx.AsyncClient, app: FastAPI, kms: Any) -> None:
    owner = await signup(client, "keys-api", "Keys API Org")
    other = await signup(client, "keys-api-other", "Other Keys Org")
    h, base = owner.headers, f"/v1/projects/{owner.project_id}/encryption-keys"

    managed = ok(await client.post(base, json={"provider": "managed"}, headers=h), 201)
    assert managed["provider"] == "managed" and managed["current_version"] == 1 and managed["status"] == "ENABLED"
    assert managed["key_arn"] is None and managed["external_id"] is None and not managed["is_default"]

    # bad bodies name the problem
    for body, word in [
        ({"provider": "aws-kms"}, "key_arn"),
        ({"provider": "aws-kms", "key_arn": "alias/mine"}, "key_arn"),
        ({"provider": "managed", "key_arn": new_kms_key(kms)[0]}, "key_arn"),
        ({"provider": "gcp-kms"}, "provider"),
        ({"provider": "aws-kms", "key_arn": new_kms_key(kms)[0], "role_arn": "arn:aws:iam::1:role/x"}, "role_arn"),
    ]:
        r = await client.post(base, json=body, headers=h)
        assert r.status_code == 400 and word in r.text, (body, r.status_code, r.text)

    # a key Vecta cannot use is refused at registration, naming why
    arn, key_id = new_kms_key(kms)
    kms.disable_key(KeyId=key_id)
    r = await client.post(base, json={"provider": "aws-kms", "key_arn": arn}, headers=h)
    assert r.status_code == 422 and r.json()["code"] == "encryption_key_unusable" and "Disabled" in r.text, r.text
    missing = arn.rsplit("/", 1)[0] + "/00000000-0000-0000-0000-000000000000"
    r = await client.post(base, json={"provider": "aws-kms", "key_arn": missing}, headers=h)
    assert r.status_code == 422 and "NotFound" in r.text, r.text
    kms.enable_key(KeyId=key_id)

    # the organization's external id, for the role's trust policy; the same in the key that uses a role
    setup = ok(await client.get(f"{base}/aws-setup", headers=h))
    assert setup["external_id"].startswith("vecta-")
    assert setup["trust_policy_condition"] == {"StringEquals": {"sts:ExternalId": setup["external_id"]}}
    cmek = ok(await client.post(base, json={"provider": "aws-kms", "key_arn": arn, "role_arn": ROLE}, headers=h), 201)
    assert cmek["key_arn"] == arn and cmek["role_arn"] == ROLE and cmek["external_id"] == setup["external_id"]
    other_setup = ok(await client.get(f"/v1/projects/{other.project_id}/encryption-keys/aws-setup",
                                      headers=other.headers))  # fmt: skip
    assert other_setup["external_id"] != setup["external_id"]

    listed = ok(await client.get(base, headers=h))
    assert {k["id"] for k in listed["items"]} == {managed["id"], cmek["id"]}
    assert ok(await client.get(f"/v1/encryption-keys/{cmek['id']}", headers=h))["versions"][0]["key_arn"] == arn

    # tenants never see each other's keys
    for path in (f"/v1/encryption-keys/{cmek['id']}", base):
        assert (await client.get(path, headers=other.headers)).status_code == 404
    r = await client.post(f"/v1/encryption-keys/{cmek['id']}/rotate", headers=other.headers)
    assert r.status_code == 404
    r = await client.post(
        f"/v1/projects/{other.project_id}/clusters",
        json={"name": unique_name(), "plan": "serverless", "region": "local", "encryption_key_id": cmek["id"]},
        headers=other.headers,
    )
    assert r.status_code == 422 and r.json()["code"] == "encryption_key_not_found", r.text

    # roles: a data reader sees no keys; a cluster admin reads but does not manage them
    reader = await add_member(client, owner, project_roles=[{"project_id": owner.project_id, "role": "data_reader"}])
    assert (await client.get(base, headers=reader.headers)).status_code == 403
    admin = await add_member(client, owner, project_roles=[{"project_id": owner.project_id, "role": "cluster_admin"}])
    assert (await client.get(base, headers=admin.headers)).status_code == 200
    r = await client.post(base, json={"provider": "managed"}, headers=admin.headers)
    assert r.status_code == 403, r.text
    r = await client.delete(f"/v1/encryption-keys/{managed['id']}", headers=admin.headers)
    assert r.status_code == 403, r.text

    # rotation of a managed key takes no ARN
    r = await client.post(f"/v1/encryption-keys/{managed['id']}/rotate", json={"key_arn": arn}, headers=h)
    assert r.status_code == 422 and r.json()["code"] == "invalid_rotation", r.text
    rotated = ok(await client.post(f"/v1/encryption-keys/{managed['id']}/rotate", headers=h))
    assert rotated["current_version"] == 2 and [v["version"] for v in rotated["versions"]] == [1, 2]
    assert rotated["rewrapped_clusters"] == 0 and rotated["rekey_clusters"] == []

    # delete: unused keys go (and are gone), every action audited
    ok(await client.delete(f"/v1/encryption-keys/{managed['id']}", headers=h), 204)
    assert (await client.get(f"/v1/encryption-keys/{managed['id']}", headers=h)).status_code == 404
    async with app.state.db.session() as s:
        actions = {
            (a.action, a.target_id)
            for a in (await s.execute(select(AuditLog).where(AuditLog.org_id == owner.org_id))).scalars()
        }
    for action, target in [
        ("encryption_key.create", managed["id"]),
        ("encryption_key.create", cmek["id"]),
        ("encryption_key.rotate", managed["id"]),
        ("encryption_key.delete", managed["id"]),
    ]:
        assert (action, target) in actions, (action, target)


async def test_a_cluster_under_a_customer_key_through_rotation_revocation_and_rekey(
    client: httpx.AsyncClient, app: FastAPI, kms: Any
) -> None:
    owner = await signup(client, "cmek", "CMEK Org")
    h, base = owner.headers, f"/v1/projects/{owner.project_id}/encryption-keys"
    arn, kms_id = new_kms_key(kms)
    key = ok(await client.post(base, json={"provider": "aws-kms", "key_arn": arn, "role_arn": ROLE}, headers=h), 201)

    cluster = await create_cluster(client, owner.access_token, owner.project_id, encryption_key_id=key["id"])
    cid = cluster["id"]
    made = [cid]
    try:
        assert cluster["encryption"] == {"key_id": key["id"], "provider": "aws-kms", "key_version": 1,
                                         "rekey_in_progress": False}  # fmt: skip
        row = await cluster_row(app, cid)
        assert row.data_key_wrapped.startswith(b"\x02")  # wrapped by AWS KMS
        body = {"name": "docs", "dimension": DIM, "metric": "cosine", "index": {"type": "hnsw"}}
        ok(await client.post(dp(cid), json=body, headers=h), 201)
        recs = records(120, dimension=DIM)
        ok(await client.post(dp(cid, "/docs/upsert"), json={"records": recs[:80]}, headers=h))
        tasks.engine_call(row.engine_url, tasks.engine_token(row), "POST", "/internal/flush", timeout=120)
        ok(await client.post(dp(cid, "/docs/upsert"), json={"records": recs[80:]}, headers=h))  # still in the WAL
        before = await search_all(client, h, cid, recs)
        assert len(before[-1]) == 120

        key_v1 = plaintext_keys(app, cid)
        assert_no_plaintext(app, cid, key_v1)

        # a backup under version 1
        accepted = ok(await client.post(f"/v1/clusters/{cid}/backups", headers=h), 202)
        backup = ok(await client.get(f"/v1/backups/{accepted['id']}", headers=h))
        assert backup["status"] == "AVAILABLE" and backup["key_version"] == "1"
        assert backup["encryption_key_id"] == key["id"]

        # rotate: the data key is re-wrapped by version 2; a restarted engine reads everything back
        wrapped_v1 = row.data_key_wrapped
        rotated = ok(await client.post(f"/v1/encryption-keys/{key['id']}/rotate", headers=h))
        assert rotated["current_version"] == 2 and rotated["rewrapped_clusters"] == 1
        got = ok(await client.get(f"/v1/clusters/{cid}", headers=h))
        assert got["encryption"]["key_version"] == 2
        row = await cluster_row(app, cid)
        assert row.data_key_wrapped != wrapped_v1 and plaintext_keys(app, cid) == key_v1  # same data key
        kill_engine(cid)
        app.state.edge.invalidate(cid)
        assert await search_all(client, h, cid, recs) == before

        # revoke: disable the key in KMS; the key check suspends the cluster and stops its engine
        pid = engine_pid(cid)
        kms.disable_key(KeyId=kms_id)
        key_tasks.check_keys()
        got = ok(await client.get(f"/v1/clusters/{cid}", headers=h))
        assert got["status"] == "SUSPENDED" and got["status_reason"] == "encryption_key_unavailable", got
        assert not alive(pid) and engine_pids(LocalProvisioner().data_dir(cid)) == []
        app.state.edge.invalidate(cid)
        r = await client.post(dp(cid, "/docs/search"), json={"vector": recs[0]["vector"], "top_k": 5}, headers=h)
        assert r.status_code == 503 and r.json()["code"] == "encryption_key_unavailable", r.text
        assert "encryption key is unavailable" in r.json()["detail"] and r.headers.get("retry-after")
        described = ok(await client.get(f"/v1/encryption-keys/{key['id']}", headers=h))
        assert described["status"] == "UNAVAILABLE" and "Disabled" in described["status_reason"]
        # ... nothing restores from its backups, it cannot be resumed by hand, no new cluster under it
        r = await client.post(f"/v1/backups/{backup['id']}/restore", json={"target": "new", "name": unique_name()},
                              headers=h)  # fmt: skip
        assert r.status_code == 409 and r.json()["code"] == "encryption_key_unavailable", r.text
        r = await client.post(f"/v1/clusters/{cid}/resume", headers=h)
        assert r.status_code == 409 and r.json()["code"] == "encryption_key_unavailable", r.text
        r = await client.post(
            f"/v1/projects/{owner.project_id}/clusters",
            json={"name": unique_name(), "plan": "serverless", "region": "local", "encryption_key_id": key["id"]},
            headers=h,
        )
        assert r.status_code == 409 and r.json()["code"] == "encryption_key_unavailable", r.text
        key_tasks.check_keys()  # a second pass changes nothing
        assert ok(await client.get(f"/v1/clusters/{cid}", headers=h))["status"] == "SUSPENDED"

        # enable it again: the next check resumes the cluster, with the same answers
        kms.enable_key(KeyId=kms_id)
        key_tasks.check_keys()
        got = ok(await client.get(f"/v1/clusters/{cid}", headers=h))
        assert got["status"] == "RUNNING", got
        app.state.edge.invalidate(cid)
        assert await search_all(client, h, cid, recs) == before
        assert ok(await client.get(f"/v1/encryption-keys/{key['id']}", headers=h))["status"] == "ENABLED"

        # the backup taken under version 1 restores after the rotation to version 2
        body = {"target": "new", "name": unique_name("restored")}
        restored = ok(await client.post(f"/v1/backups/{backup['id']}/restore", json=body, headers=h), 202)
        made.append(restored["cluster_id"])
        new = ok(await client.get(f"/v1/clusters/{restored['cluster_id']}", headers=h))
        assert new["status"] == "RUNNING", new
        assert new["encryption"]["key_id"] == key["id"] and new["encryption"]["key_version"] == 2
        assert await search_all(client, h, new["id"], recs) == before

        # re-key: a new data key, the files re-encrypted under it while the cluster serves
        rekeyed = ok(await client.post(f"/v1/encryption-keys/{key['id']}/rotate", json={"rekey": True}, headers=h))
        assert rekeyed["current_version"] == 3 and set(rekeyed["rekey_clusters"]) == {cid, new["id"]}
        for c in (cid, new["id"]):
            got = ok(await client.get(f"/v1/clusters/{c}", headers=h))
            assert got["encryption"]["rekey_in_progress"] is False, got  # eager Celery: already done
        key_v3 = plaintext_keys(app, cid)
        assert key_v3 != key_v1 and len(key_v3) == 1
        kill_engine(cid)  # started again with the new data key alone: no file may still need the old one
        app.state.edge.invalidate(cid)
        assert await search_all(client, h, cid, recs) == before
        assert_no_plaintext(app, cid, key_v1 + key_v3)

        # deleting the key while clusters use it is refused
        r = await client.delete(f"/v1/encryption-keys/{key['id']}", headers=h)
        assert r.status_code == 409 and r.json()["code"] == "encryption_key_in_use", r.text

        async with app.state.db.session() as s:
            rows = (await s.execute(select(AuditLog).where(AuditLog.org_id == owner.org_id))).scalars().all()
        seen = {(a.action, a.actor_type, a.target_id) for a in rows}
        for expected in [
            ("encryption_key.unavailable", "system", key["id"]),
            ("cluster.suspend", "system", cid),
            ("encryption_key.available", "system", key["id"]),
            ("cluster.resume", "system", cid),
            ("encryption_key.rotate", "user", key["id"]),
            ("cluster.rekey", "system", cid),
        ]:
            assert expected in seen, expected
    finally:
        for c in made:
            await client.delete(f"/v1/clusters/{c}", headers=h)


async def test_default_managed_key_rotation_and_in_place_restore(client: httpx.AsyncClient, app: FastAPI) -> None:
    owner = await signup(client, "managed", "Managed Key Org")
    h = owner.headers
    cluster = await create_cluster(client, owner.access_token, owner.project_id)
    cid = cluster["id"]
    try:
        enc = cluster["encryption"]
        assert enc["provider"] == "managed" and enc["key_id"] and enc["key_version"] == 1
        keys = ok(await client.get(f"/v1/projects/{owner.project_id}/encryption-keys", headers=h))["items"]
        assert [(k["id"], k["is_default"], k["clusters"]) for k in keys] == [(enc["key_id"], True, 1)]
        ok(await client.post(dp(cid), json={"name": "docs", "dimension": DIM, "metric": "cosine"}, headers=h), 201)
        recs = records(40, dimension=DIM)
        ok(await client.post(dp(cid, "/docs/upsert"), json={"records": recs}, headers=h))
        before = await search_all(client, h, cid, recs)
        backup = ok(await client.post(f"/v1/clusters/{cid}/backups", headers=h), 202)
        assert backup["key_version"] == "1"

        ok(await client.post(f"/v1/encryption-keys/{enc['key_id']}/rotate", json={"rekey": True}, headers=h))
        assert ok(await client.get(f"/v1/clusters/{cid}", headers=h))["encryption"]["key_version"] == 2
        kill_engine(cid)
        app.state.edge.invalidate(cid)
        assert await search_all(client, h, cid, recs) == before

        # in place: the version-1 backup replaces the (re-keyed) data; the cluster then runs on its data key
        ok(await client.post(dp(cid, "/docs/delete"), json={"ids": [r["id"] for r in recs[:10]]}, headers=h))
        r = ok(await client.post(f"/v1/backups/{backup['id']}/restore", json={"target": "in_place"}, headers=h), 202)
        assert ok(await client.get(f"/v1/jobs/{r['job_id']}", headers=h))["status"] == "succeeded"
        app.state.edge.invalidate(cid)
        assert await search_all(client, h, cid, recs) == before
        kill_engine(cid)
        app.state.edge.invalidate(cid)
        assert await search_all(client, h, cid, recs) == before
        r = await client.delete(f"/v1/encryption-keys/{enc['key_id']}", headers=h)
        assert r.status_code == 409 and r.json()["code"] == "encryption_key_in_use"
    finally:
        await client.delete(f"/v1/clusters/{cid}", headers=h)


async def test_an_unreachable_key_suspends_only_at_the_second_check(client: httpx.AsyncClient, app: FastAPI) -> None:
    """One lost DescribeKey must not take a customer's clusters down; two checks in a row do."""
    owner = await signup(client, "unreach", "Unreachable Org")
    key = ok(await client.post(f"/v1/projects/{owner.project_id}/encryption-keys", json={"provider": "managed"},
                               headers=owner.headers), 201)  # fmt: skip
    cid = await insert_cluster(app, owner.org_id, owner.project_id, "RUNNING")
    async with app.state.db.transaction() as s:
        from services.control_plane.clusters.models import Cluster

        c = await s.get(Cluster, cid)
        assert c is not None
        c.encryption_key_id = key["id"]
    lost = KeyState(usable=False, state="unreachable", version="", reason="connect timeout", transient=True)
    assert key_tasks.key_unusable(key["id"], lost) == 0
    got = ok(await client.get(f"/v1/clusters/{cid}", headers=owner.headers))
    assert got["status"] == "RUNNING"
    described = ok(await client.get(f"/v1/encryption-keys/{key['id']}", headers=owner.headers))
    assert described["status"] == "ENABLED" and described["status_reason"].startswith("unreachable since")
    assert key_tasks.key_unusable(key["id"], lost) == 1
    got = ok(await client.get(f"/v1/clusters/{cid}", headers=owner.headers))
    assert got["status"] == "SUSPENDED" and got["status_reason"] == "encryption_key_unavailable"
    assert ring.describe(ring.local_ref(owner.org_id)).usable  # (the master key itself is fine)
    async with app.state.db.transaction() as s:  # no engine behind this row: out of later key checks' way
        c = await s.get(Cluster, cid)
        assert c is not None
        c.status, c.encryption_key_id = "DELETED", None


async def test_rekey_of_a_cluster_with_read_replicas(client: httpx.AsyncClient, app: FastAPI) -> None:
    """Every member re-encrypts its own data dir (replicas first, then the primary); the replica keeps following
    the primary under the new key, and the new key alone opens every member afterwards."""
    owner = await signup(client, "rekey-rep", "Rekey Replicas Org")
    h = owner.headers
    cluster = await create_cluster(client, owner.access_token, owner.project_id, replicas=2)
    cid = cluster["id"]
    try:
        ok(await client.post(dp(cid), json={"name": "docs", "dimension": DIM, "metric": "cosine"}, headers=h), 201)
        recs = records(60, dimension=DIM)
        ok(await client.post(dp(cid, "/docs/upsert"), json={"records": recs[:50]}, headers=h))
        row = await cluster_row(app, cid)
        token = tasks.engine_token(row)
        members = [row.engine_url] + [r["url"] for r in row.engine_state["replicas"]]
        assert len(members) == 2
        old = plaintext_keys(app, cid)

        rotate = f"/v1/encryption-keys/{cluster['encryption']['key_id']}/rotate"
        rotated = ok(await client.post(rotate, json={"rekey": True}, headers=h))
        assert rotated["rekey_clusters"] == [cid]
        new = plaintext_keys(app, cid)
        assert new != old and len(new) == 1
        states = [tasks.engine_call(url, token, "GET", "/internal/rekey") for url in members]
        assert {s["state"] for s in states} == {"done"} and len({s["key_id"] for s in states}) == 1, states

        # writes after the re-key reach the replica (frames under the new key)
        ok(await client.post(dp(cid, "/docs/upsert"), json={"records": recs[50:]}, headers=h))
        import asyncio

        for _ in range(100):
            st = tasks.engine_call(members[1], token, "GET", "/internal/stats")
            if st.get("vector_count") == 60:
                break
            await asyncio.sleep(0.05)
        assert st.get("vector_count") == 60, st

        # every member starts again with the new key alone
        kill_engine(cid)
        row = await cluster_row(app, cid)
        replica_pid = row.engine_state["replicas"][0]["pid"]
        os.kill(replica_pid, signal.SIGKILL)
        for _ in range(200):
            if not alive(replica_pid):
                break
            await asyncio.sleep(0.02)
        assert tasks.heal_replicas(cid) == 1
        app.state.edge.invalidate(cid)
        row = await cluster_row(app, cid)
        for url in [row.engine_url] + [r["url"] for r in row.engine_state["replicas"]]:
            for _ in range(100):
                st = tasks.engine_call(url, token, "GET", "/internal/stats")
                if st.get("vector_count") == 60:
                    break
                await asyncio.sleep(0.05)
            assert st.get("vector_count") == 60, (url, st)
    finally:
        await client.delete(f"/v1/clusters/{cid}", headers=h)

"""Backups on S3 through the public API (moto's server on loopback as the object store, real engine processes):
backup → drop the collection → restore into a new cluster and in place → the same search answers; the backup's
objects hold no plaintext, and the listed size is what the objects weigh. Runs on SQLite and, with
VECTA_TEST_DATABASE_URL, on PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import boto3
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from services.control_plane.clusters import tasks
from services.core.settings import get_settings
from tests.awskit import moto_server
from tests.clusterkit import cluster_row, create_cluster, dp, ok, records, unique_name
from tests.conftest import Tenant, signup

BUCKET = "vecta-objects"
CANARY = "canary-" + uuid.uuid4().hex  # a metadata value and text that must never reach the bucket in the clear
DIM = 16


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """moto's S3 server on 127.0.0.1 as the control plane's object store (VECTA_OBJECT_STORE_URI), with the AWS
    settings in the environment the engine processes inherit."""
    with moto_server("AWS_ENDPOINT_URL_S3") as endpoint, pytest.MonkeyPatch.context() as mp:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        mp.setattr(get_settings(), "object_store_uri", f"s3://{BUCKET}/vecta")
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def populated(app: FastAPI, s3: Any) -> AsyncIterator[dict[str, Any]]:
    """A cluster holding a collection ``docs``: sealed, indexed segments and records still only in the WAL."""
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50004))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        owner = await signup(client, "bkp-s3", "Backup S3 Org")
        cid = (await create_cluster(client, owner.access_token, owner.project_id))["id"]
        made = [cid]
        try:
            body = {
                "name": "docs",
                "dimension": DIM,
                "metric": "cosine",
                "index": {"type": "hnsw"},
                "fields": [{"name": "tag", "type": "string"}, {"name": "n", "type": "int"}],
                "text_field": "body",
            }
            ok(await client.post(dp(cid), json=body, headers=owner.headers), 201)
            recs = records(240, dimension=DIM)
            for i, rec in enumerate(recs):
                rec["metadata"] = {"tag": f"{CANARY}-{i % 3}", "n": i}
                rec["text"] = f"{CANARY} document {i}"
            ok(await client.post(dp(cid, "/docs/upsert"), json={"records": recs[:160]}, headers=owner.headers))
            row = await cluster_row(app, cid)
            token = tasks.engine_token(row)
            tasks.engine_call(row.engine_url, token, "POST", "/internal/flush", timeout=120)  # seal and index
            ok(await client.post(dp(cid, "/docs/upsert"), json={"records": recs[160:]}, headers=owner.headers))
            ok(await client.post(dp(cid, "/docs/delete"), json={"ids": ["r5", "r170"]}, headers=owner.headers))
            yield {"client": client, "owner": owner, "cluster_id": cid, "records": recs, "made": made}
        finally:
            for c in made:
                await client.delete(f"/v1/clusters/{c}", headers=owner.headers)


async def answers(client: httpx.AsyncClient, owner: Tenant, cid: str, recs: list[dict[str, Any]]) -> list[Any]:
    """Searches (plain, filtered, hybrid), a fetch and a count: everything a restore must give back the same."""
    out: list[Any] = []
    for i in range(0, 240, 24):
        res = ok(
            await client.post(
                dp(cid, "/docs/search"),
                json={"vector": recs[i]["vector"], "top_k": 5, "include_metadata": True},
                headers=owner.headers,
            )
        )
        out.append(res["results"])
        res = ok(
            await client.post(
                dp(cid, "/docs/search"),
                json={"vector": recs[i]["vector"], "top_k": 5, "filter": {"tag": f"{CANARY}-1", "n": {"$gte": 50}}},
                headers=owner.headers,
            )
        )
        out.append(res["results"])
    res = ok(
        await client.post(
            dp(cid, "/docs/hybrid-search"),
            json={"vector": recs[7]["vector"], "text": "document 7", "top_k": 5, "fusion": {"method": "rrf"}},
            headers=owner.headers,
        )
    )
    out.append(res["results"])
    fetched = ok(await client.post(dp(cid, "/docs/fetch"), json={"ids": ["r0", "r5", "r200"]}, headers=owner.headers))
    out.append(sorted(r["id"] for r in fetched["records"]))
    out.append(ok(await client.post(dp(cid, "/docs/count"), json={}, headers=owner.headers))["count"])
    return out


def bucket_objects(s3: Any, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj["Size"]
    return out


async def test_backup_drop_restore_new_and_in_place_give_identical_answers(
    app: FastAPI, s3: Any, populated: dict[str, Any]
) -> None:
    client, owner, cid, recs = populated["client"], populated["owner"], populated["cluster_id"], populated["records"]
    h = owner.headers
    before = await answers(client, owner, cid, recs)
    assert before[-1] == 238 and before[-2] == ["r0", "r200"]

    # -- backup: an encrypted snapshot in the bucket, listed with its size
    accepted = ok(await client.post(f"/v1/clusters/{cid}/backups", headers=h), 202)
    backup_id = accepted["id"]
    job = ok(await client.get(f"/v1/jobs/{accepted['job_id']}", headers=h))
    assert job["status"] == "succeeded", job
    backup = ok(await client.get(f"/v1/backups/{backup_id}", headers=h))
    assert backup["status"] == "AVAILABLE" and backup["vector_count"] == 238 and backup["collections"] == ["docs"]
    listed = ok(await client.get(f"/v1/clusters/{cid}/backups", headers=h))
    assert [b["id"] for b in listed["items"]] == [backup_id]
    assert listed["items"][0]["size_bytes"] == backup["size_bytes"]

    objects = bucket_objects(s3, f"vecta/backups/{cid}/{backup_id}/")
    assert any(k.endswith("/SNAPSHOT.enc") for k in objects), objects
    assert any(".log" in k for k in objects) and any("/seg-" in k for k in objects), objects  # WAL and segments
    assert backup["size_bytes"] == sum(objects.values()), (backup["size_bytes"], objects)
    for key in objects:
        blob = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert CANARY.encode() not in blob, key
        assert b"document 1" not in blob and b'"tag"' not in blob, key

    # -- the collection is dropped
    ok(await client.delete(dp(cid, "/docs"), headers=h))
    r = await client.post(dp(cid, "/docs/search"), json={"vector": recs[0]["vector"], "top_k": 5}, headers=h)
    assert r.status_code == 404, r.text

    # -- restore into a new cluster (same project)
    name = unique_name("restored")
    restored = ok(
        await client.post(f"/v1/backups/{backup_id}/restore", json={"target": "new", "name": name}, headers=h), 202
    )
    new_id = restored["cluster_id"]
    populated["made"].append(new_id)
    assert new_id != cid
    job = ok(await client.get(f"/v1/jobs/{restored['job_id']}", headers=h))
    assert job["status"] == "succeeded", job
    got = ok(await client.get(f"/v1/clusters/{new_id}", headers=h))
    assert got["status"] == "RUNNING" and got["name"] == name
    assert await answers(client, owner, new_id, recs) == before

    # -- restore in place: the cluster that lost the collection gets it back
    r = ok(await client.post(f"/v1/backups/{backup_id}/restore", json={"target": "in_place"}, headers=h), 202)
    assert r["cluster_id"] == cid and r["status"] == "RESTORING"
    job = ok(await client.get(f"/v1/jobs/{r['job_id']}", headers=h))
    assert job["status"] == "succeeded", job
    assert ok(await client.get(f"/v1/clusters/{cid}", headers=h))["status"] == "RUNNING"
    assert await answers(client, owner, cid, recs) == before

    # both take writes afterwards
    for target in (cid, new_id):
        extra = records(1, dimension=DIM, start=999)
        assert ok(await client.post(dp(target, "/docs/upsert"), json={"records": extra}, headers=h)) == {
            "upserted_count": 1
        }

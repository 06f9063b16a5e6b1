"""Read replicas through the public API with real engine processes: a cluster created with replicas=2 runs a primary
and one replica; writes go to the primary, reads are spread over both; a killed replica leaves reads working and
the reconciler restarts it; scaling 2 -> 1 stops and removes the replica."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from services.control_plane.clusters import tasks
from services.control_plane.clusters.models import ClusterMetric
from tests.clusterkit import alive, cluster_row, create_cluster, records
from tests.conftest import auth, create_key, signup


def dp(cluster_id: str, rest: str = "") -> str:
    return f"/v1/clusters/{cluster_id}/collections{rest}"


def served(url: str, token: str, route: str) -> int:
    """Requests of ``route`` an engine answered with 200 (its Prometheus counter)."""
    text = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {token}"}, timeout=5).text
    m = re.search(rf'vecta_engine_requests_total\{{route="{route}",status="200"\}} ([0-9.]+)', text)
    return int(float(m.group(1))) if m else 0


async def wait_for(fn: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(fn)
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


async def metric_rows(app: FastAPI, cid: str) -> list[ClusterMetric]:
    async with app.state.db.session() as session:
        rows = await session.execute(
            select(ClusterMetric).where(ClusterMetric.cluster_id == cid).order_by(ClusterMetric.at)
        )
        return list(rows.scalars().all())


async def test_replicas_serve_reads_heal_and_scale(client: httpx.AsyncClient, app: FastAPI) -> None:
    owner = await signup(client, "repl-owner", "Replica Org")
    cluster = await create_cluster(client, owner.access_token, owner.project_id, replicas=2)
    cid = cluster["id"]
    assert cluster["replicas"] == 2 and cluster["status"] == "RUNNING"
    row = await cluster_row(app, cid)
    token = tasks.engine_token(row)
    primary_url = row.engine_url
    (replica,) = row.engine_state["replicas"]
    assert replica["index"] == 1 and replica["url"] != primary_url and alive(replica["pid"])
    assert replica["primary_url"] == primary_url
    assert token not in str(row.engine_state)
    key = (await create_key(client, owner, project_roles=[{"project_id": owner.project_id, "role": "data_writer"}]))[
        "key"
    ]
    h = auth(key)

    def replica_count(url: str) -> int | None:
        r = httpx.post(f"{url}/v1/collections/docs/count", json={}, headers={"authorization": f"Bearer {token}"})
        return r.json()["count"] if r.status_code == 200 else None

    # -- writes through the edge reach the primary; the replica follows its WAL
    r = await client.post(dp(cid), json={"name": "docs", "dimension": 4, "metric": "cosine"}, headers=h)
    assert r.status_code == 201, r.text
    r = await client.post(dp(cid, "/docs/upsert"), json={"records": records(40)}, headers=h)
    assert r.status_code == 200 and r.json() == {"upserted_count": 40}, r.text
    await wait_for(lambda: replica_count(replica["url"]) == 40, what="the replica to catch up")

    # -- reads through the edge: identical answers, served by both members
    assert await asyncio.to_thread(tasks.heartbeat, cid) == "heartbeats"  # the metrics baseline
    before = {u: served(u, token, "search") for u in (primary_url, replica["url"])}
    query = {"vector": [0.1, 0.2, 0.3, 0.4], "top_k": 5}
    answers = []
    for _ in range(8):
        r = await client.post(dp(cid, "/docs/search"), json=query, headers=h)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert all(a == answers[0] for a in answers) and len(answers[0]["results"]) == 5
    after = {u: served(u, token, "search") for u in (primary_url, replica["url"])}
    assert after[primary_url] > before[primary_url] and after[replica["url"]] > before[replica["url"]], after
    # the cluster's metrics (and billing's read units) count the reads of every member, not the primary's only
    assert await asyncio.to_thread(tasks.heartbeat, cid) == "heartbeats"
    prev, last = (await metric_rows(app, cid))[-2:]
    assert last.requests - prev.requests == 8, (prev.requests, last.requests)
    assert last.read_units - prev.read_units >= 8
    assert last.latency_p50_ms is not None
    assert (await client.get(dp(cid, "/docs"), headers=h)).json()["vector_count"] == 40

    # -- the replica dies: reads keep working (failed over to the primary), then the reconciler restarts it
    os.kill(replica["pid"], signal.SIGKILL)
    for _ in range(6):
        r = await client.post(dp(cid, "/docs/count"), json={}, headers=h)
        assert r.status_code == 200 and r.json() == {"count": 40}, r.text
    counts = await asyncio.to_thread(tasks.reconcile)
    assert counts.get("replicas_restarted") == 1, counts
    row = await cluster_row(app, cid)
    (healed,) = row.engine_state["replicas"]
    assert healed["pid"] != replica["pid"] and alive(healed["pid"])
    assert row.status_reason and "replica restarted" in row.status_reason
    await wait_for(lambda: replica_count(healed["url"]) == 40, what="the restarted replica to serve")
    r = await client.post(dp(cid, "/docs/upsert"), json={"records": records(5, start=100)}, headers=h)
    assert r.status_code == 200, r.text
    await wait_for(lambda: replica_count(healed["url"]) == 45, what="the restarted replica to follow")
    assert (await asyncio.to_thread(tasks.reconcile)).get("replicas_restarted", 0) == 0  # nothing more to heal

    # -- scale 2 -> 1: the replica stops and its data goes; the primary keeps serving with its data
    r = await client.patch(f"/v1/clusters/{cid}", json={"replicas": 1}, headers=auth(owner.access_token))
    assert r.status_code == 202, r.text
    got = (await client.get(f"/v1/clusters/{cid}", headers=auth(owner.access_token))).json()
    assert got["status"] == "RUNNING" and got["replicas"] == 1, got
    row = await cluster_row(app, cid)
    assert row.engine_url == primary_url and row.engine_state.get("replicas") == []
    await wait_for(lambda: not alive(healed["pid"]), what="the replica to stop")
    assert not Path(healed["data_dir"]).exists()
    r = await client.post(dp(cid, "/docs/count"), json={}, headers=h)
    assert r.status_code == 200 and r.json() == {"count": 45}, r.text

    # -- and back to 2: a new replica copies the primary
    r = await client.patch(f"/v1/clusters/{cid}", json={"replicas": 2}, headers=auth(owner.access_token))
    assert r.status_code == 202, r.text
    row = await cluster_row(app, cid)
    (again,) = row.engine_state["replicas"]
    await wait_for(lambda: replica_count(again["url"]) == 45, what="a new replica to copy the primary")
    r = await client.delete(f"/v1/clusters/{cid}", headers=auth(owner.access_token))
    assert r.status_code == 202, r.text
    await wait_for(lambda: not alive(again["pid"]), what="delete to stop the replica")
    assert not Path(again["data_dir"]).exists()

"""The edge and a cluster on its way back to RUNNING: short Retry-After, and RUNNING noticed promptly."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI
from sqlalchemy import update

from services.control_plane.clusters.models import Cluster
from tests.clusterkit import insert_cluster, set_status
from tests.conftest import signup


async def test_a_resuming_cluster_is_seen_running_without_waiting_out_the_route_cache(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    t = await signup(client, "edge-resume", "Edge Resume")
    cid = await insert_cluster(app, t.org_id, t.project_id, "RESUMING")
    try:
        r = await client.post(f"/v1/clusters/{cid}/collections/docs/count", json={}, headers=t.headers)
        assert r.status_code == 503 and r.json()["code"] == "cluster_not_ready", r.text
        assert r.headers["retry-after"] == "1"  # a resume takes about a second
        assert (await app.state.edge.resolve(cid)).status == "RESUMING"
        # The worker marks it RUNNING behind the edge's back (another process: no invalidation reaches the edge).
        async with app.state.db.transaction() as s:
            await s.execute(
                update(Cluster).where(Cluster.id == cid).values(status="RUNNING", engine_url="http://127.0.0.1:9")
            )
        await asyncio.sleep(0.15)  # longer than a non-RUNNING route is cached, well under a RUNNING one's second
        assert (await app.state.edge.resolve(cid)).status == "RUNNING"
    finally:
        await set_status(app, cid, "DELETED")

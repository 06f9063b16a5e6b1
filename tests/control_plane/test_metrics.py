"""Cluster metrics from a real engine: the engine's request counts and latency histograms in /internal/stats, the
reconciler's samples turned into QPS and read p50/p99 by ``GET /v1/clusters/{id}/metrics``, an engine restart
(counters back at zero) that never makes QPS negative; and problem documents of engine errors forwarded by the
edge naming the public path as their ``instance``.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import select

from services.control_plane.clusters import metrics as cluster_metrics
from services.control_plane.clusters import tasks
from services.control_plane.clusters.models import ClusterMetric
from services.core.db import utcnow
from services.engine.server import LATENCY_BUCKETS
from tests.clusterkit import alive, cluster_row, collection_body, create_cluster, records
from tests.conftest import Tenant, signup

BOUNDS_MS = [round(b * 1000, 6) for b in LATENCY_BUCKETS]


def dp(cluster_id: str, rest: str = "") -> str:
    return f"/v1/clusters/{cluster_id}/collections{rest}"


def upper_bound(ms: float) -> float:
    """The upper bound of the histogram bucket holding ``ms`` (the highest bound past the last one)."""
    i = bisect.bisect_left(BOUNDS_MS, ms)
    return BOUNDS_MS[min(i, len(BOUNDS_MS) - 1)]


# -- the arithmetic, on known data --------------------------------------------------------------------------
def _histogram(values_ms: np.ndarray) -> list[int]:
    counts = [0] * (len(BOUNDS_MS) + 1)
    for v in values_ms:
        counts[bisect.bisect_left(BOUNDS_MS, float(v))] += 1
    return counts


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_histogram_quantile_lands_in_the_true_quantiles_bucket(q: float) -> None:
    rng = np.random.default_rng(7)
    values = rng.lognormal(mean=0.0, sigma=1.2, size=5000)  # ms: a median of 1 ms, a long tail
    est = cluster_metrics.histogram_quantile(q, BOUNDS_MS, _histogram(values))
    true = float(np.quantile(values, q))
    assert est is not None
    i = bisect.bisect_left(BOUNDS_MS, true)
    lo = BOUNDS_MS[i - 1] if i > 0 else 0.0
    assert lo <= est <= BOUNDS_MS[i], (q, est, true)


def test_histogram_quantile_edges() -> None:
    assert cluster_metrics.histogram_quantile(0.5, BOUNDS_MS, [0] * (len(BOUNDS_MS) + 1)) is None
    only_slow = [0] * len(BOUNDS_MS) + [3]  # everything above the last bound
    assert cluster_metrics.histogram_quantile(0.99, BOUNDS_MS, only_slow) == BOUNDS_MS[-1]
    one = [0, 0, 4] + [0] * (len(BOUNDS_MS) - 2)  # four requests in (0.25, 0.5] ms
    assert cluster_metrics.histogram_quantile(0.5, BOUNDS_MS, one) == pytest.approx(0.375)


def _reported(boot: str, reads: list[float], writes: int) -> dict[str, Any]:
    return {
        "boot_id": boot,
        "latency_bounds_ms": BOUNDS_MS,
        "read": {"count": len(reads), "latency_sum_ms": sum(reads), "latency_counts": _histogram(np.array(reads))},
        "write": {"count": writes, "latency_sum_ms": 0.0, "latency_counts": [0] * (len(BOUNDS_MS) + 1)},
    }


def test_interval_since_handles_first_sample_restart_and_stale_samples() -> None:
    first = cluster_metrics.interval_since(None, _reported("a", [0.3] * 10, 5))
    assert first is not None and first.requests == 15
    assert first.latency_p50_ms is not None and 0.25 <= first.latency_p50_ms <= 0.5

    later = cluster_metrics.interval_since(first.cursor, _reported("a", [0.3] * 10 + [3.0] * 30, 5))
    assert later is not None and later.requests == 30  # only what happened since the cursor
    assert later.latency_p50_ms is not None and 2.0 <= later.latency_p50_ms <= 5.0  # the old 0.3 ms are gone

    # the engine restarted: its counters are lower, but it is another process, so all of them are new
    restarted = cluster_metrics.interval_since(later.cursor, _reported("b", [1.5] * 4, 1))
    assert restarted is not None and restarted.requests == 5
    assert restarted.latency_p99_ms is not None and 1.0 <= restarted.latency_p99_ms <= 2.0

    # an older sample than the cursor (overlapping passes) adds nothing
    assert cluster_metrics.interval_since(later.cursor, _reported("a", [0.3] * 10, 5)) is None
    # no reads in the interval: no latency rather than a made-up one
    idle = cluster_metrics.interval_since(later.cursor, _reported("a", [0.3] * 10 + [3.0] * 30, 9))
    assert idle is not None and idle.requests == 4 and idle.latency_p50_ms is None
    # an engine that reports no request statistics
    assert cluster_metrics.interval_since(None, None) == cluster_metrics.Interval(0, None, None, {})


# -- a real engine, through the public API ------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50003))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        owner = await signup(client, "metrics", "Metrics Org")
        cid = (await create_cluster(client, owner.access_token, owner.project_id))["id"]
        try:
            r = await client.post(dp(cid), json=collection_body("m", dimension=8), headers=owner.headers)
            assert r.status_code == 201, r.text
            recs = records(50, dimension=8)
            r = await client.post(dp(cid, "/m/upsert"), json={"records": recs}, headers=owner.headers)
            assert r.status_code == 200, r.text
            yield {"id": cid, "owner": owner, "records": recs}
        finally:
            await client.delete(f"/v1/clusters/{cid}", headers=owner.headers)


async def _searches(client: httpx.AsyncClient, c: dict[str, Any], n: int) -> list[float]:
    """n searches through the edge, one at a time; their round-trip times in ms."""
    owner: Tenant = c["owner"]
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        r = await client.post(
            dp(c["id"], "/m/search"),
            json={"vector": c["records"][i % 50]["vector"], "top_k": 3},
            headers=owner.headers,
        )
        out.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, r.text
    return out


async def _engine_stats(app: FastAPI, cid: str) -> dict[str, Any]:
    row = await cluster_row(app, cid)
    token = tasks.engine_token(row)
    return await asyncio.to_thread(tasks.engine_call, row.engine_url, token, "GET", "/internal/stats")


async def _samples(app: FastAPI, cid: str) -> list[ClusterMetric]:
    async with app.state.db.session() as s:
        rows = await s.execute(select(ClusterMetric).where(ClusterMetric.cluster_id == cid).order_by(ClusterMetric.at))
        return list(rows.scalars().all())


async def test_engine_reports_request_counts_and_histograms(
    client: httpx.AsyncClient, app: FastAPI, cluster: dict[str, Any]
) -> None:
    cid = cluster["id"]
    before = (await _engine_stats(app, cid))["requests"]
    assert before["latency_bounds_ms"] == BOUNDS_MS
    await _searches(client, cluster, 12)
    r = await client.post(
        dp(cid, "/m/upsert"), json={"records": records(2, dimension=8, start=900)}, headers=cluster["owner"].headers
    )
    assert r.status_code == 200, r.text
    r = await client.post(dp(cid, "/m/count"), json={}, headers=cluster["owner"].headers)
    assert r.status_code == 200, r.text
    after = (await _engine_stats(app, cid))["requests"]
    assert after["boot_id"] == before["boot_id"]
    assert after["read"]["count"] - before["read"]["count"] == 13  # 12 searches and a count; stats calls are not
    assert after["write"]["count"] - before["write"]["count"] == 1
    for kind in ("read", "write"):
        assert sum(after[kind]["latency_counts"]) == after[kind]["count"]
        assert len(after[kind]["latency_counts"]) == len(BOUNDS_MS) + 1
    assert after["read"]["latency_sum_ms"] > before["read"]["latency_sum_ms"]


async def test_metrics_give_qps_and_latency_and_survive_an_engine_restart(
    client: httpx.AsyncClient, app: FastAPI, cluster: dict[str, Any]
) -> None:
    cid, h = cluster["id"], cluster["owner"].headers
    assert await asyncio.to_thread(tasks.heartbeat, cid) == "heartbeats"  # the baseline sample
    start = utcnow()
    n = 40
    client_ms = await _searches(client, cluster, n)
    await asyncio.sleep(0.3)
    assert await asyncio.to_thread(tasks.heartbeat, cid) == "heartbeats"
    m = (await client.get(dp_metrics(cid, start), headers=h)).json()
    assert len(m["points"]) == 1, m
    point = m["points"][0]
    base, last = (await _samples(app, cid))[-2:]
    span = (last.at - base.at).total_seconds()
    assert point["requests"] == n
    assert point["qps"] == pytest.approx(n / span, abs=0.002)
    assert 0 < n / span < 10_000
    p50, p99 = point["latency_p50_ms"], point["latency_p99_ms"]
    assert p50 is not None and p99 is not None and 0 < p50 <= p99
    # The engine's part of a request is within its round trip through the API: each estimate stays within the
    # histogram bucket of the client-side latency that bounds it.
    assert p50 <= upper_bound(float(np.median(client_ms)))
    assert p99 <= upper_bound(max(client_ms))
    assert point["vectors"] >= 50 and point["storage_bytes"] > 0

    # -- the engine dies: the reconciler starts it again, its counters start from zero
    reads_before = (await _samples(app, cid))[-1].read_units
    assert reads_before >= n
    row = await cluster_row(app, cid)
    old_pid = row.engine_state["pid"]
    old_boot = (await _engine_stats(app, cid))["requests"]["boot_id"]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(old_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await asyncio.to_thread(tasks.heartbeat, cid) == "restarted"
    assert (await _engine_stats(app, cid))["requests"]["boot_id"] != old_boot
    after_restart = utcnow()
    await _searches(client, cluster, 5)  # far fewer than before the restart
    await asyncio.sleep(0.2)
    assert await asyncio.to_thread(tasks.heartbeat, cid) == "heartbeats"

    samples = await _samples(app, cid)
    totals = [s.requests for s in samples]
    assert totals == sorted(totals), totals  # the running total never goes down
    # billing's read units are running totals too: the restarted engine counts from zero, the series does not
    reads = [s.read_units for s in samples]
    assert reads == sorted(reads), reads
    assert reads[-1] >= reads_before + 5, (reads_before, reads)
    m = (await client.get(dp_metrics(cid, after_restart), headers=h)).json()
    assert [p["requests"] for p in m["points"]] == [5]
    assert m["points"][0]["qps"] > 0 and m["points"][0]["latency_p50_ms"] is not None
    everything = (await client.get(dp_metrics(cid, start - dt.timedelta(minutes=5)), headers=h)).json()
    assert everything["points"]
    for p in everything["points"]:
        assert p["qps"] is None or p["qps"] >= 0, p
        assert p["requests"] is None or p["requests"] >= 0, p


def dp_metrics(cid: str, start: dt.datetime) -> str:
    return f"/v1/clusters/{cid}/metrics?step=10&start={start.isoformat().replace('+00:00', 'Z')}"


# -- problem `instance` of forwarded engine errors -----------------------------------------------------------
async def test_forwarded_engine_errors_name_the_public_path(
    client: httpx.AsyncClient, app: FastAPI, cluster: dict[str, Any]
) -> None:
    cid, h = cluster["id"], cluster["owner"].headers
    cases = [
        ("/nope/search", {"vector": [1.0] * 8, "top_k": 3}, 404, "collection_not_found"),
        ("/m/search", {"vector": [1.0, 2.0], "top_k": 3}, 422, None),  # wrong dimension
        ("/m/search", {"vector": [1.0] * 8, "top_k": 3, "filter": {"nope": {"$bad": 1}}}, 400, None),
    ]
    for rest, body, status, code in cases:
        r = await client.post(dp(cid, rest), json=body, headers=h)
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        doc = r.json()
        assert doc["instance"] == f"/v1/clusters/{cid}/collections{rest}", doc
        if code:
            assert doc["code"] == code
    r = await client.get(dp(cid, "/missing"), headers=h)
    assert r.status_code == 404 and r.json()["instance"] == f"/v1/clusters/{cid}/collections/missing"

    # Straight to the engine: the header is believed only from a caller holding the engine token, and only as
    # a plain path.
    row = await cluster_row(app, cid)
    token = tasks.engine_token(row)
    prefix = {"x-vecta-public-prefix": f"/v1/clusters/{cid}"}
    async with httpx.AsyncClient(base_url=row.engine_url, timeout=10) as engine:
        r = await engine.get("/v1/collections/missing", headers={**prefix, "authorization": f"Bearer {token}"})
        assert r.status_code == 404 and r.json()["instance"] == f"/v1/clusters/{cid}/collections/missing"
        r = await engine.get("/v1/collections/missing", headers={"authorization": f"Bearer {token}"})
        assert r.json()["instance"] == "/v1/collections/missing"
        r = await engine.get("/v1/collections/missing", headers={**prefix, "authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["instance"] == "/v1/collections/missing"
        bad = {"x-vecta-public-prefix": "https://evil.example/", "authorization": f"Bearer {token}"}
        r = await engine.get("/v1/collections/missing", headers=bad)
        assert r.status_code == 404 and r.json()["instance"] == "/v1/collections/missing"

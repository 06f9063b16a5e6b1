"""What the data-plane edge keeps when it serves requests ahead of the FastAPI middleware (``VectaAPI``): request
ids, metrics by route template, problem+json for odd paths and methods, large answers streamed back whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio
from fastapi import FastAPI

from tests.clusterkit import create_cluster, records
from tests.conftest import Tenant, signup


def dp(cluster_id: str, rest: str = "") -> str:
    return f"/v1/clusters/{cluster_id}/collections{rest}"


@pytest_asyncio.fixture
async def running(client: httpx.AsyncClient, app: FastAPI) -> AsyncIterator[tuple[Tenant, str]]:
    owner = await signup(client, "dispatch", "Dispatch")
    cid = (await create_cluster(client, owner.access_token, owner.project_id))["id"]
    try:
        r = await client.post(dp(cid), json={"name": "docs", "dimension": 4, "metric": "cosine"}, headers=owner.headers)
        assert r.status_code == 201, r.text
        yield owner, cid
    finally:
        await client.delete(f"/v1/clusters/{cid}", headers=owner.headers)


async def test_request_ids_on_data_plane_answers(client: httpx.AsyncClient, running: tuple[Tenant, str]) -> None:
    owner, cid = running
    r = await client.post(dp(cid, "/docs/count"), json={}, headers={**owner.headers, "x-request-id": "abc-123"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "abc-123"
    generated = await client.post(dp(cid, "/docs/count"), json={}, headers={**owner.headers, "x-request-id": "b a d"})
    assert len(generated.headers["x-request-id"]) == 32 and generated.headers["x-request-id"] != "b a d"
    problem = await client.post(dp(cid, "/docs/count"), json={})  # refused by the edge itself
    assert problem.status_code == 401 and len(problem.headers["x-request-id"]) == 32
    assert problem.headers["content-type"].startswith("application/problem+json")


async def test_data_plane_metrics_by_route_template(client: httpx.AsyncClient, running: tuple[Tenant, str]) -> None:
    owner, cid = running
    assert (await client.post(dp(cid, "/docs/count"), json={}, headers=owner.headers)).status_code == 200
    text = (await client.get("/metrics")).text
    line = next(
        (
            x
            for x in text.splitlines()
            if x.startswith("vecta_http_requests_total{")
            and 'route="/v1/clusters/{cluster_id}/collections{rest}"' in x
            and 'status="200"' in x
            and 'method="POST"' in x
        ),
        None,
    )
    assert line is not None and float(line.rsplit(" ", 1)[1]) >= 1


async def test_odd_paths_and_methods_are_problems(client: httpx.AsyncClient, running: tuple[Tenant, str]) -> None:
    owner, cid = running
    # names the engine cannot have: percent-encoded again on the way, answered by the engine as problems
    for rest in ("/a%20b/count", "/a%3Fb/count", "/%25/count", "/docs%0D%0Ax:1/count"):
        r = await client.post(dp(cid, rest), json={}, headers=owner.headers)
        assert 400 <= r.status_code < 500, (rest, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json"), (rest, r.text)
    r = await client.put(dp(cid, "/docs/count"), json={}, headers=owner.headers)
    assert r.status_code == 405 and r.headers["content-type"].startswith("application/problem+json")


async def test_large_answers_come_back_whole(client: httpx.AsyncClient, running: tuple[Tenant, str]) -> None:
    owner, cid = running
    spec = {"name": "wide", "dimension": 64, "metric": "cosine"}
    assert (await client.post(dp(cid), json=spec, headers=owner.headers)).status_code == 201
    recs: list[dict[str, Any]] = records(3000, dimension=64, prefix="big")
    for i in range(0, len(recs), 1000):
        r = await client.post(dp(cid, "/wide/upsert"), json={"records": recs[i : i + 1000]}, headers=owner.headers)
        assert r.status_code == 200, r.text
    r = await client.post(
        dp(cid, "/wide/fetch"), json={"ids": [x["id"] for x in recs], "include_vectors": True}, headers=owner.headers
    )
    assert r.status_code == 200, r.text
    assert len(r.content) > 1 << 20  # past the size the edge relays in one piece
    assert sorted(x["id"] for x in r.json()["records"]) == sorted(x["id"] for x in recs)


async def test_head_is_not_forwarded(client: httpx.AsyncClient, running: tuple[Tenant, str]) -> None:
    owner, cid = running
    for path in (dp(cid), dp(cid, "/docs")):
        r = await client.head(path, headers=owner.headers)
        assert r.status_code == 405, (path, r.status_code)

"""The data-plane edge end to end: the customer's path through the public API to a real engine process, tenant
isolation over every data-plane route, body and rate limits, clusters that are not RUNNING, and engine errors
relayed unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from services.control_plane.clusters import tasks
from tests.clusterkit import api_with, cluster_row, create_cluster, insert_cluster, records, set_status
from tests.conftest import auth, create_key, signup


def dp(cluster_id: str, rest: str = "") -> str:
    return f"/v1/clusters/{cluster_id}/collections{rest}"


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}"
    return r.json() if r.content else None


def problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    doc: dict[str, Any] = r.json()
    assert doc["status"] == status
    if code is not None:
        assert doc["code"] == code, doc
    return doc


# -- the customer's path ----------------------------------------------------------------------------------------
async def test_customer_path_end_to_end(client: httpx.AsyncClient, app: FastAPI) -> None:
    owner = await signup(client, "edge-e2e", "E2E Org")
    project = ok(
        await client.post(f"/v1/orgs/{owner.org_id}/projects", json={"name": "search"}, headers=owner.headers), 201
    )
    cluster = await create_cluster(client, owner.access_token, project["id"], name="prod")
    cid = cluster["id"]
    try:
        key = await create_key(
            client,
            owner,
            name="app server",
            project_roles=[{"project_id": project["id"], "role": "data_writer", "cluster_ids": [cid]}],
        )
        assert key["key"].startswith("vk_")
        h = auth(key["key"])

        desc = ok(
            await client.post(
                dp(cid),
                json={
                    "name": "articles",
                    "dimension": 8,
                    "metric": "cosine",
                    "fields": [{"name": "year", "type": "int", "indexed": True}, {"name": "lang", "type": "string"}],
                },
                headers=h,
            ),
            201,
        )
        assert desc["name"] == "articles" and desc["dimension"] == 8
        listed = ok(await client.get(dp(cid), headers=h))
        assert [c["name"] for c in listed["items"]] == ["articles"]

        recs = records(50, dimension=8, prefix="a")
        for i, rec in enumerate(recs):
            rec["metadata"] = {"year": 2000 + i % 10, "lang": "en" if i % 2 else "fr"}
        up = ok(await client.post(dp(cid, "/articles/upsert"), json={"records": recs[:30]}, headers=h))
        assert up == {"upserted_count": 30}
        ok(await client.post(dp(cid, "/articles/upsert"), json={"records": recs[30:]}, headers=h))

        res = ok(
            await client.post(
                dp(cid, "/articles/search"),
                json={"vector": recs[17]["vector"], "top_k": 5, "include_metadata": True},
                headers=h,
            )
        )
        assert res["results"][0]["id"] == "a17"
        assert res["results"][0]["metadata"] == {"year": 2007, "lang": "en"}
        scores = [m["score"] for m in res["results"]]
        assert scores == sorted(scores, reverse=True)
        filtered = ok(
            await client.post(
                dp(cid, "/articles/search"),
                json={"vector": recs[17]["vector"], "top_k": 50, "filter": {"year": {"$gte": 2008}}},
                headers=h,
            )
        )
        assert filtered["results"] and all(int(m["id"][1:]) % 10 >= 8 for m in filtered["results"])

        fetched = ok(await client.post(dp(cid, "/articles/fetch"), json={"ids": ["a3", "a4", "nope"]}, headers=h))
        assert sorted(r["id"] for r in fetched["records"]) == ["a3", "a4"]

        q = ok(await client.post(dp(cid, "/articles/query"), json={"filter": {"lang": "fr"}, "limit": 10}, headers=h))
        assert len(q["records"]) == 10 and q["next_cursor"]
        q2 = ok(
            await client.post(
                dp(cid, "/articles/query"),
                json={"filter": {"lang": "fr"}, "limit": 100, "cursor": q["next_cursor"]},
                headers=h,
            )
        )
        ids = [r["id"] for r in q["records"] + q2["records"]]
        assert len(ids) == len(set(ids)) == 25

        assert ok(await client.post(dp(cid, "/articles/count"), json={}, headers=h)) == {"count": 50}
        assert ok(await client.post(dp(cid, "/articles/count"), json={"filter": {"lang": "en"}}, headers=h)) == {
            "count": 25
        }

        deleted = ok(await client.post(dp(cid, "/articles/delete"), json={"ids": ["a0", "a1"]}, headers=h))
        assert deleted == {"deleted_count": 2}
        deleted = ok(await client.post(dp(cid, "/articles/delete"), json={"filter": {"year": 2009}}, headers=h))
        assert deleted["deleted_count"] == 5
        assert ok(await client.post(dp(cid, "/articles/count"), json={}, headers=h)) == {"count": 43}
        described = ok(await client.get(dp(cid, "/articles"), headers=h))
        assert described["vector_count"] == 43

        # The console user (session token) reaches the same data; the key cannot drop the collection
        # (data_writer has no collection:drop), the owner can.
        assert ok(await client.post(dp(cid, "/articles/count"), json={}, headers=owner.headers)) == {"count": 43}
        problem(await client.delete(dp(cid, "/articles"), headers=h), 403, "forbidden")
        ok(await client.delete(dp(cid, "/articles"), headers=owner.headers))
        problem(await client.post(dp(cid, "/articles/count"), json={}, headers=h), 404, "collection_not_found")

        # The cluster reports what it holds after a reconciler pass.
        ok(await client.post(dp(cid), json={"name": "again", "dimension": 8, "metric": "l2"}, headers=h), 201)
        ok(await client.post(dp(cid, "/again/upsert"), json={"records": records(12, dimension=8)}, headers=h))
        tasks.reconcile()
        got = ok(await client.get(f"/v1/clusters/{cid}", headers=owner.headers))
        assert got["vector_count"] == 12
    finally:
        ok(await client.delete(f"/v1/clusters/{cid}", headers=owner.headers), 202)


# -- tenant isolation ---------------------------------------------------------------------------------------
# Every data-plane route: (method, path under the collections prefix, body, needs data:write or more)
ROUTES: list[tuple[str, str, dict[str, Any] | None, bool]] = [
    ("GET", "", None, False),
    ("POST", "", {"name": "intruder", "dimension": 4, "metric": "l2"}, True),
    ("GET", "/docs", None, False),
    ("DELETE", "/docs", None, True),
    ("POST", "/docs/upsert", {"records": [{"id": "evil", "vector": [9.0, 9.0, 9.0, 9.0]}]}, True),
    ("POST", "/docs/delete", {"ids": ["d0", "d1"]}, True),
    ("POST", "/docs/delete", {"filter": {"tag": "x"}}, True),
    ("POST", "/docs/fetch", {"ids": ["d0", "d1"]}, False),
    ("POST", "/docs/search", {"vector": [1.0, 0.0, 0.0, 0.0], "top_k": 5}, False),
    ("POST", "/docs/hybrid-search", {"vector": [1.0, 0.0, 0.0, 0.0], "text": "secret", "top_k": 5}, False),
    ("POST", "/docs/query", {"filter": {"tag": "x"}, "limit": 10}, False),
    ("POST", "/docs/count", {}, False),
    ("POST", "/docs/imports", {"uri": "file:///etc/passwd"}, True),
]


def _docs(prefix: str, n: int) -> list[dict[str, Any]]:
    out = records(n, prefix=prefix)
    for rec in out:
        rec["metadata"] = {"tag": "x"}
        rec["text"] = f"secret of {prefix}"
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tenants(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """Org A with cluster A1 (real engine) and A2 (a row; only its key matters), org B with cluster B1 (real
    engine); both real clusters hold a collection ``docs`` with their own records."""
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50002))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        a = await signup(client, "iso-a", "Isolation A")
        b = await signup(client, "iso-b", "Isolation B")
        a1 = (await create_cluster(client, a.access_token, a.project_id, name="a1"))["id"]
        b1 = (await create_cluster(client, b.access_token, b.project_id, name="b1"))["id"]
        a2 = await insert_cluster(app, a.org_id, a.project_id, "RUNNING")
        spec = {
            "name": "docs",
            "dimension": 4,
            "metric": "cosine",
            "fields": [{"name": "tag", "type": "string"}],
            "text_field": "body",
        }
        try:
            for t, cid, prefix in ((a, a1, "d"), (b, b1, "b")):
                ok(await client.post(dp(cid), json=spec, headers=t.headers), 201)
                ok(await client.post(dp(cid, "/docs/upsert"), json={"records": _docs(prefix, 10)}, headers=t.headers))
            keys = {
                "b_org": (await create_key(client, b, org_role="org_owner"))["key"],
                "a_other_cluster": (
                    await create_key(
                        client,
                        a,
                        project_roles=[{"project_id": a.project_id, "role": "project_admin", "cluster_ids": [a2]}],
                    )
                )["key"],
                "a_reader": (
                    await create_key(client, a, project_roles=[{"project_id": a.project_id, "role": "data_reader"}])
                )["key"],
                "a_writer_a1": (
                    await create_key(
                        client,
                        a,
                        project_roles=[{"project_id": a.project_id, "role": "data_writer", "cluster_ids": [a1]}],
                    )
                )["key"],
            }
            yield {"a": a, "b": b, "a1": a1, "a2": a2, "b1": b1, "keys": keys}
        finally:
            for t, cid in ((a, a1), (b, b1)):
                await client.delete(f"/v1/clusters/{cid}", headers=t.headers)
            await set_status(app, a2, "DELETED")


async def _a1_state(client: httpx.AsyncClient, w: dict[str, Any]) -> Any:
    a, a1 = w["a"], w["a1"]
    colls = ok(await client.get(dp(a1), headers=a.headers))
    fetched = ok(
        await client.post(
            dp(a1, "/docs/fetch"), json={"ids": [f"d{i}" for i in range(10)] + ["evil"], "include_vectors": True},
            headers=a.headers,
        )
    )  # fmt: skip
    return sorted(c["name"] for c in colls["items"]), sorted(fetched["records"], key=lambda r: r["id"])


@pytest.mark.parametrize(("method", "rest", "body", "writes"), ROUTES, ids=[f"{m} {p or '/'}" for m, p, _, _ in ROUTES])
async def test_tenant_isolation(
    client: httpx.AsyncClient,
    tenants: dict[str, Any],
    method: str,
    rest: str,
    body: dict[str, Any] | None,
    writes: bool,
) -> None:
    w = tenants
    a1, a2, b1, keys = w["a1"], w["a2"], w["b1"], w["keys"]
    before = await _a1_state(client, w)

    async def call(token: str, cluster_id: str) -> httpx.Response:
        return await client.request(method, dp(cluster_id, rest), json=body, headers=auth(token))

    # Another organization's key (and its owner's session): A's cluster does not exist for them.
    missing = problem(await call(keys["b_org"], a1), 404, "cluster_not_found")
    # (A's records are "d0".."d9" with the text "secret of d": quoted, so a random cluster id holding "d0" is no hit)
    assert "secret" not in str(missing) and "'d0'" not in str(missing) and '"d0"' not in str(missing)
    problem(await call(w["b"].access_token, a1), 404, "cluster_not_found")
    # The same answer as for a cluster that does not exist at all.
    nothing = problem(await call(keys["b_org"], "cl_00000000000000000000000000"), 404, "cluster_not_found")
    assert set(missing) == set(nothing)
    # A key for another cluster of the same project: A1 does not exist for it either.
    problem(await call(keys["a_other_cluster"], a1), 404, "cluster_not_found")
    # A data_reader key: reads go through, writes are refused before reaching the engine.
    if writes:
        problem(await call(keys["a_reader"], a1), 403, "forbidden")
    else:
        r = await call(keys["a_reader"], a1)
        assert r.status_code == 200, r.text
        assert "secret of b" not in r.text and '"b0"' not in r.text
    # A key limited to A1 is refused on the project's other cluster and on B's cluster with the same 404.
    problem(await call(keys["a_writer_a1"], a2), 404, "cluster_not_found")
    problem(await call(keys["a_writer_a1"], b1), 404, "cluster_not_found")

    # Nothing of A changed, and B still sees only its own data.
    assert await _a1_state(client, w) == before
    b_docs = ok(await client.post(dp(w["b1"], "/docs/query"), json={"limit": 100}, headers=auth(keys["b_org"])))
    assert sorted(r["id"] for r in b_docs["records"]) == sorted(f"b{i}" for i in range(10))


async def test_cluster_limited_key_lists_only_its_cluster(client: httpx.AsyncClient, tenants: dict[str, Any]) -> None:
    w = tenants
    a = w["a"]
    seen = ok(await client.get(f"/v1/projects/{a.project_id}/clusters", headers=auth(w["keys"]["a_writer_a1"])))
    assert [c["id"] for c in seen["items"]] == [w["a1"]]
    everything = ok(await client.get(f"/v1/projects/{a.project_id}/clusters", headers=a.headers))
    assert {w["a1"], w["a2"]} <= {c["id"] for c in everything["items"]}
    problem(
        await client.get(f"/v1/projects/{a.project_id}/clusters", headers=auth(w["keys"]["b_org"])),
        404,
        "project_not_found",
    )


async def test_search_results_never_cross_tenants(client: httpx.AsyncClient, tenants: dict[str, Any]) -> None:
    """Both tenants have a collection ``docs``; each search sees only its own records, even with identical
    vectors and text."""
    w = tenants
    for key, cid, prefix in ((w["keys"]["a_writer_a1"], w["a1"], "d"), (w["keys"]["b_org"], w["b1"], "b")):
        res = ok(
            await client.post(
                dp(cid, "/docs/search"), json={"vector": records(1)[0]["vector"], "top_k": 100}, headers=auth(key)
            )
        )
        assert {m["id"][0] for m in res["results"]} == {prefix}
        hyb = ok(
            await client.post(
                dp(cid, "/docs/hybrid-search"),
                json={"vector": records(1)[0]["vector"], "text": "secret", "top_k": 100},
                headers=auth(key),
            )
        )
        assert {m["id"][0] for m in hyb["results"]} == {prefix}


# -- clusters that are not RUNNING --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "plan"),
    [("CREATING", "serverless"), ("MODIFYING", "dedicated"), ("SUSPENDED", "dedicated"), ("FAILED", "serverless")],
)
async def test_not_running_is_503_with_retry_after(
    client: httpx.AsyncClient, app: FastAPI, tenants: dict[str, Any], status: str, plan: str
) -> None:
    a = tenants["a"]
    cid = await insert_cluster(app, a.org_id, a.project_id, status, plan=plan)
    try:
        doc = problem(await client.post(dp(cid, "/docs/count"), json={}, headers=a.headers), 503, "cluster_not_ready")
        assert status in doc["detail"]
        r = await client.get(dp(cid), headers=a.headers)
        assert int(r.headers["retry-after"]) >= 1
        # A dedicated cluster is not resumed by a data-plane call.
        assert (await cluster_row(app, cid)).status == status
        # Authorization still comes first: another tenant gets a 404, not a hint that the cluster exists.
        problem(
            await client.post(dp(cid, "/docs/count"), json={}, headers=tenants["b"].headers), 404, "cluster_not_found"
        )
    finally:
        await set_status(app, cid, "DELETED")


# -- engine errors, limits ----------------------------------------------------------------------------------
async def test_engine_errors_come_back_unchanged(
    client: httpx.AsyncClient, app: FastAPI, tenants: dict[str, Any]
) -> None:
    w = tenants
    a1, h = w["a1"], auth(w["keys"]["a_writer_a1"])
    row = await cluster_row(app, a1)
    token = tasks.engine_token(row)
    cases = [
        ("POST", "/docs/upsert", {"records": [{"id": "bad", "vector": [1.0, 2.0]}]}, 422),  # wrong dimension
        ("POST", "/docs/search", {"vector": [1.0, 2.0, 3.0], "top_k": 3}, 422),
        ("POST", "/docs/search", {"vector": [1.0, 0, 0, 0], "top_k": 3, "filter": {"nope": 1}}, 400),
        ("POST", "/docs/search", {"vector": [1.0, 0, 0, 0], "top_k": 3, "filter": {"tag": {"$bogus": 1}}}, 400),
        ("POST", "/nope/count", {}, 404),
        ("POST", "", {"name": "docs", "dimension": 4, "metric": "cosine"}, 409),
    ]
    async with httpx.AsyncClient(base_url=row.engine_url, headers=auth(token)) as engine:
        for method, rest, body, status in cases:
            via_edge = await client.request(method, dp(a1, rest), json=body, headers=h)
            direct = await engine.request(method, f"/v1/collections{rest}", json=body)
            assert direct.status_code == status, direct.text
            assert via_edge.status_code == status, via_edge.text
            assert via_edge.headers["content-type"] == direct.headers["content-type"]
            assert via_edge.headers["content-type"].startswith("application/problem+json")
            # the same problem, except that behind the edge its `instance` is the public path
            public, own = via_edge.json(), direct.json()
            assert public.pop("instance") == dp(a1, rest) and own.pop("instance") == f"/v1/collections{rest}"
            assert public == own
    # A body that is not JSON at all reaches the engine untouched and gets its 400.
    r = await client.post(
        dp(a1, "/docs/upsert"), content=b"{not json", headers={**h, "content-type": "application/json"}
    )
    problem(r, 400)
    # Nothing of the bad batches was applied.
    assert ok(await client.post(dp(a1, "/docs/count"), json={}, headers=h)) == {"count": 10}


async def test_large_bodies_pass_the_control_plane_limit(client: httpx.AsyncClient, tenants: dict[str, Any]) -> None:
    """The 1 MiB control-plane body limit does not apply to the data plane (default limit 64 MiB)."""
    w = tenants
    a1, h = w["a1"], auth(w["keys"]["a_writer_a1"])
    ok(await client.post(dp(a1), json={"name": "wide", "dimension": 384, "metric": "l2"}, headers=h), 201)
    try:
        recs = records(800, dimension=384, prefix="w")
        payload = {"records": recs}
        import orjson

        raw = orjson.dumps(payload)
        assert len(raw) > 1 << 20
        r = await client.post(dp(a1, "/wide/upsert"), content=raw, headers={**h, "content-type": "application/json"})
        assert ok(r) == {"upserted_count": 800}
    finally:
        ok(await client.delete(dp(a1, "/wide"), headers=w["a"].headers))


@pytest_asyncio.fixture(loop_scope="session")
async def tight_app(app: FastAPI) -> AsyncIterator[FastAPI]:
    """A second API instance (same database) with a small data-plane body limit and low rate limits."""
    env = {
        "VECTA_DATAPLANE_MAX_BODY_BYTES": "4096",
        "VECTA_DATAPLANE_RATE_PER_KEY": "5",
        "VECTA_DATAPLANE_RATE_PER_CLUSTER": "12",
    }
    async with api_with(env) as tight:
        yield tight


async def test_body_limit_is_413(tight_app: FastAPI, tenants: dict[str, Any]) -> None:
    w = tenants
    a1 = w["a1"]
    transport = httpx.ASGITransport(app=tight_app, client=("127.0.0.1", 50003))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        # A key of its own (this app allows 5 requests a second per key; counters may be shared through Redis).
        roles = [{"project_id": w["a"].project_id, "role": "data_writer", "cluster_ids": [a1]}]
        h = auth((await create_key(c, w["a"], project_roles=roles))["key"])
        await _next_second()
        big = {"records": records(200, prefix="big")}
        doc = problem(await c.post(dp(a1, "/docs/upsert"), json=big, headers=h), 413, "payload_too_large")
        assert "4096" in doc["detail"]

        # Without a Content-Length (chunked), the limit holds while the body streams in.
        import orjson

        raw = orjson.dumps(big)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(raw), 1000):
                yield raw[i : i + 1000]

        r = await c.post(dp(a1, "/docs/upsert"), content=chunks(), headers={**h, "content-type": "application/json"})
        problem(r, 413, "payload_too_large")
        # Under the limit it goes through.
        small = {"records": records(2, prefix="d")}
        assert len(orjson.dumps(small)) < 4096
        assert ok(await c.post(dp(a1, "/docs/upsert"), json=small, headers=h)) == {"upserted_count": 2}
        owner = w["a"].headers  # (a console session: not limited per key)
        assert ok(await c.post(dp(a1, "/docs/count"), json={}, headers=owner)) == {"count": 10}
        assert ok(await c.post(dp(a1, "/docs/fetch"), json={"ids": ["big0"]}, headers=owner)) == {"records": []}


async def _next_second() -> None:
    import asyncio
    import time

    await asyncio.sleep(1.02 - time.time() % 1)


async def test_rate_limits_are_429_with_retry_after(tight_app: FastAPI, tenants: dict[str, Any]) -> None:
    w = tenants
    a1 = w["a1"]
    transport = httpx.ASGITransport(app=tight_app, client=("127.0.0.1", 50004))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        # Per API key: 5 requests a second.
        key = (await create_key(c, w["a"], project_roles=[{"project_id": w["a"].project_id, "role": "data_reader"}]))[
            "key"
        ]
        await _next_second()  # fresh one-second windows (counters may be shared with other tests through Redis)
        codes = []
        limited = None
        for _ in range(10):  # (under the cluster's 12 a second, so every refusal here is the key's)
            r = await c.post(dp(a1, "/docs/count"), json={}, headers=auth(key))
            codes.append(r.status_code)
            if r.status_code == 429 and limited is None:
                limited = r
        assert set(codes) == {200, 429}, codes
        assert codes.count(200) <= 10
        assert limited is not None
        doc = problem(limited, 429, "rate_limited")
        assert "API key" in doc["detail"]
        assert int(limited.headers["retry-after"]) >= 1

        # Per cluster: 12 a second, whoever asks (console sessions are not limited per key).
        await _next_second()
        codes = [(await c.post(dp(a1, "/docs/count"), json={}, headers=w["a"].headers)).status_code for _ in range(30)]
        assert 429 in codes and codes.count(200) <= 24, codes
        # Another tenant's cluster has its own budget.
        r = await c.post(dp(w["b1"], "/docs/count"), json={}, headers=w["b"].headers)
        assert r.status_code == 200, r.text


async def test_unknown_cluster_and_bad_credentials(client: httpx.AsyncClient, tenants: dict[str, Any]) -> None:
    a1 = tenants["a1"]
    problem(await client.post(dp(a1, "/docs/count"), json={}), 401)
    problem(await client.post(dp(a1, "/docs/count"), json={}, headers=auth("vk_nope_nope")), 401)
    problem(await client.get(dp("cl_doesnotexist"), headers=tenants["a"].headers), 404, "cluster_not_found")

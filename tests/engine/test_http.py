"""The HTTP surface: auth, routes, problem+json errors, validation naming record and field, atomic batches."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from services.engine.schema import MAX_UPSERT_RECORDS

pytestmark = pytest.mark.asyncio


async def _mk(client, **extra):
    body = {
        "name": "items",
        "dimension": 4,
        "metric": "cosine",
        "fields": [
            {"name": "genre", "type": "string"},
            {"name": "year", "type": "int"},
            {"name": "tags", "type": "string[]"},
        ],
        "text_field": "body",
        **extra,
    }
    r = await client.post("/v1/collections", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def _problem(r, status, code=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert set(body) >= {"type", "title", "status", "detail", "code"}
    assert body["status"] == status
    if code:
        assert body["code"] == code, body
    return body


async def test_auth_required(app_client):
    client, _ = app_client
    r = await client.get("/v1/collections", headers={"Authorization": "Bearer wrong"})
    _problem(r, 401, "unauthorized")
    r = await client.get("/v1/collections", headers={"Authorization": ""})
    _problem(r, 401)
    assert (await client.get("/healthz")).status_code == 200


async def test_collection_lifecycle(app_client):
    client, _ = app_client
    desc = await _mk(client)
    assert desc["vector_count"] == 0 and desc["index"]["type"] == "auto"
    _problem(await client.post("/v1/collections", json={"name": "items", "dimension": 4}), 409, "collection_exists")
    listing = (await client.get("/v1/collections")).json()
    assert [c["name"] for c in listing["items"]] == ["items"]
    r = await client.post(
        "/v1/collections/items/upsert",
        json={
            "records": [
                {
                    "id": "a",
                    "vector": [1, 0, 0, 0],
                    "metadata": {"genre": "x", "year": 2020, "tags": ["t1"]},
                    "text": "hi",
                },
                {"id": "b", "vector": [0, 1, 0, 0]},
            ]
        },
    )
    assert r.json() == {"upserted_count": 2}
    assert (await client.get("/v1/collections/items")).json()["vector_count"] == 2
    r = await client.post(
        "/v1/collections/items/search", json={"vector": [1, 0.1, 0, 0], "top_k": 2, "include_metadata": True}
    )
    res = r.json()["results"]
    assert [x["id"] for x in res] == ["a", "b"]
    assert res[0]["metadata"] == {"genre": "x", "year": 2020, "tags": ["t1"]}
    assert math.isclose(res[0]["score"], 1 / math.sqrt(1.01), rel_tol=1e-5)
    r = await client.post("/v1/collections/items/search", json={"vectors": [[1, 0, 0, 0], [0, 1, 0, 0]], "top_k": 1})
    assert [[x["id"] for x in row] for row in r.json()["results"]] == [["a"], ["b"]]
    r = await client.post("/v1/collections/items/fetch", json={"ids": ["a", "zz"], "include_vectors": True})
    recs = r.json()["records"]
    assert len(recs) == 1 and recs[0]["id"] == "a" and np.allclose(recs[0]["vector"], [1, 0, 0, 0])
    assert (await client.post("/v1/collections/items/count", json={"filter": {"year": {"$gte": 2000}}})).json() == {
        "count": 1
    }
    r = await client.post("/v1/collections/items/delete", json={"ids": ["a"]})
    assert r.json() == {"deleted_count": 1}
    assert (await client.post("/v1/collections/items/count", json={})).json() == {"count": 1}
    assert (await client.delete("/v1/collections/items")).status_code == 200
    _problem(await client.get("/v1/collections/items"), 404, "collection_not_found")
    _problem(await client.post("/v1/collections/items/search", json={"vector": [1, 0, 0, 0]}), 404)


async def test_metrics_and_stats(app_client):
    client, _ = app_client
    await _mk(client)
    await client.post("/v1/collections/items/upsert", json={"records": [{"id": "a", "vector": [1, 2, 3, 4]}]})
    await client.post("/v1/collections/items/search", json={"vector": [1, 2, 3, 4], "top_k": 1})
    m = await client.get("/metrics")
    assert m.status_code == 200 and b"vecta_engine_requests_total" in m.content
    assert b'vecta_engine_vectors{collection="items"} 1.0' in m.content
    s = (await client.get("/internal/stats")).json()
    c = s["collections"][0]
    assert c["vector_count"] == 1 and c["write_units"] == 1 and c["read_units"] >= 1
    assert c["bytes_on_disk"] > 0 and c["bytes_in_memory"] > 0 and s["rss_bytes"] > 0


@pytest.mark.parametrize(
    ("records", "status", "code", "needle"),
    [
        (
            [{"id": "ok", "vector": [1, 2, 3, 4]}, {"id": "bad", "vector": [1, 2, 3]}],
            422,
            "dimension_mismatch",
            "records[1]",
        ),
        (
            [{"id": "ok", "vector": [1, 2, 3, 4]}, {"id": "ok", "vector": [1, 2, 3, 4]}],
            422,
            "duplicate_id",
            "records[1]",
        ),
        (
            [{"id": "ok", "vector": [1, 2, 3, 4]}, {"id": "x", "vector": [1, 2, 3, 1e39]}],
            422,
            "invalid_vector",
            "records[1]",
        ),
        (
            [{"id": "ok", "vector": [1, 2, 3, 4]}, {"id": "x", "vector": [1, "a", 3, 4]}],
            400,
            "validation_error",
            "vector[1]",
        ),
        ([{"id": "ok", "vector": [1, 2, 3, 4], "metadata": {"nope": 1}}], 400, "unknown_field", "metadata.nope"),
        ([{"id": "ok", "vector": [1, 2, 3, 4], "metadata": {"year": "2020"}}], 400, "type_mismatch", "metadata.year"),
        ([{"id": "ok", "vector": [1, 2, 3, 4], "metadata": {"tags": "x"}}], 400, "type_mismatch", "metadata.tags"),
        ([{"id": "ok", "vector": [1, 2, 3, 4], "extra": 1}], 400, "unknown_field", "extra"),
        ([{"id": "x" * 65, "vector": [1, 2, 3, 4]}], 400, "validation_error", "records[0]"),
        ([{"id": "z", "vector": [0, 0, 0, 0]}], 422, "invalid_vector", "records[0]"),
        # finite components, but a length beyond float32 (a cosine collection keeps each vector's length)
        (
            [{"id": "ok", "vector": [1, 2, 3, 4]}, {"id": "h", "vector": [3e38, 3e38, 0, 0]}],
            422,
            "invalid_vector",
            "records[1]",
        ),
        ([{"vector": [1, 2, 3, 4]}], 400, "validation_error", "records[0]"),
    ],
)
async def test_bad_upserts_name_the_record_and_apply_nothing(app_client, records, status, code, needle):
    client, _ = app_client
    await _mk(client)
    r = await client.post("/v1/collections/items/upsert", json={"records": records})
    body = _problem(r, status, code)
    assert needle in body["detail"], body
    assert (await client.post("/v1/collections/items/count", json={})).json() == {"count": 0}


async def test_large_components_keep_their_value_under_cosine(app_client):
    """Lengths are computed in float64: in float32 the square of 1e20 overflows, the length was infinite, and the
    vector came back as nulls."""
    client, _ = app_client
    await _mk(client)
    vec = [1e20, 1.0, -3e19, 2.0]
    r = await client.post("/v1/collections/items/upsert", json={"records": [{"id": "big", "vector": vec}]})
    assert r.status_code == 200, r.text
    got = (await client.post("/v1/collections/items/fetch", json={"ids": ["big"], "include_vectors": True})).json()
    back = got["records"][0]["vector"]
    assert back == [float(np.float32(x)) for x in vec], back
    hits = (await client.post("/v1/collections/items/search", json={"vector": vec, "top_k": 1})).json()["results"]
    assert hits[0]["id"] == "big" and abs(hits[0]["score"] - 1.0) < 1e-5


async def test_nan_and_garbage_json(app_client):
    client, _ = app_client
    await _mk(client)
    r = await client.post("/v1/collections/items/upsert", content=b'{"records": [{"id": "a", "vector": [NaN,1,2,3]}]}')
    _problem(r, 400, "invalid_json")
    r = await client.post("/v1/collections/items/upsert", content=b"not json")
    _problem(r, 400, "invalid_json")
    r = await client.post("/v1/collections/items/search", content=b"[1,2]")
    _problem(r, 400)


async def test_batch_limits_413(app_client):
    client, _ = app_client
    await _mk(client)
    recs = [{"id": str(i), "vector": [1, 2, 3, 4]} for i in range(MAX_UPSERT_RECORDS + 1)]
    _problem(await client.post("/v1/collections/items/upsert", json={"records": recs}), 413, "batch_too_large")
    _problem(await client.post("/v1/collections/items/fetch", json={"ids": ["a"] * 10_001}), 413)
    big = b'{"records": [' + b" " * (65 << 20) + b"]}"
    _problem(await client.post("/v1/collections/items/upsert", content=big), 413, "body_too_large")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"vector": [1, 2, 3], "top_k": 1}, 422, "dimension"),
        ({"vector": [1, 2, 3, 4], "top_k": 0}, 400, "top_k"),
        ({"vector": [1, 2, 3, 4], "top_k": 5, "filter": {"unknown": 1}}, 400, "unknown"),
        ({"vector": [1, 2, 3, 4], "top_k": 5, "filter": {"year": {"$gt": "x"}}}, 400, "filter.year"),
        ({"vector": [1, 2, 3, 4], "top_k": 5, "filter": {"year": {"$regex": "x"}}}, 400, "$regex"),
        ({"vector": [1, 2, 3, 4], "top_k": 5, "filter": {"genre": {"$gt": "a"}}}, 400, "numeric"),
        ({"vector": [1, 2, 3, 4], "top_k": 5, "filter": {"$or": {}}}, 400, "$or"),
        ({"vector": [1, 2, 3, 4], "vectors": [[1, 2, 3, 4]]}, 400, "exactly one"),
        ({"vector": [1, 2, 3, 4], "params": {"ef": -1}}, 400, "ef"),
        ({"vector": [1, 2, 3, 4], "bogus": 1}, 400, "bogus"),
    ],
)
async def test_bad_searches(app_client, body, status, needle):
    client, _ = app_client
    await _mk(client)
    r = await client.post("/v1/collections/items/search", json=body)
    assert needle in _problem(r, status)["detail"]


async def test_bad_collections(app_client):
    client, _ = app_client
    for body, needle in [
        ({"name": "x", "dimension": 0}, "dimension"),
        ({"name": "x", "dimension": 16_385}, "dimension"),
        ({"name": "bad name", "dimension": 4}, "name"),
        ({"name": "x", "dimension": 4, "metric": "hamming"}, "metric"),
        ({"name": "x", "dimension": 4, "index": {"type": "lsh"}}, "index.type"),
        ({"name": "x", "dimension": 4, "index": {"type": "hnsw", "params": {"M": 1}}}, "M"),
        ({"name": "x", "dimension": 4, "fields": [{"name": "a", "type": "date"}]}, "fields[0].type"),
    ]:
        r = await client.post("/v1/collections", json=body)
        assert needle in _problem(r, 400)["detail"]
    r = await client.post(
        "/v1/collections", json={"name": "x", "dimension": 10, "index": {"type": "ivf_pq", "params": {"m": 3}}}
    )
    _problem(r, 422, "invalid_index_params")
    _problem(await client.get("/v1/nothing"), 404, "route_not_found")
    _problem(await client.get("/v1/collections/x/search"), 405, "method_not_allowed")


async def test_query_pagination_and_delete_by_filter(app_client):
    client, _ = app_client
    await _mk(client)
    recs = [{"id": f"r{i:03d}", "vector": [1, i, 0, 1], "metadata": {"year": i}} for i in range(250)]
    await client.post("/v1/collections/items/upsert", content=orjson.dumps({"records": recs}))
    seen, cursor = [], None
    while True:
        body = {"filter": {"year": {"$lt": 120}}, "limit": 50}
        if cursor:
            body["cursor"] = cursor
        page = (await client.post("/v1/collections/items/query", json=body)).json()
        seen += [r["id"] for r in page["records"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [f"r{i:03d}" for i in range(120)]
    r = await client.post("/v1/collections/items/delete", json={"filter": {"year": {"$gte": 200}}})
    assert r.json() == {"deleted_count": 50}
    assert (await client.post("/v1/collections/items/count", json={})).json() == {"count": 200}
    _problem(await client.post("/v1/collections/items/delete", json={}), 400)


@pytest.mark.asyncio
async def test_responses_carry_content_length(app_client):
    """Every response (JSON, problem+json, metrics) has a content-length: no chunked framing."""
    client, _ = app_client
    for r in (
        await client.get("/healthz"),
        await client.get("/v1/collections"),
        await client.get("/v1/collections/nope"),
        await client.get("/metrics"),
    ):
        assert r.headers.get("content-length") == str(len(r.content)), r.headers
        assert "transfer-encoding" not in r.headers

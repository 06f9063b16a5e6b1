"""Search body parsing: the simdjson fast path for query vectors must give exactly what the orjson path gives
(same queries, same parameters), leave every doubtful body to the orjson path, and so produce the same
400/413/422 errors naming the field (never a 500). Multi-query searches split across threads return the
same results as one call."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from services.core.errors import VectaError
from services.engine import schema
from services.engine.schema import fast_search

from .conftest import create, upsert

needs_simdjson = pytest.mark.skipif(schema._simdjson is None, reason="pysimdjson is not installed")

FIELDS = [{"name": "genre", "type": "string"}, {"name": "year", "type": "int"}]


@pytest.fixture
def coll(make_engine):
    eng = make_engine()
    return create(eng, "c", dim=4, metric="cosine", fields=FIELDS, text_field="body")


def _outcome(coll, body: bytes, fast_on: bool, hybrid: bool = False):
    old = schema.FAST_PARSE
    schema.FAST_PARSE = fast_on
    try:
        p = coll.parse_search_body(body, hybrid)
    except VectaError as exc:
        return ("error", exc.status, exc.code, exc.detail)
    finally:
        schema.FAST_PARSE = old
    q = p.pop("q")
    flt = p.pop("filter")
    return ("ok", None if q is None else (q.dtype.str, q.shape, q.tobytes()), type(flt).__name__, p)


GOOD = [
    {"vector": [1, 2, 3, 4]},
    {"vector": [0.1, -2.5e-3, 3e10, 4], "top_k": 3, "params": {"ef": 40}, "include_metadata": True},
    {"vectors": [[1, 2, 3, 4]]},
    {"vectors": [[i + 1, 0.5, -0.25, 1e-30] for i in range(7)], "top_k": 5, "filter": {"genre": {"$in": ["a["]}}},
    {"top_k": 2, "vector": [1, 2, 3, 3.4028234e38], "filter": {"$or": [{"year": {"$gt": 3}}, {"genre": "]"}]}},
]


@needs_simdjson
@pytest.mark.parametrize("doc", GOOD)
def test_fast_search_is_taken_and_identical(coll, doc):
    body = orjson.dumps(doc)
    assert fast_search(body, 4) is not None
    fast = _outcome(coll, body, True)
    assert fast == _outcome(coll, body, False)
    assert fast[0] == "ok"


@needs_simdjson
def test_fast_search_hybrid_identical(coll):
    body = orjson.dumps({"vector": [1, 2, 3, 4], "text": "hello [world]", "fusion": {"method": "weighted"}})
    assert fast_search(body, 4) is not None
    assert _outcome(coll, body, True, hybrid=True) == _outcome(coll, body, False, hybrid=True)
    assert _outcome(coll, body, True, hybrid=True)[0] == "ok"


BAD = [
    # nested arrays that flatten to the right length: only the bracket count catches them
    b'{"vector": [1, [2], 3, 4]}',
    b'{"vector": [[1], [2], [3], [4]]}',
    b'{"vectors": [[1, [2], 3, 4]]}',
    b'{"vectors": [[1, 2, 3, 4], [[1, 2, 3, 4]]]}',
    b'{"vectors": [[1, 2], [3, 4], [1, 2], [3, 4]]}',
    b'{"vectors": [[1, 2, 3, 4]], "filter": {"genre": "["}, "x": [1, [2]]}',
    b'{"vec\\u0074or": [1, [2], 3, 4]}',
    b'{"filter": {"genre": "\\u005b"}, "vector": [1, [2], 3, 4]}',
    # wrong element types and values
    b'{"vector": [1, true, 3, 4]}',
    b'{"vector": [1, "2", 3, 4]}',
    b'{"vector": [1, null, 3, 4]}',
    b'{"vector": [1, 2, 3, 1e39]}',
    b'{"vectors": [[1, 2, 3, 4], [1, 2, 3, -1e39]]}',
    b'{"vector": [1, 2, 3, 1e400]}',
    b'{"vector": [1, 2, 3, 123456789012345678901234567890]}',
    b'{"vector": [1, 2, 3]}',
    b'{"vectors": [[1, 2, 3, 4], [1, 2, 3]]}',
    b'{"vector": []}',
    b'{"vectors": []}',
    b'{"vectors": [1, 2, 3, 4]}',
    b'{"vector": {"x": 1}}',
    b'{"vector": 5}',
    b'{"vector": null}',
    b'{"vector": [0, 0, 0, 0]}',
    b'{"vectors": [[1, 2, 3, 4], [0, 0, 0, 0]]}',
    # body structure
    b'{"vector": [1, 2, 3, 4], "vectors": [[1, 2, 3, 4]]}',
    b'{"vector": [1, 2, 3, 4], "vector": [1, [2], 3, 4]}',
    b'{"vector": [1, 2, 3, 4], "top_k": 0}',
    b'{"vector": [1, 2, 3, 4], "top_k": 5000}',
    b'{"vector": [1, 2, 3, 4], "top_k": true}',
    b'{"vector": [1, 2, 3, 4], "nope": 1}',
    b'{"vector": [1, 2, 3, 4], "text": "x"}',
    b'{"vector": [1, 2, 3, 4], "params": {"ef": 0}}',
    b'{"vector": [1, 2, 3, 4], "params": {"zz": 1}}',
    b'{"vector": [1, 2, 3, 4], "include_vectors": 1}',
    b'{"vector": [1, 2, 3, 4], "filter": {"year": {"$gt": "x"}}}',
    b'{"vector": [1, 2, 3, 4], "filter": {"nope": 1}}',
    b'{"vector": [1, 2, 3, 4]} trailing',
    b'{"vector": [1, 2, 3, 4]',
    b'{"vector": [1, 2, 3, 4], "filter": {"genre": "\xff"}}',
    b"[]",
    b"",
]


@pytest.mark.parametrize("body", BAD)
def test_bad_search_bodies_same_outcome_on_both_paths(coll, body):
    slow = _outcome(coll, body, False)
    if schema._simdjson is not None:
        assert _outcome(coll, body, True) == slow
    if slow[0] == "ok":  # the orjson path accepted it (duplicate keys: last one wins): fine, but the same
        return
    assert slow[1] in (400, 413, 422)


def test_too_many_queries_same_outcome(coll):
    body = orjson.dumps({"vectors": [[1, 2, 3, 4]] * (schema.MAX_QUERIES + 1)})
    assert _outcome(coll, body, True) == _outcome(coll, body, False)
    assert _outcome(coll, body, False)[1] == 413


@needs_simdjson
@pytest.mark.parametrize(
    "body",
    [
        b'{"vector": [1, [2], 3, 4]}',
        b'{"vectors": [[1, 2], [3, 4], [1, 2], [3, 4]]}',
        b'{"vectors": [[1, [2], 3, 4]]}',
        b'{"vector": [1, 2, 3, 4], "vector": [1, [2], 3, 4]}',
        b'{"filter": {"genre": "\\u005b"}, "vector": [1, [2], 3, 4]}',
    ],
)
def test_fast_search_declines_nested_vectors(body):
    assert fast_search(body, 4) is None


@pytest.mark.asyncio
@pytest.mark.parametrize("fast_on", [True, False], ids=["fast", "orjson"])
@pytest.mark.parametrize(
    "body,status,needle",
    [
        (b'{"vectors": [[1, 2, 3, 4], [1, [2], 3, 4]]}', 400, "vectors[1]"),
        (b'{"vectors": [[1, 2, 3, 4], [1, 2, 3, 1e39]]}', 422, "vectors[1]"),
        (b'{"vectors": [[1, 2, 3, 4], [1, 2, 3]]}', 422, "vectors[1]"),
        (b'{"vector": [1, 2, "x", 4]}', 400, "vector"),
        (b'{"vector": [1, 2, 3, 4], "top_k": -1}', 400, "top_k"),
    ],
)
async def test_http_bad_search_names_field(app_client, monkeypatch, fast_on, body, status, needle):
    monkeypatch.setattr(schema, "FAST_PARSE", fast_on)
    client, _ = app_client
    r = await client.post("/v1/collections", json={"name": "items", "dimension": 4, "metric": "l2"})
    assert r.status_code == 201
    r = await client.post("/v1/collections/items/search", content=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


@pytest.mark.asyncio
async def test_http_multi_query_split_matches_single_queries(app_client):
    """A `vectors` request (split across the search threads) returns, in order, what each query returns alone."""
    client, _ = app_client
    r = await client.post("/v1/collections", json={"name": "items", "dimension": 8, "metric": "ip"})
    assert r.status_code == 201
    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 8)).astype(np.float32)
    body = {"records": [{"id": f"r{i}", "vector": X[i]} for i in range(len(X))]}
    r = await client.post("/v1/collections/items/upsert", content=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))
    assert r.json() == {"upserted_count": 300}
    Q = rng.standard_normal((13, 8)).astype(np.float32)
    r = await client.post(
        "/v1/collections/items/search",
        content=orjson.dumps({"vectors": Q, "top_k": 4}, option=orjson.OPT_SERIALIZE_NUMPY),
    )
    assert r.status_code == 200, r.text
    multi = r.json()["results"]
    assert len(multi) == len(Q)
    for i, q in enumerate(Q):
        r = await client.post(
            "/v1/collections/items/search",
            content=orjson.dumps({"vector": q, "top_k": 4}, option=orjson.OPT_SERIALIZE_NUMPY),
        )
        assert [h["id"] for h in r.json()["results"]] == [h["id"] for h in multi[i]]
        expect = np.argsort(-(X @ q), kind="stable")[:4]
        assert [h["id"] for h in multi[i]] == [f"r{j}" for j in expect]


def test_parse_search_body_matches_search(coll):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((50, 4)).astype(np.float32)
    upsert(coll, [{"id": f"r{i}", "vector": X[i]} for i in range(50)])
    body = orjson.dumps({"vectors": X[:6], "top_k": 3}, option=orjson.OPT_SERIALIZE_NUMPY)
    a = coll.search(coll.parse_search_body(body))
    b = coll.search(coll.parse_search(orjson.loads(body)))
    assert a == b


@pytest.mark.asyncio
async def test_http_concurrent_single_queries_batched_match_alone(make_engine):
    """Concurrent single queries are micro-batched into shared faiss calls: each still gets exactly its own
    results (mixed top_k / ef / include flags never share a batch), and read units count every query."""
    import asyncio

    import httpx

    from services.engine.server import EngineApp

    from .conftest import TOKEN

    eng = make_engine()
    asgi = EngineApp(eng, TOKEN, manage_lifespan=False, inline_search=False)  # in-process requests never overlap
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgi), base_url="http://engine", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    r = await client.post(
        "/v1/collections",
        json={"name": "items", "dimension": 8, "metric": "cosine", "index": {"type": "hnsw", "params": {"M": 8}}},
    )
    assert r.status_code == 201
    rng = np.random.default_rng(9)
    X = rng.standard_normal((400, 8)).astype(np.float32)
    body = {"records": [{"id": f"r{i}", "vector": X[i]} for i in range(len(X))]}
    r = await client.post("/v1/collections/items/upsert", content=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))
    assert r.json() == {"upserted_count": 400}
    await client.post("/internal/flush")
    Q = rng.standard_normal((40, 8)).astype(np.float32)
    bodies = [
        orjson.dumps(
            {
                "vector": Q[i],
                "top_k": 5 if i % 10 == 0 else 3,
                "params": {"ef": 16 if i % 7 == 0 else 32},
                "include_vectors": i % 13 == 0,
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        for i in range(len(Q))
    ]
    alone = []
    for b in bodies:
        r = await client.post("/v1/collections/items/search", content=b)
        assert r.status_code == 200, r.text
        alone.append(r.json()["results"])
    coll = eng.collections["items"]
    for _ in range(10):  # let the last runner notice it has nothing left (it holds the unwrapped search)
        if not asgi._batch_runners:
            break
        await asyncio.sleep(0)
    assert not asgi._batch_runners
    units = coll.read_units
    sizes: list[int] = []
    search = coll.search

    def spy(p):
        sizes.append(len(p["q"]))
        return search(p)

    coll.search = spy
    rs = await asyncio.gather(*(client.post("/v1/collections/items/search", content=b) for b in bodies))
    assert [r.status_code for r in rs] == [200] * len(bodies)
    assert [r.json()["results"] for r in rs] == alone
    assert coll.read_units - units == len(bodies)
    assert sum(sizes) == len(bodies) and max(sizes) > 1, sizes  # some queries did share a faiss call
    await client.aclose()
    asgi.shutdown_pools()


SINGLE_TAKEN = [
    b'{"vector": [1, 2, 3, 4]}',
    b'{"vector": [0.1, -2.5e-3, 3e10, 4], "top_k": 3, "params": {"ef": 40}, "include_metadata": true}',
    b'{"top_k": 1000, "vector": [1, 2, 3, 4], "params": null, "include_vectors": true, "include_metadata": false}',
    b'{"vector": [1, 2, 3, 4], "params": {"nprobe": 7, "ef": 65536}}',
    b'{"vector": [1e37, -2, 3, 4]}',  # large, within float32
]
SINGLE_DECLINED = [
    b'{"vector": [1, 2, 3, 4], "filter": {"genre": "a"}}',  # a key it does not handle
    b'{"vectors": [[1, 2, 3, 4]]}',
    b'{"vector": [1, 2, [3], 4]}',  # nested
    b'{"vector": [1, 2, 3]}',  # wrong dimension: the usual path names it
    b'{"vector": [1, 2, 3, 4], "vector": [1, 2, 3, 4]}',  # repeated key
    b'{"vector": [1, 2, 3, "4"]}',
    b'{"vector": [1, 2, 3, 1e39]}',  # beyond float32
    b'{"vector": [1, 2, 3, 1e200]}',  # its square is beyond float64
    b'{"vector": [1, 2, 3, 4], "top_k": 0}',
    b'{"vector": [1, 2, 3, 4], "top_k": 2.0}',
    b'{"vector": [1, 2, 3, 4], "top_k": true}',
    b'{"vector": [1, 2, 3, 4], "params": {"ef": 0}}',
    b'{"vector": [1, 2, 3, 4], "params": {"ef": 10, "x": 1}}',
    b'{"vector": [1, 2, 3, 4], "params": [1]}',
    b'{"vector": [1, 2, 3, 4], "include_metadata": 1}',
    b'{"vector": [1, 2, 3, 4], "top_k": 3\\u0020}',
    b'{"vector": [1, 2, 3, 4]',
    b"[1, 2, 3, 4]",
]


@needs_simdjson
@pytest.mark.parametrize("body", SINGLE_TAKEN)
def test_single_search_agrees_with_parse_search(coll, body: bytes) -> None:
    """The engine's fast lane parser takes the plainest bodies and gives exactly the usual path's query and
    parameters (the rest of the fast lane is tested against the usual path over HTTP: test_fast_lane.py)."""
    got = schema.single_search(body, 4)
    assert got is not None
    q, top_k, ef, nprobe, inc_m, inc_v = got
    usual = coll.parse_search_body(body)
    raw = np.array(orjson.loads(body)["vector"], dtype=np.float32).reshape(1, 4)
    assert q.dtype == np.float32 and q.tobytes() == raw.tobytes()  # normalized later, as search_single does
    assert (top_k, inc_m, inc_v) == (usual["top_k"], usual["include_metadata"], usual["include_vectors"])
    assert (ef or coll.cfg.index_params.get("ef"), nprobe or coll.cfg.index_params.get("nprobe")) == (
        usual["ef"],
        usual["nprobe"],
    )
    unit = schema.unit_queries(q)
    assert unit is not None and unit.tobytes() == usual["q"].tobytes()


@pytest.mark.skipif(schema._fastlane is None, reason="the C fast lane is not built")
@pytest.mark.parametrize("body", SINGLE_TAKEN)
def test_native_parser_agrees_with_the_usual_path(coll, body: bytes) -> None:
    """The C fast lane's parser (schema._fastlane.parse_single) takes the same bodies and gives the same query
    and parameters as the usual path."""
    q = np.empty((1, 4), dtype=np.float32)
    got = schema._fastlane.parse_single(body, 4, q, schema.MAX_TOP_K)
    assert got is not None
    top_k, ef, nprobe, inc_m, inc_v = got
    usual = coll.parse_search_body(body)
    raw = np.array(orjson.loads(body)["vector"], dtype=np.float32).reshape(1, 4)
    assert q.tobytes() == raw.tobytes()
    assert (top_k, inc_m, inc_v) == (usual["top_k"], usual["include_metadata"], usual["include_vectors"])
    assert (ef or coll.cfg.index_params.get("ef"), nprobe or coll.cfg.index_params.get("nprobe")) == (
        usual["ef"],
        usual["nprobe"],
    )
    assert schema._fastlane.unit_rows(q, 1, 4)
    assert q.tobytes() == usual["q"].tobytes()


@needs_simdjson
@pytest.mark.parametrize("body", SINGLE_DECLINED)
def test_single_search_declines_what_it_does_not_handle(body: bytes) -> None:
    assert schema.single_search(body, 4) is None


@pytest.mark.skipif(schema._fastlane is None, reason="the C fast lane is not built")
@pytest.mark.parametrize(
    "body",
    [
        *SINGLE_DECLINED,
        b'{"vector": [1, 2, 3, 4]} x',  # trailing bytes
        b'{"vector": [1, 2, 3, 4],}',
        b'{"vector": [01, 2, 3, 4]}',  # not JSON numbers
        b'{"vector": [1., 2, 3, 4]}',
        b'{"vector": [.5, 2, 3, 4]}',
        b'{"vector": [1e, 2, 3, 4]}',
        b'{"vector": [+1, 2, 3, 4]}',
        b'{"vector": [NaN, 2, 3, 4]}',
        b'{"vector": [1, 2, 3, 4], "top_k": 1001}',
        b'{"vector": [1, 2, 3, 4], "top_k": 1e1}',
        b'{"vector": [1, 2, 3, 4], "params": {"ef": 1, "ef": 2}}',
        b'{"vector": [1, 2, 3, 4], "params": {"ef": 65537}}',
        b'{"vector": [1, 2, 3, 4], "include_vectors": null}',
        b'{"vec\\u0074or": [1, 2, 3, 4]}',
        b'{"vector": [1, 2, 3, 4], "top_k": 3, "top_k": 3}',
        b'{"top_k": 3}',
        b"",
        b"{}",
    ],
)
def test_native_parser_declines_what_it_does_not_handle(body: bytes) -> None:
    q = np.zeros((1, 4), dtype=np.float32)
    assert schema._fastlane.parse_single(body, 4, q, schema.MAX_TOP_K) is None

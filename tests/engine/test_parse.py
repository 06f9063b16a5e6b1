"""Upsert body parsing: the simdjson fast path (vectors straight into a float buffer) must accept exactly what
the orjson path accepts, give identical batches, and leave every doubtful body to the orjson path, which names
the record and field of the error (never a 500, nothing of a bad batch applied)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from services.core.errors import VectaError
from services.engine import schema
from services.engine.schema import fast_records, parse_collection, parse_upsert

needs_simdjson = pytest.mark.skipif(schema._simdjson is None, reason="pysimdjson is not installed")

CFG = parse_collection(
    {
        "name": "c",
        "dimension": 4,
        "metric": "cosine",
        "fields": [
            {"name": "genre", "type": "string"},
            {"name": "year", "type": "int"},
            {"name": "score", "type": "float"},
            {"name": "ok", "type": "bool"},
            {"name": "tags", "type": "string[]"},
            {"name": "extra", "type": "json"},
        ],
        "text_field": "body",
    }
)


@pytest.fixture(params=[True, False], ids=["fast", "orjson"])
def fast(request, monkeypatch):
    if request.param and schema._simdjson is None:
        pytest.skip("pysimdjson is not installed")
    monkeypatch.setattr(schema, "FAST_PARSE", request.param)
    return request.param


def _parse(body: bytes, fast_on: bool):
    old = schema.FAST_PARSE
    schema.FAST_PARSE = fast_on
    try:
        return parse_upsert(body, CFG)
    finally:
        schema.FAST_PARSE = old


def _outcome(body: bytes, fast_on: bool):
    try:
        b = _parse(body, fast_on)
    except VectaError as exc:
        return ("error", exc.status, exc.code, exc.detail)
    return ("ok", b.ids, b.vectors.tobytes(), b.metas, b.texts)


GOOD = [
    {"records": [{"id": "a", "vector": [1, 2, 3, 4]}]},
    {"records": [{"id": "a", "vector": [0.1, -2.5e-3, 3e10, 4], "metadata": {"genre": "x[y]", "year": 2020}}]},
    {
        "records": [
            {
                "id": f"r[{i}]",
                "vector": [i + 1, 0.5, -0.25, 1e-30],
                "metadata": {
                    "tags": ["a[", "]b", "[[", ""],
                    "extra": {"k[": [[1, 2], {"x": "[]"}], "z": None},
                    "score": 1.5,
                    "ok": True,
                },
                "text": 'snippet [with] brackets, 漢字 and "quotes" and \\ backslashes\n',
            }
            for i in range(5)
        ]
    },
    {"records": [{"vector": [1, 2, 3, 4], "id": "order", "metadata": None, "text": None}]},
    {"records": [{"id": "big", "vector": [1, 2, 3, 3.4028234e38]}]},
]


@needs_simdjson
@pytest.mark.parametrize("doc", GOOD)
def test_fast_path_is_taken_and_identical(doc):
    body = orjson.dumps(doc)
    assert fast_records(body, 4) is not None
    assert _outcome(body, True) == _outcome(body, False)
    assert _outcome(body, True)[0] == "ok"


@needs_simdjson
def test_fast_path_whitespace_and_unicode_escapes():
    body = b' {\n "records" : [ { "id" : "a\\u00e9" , "vector" : [ 1 , 2.5 , -3 , 4e0 ] } ] } '
    assert _outcome(body, True) == _outcome(body, False)
    assert _outcome(body, True)[1] == ["a\u00e9"]


BAD = [
    # nested arrays that flatten to the right length: only the bracket count catches them
    b'{"records": [{"id": "a", "vector": [1, [2], 3, 4]}]}',
    b'{"records": [{"id": "a", "vector": [[1], [2], [3], [4]]}]}',
    b'{"records": [{"id": "a", "vector": [1, [], [2, 3], 4]}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4], "metadata": {"genre": "["}},'
    b' {"id": "b", "vector": [1, [2], 3, 4]}]}',
    # an escaped key and a nested vector: the \\u005b guard
    b'{"records": [{"id": "\\u005b", "vector": [1, [2], 3, 4]}]}',
    b'{"records": [{"id": "a", "vec\\u0074or": [1, [2], 3, 4]}]}',
    # wrong element types and values
    b'{"records": [{"id": "a", "vector": [1, true, 3, 4]}]}',
    b'{"records": [{"id": "a", "vector": [1, "2", 3, 4]}]}',
    b'{"records": [{"id": "a", "vector": [1, null, 3, 4]}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 1e39]}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 1e400]}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, NaN]}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 123456789012345678901234567890]}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3]}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4, 5]}]}',
    b'{"records": [{"id": "a", "vector": []}]}',
    b'{"records": [{"id": "a", "vector": {"x": 1}}]}',
    b'{"records": [{"id": "a", "vector": 5}]}',
    b'{"records": [{"id": "a", "vector": [0, 0, 0, 0]}]}',
    # record structure
    b'{"records": [{"id": "a"}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4], "vector": [1, [2], 3, 4]}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4], "id": 7}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4]}, {"id": "a", "vector": [1, 2, 3, 4]}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4], "nope": 1}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4], "metadata": {"year": 1.5}}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4], "metadata": {"tags": ["a", 1]}}]}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4], "metadata": {"year": 99999999999999999999}}]}',
    b'{"records": [{"id": 1, "vector": [1, 2, 3, 4]}]}',
    b'{"records": [1]}',
    b'{"records": []}',
    b'{"records": {}}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4]}], "records": []}',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4]}], "x": 1}',
    b"[]",
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4]}]} trailing',
    b'{"records": [{"id": "a", "vector": [1, 2, 3, 4]}',
    b'{"records": [{"id": "\xff", "vector": [1, 2, 3, 4]}]}',
    b'{"records": [{"id": "\\ud800", "vector": [1, 2, 3, 4]}]}',
]


@pytest.mark.parametrize("body", BAD)
def test_bad_bodies_same_outcome_on_both_paths(body):
    slow = _outcome(body, False)
    if schema._simdjson is not None:
        assert _outcome(body, True) == slow
    if slow[0] == "ok":  # the orjson path accepted it (e.g. duplicate keys: last one wins): fine, but same
        return
    assert slow[1] in (400, 413, 422)


@needs_simdjson
@pytest.mark.parametrize(
    "body",
    [
        b'{"records": [{"id": "a", "vector": [1, [2], 3, 4]}]}',
        b'{"records": [{"id": "a", "vector": [[1], [2], [3], [4]]}]}',
        b'{"records": [{"id": "a", "vector": [1, 2, 3, 4], "vector": [1, [2], 3, 4]}]}',
        b'{"records": [{"id": "\\u005b", "vector": [1, [2], 3, 4]}]}',
    ],
)
def test_fast_path_declines_nested_vectors(body):
    assert fast_records(body, 4) is None


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body,needle",
    [
        (b'{"records": [{"id": "a", "vector": [1, 2, 3, 4]}, {"id": "b", "vector": [1, [2], 3, 4]}]}', "records[1]"),
        (b'{"records": [{"id": "a", "vector": [1, 2, 3, 4]}, {"id": "b", "vector": [1, 2, 3, 1e39]}]}', "records[1]"),
        (b'{"records": [{"id": "a", "vector": [1, 2, 3, 4]}, {"id": "b", "vector": [1, 2, 3]}]}', "records[1]"),
    ],
)
async def test_http_bad_batch_names_record_and_applies_nothing(app_client, fast, body, needle):
    client, _ = app_client
    r = await client.post("/v1/collections", json={"name": "items", "dimension": 4, "metric": "l2"})
    assert r.status_code == 201
    r = await client.post("/v1/collections/items/upsert", content=body)
    assert r.status_code in (400, 422), r.text
    assert needle in r.json()["detail"]
    assert (await client.post("/v1/collections/items/count", json={})).json() == {"count": 0}
    ok = orjson.dumps(
        {"records": [{"id": "x", "vector": np.arange(1, 5, dtype=np.float32)}]}, option=orjson.OPT_SERIALIZE_NUMPY
    )
    r = await client.post("/v1/collections/items/upsert", content=ok)
    assert r.json() == {"upserted_count": 1}
    r = await client.post("/v1/collections/items/fetch", json={"ids": ["x"]})
    assert r.json()["records"][0]["vector"] == [1.0, 2.0, 3.0, 4.0]


@needs_simdjson
def test_parse_buffers_are_released_and_parsers_recreated() -> None:
    """Each thread's simdjson parser keeps buffers sized for the largest body it parsed; the engine drops them
    all when writes pause. A document still in use keeps its parser alive; the next parse makes a new one."""
    import threading

    body = orjson.dumps({"records": [{"id": f"r{i}", "vector": [0.5, 1, 2, 3]} for i in range(50)]})
    recs, vecs = fast_records(body, 4) or ([], np.empty(0))
    assert len(recs) == 50 and threading.get_ident() in schema._parsers
    held = schema._parser().parse(b'{"a": [1, 2, 3]}')
    schema.release_parse_buffers()
    assert schema._parsers == {}
    assert held["a"].as_list() == [1, 2, 3]  # its parser lives on with the document
    again = fast_records(body, 4)
    assert again is not None and np.array_equal(again[1], vecs) and threading.get_ident() in schema._parsers


def test_vector_norms_do_not_overflow_at_the_largest_dimension() -> None:
    import numpy as np

    from services.engine.schema import SAFE_COMPONENT, vector_norms

    d = 16_384
    edge = np.full((1, d), SAFE_COMPONENT, dtype=np.float32)  # the float32 path
    assert np.isfinite(np.linalg.norm(edge, axis=1)).all()
    assert abs(vector_norms(edge)[0] / (float(np.float32(SAFE_COMPONENT)) * 128) - 1) < 1e-5
    above = np.full((1, d), SAFE_COMPONENT * 20, dtype=np.float32)  # float32 would overflow: the float64 path
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.linalg.norm(above, axis=1)).all()
    assert abs(vector_norms(above)[0] / (float(np.float32(SAFE_COMPONENT * 20)) * 128) - 1) < 1e-6

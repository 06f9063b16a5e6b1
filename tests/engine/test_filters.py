"""Filters run before the vector search and agree with a brute-force evaluation (property-based)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import brute_force, create, search_ids, upsert

GENRES = ["rock", "jazz", "pop", "folk"]
TAGS = ["a", "b", "c", "d", "e"]
FIELDS = [
    {"name": "genre", "type": "string"},
    {"name": "year", "type": "int"},
    {"name": "score", "type": "float"},
    {"name": "live", "type": "bool"},
    {"name": "tags", "type": "string[]"},
    {"name": "extra", "type": "json"},
]
N, D = 1500, 12


def _metadata(i: int, rng: np.random.Generator) -> dict:
    md: dict = {}
    if rng.random() < 0.85:
        md["genre"] = GENRES[int(rng.integers(0, 4))]
    if rng.random() < 0.9:
        md["year"] = int(rng.integers(1990, 2025))
    if rng.random() < 0.8:
        md["score"] = float(rng.random())
    if rng.random() < 0.7:
        md["live"] = bool(rng.random() < 0.5)
    if rng.random() < 0.8:
        md["tags"] = sorted({TAGS[int(x)] for x in rng.integers(0, 5, int(rng.integers(0, 4)))})
    if rng.random() < 0.3:
        md["extra"] = {"i": i}
    return md


def matches(md: dict, flt: dict) -> bool:
    """Reference semantics (MongoDB-style): comparisons need the field; $ne/$nin/$not match missing fields."""
    for key, cond in flt.items():
        if key == "$and":
            ok = all(matches(md, c) for c in cond)
        elif key == "$or":
            ok = any(matches(md, c) for c in cond)
        elif key == "$not":
            ok = not matches(md, cond)
        else:
            ok = _field(md, key, cond if isinstance(cond, dict) else {"$eq": cond})
        if not ok:
            return False
    return True


def _field(md: dict, key: str, ops: dict) -> bool:
    has = key in md
    v = md.get(key)
    for op, x in ops.items():
        if op == "$exists":
            ok = has == x
        elif op == "$not":
            ok = not _field(md, key, x)
        elif op in ("$eq", "$ne", "$in", "$nin"):
            vals = x if op in ("$in", "$nin") else [x]
            if not has:
                hit = False
            elif isinstance(v, list):
                hit = any(e in vals for e in v)
            else:
                hit = any(
                    (v == e and type(v) is type(e))
                    or (
                        isinstance(v, int | float)
                        and not isinstance(v, bool)
                        and isinstance(e, int | float)
                        and not isinstance(e, bool)
                        and v == e
                    )
                    for e in vals
                )
            ok = hit if op in ("$eq", "$in") else not hit
        else:
            if not has:
                return False
            ok = {"$gt": v > x, "$gte": v >= x, "$lt": v < x, "$lte": v <= x}[op]
        if not ok:
            return False
    return True


leaf = st.one_of(
    st.builds(lambda g: {"genre": g}, st.sampled_from([*GENRES, "none"])),
    st.builds(lambda g: {"genre": {"$in": g}}, st.lists(st.sampled_from(GENRES), min_size=1, max_size=3)),
    st.builds(lambda g: {"genre": {"$ne": g}}, st.sampled_from(GENRES)),
    st.builds(lambda g: {"genre": {"$nin": g}}, st.lists(st.sampled_from(GENRES), min_size=1, max_size=2)),
    st.builds(
        lambda op, y: {"year": {op: y}},
        st.sampled_from(["$gt", "$gte", "$lt", "$lte", "$eq", "$ne"]),
        st.integers(1988, 2026),
    ),
    st.builds(
        lambda a, b: {"year": {"$gte": min(a, b), "$lt": max(a, b)}}, st.integers(1990, 2025), st.integers(1990, 2025)
    ),
    st.builds(lambda op, y: {"score": {op: y}}, st.sampled_from(["$gt", "$lte"]), st.floats(0, 1)),
    st.builds(lambda b: {"live": b}, st.booleans()),
    st.builds(lambda t: {"tags": {"$in": t}}, st.lists(st.sampled_from(TAGS), min_size=1, max_size=3)),
    st.builds(lambda t: {"tags": t}, st.sampled_from(TAGS)),
    st.builds(lambda t: {"tags": {"$nin": t}}, st.lists(st.sampled_from(TAGS), min_size=1, max_size=2)),
    st.builds(
        lambda f, e: {f: {"$exists": e}}, st.sampled_from(["genre", "year", "tags", "extra", "live"]), st.booleans()
    ),
    st.builds(lambda y: {"year": {"$not": {"$gte": y}}}, st.integers(1990, 2025)),
)
filters = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.builds(lambda xs: {"$or": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda xs: {"$and": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda x: {"$not": x}, inner),
    ),
    max_leaves=5,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from services.engine.collection import Settings
    from services.engine.engine import Engine

    rng = np.random.default_rng(11)
    X = rng.standard_normal((N, D)).astype(np.float32)
    mds = [_metadata(i, rng) for i in range(N)]
    eng = Engine(tmp_path_factory.mktemp("filters"), b"k" * 32, Settings(idle_seal_seconds=3600))
    eng.open(background=False)
    coll = create(eng, dim=D, metric="l2", index={"type": "hnsw", "params": {"M": 8}}, fields=FIELDS)
    recs = [{"id": f"r{i}", "vector": X[i], "metadata": mds[i]} for i in range(N)]
    upsert(coll, recs[:1000])
    eng.wait_ready()  # rows 0..999 in an HNSW segment; the rest in the growing segment
    upsert(coll, recs[1000:])
    upsert(coll, [{"id": "r3", "vector": X[3], "metadata": mds[3]}])  # a tombstone in the sealed segment
    yield coll, X, mds
    eng.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flt=filters, qi=st.integers(0, 20), k=st.sampled_from([1, 5, 20]))
def test_filtered_search_agrees_with_brute_force(dataset, flt, qi, k):
    coll, X, mds = dataset
    allowed = np.array([matches(md, flt) for md in mds])
    assert coll.count({"filter": flt}) == int(allowed.sum())
    q = X[qi] + 0.01
    got = search_ids(coll, {"vector": q.tolist(), "top_k": k, "filter": flt, "params": {"ef": 64}})
    idx = np.flatnonzero(allowed)
    want = [f"r{idx[j]}" for j in brute_force(X[idx], q[None], "l2", k)[0]] if len(idx) else []
    assert len(got) == len(want)  # a selective filter still returns top_k when they exist
    assert all(matches(mds[int(g[1:])], flt) for g in got)
    if want:
        assert len(set(got) & set(want)) / len(want) >= 0.9


def test_selective_filter_returns_full_top_k(dataset):
    coll, X, mds = dataset
    flt = {"$and": [{"genre": "jazz"}, {"year": {"$gte": 2020}}, {"tags": {"$in": ["a"]}}]}
    n = sum(matches(md, flt) for md in mds)
    assert 0 < n < 40
    got = search_ids(coll, {"vector": X[0].tolist(), "top_k": 10, "filter": flt})
    assert len(got) == min(10, n)


def test_query_and_delete_by_filter_agree(dataset):
    coll, _, mds = dataset
    flt = {"$or": [{"tags": {"$in": ["e"]}}, {"genre": {"$exists": False}}]}
    want = sorted(f"r{i}" for i, md in enumerate(mds) if matches(md, flt))
    got, cursor = [], None
    while True:
        page = coll.query({"filter": flt, "limit": 100, **({"cursor": cursor} if cursor else {})})
        got += [r["id"] for r in page["records"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(got) == want

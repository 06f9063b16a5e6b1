"""Large upserts stage their rows while the WAL record is written and fsynced (Collection.upsert_many): nothing
is visible before it is durable, a failed WAL write leaves nothing behind, and group-committed batches publish
in order."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from services.engine import collection as collection_mod
from services.engine.schema import parse_upsert

from .conftest import create, search_ids, upsert

FIELDS = [
    {"name": "tag", "type": "string"},
    {"name": "n", "type": "int"},
    {"name": "tags", "type": "string[]"},
    {"name": "extra", "type": "json"},
]
N = collection_mod.OVERLAP_ROWS + 44  # large enough to take the overlapped path


def _records(X, start, prefix="v", tag="t"):
    return [
        {
            "id": f"{prefix}{i}",
            "vector": X[i],
            "metadata": {"tag": f"{tag}{i % 7}", "n": i, "tags": [tag, f"x{i % 3}"], "extra": {"i": i}},
            "text": f"document number {i} about {tag}",
        }
        for i in range(start, start + N)
    ]


def _batch(coll, records):
    import orjson

    return parse_upsert(orjson.dumps({"records": records}, option=orjson.OPT_SERIALIZE_NUMPY), coll.cfg)


def test_a_failed_wal_write_leaves_nothing_staged_or_visible(make_engine, tmp_path, monkeypatch):
    X = np.random.default_rng(1).standard_normal((3 * N, 16)).astype(np.float32)
    eng = make_engine()
    coll = create(eng, fields=FIELDS, text_field="body")
    upsert(coll, _records(X, 0))
    g = coll.growing
    before = (g.n, g.vec.n, len(g.ids), coll.version, coll.live_count(), coll.wal.size)
    real = coll.wal.append_many
    staged_during_write = []

    def failing(payloads):
        time.sleep(0.05)  # the rows are staged meanwhile
        staged_during_write.append(g.vec.n)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(coll.wal, "append_many", failing)
    with pytest.raises(OSError):
        coll.upsert(_batch(coll, _records(X, N, tag="lost")))
    assert staged_during_write == [before[0] + N]  # it really ran while the rows were staged
    assert (g.n, g.vec.n, len(g.ids), coll.version, coll.live_count(), coll.wal.size) == before
    for col in g.columns.values():
        assert col.present.n == g.n
    assert coll.fetch({"ids": [f"v{N}"]}) == []
    assert coll.count({"filter": {"tag": "lost0"}}) == 0
    # the next write lands where the failed one would have, and every column lines up with its row
    monkeypatch.setattr(coll.wal, "append_many", real)
    upsert(coll, _records(X, N, tag="kept"))
    rec = coll.fetch({"ids": [f"v{N + 3}"]})[0]
    assert rec["metadata"] == {
        "tag": f"kept{(N + 3) % 7}",
        "n": N + 3,
        "tags": ["kept", f"x{(N + 3) % 3}"],
        "extra": {"i": N + 3},
    }
    assert coll.count({"filter": {"tags": {"$in": ["kept"]}}}) == N
    assert coll.count({"filter": {"tags": {"$in": ["lost"]}}}) == 0
    hits = coll.search(coll.parse_search({"text": "kept", "top_k": 5}))
    assert len(hits) == 5 and all(int(h["id"][1:]) >= N for h in hits)
    assert search_ids(coll, {"vector": X[N + 5].tolist(), "top_k": 1}) == [f"v{N + 5}"]
    # and a restart (WAL replay) gives the same state
    eng.close()
    c2 = make_engine().get("docs")
    assert c2.live_count() == 2 * N
    assert c2.fetch({"ids": [f"v{N + 3}"]})[0]["metadata"]["tag"] == f"kept{(N + 3) % 7}"
    assert c2.count({"filter": {"tags": {"$in": ["lost"]}}}) == 0


def test_rows_are_invisible_until_the_wal_is_durable(make_engine, monkeypatch):
    X = np.random.default_rng(2).standard_normal((N, 16)).astype(np.float32)
    eng = make_engine()
    coll = create(eng, fields=FIELDS, text_field="body")
    real = coll.wal.append_many
    in_write = threading.Event()
    release = threading.Event()

    def slow(payloads):
        in_write.set()
        assert release.wait(10)
        real(payloads)

    monkeypatch.setattr(coll.wal, "append_many", slow)
    t = threading.Thread(target=coll.upsert, args=(_batch(coll, _records(X, 0)),))
    t.start()
    assert in_write.wait(10)
    time.sleep(0.05)  # staging finishes while the write is held
    assert coll.live_count() == 0 and coll.fetch({"ids": ["v0"]}) == []
    assert search_ids(coll, {"vector": X[0].tolist(), "top_k": 3}) == []
    release.set()
    t.join(10)
    assert coll.live_count() == N
    assert search_ids(coll, {"vector": X[0].tolist(), "top_k": 1}) == ["v0"]


def test_group_committed_batches_publish_in_order(make_engine):
    X = np.random.default_rng(3).standard_normal((2 * N, 16)).astype(np.float32)
    eng = make_engine()
    coll = create(eng, fields=FIELDS, text_field="body")
    first = _records(X, 0, tag="first")
    second = _records(X, N // 2, tag="second")  # half of its ids are also in the first batch
    counts = coll.upsert_many([_batch(coll, first), _batch(coll, second)])
    assert counts == [N, N]
    assert coll.live_count() == N + N // 2
    assert coll.fetch({"ids": [f"v{N // 2}"]})[0]["metadata"]["tag"].startswith("second")
    assert coll.fetch({"ids": ["v0"]})[0]["metadata"]["tag"].startswith("first")
    assert coll.count({"filter": {"tags": {"$in": ["first"]}}}) == N // 2
    hits = coll.search(coll.parse_search({"text": "second", "top_k": 1000}))
    assert len(hits) == N

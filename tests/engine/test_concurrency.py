"""Searches keep answering correctly while indexes are built, segments merged and tombstones compacted."""

from __future__ import annotations

import threading

import numpy as np

from .conftest import create, search_ids, upsert


def test_search_during_build_and_compaction(make_engine):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((6000, 24)).astype(np.float32)
    eng = make_engine(seal_rows=1500, compact_dead_fraction=0.2)
    coll = create(eng, dim=24, metric="l2", index={"type": "hnsw", "params": {"M": 16}})
    upsert(coll, [{"id": f"v{i}", "vector": X[i]} for i in range(3000)])
    errors: list[BaseException] = []
    checks = [0]
    misses = [0]
    stop = threading.Event()
    deleted: set[int] = set()

    def searcher(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                i = int(r.integers(0, 3000))
                if i in deleted:
                    continue
                got = search_ids(coll, {"vector": X[i].tolist(), "top_k": 3, "params": {"ef": 64}})
                # a stored vector is its own nearest neighbour, whatever segment it lives in now (HNSW leaves
                # a few nodes unreachable, so allow rare misses); never duplicates, never a deleted row
                assert len(got) == 3 and len(set(got)) == 3, got
                misses[0] += got[0] != f"v{i}"
                checks[0] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    coll.seal()
    coll.maintain()  # build while searching
    upsert(coll, [{"id": f"v{i}", "vector": X[i]} for i in range(3000, 6000)])
    coll.seal()
    coll.maintain()  # merge
    dead = list(range(3000, 6000, 2))
    deleted.update(dead)
    coll.delete({"ids": [f"v{i}" for i in dead]})  # half of a segment: compaction is due
    coll.maintain()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert checks[0] > 20
    assert misses[0] <= max(2, checks[0] // 50), (misses[0], checks[0])
    live = {f"v{i}" for i in range(6000) if i not in deleted}
    for i in range(3000, 3200):
        assert set(search_ids(coll, {"vector": X[i].tolist(), "top_k": 5})) <= live
    assert coll.live_count() == 4500
    assert all(s.n_dead == 0 for s in coll.segments), [(s.n, s.n_dead) for s in coll.segments]
    assert search_ids(coll, {"vector": X[3001].tolist(), "top_k": 1}) == ["v3001"]
    assert "v3002" not in search_ids(coll, {"vector": X[3002].tolist(), "top_k": 5})


def test_concurrent_writers_are_serialized(make_engine):
    X = np.random.default_rng(4).standard_normal((2000, 8)).astype(np.float32)
    eng = make_engine()
    coll = create(eng, dim=8)

    def writer(w: int) -> None:
        for s in range(0, 500, 50):
            upsert(coll, [{"id": f"w{w}-{i}", "vector": X[w * 500 + i]} for i in range(s, s + 50)])
            upsert(coll, [{"id": "shared", "vector": X[w]}])

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert coll.live_count() == 2001
    assert coll.count({}) == 2001

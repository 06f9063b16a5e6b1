"""Read replicas: real primary and replica engine processes (``--replica-of``) on loopback."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.engine.conftest import EngineProcess

DIM = 8


def wait_until(fn: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (httpx.HTTPError, AssertionError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def records(rng: np.random.Generator, start: int, n: int) -> list[dict]:
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    return [
        {"id": f"d{start + i}", "vector": vecs[i].tolist(), "metadata": {"n": start + i}, "text": f"doc {start + i}"}
        for i in range(n)
    ]


def create(c: httpx.Client, name: str) -> None:
    body = {
        "name": name,
        "dimension": DIM,
        "metric": "cosine",
        "index": {"type": "flat"},
        "fields": [{"name": "n", "type": "int"}],
        "text_field": "text",
    }
    r = c.post("/v1/collections", json=body)
    assert r.status_code == 201, r.text


def searches(c: httpx.Client, name: str, queries: np.ndarray) -> list:
    out = []
    for q in queries:
        r = c.post(f"/v1/collections/{name}/search", json={"vector": q.tolist(), "top_k": 10})
        assert r.status_code == 200, r.text
        out.append(r.json()["results"])
    r = c.post(f"/v1/collections/{name}/search", json={"vector": queries[0].tolist(), "top_k": 5,
                                                        "filter": {"n": {"$lt": 50}}})  # fmt: skip
    out.append(r.json()["results"])
    return out


def count(c: httpx.Client, name: str) -> int | None:
    r = c.post(f"/v1/collections/{name}/count", json={})
    return r.json()["count"] if r.status_code == 200 else None


def repl_stats(c: httpx.Client) -> dict:
    return c.get("/internal/stats").json()["replication"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EngineProcess, EngineProcess]]:
    root = tmp_path_factory.mktemp("repl")
    key = os.urandom(32)
    primary = EngineProcess(root / "primary", key, "--idle-seal-seconds", "0.3")
    primary.start()
    replica = EngineProcess(root / "replica", key, "--replica-of", primary.url)
    try:
        replica.start()
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def test_writes_replicate_and_searches_match(pair: tuple[EngineProcess, EngineProcess]) -> None:
    primary, replica = pair
    rng = np.random.default_rng(1)
    with primary.client() as p, replica.client() as r:
        # its first bootstrap (of an empty primary) done, every record below reaches it through the WAL stream
        wait_until(lambda: repl_stats(r)["bootstrapped"], what="the replica's first bootstrap")
        create(p, "docs")
        # three bursts with pauses longer than the primary's idle seal: the replica follows across WAL files
        for burst in range(3):
            assert (
                p.post("/v1/collections/docs/upsert", json={"records": records(rng, burst * 100, 100)}).status_code
                == 200
            )
            time.sleep(0.5)
        assert p.post("/v1/collections/docs/delete", json={"ids": ["d0", "d1", "d150"]}).status_code == 200
        t0 = time.monotonic()
        wait_until(lambda: count(r, "docs") == 297, what="the replica to hold the primary's rows")
        queries = rng.standard_normal((5, DIM)).astype(np.float32)
        assert searches(r, "docs", queries) == searches(p, "docs", queries)
        fetched = {"ids": ["d5", "d150", "d299"], "include_vectors": True}
        assert (
            r.post("/v1/collections/docs/fetch", json=fetched).json()
            == p.post("/v1/collections/docs/fetch", json=fetched).json()
        )
        # a single write is visible on the replica quickly (long poll, no timer)
        p.post("/v1/collections/docs/upsert", json={"records": records(rng, 1000, 1)})
        t0 = time.monotonic()
        wait_until(lambda: count(r, "docs") == 298, what="one write")
        assert time.monotonic() - t0 < 1.0
        st = repl_stats(r)
        assert st["role"] == "replica" and st["bootstrapped"] and st["in_sync"]
        assert st["lag_bytes"] == 0 and st["applied_records"] >= 5
        ps = repl_stats(p)
        assert ps["role"] == "primary" and len(ps["replicas"]) == 1
        # the replica sealed where the primary did: its segments hold the same rows
        pseg = p.get("/internal/stats").json()["collections"][0]["vector_count"]
        assert r.get("/internal/stats").json()["collections"][0]["vector_count"] == pseg == 298


def test_replica_refuses_writes(pair: tuple[EngineProcess, EngineProcess]) -> None:
    primary, replica = pair
    with primary.client() as p, replica.client() as r:
        if count(p, "ro") is None:
            create(p, "ro")
        wait_until(lambda: count(r, "ro") is not None, what="the collection on the replica")
        attempts = [
            r.post("/v1/collections/ro/upsert", json={"records": [{"id": "x", "vector": [1.0] * DIM}]}),
            r.post("/v1/collections/ro/delete", json={"ids": ["x"]}),
            r.post("/v1/collections", json={"name": "other", "dimension": DIM}),
            r.delete("/v1/collections/ro"),
            r.post("/internal/restore", json={"uri": "file:///nowhere"}),
        ]
        for resp in attempts:
            assert resp.status_code == 409, resp.text
            assert resp.headers["content-type"].startswith("application/problem+json")
            assert resp.json()["code"] == "read_only_replica"
        assert count(r, "ro") == 0 and count(p, "ro") == 0  # nothing was written anywhere
        # a replica does not serve replication routes either
        assert r.post("/internal/replication-snapshot", json={}).status_code == 409
        # and the primary answers a bad replication request with a named 400
        bad = p.post("/internal/replication-wal", json={"positions": {"c_x": [1, -1, 0]}})
        assert bad.status_code == 400 and "positions.c_x" in bad.json()["detail"]
        assert httpx.post(f"{primary.url}/internal/replication-wal", json={}).status_code == 401


def test_collection_create_and_drop_replicate(pair: tuple[EngineProcess, EngineProcess]) -> None:
    primary, replica = pair
    rng = np.random.default_rng(2)
    with primary.client() as p, replica.client() as r:
        create(p, "tmp")
        p.post("/v1/collections/tmp/upsert", json={"records": records(rng, 0, 10)})
        wait_until(lambda: count(r, "tmp") == 10, what="tmp on the replica")
        assert p.delete("/v1/collections/tmp").status_code == 200
        wait_until(lambda: r.get("/v1/collections/tmp").status_code == 404, what="the drop on the replica")
        # same name again: a new collection (new id), replicated from scratch
        create(p, "tmp")
        p.post("/v1/collections/tmp/upsert", json={"records": records(rng, 50, 3)})
        wait_until(lambda: count(r, "tmp") == 3, what="the re-created tmp")
        names_p = sorted(c["name"] for c in p.get("/v1/collections").json()["items"])
        assert sorted(c["name"] for c in r.get("/v1/collections").json()["items"]) == names_p


def test_replica_restart_catches_up_from_the_wal(tmp_path: Path) -> None:
    key = os.urandom(32)
    primary = EngineProcess(tmp_path / "p", key, "--idle-seal-seconds", "3600")
    primary.start()
    replica = EngineProcess(tmp_path / "r", key, "--replica-of", primary.url)
    rng = np.random.default_rng(3)
    try:
        replica.start()
        with primary.client() as p:
            create(p, "docs")
            p.post("/v1/collections/docs/upsert", json={"records": records(rng, 0, 50)})
            with replica.client() as r:
                wait_until(lambda: count(r, "docs") == 50, what="first rows")
            replica.kill9()
            p.post("/v1/collections/docs/upsert", json={"records": records(rng, 50, 50)})
            p.post("/v1/collections/docs/delete", json={"ids": ["d3"]})
            replica.start()
            with replica.client() as r:
                wait_until(lambda: count(r, "docs") == 99, what="catch-up after restart")
                st = repl_stats(r)
                assert st["bootstraps"] == 0  # resumed from its saved position, no copy
                queries = rng.standard_normal((3, DIM)).astype(np.float32)
                assert searches(r, "docs", queries) == searches(p, "docs", queries)
    finally:
        replica.stop()
        primary.stop()


def test_replica_behind_a_compacted_wal_bootstraps_again(tmp_path: Path) -> None:
    key = os.urandom(32)
    primary = EngineProcess(tmp_path / "p", key, "--idle-seal-seconds", "0.1")
    primary.start()
    replica = EngineProcess(tmp_path / "r", key, "--replica-of", primary.url)
    rng = np.random.default_rng(4)
    try:
        replica.start()
        with primary.client() as p:
            create(p, "docs")
            p.post("/v1/collections/docs/upsert", json={"records": records(rng, 0, 20)})
            with replica.client() as r:
                wait_until(lambda: count(r, "docs") == 20, what="first rows")
            replica.kill9()
            # while the replica is down the primary seals, persists the segment and deletes the WAL files
            for i in range(3):
                p.post("/v1/collections/docs/upsert", json={"records": records(rng, 100 + 10 * i, 10)})
                time.sleep(0.3)

            def compacted() -> bool:
                segs = p.get("/internal/stats").json()["collections"][0]["segments"]
                return all(s["persisted"] or s["growing"] for s in segs) and not any(
                    s["growing"] and s["rows"] for s in segs
                )

            wait_until(compacted, what="the primary to persist its segments")
            wal_files = sorted(f.name for f in (tmp_path / "p" / "collections").glob("*/wal-*.log"))
            assert "wal-00000001.log" not in wal_files  # the replica's position is gone
            replica.start()
            with replica.client() as r:
                wait_until(lambda: count(r, "docs") == 50, what="the replica to copy the primary again")
                assert repl_stats(r)["bootstraps"] == 1
                queries = rng.standard_normal((3, DIM)).astype(np.float32)
                assert searches(r, "docs", queries) == searches(p, "docs", queries)
                # and it keeps following afterwards
                p.post("/v1/collections/docs/upsert", json={"records": records(rng, 500, 5)})
                wait_until(lambda: count(r, "docs") == 55, what="writes after the new copy")
    finally:
        replica.stop()
        primary.stop()


def test_replica_of_a_restored_primary_copies_it_afresh(tmp_path: Path) -> None:
    """A restore gives the primary a new history (epoch): its replicas copy it again."""
    key = os.urandom(32)
    rng = np.random.default_rng(5)
    src = EngineProcess(tmp_path / "src", key)
    src.start()
    try:
        with src.client() as s:
            create(s, "docs")
            s.post("/v1/collections/docs/upsert", json={"records": records(rng, 0, 30)})
            uri = (tmp_path / "snap").as_uri()
            assert s.post("/internal/snapshot", json={"uri": uri}).status_code == 200
    finally:
        src.stop()
    primary = EngineProcess(tmp_path / "p", key)
    primary.start()
    replica = EngineProcess(tmp_path / "r", key, "--replica-of", primary.url)
    try:
        replica.start()
        with primary.client() as p, replica.client() as r:
            wait_until(lambda: r.get("/internal/stats").json()["replication"]["bootstrapped"], what="bootstrap")
            assert p.post("/internal/restore", json={"uri": uri}).status_code == 200
            wait_until(lambda: count(r, "docs") == 30, what="the restored data on the replica")
            assert repl_stats(r)["bootstraps"] == 2
    finally:
        replica.stop()
        primary.stop()


def test_frames_travel_encrypted_and_bounded(make_engine) -> None:
    """In-process: frames are read in budget-sized pieces, decrypt only at their own position, and any change
    fails authentication."""
    from services.engine.crypto import CorruptionError
    from services.engine.replication import wal_name
    from services.engine.wal import open_frames, read_frames
    from tests.engine.conftest import create as create_coll
    from tests.engine.conftest import upsert

    eng = make_engine()
    coll = create_coll(eng, dim=DIM, fields=[{"name": "n", "type": "int"}], text_field="text")
    rng = np.random.default_rng(6)
    for i in range(5):
        upsert(coll, records(rng, i * 10, 10))
    assert coll.wal is not None
    path, end = coll.wal.path, coll.wal.size
    assert path.name == wal_name(1)
    off, rec, payloads = 0, 0, []
    while off < end:
        frames, n = read_frames(path, off, end, 1)  # a budget smaller than a frame: one frame each time
        assert n == 1
        payloads += open_frames(frames, coll.cipher, coll.aad(path.name), rec)
        off, rec = off + len(frames), rec + n
    assert len(payloads) == 5 and all(p[0] == 1 for p in payloads)  # five upsert records, in order
    whole, n = read_frames(path, 0, end, 1 << 20)
    assert n == 5 and len(whole) == end
    with pytest.raises(CorruptionError):
        read_frames(path, 3, end, 1 << 20)  # not a frame boundary
    with pytest.raises(CorruptionError):
        open_frames(whole, coll.cipher, coll.aad(path.name), 1)  # claimed at the wrong record number
    with pytest.raises(CorruptionError):
        open_frames(whole, coll.cipher, coll.aad(wal_name(2)), 0)  # claimed for another file
    tampered = bytearray(whole)
    tampered[40] ^= 1
    with pytest.raises(CorruptionError):
        open_frames(bytes(tampered), coll.cipher, coll.aad(path.name), 0)

"""Snapshots to S3 (moto's server on loopback) and to a local folder; restore gives identical results."""

from __future__ import annotations

import threading

import boto3
import numpy as np
import pytest

from services.core.objectstore import open_object_store

from .conftest import create, search_ids, upsert

FIELDS = [{"name": "g", "type": "string"}]


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    client.create_bucket(Bucket="backups")
    yield endpoint, client
    server.stop()


def _populate(eng, rng):
    X = rng.standard_normal((1500, 16)).astype(np.float32)
    a = create(eng, name="alpha", metric="l2", index={"type": "hnsw"}, fields=FIELDS, text_field="body")
    b = create(eng, name="beta", metric="cosine", index={"type": "flat"})
    upsert(
        a, [{"id": f"a{i}", "vector": X[i], "metadata": {"g": "xy"[i % 2]}, "text": f"doc {i}"} for i in range(1000)]
    )
    eng.wait_ready()
    upsert(a, [{"id": f"a{i}", "vector": X[i], "metadata": {"g": "z"}} for i in range(1000, 1500)])  # WAL only
    a.delete({"ids": ["a3", "a1200"]})
    upsert(b, [{"id": f"b{i}", "vector": X[i]} for i in range(300)])
    return X


def _answers(eng, X):
    a, b = eng.get("alpha"), eng.get("beta")
    out = [
        search_ids(a, {"vector": X[i].tolist(), "top_k": 5, "filter": {"g": {"$ne": "y"}}}) for i in range(0, 1500, 50)
    ]
    out += [search_ids(b, {"vector": X[i].tolist(), "top_k": 5}) for i in range(0, 300, 30)]
    out.append([a.live_count(), b.live_count()])
    out.append(
        [r["id"] for r in a.hybrid(a.parse_search({"vector": X[0].tolist(), "text": "doc 7", "top_k": 5}, hybrid=True))]
    )
    return out


@pytest.mark.parametrize("backend", ["s3", "local"])
def test_snapshot_restore_round_trip(make_engine, tmp_path, s3_server, backend, monkeypatch):
    endpoint, client = s3_server
    if backend == "s3":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        uri = f"s3://backups/cl_1/bkp_{tmp_path.name[-8:]}"
    else:
        uri = (tmp_path / "objstore" / "bkp").as_uri()
    rng = np.random.default_rng(0)
    eng = make_engine(tmp_path / "src")
    X = _populate(eng, rng)
    before = _answers(eng, X)
    info = eng.snapshot(open_object_store(uri))
    assert info["collections"] == ["alpha", "beta"] and info["vector_count"] == 1798
    upsert(eng.get("beta"), [{"id": "after-snapshot", "vector": X[0]}])  # not in the snapshot
    if backend == "s3":
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="backups", Prefix="cl_1/")["Contents"]]
        assert any(k.endswith("SNAPSHOT.enc") for k in keys)
    target = make_engine(tmp_path / "restored")
    restored = target.restore(open_object_store(uri))
    assert restored["vector_count"] == 1798
    assert _answers(target, X) == before
    assert target.get("beta").fetch({"ids": ["after-snapshot"]}) == []
    # the restored engine accepts writes and survives a restart
    upsert(target.get("alpha"), [{"id": "new", "vector": X[1]}])
    target.close()
    again = make_engine(tmp_path / "restored")
    assert again.get("alpha").live_count() == 1499


def test_snapshot_while_writing_is_consistent(make_engine, tmp_path):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((4000, 8)).astype(np.float32)
    eng = make_engine(tmp_path / "src", seal_rows=500)
    coll = create(eng, dim=8, index={"type": "hnsw"})
    stop = threading.Event()
    written = []

    def writer():
        i = 0
        while not stop.is_set() and i < 4000:
            upsert(coll, [{"id": f"v{j}", "vector": X[j]} for j in range(i, i + 50)])
            written.append(i + 50)
            i += 50
            if i % 500 == 0:
                coll.seal()
                coll.maintain()

    t = threading.Thread(target=writer)
    t.start()
    while len(written) < 20:
        pass
    uri = (tmp_path / "snap").as_uri()
    eng.snapshot(open_object_store(uri))
    stop.set()
    t.join()
    target = make_engine(tmp_path / "dst")
    target.restore(open_object_store(uri))
    n = target.get("docs").live_count()
    assert n % 50 == 0 and 20 * 50 <= n <= written[-1]  # whole batches, a prefix of the stream
    ids = {r["id"] for r in target.get("docs").query({"limit": 1000, "filter": None})["records"]}
    assert all(f"v{j}" in ids for j in range(min(n, 1000)))


def test_restore_refuses_non_empty_engine_and_bad_key(make_engine, tmp_path):
    import os

    from services.core.errors import Conflict, Unprocessable

    eng = make_engine(tmp_path / "src")
    create(eng)
    uri = (tmp_path / "snap").as_uri()
    eng.snapshot(open_object_store(uri))
    with pytest.raises(Conflict):
        eng.restore(open_object_store(uri))
    other = make_engine(tmp_path / "other", k=os.urandom(32))
    with pytest.raises(Unprocessable):
        other.restore(open_object_store(uri))

"""kill -9 a real engine process during a stream of acknowledged upserts; every acknowledged write survives."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from .conftest import EngineProcess

DIM = 8


def _vec(i: int, version: int) -> list[float]:
    return [float(i), float(version), 1.0, 2.0, 3.0, 4.0, 5.0, float(i % 7)]


@pytest.mark.slow
def test_acknowledged_upserts_survive_sigkill(tmp_path, key):
    proc = EngineProcess(tmp_path / "data", key, "--seal-rows", "300", "--idle-seal-seconds", "0.3")
    proc.start()
    with proc.client() as c:
        r = c.post(
            "/v1/collections",
            json={
                "name": "crash",
                "dimension": DIM,
                "metric": "l2",
                "index": {"type": "hnsw"},
                "fields": [{"name": "v", "type": "int"}],
            },
        )
        assert r.status_code == 201, r.text
    acked: dict[str, int] = {}  # id -> latest acknowledged version
    inflight: dict[str, set[int]] = {}  # id -> versions sent but not acknowledged (may or may not survive)
    version = 0
    rng = random.Random(7)
    try:
        for round_ in range(4):
            stop = threading.Event()

            def writer(stop: threading.Event = stop) -> None:
                nonlocal version
                with proc.client() as c:
                    while not stop.is_set():
                        version += 1
                        ids = [f"id{rng.randrange(400)}" for _ in range(rng.randrange(1, 30))]
                        ids = list(dict.fromkeys(ids))
                        recs = [{"id": i, "vector": _vec(int(i[2:]), version), "metadata": {"v": version}} for i in ids]
                        for i in ids:
                            inflight.setdefault(i, set()).add(version)
                        try:
                            r = c.post("/v1/collections/crash/upsert", json={"records": recs}, timeout=5)
                        except httpx.HTTPError:
                            return  # the process died under us: this batch is unacknowledged
                        if r.status_code != 200:
                            return
                        for i in ids:
                            acked[i] = version
                            inflight[i] = set()

            t = threading.Thread(target=writer)
            t.start()
            time.sleep(0.6 + rng.random() * 1.2)
            proc.kill9()
            stop.set()
            t.join(10)
            proc.start()
            with proc.client() as c:
                ids = sorted(acked)
                recs = []
                for s in range(0, len(ids), 500):
                    r = c.post("/v1/collections/crash/fetch", json={"ids": ids[s : s + 500], "include_vectors": True})
                    assert r.status_code == 200, r.text
                    recs += r.json()["records"]
                got = {r["id"]: r for r in recs}
                for i, v in acked.items():
                    assert i in got, f"round {round_}: acknowledged id {i} lost"
                    have = got[i]["metadata"]["v"]
                    assert have == v or have in inflight.get(i, set()), (i, have, v)
                    assert got[i]["vector"] == _vec(int(i[2:]), have)
                    acked[i] = have
                    inflight[i] = set()
                # search still works after recovery
                r = c.post("/v1/collections/crash/search", json={"vector": _vec(1, 0), "top_k": 3})
                assert r.status_code == 200 and r.json()["results"]
        assert len(acked) > 50
    finally:
        proc.stop()


def test_refuses_to_start_without_secrets(tmp_path):
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    base = {k: v for k, v in os.environ.items() if not k.startswith("VECTA_ENGINE_")}
    cmd = [sys.executable, "-m", "services.engine", "serve", "--data-dir", str(tmp_path), "--port", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=base, capture_output=True, timeout=60)
    assert r.returncode != 0 and b"VECTA_ENGINE_TOKEN" in r.stderr
    r = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**base, "VECTA_ENGINE_TOKEN": "t", "VECTA_ENGINE_DATA_KEY": "c2hvcnQ="},
        capture_output=True,
        timeout=60,
    )
    assert r.returncode != 0 and b"32 bytes" in r.stderr

"""Warm spare engines of the local provisioner: a spare serves exactly one cluster, gets its secrets only over its
pipe, looks like a cold ``engine serve`` once assigned (command line, log file, limits), keeps acknowledged writes
across a restart, and goes away when its starter does or its environment no longer matches."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.control_plane.provisioners import local
from services.control_plane.provisioners.base import EngineSpec
from services.control_plane.provisioners.local import LocalProvisioner, SparePool
from services.core.settings import get_settings
from tests.clusterkit import alive, engine_pids

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[SparePool]:
    """A pool of this test's own (the module's pool may hold spares from other tests), refilled only on demand."""
    own = SparePool()
    own.REFILL_DELAY = 3600.0  # no background refill while the test looks at which process serves what
    monkeypatch.setattr(local, "SPARES", own)
    yield own
    own.close()


def _stats(url: str, token: str) -> httpx.Response:
    return httpx.get(f"{url}/internal/stats", headers={"authorization": f"Bearer {token}"}, timeout=10)


def _wait_for_exit(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_a_spare_serves_one_cluster_with_its_secrets_only_in_the_pipe(tmp_path: Path, pool: SparePool) -> None:
    prov = LocalProvisioner(root=tmp_path / "clusters")
    assert pool.fill(1, prov.log_dir) == 1
    spare_pid = pool._spares[0].proc.pid
    token, key = "tok-" + os.urandom(8).hex(), os.urandom(32)
    spec = EngineSpec("cl_sparea", 1, 1, token, key, {})
    handle = prov.start(spec, 60)
    other = None
    try:
        pid = handle.state["pid"]
        assert pid == spare_pid and handle.state["spare_id"]
        assert _stats(handle.url, token).status_code == 200
        assert _stats(handle.url, "wrong-" + token).status_code == 401
        # It shows the command line of a cold `serve` of this cluster; the secrets are nowhere but its memory.
        argv = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        assert argv[argv.index(b"services.engine") + 1] == b"serve"
        assert argv[argv.index(b"--data-dir") + 1] == str(prov.data_dir("cl_sparea")).encode()
        assert engine_pids(tmp_path / "clusters") == [pid]
        b64key = base64.b64encode(key)
        for where in (Path(f"/proc/{pid}/cmdline"), Path(f"/proc/{pid}/environ"),
                      prov.log_dir / "engine-cl_sparea.log", prov.log_dir / "engine-spares.log",
                      tmp_path / "clusters" / "cl_sparea.state.json"):  # fmt: skip
            if where.exists():
                blob = where.read_bytes()
                assert token.encode() not in blob and b64key not in blob, where
        # Its limits are those of the cluster's cu_size.
        limits = Path(f"/proc/{pid}/limits").read_text()
        memory = (get_settings().local_memory_per_cu_gib * 1 + 4) << 30
        assert any(line.startswith("Max address space") and str(memory) in line for line in limits.splitlines())

        # A write, then the engine is stopped and started again: the write is there (same data folder).
        coll = {"name": "c", "dimension": 2, "metric": "cosine"}
        headers = {"authorization": f"Bearer {token}"}
        assert httpx.post(f"{handle.url}/v1/collections", json=coll, headers=headers, timeout=10).status_code == 201
        up = httpx.post(
            f"{handle.url}/v1/collections/c/upsert",
            json={"records": [{"id": "a", "vector": [1, 0]}]},
            headers=headers,
            timeout=10,
        )
        assert up.status_code == 200, up.text
        assert prov.is_running("cl_sparea", handle.state)
        prov.stop("cl_sparea", handle.state)
        assert not alive(pid) and not prov.is_running("cl_sparea", handle.state)

        # The pool is empty now: the next start is a cold one, on the same data.
        again = prov.start(EngineSpec("cl_sparea", 1, 1, token, key, handle.state), 60)
        assert again.state["pid"] != pid and "spare_id" not in again.state
        count = httpx.post(f"{again.url}/v1/collections/c/count", json={}, headers=headers, timeout=10)
        assert count.json()["count"] == 1

        # Another cluster gets another process, never the first cluster's.
        pool.fill(1, prov.log_dir)
        other = prov.start(EngineSpec("cl_spareb", 1, 1, "tok-b" + os.urandom(4).hex(), os.urandom(32), {}), 60)
        assert other.state["pid"] not in (pid, again.state["pid"]) and other.state["spare_id"]
        assert other.state["spare_id"] != handle.state["spare_id"]
        assert httpx.get(f"{other.url}/v1/collections", headers=headers, timeout=10).status_code == 401
    finally:
        prov.destroy("cl_sparea", handle.state)
        if other is not None:
            prov.destroy("cl_spareb", other.state)
    assert engine_pids(tmp_path / "clusters") == []


def test_a_spare_started_under_another_environment_is_not_used(
    tmp_path: Path, pool: SparePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    prov = LocalProvisioner(root=tmp_path / "clusters")
    pool.fill(1, prov.log_dir)
    stale = pool._spares[0].proc
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # e.g. the object store moved
    handle = prov.start(EngineSpec("cl_sparec", 1, 1, "tok-c", os.urandom(32), {}), 60)
    try:
        assert handle.state["pid"] != stale.pid and "spare_id" not in handle.state
        assert stale.poll() is not None  # discarded, not left waiting
    finally:
        prov.destroy("cl_sparec", handle.state)


def _spare(tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.engine", "spare", "--spare-id", "sp_test"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("VECTA_ENGINE_")},
    )  # fmt: skip


def test_a_spare_exits_when_its_pipe_closes_before_an_assignment(tmp_path: Path) -> None:
    proc = _spare(tmp_path)
    assert proc.stdin is not None
    proc.stdin.close()
    assert _wait_for_exit(proc) == 0


def test_a_bad_assignment_is_refused_without_echoing_it(tmp_path: Path) -> None:
    proc = _spare(tmp_path)
    secret = "tok-" + os.urandom(8).hex()
    bad = {"token": secret, "data_key": "bm90IDMyIGJ5dGVz", "data_dir": str(tmp_path / "d"), "port": 1}
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(bad).encode() + b"\n")
    proc.stdin.close()
    assert _wait_for_exit(proc) == 2
    assert proc.stdout is not None
    out = proc.stdout.read()
    assert b"invalid assignment" in out and secret.encode() not in out and b"bm90IDMyIGJ5dGVz" not in out
    assert not (tmp_path / "d").exists()


def test_replenish_replaces_a_used_spare_without_waiting_for_the_refill_delay(tmp_path: Path, pool: SparePool) -> None:
    prov = LocalProvisioner(root=tmp_path / "clusters")
    pool.fill(1, prov.log_dir)
    handle = prov.start(EngineSpec("cl_spared", 1, 1, "tok-d", os.urandom(32), {}), 60)
    try:
        assert handle.state["spare_id"] and not pool._spares  # taken; its refill is due in REFILL_DELAY (an hour)
        prov.replenish()  # what a task does once its engine is up and loaded
        for _ in range(600):
            if pool._spares:
                break
            time.sleep(0.05)
        assert len(pool._spares) == 1
        fresh = pool._spares[0]
        assert fresh.proc.poll() is None and fresh.proc.pid != handle.state["pid"]
        assert fresh.spare_id != handle.state["spare_id"]
    finally:
        prov.destroy("cl_spared", handle.state)

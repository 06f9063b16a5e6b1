"""Self-healing: an engine SIGKILLed during a stream of acknowledged writes comes back through the reconciler with
every acknowledged write; a Celery worker SIGKILLed mid-provision leaves a cluster that still converges to RUNNING
once a new worker runs (through the reconciler's re-drive), with a single engine process for the cluster."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.control_plane.clusters import tasks
from services.core.settings import get_settings
from tests.clusterkit import alive, cluster_row, create_cluster, engine_pids, records, stop_engines
from tests.conftest import auth, create_key, signup
from tests.core.test_background_tasks import free_port, redis_available, wait_http


def dp(cluster_id: str, rest: str = "") -> str:
    return f"/v1/clusters/{cluster_id}/collections{rest}"


async def test_engine_sigkill_during_writes_loses_no_acknowledged_write(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    owner = await signup(client, "rec-engine", "Recovery Org")
    cluster = await create_cluster(client, owner.access_token, owner.project_id)
    cid = cluster["id"]
    key = (await create_key(client, owner, project_roles=[{"project_id": owner.project_id, "role": "data_writer"}]))[
        "key"
    ]
    h = auth(key)
    try:
        r = await client.post(dp(cid), json={"name": "log", "dimension": 8, "metric": "l2"}, headers=h)
        assert r.status_code == 201, r.text
        old_pid = (await cluster_row(app, cid)).engine_state["pid"]

        acked: list[str] = []
        refused: list[int] = []
        stop = asyncio.Event()
        batch = 25

        async def writer(w: int) -> None:
            n = 0
            while not stop.is_set():
                recs = records(batch, dimension=8, prefix=f"w{w}-", start=n * batch)
                n += 1
                resp = await client.post(dp(cid, "/log/upsert"), json={"records": recs}, headers=h)
                if resp.status_code == 200:
                    assert resp.json() == {"upserted_count": batch}
                    acked.extend(rec["id"] for rec in recs)
                else:  # the engine is gone: a 503 with Retry-After, never a 500
                    assert resp.status_code == 503, resp.text
                    assert resp.headers["retry-after"]
                    assert resp.headers["content-type"].startswith("application/problem+json")
                    refused.append(resp.status_code)
                    await asyncio.sleep(0.01)

        writers = [asyncio.create_task(writer(w)) for w in range(3)]
        while len(acked) < 600:
            await asyncio.sleep(0.005)
        os.kill(old_pid, signal.SIGKILL)  # mid-stream: other writes are in flight
        killed_at = len(acked)
        while len(refused) < 3:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*writers)
        assert killed_at >= 600 and refused

        # The reconciler notices, restarts the engine on the same data, and the cluster is RUNNING again.
        counts = await asyncio.to_thread(tasks.reconcile)
        assert counts.get("restarted", 0) >= 1, counts
        row = await cluster_row(app, cid)
        assert row.status == "RUNNING" and "restarted" in (row.status_reason or "")
        new_pid = row.engine_state["pid"]
        assert new_pid != old_pid and alive(new_pid)

        # Every acknowledged write is there.
        present: set[str] = set()
        for i in range(0, len(acked), 1000):
            chunk = acked[i : i + 1000]
            resp = await client.post(dp(cid, "/log/fetch"), json={"ids": chunk, "include_vectors": False}, headers=h)
            assert resp.status_code == 200, resp.text
            present |= {rec["id"] for rec in resp.json()["records"]}
        missing = sorted(set(acked) - present)
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
        count = (await client.post(dp(cid, "/log/count"), json={}, headers=h)).json()["count"]
        assert count >= len(set(acked))
        # And it takes writes again.
        resp = await client.post(dp(cid, "/log/upsert"), json={"records": records(3, dimension=8)}, headers=h)
        assert resp.status_code == 200, resp.text
    finally:
        r = await client.delete(f"/v1/clusters/{cid}", headers=owner.headers)
        assert r.status_code == 202, r.text


# -- a Celery worker killed mid-provision ----------------------------------------------------------------------
REDIS = (os.environ.get("VECTA_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return _spawn(
        [
            sys.executable, "-m", "celery", "-A", "services.core.celery_app:celery_app", "worker",
            "--pool=threads", "--concurrency=2", "--without-mingle", "--without-gossip", "--loglevel=INFO",
        ],
        env,
        log,
    )  # fmt: skip


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.mark.skipif(not redis_available(), reason="needs Redis on 127.0.0.1:6379")
def test_worker_killed_mid_provision_cluster_still_converges(tmp_path: Path, migrated_db: str) -> None:
    import redis
    from celery import Celery
    from sqlalchemy import update

    from services.control_plane.clusters.models import Cluster
    from services.core.db import get_database, utcnow

    broker = f"{REDIS}/13"
    redis.from_url(broker).flushdb()
    settings = get_settings()
    env = {
        **os.environ,
        "VECTA_DATABASE_URL": settings.async_database_url,
        "VECTA_BROKER_URL": broker,
        "VECTA_REDIS_URL": broker,
        "VECTA_CELERY_EAGER": "false",
    }
    api_port = free_port()
    api = _spawn(
        [
            sys.executable, "-m", "uvicorn", "--factory", "services.api.app:create_app",
            "--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning",
        ],
        env,
        tmp_path / "api.log",
    )  # fmt: skip
    procs = [api]
    base = f"http://127.0.0.1:{api_port}"
    cid = ""
    token = ""
    try:
        wait_http(f"{base}/healthz")
        first = _worker(env, tmp_path / "worker1.log")
        procs.append(first)
        with httpx.Client(base_url=base, timeout=30) as c:
            email = f"rec-worker-{uuid.uuid4().hex[:8]}@example.com"
            r = c.post(
                "/v1/auth/signup",
                json={"email": email, "password": "a long enough password", "name": "W", "org_name": "Worker Org"},
            )
            assert r.status_code == 201, r.text
            token = r.json()["access_token"]
            h = auth(token)
            project_id = c.get(f"/v1/orgs/{r.json()['org']['id']}/projects", headers=h).json()["items"][0]["id"]
            r = c.post(
                f"/v1/projects/{project_id}/clusters",
                json={"name": "survivor", "plan": "dedicated", "region": "local"},
                headers=h,
            )
            assert r.status_code == 202, r.text
            cid, job_id = r.json()["id"], r.json()["job_id"]

            # Kill the worker as soon as it has started the job.
            deadline = time.monotonic() + 60
            job: dict[str, Any] = {}
            while time.monotonic() < deadline:
                job = c.get(f"/v1/jobs/{job_id}", headers=h).json()
                if job["status"] != "queued":
                    break
                time.sleep(0.01)
            assert job["status"] == "running", job
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            time.sleep(0.5)
            cluster = c.get(f"/v1/clusters/{cid}", headers=h).json()
            assert cluster["status"] == "CREATING", cluster
            assert c.get(f"/v1/jobs/{job_id}", headers=h).json()["status"] == "running"
            data_dir = settings.data_dir / "clusters" / cid
            orphans = engine_pids(data_dir)  # an engine the dead worker had already started, if any
            assert len(orphans) <= 1

            # A new worker; the reconciler finds the cluster stuck (its last change is made older than the
            # reconciler's patience instead of waiting for it) and sends the job again.
            procs.append(_worker(env, tmp_path / "worker2.log"))
            with get_database().sync_transaction() as s:
                s.execute(
                    update(Cluster)
                    .where(Cluster.id == cid)
                    .values(updated_at=utcnow() - tasks.STUCK_AFTER - dt.timedelta(seconds=5))
                )
            sender = Celery(broker=broker)
            try:
                sender.send_task("cluster.reconcile")
            finally:
                sender.close()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                cluster = c.get(f"/v1/clusters/{cid}", headers=h).json()
                if cluster["status"] != "CREATING":
                    break
                time.sleep(0.2)
            logs = (tmp_path / "worker2.log").read_text()[-3000:]
            assert cluster["status"] == "RUNNING", (cluster, logs)
            job = c.get(f"/v1/jobs/{job_id}", headers=h).json()
            assert job["status"] == "succeeded" and job["progress"] == 1.0, job

            # One engine for the cluster (the one the dead worker may have started is adopted, not doubled),
            # and it serves the data plane.
            with get_database().sync_transaction() as s:
                row = s.get(Cluster, cid)
                assert row is not None
                pid = row.engine_state["pid"]
            assert engine_pids(data_dir) == [pid]
            if orphans:
                assert orphans == [pid], "the engine started by the dead worker was not adopted"
            r = c.post(dp(cid), json={"name": "ok", "dimension": 4, "metric": "l2"}, headers=h)
            assert r.status_code == 201, r.text
            r = c.post(dp(cid, "/ok/upsert"), json={"records": records(5)}, headers=h)
            assert r.status_code == 200, r.text

            r = c.delete(f"/v1/clusters/{cid}", headers=h)
            assert r.status_code == 202, r.text
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and c.get(f"/v1/clusters/{cid}", headers=h).json()["status"] != "DELETED":
                time.sleep(0.2)
            assert c.get(f"/v1/clusters/{cid}", headers=h).json()["status"] == "DELETED"
            assert engine_pids(data_dir) == [] and not data_dir.exists()
    finally:
        for p in reversed(procs):
            _end(p)
        if cid:
            stop_engines(settings.data_dir / "clusters" / cid)
        redis.from_url(broker).flushdb()

"""Revocation on the real stack: the API under uvicorn, a Celery worker with its beat (``-B``) checking keys every
second (``VECTA_KEY_CHECK_INTERVAL_SECONDS=1``), Redis as the broker, moto's KMS and STS on loopback. Disabling the
customer's key suspends the cluster by itself and its data-plane calls get 503 with the reason; enabling it brings
the cluster back with the same answers, with no test code calling the check."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from services.core.settings import get_settings
from tests.awskit import moto_server
from tests.clusterkit import engine_pids, records, stop_engines
from tests.conftest import auth
from tests.control_plane.test_cluster_recovery import REDIS, _end, _spawn
from tests.core.test_background_tasks import free_port, redis_available, wait_http

DIM = 8


def _until(fn: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.skipif(not redis_available(), reason="needs Redis on 127.0.0.1:6379")
def test_the_beat_suspends_and_resumes_a_cluster_when_its_key_is_disabled_and_enabled(
    tmp_path: Path, migrated_db: str
) -> None:
    import redis

    broker = f"{REDIS}/12"
    redis.from_url(broker).flushdb()
    settings = get_settings()
    procs = []
    cid = ""
    with moto_server():
        kms = boto3.client("kms", region_name="us-east-1")
        meta = kms.create_key(Description="live customer key")["KeyMetadata"]
        env = {
            **os.environ,
            "VECTA_DATABASE_URL": settings.async_database_url,
            "VECTA_BROKER_URL": broker,
            "VECTA_REDIS_URL": broker,
            "VECTA_CELERY_EAGER": "false",
            "VECTA_KEY_CHECK_INTERVAL_SECONDS": "1",
            "VECTA_RECONCILE_INTERVAL_SECONDS": "3600",
        }
        api_port = free_port()
        api_args = [
            sys.executable, "-m", "uvicorn", "--factory", "services.api.app:create_app",
            "--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning",
        ]  # fmt: skip
        worker_args = [
            sys.executable, "-m", "celery", "-A", "services.core.celery_app:celery_app", "worker", "-B",
            "--schedule", str(tmp_path / "beat-schedule"), "--pool=threads", "--concurrency=2",
            "--without-mingle", "--without-gossip", "--loglevel=INFO",
        ]  # fmt: skip
        try:
            procs.append(_spawn(api_args, env, tmp_path / "api.log"))
            procs.append(_spawn(worker_args, env, tmp_path / "worker.log"))
            base = f"http://127.0.0.1:{api_port}"
            wait_http(f"{base}/healthz")
            with httpx.Client(base_url=base, timeout=30) as c:
                email = f"live-key-{uuid.uuid4().hex[:8]}@example.com"
                r = c.post("/v1/auth/signup", json={"email": email, "password": "a long enough password",
                                                    "name": "K", "org_name": "Live Key Org"})  # fmt: skip
                assert r.status_code == 201, r.text
                h = auth(r.json()["access_token"])
                project = c.get(f"/v1/orgs/{r.json()['org']['id']}/projects", headers=h).json()["items"][0]["id"]
                r = c.post(f"/v1/projects/{project}/encryption-keys",
                           json={"provider": "aws-kms", "key_arn": meta["Arn"]}, headers=h)  # fmt: skip
                assert r.status_code == 201, r.text
                key_id = r.json()["id"]
                r = c.post(f"/v1/projects/{project}/clusters", headers=h, json={
                    "name": "live", "plan": "dedicated", "region": "local", "encryption_key_id": key_id})  # fmt: skip
                assert r.status_code == 202, r.text
                cid = r.json()["id"]
                _until(lambda: c.get(f"/v1/clusters/{cid}", headers=h).json()["status"] == "RUNNING", "RUNNING")
                dp = f"/v1/clusters/{cid}/collections"
                assert c.post(dp, json={"name": "d", "dimension": DIM, "metric": "l2"}, headers=h).status_code == 201
                recs = records(30, dimension=DIM)
                assert c.post(f"{dp}/d/upsert", json={"records": recs}, headers=h).status_code == 200
                query = {"vector": recs[3]["vector"], "top_k": 5}
                before = c.post(f"{dp}/d/search", json=query, headers=h).json()["results"]
                assert before[0]["id"] == "r3"

                kms.disable_key(KeyId=meta["KeyId"])
                t0 = time.monotonic()
                got = _until(
                    lambda: (x := c.get(f"/v1/clusters/{cid}", headers=h).json())["status"] == "SUSPENDED" and x,
                    "the beat to suspend the cluster",
                )
                suspended_after = time.monotonic() - t0
                assert got["status_reason"] == "encryption_key_unavailable"
                r = _until(
                    lambda: (x := c.post(f"{dp}/d/search", json=query, headers=h)).status_code == 503 and x,
                    "the edge to refuse",
                    timeout=10,
                )
                assert r.json()["code"] == "encryption_key_unavailable", r.text
                # its engine is stopped (right after the status change is committed), dropping the key
                _until(lambda: engine_pids(settings.data_dir / "clusters" / cid) == [], "the engine to stop", 30)

                kms.enable_key(KeyId=meta["KeyId"])
                _until(lambda: c.get(f"/v1/clusters/{cid}", headers=h).json()["status"] == "RUNNING",
                       "the beat to resume the cluster")  # fmt: skip
                after = _until(
                    lambda: (x := c.post(f"{dp}/d/search", json=query, headers=h)).status_code == 200 and x,
                    "the data plane to answer",
                    timeout=10,
                ).json()["results"]
                assert after == before
                assert suspended_after < 30, suspended_after
                assert c.delete(f"/v1/clusters/{cid}", headers=h).status_code == 202
        finally:
            for p in reversed(procs):
                _end(p)
            if cid:
                stop_engines(settings.data_dir / "clusters" / cid)
            redis.from_url(broker).flushdb()

"""Cluster lifecycle through the public API, with real engine processes (Celery eager: each task runs inline after
the request commits, so a 202 comes back once the work is done).

create (202 + job, Idempotency-Key replay, conflicting body 409) → list/get → modify → suspend (no process left)
→ data-plane call resumes it (503 + Retry-After) → resume with data intact → delete (process and local data gone);
every transition the table forbids is a 409 naming the current status; jobs; metrics after a reconciler pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.control_plane.clusters import tasks
from services.control_plane.clusters.state import ACTION_TARGETS, TRANSITIONS, Status, can
from services.control_plane.provisioners.local import LocalProvisioner
from tests.clusterkit import (
    alive,
    cluster_row,
    collection_body,
    engine_pids,
    insert_cluster,
    records,
    set_status,
    unique_name,
)
from tests.conftest import Tenant, auth, create_key, signup


def _dp(cluster_id: str, rest: str = "") -> str:
    return f"/v1/clusters/{cluster_id}/collections{rest}"


async def _ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}"
    return r.json() if r.content else None


async def test_cluster_lifecycle(client: httpx.AsyncClient, app: FastAPI) -> None:
    owner = await signup(client, "cl-owner", "Lifecycle Org")
    h = owner.headers
    name = unique_name("life")
    body = {"name": name, "plan": "serverless", "region": "local"}

    # -- create: 202 + job; the answer shows the status at acceptance, the task then drives it to RUNNING
    r = await client.post(
        f"/v1/projects/{owner.project_id}/clusters", json=body, headers={**h, "Idempotency-Key": "create-1"}
    )
    created = await _ok(r, 202)
    cid, job_id = created["id"], created["job_id"]
    assert cid.startswith("cl_") and job_id.startswith("job_")
    assert created["status"] == "CREATING"
    assert created["name"] == name and created["project_id"] == owner.project_id
    assert created["cu_size"] == 1 and created["replicas"] == 1
    assert created["endpoint"].endswith(f"/v1/clusters/{cid}")
    assert created["encryption"]["provider"] == "managed" and created["encryption"]["key_id"].startswith("ek_")
    assert created["encryption"]["key_version"] == 1

    job = await _ok(await client.get(f"/v1/jobs/{job_id}", headers=h))
    assert job["kind"] == "cluster.provision" and job["resource_id"] == cid
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["error"] is None
    assert job["finished_at"] is not None

    got = await _ok(await client.get(f"/v1/clusters/{cid}", headers=h))
    assert got["status"] == "RUNNING"
    row = await cluster_row(app, cid)
    pid = row.engine_state["pid"]
    assert alive(pid)
    data_dir = Path(row.engine_state["data_dir"])
    assert data_dir.is_dir()

    # -- Idempotency-Key: same key and body replays the first answer; another body is a 409
    again = await _ok(
        await client.post(
            f"/v1/projects/{owner.project_id}/clusters", json=body, headers={**h, "Idempotency-Key": "create-1"}
        ),
        202,
    )
    assert again["id"] == cid and again["job_id"] == job_id
    r = await client.post(
        f"/v1/projects/{owner.project_id}/clusters",
        json={**body, "name": unique_name("other")},
        headers={**h, "Idempotency-Key": "create-1"},
    )
    assert r.status_code == 409 and r.json()["code"] == "idempotency_key_reused", r.text
    # Without the key, the same name is a conflict rather than a second cluster.
    r = await client.post(f"/v1/projects/{owner.project_id}/clusters", json=body, headers=h)
    assert r.status_code == 409 and r.json()["code"] == "cluster_exists", r.text

    listed = await _ok(await client.get(f"/v1/projects/{owner.project_id}/clusters", headers=h))
    assert [c["id"] for c in listed["items"]] == [cid]
    assert listed["next_page_token"] is None

    # -- some data, through an API key bound to this cluster
    key = (await create_key(client, owner, project_roles=[{"project_id": owner.project_id, "role": "data_writer"}]))[
        "key"
    ]
    kh = auth(key)
    await _ok(await client.post(_dp(cid), json=collection_body("docs"), headers=kh), 201)
    recs = records(20)
    up = await _ok(await client.post(_dp(cid, "/docs/upsert"), json={"records": recs}, headers=kh))
    assert up["upserted_count"] == 20

    async def count() -> int:
        res = await _ok(await client.post(_dp(cid, "/docs/count"), json={}, headers=kh))
        return int(res["count"])

    async def top_ids() -> list[str]:
        res = await _ok(
            await client.post(_dp(cid, "/docs/search"), json={"vector": recs[3]["vector"], "top_k": 5}, headers=kh)
        )
        return [m["id"] for m in res["results"]]

    before = await top_ids()
    assert before[0] == "r3"

    # -- modify: cu_size changes, the engine restarts with the same data
    r = await client.patch(f"/v1/clusters/{cid}", json={"cu_size": 2}, headers=h)
    accepted = await _ok(r, 202)
    assert accepted["status"] == "MODIFYING"
    got = await _ok(await client.get(f"/v1/clusters/{cid}", headers=h))
    assert got["status"] == "RUNNING" and got["cu_size"] == 2
    job = await _ok(await client.get(f"/v1/jobs/{accepted['job_id']}", headers=h))
    assert job["kind"] == "cluster.modify" and job["status"] == "succeeded"
    assert await count() == 20
    r = await client.patch(f"/v1/clusters/{cid}", json={"replicas": 11}, headers=h)  # 1-10 (tests/.../test_replicas.py)
    assert r.status_code == 400 and r.json()["detail"].startswith("replicas:"), r.text
    r = await client.patch(f"/v1/clusters/{cid}", json={}, headers=h)
    assert r.status_code == 422, r.text
    assert (await _ok(await client.get(f"/v1/clusters/{cid}", headers=h)))["status"] == "RUNNING"

    # -- suspend: a snapshot in the object store, and no process
    pid = (await cluster_row(app, cid)).engine_state["pid"]
    accepted = await _ok(await client.post(f"/v1/clusters/{cid}/suspend", headers=h), 202)
    assert accepted["status"] == "SUSPENDING"
    got = await _ok(await client.get(f"/v1/clusters/{cid}", headers=h))
    assert got["status"] == "SUSPENDED"
    row = await cluster_row(app, cid)
    assert "pid" not in row.engine_state and row.engine_url is None
    assert row.engine_state.get("snapshot_uri")
    assert not alive(pid)
    assert engine_pids(data_dir) == []

    # -- a data-plane call to a suspended serverless cluster: 503 + Retry-After, and the cluster resumes
    r = await client.post(_dp(cid, "/docs/count"), json={}, headers=kh)
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["code"] == "cluster_resuming", r.text
    got = await _ok(await client.get(f"/v1/clusters/{cid}", headers=h))
    assert got["status"] == "RUNNING"
    app.state.edge.invalidate(cid)
    assert await count() == 20
    assert await top_ids() == before

    # -- suspend, then resume explicitly: RUNNING with the data intact
    await _ok(await client.post(f"/v1/clusters/{cid}/suspend", headers=h), 202)
    assert (await _ok(await client.get(f"/v1/clusters/{cid}", headers=h)))["status"] == "SUSPENDED"
    accepted = await _ok(await client.post(f"/v1/clusters/{cid}/resume", headers=h), 202)
    assert accepted["status"] == "RESUMING"
    assert (await _ok(await client.get(f"/v1/clusters/{cid}", headers=h)))["status"] == "RUNNING"
    job = await _ok(await client.get(f"/v1/jobs/{accepted['job_id']}", headers=h))
    assert job["kind"] == "cluster.resume" and job["status"] == "succeeded"
    app.state.edge.invalidate(cid)
    assert await count() == 20
    assert await top_ids() == before
    fetched = await _ok(
        await client.post(_dp(cid, "/docs/fetch"), json={"ids": ["r0", "r19"], "include_vectors": True}, headers=kh)
    )
    by_id = {rec["id"]: rec for rec in fetched["records"]}
    assert set(by_id) == {"r0", "r19"}
    assert by_id["r0"]["vector"] == pytest.approx(recs[0]["vector"], rel=1e-5)

    # -- delete: DELETING then DELETED, the process and the local data gone
    pid = (await cluster_row(app, cid)).engine_state["pid"]
    accepted = await _ok(await client.delete(f"/v1/clusters/{cid}", headers=h), 202)
    assert accepted["status"] == "DELETING"
    got = await _ok(await client.get(f"/v1/clusters/{cid}", headers=h))
    assert got["status"] == "DELETED"
    assert not alive(pid)
    assert engine_pids(data_dir) == []
    assert not data_dir.exists()
    listed = await _ok(await client.get(f"/v1/projects/{owner.project_id}/clusters", headers=h))
    assert listed["items"] == []
    app.state.edge.invalidate(cid)
    r = await client.post(_dp(cid, "/docs/count"), json={}, headers=kh)
    assert r.status_code == 404 and r.json()["code"] == "cluster_not_found", r.text
    # The name is free again, and the project can be deleted once it holds no live cluster.
    audit = await _ok(await client.get(f"/v1/orgs/{owner.org_id}/audit-logs?limit=100", headers=h))
    actions = {e["action"] for e in audit["items"] if e.get("target_id") == cid}
    assert {"cluster.create", "cluster.modify", "cluster.suspend", "cluster.resume", "cluster.delete"} <= actions


# -- every transition the table forbids -----------------------------------------------------------------------
ACTION_CALLS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "modify": ("PATCH", "/v1/clusters/{cid}", {"cu_size": 2}),
    "suspend": ("POST", "/v1/clusters/{cid}/suspend", None),
    "resume": ("POST", "/v1/clusters/{cid}/resume", None),
    "delete": ("DELETE", "/v1/clusters/{cid}", None),
}
ILLEGAL = [
    (status, action)
    for status in Status
    for action, target in ACTION_TARGETS.items()
    if action in ACTION_CALLS and not can(status, target)
]
LEGAL = [
    (status, action)
    for status in Status
    for action, target in ACTION_TARGETS.items()
    if action in ACTION_CALLS and can(status, target)
]


@pytest.fixture(scope="module")
def tenant_box() -> dict[str, Tenant]:
    return {}


async def _tenant(client: httpx.AsyncClient, box: dict[str, Tenant]) -> Tenant:
    if "t" not in box:
        box["t"] = await signup(client, "cl-states", "States Org")
    return box["t"]


def test_every_api_action_has_a_target_status() -> None:
    # restore is driven by the backups domain; every other action has a route here.
    assert set(ACTION_CALLS) == set(ACTION_TARGETS) - {"restore"}
    assert set(TRANSITIONS) == set(Status)
    assert TRANSITIONS[Status.DELETED] == frozenset()


@pytest.mark.parametrize(("status", "action"), ILLEGAL, ids=[f"{s.value}-{a}" for s, a in ILLEGAL])
async def test_illegal_transition_is_409_naming_the_status(
    client: httpx.AsyncClient, app: FastAPI, tenant_box: dict[str, Tenant], status: Status, action: str
) -> None:
    t = await _tenant(client, tenant_box)
    cid = await insert_cluster(app, t.org_id, t.project_id, status.value)
    method, path, body = ACTION_CALLS[action]
    try:
        r = await client.request(method, path.format(cid=cid), json=body, headers=t.headers)
        assert r.status_code == 409, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        problem = r.json()
        assert problem["code"] == "invalid_cluster_state"
        assert status.value in problem["detail"]
        assert problem.get("current_status") == status.value
        # Nothing changed.
        assert (await cluster_row(app, cid)).status == status.value
    finally:
        await set_status(app, cid, Status.DELETED.value)


@pytest.mark.parametrize(("status", "action"), LEGAL, ids=[f"{s.value}-{a}" for s, a in LEGAL])
async def test_legal_transition_is_accepted(
    client: httpx.AsyncClient, app: FastAPI, tenant_box: dict[str, Tenant], status: Status, action: str
) -> None:
    """The API accepts exactly what the table allows (the task then fails at once: the row has no provisioner)."""
    t = await _tenant(client, tenant_box)
    cid = await insert_cluster(app, t.org_id, t.project_id, status.value)
    method, path, body = ACTION_CALLS[action]
    try:
        r = await client.request(method, path.format(cid=cid), json=body, headers=t.headers)
        assert r.status_code == 202, r.text
        assert r.json()["status"] == ACTION_TARGETS[action].value
        job = await _ok(await client.get(f"/v1/jobs/{r.json()['job_id']}", headers=t.headers))
        assert job["status"] == "failed" and "not available" in (job["error"] or "")
    finally:
        await set_status(app, cid, Status.DELETED.value)


async def test_failed_provision_ends_failed_with_reason_and_can_be_deleted(
    client: httpx.AsyncClient, app: FastAPI, tenant_box: dict[str, Tenant]
) -> None:
    t = await _tenant(client, tenant_box)
    cid = await insert_cluster(app, t.org_id, t.project_id, Status.CREATING.value)
    from services.core.ids import new_id

    job_id = new_id("job")
    from services.control_plane.clusters.models import Job

    async with app.state.db.transaction() as s:
        s.add(Job(id=job_id, org_id=t.org_id, kind="cluster.provision", resource_id=cid, params={}))
    assert tasks.drive("cluster.provision", cid, job_id, tasks.WORK["cluster.provision"]) == "failed"
    got = await _ok(await client.get(f"/v1/clusters/{cid}", headers=t.headers))
    assert got["status"] == "FAILED" and "not available" in got["status_reason"]
    job = await _ok(await client.get(f"/v1/jobs/{job_id}", headers=t.headers))
    assert job["status"] == "failed" and job["error"]
    # Running the task again is a no-op (idempotent by job).
    assert tasks.drive("cluster.provision", cid, job_id, tasks.WORK["cluster.provision"]) == "failed"
    async with app.state.db.transaction() as s:
        from services.control_plane.clusters.models import Cluster

        c = await s.get(Cluster, cid)
        assert c is not None
        c.provisioner = "local"
    r = await client.delete(f"/v1/clusters/{cid}", headers=t.headers)
    assert r.status_code == 202, r.text
    assert (await _ok(await client.get(f"/v1/clusters/{cid}", headers=t.headers)))["status"] == "DELETED"


# -- jobs and metrics ---------------------------------------------------------------------------------------
async def test_jobs_and_metrics_after_a_reconcile_pass(client: httpx.AsyncClient, app: FastAPI) -> None:
    from tests.clusterkit import create_cluster

    owner = await signup(client, "cl-metrics", "Metrics Org")
    other = await signup(client, "cl-metrics-other", "Other Org")
    cluster = await create_cluster(client, owner.access_token, owner.project_id)
    cid = cluster["id"]
    try:
        job = await _ok(await client.get(f"/v1/jobs/{cluster['job_id']}", headers=owner.headers))
        assert job["status"] == "succeeded"
        r = await client.get(f"/v1/jobs/{cluster['job_id']}", headers=other.headers)
        assert r.status_code == 404 and r.json()["code"] == "job_not_found"
        r = await client.get("/v1/jobs/job_doesnotexist", headers=owner.headers)
        assert r.status_code == 404

        await _ok(await client.post(_dp(cid), json=collection_body("m"), headers=owner.headers), 201)
        await _ok(await client.post(_dp(cid, "/m/upsert"), json={"records": records(7)}, headers=owner.headers))
        for _ in range(3):
            await _ok(
                await client.post(
                    _dp(cid, "/m/search"), json={"vector": [1, 2, 3, 4], "top_k": 3}, headers=owner.headers
                )
            )
        empty = await _ok(await client.get(f"/v1/clusters/{cid}/metrics", headers=owner.headers))
        assert empty["points"] == []
        counts = tasks.reconcile()
        assert counts["heartbeats"] >= 1
        m = await _ok(await client.get(f"/v1/clusters/{cid}/metrics?step=10", headers=owner.headers))
        assert m["cluster_id"] == cid and m["step"] == 10
        assert len(m["points"]) == 1
        point = m["points"][0]
        assert point["vectors"] == 7 and point["storage_bytes"] > 0
        got = await _ok(await client.get(f"/v1/clusters/{cid}", headers=owner.headers))
        assert got["vector_count"] == 7 and got["storage_bytes"] > 0
        r = await client.get(f"/v1/clusters/{cid}/metrics", headers=other.headers)
        assert r.status_code == 404
        r = await client.get(
            f"/v1/clusters/{cid}/metrics?start=2026-01-02T00:00:00Z&end=2026-01-01T00:00:00Z", headers=owner.headers
        )
        assert r.status_code == 422
    finally:
        await _ok(await client.delete(f"/v1/clusters/{cid}", headers=owner.headers), 202)


def test_local_provisioner_keeps_secrets_out_of_argv(tmp_path: Path) -> None:
    """The token and data key are in the child's environment only (checked on a live engine)."""
    import os

    spec_token = "tok-" + os.urandom(8).hex()
    from services.control_plane.provisioners.base import EngineSpec

    prov = LocalProvisioner(root=tmp_path / "clusters")
    spec = EngineSpec("cl_argvcheck", 1, 1, spec_token, os.urandom(32), {})
    handle = prov.start(spec, 60)
    try:
        pid = handle.state["pid"]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert spec_token.encode() not in argv
        # Re-adoption: start again with the recorded state gives the same process.
        again = prov.start(EngineSpec("cl_argvcheck", 1, 1, spec_token, spec.data_key, handle.state), 60)
        assert again.state["pid"] == pid and again.url == handle.url
        # An engine nobody recorded (its starter was killed between fork and writing the record) is adopted,
        # not doubled, and a stop with no state still ends it.
        (tmp_path / "clusters" / "cl_argvcheck.state.json").unlink()
        stray = prov.start(EngineSpec("cl_argvcheck", 1, 1, spec_token, spec.data_key, {}), 60)
        assert stray.state["pid"] == pid and stray.url == handle.url
        assert engine_pids(tmp_path / "clusters") == [pid]
        (tmp_path / "clusters" / "cl_argvcheck.state.json").unlink()
        prov.stop("cl_argvcheck", {})
        assert not alive(pid)
    finally:
        prov.destroy("cl_argvcheck", handle.state)
    assert not alive(handle.state["pid"])
    assert engine_pids(tmp_path / "clusters") == []

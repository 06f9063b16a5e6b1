"""Cluster rules: create (with idempotency keys), read, modify, suspend, resume, delete, jobs, metrics.

Status changes go through ``state.check`` (one transition table); the work itself is done by Celery tasks
(``tasks.py``) enqueued after the request commits.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

import anyio
import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.keyprovider import KeyUnavailable, LocalKeyProvider, local_provider
from services.auth.subject import AuthSubject
from services.control_plane import service as org_service
from services.control_plane.clusters import repository as repo
from services.control_plane.clusters import state
from services.control_plane.clusters.models import Cluster, ClusterMetric, IdempotencyRecord, Job
from services.control_plane.clusters.schemas import ClusterIn, ClusterOut, ClusterPatch, EncryptionOut
from services.control_plane.clusters.state import Status
from services.control_plane.keys import ring
from services.control_plane.keys import service as keys
from services.control_plane.keys.clusterkeys import key_context
from services.control_plane.models import Project
from services.core import audit
from services.core.celery_app import enqueue
from services.core.db import utcnow
from services.core.errors import Conflict, NotFound, Unprocessable
from services.core.ids import new_id
from services.core.settings import get_settings


def new_engine_token(provider: LocalKeyProvider, ctx: dict[str, str]) -> bytes:
    """A fresh random bearer token for the cluster's engine, wrapped like its data key."""
    return provider.wrap(secrets.token_urlsafe(32).encode(), {**ctx, "use": "engine_token"})


def cluster_out(cluster: Cluster) -> ClusterOut:
    return ClusterOut(
        id=cluster.id,
        name=cluster.name,
        project_id=cluster.project_id,
        org_id=cluster.org_id,
        plan=cluster.plan,
        region=cluster.region,
        cu_size=cluster.cu_size,
        replicas=cluster.replicas,
        status=cluster.status,
        status_reason=cluster.status_reason,
        endpoint=f"{get_settings().public_url}/v1/clusters/{cluster.id}",
        created_at=cluster.created_at,
        updated_at=cluster.updated_at,
        storage_bytes=cluster.storage_bytes,
        vector_count=cluster.vector_count,
        encryption=EncryptionOut(
            key_id=cluster.encryption_key_id,
            provider=cluster.key_provider,
            key_version=cluster.key_version,
            rekey_in_progress=cluster.data_key_next_wrapped is not None,
        ),
    )


def _audit(session: AsyncSession, subject: AuthSubject, action: str, cluster: Cluster, **details: Any) -> None:
    audit.record(
        session,
        action=action,
        org_id=cluster.org_id,
        actor_type=subject.kind,
        actor_id=subject.id,
        target_type="cluster",
        target_id=cluster.id,
        details=details,
    )


def _job(session: AsyncSession, cluster: Cluster, kind: str, **params: Any) -> Job:
    job = Job(id=new_id("job"), org_id=cluster.org_id, kind=kind, resource_id=cluster.id, params=params)
    session.add(job)
    enqueue(kind, cluster.id, job.id)
    return job


def request_hash(path: str, body: Any) -> str:
    return hashlib.sha256(path.encode() + b"\n" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def replay(
    session: AsyncSession, subject: AuthSubject, key: str | None, digest: str
) -> tuple[int, dict[str, Any]] | None:
    """The stored answer for an Idempotency-Key already used with the same request; 409 if the body differs."""
    if not key:
        return None
    record = await repo.idempotency_record(session, subject.id, key)
    if record is None:
        return None
    if record.request_hash != digest:
        raise Conflict("this Idempotency-Key was already used with a different request", code="idempotency_key_reused")
    return record.status_code, record.response


def remember(
    session: AsyncSession, subject: AuthSubject, key: str | None, digest: str, status: int, body: dict[str, Any]
) -> None:
    if key:
        session.add(
            IdempotencyRecord(
                id=new_id("idk"),
                principal_id=subject.id,
                key=key,
                request_hash=digest,
                status_code=status,
                response=body,
            )
        )


def _validate_shape(cu_size: int | None, replicas: int | None) -> None:
    settings = get_settings()
    if cu_size is not None and cu_size > settings.max_cu_size:
        raise Unprocessable(f"cu_size: at most {settings.max_cu_size} in this deployment", code="invalid_cu_size")
    # replicas (1-10, checked by the schema): the primary plus replicas-1 read replicas following its WAL
    del replicas


async def create_cluster(
    session: AsyncSession, subject: AuthSubject, project_id: str, body: ClusterIn
) -> tuple[Cluster, Job]:
    project = await org_service.get_project(session, subject, project_id, "cluster:create")
    _validate_shape(body.cu_size, body.replicas)
    if await repo.cluster_by_name(session, project.id, body.name):
        raise Conflict(f"a cluster named {body.name!r} already exists in this project", code="cluster_exists")
    ref = await keys.key_for_new_cluster(session, project, body.encryption_key_id)
    settings = get_settings()
    cluster = Cluster(
        id=new_id("cl"),
        org_id=project.org_id,
        project_id=project.id,
        name=body.name,
        plan=body.plan,
        region=body.region,
        cu_size=body.cu_size,
        replicas=body.replicas,
        status=Status.CREATING.value,
        provisioner=settings.provisioner,
        key_provider=ref.provider,
        encryption_key_id=ref.key_id,
        key_version=ref.version,
        engine_state={},
        engine_token_wrapped=b"",
        data_key_wrapped=b"",
    )
    ctx = key_context(cluster)
    cluster.data_key_wrapped = (await keys.call(lambda: ring.generate(ref, ctx), "cannot create the cluster"))[1]
    cluster.engine_token_wrapped = new_engine_token(local_provider(), ctx)
    session.add(cluster)
    await session.flush()
    job = _job(session, cluster, "cluster.provision")
    _audit(session, subject, "cluster.create", cluster, plan=body.plan, cu_size=body.cu_size)
    await session.flush()
    return cluster, job


async def get_cluster(session: AsyncSession, subject: AuthSubject, cluster_id: str, privilege: str) -> Cluster:
    cluster = await session.get(Cluster, cluster_id)
    if cluster is None:
        raise NotFound(f"cluster {cluster_id} not found", code="cluster_not_found")
    subject.require_cluster(cluster.org_id, cluster.project_id, cluster.id, privilege)
    return cluster


async def list_clusters(
    session: AsyncSession, subject: AuthSubject, project_id: str, after: str | None, limit: int
) -> Sequence[Cluster]:
    # Anyone who sees the project lists the clusters they may see: a key limited to one cluster of the project
    # (no project:read) lists just that one.
    project = await session.get(Project, project_id)
    if project is None or not subject.can_see_project(project.org_id, project.id):
        raise NotFound(f"project {project_id} not found", code="project_not_found")
    rows = await repo.clusters_of_project(session, project.id, after, limit)
    return [c for c in rows if subject.can_see_cluster(c.org_id, c.project_id, c.id)]


async def _transition(
    session: AsyncSession, subject: AuthSubject, cluster: Cluster, action: str, kind: str, **params: Any
) -> Job:
    target = state.ACTION_TARGETS[action]
    state.check(cluster.status, target, action)
    cluster.status = target.value
    cluster.status_reason = None
    job = _job(session, cluster, kind, **params)
    _audit(session, subject, f"cluster.{action}", cluster, **params)
    await session.flush()
    return job


async def modify_cluster(
    session: AsyncSession, subject: AuthSubject, cluster_id: str, body: ClusterPatch
) -> tuple[Cluster, Job]:
    cluster = await get_cluster(session, subject, cluster_id, "cluster:update")
    _validate_shape(body.cu_size, body.replicas)
    params = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    if not params:
        raise Unprocessable("nothing to change: give cu_size or replicas", code="empty_patch")
    return cluster, await _transition(session, subject, cluster, "modify", "cluster.modify", **params)


async def suspend_cluster(session: AsyncSession, subject: AuthSubject, cluster_id: str) -> tuple[Cluster, Job]:
    cluster = await get_cluster(session, subject, cluster_id, "cluster:update")
    return cluster, await _transition(session, subject, cluster, "suspend", "cluster.suspend")


async def resume_cluster(session: AsyncSession, subject: AuthSubject, cluster_id: str) -> tuple[Cluster, Job]:
    cluster = await get_cluster(session, subject, cluster_id, "cluster:update")
    state.check(cluster.status, Status.RESUMING, "resume")
    await require_key_usable(session, cluster, "cannot resume")
    return cluster, await _transition(session, subject, cluster, "resume", "cluster.resume")


async def require_key_usable(session: AsyncSession, cluster: Cluster, doing: str) -> None:
    """409 (503 if the provider cannot be asked) unless the cluster's encryption key is usable right now."""
    if cluster.encryption_key_id is None:
        return
    ref = await ring.load_ref(session, cluster.encryption_key_id, cluster.key_version, cluster.org_id)
    st = await anyio.to_thread.run_sync(ring.describe, ref)
    if not st.usable:
        raise keys.key_error(KeyUnavailable(st.reason or st.state, transient=st.transient), doing)


async def delete_cluster(session: AsyncSession, subject: AuthSubject, cluster_id: str) -> tuple[Cluster, Job]:
    cluster = await get_cluster(session, subject, cluster_id, "cluster:delete")
    return cluster, await _transition(session, subject, cluster, "delete", "cluster.delete")


async def get_job(session: AsyncSession, subject: AuthSubject, job_id: str) -> Job:
    job = await repo.job(session, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found", code="job_not_found")
    # A job concerns a cluster directly, or through another resource (a backup) that names its cluster.
    cluster = await session.get(Cluster, job.params.get("cluster_id") or job.resource_id)
    if cluster is None or not subject.can_see_cluster(cluster.org_id, cluster.project_id, cluster.id):
        raise NotFound(f"job {job_id} not found", code="job_not_found")
    return job


async def cluster_metrics(
    session: AsyncSession,
    subject: AuthSubject,
    cluster_id: str,
    start: dt.datetime | None,
    end: dt.datetime | None,
    step: int,
) -> tuple[dt.datetime, dt.datetime, list[dict[str, Any]]]:
    cluster = await get_cluster(session, subject, cluster_id, "cluster:read")
    end = end or utcnow()
    start = start or end - dt.timedelta(hours=1)
    if start >= end:
        raise Unprocessable("start must be before end", code="invalid_range")
    if (end - start).total_seconds() / step > 10_000:
        raise Unprocessable("too many points: widen step or narrow the range", code="invalid_range")
    samples = await repo.metrics(session, cluster.id, start, end)
    baseline = await repo.metric_before(session, cluster.id, start)
    return start, end, downsample(samples, start, step, baseline)


def downsample(
    samples: Sequence[ClusterMetric], start: dt.datetime, step: int, baseline: ClusterMetric | None = None
) -> list[dict[str, Any]]:
    """One point per ``step`` seconds that holds samples. ``vectors`` and ``storage_bytes``: the last sample in
    the step. ``requests``/``qps``: the change of the running request total from the last sample before the step
    (``baseline`` for the first) to the last one in it, over the time between them (None without an earlier
    sample). Latencies: each sample holds the read percentiles of the interval it closes; a step with several
    samples reports the request-weighted mean of their p50 and the highest p99."""
    buckets: dict[int, list[ClusterMetric]] = {}
    for s in samples:
        buckets.setdefault(int((s.at - start).total_seconds() // step), []).append(s)
    points: list[dict[str, Any]] = []
    prev = baseline
    for b in sorted(buckets):
        group = buckets[b]
        last = group[-1]
        qps = requests = None
        if prev is not None:
            span = (last.at - prev.at).total_seconds()
            requests = max(0, last.requests - prev.requests)
            qps = round(requests / span, 3) if span > 0 else None
        weighted = total = 0.0
        p50s: list[float] = []
        p99: float | None = None
        before = prev
        for s in group:
            n = max(0, s.requests - before.requests) if before is not None else 0
            if s.latency_p50_ms is not None:
                p50s.append(s.latency_p50_ms)
                weighted += s.latency_p50_ms * n
                total += n
            if s.latency_p99_ms is not None:
                p99 = s.latency_p99_ms if p99 is None else max(p99, s.latency_p99_ms)
            before = s
        p50 = None
        if p50s:
            p50 = round(weighted / total, 3) if total > 0 else round(sum(p50s) / len(p50s), 3)
        points.append(
            {
                "t": start + dt.timedelta(seconds=b * step),
                "qps": qps,
                "requests": requests,
                "latency_p50_ms": p50,
                "latency_p99_ms": p99,
                "vectors": last.vector_count,
                "storage_bytes": last.storage_bytes,
            }
        )
        prev = last
    return points


async def project_has_clusters(session: AsyncSession, project_id: str) -> str | None:
    if await repo.live_cluster_exists(session, project_id):
        return "it still holds clusters; delete them first"
    return None


org_service.PROJECT_DELETE_GUARDS.append(project_has_clusters)

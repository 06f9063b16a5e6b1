"""Cluster routes (thin): lifecycle, jobs and metrics."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, status
from starlette.responses import Response

from services.auth.deps import DbSession, Pagination, Subject
from services.control_plane.clusters import service
from services.control_plane.clusters import tasks as _tasks  # noqa: F401 - registers the Celery tasks
from services.control_plane.clusters.schemas import (
    ClusterAccepted,
    ClusterIn,
    ClusterOut,
    ClusterPatch,
    JobOut,
    MetricPoint,
    MetricsOut,
)
from services.core.responses import errors
from services.core.schemas import ListOf

router = APIRouter(prefix="/v1", tags=["clusters"])
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=200, description="Replays the first result for the same key and body"),
]


def _accepted(cluster: Any, job: Any) -> ClusterAccepted:
    return ClusterAccepted(**service.cluster_out(cluster).model_dump(), job_id=job.id)


@router.post(
    "/projects/{project_id}/clusters",
    response_model=ClusterAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(401, 403, 404, 409, 422),
)
async def create_cluster(
    project_id: str,
    body: ClusterIn,
    subject: Subject,
    session: DbSession,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    digest = service.request_hash(request.url.path, body.model_dump(mode="json"))
    replayed = await service.replay(session, subject, idempotency_key, digest)
    if replayed is not None:
        import orjson

        code, payload = replayed
        return Response(orjson.dumps(payload), status_code=code, media_type="application/json")
    cluster, job = await service.create_cluster(session, subject, project_id, body)
    out = _accepted(cluster, job)
    service.remember(session, subject, idempotency_key, digest, 202, out.model_dump(mode="json"))
    return out


@router.get("/projects/{project_id}/clusters", response_model=ListOf[ClusterOut], responses=errors(401, 403, 404))
async def list_clusters(project_id: str, subject: Subject, session: DbSession, page: Pagination) -> ListOf[ClusterOut]:
    rows = await service.list_clusters(session, subject, project_id, page.after, page.limit)
    items, token = page.cut(rows)
    return ListOf[ClusterOut](items=[service.cluster_out(c) for c in items], next_page_token=token)


@router.get("/clusters/{cluster_id}", response_model=ClusterOut, responses=errors(401, 403, 404))
async def get_cluster(cluster_id: str, subject: Subject, session: DbSession) -> ClusterOut:
    return service.cluster_out(await service.get_cluster(session, subject, cluster_id, "cluster:read"))


@router.patch(
    "/clusters/{cluster_id}",
    response_model=ClusterAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(401, 403, 404, 409, 422),
)
async def modify_cluster(cluster_id: str, body: ClusterPatch, subject: Subject, session: DbSession) -> ClusterAccepted:
    return _accepted(*await service.modify_cluster(session, subject, cluster_id, body))


@router.post(
    "/clusters/{cluster_id}/suspend",
    response_model=ClusterAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(401, 403, 404, 409),
)
async def suspend_cluster(cluster_id: str, subject: Subject, session: DbSession) -> ClusterAccepted:
    return _accepted(*await service.suspend_cluster(session, subject, cluster_id))


@router.post(
    "/clusters/{cluster_id}/resume",
    response_model=ClusterAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(401, 403, 404, 409),
)
async def resume_cluster(cluster_id: str, subject: Subject, session: DbSession) -> ClusterAccepted:
    return _accepted(*await service.resume_cluster(session, subject, cluster_id))


@router.delete(
    "/clusters/{cluster_id}",
    response_model=ClusterAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(401, 403, 404, 409),
)
async def delete_cluster(cluster_id: str, subject: Subject, session: DbSession) -> ClusterAccepted:
    return _accepted(*await service.delete_cluster(session, subject, cluster_id))


@router.get("/jobs/{job_id}", response_model=JobOut, responses=errors(401, 404), tags=["jobs"])
async def get_job(job_id: str, subject: Subject, session: DbSession) -> JobOut:
    return JobOut.model_validate(await service.get_job(session, subject, job_id))


@router.get("/clusters/{cluster_id}/metrics", response_model=MetricsOut, responses=errors(401, 403, 404, 422))
async def cluster_metrics(
    cluster_id: str,
    subject: Subject,
    session: DbSession,
    start: Annotated[dt.datetime | None, Query(description="RFC 3339; default: an hour before end")] = None,
    end: Annotated[dt.datetime | None, Query(description="RFC 3339; default: now")] = None,
    step: Annotated[int, Query(ge=10, le=86400, description="Seconds between points")] = 60,
) -> MetricsOut:
    aware = [t if t is None or t.tzinfo else t.replace(tzinfo=dt.UTC) for t in (start, end)]
    first, last, points = await service.cluster_metrics(session, subject, cluster_id, aware[0], aware[1], step)
    return MetricsOut(
        cluster_id=cluster_id, start=first, end=last, step=step, points=[MetricPoint(**p) for p in points]
    )

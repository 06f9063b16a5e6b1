"""All SQL of the clusters domain."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.control_plane.clusters.models import Cluster, ClusterMetric, IdempotencyRecord, Job
from services.control_plane.clusters.state import Status


async def cluster_by_name(session: AsyncSession, project_id: str, name: str) -> Cluster | None:
    stmt = select(Cluster).where(
        Cluster.project_id == project_id, Cluster.name == name, Cluster.status != Status.DELETED.value
    )
    return (await session.execute(stmt)).scalars().first()


async def clusters_of_project(
    session: AsyncSession, project_id: str, after: str | None, limit: int
) -> Sequence[Cluster]:
    stmt = select(Cluster).where(Cluster.project_id == project_id, Cluster.status != Status.DELETED.value)
    if after:
        stmt = stmt.where(Cluster.id > after)
    return (await session.execute(stmt.order_by(Cluster.id).limit(limit + 1))).scalars().all()


async def live_cluster_exists(session: AsyncSession, project_id: str) -> bool:
    stmt = select(Cluster.id).where(Cluster.project_id == project_id, Cluster.status != Status.DELETED.value)
    return (await session.execute(stmt.limit(1))).first() is not None


async def idempotency_record(session: AsyncSession, principal_id: str, key: str) -> IdempotencyRecord | None:
    stmt = select(IdempotencyRecord).where(IdempotencyRecord.principal_id == principal_id, IdempotencyRecord.key == key)
    return (await session.execute(stmt)).scalar_one_or_none()


async def metrics(
    session: AsyncSession, cluster_id: str, start: dt.datetime, end: dt.datetime
) -> Sequence[ClusterMetric]:
    stmt = (
        select(ClusterMetric)
        .where(ClusterMetric.cluster_id == cluster_id, ClusterMetric.at >= start, ClusterMetric.at <= end)
        .order_by(ClusterMetric.at)
        .limit(20_000)
    )
    return (await session.execute(stmt)).scalars().all()


async def metric_before(session: AsyncSession, cluster_id: str, start: dt.datetime) -> ClusterMetric | None:
    """The last sample before ``start``: the baseline of the first point's rate."""
    stmt = (
        select(ClusterMetric)
        .where(ClusterMetric.cluster_id == cluster_id, ClusterMetric.at < start)
        .order_by(ClusterMetric.at.desc())
        .limit(1)
    )
    return (await session.execute(stmt)).scalars().first()


async def job(session: AsyncSession, job_id: str) -> Job | None:
    return await session.get(Job, job_id)

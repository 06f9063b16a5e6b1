"""Cluster tables: clusters, jobs (long operations), idempotency records, metric samples."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from services.core.db import Base, IdMixin, TimestampMixin, utcnow


class Cluster(IdMixin, TimestampMixin, Base):
    __tablename__ = "clusters"
    __table_args__ = (Index("ix_clusters_project_status", "project_id", "status"),)

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(64))
    plan: Mapped[str] = mapped_column(String(16))  # serverless | dedicated
    region: Mapped[str] = mapped_column(String(32))
    cu_size: Mapped[int]
    replicas: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), index=True)
    status_reason: Mapped[str | None] = mapped_column(String(300))
    # Where and how the control plane reaches the engine (never shown to customers).
    provisioner: Mapped[str] = mapped_column(String(16))
    engine_url: Mapped[str | None] = mapped_column(String(200))
    engine_state: Mapped[dict[str, Any]] = mapped_column(default=dict)  # provisioner's bookkeeping (pid, port)
    # Envelope encryption: the engine token and data key, wrapped by the key provider; plaintext only in memory.
    # The engine token is always wrapped by the deployment's master key (``local``); the data key by version
    # ``key_version`` of ``encryption_key_id`` (``key_provider`` names its kind: managed | aws-kms), or by the
    # master key for clusters made before encryption keys existed (``local``, no key id).
    key_provider: Mapped[str] = mapped_column(String(16))
    encryption_key_id: Mapped[str | None] = mapped_column(String(40), index=True)
    key_version: Mapped[int | None]
    engine_token_wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    data_key_wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    # A re-key in progress: the new data key (wrapped like the current one) the engine is re-encrypting its files
    # under; it replaces ``data_key_wrapped`` when the engine reports every file done.
    data_key_next_wrapped: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Last heartbeat from the engine.
    last_heartbeat_at: Mapped[dt.datetime | None]
    vector_count: Mapped[int] = mapped_column(BigInteger, default=0)
    storage_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    deleted_at: Mapped[dt.datetime | None]


class Job(IdMixin, Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_resource", "resource_id", "status"),)

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # cluster.provision, cluster.suspend, ...
    resource_id: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|succeeded|failed
    progress: Mapped[float] = mapped_column(default=0.0)
    error: Mapped[str | None] = mapped_column(String(1000))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]


class IdempotencyRecord(IdMixin, Base):
    """The first response to a create with an ``Idempotency-Key``, replayed for the same key and body."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("principal_id", "key"),)

    principal_id: Mapped[str] = mapped_column(String(40))
    key: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int]
    response: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ClusterMetric(Base):
    """One sample per cluster per reconciler pass: the source of ``GET /v1/clusters/{id}/metrics``."""

    __tablename__ = "cluster_metrics"

    cluster_id: Mapped[str] = mapped_column(ForeignKey("clusters.id", ondelete="CASCADE"), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)  # cumulative
    read_units: Mapped[int] = mapped_column(BigInteger, default=0)  # cumulative
    write_units: Mapped[int] = mapped_column(BigInteger, default=0)  # cumulative
    latency_p50_ms: Mapped[float | None]
    latency_p99_ms: Mapped[float | None]
    vector_count: Mapped[int] = mapped_column(BigInteger, default=0)
    storage_bytes: Mapped[int] = mapped_column(BigInteger, default=0)

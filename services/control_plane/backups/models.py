"""Backups (snapshots of a cluster in the object store) and per-cluster backup policies."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from services.core.db import Base, IdMixin, utcnow


class Backup(IdMixin, Base):
    __tablename__ = "backups"
    __table_args__ = (Index("ix_backups_cluster_created", "cluster_id", "created_at"),)

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[str] = mapped_column(String(40))
    cluster_id: Mapped[str] = mapped_column(String(40))  # no FK: a backup outlives its cluster
    kind: Mapped[str] = mapped_column(String(16))  # manual | policy
    status: Mapped[str] = mapped_column(String(16))  # CREATING | AVAILABLE | FAILED | DELETED
    status_reason: Mapped[str | None] = mapped_column(String(300))
    uri: Mapped[str] = mapped_column(String(500))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    vector_count: Mapped[int] = mapped_column(BigInteger, default=0)
    collections: Mapped[list[Any]] = mapped_column(default=list)
    # The snapshot is encrypted with the source cluster's data key; a copy of it, wrapped for this backup, lets a
    # restore into a new cluster read it after the source cluster is gone.
    key_provider: Mapped[str] = mapped_column(String(16))
    encryption_key_id: Mapped[str | None] = mapped_column(String(40), index=True)
    key_version: Mapped[str] = mapped_column(String(64))  # the version of encryption_key_id that wraps it
    data_key_wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[dt.datetime | None]
    expires_at: Mapped[dt.datetime | None]
    deleted_at: Mapped[dt.datetime | None]


class BackupPolicy(Base):
    __tablename__ = "backup_policies"

    cluster_id: Mapped[str] = mapped_column(ForeignKey("clusters.id", ondelete="CASCADE"), primary_key=True)
    enabled: Mapped[bool] = mapped_column(default=False)
    every_hours: Mapped[int] = mapped_column(default=24)
    retention_days: Mapped[int] = mapped_column(default=7)
    last_run_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

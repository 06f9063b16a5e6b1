"""Encryption keys: a project's key-encryption keys (Vecta-managed or the customer's AWS KMS key) and their
versions. A cluster's data key is wrapped by one version of one key (``clusters.encryption_key_id`` and
``clusters.key_version``); a backup keeps a copy of its data key wrapped by the version current when it was
taken. Versions are never removed while a cluster or backup row names them."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from services.core.db import Base, IdMixin, TimestampMixin, utcnow


class EncryptionKey(IdMixin, TimestampMixin, Base):
    __tablename__ = "encryption_keys"
    __table_args__ = (Index("ix_encryption_keys_project", "project_id", "status"),)

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[str] = mapped_column(String(40))  # no FK: versions outlive a project while backups use them
    provider: Mapped[str] = mapped_column(String(16))  # managed | aws-kms
    is_default: Mapped[bool] = mapped_column(default=False)  # the project's managed key for clusters naming none
    status: Mapped[str] = mapped_column(String(16), default="ENABLED")  # ENABLED | UNAVAILABLE | DELETED
    status_reason: Mapped[str | None] = mapped_column(String(300))
    current_version: Mapped[int] = mapped_column(default=1)
    last_checked_at: Mapped[dt.datetime | None]
    deleted_at: Mapped[dt.datetime | None]


class EncryptionKeyVersion(Base):
    __tablename__ = "encryption_key_versions"

    key_id: Mapped[str] = mapped_column(ForeignKey("encryption_keys.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(primary_key=True)
    # aws-kms: the customer's key and, for a key in another account, the role Vecta assumes to use it.
    key_arn: Mapped[str | None] = mapped_column(String(2048))
    role_arn: Mapped[str | None] = mapped_column(String(2048))
    # managed: this version's 32-byte key-encryption key, wrapped by the deployment's master key provider.
    material_wrapped: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

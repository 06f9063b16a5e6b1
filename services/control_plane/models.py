"""Tenancy tables: organizations, projects and invitations."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from services.core.db import Base, IdMixin, TimestampMixin


class Organization(IdMixin, TimestampMixin, Base):
    __tablename__ = "organizations"

    name: Mapped[str] = mapped_column(String(200))
    billing_email: Mapped[str | None] = mapped_column(String(320))
    # The sts:ExternalId Vecta presents when it assumes a customer's role for their KMS key (made on first use;
    # one per organization, so no other customer can have Vecta assume that role: the confused-deputy guard).
    kms_external_id: Mapped[str | None] = mapped_column(String(64))


class Project(IdMixin, TimestampMixin, Base):
    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("org_id", "name"),)

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))


class Invitation(IdMixin, Base):
    __tablename__ = "invitations"

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    email: Mapped[str] = mapped_column(String(320))
    org_role: Mapped[str] = mapped_column(String(64))
    project_roles: Mapped[list[Any]]
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    invited_by: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    accepted_at: Mapped[dt.datetime | None]
    accepted_by: Mapped[str | None] = mapped_column(String(40))

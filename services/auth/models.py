"""Identity tables: users, console sessions (refresh-token families), one-time tokens, API keys, and the
role tables authorization is computed from (org memberships, custom roles, project role bindings)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from services.core.db import Base, IdMixin, TimestampMixin, utcnow


class User(IdMixin, TimestampMixin, Base):
    __tablename__ = "users"

    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    password_hash: Mapped[str] = mapped_column(String(255))
    email_verified_at: Mapped[dt.datetime | None]
    password_changed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuthSession(IdMixin, Base):
    """A console login; its refresh tokens form one rotation family."""

    __tablename__ = "auth_sessions"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]
    revoked_reason: Mapped[str | None] = mapped_column(String(40))
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(300))


class RefreshToken(IdMixin, Base):
    __tablename__ = "refresh_tokens"

    session_id: Mapped[str] = mapped_column(ForeignKey("auth_sessions.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None]


class OneTimeToken(IdMixin, Base):
    """Emailed single-use tokens: email verification and password reset."""

    __tablename__ = "one_time_tokens"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None]


class Membership(Base):
    """A user's membership of an organization, with their organization-scope role."""

    __tablename__ = "memberships"

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True)
    org_role: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class CustomRole(IdMixin, TimestampMixin, Base):
    __tablename__ = "custom_roles"
    __table_args__ = (UniqueConstraint("org_id", "name"),)

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String(300), default="")
    privileges: Mapped[list[Any]]


class RoleBinding(IdMixin, Base):
    """A project-scope role for a user or an API key, optionally limited to some clusters."""

    __tablename__ = "role_bindings"
    __table_args__ = (
        UniqueConstraint("principal_type", "principal_id", "project_id"),
        Index("ix_role_bindings_principal", "principal_type", "principal_id"),
    )

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    principal_type: Mapped[str] = mapped_column(String(16))  # "user" | "api_key"
    principal_id: Mapped[str] = mapped_column(String(40))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(64))  # a built-in role name or a custom role id
    cluster_ids: Mapped[list[Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ApiKey(IdMixin, Base):
    __tablename__ = "api_keys"

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    org_role: Mapped[str | None] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(64))
    previous_secret_hash: Mapped[str | None] = mapped_column(String(64))
    previous_valid_until: Mapped[dt.datetime | None]
    created_by: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]
    rotated_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]

"""encryption keys: per-project key-encryption keys and their versions; clusters and backups name theirs

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 19:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "encryption_keys",
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=40), nullable=False),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.String(length=300), nullable=True),
        sa.Column("current_version", sa.Integer(), nullable=False),
        sa.Column("last_checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_encryption_keys_org_id", "encryption_keys", ["org_id"], unique=False)
    op.create_index("ix_encryption_keys_project", "encryption_keys", ["project_id", "status"], unique=False)
    op.create_table(
        "encryption_key_versions",
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("key_arn", sa.String(length=2048), nullable=True),
        sa.Column("role_arn", sa.String(length=2048), nullable=True),
        sa.Column("material_wrapped", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["key_id"], ["encryption_keys.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("key_id", "version"),
    )
    with op.batch_alter_table("organizations") as b:
        b.add_column(sa.Column("kms_external_id", sa.String(length=64), nullable=True))
    with op.batch_alter_table("clusters") as b:
        b.add_column(sa.Column("key_version", sa.Integer(), nullable=True))
        b.add_column(sa.Column("data_key_next_wrapped", sa.LargeBinary(), nullable=True))
        b.create_index("ix_clusters_encryption_key_id", ["encryption_key_id"], unique=False)
    with op.batch_alter_table("backups") as b:
        b.add_column(sa.Column("encryption_key_id", sa.String(length=40), nullable=True))
        b.create_index("ix_backups_encryption_key_id", ["encryption_key_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("backups") as b:
        b.drop_index("ix_backups_encryption_key_id")
        b.drop_column("encryption_key_id")
    with op.batch_alter_table("clusters") as b:
        b.drop_index("ix_clusters_encryption_key_id")
        b.drop_column("data_key_next_wrapped")
        b.drop_column("key_version")
    with op.batch_alter_table("organizations") as b:
        b.drop_column("kms_external_id")
    op.drop_table("encryption_key_versions")
    op.drop_index("ix_encryption_keys_project", table_name="encryption_keys")
    op.drop_index("ix_encryption_keys_org_id", table_name="encryption_keys")
    op.drop_table("encryption_keys")

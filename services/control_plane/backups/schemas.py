from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field, model_validator

from services.core.schemas import RequestModel, ResponseModel


class BackupOut(ResponseModel):
    id: str
    cluster_id: str
    project_id: str
    kind: Literal["manual", "policy"]
    status: Literal["CREATING", "AVAILABLE", "FAILED", "DELETED"]
    status_reason: str | None
    size_bytes: int
    vector_count: int
    collections: list[str]
    encryption_key_id: str | None
    key_version: str
    created_at: dt.datetime
    completed_at: dt.datetime | None
    expires_at: dt.datetime | None


class BackupAccepted(BackupOut):
    job_id: str


class RestoreIn(RequestModel):
    target: Literal["new", "in_place"]
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    project_id: str | None = Field(None, max_length=40)
    encryption_key_id: str | None = Field(
        None,
        max_length=40,
        description="target 'new': the key of the new cluster (default: the backup's own key when it is in the "
        "target project and usable, else the project's managed key)",
    )

    @model_validator(mode="after")
    def _new_needs_name(self) -> RestoreIn:
        if self.target == "new" and not self.name:
            raise ValueError("name is required when target is 'new'")
        if self.target == "in_place" and (self.name or self.project_id or self.encryption_key_id):
            raise ValueError("name, project_id and encryption_key_id apply only to target 'new'")
        return self


class RestoreAccepted(ResponseModel):
    cluster_id: str
    job_id: str
    status: str


class BackupPolicyIn(RequestModel):
    enabled: bool
    every_hours: int = Field(24, ge=1, le=24 * 30)
    retention_days: int = Field(7, ge=1, le=365)


class BackupPolicyOut(ResponseModel):
    cluster_id: str
    enabled: bool
    every_hours: int
    retention_days: int
    last_run_at: dt.datetime | None
    next_run_at: dt.datetime | None

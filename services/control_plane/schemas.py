from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import EmailStr, Field

from services.auth.schemas import UserOut
from services.core.schemas import RequestModel, ResponseModel

Name = Field(min_length=1, max_length=200)
RoleName = Field(min_length=1, max_length=64, description="A built-in role name or a custom role id")


class OrgOut(ResponseModel):
    id: str
    name: str
    billing_email: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


class OrgPatch(RequestModel):
    name: str | None = Field(None, min_length=1, max_length=200)
    billing_email: EmailStr | None = None


class SignupIn(RequestModel):
    email: EmailStr
    password: str = Field(min_length=1, max_length=1024)
    name: str = Name
    org_name: str | None = Field(
        None, min_length=1, max_length=200, description="Omit when signing up to accept an invitation"
    )


class SignupOut(ResponseModel):
    user: UserOut
    org: OrgOut | None
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class ProjectRoleIn(RequestModel):
    project_id: str = Field(min_length=1, max_length=40)
    role: str = RoleName
    cluster_ids: list[str] | None = Field(None, max_length=100, description="Limit the role to these clusters")


class ProjectRoleOut(ResponseModel):
    project_id: str
    role: str
    cluster_ids: list[str] | None = None


class MemberOut(ResponseModel):
    user_id: str
    email: str
    name: str
    org_role: str
    project_roles: list[ProjectRoleOut]
    joined_at: dt.datetime


class MemberPatch(RequestModel):
    org_role: str | None = Field(None, min_length=1, max_length=64)
    project_roles: list[ProjectRoleIn] | None = Field(
        None, max_length=100, description="Replaces the member's project roles when given"
    )


class InvitationIn(RequestModel):
    email: EmailStr
    org_role: str = Field("org_member", min_length=1, max_length=64)
    project_roles: list[ProjectRoleIn] = Field(default_factory=list, max_length=100)


class InvitationOut(ResponseModel):
    id: str
    org_id: str
    email: str
    org_role: str
    project_roles: list[ProjectRoleOut]
    expires_at: dt.datetime
    created_at: dt.datetime
    accepted_at: dt.datetime | None = None


class InvitationCreated(InvitationOut):
    token: str = Field(description="Shown once; also emailed to the invitee")


class AcceptOut(ResponseModel):
    org_id: str
    org_role: str


class ProjectIn(RequestModel):
    name: str = Name


class ProjectPatch(RequestModel):
    name: str | None = Field(None, min_length=1, max_length=200)


class ProjectOut(ResponseModel):
    id: str
    org_id: str
    name: str
    created_at: dt.datetime
    updated_at: dt.datetime


class RoleIn(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = Field("", max_length=300)
    privileges: list[str] = Field(min_length=1, max_length=100)


class RolePatch(RequestModel):
    description: str | None = Field(None, max_length=300)
    privileges: list[str] | None = Field(None, min_length=1, max_length=100)


class RoleOut(ResponseModel):
    id: str = Field(description="The name of a built-in role, or the id of a custom role")
    name: str
    description: str
    builtin: bool
    scope: Literal["org", "project"]
    privileges: list[str]


class ApiKeyIn(RequestModel):
    name: str = Name
    org_role: str | None = Field(None, min_length=1, max_length=64)
    project_roles: list[ProjectRoleIn] = Field(default_factory=list, max_length=100)
    expires_at: dt.datetime | None = None


class ApiKeyPatch(RequestModel):
    name: str | None = Field(None, min_length=1, max_length=200)
    expires_at: dt.datetime | None = None


class ApiKeyOut(ResponseModel):
    id: str
    org_id: str
    name: str
    prefix: str
    org_role: str | None
    project_roles: list[ProjectRoleOut]
    created_at: dt.datetime
    created_by: str
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None
    rotated_at: dt.datetime | None
    previous_valid_until: dt.datetime | None = Field(
        None, description="Until when the pre-rotation secret keeps working"
    )


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The secret: shown only in this response")


class RotateIn(RequestModel):
    grace_seconds: int = Field(0, ge=0, le=7 * 24 * 3600, description="How long the old secret keeps working")


class AuditOut(ResponseModel):
    id: str
    org_id: str | None
    actor_type: str
    actor_id: str | None
    action: str
    target_type: str | None
    target_id: str | None
    result: str
    ip: str | None
    request_id: str | None
    details: dict[str, object]
    created_at: dt.datetime

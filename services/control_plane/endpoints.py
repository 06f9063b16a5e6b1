"""Control-plane routes (thin): sign-up, organizations, members, invitations, projects, roles, API keys, audit."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query, status

from services.auth.deps import AuthCache, DbSession, Pagination, Subject, UserSubject
from services.auth.endpoints import user_out
from services.auth.models import ApiKey, Membership, RoleBinding, User
from services.control_plane import api_keys, service
from services.control_plane.models import Invitation
from services.control_plane.schemas import (
    AcceptOut,
    ApiKeyCreated,
    ApiKeyIn,
    ApiKeyOut,
    ApiKeyPatch,
    AuditOut,
    InvitationCreated,
    InvitationIn,
    InvitationOut,
    MemberOut,
    MemberPatch,
    OrgOut,
    OrgPatch,
    ProjectIn,
    ProjectOut,
    ProjectPatch,
    ProjectRoleOut,
    RoleIn,
    RoleOut,
    RolePatch,
    RotateIn,
    SignupIn,
    SignupOut,
)
from services.core.pagination import Page
from services.core.responses import errors
from services.core.schemas import ListOf

router = APIRouter(prefix="/v1")
OrgId = Annotated[str, "org id"]


def _bindings_out(bindings: list[RoleBinding]) -> list[ProjectRoleOut]:
    return [ProjectRoleOut(project_id=b.project_id, role=b.role, cluster_ids=b.cluster_ids) for b in bindings]


def _key_out(key: ApiKey, bindings: list[RoleBinding]) -> ApiKeyOut:
    return ApiKeyOut(
        id=key.id,
        org_id=key.org_id,
        name=key.name,
        prefix="vk_" + key.id.removeprefix("key_"),
        org_role=key.org_role,
        project_roles=_bindings_out(bindings),
        created_at=key.created_at,
        created_by=key.created_by,
        expires_at=key.expires_at,
        last_used_at=key.last_used_at,
        revoked_at=key.revoked_at,
        rotated_at=key.rotated_at,
        previous_valid_until=key.previous_valid_until,
    )


def _invitation_out(inv: Invitation) -> InvitationOut:
    return InvitationOut(
        id=inv.id,
        org_id=inv.org_id,
        email=inv.email,
        org_role=inv.org_role,
        project_roles=[ProjectRoleOut(**p) for p in inv.project_roles],
        expires_at=inv.expires_at,
        created_at=inv.created_at,
        accepted_at=inv.accepted_at,
    )


def _member_out(m: Membership, u: User, bindings: list[RoleBinding]) -> MemberOut:
    return MemberOut(
        user_id=u.id,
        email=u.email,
        name=u.name,
        org_role=m.org_role,
        project_roles=_bindings_out(bindings),
        joined_at=m.created_at,
    )


# -- sign-up -------------------------------------------------------------------------------------------------
@router.post(
    "/auth/signup",
    response_model=SignupOut,
    status_code=status.HTTP_201_CREATED,
    tags=["identity"],
    responses=errors(409, 422),
)
async def signup(body: SignupIn, session: DbSession) -> SignupOut:
    user, org, pair = await service.signup(session, body)
    return SignupOut(
        user=user_out(user),
        org=OrgOut.model_validate(org) if org else None,
        access_token=pair.access_token,
        refresh_token=pair.refresh_token,
        expires_in=pair.expires_in,
    )


# -- organizations -------------------------------------------------------------------------------------------
orgs = APIRouter(tags=["organizations"])


@orgs.get("/orgs/{org_id}", response_model=OrgOut, responses=errors(401, 403, 404))
async def get_org(org_id: str, subject: Subject, session: DbSession) -> OrgOut:
    return OrgOut.model_validate(await service.get_org(session, subject, org_id))


@orgs.patch("/orgs/{org_id}", response_model=OrgOut, responses=errors(401, 403, 404))
async def update_org(org_id: str, body: OrgPatch, subject: Subject, session: DbSession) -> OrgOut:
    return OrgOut.model_validate(await service.update_org(session, subject, org_id, body))


@orgs.get("/orgs/{org_id}/members", response_model=ListOf[MemberOut], responses=errors(401, 403, 404))
async def list_members(org_id: str, subject: Subject, session: DbSession, page: Pagination) -> ListOf[MemberOut]:
    rows, bindings = await service.list_members(session, subject, org_id, page.after, page.limit)
    items, token = page.cut(rows, key=lambda r: r[0].user_id)
    return ListOf[MemberOut](items=[_member_out(m, u, bindings.get(u.id, [])) for m, u in items], next_page_token=token)


@orgs.patch("/orgs/{org_id}/members/{user_id}", response_model=MemberOut, responses=errors(401, 403, 404, 409, 422))
async def update_member(
    org_id: str, user_id: str, body: MemberPatch, subject: Subject, session: DbSession, auth: AuthCache
) -> MemberOut:
    m = await service.update_member(session, subject, org_id, user_id, body)
    auth.invalidate()
    user = await session.get(User, user_id)
    assert user is not None
    bindings = await service.repo.bindings_in_org(session, org_id, "user", [user_id])
    return _member_out(m, user, bindings[user_id])


@orgs.delete(
    "/orgs/{org_id}/members/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(401, 403, 404, 409),
)
async def remove_member(org_id: str, user_id: str, subject: Subject, session: DbSession, auth: AuthCache) -> None:
    await service.remove_member(session, subject, org_id, user_id)
    auth.invalidate()


# -- invitations ---------------------------------------------------------------------------------------------
@orgs.post(
    "/orgs/{org_id}/invitations",
    response_model=InvitationCreated,
    status_code=status.HTTP_201_CREATED,
    responses=errors(401, 403, 404, 422),
)
async def create_invitation(org_id: str, body: InvitationIn, subject: Subject, session: DbSession) -> InvitationCreated:
    inv, token = await service.create_invitation(session, subject, org_id, body)
    return InvitationCreated(**_invitation_out(inv).model_dump(), token=token)


@orgs.get("/orgs/{org_id}/invitations", response_model=ListOf[InvitationOut], responses=errors(401, 403, 404))
async def list_invitations(
    org_id: str, subject: Subject, session: DbSession, page: Pagination
) -> ListOf[InvitationOut]:
    rows = await service.list_invitations(session, subject, org_id, page.after, page.limit)
    items, token = page.cut(rows)
    return ListOf[InvitationOut](items=[_invitation_out(i) for i in items], next_page_token=token)


@orgs.delete(
    "/invitations/{invitation_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(401, 403, 404, 409),
)
async def revoke_invitation(invitation_id: str, subject: Subject, session: DbSession) -> None:
    await service.revoke_invitation(session, subject, invitation_id)


@orgs.post("/invitations/{token}/accept", response_model=AcceptOut, responses=errors(401, 403, 404, 409))
async def accept_invitation(token: str, subject: UserSubject, session: DbSession, auth: AuthCache) -> AcceptOut:
    inv = await service.accept_invitation(session, subject, token)
    auth.invalidate()
    return AcceptOut(org_id=inv.org_id, org_role=inv.org_role)


# -- projects ------------------------------------------------------------------------------------------------
projects = APIRouter(tags=["projects"])


@projects.get("/orgs/{org_id}/projects", response_model=ListOf[ProjectOut], responses=errors(401, 404))
async def list_projects(org_id: str, subject: Subject, session: DbSession, page: Pagination) -> ListOf[ProjectOut]:
    rows = [p for p in await service.list_projects(session, subject, org_id) if not page.after or p.id > page.after]
    items, token = page.cut(rows[: page.limit + 1])
    return ListOf[ProjectOut](items=[ProjectOut.model_validate(p) for p in items], next_page_token=token)


@projects.post(
    "/orgs/{org_id}/projects",
    response_model=ProjectOut,
    status_code=status.HTTP_201_CREATED,
    responses=errors(401, 403, 404, 409),
)
async def create_project(org_id: str, body: ProjectIn, subject: Subject, session: DbSession) -> ProjectOut:
    return ProjectOut.model_validate(await service.create_project(session, subject, org_id, body.name))


@projects.get("/projects/{project_id}", response_model=ProjectOut, responses=errors(401, 403, 404))
async def get_project(project_id: str, subject: Subject, session: DbSession) -> ProjectOut:
    return ProjectOut.model_validate(await service.get_project(session, subject, project_id, "project:read"))


@projects.patch("/projects/{project_id}", response_model=ProjectOut, responses=errors(401, 403, 404, 409))
async def update_project(project_id: str, body: ProjectPatch, subject: Subject, session: DbSession) -> ProjectOut:
    return ProjectOut.model_validate(await service.update_project(session, subject, project_id, body.name))


@projects.delete("/projects/{project_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(401, 403, 404, 409))
async def delete_project(project_id: str, subject: Subject, session: DbSession, auth: AuthCache) -> None:
    await service.delete_project(session, subject, project_id)
    auth.invalidate()


# -- roles ---------------------------------------------------------------------------------------------------
roles = APIRouter(tags=["roles"])


@roles.get("/orgs/{org_id}/roles", response_model=ListOf[RoleOut], responses=errors(401, 403, 404))
async def list_roles(org_id: str, subject: Subject, session: DbSession) -> ListOf[RoleOut]:
    return ListOf[RoleOut](items=[RoleOut(**r) for r in await service.list_roles(session, subject, org_id)])


@roles.post(
    "/orgs/{org_id}/roles",
    response_model=RoleOut,
    status_code=status.HTTP_201_CREATED,
    responses=errors(401, 403, 404, 409),
)
async def create_role(org_id: str, body: RoleIn, subject: Subject, session: DbSession) -> RoleOut:
    r = await service.create_role(session, subject, org_id, body)
    return RoleOut(**service.role_out(r.id, r.name, r.description, frozenset(r.privileges), False))


@roles.get("/orgs/{org_id}/roles/{role_id}", response_model=RoleOut, responses=errors(401, 403, 404))
async def get_role(org_id: str, role_id: str, subject: Subject, session: DbSession) -> RoleOut:
    r = await service.get_custom_role(session, subject, org_id, role_id)
    return RoleOut(**service.role_out(r.id, r.name, r.description, frozenset(r.privileges), False))


@roles.patch("/orgs/{org_id}/roles/{role_id}", response_model=RoleOut, responses=errors(401, 403, 404))
async def update_role(
    org_id: str, role_id: str, body: RolePatch, subject: Subject, session: DbSession, auth: AuthCache
) -> RoleOut:
    r = await service.update_role(session, subject, org_id, role_id, body)
    auth.invalidate()
    return RoleOut(**service.role_out(r.id, r.name, r.description, frozenset(r.privileges), False))


@roles.delete(
    "/orgs/{org_id}/roles/{role_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(401, 403, 404, 409),
)
async def delete_role(org_id: str, role_id: str, subject: Subject, session: DbSession) -> None:
    await service.delete_role(session, subject, org_id, role_id)


# -- API keys ------------------------------------------------------------------------------------------------
keys = APIRouter(tags=["api-keys"])


@keys.post(
    "/orgs/{org_id}/api-keys",
    response_model=ApiKeyCreated,
    status_code=status.HTTP_201_CREATED,
    responses=errors(401, 403, 404, 422),
)
async def create_api_key(org_id: str, body: ApiKeyIn, subject: Subject, session: DbSession) -> ApiKeyCreated:
    key, secret, bindings = await api_keys.create_api_key(session, subject, org_id, body)
    return ApiKeyCreated(**_key_out(key, bindings).model_dump(), key=secret)


@keys.get("/orgs/{org_id}/api-keys", response_model=ListOf[ApiKeyOut], responses=errors(401, 403, 404))
async def list_api_keys(org_id: str, subject: Subject, session: DbSession, page: Pagination) -> ListOf[ApiKeyOut]:
    rows = await api_keys.list_api_keys(session, subject, org_id, page.after, page.limit)
    items, token = page.cut(rows)
    bindings = await api_keys.key_bindings(session, items)
    return ListOf[ApiKeyOut](items=[_key_out(k, bindings.get(k.id, [])) for k in items], next_page_token=token)


@keys.get("/api-keys/{key_id}", response_model=ApiKeyOut, responses=errors(401, 403, 404))
async def get_api_key(key_id: str, subject: Subject, session: DbSession) -> ApiKeyOut:
    key = await api_keys.get_api_key(session, subject, key_id, manage=False)
    return _key_out(key, (await api_keys.key_bindings(session, [key])).get(key.id, []))


@keys.patch("/api-keys/{key_id}", response_model=ApiKeyOut, responses=errors(401, 403, 404, 422))
async def update_api_key(key_id: str, body: ApiKeyPatch, subject: Subject, session: DbSession) -> ApiKeyOut:
    key = await api_keys.update_api_key(session, subject, key_id, body)
    return _key_out(key, (await api_keys.key_bindings(session, [key])).get(key.id, []))


@keys.delete("/api-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(401, 403, 404))
async def revoke_api_key(key_id: str, subject: Subject, session: DbSession, auth: AuthCache) -> None:
    await api_keys.revoke_api_key(session, subject, key_id)
    auth.invalidate()


@keys.post("/api-keys/{key_id}/rotate", response_model=ApiKeyCreated, responses=errors(401, 403, 404, 409))
async def rotate_api_key(
    key_id: str, subject: Subject, session: DbSession, auth: AuthCache, body: RotateIn | None = None
) -> ApiKeyCreated:
    key, secret = await api_keys.rotate_api_key(session, subject, key_id, (body or RotateIn()).grace_seconds)
    auth.invalidate()
    bindings = (await api_keys.key_bindings(session, [key])).get(key.id, [])
    return ApiKeyCreated(**_key_out(key, bindings).model_dump(), key=secret)


# -- audit ---------------------------------------------------------------------------------------------------
audit_router = APIRouter(tags=["audit"])


@audit_router.get("/orgs/{org_id}/audit-logs", response_model=ListOf[AuditOut], responses=errors(401, 403, 404))
async def list_audit_logs(
    org_id: str,
    subject: Subject,
    session: DbSession,
    page: Pagination,
    actor: Annotated[str | None, Query(max_length=64, description="Actor id (usr_… or key_…)")] = None,
    action: Annotated[str | None, Query(max_length=64, description="An action, or 'domain.*'")] = None,
    since: Annotated[dt.datetime | None, Query(description="RFC 3339 time")] = None,
) -> ListOf[AuditOut]:
    rows = await service.list_audit(
        session, subject, org_id, actor=actor, action=action, since=since, before=page.after, limit=page.limit
    )
    items, token = page.cut(rows)
    return ListOf[AuditOut](items=[AuditOut.model_validate(r) for r in items], next_page_token=token)


for sub in (orgs, projects, roles, keys, audit_router):
    router.include_router(sub)

__all__ = ["Page", "router"]

"""Organization rules: sign-up, members, invitations, projects, roles and the audit trail (API keys:
``api_keys.py``).

Every function takes the acting ``AuthSubject`` and asks it (``require_*``) before touching anything, so an
object of another tenant is always a 404 and a missing privilege a 403. Services flush, never commit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth import service as identity
from services.auth.crypto import random_token, token_hash
from services.auth.models import CustomRole, Membership, RoleBinding, User
from services.auth.roles import ALL_PRIVILEGES, BUILTIN_ROLES, ORG_ROLES, PROJECT_PRIVILEGES, PROJECT_ROLES
from services.auth.schemas import TokenPair
from services.auth.subject import AuthSubject
from services.control_plane import repository as repo
from services.control_plane.models import Invitation, Organization, Project
from services.control_plane.schemas import (
    InvitationIn,
    MemberPatch,
    OrgPatch,
    ProjectRoleIn,
    RoleIn,
    RolePatch,
    SignupIn,
)
from services.core import audit
from services.core.db import utcnow
from services.core.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from services.core.ids import new_id
from services.core.mail import queue_email
from services.core.settings import get_settings

DEFAULT_PROJECT = "Default"


def audit_action(session: AsyncSession, subject: AuthSubject, action: str, org_id: str | None, **kw: Any) -> None:
    audit.record(session, action=action, org_id=org_id, actor_type=subject.kind, actor_id=subject.id, **kw)


# -- sign-up -------------------------------------------------------------------------------------------------
async def signup(session: AsyncSession, body: SignupIn) -> tuple[User, Organization | None, TokenPair]:
    user = await identity.create_user(session, body.email, body.password, body.name)
    org = None
    if body.org_name:
        org = Organization(id=new_id("org"), name=body.org_name)
        session.add(org)
        await session.flush()
        session.add(Membership(org_id=org.id, user_id=user.id, org_role="org_owner"))
        session.add(Project(id=new_id("prj"), org_id=org.id, name=DEFAULT_PROJECT))
    audit.record(
        session,
        action="auth.signup",
        org_id=org.id if org else None,
        actor_type="user",
        actor_id=user.id,
        target_type="user",
        target_id=user.id,
    )
    pair = await identity.start_session(session, user)
    return user, org, pair


# -- roles ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedRole:
    stored: str  # what goes in the row: a built-in name or a custom role id
    privileges: frozenset[str]


async def resolve_role(session: AsyncSession, org_id: str, role: str, scope: str) -> ResolvedRole:
    builtins = ORG_ROLES if scope == "org" else PROJECT_ROLES
    if role in builtins:
        return ResolvedRole(role, builtins[role])
    if role in BUILTIN_ROLES:
        raise Unprocessable(
            f"role {role!r} is a {'project' if scope == 'org' else 'organization'} role and cannot be used "
            f"at {scope} scope",
            code="role_scope_mismatch",
        )
    custom = await session.get(CustomRole, role) if role.startswith("role_") else None
    if custom is None or custom.org_id != org_id:
        custom = await repo.custom_role_by_name(session, org_id, role)
    if custom is None:
        raise Unprocessable(f"unknown role {role!r}", code="unknown_role")
    privileges = frozenset(custom.privileges)
    if scope == "project":
        privileges &= PROJECT_PRIVILEGES
    return ResolvedRole(custom.id, privileges)


async def resolve_org_role(session: AsyncSession, subject: AuthSubject, org_id: str, role: str) -> ResolvedRole:
    resolved = await resolve_role(session, org_id, role, "org")
    if not subject.can_grant_org_role(org_id, resolved.privileges):
        raise Forbidden(f"you cannot grant role {role!r}: it holds privileges you do not have", code="forbidden")
    return resolved


async def resolve_project_roles(
    session: AsyncSession, subject: AuthSubject, org_id: str, items: Sequence[ProjectRoleIn]
) -> list[tuple[ProjectRoleIn, ResolvedRole]]:
    seen: set[str] = set()
    projects = await repo.projects_by_ids(session, org_id, [i.project_id for i in items])
    out = []
    for n, item in enumerate(items):
        if item.project_id in seen:
            raise BadRequest(f"project_roles[{n}]: project {item.project_id} listed twice", code="duplicate_project")
        seen.add(item.project_id)
        if item.project_id not in projects or not subject.can_see_project(org_id, item.project_id):
            raise Unprocessable(
                f"project_roles[{n}].project_id: project {item.project_id} not found",
                code="project_not_found",
            )
        resolved = await resolve_role(session, org_id, item.role, "project")
        clusters = frozenset(item.cluster_ids) if item.cluster_ids is not None else None
        if clusters is not None and not clusters:
            raise BadRequest(f"project_roles[{n}].cluster_ids: must not be empty", code="validation_error")
        if not subject.can_grant_project_role(org_id, item.project_id, resolved.privileges, clusters):
            raise Forbidden(
                f"project_roles[{n}]: you cannot grant role {item.role!r} on project {item.project_id}",
                code="forbidden",
            )
        out.append((item, resolved))
    return out


def bind_roles(
    session: AsyncSession,
    org_id: str,
    principal_type: str,
    principal_id: str,
    roles: list[tuple[Any, ResolvedRole]],
) -> None:
    for item, resolved in roles:
        session.add(
            RoleBinding(
                id=new_id("rb"),
                org_id=org_id,
                principal_type=principal_type,
                principal_id=principal_id,
                project_id=item.project_id,
                role=resolved.stored,
                cluster_ids=sorted(set(item.cluster_ids)) if item.cluster_ids is not None else None,
            )
        )


def role_out(role_id: str, name: str, description: str, privileges: frozenset[str], builtin: bool) -> dict:
    scope = "project" if privileges <= PROJECT_PRIVILEGES else "org"
    return {
        "id": role_id,
        "name": name,
        "description": description,
        "builtin": builtin,
        "scope": scope,
        "privileges": sorted(privileges),
    }


async def list_roles(session: AsyncSession, subject: AuthSubject, org_id: str) -> list[dict]:
    subject.require_org(org_id, "org:read")
    from services.auth.roles import ROLE_DESCRIPTIONS

    out = [role_out(n, n, ROLE_DESCRIPTIONS[n], p, True) for n, p in BUILTIN_ROLES.items()]
    for r in await repo.custom_roles(session, org_id):
        out.append(role_out(r.id, r.name, r.description, frozenset(r.privileges), False))
    return out


def _check_privileges(privileges: list[str]) -> list[str]:
    unknown = sorted(set(privileges) - ALL_PRIVILEGES)
    if unknown:
        raise BadRequest(f"privileges: unknown privilege {unknown[0]!r}", code="unknown_privilege")
    return sorted(set(privileges))


async def get_custom_role(session: AsyncSession, subject: AuthSubject, org_id: str, role_id: str) -> CustomRole:
    subject.require_org(org_id, "org:read")
    role = await session.get(CustomRole, role_id)
    if role is None or role.org_id != org_id:
        raise NotFound(f"role {role_id} not found", code="role_not_found")
    return role


async def create_role(session: AsyncSession, subject: AuthSubject, org_id: str, body: RoleIn) -> CustomRole:
    subject.require_org(org_id, "role:manage")
    if body.name in BUILTIN_ROLES or await repo.custom_role_by_name(session, org_id, body.name):
        raise Conflict(f"a role named {body.name!r} already exists", code="role_exists")
    role = CustomRole(
        id=new_id("role"),
        org_id=org_id,
        name=body.name,
        description=body.description,
        privileges=_check_privileges(body.privileges),
    )
    session.add(role)
    await session.flush()
    audit_action(
        session,
        subject,
        "role.create",
        org_id,
        target_type="role",
        target_id=role.id,
        details={"privileges": role.privileges},
    )
    return role


async def update_role(
    session: AsyncSession, subject: AuthSubject, org_id: str, role_id: str, body: RolePatch
) -> CustomRole:
    role = await get_custom_role(session, subject, org_id, role_id)
    subject.require_org(org_id, "role:manage")
    if body.privileges is not None:
        privileges = _check_privileges(body.privileges)
        # The role may already be granted (even to the editor): adding privileges is granting them.
        if not subject.can_grant_org_role(org_id, frozenset(privileges) - frozenset(role.privileges)):
            raise Forbidden("you cannot add privileges to a role that you do not have yourself", code="forbidden")
        role.privileges = privileges
    if body.description is not None:
        role.description = body.description
    audit_action(
        session,
        subject,
        "role.update",
        org_id,
        target_type="role",
        target_id=role.id,
        details={"privileges": role.privileges},
    )
    return role


async def delete_role(session: AsyncSession, subject: AuthSubject, org_id: str, role_id: str) -> None:
    role = await get_custom_role(session, subject, org_id, role_id)
    subject.require_org(org_id, "role:manage")
    if await repo.role_in_use(session, role.id):
        raise Conflict(f"role {role.id} is still granted to members or API keys", code="role_in_use")
    await session.delete(role)
    audit_action(session, subject, "role.delete", org_id, target_type="role", target_id=role.id)


# -- organizations -------------------------------------------------------------------------------------------
async def get_org(session: AsyncSession, subject: AuthSubject, org_id: str) -> Organization:
    subject.require_org(org_id, "org:read")
    org = await session.get(Organization, org_id)
    if org is None:
        raise NotFound(f"organization {org_id} not found", code="org_not_found")
    return org


async def update_org(session: AsyncSession, subject: AuthSubject, org_id: str, body: OrgPatch) -> Organization:
    org = await get_org(session, subject, org_id)
    subject.require_org(org_id, "org:update")
    changed = body.model_dump(exclude_unset=True)
    if "name" in changed and body.name is None:
        raise BadRequest("name: must not be null", code="validation_error")
    for field, value in changed.items():
        setattr(org, field, value)
    audit_action(
        session,
        subject,
        "org.update",
        org_id,
        target_type="org",
        target_id=org_id,
        details={"fields": sorted(changed)},
    )
    return org


# -- members -------------------------------------------------------------------------------------------------
async def list_members(
    session: AsyncSession, subject: AuthSubject, org_id: str, after: str | None, limit: int
) -> tuple[list[tuple[Membership, User]], dict[str, list[RoleBinding]]]:
    subject.require_org(org_id, "member:read")
    rows = list(await repo.members(session, org_id, after, limit))
    bindings = await repo.bindings_in_org(session, org_id, "user", [m.user_id for m, _ in rows[:limit]])
    return rows, bindings


async def _member(session: AsyncSession, org_id: str, user_id: str) -> Membership:
    m = await repo.membership(session, org_id, user_id)
    if m is None:
        raise NotFound(f"member {user_id} not found", code="member_not_found")
    return m


async def update_member(
    session: AsyncSession, subject: AuthSubject, org_id: str, user_id: str, body: MemberPatch
) -> Membership:
    subject.require_org(org_id, "member:manage")
    m = await _member(session, org_id, user_id)
    if body.org_role is not None and body.org_role != m.org_role:
        resolved = await resolve_org_role(session, subject, org_id, body.org_role)
        # Changing someone's role away from owner needs the owner privileges too (no-one demotes above them).
        if m.org_role == "org_owner":
            if not subject.can_grant_org_role(org_id, ORG_ROLES["org_owner"]):
                raise Forbidden("only an owner can change an owner's role", code="forbidden")
            if resolved.stored != "org_owner" and await repo.count_owners(session, org_id) <= 1:
                raise Conflict("the last owner of an organization cannot be demoted", code="last_owner")
        m.org_role = resolved.stored
    if body.project_roles is not None:
        roles = await resolve_project_roles(session, subject, org_id, body.project_roles)
        await repo.delete_bindings(session, org_id, "user", user_id)
        await session.flush()
        bind_roles(session, org_id, "user", user_id, roles)
    await session.flush()
    audit_action(
        session,
        subject,
        "member.update",
        org_id,
        target_type="user",
        target_id=user_id,
        details={"org_role": m.org_role, "project_roles_changed": body.project_roles is not None},
    )
    return m


async def remove_member(session: AsyncSession, subject: AuthSubject, org_id: str, user_id: str) -> None:
    if subject.user_id != user_id:  # anyone may leave; removing others needs member:manage
        subject.require_org(org_id, "member:manage")
    elif not subject.in_org(org_id):
        raise NotFound(f"organization {org_id} not found", code="org_not_found")
    m = await _member(session, org_id, user_id)
    if m.org_role == "org_owner":
        if subject.user_id != user_id and not subject.can_grant_org_role(org_id, ORG_ROLES["org_owner"]):
            raise Forbidden("only an owner can remove an owner", code="forbidden")
        if await repo.count_owners(session, org_id) <= 1:
            raise Conflict("the last owner of an organization cannot be removed", code="last_owner")
    await repo.delete_bindings(session, org_id, "user", user_id)
    await session.delete(m)
    audit_action(session, subject, "member.remove", org_id, target_type="user", target_id=user_id)


# -- invitations ---------------------------------------------------------------------------------------------
async def create_invitation(
    session: AsyncSession, subject: AuthSubject, org_id: str, body: InvitationIn
) -> tuple[Invitation, str]:
    subject.require_org(org_id, "member:manage")
    org = await get_org(session, subject, org_id)
    resolved = await resolve_org_role(session, subject, org_id, body.org_role)
    roles = await resolve_project_roles(session, subject, org_id, body.project_roles)
    settings = get_settings()
    token = "vi_" + random_token(32)
    now = utcnow()
    inv = Invitation(
        id=new_id("inv"),
        org_id=org_id,
        email=identity.normalize_email(body.email),
        org_role=resolved.stored,
        project_roles=[{"project_id": i.project_id, "role": r.stored, "cluster_ids": i.cluster_ids} for i, r in roles],
        token_hash=token_hash(token),
        invited_by=subject.id,
        created_at=now,
        expires_at=now + dt.timedelta(seconds=settings.invitation_ttl_seconds),
    )
    session.add(inv)
    queue_email(
        session,
        inv.email,
        f"You are invited to {org.name} on Vecta",
        f"You have been invited to join the organization {org.name} on Vecta.\n\n"
        f"Accept: {settings.public_url}/console/invitations/{token}\n\n"
        f"Or, logged in, POST /v1/invitations/{token}/accept\n\n"
        f"The invitation expires at {inv.expires_at.isoformat()}.\n",
    )
    await session.flush()
    audit_action(
        session,
        subject,
        "invitation.create",
        org_id,
        target_type="invitation",
        target_id=inv.id,
        details={"email": inv.email, "org_role": inv.org_role},
    )
    return inv, token


async def list_invitations(
    session: AsyncSession, subject: AuthSubject, org_id: str, after: str | None, limit: int
) -> Sequence[Invitation]:
    subject.require_org(org_id, "member:read")
    return await repo.pending_invitations(session, org_id, utcnow(), after, limit)


async def revoke_invitation(session: AsyncSession, subject: AuthSubject, invitation_id: str) -> None:
    inv = await session.get(Invitation, invitation_id)
    if inv is None or not subject.in_org(inv.org_id):
        raise NotFound(f"invitation {invitation_id} not found", code="invitation_not_found")
    subject.require_org(inv.org_id, "member:manage")
    if inv.accepted_at is not None:
        raise Conflict("the invitation has already been accepted", code="invitation_accepted")
    await session.delete(inv)
    audit_action(session, subject, "invitation.revoke", inv.org_id, target_type="invitation", target_id=inv.id)


async def accept_invitation(session: AsyncSession, subject: AuthSubject, token: str) -> Invitation:
    inv = await repo.invitation_by_hash(session, token_hash(token))
    now = utcnow()
    if inv is None or inv.expires_at <= now:
        raise NotFound("invitation not found or expired", code="invitation_not_found")
    if inv.accepted_at is not None:
        raise Conflict("the invitation has already been accepted", code="invitation_accepted")
    user = await session.get(User, subject.id)
    assert user is not None
    if user.email != inv.email:
        raise Forbidden("this invitation was sent to another email address", code="invitation_email_mismatch")
    if await repo.membership(session, inv.org_id, user.id) is not None:
        raise Conflict("you are already a member of this organization", code="already_member")
    # Roles may have been deleted since the invitation was sent: skip what no longer exists.
    projects = await repo.projects_by_ids(session, inv.org_id, [p["project_id"] for p in inv.project_roles])
    session.add(Membership(org_id=inv.org_id, user_id=user.id, org_role=inv.org_role))
    for pr in inv.project_roles:
        if pr["project_id"] in projects:
            session.add(
                RoleBinding(
                    id=new_id("rb"),
                    org_id=inv.org_id,
                    principal_type="user",
                    principal_id=user.id,
                    project_id=pr["project_id"],
                    role=pr["role"],
                    cluster_ids=pr.get("cluster_ids"),
                )
            )
    inv.accepted_at = now
    inv.accepted_by = user.id
    await session.flush()
    audit_action(session, subject, "invitation.accept", inv.org_id, target_type="invitation", target_id=inv.id)
    return inv


# -- projects ------------------------------------------------------------------------------------------------
async def list_projects(session: AsyncSession, subject: AuthSubject, org_id: str) -> list[Project]:
    if not subject.in_org(org_id):
        raise NotFound(f"organization {org_id} not found", code="org_not_found")
    return [p for p in await repo.projects_of_org(session, org_id) if subject.can_see_project(org_id, p.id)]


async def create_project(session: AsyncSession, subject: AuthSubject, org_id: str, name: str) -> Project:
    subject.require_org(org_id, "project:create")
    if await repo.project_by_name(session, org_id, name):
        raise Conflict(f"a project named {name!r} already exists", code="project_exists")
    project = Project(id=new_id("prj"), org_id=org_id, name=name)
    session.add(project)
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict(f"a project named {name!r} already exists", code="project_exists") from None
    audit_action(session, subject, "project.create", org_id, target_type="project", target_id=project.id)
    return project


async def get_project(session: AsyncSession, subject: AuthSubject, project_id: str, privilege: str) -> Project:
    project = await session.get(Project, project_id)
    if project is None:
        raise NotFound(f"project {project_id} not found", code="project_not_found")
    subject.require_project(project.org_id, project.id, privilege)
    return project


async def update_project(session: AsyncSession, subject: AuthSubject, project_id: str, name: str | None) -> Project:
    project = await get_project(session, subject, project_id, "project:update")
    if name is not None and name != project.name:
        if await repo.project_by_name(session, project.org_id, name):
            raise Conflict(f"a project named {name!r} already exists", code="project_exists")
        project.name = name
    audit_action(session, subject, "project.update", project.org_id, target_type="project", target_id=project.id)
    return project


# Callables that report whether a project still holds resources that block its deletion (clusters, keys);
# the domains that own those resources register here so this module needs no import of them.
PROJECT_DELETE_GUARDS: list[Any] = []


async def delete_project(session: AsyncSession, subject: AuthSubject, project_id: str) -> None:
    project = await get_project(session, subject, project_id, "project:delete")
    for guard in PROJECT_DELETE_GUARDS:
        reason = await guard(session, project.id)
        if reason:
            raise Conflict(f"project {project.id} cannot be deleted: {reason}", code="project_not_empty")
    await session.delete(project)
    audit_action(session, subject, "project.delete", project.org_id, target_type="project", target_id=project.id)


def as_utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


# -- audit ---------------------------------------------------------------------------------------------------
async def list_audit(
    session: AsyncSession,
    subject: AuthSubject,
    org_id: str,
    *,
    actor: str | None,
    action: str | None,
    since: dt.datetime | None,
    before: str | None,
    limit: int,
) -> Sequence[audit.AuditLog]:
    subject.require_org(org_id, "audit:read")
    return await repo.audit_logs(
        session,
        org_id,
        actor=actor,
        action=action,
        since=as_utc(since) if since else None,
        before=before,
        limit=limit,
    )

"""The one subject type every request acts as, and the authorization decisions made on it.

``AuthSubject`` is immutable and self-contained: it carries the principal's organization roles and project role
bindings with the privileges of every role resolved, so a decision is a set lookup. All access decisions go
through its ``require_*`` methods; a resource in an organization the subject has no part in, or a project it
cannot see, is reported as not found (404), never as forbidden, so existence never leaks across tenants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from services.auth.roles import CLUSTER_PRIVILEGES, ORG_PRIVILEGES, PROJECT_PRIVILEGES
from services.core.errors import Forbidden, NotFound


@dataclass(frozen=True)
class Binding:
    org_id: str
    project_id: str
    role: str
    privileges: frozenset[str]
    cluster_ids: frozenset[str] | None = None  # None: every cluster of the project


@dataclass(frozen=True)
class AuthSubject:
    kind: Literal["user", "api_key"]
    id: str
    org_roles: dict[str, str] = field(default_factory=dict)  # org_id -> role (built-in name or custom role id)
    org_role_privileges: dict[str, frozenset[str]] = field(default_factory=dict)  # org_id -> privileges
    bindings: tuple[Binding, ...] = ()
    session_id: str | None = None
    email: str | None = None
    name: str | None = None  # the API key's name (users: their display name)
    home_org_id: str | None = None  # the organization an API key belongs to

    @property
    def user_id(self) -> str | None:
        return self.id if self.kind == "user" else None

    @property
    def actor(self) -> tuple[str, str]:
        return (self.kind, self.id)

    # -- organization scope ------------------------------------------------------------------------------
    def in_org(self, org_id: str) -> bool:
        return org_id in self.org_roles or any(b.org_id == org_id for b in self.bindings)

    def org_privileges(self, org_id: str) -> frozenset[str]:
        return self.org_role_privileges.get(org_id, frozenset())

    def require_org(self, org_id: str, privilege: str, what: str = "organization") -> None:
        if not self.in_org(org_id):
            raise NotFound(f"{what} {org_id} not found", code="org_not_found")
        if privilege not in self.org_privileges(org_id):
            raise Forbidden(f"missing privilege {privilege!r} on organization {org_id}", code="forbidden")

    # -- project scope -----------------------------------------------------------------------------------
    def project_privileges(self, org_id: str, project_id: str) -> frozenset[str]:
        privs = set(self.org_privileges(org_id) & PROJECT_PRIVILEGES)
        for b in self.bindings:
            if b.project_id == project_id and b.cluster_ids is None:
                privs |= b.privileges
        return frozenset(privs)

    def can_see_project(self, org_id: str, project_id: str) -> bool:
        if not self.in_org(org_id):
            return False
        if self.project_privileges(org_id, project_id):
            return True
        return any(b.project_id == project_id for b in self.bindings)

    def require_project(self, org_id: str, project_id: str, privilege: str) -> None:
        if not self.can_see_project(org_id, project_id):
            raise NotFound(f"project {project_id} not found", code="project_not_found")
        if privilege not in self.project_privileges(org_id, project_id):
            raise Forbidden(f"missing privilege {privilege!r} on project {project_id}", code="forbidden")

    # -- cluster scope -----------------------------------------------------------------------------------
    def cluster_privileges(self, org_id: str, project_id: str, cluster_id: str) -> frozenset[str]:
        privs = set(self.project_privileges(org_id, project_id))
        for b in self.bindings:
            if b.project_id == project_id and b.cluster_ids is not None and cluster_id in b.cluster_ids:
                privs |= b.privileges & CLUSTER_PRIVILEGES
        return frozenset(privs)

    def can_see_cluster(self, org_id: str, project_id: str, cluster_id: str) -> bool:
        return bool(self.cluster_privileges(org_id, project_id, cluster_id))

    def require_cluster(self, org_id: str, project_id: str, cluster_id: str, privilege: str) -> None:
        privs = self.cluster_privileges(org_id, project_id, cluster_id)
        if not privs:
            raise NotFound(f"cluster {cluster_id} not found", code="cluster_not_found")
        if privilege not in privs:
            raise Forbidden(f"missing privilege {privilege!r} on cluster {cluster_id}", code="forbidden")

    # -- delegation --------------------------------------------------------------------------------------
    def all_privileges_in_org(self, org_id: str) -> frozenset[str]:
        privs = set(self.org_privileges(org_id))
        for b in self.bindings:
            if b.org_id == org_id:
                privs |= b.privileges
        return frozenset(privs)

    def can_grant_org_role(self, org_id: str, privileges: frozenset[str]) -> bool:
        """No one hands out more than they hold: the granted org-role privileges must be a subset of the
        granter's own organization privileges."""
        return privileges <= self.org_privileges(org_id)

    def can_grant_project_role(
        self, org_id: str, project_id: str, privileges: frozenset[str], cluster_ids: frozenset[str] | None
    ) -> bool:
        if cluster_ids is None:
            return privileges <= self.project_privileges(org_id, project_id)
        # A cluster-limited binding confers only the role's cluster privileges (see cluster_privileges).
        granted = privileges & CLUSTER_PRIVILEGES
        return all(granted <= self.cluster_privileges(org_id, project_id, c) for c in cluster_ids)


def split_privileges(privileges: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
    return privileges & ORG_PRIVILEGES, privileges & PROJECT_PRIVILEGES

"""Unit tests of the authorization decisions on ``AuthSubject`` (no database, no HTTP)."""

from __future__ import annotations

import dataclasses

import pytest

from services.auth.roles import (
    ALL_PRIVILEGES,
    CLUSTER_PRIVILEGES,
    ORG_PRIVILEGES,
    ORG_ROLES,
    PROJECT_PRIVILEGES,
    PROJECT_ROLES,
    role_scope,
)
from services.auth.subject import AuthSubject, Binding, split_privileges
from services.core.errors import Forbidden, NotFound

ORG, OTHER_ORG = "org_a", "org_b"
PRJ, PRJ2, FOREIGN_PRJ = "prj_1", "prj_2", "prj_foreign"


def user(org_role: str | None = None, *bindings: Binding, org: str = ORG) -> AuthSubject:
    roles = {org: org_role} if org_role else {}
    privs = {org: ORG_ROLES[org_role]} if org_role else {}
    return AuthSubject(kind="user", id="usr_1", org_roles=roles, org_role_privileges=privs, bindings=bindings)


def bind(role: str, project: str = PRJ, clusters: set[str] | None = None, org: str = ORG) -> Binding:
    return Binding(org, project, role, PROJECT_ROLES[role], frozenset(clusters) if clusters is not None else None)


# -- roles ----------------------------------------------------------------------------------------------------
def test_builtin_roles_are_consistent() -> None:
    assert ORG_ROLES["org_owner"] == ALL_PRIVILEGES
    assert ORG_PRIVILEGES.isdisjoint(PROJECT_PRIVILEGES)
    assert CLUSTER_PRIVILEGES <= PROJECT_PRIVILEGES
    for name, privileges in PROJECT_ROLES.items():
        assert privileges <= PROJECT_PRIVILEGES, name
        assert role_scope(privileges) == "project"
        assert "project:read" in privileges, name
    assert ORG_ROLES["org_member"] <= ORG_ROLES["org_billing_admin"] <= ORG_ROLES["org_owner"]
    assert PROJECT_ROLES["data_reader"] < PROJECT_ROLES["data_writer"] < PROJECT_ROLES["cluster_admin"]
    assert PROJECT_ROLES["cluster_admin"] < PROJECT_ROLES["project_admin"]
    assert role_scope(ORG_ROLES["org_member"]) == "org"
    assert split_privileges(frozenset({"org:read", "data:read"})) == (
        frozenset({"org:read"}),
        frozenset({"data:read"}),
    )


def test_subject_is_immutable() -> None:
    s = user("org_owner")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.id = "usr_2"  # type: ignore[misc]


def test_actor_and_user_id() -> None:
    assert user("org_member").user_id == "usr_1"
    key = AuthSubject(kind="api_key", id="key_1")
    assert key.user_id is None and key.actor == ("api_key", "key_1")


# -- organization scope ---------------------------------------------------------------------------------------
def test_outsider_gets_not_found_never_forbidden() -> None:
    s = user("org_owner", org=OTHER_ORG)
    for privilege in ("org:read", "org:update", "nonsense"):
        with pytest.raises(NotFound) as e:
            s.require_org(ORG, privilege)
        assert e.value.status == 404
    assert not s.in_org(ORG)
    assert s.org_privileges(ORG) == frozenset()


def test_member_without_privilege_gets_forbidden() -> None:
    s = user("org_member")
    s.require_org(ORG, "org:read")
    s.require_org(ORG, "member:read")
    with pytest.raises(Forbidden) as e:
        s.require_org(ORG, "member:manage")
    assert e.value.status == 403


def test_owner_holds_every_org_privilege() -> None:
    s = user("org_owner")
    for privilege in ORG_PRIVILEGES:
        s.require_org(ORG, privilege)


def test_billing_admin() -> None:
    s = user("org_billing_admin")
    s.require_org(ORG, "billing:manage")
    for privilege in ("apikey:manage", "member:manage", "audit:read", "project:create"):
        with pytest.raises(Forbidden):
            s.require_org(ORG, privilege)


def test_project_binding_alone_puts_a_key_in_the_org_without_org_privileges() -> None:
    key = AuthSubject(kind="api_key", id="key_1", bindings=(bind("data_reader"),))
    assert key.in_org(ORG)
    with pytest.raises(Forbidden):
        key.require_org(ORG, "org:read")
    with pytest.raises(NotFound):
        key.require_org(OTHER_ORG, "org:read")


# -- project scope --------------------------------------------------------------------------------------------
def test_org_owner_sees_every_project_of_the_org() -> None:
    s = user("org_owner")
    for project in (PRJ, PRJ2):
        for privilege in PROJECT_PRIVILEGES:
            s.require_project(ORG, project, privilege)


def test_org_member_without_bindings_cannot_see_projects() -> None:
    s = user("org_member")
    assert not s.can_see_project(ORG, PRJ)
    with pytest.raises(NotFound):
        s.require_project(ORG, PRJ, "project:read")


def test_project_role_applies_to_its_project_only() -> None:
    s = user("org_member", bind("data_writer"))
    s.require_project(ORG, PRJ, "data:write")
    s.require_project(ORG, PRJ, "project:read")
    with pytest.raises(Forbidden):
        s.require_project(ORG, PRJ, "project:delete")
    with pytest.raises(NotFound):
        s.require_project(ORG, PRJ2, "project:read")


def test_project_of_another_org_is_not_found_even_for_an_owner() -> None:
    s = user("org_owner")
    with pytest.raises(NotFound):
        s.require_project(OTHER_ORG, FOREIGN_PRJ, "project:read")


def test_privileges_from_org_role_and_binding_add_up() -> None:
    s = user("org_member", bind("data_reader"))
    assert s.project_privileges(ORG, PRJ) == PROJECT_ROLES["data_reader"]
    owner = user("org_owner", bind("data_reader"))
    assert owner.project_privileges(ORG, PRJ) == PROJECT_PRIVILEGES


def test_org_privileges_never_leak_into_project_privileges() -> None:
    s = user("org_billing_admin")
    assert s.project_privileges(ORG, PRJ) == frozenset()


# -- cluster scope --------------------------------------------------------------------------------------------
def test_cluster_limited_binding() -> None:
    s = user("org_member", bind("cluster_admin", clusters={"cl_a"}))
    s.require_cluster(ORG, PRJ, "cl_a", "cluster:delete")
    s.require_cluster(ORG, PRJ, "cl_a", "data:write")
    with pytest.raises(NotFound):
        s.require_cluster(ORG, PRJ, "cl_b", "cluster:read")
    # Project-wide privileges are not granted by a cluster-limited binding, even those the role holds.
    with pytest.raises(Forbidden):
        s.require_cluster(ORG, PRJ, "cl_a", "cluster:create")
    assert s.can_see_project(ORG, PRJ)
    with pytest.raises(Forbidden):
        s.require_project(ORG, PRJ, "project:read")
    assert s.cluster_privileges(ORG, PRJ, "cl_a") == PROJECT_ROLES["cluster_admin"] & CLUSTER_PRIVILEGES


def test_project_wide_binding_covers_every_cluster() -> None:
    s = user("org_member", bind("data_reader"))
    for cluster in ("cl_a", "cl_b"):
        s.require_cluster(ORG, PRJ, cluster, "data:read")
        with pytest.raises(Forbidden):
            s.require_cluster(ORG, PRJ, cluster, "data:write")
    with pytest.raises(NotFound):
        s.require_cluster(ORG, PRJ2, "cl_c", "data:read")


def test_cluster_binding_adds_to_project_binding() -> None:
    # Reader on the whole project plus writer on one cluster (two bindings on one project cannot be stored,
    # but the decision logic must still add them up for keys of different projects).
    s = user("org_member", bind("data_reader"), bind("data_writer", project=PRJ2, clusters={"cl_w"}))
    s.require_cluster(ORG, PRJ2, "cl_w", "data:write")
    with pytest.raises(NotFound):
        s.require_cluster(ORG, PRJ2, "cl_other", "data:read")
    s.require_cluster(ORG, PRJ, "cl_any", "data:read")


def test_cluster_of_another_tenant_is_not_found() -> None:
    s = user("org_owner")
    with pytest.raises(NotFound):
        s.require_cluster(OTHER_ORG, FOREIGN_PRJ, "cl_x", "cluster:read")


def test_binding_from_another_org_grants_nothing_here() -> None:
    s = user("org_member", bind("project_admin", project=FOREIGN_PRJ, org=OTHER_ORG))
    assert s.in_org(OTHER_ORG)
    with pytest.raises(NotFound):
        s.require_project(ORG, PRJ, "project:read")


# -- delegation -----------------------------------------------------------------------------------------------
def test_cannot_grant_more_than_held() -> None:
    member = user("org_member")
    assert member.can_grant_org_role(ORG, ORG_ROLES["org_member"])
    assert not member.can_grant_org_role(ORG, ORG_ROLES["org_billing_admin"])
    assert member.can_grant_org_role(ORG, frozenset())
    owner = user("org_owner")
    for role in ORG_ROLES.values():
        assert owner.can_grant_org_role(ORG, role)
    assert not owner.can_grant_org_role(OTHER_ORG, ORG_ROLES["org_member"])


def test_project_grants() -> None:
    s = user("org_member", bind("cluster_admin"))
    assert s.can_grant_project_role(ORG, PRJ, PROJECT_ROLES["data_writer"], None)
    assert s.can_grant_project_role(ORG, PRJ, PROJECT_ROLES["cluster_admin"], frozenset({"cl_a"}))
    assert not s.can_grant_project_role(ORG, PRJ, PROJECT_ROLES["project_admin"], None)
    assert not s.can_grant_project_role(ORG, PRJ2, PROJECT_ROLES["data_reader"], None)


def test_cluster_limited_holder_grants_only_on_those_clusters() -> None:
    s = user("org_member", bind("data_writer", clusters={"cl_a"}))
    reader_on_cluster = PROJECT_ROLES["data_reader"] & CLUSTER_PRIVILEGES
    assert s.can_grant_project_role(ORG, PRJ, reader_on_cluster, frozenset({"cl_a"}))
    assert not s.can_grant_project_role(ORG, PRJ, reader_on_cluster, frozenset({"cl_a", "cl_b"}))
    assert not s.can_grant_project_role(ORG, PRJ, reader_on_cluster, None)  # not project-wide
    # A cluster-limited grant of a whole role confers only its cluster privileges, so that is what is checked.
    assert s.can_grant_project_role(ORG, PRJ, PROJECT_ROLES["data_reader"], frozenset({"cl_a"}))
    assert s.can_grant_project_role(ORG, PRJ, PROJECT_ROLES["data_writer"], frozenset({"cl_a"}))
    assert not s.can_grant_project_role(ORG, PRJ, PROJECT_ROLES["cluster_admin"], frozenset({"cl_a"}))
    assert not s.can_grant_project_role(ORG, PRJ, PROJECT_ROLES["data_reader"], None)


def test_all_privileges_in_org() -> None:
    s = user("org_member", bind("data_reader"), bind("project_admin", project=FOREIGN_PRJ, org=OTHER_ORG))
    assert s.all_privileges_in_org(ORG) == ORG_ROLES["org_member"] | PROJECT_ROLES["data_reader"]
    assert "project:delete" not in s.all_privileges_in_org(ORG)

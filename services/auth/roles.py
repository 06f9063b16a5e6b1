"""Privileges and the built-in roles.

Organization-scope roles hold organization privileges and may also hold project privileges that then apply to every
project of the organization (an owner can do everything everywhere). Project-scope roles hold project privileges and
are bound per project, optionally limited to a set of clusters.
"""

from __future__ import annotations

from typing import Final

ORG_PRIVILEGES: Final = frozenset(
    {
        "org:read",
        "org:update",
        "member:read",
        "member:manage",
        "project:create",
        "role:manage",
        "apikey:manage",
        "billing:read",
        "billing:manage",
        "audit:read",
    }
)

PROJECT_PRIVILEGES: Final = frozenset(
    {
        "project:read",
        "project:update",
        "project:delete",
        "cluster:create",
        "cluster:read",
        "cluster:update",
        "cluster:delete",
        "collection:create",
        "collection:drop",
        "data:read",
        "data:write",
        "backup:create",
        "backup:restore",
        "key:manage",
        "key:read",
    }
)

# Privileges that make sense limited to particular clusters (a binding with cluster_ids grants only these).
CLUSTER_PRIVILEGES: Final = frozenset(
    {
        "cluster:read",
        "cluster:update",
        "cluster:delete",
        "collection:create",
        "collection:drop",
        "data:read",
        "data:write",
        "backup:create",
        "backup:restore",
    }
)

ALL_PRIVILEGES: Final = ORG_PRIVILEGES | PROJECT_PRIVILEGES

ORG_ROLES: Final[dict[str, frozenset[str]]] = {
    "org_owner": ALL_PRIVILEGES,
    "org_billing_admin": frozenset({"org:read", "member:read", "billing:read", "billing:manage"}),
    "org_member": frozenset({"org:read", "member:read"}),
}

PROJECT_ROLES: Final[dict[str, frozenset[str]]] = {
    "project_admin": PROJECT_PRIVILEGES,
    "cluster_admin": CLUSTER_PRIVILEGES | {"project:read", "cluster:create", "key:read"},
    "data_writer": frozenset({"project:read", "cluster:read", "data:read", "data:write", "collection:create"}),
    "data_reader": frozenset({"project:read", "cluster:read", "data:read"}),
}

BUILTIN_ROLES: Final = {**ORG_ROLES, **PROJECT_ROLES}

ROLE_DESCRIPTIONS: Final = {
    "org_owner": "Full control of the organization, its members, billing and every project.",
    "org_billing_admin": "Manages billing and reads usage and invoices.",
    "org_member": "Belongs to the organization; project access comes from project roles.",
    "project_admin": "Full control of a project: clusters, data, backups, encryption keys.",
    "cluster_admin": "Creates and operates clusters, collections and backups in a project.",
    "data_writer": "Reads and writes vectors; creates collections.",
    "data_reader": "Reads and searches vectors.",
}


def role_scope(privileges: frozenset[str]) -> str:
    return "project" if privileges <= PROJECT_PRIVILEGES else "org"

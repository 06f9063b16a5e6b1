"""The cluster lifecycle: statuses and the only transitions allowed between them, in one table.

Every status change goes through :func:`transition`, which raises a 409 naming the current status for anything
the table does not allow. Transitional statuses (…ING) are driven to their end by Celery tasks and re-driven by
the reconciler if a task is lost.
"""

from __future__ import annotations

from enum import StrEnum

from services.core.errors import Conflict


class Status(StrEnum):
    CREATING = "CREATING"
    RUNNING = "RUNNING"
    MODIFYING = "MODIFYING"
    SUSPENDING = "SUSPENDING"
    SUSPENDED = "SUSPENDED"
    RESUMING = "RESUMING"
    RESTORING = "RESTORING"
    DELETING = "DELETING"
    DELETED = "DELETED"
    FAILED = "FAILED"


S = Status
TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.CREATING: frozenset({S.RUNNING, S.FAILED, S.DELETING}),
    # RUNNING → SUSPENDED directly: only the key check, when the cluster's encryption key becomes unusable (no
    # snapshot can be taken without the key; the engine is stopped and its data left encrypted where it is).
    S.RUNNING: frozenset({S.MODIFYING, S.SUSPENDING, S.SUSPENDED, S.RESTORING, S.DELETING, S.FAILED}),
    S.MODIFYING: frozenset({S.RUNNING, S.FAILED}),
    S.SUSPENDING: frozenset({S.SUSPENDED, S.FAILED}),
    S.SUSPENDED: frozenset({S.RESUMING, S.DELETING}),
    S.RESUMING: frozenset({S.RUNNING, S.FAILED, S.SUSPENDED}),
    S.RESTORING: frozenset({S.RUNNING, S.FAILED}),
    S.DELETING: frozenset({S.DELETED}),
    S.DELETED: frozenset(),
    S.FAILED: frozenset({S.DELETING, S.RESUMING}),
}

# The status_reason of a cluster suspended because its encryption key became unusable (keys.tasks).
KEY_UNAVAILABLE_REASON = "encryption_key_unavailable"

TRANSITIONAL = frozenset({S.CREATING, S.MODIFYING, S.SUSPENDING, S.RESUMING, S.RESTORING, S.DELETING})

# What an API action asks for, and the status the cluster passes through on the way.
ACTION_TARGETS: dict[str, Status] = {
    "modify": S.MODIFYING,
    "suspend": S.SUSPENDING,
    "resume": S.RESUMING,
    "restore": S.RESTORING,
    "delete": S.DELETING,
}


def can(current: Status | str, target: Status | str) -> bool:
    return Status(target) in TRANSITIONS[Status(current)]


def check(current: Status | str, target: Status | str, action: str | None = None) -> None:
    if not can(current, target):
        what = action or f"move to {Status(target).value}"
        raise Conflict(
            f"cannot {what}: the cluster is {Status(current).value}",
            code="invalid_cluster_state",
            extra={"current_status": Status(current).value},
        )

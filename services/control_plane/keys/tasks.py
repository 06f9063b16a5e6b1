"""Key tasks: the key check (revocation and its end), and the re-key of a cluster's data key.

``keys.check`` runs every ``VECTA_KEY_CHECK_INTERVAL_SECONDS`` (Celery beat). For every key it asks the provider
for the current version's state (``DescribeKey`` for AWS KMS; Vecta checks the state itself, as the hosted services
do, rather than waiting for a ``Decrypt`` to fail):

* disabled or scheduled for deletion: the key becomes UNAVAILABLE, its running clusters go to SUSPENDED with
  ``status_reason: "encryption_key_unavailable"`` and their engines are stopped, which drops the plaintext data key
  from memory (the files stay where they are, encrypted). The edge answers their data-plane calls with 503 and that
  reason; their backups cannot be restored.
* unreachable (network, throttling, KMS outage): the same, but only on the second check in a row, so one lost
  request does not take a customer's clusters down.
* usable again: the key becomes ENABLED and the clusters it suspended resume with their data intact.

Every change is an audit row (actor ``system``). The same pass re-wraps data keys still on an older key version
(clusters created while a rotation ran) and re-sends unfinished re-keys.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.auth.keyprovider import KeyState, KeyUnavailable
from services.control_plane.clusters.models import Cluster, Job
from services.control_plane.clusters.state import KEY_UNAVAILABLE_REASON, Status
from services.control_plane.clusters.tasks import engine_call, engine_token
from services.control_plane.keys import ring
from services.control_plane.keys.clusterkeys import sealed_keys
from services.control_plane.keys.models import EncryptionKey
from services.control_plane.provisioners.base import ProvisionError
from services.control_plane.provisioners.local import get_provisioner
from services.core import audit
from services.core.celery_app import celery_app, send
from services.core.db import get_database, utcnow
from services.core.ids import new_id

log = logging.getLogger(__name__)

SUSPENDED_REASON = KEY_UNAVAILABLE_REASON
_UNREACHABLE = "unreachable since "


def _system_audit(s: Session, action: str, org_id: str, target_type: str, target_id: str, **details: Any) -> None:
    row = audit.build(action=action, org_id=org_id, actor_type="system", actor_id=None, target_type=target_type,
                      target_id=target_id, details=details)  # fmt: skip
    s.add(row)


@celery_app.task(name="keys.check", ignore_result=True)
def check_keys() -> dict[str, int]:
    db = get_database()
    counts: dict[str, int] = {}
    with db.sync_transaction() as s:
        key_ids = s.scalars(select(EncryptionKey.id).where(EncryptionKey.status != "DELETED")).all()
    for key_id in key_ids:  # one key's trouble must not stop the pass for the others
        try:
            outcome = check_key(key_id)
        except Exception:
            log.exception("keys.check: checking %s failed", key_id)
            outcome = "errors"
        counts[outcome] = counts.get(outcome, 0) + 1
    with db.sync_transaction() as s:
        pending = s.scalars(
            select(Cluster.id).where(Cluster.data_key_next_wrapped.is_not(None), Cluster.status == Status.RUNNING.value)
        ).all()
    for cluster_id in pending:
        send("cluster.rekey", (cluster_id,), {})
    counts["rekeys_sent"] = len(pending)
    return counts


def check_key(key_id: str) -> str:
    db = get_database()
    with db.sync_transaction() as s:
        key = s.get(EncryptionKey, key_id)
        if key is None or key.status == "DELETED":
            return "skipped"
        ref = ring.load_ref_sync(s, key.id, None, key.org_id)
    st = ring.describe(ref)
    if st.usable:
        resumed = key_usable(key_id)
        rewrap_stragglers(key_id)
        return "resumed" if resumed else "usable"
    return "suspended" if key_unusable(key_id, st) else "unusable"


def key_unusable(key_id: str, st: KeyState) -> int:
    """Mark the key UNAVAILABLE and suspend its running clusters (a first 'unreachable' is only noted)."""
    db = get_database()
    reason = (st.reason or f"the key is {st.state.replace('_', ' ')}")[:250]
    to_stop: list[tuple[str, str, dict[str, Any]]] = []
    suspended = 0
    with db.sync_transaction() as s:
        key = s.get(EncryptionKey, key_id, with_for_update=True)
        if key is None or key.status == "DELETED":
            return 0
        now = utcnow()
        key.last_checked_at = now
        if key.status == "ENABLED":
            if st.transient and not (key.status_reason or "").startswith(_UNREACHABLE):
                key.status_reason = f"{_UNREACHABLE}{now.isoformat(timespec='seconds')}: {reason}"[:300]
                return 0  # suspend only if it is still unreachable at the next check
            key.status, key.status_reason = "UNAVAILABLE", reason
            _system_audit(s, "encryption_key.unavailable", key.org_id, "encryption_key", key.id, state=st.state,
                          reason=reason)  # fmt: skip
        clusters = s.scalars(
            select(Cluster)
            .where(
                Cluster.encryption_key_id == key.id,
                Cluster.status.in_([Status.RUNNING.value, Status.SUSPENDED.value]),
            )
            .with_for_update()
        ).all()
        for c in clusters:
            if c.status == Status.RUNNING.value:
                c.status, c.status_reason, c.engine_url = Status.SUSPENDED.value, SUSPENDED_REASON, None
                _system_audit(s, "cluster.suspend", c.org_id, "cluster", c.id, reason=SUSPENDED_REASON,
                              key_id=key.id, key_state=st.state)  # fmt: skip
                suspended += 1
            if c.status_reason == SUSPENDED_REASON:
                to_stop.append((c.id, c.provisioner, dict(c.engine_state or {})))
    # After the commit (the edge no longer routes to them): stop the engines, dropping the key from memory. Done on
    # every pass while the key is unusable, so an engine a crashed pass left running is stopped by the next one.
    for cluster_id, provisioner, state in to_stop:
        try:
            get_provisioner(provisioner).stop(cluster_id, state)
        except Exception:
            log.exception("keys.check: could not stop the engine of %s", cluster_id)
    return suspended


def key_usable(key_id: str) -> int:
    """Mark the key ENABLED again and resume the clusters its unavailability suspended."""
    db = get_database()
    jobs: list[tuple[str, str]] = []
    with db.sync_transaction() as s:
        key = s.get(EncryptionKey, key_id, with_for_update=True)
        if key is None or key.status == "DELETED":
            return 0
        key.last_checked_at = utcnow()
        if key.status == "ENABLED":
            if (key.status_reason or "").startswith(_UNREACHABLE):
                key.status_reason = None
            return 0
        key.status, key.status_reason = "ENABLED", None
        _system_audit(s, "encryption_key.available", key.org_id, "encryption_key", key.id)
        clusters = s.scalars(
            select(Cluster)
            .where(
                Cluster.encryption_key_id == key.id,
                Cluster.status == Status.SUSPENDED.value,
                Cluster.status_reason == SUSPENDED_REASON,
            )
            .with_for_update()
        ).all()
        for c in clusters:
            c.status, c.status_reason = Status.RESUMING.value, "encryption key usable again"
            job = Job(id=new_id("job"), org_id=c.org_id, kind="cluster.resume", resource_id=c.id, params={})
            s.add(job)
            _system_audit(s, "cluster.resume", c.org_id, "cluster", c.id, trigger="encryption key usable again",
                          key_id=key.id)  # fmt: skip
            jobs.append((c.id, job.id))
    for cluster_id, job_id in jobs:
        send("cluster.resume", (cluster_id, job_id), {})
    return len(jobs)


def rewrap_stragglers(key_id: str) -> int:
    """Clusters whose data key is still wrapped by an older version of the key (created while a rotation ran)
    get it re-wrapped by the current one."""
    db = get_database()
    with db.sync_transaction() as s:
        key = s.get(EncryptionKey, key_id)
        if key is None or key.status != "ENABLED":
            return 0
        ids = s.scalars(
            select(Cluster.id).where(
                Cluster.encryption_key_id == key.id,
                Cluster.key_version != key.current_version,
                Cluster.status != Status.DELETED.value,
            )
        ).all()
    done = 0
    for cluster_id in ids:
        with db.sync_transaction() as s:
            c = s.get(Cluster, cluster_id, with_for_update=True)
            key = s.get(EncryptionKey, key_id)
            if c is None or key is None or c.key_version == key.current_version:
                continue
            old = sealed_keys(s, c)
            new = ring.load_ref_sync(s, key.id, None, key.org_id)
            try:
                c.data_key_wrapped = ring.wrap(new, ring.unwrap(old.ref, old.current, old.context), old.context)
                if old.next is not None:
                    c.data_key_next_wrapped = ring.wrap(new, ring.unwrap(old.ref, old.next, old.context), old.context)
            except KeyUnavailable as exc:
                log.warning("keys.check: could not re-wrap the data key of %s: %s", cluster_id, exc)
                s.rollback()
                continue
            c.key_version = new.version
            _system_audit(s, "cluster.key_rewrap", c.org_id, "cluster", c.id, key_id=key.id, version=new.version)
            done += 1
    return done


# -- re-key ---------------------------------------------------------------------------------------------------
REKEY_TIMEOUT_SECONDS = 3600.0


def _members(c: Cluster) -> list[str]:
    urls = [c.engine_url] if c.engine_url else []
    for r in (c.engine_state or {}).get("replicas") or []:
        if isinstance(r, dict) and isinstance(r.get("url"), str):
            urls.append(r["url"])
    return urls


@celery_app.task(name="cluster.rekey", acks_late=True, ignore_result=True)
def rekey(cluster_id: str) -> str:
    """Have every engine of the cluster (primary and read replicas) re-encrypt its files under the new data key,
    then make the new key the cluster's data key. Idempotent: an engine asked again with the same key reports its
    progress (or re-encrypts what is still under the old key after a restart); the key check re-sends this task
    for a re-key that has not finished (a cluster suspended half-way finishes after it resumes)."""
    db = get_database()
    for _ in range(3):  # again if the set of engines changed meanwhile (a replica added or restarted)
        with db.sync_transaction() as s:
            c = s.get(Cluster, cluster_id)
            if c is None or c.data_key_next_wrapped is None:
                return "nothing"
            if c.status != Status.RUNNING.value or not c.engine_url:
                return "not_running"
            token, sealed, members = engine_token(c), sealed_keys(s, c), _members(c)
            next_wrapped = c.data_key_next_wrapped
        try:
            new_key, _ = sealed.open()
        except KeyUnavailable as exc:
            log.warning("cluster.rekey %s: key unavailable: %s", cluster_id, exc)
            return "key_unavailable"
        body = {"data_key": base64.b64encode(new_key).decode()}
        del new_key
        outcome = _drive_members(members, token, body)
        if outcome != "done":
            return outcome
        with db.sync_transaction() as s:
            c = s.get(Cluster, cluster_id, with_for_update=True)
            if c is None or c.data_key_next_wrapped != next_wrapped:
                return "superseded"
            if _members(c) != members:
                continue
            c.data_key_wrapped, c.data_key_next_wrapped = next_wrapped, None
            _system_audit(s, "cluster.rekey", c.org_id, "cluster", c.id, key_id=c.encryption_key_id,
                          version=c.key_version, engines=len(members))  # fmt: skip
            return "succeeded"
    return "members_changing"


def _drive_members(members: list[str], token: str, body: dict[str, str]) -> str:
    """Read replicas first, then the primary: a replica follows a primary only while it holds every key the
    primary writes under, so in this order no replica ever waits (docs/engine.md "Re-key")."""
    deadline = time.monotonic() + REKEY_TIMEOUT_SECONDS
    for group in (members[1:], members[:1]):
        outcome = _drive_group(group, token, body, deadline)
        if outcome != "done":
            return outcome
    return "done"


def _drive_group(members: list[str], token: str, body: dict[str, str], deadline: float) -> str:
    pending = set(members)
    failures: dict[str, int] = {}
    delay = 0.05
    while pending:
        if time.monotonic() > deadline:
            return "timeout"
        for url in sorted(pending):
            try:
                st = engine_call(url, token, "POST", "/internal/rekey", body, timeout=30.0)
            except (ProvisionError, httpx.HTTPError) as exc:
                # 409: another re-key is still running on this engine; unreachable: it may be restarting.
                failures[url] = failures.get(url, 0) + 1
                if failures[url] > 600:
                    log.error("cluster.rekey: %s keeps failing: %s", url, exc)
                    return "engine_error"
                continue
            if st.get("state") == "done":
                pending.discard(url)
            elif st.get("state") == "failed":
                failures[url] = failures.get(url, 0) + 1
                if failures[url] > 3:
                    log.error("cluster.rekey: %s failed: %s", url, st.get("error"))
                    return "engine_failed"
        if pending:
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)
    return "done"

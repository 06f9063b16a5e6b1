"""Celery tasks that do the cluster lifecycle work, and the reconciler.

Each task takes (cluster_id, job_id), is idempotent and safe to run again after a worker died half-way: it only
acts while the cluster is still in the transitional status the job was created for, provisioners re-adopt running
engines, and the final status is written in one transaction with the job's result. The reconciler (Celery beat)
re-drives clusters stuck in a transitional status whose job was lost, restarts engines that died, and records a
heartbeat and a metrics sample for every running cluster.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import httpx
from celery.signals import worker_ready
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.auth.keyprovider import KeyUnavailable, local_provider
from services.control_plane.clusters.metrics import METRICS_CURSOR, REPLICA_CURSORS, record_sample
from services.control_plane.clusters.models import Cluster, Job
from services.control_plane.clusters.state import TRANSITIONAL, Status, can
from services.control_plane.keys.clusterkeys import key_context, sealed_keys
from services.control_plane.provisioners.base import EngineSpec, ProvisionError
from services.control_plane.provisioners.local import LocalProvisioner, get_provisioner
from services.core.celery_app import celery_app
from services.core.db import get_database, utcnow
from services.core.objectstore import open_object_store
from services.core.settings import get_settings

log = logging.getLogger(__name__)

KIND_STATUS: dict[str, tuple[Status, Status]] = {  # job kind → (status while running, status when done)
    "cluster.provision": (Status.CREATING, Status.RUNNING),
    "cluster.modify": (Status.MODIFYING, Status.RUNNING),
    "cluster.suspend": (Status.SUSPENDING, Status.SUSPENDED),
    "cluster.resume": (Status.RESUMING, Status.RUNNING),
    "cluster.delete": (Status.DELETING, Status.DELETED),
    "backup.restore": (Status.RESTORING, Status.RUNNING),
}


@dataclass(frozen=True)
class Work:
    cluster_id: str
    org_id: str
    provisioner: str
    engine_url: str | None
    spec: EngineSpec
    params: dict[str, Any]


def engine_token(c: Cluster) -> str:
    """The bearer token the control plane and the edge present to the cluster's engine (always wrapped by the
    deployment's master key: it is Vecta's secret, not the customer's data)."""
    return local_provider().unwrap(c.engine_token_wrapped, {**key_context(c), "use": "engine_token"}).decode()


def engine_spec(s: Session, c: Cluster, state: dict[str, Any] | None = None) -> EngineSpec:
    """What a provisioner needs to start the cluster's engine: its shape, token and data keys (unwrapped here,
    through the cluster's encryption key; raises KeyUnavailable)."""
    data_key, previous = sealed_keys(s, c).open()
    return EngineSpec(
        c.id, c.cu_size, c.replicas, engine_token(c), data_key,
        dict(c.engine_state or {}) if state is None else state, previous,
    )  # fmt: skip


_engine_client: httpx.Client | None = None
_engine_client_lock = threading.Lock()


def _engine_http() -> httpx.Client:
    """One pooled client for engine calls: ``httpx.request`` builds a client (and loads the CA bundle) per
    call, ~50 ms each on this machine, several times per provision or resume."""
    global _engine_client
    with _engine_client_lock:
        if _engine_client is None:
            _engine_client = httpx.Client()
        return _engine_client


def engine_call(url: str, token: str, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
    r = _engine_http().request(
        method, f"{url}{path}", json=body, headers={"authorization": f"Bearer {token}"}, timeout=timeout
    )
    if r.status_code >= 400:
        raise ProvisionError(f"engine answered {r.status_code} to {method} {path}: {r.text[:300]}")
    return r.json()


def drive(kind: str, cluster_id: str, job_id: str, work: Callable[[Work], dict[str, Any]]) -> str:
    during, done = KIND_STATUS[kind]
    db = get_database()
    with db.sync_transaction() as s:
        c = s.get(Cluster, cluster_id)
        job = s.get(Job, job_id)
        if c is None or job is None:
            return "missing"
        if job.status in ("succeeded", "failed"):
            return job.status
        if c.status != during.value:
            job.status = "succeeded" if c.status == done.value else "failed"
            job.error = None if job.status == "succeeded" else f"cluster is {c.status}, not {during.value}"
            job.finished_at = utcnow()
            return job.status
        job.status, job.started_at, job.attempts = "running", job.started_at or utcnow(), job.attempts + 1
        try:
            spec = engine_spec(s, c)
        except KeyUnavailable as exc:
            _fail(c, job, f"encryption key unavailable: {exc}")
            return "failed"
        item = Work(
            cluster_id=c.id,
            org_id=c.org_id,
            provisioner=c.provisioner,
            engine_url=c.engine_url,
            spec=spec,
            params=dict(job.params or {}),
        )
    reason = None
    updates: dict[str, Any] = {}
    try:
        updates = work(item)
    except ProvisionError as exc:
        reason = exc.reason
    except Exception as exc:
        log.exception("%s failed for %s", kind, cluster_id)
        reason = f"internal error ({type(exc).__name__}); the operation can be retried"
    with db.sync_transaction() as s:
        c = s.get(Cluster, cluster_id)
        job = s.get(Job, job_id)
        assert c is not None and job is not None
        if reason is not None:
            if kind == "cluster.delete":  # a delete is never abandoned: the reconciler tries again
                job.status, job.error, job.finished_at = "failed", reason, utcnow()
            else:
                _fail(c, job, reason)
            return "failed"
        for field, value in updates.items():
            setattr(c, field, value)
        if c.status == during.value and can(during, done):
            c.status = done.value
            c.status_reason = None
        job.status, job.progress, job.finished_at = "succeeded", 1.0, utcnow()
    return "succeeded"


def _fail(c: Cluster, job: Job, reason: str) -> None:
    if can(c.status, Status.FAILED):
        c.status = Status.FAILED.value
    c.status_reason = reason[:300]
    job.status, job.error, job.finished_at = "failed", reason[:1000], utcnow()


def _started(handle_url: str, state: dict[str, Any]) -> dict[str, Any]:
    return {"engine_url": handle_url, "engine_state": state, "last_heartbeat_at": utcnow()}


def _provision(w: Work) -> dict[str, Any]:
    t0 = time.perf_counter()
    prov = get_provisioner(w.provisioner)
    handle = prov.start(w.spec, get_settings().engine_start_timeout_seconds)
    t1 = time.perf_counter()
    if w.params.get("restore_uri"):  # a new cluster made from a backup
        _restore_into(handle.url, w.spec.token, w.params["restore_uri"])
    log.info("cluster.provision %s timings: engine_start %.3f s, restore %.3f s", w.cluster_id, t1 - t0,
             time.perf_counter() - t1)  # fmt: skip
    _replenish(prov)
    return _started(handle.url, handle.state)


def _replenish(prov: Any) -> None:
    """The engine is up and loaded: the local provisioner may now replace the warm spare it used."""
    if isinstance(prov, LocalProvisioner):
        prov.replenish()


def _restore_into(url: str, token: str, uri: str) -> None:
    """Load a snapshot into a just-started engine; a retried task finds it loaded already and does nothing."""
    stats = engine_call(url, token, "GET", "/internal/stats")
    if not stats.get("collections"):
        engine_call(url, token, "POST", "/internal/restore", {"uri": uri}, timeout=3600)


def _restore_in_place(w: Work) -> dict[str, Any]:
    """Replace a cluster's data with a backup: stop, wipe, start empty, load the snapshot."""
    prov = get_provisioner(w.provisioner)
    prov.destroy(w.cluster_id, w.spec.state)
    spec = replace(w.spec, state={})
    handle = prov.start(spec, get_settings().engine_start_timeout_seconds)
    _restore_into(handle.url, w.spec.token, w.params["uri"])
    return _started(handle.url, handle.state)


def _modify(w: Work) -> dict[str, Any]:
    prov = get_provisioner(w.provisioner)
    cu = int(w.params.get("cu_size", w.spec.cu_size))
    replicas = int(w.params.get("replicas", w.spec.replicas))
    if cu != w.spec.cu_size:  # new limits need new processes; a change of replicas alone keeps the primary up
        prov.stop(w.cluster_id, w.spec.state)
    spec = replace(w.spec, cu_size=cu, replicas=replicas)
    handle = prov.start(spec, get_settings().engine_start_timeout_seconds)  # adds or removes read replicas
    return {**_started(handle.url, handle.state), "cu_size": cu, "replicas": replicas}


def snapshot_uri(cluster_id: str, purpose: str) -> str:
    stamp = utcnow().strftime("%Y%m%dT%H%M%S%fZ")
    return f"{get_settings().objects_uri.rstrip('/')}/clusters/{cluster_id}/{purpose}/{stamp}"


def _suspend(w: Work) -> dict[str, Any]:
    prov = get_provisioner(w.provisioner)
    # The snapshot is always taken from the engine on the cluster's current data (started again if it had
    # died): suspending from an older snapshot would lose the writes made since.
    handle = prov.start(w.spec, get_settings().engine_start_timeout_seconds)
    state = dict(handle.state)
    uri = snapshot_uri(w.cluster_id, "suspend")
    engine_call(handle.url, w.spec.token, "POST", "/internal/snapshot", {"uri": uri}, timeout=3600)
    state["snapshot_uri"] = uri
    state.pop("restored", None)  # the next resume loads this new snapshot
    prov.destroy(w.cluster_id, state)
    state.pop("pid", None)
    return {"engine_url": None, "engine_state": state}


def _resume(w: Work) -> dict[str, Any]:
    t0 = time.perf_counter()
    prov = get_provisioner(w.provisioner)
    handle = prov.start(w.spec, get_settings().engine_start_timeout_seconds)
    t1 = time.perf_counter()
    state = dict(handle.state)
    uri = state.get("snapshot_uri")
    if uri and not state.get("restored"):
        _restore_into(handle.url, w.spec.token, uri)
        state["restored"] = True
    log.info("cluster.resume %s timings: engine_start %.3f s, restore %.3f s", w.cluster_id, t1 - t0,
             time.perf_counter() - t1)  # fmt: skip
    _replenish(prov)
    return _started(handle.url, state)


def _delete(w: Work) -> dict[str, Any]:
    get_provisioner(w.provisioner).destroy(w.cluster_id, w.spec.state)
    state = {k: v for k, v in w.spec.state.items() if k == "snapshot_uri"}
    return {"engine_url": None, "engine_state": state, "deleted_at": utcnow()}


@worker_ready.connect
def _warm_spare_engines(sender: Any = None, **_: Any) -> None:
    """A worker that runs tasks in its own process (threads or solo pool) starts its spare engines at boot, so
    the first create or resume is as quick as later ones. (A prefork parent's spares would be of no use to its
    children.)"""
    pool = type(getattr(sender, "pool", None)).__module__
    settings = get_settings()
    if settings.provisioner != "local" or settings.local_spare_engines <= 0 or not pool.endswith(("thread", "solo")):
        return
    try:
        LocalProvisioner().warm()
    except OSError:
        log.exception("could not start the spare engines; engines start cold")


WORK: dict[str, Callable[[Work], dict[str, Any]]] = {
    "cluster.provision": _provision,
    "cluster.modify": _modify,
    "cluster.suspend": _suspend,
    "cluster.resume": _resume,
    "cluster.delete": _delete,
    "backup.restore": _restore_in_place,
}


def _register(kind: str) -> None:
    def run(cluster_id: str, job_id: str) -> str:
        return drive(kind, cluster_id, job_id, WORK[kind])

    run.__name__ = run.__qualname__ = kind.replace(".", "_")
    celery_app.task(name=kind, acks_late=True, ignore_result=True)(run)


for _kind in KIND_STATUS:
    _register(_kind)


# -- reconciler ----------------------------------------------------------------------------------------------
STUCK_AFTER = dt.timedelta(minutes=2)  # a transitional cluster untouched this long gets its task re-sent...
RUNNING_TOO_LONG = dt.timedelta(minutes=30)  # ...unless its job is running and started less than this ago


@celery_app.task(name="cluster.reconcile", ignore_result=True)
def reconcile() -> dict[str, int]:
    db = get_database()
    counts = {"heartbeats": 0, "restarted": 0, "redriven": 0, "purged": 0}
    with db.sync_transaction() as s:
        running = s.scalars(select(Cluster.id).where(Cluster.status == Status.RUNNING.value)).all()
        stuck = s.scalars(
            select(Cluster.id).where(
                Cluster.status.in_([st.value for st in TRANSITIONAL]), Cluster.updated_at < utcnow() - STUCK_AFTER
            )
        ).all()
    # One cluster's trouble (a provisioner not available here, a key that no longer unwraps) must not stop the
    # pass for every other cluster.
    for cluster_id in running:
        try:
            outcome = heartbeat(cluster_id)
        except Exception:
            log.exception("reconcile: heartbeat of %s failed", cluster_id)
            outcome = "errors"
        counts[outcome] = counts.get(outcome, 0) + 1
    in_flight = active_job_ids() if stuck else None
    for cluster_id in stuck:
        try:
            counts["redriven"] += redrive(cluster_id, in_flight)
        except Exception:
            log.exception("reconcile: re-driving %s failed", cluster_id)
            counts["errors"] = counts.get("errors", 0) + 1
    for cluster_id in running:
        try:
            counts["replicas_restarted"] = counts.get("replicas_restarted", 0) + heal_replicas(cluster_id)
        except Exception:
            log.exception("reconcile: healing the read replicas of %s failed", cluster_id)
            counts["errors"] = counts.get("errors", 0) + 1
    counts["purged"] = purge_deleted()
    return counts


def heal_replicas(cluster_id: str) -> int:
    """A running cluster with read replicas gets any dead replica started again (``start`` re-adopts the live
    primary and replicas and starts only what is missing); the edge meanwhile reads from the other members."""
    db = get_database()
    with db.sync_transaction() as s:
        c = s.get(Cluster, cluster_id)
        if c is None or c.status != Status.RUNNING.value or c.replicas <= 1:
            return 0
        state, replicas, provisioner = dict(c.engine_state or {}), c.replicas, c.provisioner
    prov = get_provisioner(provisioner)
    if prov.replicas_running(cluster_id, state, replicas) or not prov.is_running(cluster_id, state):
        return 0  # all there, or the primary itself is down (the heartbeat restarts it, and its replicas)
    with db.sync_transaction() as s:  # the data key is unwrapped only when a replica must really be started
        c = s.get(Cluster, cluster_id)
        if c is None or c.status != Status.RUNNING.value:
            return 0
        try:
            spec = engine_spec(s, c)
        except KeyUnavailable as exc:
            log.error("cannot restart the read replicas of %s: %s", cluster_id, exc)
            return 0
    try:
        handle = prov.start(spec, get_settings().engine_start_timeout_seconds)
    except ProvisionError as exc:
        log.error("could not restart the read replicas of %s: %s", cluster_id, exc)
        return 0
    with db.sync_transaction() as s:
        c = s.get(Cluster, cluster_id, with_for_update=True)
        if c is None or c.status != Status.RUNNING.value:
            return 0
        state = dict(c.engine_state or {})
        state["replicas"] = handle.state.get("replicas", [])
        c.engine_url, c.engine_state = handle.url, state
        c.status_reason = f"read replica restarted at {utcnow().isoformat(timespec='seconds')}"
    return 1


def heartbeat(cluster_id: str) -> str:
    """Ask a running cluster's engine for its stats; restart the engine if it died."""
    db = get_database()
    with db.sync_transaction() as s:
        c = s.get(Cluster, cluster_id)
        if c is None or c.status != Status.RUNNING.value:
            return "skipped"
        token = engine_token(c)
        state = {k: v for k, v in (c.engine_state or {}).items() if k not in (METRICS_CURSOR, REPLICA_CURSORS)}
        url, provisioner = c.engine_url, c.provisioner
    stats = None
    if url:
        try:
            stats = engine_call(url, token, "GET", "/internal/stats", timeout=5.0)
        except (httpx.HTTPError, ProvisionError):
            stats = None
    restarted = None
    if stats is None:
        prov = get_provisioner(provisioner)
        if prov.is_running(cluster_id, state):
            return "unresponsive"  # alive but slow: leave it; the next pass looks again
        # Only a restart needs the data key (a KMS call for a customer's key): not every heartbeat.
        with db.sync_transaction() as s:
            c = s.get(Cluster, cluster_id)
            if c is None or c.status != Status.RUNNING.value:
                return "skipped"
            try:
                spec = engine_spec(s, c, state)
            except KeyUnavailable as exc:
                log.error("cannot restart the engine of %s: %s", cluster_id, exc)
                return "key_unavailable"  # the key check suspends the cluster if the key stays unusable
        try:
            restarted = prov.start(spec, get_settings().engine_start_timeout_seconds)
            stats = engine_call(restarted.url, token, "GET", "/internal/stats", timeout=5.0)
        except (ProvisionError, httpx.HTTPError) as exc:
            log.error("could not restart the engine of %s: %s", cluster_id, exc)
            return "restart_failed"
    replica_stats: dict[str, dict[str, Any]] = {}
    if restarted is None:
        for r in state.get("replicas") or []:
            if isinstance(r, dict) and isinstance(r.get("url"), str):
                try:
                    replica_stats[r["url"]] = engine_call(r["url"], token, "GET", "/internal/stats", timeout=5.0)
                except (httpx.HTTPError, ProvisionError):
                    pass  # a replica down now: its reads are counted at its next answer (or lost with it)
    now = utcnow()
    with db.sync_transaction() as s:
        # Locked: two overlapping passes must not both count the same requests against one cursor.
        c = s.get(Cluster, cluster_id, with_for_update=True)
        if c is None or c.status != Status.RUNNING.value:
            return "skipped"
        if restarted is not None:
            c.engine_url, c.engine_state = restarted.url, restarted.state
            c.status_reason = f"engine restarted at {now.isoformat(timespec='seconds')}"
        c.last_heartbeat_at = now
        c.vector_count = int(stats.get("vector_count", 0))
        c.storage_bytes = int(stats.get("bytes_on_disk", 0))
        record_sample(s, c, stats, now, replica_stats)
    return "restarted" if restarted is not None else "heartbeats"


def active_job_ids() -> set[str] | None:
    """Ids of the jobs live workers are executing now (their tasks' second argument), asked over Celery's
    broadcast; None when that cannot be known (eager, or a broker without broadcast)."""
    if celery_app.conf.task_always_eager or not str(celery_app.conf.broker_url).startswith("redis"):
        return None
    try:
        replies = celery_app.control.inspect(timeout=1.0).active() or {}
    except Exception:
        log.exception("reconcile: could not ask the workers what they run")
        return None
    ids: set[str] = set()
    for running in replies.values():
        for task in running or []:
            args = task.get("args")
            if isinstance(args, list | tuple) and len(args) >= 2:
                ids.add(str(args[1]))
    return ids


def redrive(cluster_id: str, in_flight: set[str] | None = None) -> int:
    """A transitional cluster whose job is not queued or running any more gets its task sent again. A job marked
    running counts as running while a live worker executes it (``in_flight``, when known) or, when that cannot be
    known, for RUNNING_TOO_LONG: a worker killed outright has its message redelivered by Redis only after the
    broker's visibility timeout (an hour), so acks-late alone would leave the cluster stuck that long."""
    db = get_database()
    with db.sync_transaction() as s:
        c = s.get(Cluster, cluster_id)
        if c is None or c.status not in {st.value for st in TRANSITIONAL}:
            return 0
        kind = next((k for k, (during, _) in KIND_STATUS.items() if during.value == c.status), None)
        if kind is None:
            return 0
        job = s.scalars(
            select(Job).where(Job.resource_id == c.id, Job.kind == kind).order_by(Job.created_at.desc()).limit(1)
        ).first()
        if job is None:
            return 0
        now = utcnow()
        if job.status == "running":
            if in_flight is not None:
                if job.id in in_flight:
                    return 0  # a live worker has it
            elif job.started_at is not None and job.started_at > now - RUNNING_TOO_LONG:
                return 0  # still being worked on, as far as can be told
        if job.status in ("succeeded", "failed"):
            job.status, job.finished_at, job.error = "queued", None, None
        job_id = job.id
    celery_app.send_task(kind, args=(cluster_id, job_id))
    return 1


def purge_deleted() -> int:
    """Object-store data of clusters deleted longer ago than VECTA_DELETED_RETENTION_DAYS is removed."""
    settings = get_settings()
    cutoff = utcnow() - dt.timedelta(days=settings.deleted_retention_days)
    db = get_database()
    with db.sync_transaction() as s:
        rows = s.scalars(
            select(Cluster).where(Cluster.status == Status.DELETED.value, Cluster.deleted_at < cutoff)
        ).all()
        todo = [(c.id, c) for c in rows if (c.engine_state or {}).get("snapshot_uri")]
    purged = 0
    if not todo:
        return 0
    store = open_object_store(settings.objects_uri)
    for cluster_id, _ in todo:
        for key in store.list_keys(f"clusters/{cluster_id}/"):
            store.delete(key)
        with db.sync_transaction() as s:
            c = s.get(Cluster, cluster_id)
            if c is not None:
                c.engine_state = {}
        purged += 1
    return purged


__all__ = ["LocalProvisioner", "reconcile"]

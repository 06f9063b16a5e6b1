"""The ``collection.import`` Celery task: validate the whole file, then upsert it to the engine in batches.

The job row is the import's state (``Job.params``): the source URI and format, ``rows_total`` once the file has
been validated, ``rows_done`` (records the engine acknowledged, counted from the start of the file) and a lease
(``lease_owner``, ``lease_until``) renewed while a worker works on it. A task delivered again after its worker
died waits for the lease to lapse, then resumes after the last acknowledged batch (upserts are idempotent by id, so
a batch sent but not recorded is harmless to send again). A delivery that finds another worker's live lease puts
itself back on the queue for later instead of importing twice at once.

Nothing is written to the engine before the whole file has passed validation; the import then goes through the
engine's own upsert route, so imported vectors are metered as write units like any upsert.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from typing import Any

import httpx
import numpy as np
import orjson
from sqlalchemy import select

from services.control_plane.clusters.models import Cluster, Job
from services.control_plane.clusters.state import Status
from services.control_plane.clusters.tasks import engine_token
from services.control_plane.imports import readers
from services.control_plane.imports.readers import Chunk, Schema
from services.control_plane.imports.settings import ImportSettings, import_settings
from services.control_plane.imports.source import Fetched, ImportFailed, check_uri, fetch
from services.core.celery_app import celery_app
from services.core.db import get_database, utcnow
from services.core.errors import VectaError

log = logging.getLogger(__name__)

KIND = "collection.import"


class LeaseLost(Exception):
    """Another delivery of the task took the job over (this one lost its lease): stop quietly."""


class EngineGone(Exception):
    """The engine could not be reached for longer than ``engine_retry_seconds``."""


STUCK_QUEUED = dt.timedelta(seconds=120)  # a queued import no worker has claimed for this long lost its message


@celery_app.task(name=KIND, acks_late=True, ignore_result=True)
def run_import(job_id: str) -> str:
    return Importer(job_id, import_settings()).run()


@celery_app.task(name="imports.sweep", ignore_result=True)
def sweep() -> int:
    """Send again the imports whose task message was lost (the broker restarted before a worker took it): queued
    and unclaimed for STUCK_QUEUED, or running with a lapsed lease (its worker died and its message is not coming
    back soon: Redis redelivers unacknowledged messages only after its visibility timeout). A duplicate delivery is
    harmless: the lease lets one worker import at a time, and a finished job is left alone."""
    now = utcnow()
    todo: list[str] = []
    with get_database().sync_transaction() as s:
        for job in s.scalars(select(Job).where(Job.kind == KIND, Job.status.in_(("queued", "running")))):
            until = (job.params or {}).get("lease_until")
            lapsed = until is None or dt.datetime.fromisoformat(until) <= now
            if job.status == "running" and lapsed and until is not None:
                todo.append(job.id)
            elif job.status == "queued" and lapsed and job.created_at <= now - STUCK_QUEUED:
                todo.append(job.id)
    for job_id in todo:
        log.warning("import %s: sending its task again (its message was lost or its worker died)", job_id)
        celery_app.send_task(KIND, args=(job_id,))
    return len(todo)


class Importer:
    def __init__(self, job_id: str, settings: ImportSettings) -> None:
        self.job_id = job_id
        self.settings = settings
        self.owner = uuid.uuid4().hex
        self.db = get_database()
        self.params: dict[str, Any] = {}
        self.cluster_id = ""
        self.url = ""
        self.token = ""
        self.last_renewal = 0.0
        self.http: httpx.Client | None = None

    # -- job bookkeeping ----------------------------------------------------------------------------------
    def claim(self) -> str | None:
        """Take the job (None), or say why not ("missing", a final status, "busy" when another worker holds it)."""
        now = utcnow()
        with self.db.sync_transaction() as s:
            job = s.get(Job, self.job_id, with_for_update=True)
            if job is None or job.kind != KIND:
                return "missing"
            if job.status in ("succeeded", "failed"):
                return job.status
            p = dict(job.params or {})
            until = p.get("lease_until")
            if until and dt.datetime.fromisoformat(until) > now and p.get("lease_owner") != self.owner:
                return "busy"
            self.cluster_id = str(p.get("cluster_id", job.resource_id))
            cluster = s.get(Cluster, self.cluster_id)
            job.status, job.started_at, job.attempts = "running", job.started_at or now, job.attempts + 1
            p["lease_owner"], p["lease_until"] = self.owner, self._lease_end(now)
            job.params = p
            self.params = p
            if cluster is None or cluster.status == Status.DELETED.value:
                self._finish(job, error="the cluster was deleted")
                return "failed"
            if cluster.status != Status.RUNNING.value or not cluster.engine_url:
                self._finish(job, error=f"the cluster is {cluster.status}, not RUNNING; start the import again later")
                return "failed"
            self.url = cluster.engine_url
            self.token = engine_token(cluster)
        self.last_renewal = time.monotonic()
        return None

    def _lease_end(self, now: dt.datetime) -> str:
        return (now + dt.timedelta(seconds=self.settings.lease_seconds)).isoformat()

    def save(self, *, force: bool = True, **updates: Any) -> None:
        """Record progress (and renew the lease) if this worker still owns the job; LeaseLost otherwise."""
        if not force and time.monotonic() - self.last_renewal < self.settings.lease_seconds / 4:
            return
        with self.db.sync_transaction() as s:
            job = s.get(Job, self.job_id, with_for_update=True)
            if job is None or job.status != "running" or (job.params or {}).get("lease_owner") != self.owner:
                raise LeaseLost()
            p = {**job.params, **updates, "lease_until": self._lease_end(utcnow())}
            job.params = p
            self.params = p
            total = p.get("rows_total")
            if total:
                job.progress = min(1.0, int(p.get("rows_done", 0)) / int(total))
        self.last_renewal = time.monotonic()

    def _finish(self, job: Job, *, error: str | None) -> None:
        p = {k: v for k, v in (job.params or {}).items() if k not in ("lease_owner", "lease_until")}
        job.params = p
        job.finished_at = utcnow()
        if error is None:
            job.status, job.progress, job.error = "succeeded", 1.0, None
        else:
            job.status, job.error = "failed", error[:1000]

    def finish(self, error: str | None = None) -> str:
        with self.db.sync_transaction() as s:
            job = s.get(Job, self.job_id, with_for_update=True)
            if job is None or job.status != "running" or (job.params or {}).get("lease_owner") != self.owner:
                return "lost"
            self._finish(job, error=error)
            return job.status

    # -- the import ----------------------------------------------------------------------------------------
    def run(self) -> str:
        outcome = self.claim()
        if outcome == "busy":
            if not celery_app.conf.task_always_eager:  # look again once the other worker's lease may have lapsed
                celery_app.send_task(KIND, args=(self.job_id,), countdown=self.settings.lease_seconds)
            return "busy"
        if outcome is not None:
            return outcome
        self.http = httpx.Client(timeout=self.settings.engine_timeout_seconds)
        try:
            self._run()
        except ImportFailed as exc:
            return self.finish(str(exc))
        except LeaseLost:
            log.info("import %s: another worker took the job over", self.job_id)
            return "lost"
        except EngineGone as exc:
            return self.finish(f"{exc}; {self._done_note()}; start the import again once the cluster is RUNNING")
        except Exception as exc:
            log.exception("import %s failed", self.job_id)
            return self.finish(f"internal error ({type(exc).__name__}); {self._done_note()}; start the import again")
        finally:
            self.http.close()
        return self.finish()

    def _done_note(self) -> str:
        done = int(self.params.get("rows_done", 0))
        return f"{done} records were imported before it stopped" if done else "nothing was imported"

    def _run(self) -> None:
        p = self.params
        schema = Schema.from_describe(self._describe(str(p["collection"])))
        try:
            target = check_uri(p["uri"], self.settings)  # the rules may have changed since the request
        except VectaError as exc:
            raise ImportFailed(exc.detail) from None
        with fetch(target, self.settings) as obj:
            fmt = p.get("format") or readers.detect_format(target.name, _head(obj))
            validated = p.get("validated_schema") == schema.key() and p.get("source_version") == obj.version
            if p.get("rows_total") is not None and p.get("source_version") != obj.version:
                raise ImportFailed(f"{target.uri} changed since the import started; start a new import")
            if not validated:
                total = self._validate(obj, fmt, schema)
                self.save(rows_total=total, format=fmt, source_version=obj.version, validated_schema=schema.key())
            self._upload(obj, fmt, schema)

    def _validate(self, obj: Fetched, fmt: str, schema: Schema) -> int:
        total = 0
        digests: list[np.ndarray] = []
        for chunk in readers.read_chunks(obj.path, fmt, schema, self.settings.batch_rows):
            total += len(chunk)
            if total > self.settings.max_rows:
                raise ImportFailed(
                    f"the file has more than {self.settings.max_rows} records (VECTA_IMPORT_MAX_ROWS); "
                    "split it into several imports"
                )
            digests.append(readers.id_digests(chunk.ids))
            self.save(force=False)
        if total == 0:
            raise ImportFailed("the file holds no records")
        suspects = readers.duplicate_digests(digests)
        if suspects:
            chunks = readers.read_chunks(obj.path, fmt, schema, self.settings.batch_rows)
            message = readers.find_duplicate(chunks, suspects)
            if message:
                raise ImportFailed(message)
        return total

    def _upload(self, obj: Fetched, fmt: str, schema: Schema) -> None:
        done = int(self.params.get("rows_done", 0))
        parts: list[bytes] = []
        size = 0
        upto = done
        for chunk in readers.read_chunks(obj.path, fmt, schema, self.settings.batch_rows):
            if chunk.first + len(chunk) <= done:
                continue
            for k in range(max(0, done - chunk.first), len(chunk)):
                rec = _record(chunk, k)
                parts.append(rec)
                size += len(rec) + 1
                upto = chunk.first + k + 1
                if len(parts) >= self.settings.batch_rows or size >= self.settings.batch_bytes:
                    self._send(parts, schema)
                    self.save(rows_done=upto)
                    parts, size = [], 0
        if parts:
            self._send(parts, schema)
            self.save(rows_done=upto)
        self.save(rows_done=upto, rows_imported=upto)

    # -- engine calls ----------------------------------------------------------------------------------------
    def _describe(self, name: str) -> dict[str, Any]:
        r = self._engine("GET", f"/v1/collections/{name}", None)
        if r.status_code == 404:
            raise ImportFailed(f"collection {name!r} no longer exists in this cluster")
        if r.status_code >= 400:
            raise ImportFailed(f"the engine answered {r.status_code} describing collection {name!r}")
        doc: dict[str, Any] = r.json()
        return doc

    def _send(self, parts: list[bytes], schema: Schema) -> None:
        body = b'{"records":[' + b",".join(parts) + b"]}"
        name = str(self.params["collection"])
        r = self._engine("POST", f"/v1/collections/{name}/upsert", body)
        if r.status_code >= 400:
            try:
                detail = str(r.json().get("detail", ""))
            except ValueError:
                detail = r.text[:300]
            raise ImportFailed(f"the engine refused a batch ({r.status_code}): {detail}; {self._done_note()}")

    def _engine(self, method: str, path: str, body: bytes | None) -> httpx.Response:
        """One engine call; connection failures and 503s are retried (the engine may be restarting: its address
        is looked up again) for up to ``engine_retry_seconds``."""
        assert self.http is not None
        deadline = time.monotonic() + self.settings.engine_retry_seconds
        delay = 0.5
        while True:
            headers = {"authorization": f"Bearer {self.token}", "content-type": "application/json"}
            try:
                r = self.http.request(method, f"{self.url}{path}", content=body, headers=headers)
                if r.status_code not in (502, 503, 504):
                    return r
                failure = f"the engine answered {r.status_code}"
            except httpx.TransportError as exc:
                failure = f"the cluster's engine is unreachable ({type(exc).__name__})"
            if time.monotonic() + delay > deadline:
                raise EngineGone(failure)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            self._refresh_engine()

    def _refresh_engine(self) -> None:
        self.save()  # keeps the lease while waiting; stops if another worker took over
        with self.db.sync_transaction() as s:
            c = s.get(Cluster, self.cluster_id)
            if c is None or c.status == Status.DELETED.value:
                raise ImportFailed("the cluster was deleted during the import")
            if c.engine_url:
                self.url = c.engine_url


def _record(chunk: Chunk, k: int) -> bytes:
    rec: dict[str, Any] = {"id": chunk.ids[k], "vector": chunk.vectors[k]}
    if chunk.metas[k]:
        rec["metadata"] = chunk.metas[k]
    if chunk.texts[k] is not None:
        rec["text"] = chunk.texts[k]
    return orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY)


def _head(obj: Fetched) -> bytes:
    with open(obj.path, "rb") as fh:
        return fh.read(16)


__all__ = ["KIND", "Importer", "run_import"]

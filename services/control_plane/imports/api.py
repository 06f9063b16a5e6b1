"""The data-plane edge's imports routes (the edge has already authenticated, authorized ``data:write`` for POST or
``data:read`` for GET on the cluster, rate-limited, and checked the cluster is RUNNING):

- ``POST /v1/clusters/{id}/collections/{name}/imports`` ``{uri, format?}`` (``Idempotency-Key`` honoured) → 202
  with the import (its job: ``id`` = ``job_id``), after checking the URI and that the collection exists;
- ``GET /v1/clusters/{id}/collections/{name}/imports/{job_id}`` → the import with its counts.

The work is the ``collection.import`` Celery task (``tasks.py``), sent after the job row has committed.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import anyio
import orjson
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import Response

from services.auth.subject import AuthSubject
from services.control_plane.clusters import service as clusters
from services.control_plane.clusters.models import Job
from services.control_plane.imports import tasks as _tasks  # registers the task here too (eager mode runs it inline)
from services.control_plane.imports.readers import FORMATS
from services.control_plane.imports.settings import import_settings
from services.control_plane.imports.source import check_uri
from services.core import audit
from services.core.celery_app import send
from services.core.db import Database
from services.core.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from services.core.ids import new_id

KIND = _tasks.KIND
MAX_BODY = 16 << 10
ALLOWED_KEYS = {"uri", "format"}


class Route(Protocol):
    """What the edge knows of the cluster (its ``ClusterRoute``)."""

    @property
    def id(self) -> str: ...

    @property
    def org_id(self) -> str: ...

    @property
    def engine_url(self) -> str | None: ...

    @property
    def token(self) -> str: ...


def match(rest: str) -> tuple[str, str | None] | None:
    """``(collection, job_id or None)`` when ``rest`` (the path after ``/collections``) is an imports route."""
    parts = rest.strip("/").split("/")
    if len(parts) in (2, 3) and parts[1] == "imports" and parts[0]:
        return parts[0], (parts[2] if len(parts) == 3 else None)
    return None


def import_out(job: Job) -> dict[str, Any]:
    p = job.params or {}
    return {
        "id": job.id,
        "job_id": job.id,
        "kind": job.kind,
        "cluster_id": p.get("cluster_id", job.resource_id),
        "collection": p.get("collection"),
        "uri": p.get("uri"),
        "format": p.get("format"),
        "status": job.status,
        "progress": job.progress,
        "rows_total": p.get("rows_total"),
        "rows_imported": int(p.get("rows_done", 0)),
        "error": job.error,
        "created_at": job.created_at.isoformat().replace("+00:00", "Z"),
        "started_at": job.started_at.isoformat().replace("+00:00", "Z") if job.started_at else None,
        "finished_at": job.finished_at.isoformat().replace("+00:00", "Z") if job.finished_at else None,
    }


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def handle(
    request: Request,
    subject: AuthSubject,
    route: Route,
    target: tuple[str, str | None],
    db: Database,
    http: aiohttp.ClientSession,
) -> Response:
    name, job_id = target
    if job_id is not None:
        if request.method != "GET":
            raise MethodNotAllowed(f"{request.method} is not allowed on an import; use GET", code="method_not_allowed")
        async with db.session() as session:
            job = await session.get(Job, job_id)
        p = job.params if job is not None else {}
        if job is None or job.kind != KIND or p.get("cluster_id") != route.id or p.get("collection") != name:
            raise NotFound(f"import {job_id} not found for collection {name!r}", code="import_not_found")
        return _json(200, import_out(job))
    if request.method != "POST":
        raise MethodNotAllowed(
            f"{request.method} is not allowed here: POST starts an import, GET …/imports/{{job_id}} shows one",
            code="method_not_allowed",
        )
    body = await _read_body(request)
    uri, fmt = _parse(body)
    check_uri(uri, import_settings())
    idem_key = request.headers.get("idempotency-key") or None
    if idem_key is not None and len(idem_key) > 200:
        raise BadRequest("Idempotency-Key is longer than 200 characters", code="validation_error")
    digest = clusters.request_hash(request.url.path, {"uri": uri, "format": fmt})
    async with db.session() as session:
        replayed = await clusters.replay(session, subject, idem_key, digest)
    if replayed is not None:
        return _json(replayed[0], replayed[1])
    await _check_collection(http, route, name)
    job = Job(
        id=new_id("job"), org_id=route.org_id, kind=KIND, resource_id=route.id,
        params={"cluster_id": route.id, "collection": name, "uri": uri, "format": fmt, "rows_done": 0},
    )  # fmt: skip
    out: dict[str, Any] = {}
    try:
        async with db.transaction() as session:
            session.add(job)
            await session.flush()
            out = import_out(job)
            clusters.remember(session, subject, idem_key, digest, 202, out)
            audit.record(
                session, action=KIND, org_id=route.org_id, actor_type=subject.kind, actor_id=subject.id,
                target_type="cluster", target_id=route.id,
                details={"collection": name, "uri": uri, "job_id": job.id},
            )  # fmt: skip
    except IntegrityError:  # the same Idempotency-Key raced this request and won: answer what it answered
        async with db.session() as session:
            replayed = await clusters.replay(session, subject, idem_key, digest)
        if replayed is None:
            raise
        return _json(replayed[0], replayed[1])
    await anyio.to_thread.run_sync(send, KIND, (job.id,), {})
    return _json(202, out)


async def _read_body(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise PayloadTooLarge(f"an import request body is at most {MAX_BODY} bytes", code="payload_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> tuple[str, str | None]:
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise BadRequest('body must be a JSON object {"uri": …}', code="validation_error")
    unknown = set(doc) - ALLOWED_KEYS
    if unknown:
        raise BadRequest(f"body: unknown field {sorted(unknown)[0]!r}", code="unknown_field")
    fmt = doc.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise BadRequest(f"body.format must be one of {list(FORMATS)}", code="validation_error")
    uri = doc.get("uri")
    if not isinstance(uri, str) or not uri.strip():
        raise BadRequest("body.uri is required: s3://bucket/key or a file:// URI inside the object store",
                         code="validation_error")  # fmt: skip
    return uri.strip(), fmt


async def _check_collection(http: aiohttp.ClientSession, route: Route, name: str) -> None:
    """404 (the engine's own problem) unless the collection exists on the cluster's engine."""
    url = f"{route.engine_url}/v1/collections/{quote(name, safe='')}"
    try:
        async with http.get(url, headers={"authorization": f"Bearer {route.token}"}) as resp:
            if resp.status == 200:
                return
            doc = await resp.json(content_type=None) if resp.status < 500 else {}
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ServiceUnavailable(
            f"cluster {route.id}'s engine is not reachable; retry shortly", retry_after=2, code="engine_unavailable"
        ) from exc
    detail = str(doc.get("detail") or "") if isinstance(doc, dict) else ""
    if resp.status == 404:
        raise NotFound(detail or f"collection {name!r} not found", code="collection_not_found")
    if resp.status < 500 and detail:
        raise BadRequest(detail, code=str(doc.get("code") or "bad_request"))
    raise ServiceUnavailable(
        f"cluster {route.id}'s engine answered {resp.status}; retry shortly", retry_after=2, code="engine_unavailable"
    )


def openapi_paths(prefix: str) -> dict[str, Any]:
    """OpenAPI operations for the imports routes (merged by the edge into the data-plane paths)."""
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    errs = {str(c): {"description": d, "content": problem} for c, d in (
        (400, "Bad Request"), (401, "Unauthorized"), (403, "Forbidden"), (404, "Not Found"),
        (409, "Idempotency-Key reused with another body"), (413, "Payload Too Large"), (429, "Too Many Requests"),
        (503, "Cluster not ready (Retry-After)"))}  # fmt: skip
    ts = {"type": "string", "format": "date-time"}
    out = {
        "type": "object",
        "required": ["id", "job_id", "kind", "cluster_id", "collection", "uri", "status", "progress"],
        "properties": {
            "id": {"type": "string"}, "job_id": {"type": "string"}, "kind": {"type": "string"},
            "cluster_id": {"type": "string"}, "collection": {"type": "string"}, "uri": {"type": "string"},
            "format": {"type": ["string", "null"], "enum": [*FORMATS, None]},
            "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed"]},
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "rows_total": {"type": ["integer", "null"]}, "rows_imported": {"type": "integer"},
            "error": {"type": ["string", "null"]}, "created_at": ts,
            "started_at": {**ts, "type": ["string", "null"]}, "finished_at": {**ts, "type": ["string", "null"]},
        },
    }  # fmt: skip
    body = {
        "type": "object",
        "required": ["uri"],
        "additionalProperties": False,
        "properties": {
            "uri": {"type": "string", "maxLength": 2048, "description": "s3://bucket/key, or file:///… inside the "
                    "object store when it is a local folder"},
            "format": {"type": "string", "enum": list(FORMATS), "description": "default: from the file"},
        },
    }  # fmt: skip
    cid = {"name": "cluster_id", "in": "path", "required": True, "schema": {"type": "string"}}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    job = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    idem = {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 200}}
    ok = {"application/json": {"schema": out}}
    return {
        f"{prefix}/{{name}}/imports": {
            "parameters": [cid, name],
            "post": {
                "tags": ["data plane"],
                "summary": "Import records from an object (JSON Lines, Parquet, NumPy)",
                "parameters": [idem],
                "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                "responses": {"202": {"description": "Accepted: the import job", "content": ok}, **errs},
            },
        },
        f"{prefix}/{{name}}/imports/{{job_id}}": {
            "parameters": [cid, name, job],
            "get": {
                "tags": ["data plane"],
                "summary": "Describe an import",
                "responses": {"200": {"description": "The import", "content": ok}, **errs},
            },
        },
    }

"""The data-plane edge: ``/v1/clusters/{cluster_id}/collections…`` → the cluster's engine.

Per request: authenticate the bearer (cached, see ``Authenticator``), resolve the cluster (cached ≤ 1 s: org,
project, status, engine address, engine token), authorize the privilege the route needs on that cluster, apply
the per-key and per-cluster rate limits, then forward the body untouched over a pooled HTTP client and stream the
engine's answer (success or problem document) back as it is. A write whose body arrives in several pieces with a
Content-Length (a large upsert) is streamed to the engine as it arrives; other bodies are read whole first. Reads
are retried once on a connection error; writes never are (unless the connection was never made). A cluster that
is not RUNNING answers 503 with Retry-After; a SUSPENDED serverless cluster is resumed by its first data-plane call.

Raw Starlette routes rather than FastAPI endpoints keep the hot path free of dependency resolution and body
parsing; their OpenAPI description is added by ``openapi_paths()``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from services.api.edge_client import (
    Connection,
    EngineClient,
    EngineResponse,
    EngineUnreachable,
    RequestBodyError,
)
from services.api.middleware import observe, request_id_from
from services.auth.authenticate import Authenticator
from services.auth.crypto import token_hash
from services.auth.subject import AuthSubject
from services.control_plane.clusters import tasks as cluster_tasks
from services.control_plane.clusters.models import Cluster, Job
from services.control_plane.clusters.state import KEY_UNAVAILABLE_REASON as KEY_SUSPENDED
from services.control_plane.clusters.state import Status, can
from services.control_plane.imports import api as imports_api
from services.core import audit
from services.core.celery_app import send
from services.core.db import Database
from services.core.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    VectaError,
    problem_for_status,
)
from services.core.ids import new_id
from services.core.kv import KV
from services.core.request_context import RequestContext, reset_request, set_request
from services.core.settings import get_settings

READ_ACTIONS = {"search": "data:read", "hybrid-search": "data:read", "fetch": "data:read", "query": "data:read",
                "count": "data:read"}  # fmt: skip
WRITE_ACTIONS = {"upsert": "data:write", "delete": "data:write", "imports": "data:write"}
FAST_ACTIONS = {k.encode(): v for k, v in READ_ACTIONS.items()}  # reads: safe to send again on the usual path
PROBLEM_CONTENT_TYPE_B = PROBLEM_CONTENT_TYPE.encode()
REPLICA_DOWN_SECONDS = 2.0  # a read replica that failed a read gets no reads for this long
log = logging.getLogger(__name__)


def _readers(primary: str | None, state: Any) -> tuple[str, ...]:
    """The members that serve reads: the primary and the read replicas recorded by the provisioner."""
    replicas = (state or {}).get("replicas") if isinstance(state, dict) else None
    if not primary or not replicas:
        return ()
    urls = [r["url"] for r in replicas if isinstance(r, dict) and isinstance(r.get("url"), str)]
    return (primary, *urls) if urls else ()


@dataclass(slots=True)
class FastTarget:
    route: ClusterRoute
    member: str
    conn: Connection
    target: bytes
    headers: list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class ClusterRoute:
    id: str
    org_id: str
    project_id: str
    plan: str
    status: str
    engine_url: str | None
    token: str
    readers: tuple[str, ...] = ()  # the primary and its read replicas: where idempotent reads may go
    status_reason: str | None = None


class Edge:
    def __init__(self, db: Database, authenticator: Authenticator, kv: KV) -> None:
        settings = get_settings()
        self.db = db
        self.authenticator = authenticator
        self.kv = kv
        self.max_body = settings.dataplane_max_body_bytes
        self.rate_key = settings.dataplane_rate_per_key
        self.rate_cluster = settings.dataplane_rate_per_cluster
        # Forwarding goes through a lean HTTP/1.1 client of our own (httptools): aiohttp cost ~220 µs of CPU a
        # forwarded search, httpx ~1.7 ms (bench/edge_cpu.py, docs/decisions/005-edge-http-client.md).
        self.engine = EngineClient(timeout=settings.dataplane_timeout_seconds, connect_timeout=2.0)
        # aiohttp for the control plane's own engine calls off the hot path (imports).
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512, limit_per_host=256, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=settings.dataplane_timeout_seconds, sock_connect=2.0),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        self._routes: dict[str, tuple[float, ClusterRoute | None]] = {}
        self._turn = 0  # round-robin over a cluster's readers
        self._down: dict[str, float] = {}  # reader URL -> monotonic time until which it is skipped
        self.fast_forwarded = 0  # requests sent by the fast lane (services/api/fast_lane.py)
        self._refreshing: set[str] = set()  # clusters whose route is being looked up again in the background
        # (subject, cluster) -> the subject's privileges there, for the fast lane (a subject is immutable; a new
        # verification makes a new one)
        self._privileges: dict[tuple[int, str], tuple[AuthSubject, frozenset[str]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        await self.engine.close()
        await self.session.close()

    # -- the fast lane (services/api/fast_lane.py) --------------------------------------------------------
    def fast_target(
        self, url: bytes, headers: list[tuple[bytes, bytes]], body: bytes, memo: list[bytes | str] | None = None
    ) -> FastTarget | None:
        """Everything the fast lane needs to forward one read now, or None when any of it is not at hand
        without waiting or is not plainly allowed: a read (``FAST_ACTIONS``) on a plain collection name, a bearer
        whose verification is cached, a cached RUNNING route, the privilege, the rate limits (counted without
        waiting: ``KV.incr_nowait``), an idle connection to the engine. A None sends the request down
        the usual path (``dispatch``), which gives every error its answer: the fast lane never answers one.
        ``memo``: the connection's last ``[Authorization header, its token hash]``, reused while the client sends
        the same header (the hash is an HMAC: a few µs, more when run cold)."""
        kv = self.kv
        parts = url.split(b"/")  # b"", v1, clusters, {id}, collections, {name}, {action}
        if len(parts) != 7 or parts[4] != b"collections" or len(body) > self.max_body:
            return None
        privilege = FAST_ACTIONS.get(parts[6])
        if privilege is None or not _PLAIN_NAME.match(parts[5]):
            return None
        authorization = content_type = None
        for name, value in headers:
            if name == b"authorization":
                authorization = value
            elif name == b"content-type":
                content_type = value
        if authorization is None or authorization[:7].lower() != b"bearer ":
            return None
        token = authorization[7:].strip().decode("latin-1")
        if memo is not None and memo and memo[0] == authorization:
            subject = self.authenticator.cached(token, str(memo[1]))
        else:
            cache_key = token_hash(token)
            if memo is not None:
                memo[:] = [authorization, cache_key]
            subject = self.authenticator.cached(token, cache_key)
        if subject is None:
            return None
        cluster_id = parts[3].decode("latin-1")
        hit = self._routes.get(cluster_id)
        now = time.monotonic()
        if hit is None or hit[0] <= now:
            return None
        if hit[0] - now < 0.5:
            self._refresh_route(cluster_id)
        route = hit[1]
        if route is None or route.status != "RUNNING" or not route.engine_url:
            return None
        held = self._privileges.get((id(subject), route.id))
        if held is None or held[0] is not subject:  # (the subject itself is kept: its id is never reused meanwhile)
            if len(self._privileges) > 10_000:
                self._privileges.clear()
            held = (subject, subject.cluster_privileges(route.org_id, route.project_id, route.id))
            self._privileges[(id(subject), route.id)] = held
        if privilege not in held[1]:
            return None
        member = self._reader(route) if route.readers else route.engine_url
        assert member is not None
        conn = self.engine.take(member)
        if conn is None:
            return None
        # Counted once the request can go: over a limit, it is declined and the usual path answers 429 (counting
        # it again in a window that is already over the limit changes nothing).
        window = int(time.time())
        over = kv.incr_nowait(f"rl:c:{route.id}:{window}", 2) > self.rate_cluster
        if subject.kind == "api_key":
            over = kv.incr_nowait(f"rl:k:{subject.id}:{window}", 2) > self.rate_key or over
        if over:
            self.engine.give_back(conn)
            return None
        engine_headers = [
            (b"authorization", b"Bearer " + route.token.encode()),
            (b"x-vecta-public-prefix", b"/v1/clusters/" + route.id.encode()),
            (b"content-type", content_type or b"application/json"),
        ]
        target = b"/v1/collections/" + parts[5] + b"/" + parts[6]
        self.fast_forwarded += 1
        return FastTarget(route, member, conn, target, engine_headers)

    def fast_failed(self, target: FastTarget, exc: BaseException | None) -> None:
        """A fast-lane forward failed (``exc``) or met a read replica not in sync (None): what the usual path
        does about it, before the request goes down that path."""
        if target.member != target.route.engine_url:
            self._replica_failed(target.member, target.route)
        elif isinstance(exc, EngineUnreachable):
            self.invalidate(target.route.id)

    def invalidate(self, cluster_id: str | None = None) -> None:
        if cluster_id is None:
            self._routes.clear()
        else:
            self._routes.pop(cluster_id, None)

    async def resolve(self, cluster_id: str) -> ClusterRoute | None:
        now = time.monotonic()
        hit = self._routes.get(cluster_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        return await self._lookup(cluster_id)

    async def _lookup(self, cluster_id: str) -> ClusterRoute | None:
        now = time.monotonic()
        route = None
        async with self.db.session() as session:
            c = await session.get(Cluster, cluster_id)
            if c is not None and c.status != Status.DELETED.value:
                token = cluster_tasks.engine_token(c) if c.engine_url else ""
                route = ClusterRoute(c.id, c.org_id, c.project_id, c.plan, c.status, c.engine_url, token,
                                     _readers(c.engine_url, c.engine_state), c.status_reason)  # fmt: skip
        if len(self._routes) > 10_000:
            self._routes.clear()
        # A cluster on its way to RUNNING (resuming, creating) is looked at again soon: requests retried while
        # it resumes (~1 s) reach it as soon as it is RUNNING, not up to a second later.
        ttl = 1.0 if route is None or route.status == Status.RUNNING.value else 0.1
        self._routes[cluster_id] = (now + ttl, route)
        return route

    def _refresh_route(self, cluster_id: str) -> None:
        """Look the route up again in the background (the fast lane, half-way through its TTL): a cluster in
        steady use keeps its route cached, and no request waits for the database. No entry outlives its TTL."""
        if cluster_id in self._refreshing:
            return
        self._refreshing.add(cluster_id)
        task = asyncio.get_running_loop().create_task(self._lookup_quietly(cluster_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup_quietly(self, cluster_id: str) -> None:
        try:
            await self._lookup(cluster_id)
        except Exception:  # the database is unavailable: the entry expires, the usual path answers
            log.exception("could not look cluster %s up again", cluster_id)
        finally:
            self._refreshing.discard(cluster_id)

    async def rate_limit(self, subject: AuthSubject, cluster_id: str) -> None:
        window = int(time.time())
        checks = [(f"rl:c:{cluster_id}:{window}", self.rate_cluster, "cluster")]
        if subject.kind == "api_key":
            checks.append((f"rl:k:{subject.id}:{window}", self.rate_key, "API key"))
        for key, limit, what in checks:
            if await self.kv.incr(key, 2) > limit:
                raise TooManyRequests(f"rate limit of {limit:g} requests/s per {what} exceeded", retry_after=1)

    async def resume_on_call(self, route: ClusterRoute) -> None:
        """The first data-plane call to a suspended serverless cluster starts its resumption."""
        async with self.db.transaction() as session:
            c = await session.get(Cluster, route.id, with_for_update=True)
            if c is None or c.status != Status.SUSPENDED.value or not can(c.status, Status.RESUMING):
                return
            c.status, c.status_reason = Status.RESUMING.value, "resumed by a data-plane request"
            job = Job(id=new_id("job"), org_id=c.org_id, kind="cluster.resume", resource_id=c.id, params={})
            session.add(job)
            audit.record(
                session, action="cluster.resume", org_id=c.org_id, actor_type="system", actor_id=None,
                target_type="cluster", target_id=c.id, details={"trigger": "data-plane request"},
            )  # fmt: skip
        self.invalidate(route.id)
        await anyio.to_thread.run_sync(send, "cluster.resume", (route.id, job.id), {})

    async def dispatch(self, scope: Scope, receive: Receive, send: Send, cluster_id: str, rest: str) -> None:
        """Serve one data-plane request at the ASGI level, ahead of the FastAPI app and its middleware (see
        ``VectaAPI`` in services/api/app.py). It keeps what that middleware gives every request, cheaply: the
        request context (id, client address) for audit records and logs, ``X-Request-Id`` on the answer, the
        Prometheus request metrics by route template, problem+json for unexpected errors."""
        started = time.perf_counter()
        authorization = content_type = content_length = rid = user_agent = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length":
                content_length = value
            elif name == b"x-request-id":
                rid = value
            elif name == b"user-agent":
                user_agent = value
        request_id = request_id_from(rid)
        client = scope.get("client")
        token = set_request(
            RequestContext(
                request_id=request_id,
                ip=client[0] if client else None,
                user_agent=user_agent.decode("latin-1")[:300] if user_agent is not None else None,
            )
        )
        scope["path_params"] = {"cluster_id": cluster_id, "rest": rest}
        template = scope["vecta.route"] = DATAPLANE_PREFIX + ("{rest}" if rest else "")
        rid_header = (b"x-request-id", request_id.encode())
        status = 500
        started_response = False
        try:
            try:
                answer = await self._serve(
                    scope, receive, cluster_id, rest, authorization, content_type, content_length
                )
            except VectaError as exc:
                problem = exc.problem(problem_instance(scope))
                status = problem["status"]
                headers = [(b"content-type", PROBLEM_CONTENT_TYPE_B), rid_header]
                headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
                started_response = True
                await _send_whole(send, status, headers, orjson.dumps(problem))
                return
            if isinstance(answer, Response):  # served by the control plane (imports)
                status = answer.status_code
                answer.raw_headers.append(rid_header)
                started_response = True
                await answer(scope, receive, send)
                return
            status = answer.status
            headers = answer.headers
            headers.append(rid_header)
            started_response = True
            if answer.body is not None:
                await _send_whole(send, status, headers, answer.body)
                return
            await send({"type": "http.response.start", "status": status, "headers": headers})
            async for chunk in answer.stream():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except _ClientGone:
            status = 499  # the client left before its request was read: nobody to answer
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], template)
            if started_response:
                raise  # the answer is half sent: the server closes the connection
            status = 500
            body = orjson.dumps(
                problem_for_status(500, "an internal error occurred; it has been logged", "internal_error")
            )
            await _send_whole(send, 500, [(b"content-type", PROBLEM_CONTENT_TYPE_B), rid_header], body)
        finally:
            reset_request(token)
            observe(scope["method"], template, status, time.perf_counter() - started)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        cluster_id: str,
        rest: str,
        authorization: bytes | None,
        content_type: bytes | None,
        content_length: bytes | None,
    ) -> EngineResponse | Response:
        """Authenticate, resolve, authorize, rate-limit, then forward to the engine (or run an import)."""
        scheme, _, bearer = (authorization or b"").decode("latin-1").partition(" ")
        bearer = bearer.strip()
        if scheme.lower() != "bearer" or not bearer:
            raise Unauthorized("missing bearer token", code="missing_credentials")
        subject = await self.authenticator.authenticate(bearer)
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["subject"] = subject  # request.state.subject, as for the rest of the API
        method: str = scope["method"]
        privilege, retry_ok = self._privilege(method, rest)
        route = await self.resolve(cluster_id)
        if route is None:
            raise NotFound(f"cluster {cluster_id} not found", code="cluster_not_found")
        subject.require_cluster(route.org_id, route.project_id, route.id, privilege)
        await self.rate_limit(subject, route.id)
        await self._require_running(route)
        if "/imports" in rest and (target := imports_api.match(rest)) is not None:  # run by the control plane
            return await imports_api.handle(Request(scope, receive), subject, route, target, self.db, self.session)
        length = int(content_length) if content_length is not None and content_length.isdigit() else None
        if length is not None and length > self.max_body:
            raise PayloadTooLarge(f"request body exceeds {self.max_body} bytes", code="payload_too_large")
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        first: bytes = message.get("body", b"")
        body: bytes | list[bytes] = first
        stream: AsyncIterator[bytes] | None = None
        if len(first) > self.max_body:
            raise PayloadTooLarge(f"request body exceeds {self.max_body} bytes", code="payload_too_large")
        if message.get("more_body", False):
            if length is not None and not retry_ok:
                # A write arriving in pieces with a known length (a large upsert): streamed to the engine as it
                # comes, so the engine reads it while the client still sends it. Never retried once begun; the
                # client writes exactly `length` bytes or closes the engine connection. Reads (retried, spread
                # over replicas) and chunked bodies are read whole first.
                stream = _body_pieces(first, receive)
            else:
                body = await self._read_body(receive, first)
        # The engine names the public path (not its own) as the `instance` of the problems it answers.
        headers = [(b"x-vecta-public-prefix", f"/v1/clusters/{route.id}".encode())]
        if body or length:
            headers.append((b"content-type", content_type or b"application/json"))
        path = rest if _PLAIN_PATH.match(rest) else quote(rest, safe="/:@!$&'()*+,;=")
        query: bytes = scope.get("query_string", b"")
        engine_target = f"/v1/collections{path}".encode() + (b"?" + query if query else b"")
        member = self._reader(route) if retry_ok and route.readers else route.engine_url
        for attempt in (0, 1):
            assert route is not None and member is not None
            auth = [(b"authorization", f"Bearer {route.token}".encode())]
            try:
                if stream is None:
                    resp = await self.engine.request(method, member, engine_target, auth + headers, body)
                else:
                    assert length is not None
                    resp = await self.engine.request_streamed(
                        method, member, engine_target, auth + headers, length, stream
                    )
                if resp.status == 503 and member != route.engine_url and attempt == 0:
                    resp.close()  # a read replica not (yet) in sync: skip it for a while, read from the primary
                    member = self._replica_failed(member, route)
                    continue
                return resp
            except EngineUnreachable as exc:
                if member != route.engine_url and attempt == 0:  # a read replica failed: reads are idempotent
                    member = self._replica_failed(member, route)
                    continue
                # The cached route may be stale (the cluster was suspended, or its engine restarted elsewhere):
                # look again; a connection that was never made is safe to retry even for a write.
                self.invalidate(route.id)
                if attempt == 0:
                    fresh = await self.resolve(route.id)
                    if fresh is None:
                        raise NotFound(f"cluster {cluster_id} not found", code="cluster_not_found") from exc
                    await self._require_running(fresh)
                    if retry_ok or exc.never_sent:
                        route = fresh
                        member = route.engine_url
                        continue
                raise ServiceUnavailable(
                    f"cluster {route.id}'s engine is not reachable; retry shortly", retry_after=2,
                    code="engine_unavailable",
                ) from exc  # fmt: skip
            except RequestBodyError as exc:  # a streamed body: the engine connection it went to was closed
                if exc.stalled:
                    raise RequestTimeout(str(exc), code="request_body_timeout") from exc
                raise BadRequest(str(exc), code="content_length_mismatch") from exc
            except TimeoutError as exc:
                if member != route.engine_url and attempt == 0:
                    member = self._replica_failed(member, route)
                    continue
                raise ServiceUnavailable(
                    f"cluster {route.id}'s engine did not answer in time", retry_after=2, code="engine_timeout"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _reader(self, route: ClusterRoute) -> str | None:
        """Round-robin over the primary and its read replicas, skipping members that failed a read lately."""
        readers = route.readers
        now = time.monotonic()
        for _ in range(len(readers)):
            self._turn += 1
            url = readers[self._turn % len(readers)]
            until = self._down.get(url)
            if until is None or until <= now:
                return url
        return route.engine_url

    def _replica_failed(self, url: str | None, route: ClusterRoute) -> str | None:
        if url is not None:
            if len(self._down) > 10_000:
                self._down.clear()
            self._down[url] = time.monotonic() + REPLICA_DOWN_SECONDS
        return route.engine_url

    async def _require_running(self, route: ClusterRoute) -> None:
        """503 + Retry-After unless the cluster is RUNNING; a suspended serverless cluster starts resuming."""
        if route.status == Status.RUNNING.value and route.engine_url:
            return
        if route.status == Status.SUSPENDED.value and route.status_reason == KEY_SUSPENDED:
            raise ServiceUnavailable(
                f"cluster {route.id} is suspended: its encryption key is unavailable (disabled, scheduled for "
                "deletion or unreachable); it resumes by itself once the key is usable again",
                retry_after=60, code=KEY_SUSPENDED,
            )  # fmt: skip
        if route.status == Status.SUSPENDED.value and route.plan == "serverless":
            await self.resume_on_call(route)
            raise ServiceUnavailable(
                f"cluster {route.id} was suspended and is resuming; retry shortly",
                retry_after=1, code="cluster_resuming",
            )  # fmt: skip
        soon = route.status in (Status.RESUMING.value, Status.CREATING.value)  # about a second (docs/benchmarks.md)
        raise ServiceUnavailable(
            f"cluster {route.id} is {route.status}, not RUNNING", retry_after=1 if soon else 5, code="cluster_not_ready"
        )

    @staticmethod
    def _privilege(method: str, rest: str) -> tuple[str, bool]:
        parts = [p for p in rest.split("/") if p]
        if not parts:
            return ("collection:create", False) if method == "POST" else ("data:read", method == "GET")
        if len(parts) == 1:
            return ("collection:drop", False) if method == "DELETE" else ("data:read", method == "GET")
        action = parts[1]
        if action == "imports" and method == "GET":  # an import's status
            return "data:read", True
        if action in READ_ACTIONS:
            return READ_ACTIONS[action], True
        return WRITE_ACTIONS.get(action, "data:write"), False

    async def _read_body(self, receive: Receive, first: bytes) -> bytes | list[bytes]:
        """The rest of a request body whose ``first`` piece came with more to follow: the list of its pieces (the
        engine client writes them as they are, without joining them)."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in _body_pieces(first, receive):
            size += len(chunk)
            if size > self.max_body:
                raise PayloadTooLarge(f"request body exceeds {self.max_body} bytes", code="payload_too_large")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else chunks


async def _body_pieces(first: bytes, receive: Receive) -> AsyncIterator[bytes]:
    """A request body as it arrives: ``first``, then each piece ASGI ``receive`` gives (``_ClientGone`` if the
    client disconnects first)."""
    if first:
        yield first
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


class _ClientGone(Exception):
    """The client disconnected before its request body was read."""


class RequestTimeout(VectaError):
    status = 408
    title = "Request Timeout"
    default_code = "request_timeout"


def problem_instance(scope: Scope) -> str:
    """The problem ``instance``: the request path, as ``request.url.path`` gives it."""
    return str(scope["path"]).replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")


async def _send_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    if status >= 200 and status not in (204, 304):  # those never carry a body nor its length
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


DATAPLANE_PREFIX = "/v1/clusters/{cluster_id}/collections"


_DATAPLANE_PATH = re.compile(r"^/v1/clusters/([^/]+)/collections(/.*)?$")
_PLAIN_PATH = re.compile(r"^[A-Za-z0-9/._~-]*$")
_PLAIN_NAME = re.compile(rb"^[A-Za-z0-9._~-]+$")  # forwarded as is; anything else is percent-encoded again
_METHODS = frozenset({"GET", "POST", "DELETE"})


def dataplane_match(scope: Scope) -> tuple[str, str] | None:
    """(cluster id, rest of the path) when ``scope`` is a data-plane request the edge serves; else None (other
    paths, and data-plane paths with other methods: the router answers those, 405)."""
    if scope["method"] not in _METHODS:
        return None
    path: str = scope["path"]
    if not path.startswith("/v1/clusters/"):
        return None
    match = _DATAPLANE_PATH.match(path)
    if match is None:
        return None
    return match.group(1), match.group(2) or ""


class _EdgeEndpoint:
    """The data-plane routes' ASGI endpoint (reached only when a request was not dispatched earlier)."""

    def __init__(self, get_edge: Any) -> None:
        self.get_edge = get_edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in _METHODS:  # HEAD, which Starlette adds to GET routes: never forwarded
            problem = problem_for_status(405, f"{scope['method']} is not allowed here", "method_not_allowed")
            headers = [(b"content-type", PROBLEM_CONTENT_TYPE_B), (b"allow", b"GET, POST, DELETE")]
            await _send_whole(send, 405, headers, b"" if scope["method"] == "HEAD" else orjson.dumps(problem))
            return
        params = scope.get("path_params", {})
        edge: Edge = self.get_edge(Request(scope, receive))
        await edge.dispatch(scope, receive, send, params["cluster_id"], params.get("rest", ""))


def routes(get_edge: Any) -> list[Route]:
    endpoint = _EdgeEndpoint(get_edge)
    return [
        Route(DATAPLANE_PREFIX, endpoint, methods=["GET", "POST"]),
        Route(DATAPLANE_PREFIX + "{rest:path}", endpoint, methods=["GET", "POST", "DELETE"]),
    ]


def openapi_paths() -> dict[str, Any]:
    """OpenAPI operations for the forwarded routes (bodies as API.md's Data plane section describes them)."""
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    errs = {str(c): {"description": d, "content": problem} for c, d in (
        (400, "Bad Request"), (401, "Unauthorized"), (403, "Forbidden"), (404, "Not Found"),
        (413, "Payload Too Large"), (422, "Unprocessable Content"), (429, "Too Many Requests"),
        (503, "Cluster not ready (Retry-After)"))}  # fmt: skip
    obj = {"type": "object", "additionalProperties": True}

    def op(summary: str, with_body: bool, ok: str = "200") -> dict[str, Any]:
        o: dict[str, Any] = {
            "tags": ["data plane"],
            "summary": summary,
            "responses": {ok: {"description": "OK", "content": {"application/json": {"schema": obj}}}, **errs},
        }
        if with_body:
            o["requestBody"] = {"required": True, "content": {"application/json": {"schema": obj}}}
        return o

    cid = {"name": "cluster_id", "in": "path", "required": True, "schema": {"type": "string"}}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    paths: dict[str, Any] = {
        DATAPLANE_PREFIX: {
            "parameters": [cid],
            "get": op("List collections", False),
            "post": op("Create a collection", True, "201"),
        },
        DATAPLANE_PREFIX + "/{name}": {
            "parameters": [cid, name],
            "get": op("Describe a collection", False),
            "delete": op("Drop a collection", False),
        },
    }
    for action, summary in (
        ("upsert", "Upsert records"), ("delete", "Delete records by ids or filter"), ("fetch", "Fetch by ids"),
        ("search", "Vector or text search"), ("hybrid-search", "Hybrid (vector + BM25) search"),
        ("query", "Query by filter"), ("count", "Count records"), ("imports", "Import from the object store"),
    ):  # fmt: skip
        paths[f"{DATAPLANE_PREFIX}/{{name}}/{action}"] = {
            "parameters": [cid, name],
            "post": op(summary, True, "202" if action == "imports" else "200"),
        }
    paths.update(imports_api.openapi_paths(DATAPLANE_PREFIX))
    return paths


def body_limit_exempt(path: str) -> bool:
    """The control-plane body limit does not apply to data-plane routes (the edge has its own)."""
    return path.startswith("/v1/clusters/") and "/collections" in path


__all__ = ["Edge", "body_limit_exempt", "openapi_paths", "orjson", "routes"]

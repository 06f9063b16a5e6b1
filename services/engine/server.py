"""The engine's HTTP surface: a small raw-ASGI app (no framework on the hot path).

Every request is authenticated (bearer token, constant-time compare) before any route or storage is touched.
JSON bodies are parsed with orjson and vectors go straight into numpy. Searches run in a thread pool (faiss
releases the GIL, so they run in parallel); writes run in a separate pool, serialized per collection.
Errors are RFC 9457 problem documents from ``services.core.errors``.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faiss
import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from services.core.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    Conflict,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
    VectaError,
    problem_for_status,
)
from services.core.metrics import RequestMetrics

from . import malloc, schema
from .crypto import CorruptionError, parse_data_key
from .engine import Engine, open_store
from .replication import Follower, Primary
from .schema import MAX_BODY_BYTES, expect_object, loads, parse_collection, parse_upsert, single_search

log = logging.getLogger("vecta.engine")

JSON_HEADERS = [(b"content-type", b"application/json")]
PROBLEM_HEADERS = [(b"content-type", PROBLEM_CONTENT_TYPE.encode())]
OMP_MIN_QUERIES = 4  # multi-query searches of at least this many queries use all cores (OpenMP)
ACTIONS = {"upsert", "delete", "fetch", "search", "hybrid-search", "query", "count", "imports"}
# Data-plane routes as /internal/stats reports them (request counts and latency histograms, split read/write).
READ_ROUTES = frozenset({"search", "hybrid-search", "fetch", "query", "count"})
WRITE_ROUTES = frozenset({"upsert", "delete"})
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
PUBLIC_PREFIX_HEADER = b"x-vecta-public-prefix"  # set by the edge: the public path of /v1 (problem `instance`)

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http = RequestMetrics(
            "vecta_engine_requests",
            "Requests by route and status",
            "vecta_engine_request_seconds",
            "Request latency by route",
            ["route"],
            LATENCY_BUCKETS,
        )
        self.registry.register(self.http)
        self.vectors = Gauge(
            "vecta_engine_vectors", "Live vectors by collection", ["collection"], registry=self.registry
        )
        self.read_units = Gauge(
            "vecta_engine_read_units", "Cumulative read units", ["collection"], registry=self.registry
        )
        self.write_units = Gauge(
            "vecta_engine_write_units", "Cumulative write units", ["collection"], registry=self.registry
        )
        self.disk = Gauge("vecta_engine_bytes_on_disk", "Bytes on disk", registry=self.registry)
        self.rss = Gauge("vecta_engine_rss_bytes", "Resident memory", registry=self.registry)
        self.boot_id = secrets.token_hex(8)  # counters start at zero with each process: readers detect resets
        for route in (*sorted(READ_ROUTES | WRITE_ROUTES), "collection", "collections"):
            # made now rather than at a route's first request: made midway through a bulk load, these long-lived
            # objects would land among its short-lived ones and keep those allocator arenas from being freed
            self.http.add((route,))

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.http.observe((route,), status, seconds)

    def request_stats(self) -> dict[str, Any]:
        """Cumulative counts and latency histograms of the data-plane requests served (2xx) since this process
        started, read from the latency histogram (nothing extra on the request path). ``latency_counts`` has
        one count per bucket (not cumulative): ``le`` ``latency_bounds_ms[i]``, the last one above them all."""
        n = len(LATENCY_BUCKETS) + 1
        out: dict[str, Any] = {
            "boot_id": self.boot_id,
            "latency_bounds_ms": [round(b * 1000, 6) for b in LATENCY_BUCKETS],
            "read": {"count": 0, "latency_sum_ms": 0.0, "latency_counts": [0] * n},
            "write": {"count": 0, "latency_sum_ms": 0.0, "latency_counts": [0] * n},
        }
        _requests, buckets, sums = self.http.snapshot()
        for (route,), counts in buckets.items():
            kind = "read" if route in READ_ROUTES else "write" if route in WRITE_ROUTES else None
            if kind is None:
                continue
            out[kind]["count"] += sum(counts)
            out[kind]["latency_sum_ms"] += sums[(route,)] * 1000
            acc = out[kind]["latency_counts"]
            for i, c in enumerate(counts):
                acc[i] += c
        return out


class EngineApp:
    def __init__(
        self,
        engine: Engine,
        token: str,
        *,
        search_threads: int | None = None,
        write_threads: int = 4,
        inline_search: bool = True,
        max_body_bytes: int = MAX_BODY_BYTES,
        manage_lifespan: bool = True,
    ) -> None:
        if not token:
            raise ValueError("an engine token is required")
        self.engine = engine
        self._expected = b"Bearer " + token.encode()
        threads = search_threads or max(2, (os.cpu_count() or 2))
        self.search_pool = ThreadPoolExecutor(
            threads, thread_name_prefix="vecta-search", initializer=faiss.omp_set_num_threads, initargs=(1,)
        )
        self.write_pool = ThreadPoolExecutor(write_threads, thread_name_prefix="vecta-write")
        self.parse_pool = ThreadPoolExecutor(write_threads, thread_name_prefix="vecta-parse")
        self.cores = os.cpu_count() or 1
        self.inline_search = inline_search
        self._active = 0  # HTTP requests being served right now
        self._pending: dict[str, list[tuple[Any, asyncio.Future[int]]]] = {}
        self._committers: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch_pending: dict[tuple[Any, ...], list[tuple[Any, asyncio.Future[Any]]]] = {}
        self._batch_runners: dict[tuple[Any, ...], int] = {}
        self._in_pool = 0  # micro-batches running in the search pool
        self.admin_pool = ThreadPoolExecutor(1, thread_name_prefix="vecta-admin")
        self.max_body = max_body_bytes
        self.metrics = _Metrics()
        self.manage_lifespan = manage_lifespan
        self._write_locks: dict[str, asyncio.Lock] = {}
        self.replication = Primary(engine)  # serves replicas (replication.py)
        self.follower: Follower | None = None  # set when this engine is a read replica

    # ------------------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    if self.manage_lifespan:
                        await asyncio.get_running_loop().run_in_executor(self.admin_pool, self.engine.open)
                    if self.follower is not None:
                        self.follower.start()
                except Exception as exc:
                    log.exception("engine failed to open")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self.follower is not None:
                    await asyncio.get_running_loop().run_in_executor(None, self.follower.stop)
                if self.manage_lifespan:
                    await asyncio.get_running_loop().run_in_executor(self.admin_pool, self.engine.close)
                self.shutdown_pools()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def shutdown_pools(self) -> None:
        for pool in (self.search_pool, self.write_pool, self.parse_pool, self.admin_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        self.replication.shutdown()

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        route = "other"
        status = 500
        self._active += 1
        try:
            path: str = scope["path"]
            method: str = scope["method"]
            if path == "/healthz":
                route = "healthz"
                status = await self._send(send, 200, b'{"status":"ok"}')
                return
            auth = None
            clen = None
            for k, v in scope["headers"]:
                if k == b"authorization":
                    auth = v
                elif k == b"content-length":
                    clen = v
            if auth is None or not hmac.compare_digest(auth, self._expected):
                raise Unauthorized()
            if clen is not None and clen.isdigit() and int(clen) > self.max_body:
                raise PayloadTooLarge(f"request body is larger than {self.max_body} bytes", code="body_too_large")
            route, result, status = await self._route(path, method, scope, receive)
            if isinstance(result, tuple):  # (content type, raw bytes)
                await self._send(send, status, result[1], [(b"content-type", result[0])])
            else:
                await self._send(send, status, orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY))
        except VectaError as exc:
            status = exc.status
            await self._problem(send, exc, scope)
        except CorruptionError as exc:
            status = 500
            log.error("stored data failed authentication: %s", exc)
            body = problem_for_status(500, "stored data failed an integrity check", "data_corrupted")
            await self._send(send, 500, orjson.dumps(body), PROBLEM_HEADERS)
        except Exception:
            status = 500
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            body = problem_for_status(500, "internal error", "internal_error")
            await self._send(send, 500, orjson.dumps(body), PROBLEM_HEADERS)
        finally:
            self._active -= 1
            self.metrics.observe(route, status, time.perf_counter() - t0)

    def fast_search(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes | None:
        """The fast lane for the hottest request, called by the HTTP front (http.py) as soon as a request is
        read, with no task, ASGI scope or awaits: one unfiltered single-vector search on a fully indexed (or
        small) collection while nothing else is searching. Returns the whole response (status line, headers,
        body), byte for byte what ``_http`` would send; or None for anything else, or anything doubtful (a bad
        token or body, an error), and ``_http`` then serves the request as usual (errors included). A single
        cheap query runs on the event loop anyway (``_batch_runner``); here it also skips the ~100 us of
        per-request machinery around it."""
        if method != "POST" or not path.endswith("/search") or self.follower is not None or self._in_pool:
            return None
        parts = path.split("/")  # "", "v1", "collections", name, "search"
        if len(parts) != 5 or parts[1] != "v1" or parts[2] != "collections" or self._batch_pending:
            return None
        t0 = time.perf_counter()
        auth = ctype = None
        for k, v in headers:
            if k == b"authorization":
                auth = v
            elif k == b"content-type":
                ctype = v
        if auth is None or not hmac.compare_digest(auth, self._expected):
            return None
        if ctype is not None and not ctype.startswith(b"application/"):
            return None
        coll = self.engine.collections.get(parts[3])
        if coll is None or not coll.cheap_search():
            return None
        try:
            if schema._fastlane is not None:
                res = coll.search_native(body)
            else:
                parsed = single_search(body, coll.cfg.dimension)
                if parsed is None:
                    return None
                res = coll.search_single(*parsed)
            if res is None:
                return None
            out = orjson.dumps({"results": res}, option=orjson.OPT_SERIALIZE_NUMPY)
        except Exception:  # the usual path answers it (and names the error)
            return None
        self.metrics.observe("search", 200, time.perf_counter() - t0)
        return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(out), out)

    async def _commit(self, coll: Any, batch: Any) -> int:
        """Group commit: batches that arrive while a WAL write is in flight share the next write and fsync
        (each stays its own WAL record, so each is still applied all or nothing)."""
        cid = coll.cfg.cid
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(cid, []).append((batch, fut))
        if cid not in self._committers:
            self._committers.add(cid)
            task = asyncio.get_running_loop().create_task(self._committer(cid, coll))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _committer(self, cid: str, coll: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                items = self._pending.pop(cid, None)
                if not items:
                    return
                await _run_shared(loop, self.write_pool, coll.upsert_many, [b for b, _ in items], [f for _, f in items])
        finally:
            self._committers.discard(cid)

    async def _send(
        self, send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
    ) -> int:
        # with a content-length the server sends the body as is (no chunked framing to build, and none for the
        # client to parse)
        hdrs = [*(headers or JSON_HEADERS), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})
        return status

    async def _problem(self, send: Send, exc: VectaError, scope: dict[str, Any]) -> None:
        headers = list(PROBLEM_HEADERS)
        headers.extend((k.lower().encode(), v.encode()) for k, v in exc.headers.items())
        await self._send(send, exc.status, orjson.dumps(exc.problem(self._instance(scope))), headers)

    def _instance(self, scope: dict[str, Any]) -> str | None:
        """The problem's ``instance``: the path the client called. Behind the edge that is the public path
        (``/v1/clusters/{id}/collections/…``), whose prefix the edge sends in a header; the header is believed
        only from a caller holding the engine token, and only when it is a plain path (errors only, never on
        the request path)."""
        path: str | None = scope.get("path")
        auth = prefix = None
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                auth = v
            elif k == PUBLIC_PREFIX_HEADER:
                prefix = v
        if (
            path
            and path.startswith("/v1/")
            and prefix is not None
            and auth is not None
            and hmac.compare_digest(auth, self._expected)
            and 4 <= len(prefix) <= 200
            and prefix.startswith(b"/v1/")
            and all(0x21 <= c < 0x7F for c in prefix)
        ):
            return prefix.decode() + path[3:]
        return path

    async def _body(self, receive: Receive, scope: dict[str, Any]) -> bytes:
        msg = await receive()
        body = msg.get("body", b"")
        if not msg.get("more_body"):
            return body
        chunks = [body]
        size = len(body)
        while True:
            msg = await receive()
            b = msg.get("body", b"")
            size += len(b)
            if size > self.max_body:
                raise PayloadTooLarge(f"request body is larger than {self.max_body} bytes", code="body_too_large")
            chunks.append(b)
            if not msg.get("more_body"):
                return b"".join(chunks)

    @staticmethod
    def _check_json(scope: dict[str, Any]) -> None:
        for k, v in scope["headers"]:
            if k == b"content-type":
                if not (v.startswith(b"application/json") or v.startswith(b"application/")):
                    raise UnsupportedMediaType("send application/json", code="unsupported_media_type")
                return

    # ------------------------------------------------------------------------------------------------------
    async def _route(self, path: str, method: str, scope: dict[str, Any], receive: Receive) -> tuple[str, Any, int]:
        parts = path.strip("/").split("/")
        loop = asyncio.get_running_loop()
        eng = self.engine
        if len(parts) >= 2 and parts[0] == "v1" and parts[1] == "collections":
            if self.follower is not None:  # a read replica: 409 for writes, 503 until it is in sync
                self.follower.check(method, parts)
            if len(parts) == 4 and parts[3] in ACTIONS:
                if method != "POST":
                    raise MethodNotAllowed(f"{method} is not allowed here; use POST", code="method_not_allowed")
                action = parts[3]
                coll = eng.get(parts[2])
                self._check_json(scope)
                body = await self._body(receive, scope)
                if action in ("search", "hybrid-search"):
                    p = coll.parse_search_body(body, hybrid=action == "hybrid-search")
                    fn = coll.hybrid if action == "hybrid-search" else coll.search
                    q = p["q"]
                    nq = 1 if q is None else len(q)
                    if nq >= OMP_MIN_QUERIES and self.cores > 1 and p["filter"] is None and action == "search":
                        res = await self._search_split(fn, p, nq)
                    elif nq >= OMP_MIN_QUERIES and self.cores > 1:
                        res = await loop.run_in_executor(self.search_pool, _search_wide, fn, p, self.cores)
                    elif q is not None and nq == 1 and p["filter"] is None and action == "search" and not p["multi"]:
                        res = await self._search_batched(loop, coll, fn, p)
                    else:
                        res = await loop.run_in_executor(self.search_pool, fn, p)
                    return action, {"results": res}, 200
                if action == "upsert":
                    # parse and validate off the event loop and outside the write lock (batches from several
                    # connections parse concurrently), then hand the batch to the collection's group commit
                    malloc.write_burst()  # its temporaries reuse the heap (malloc.py)
                    batch = await loop.run_in_executor(self.parse_pool, parse_upsert, body, coll.cfg)
                    del body
                    n = await self._commit(coll, batch)
                    return action, {"upserted_count": n}, 200
                if action == "delete":
                    lock = self._write_locks.setdefault(coll.cfg.cid, asyncio.Lock())
                    async with lock:
                        n = await loop.run_in_executor(self.write_pool, coll.delete, loads(body))
                    return action, {"deleted_count": n}, 200
                if action == "fetch":
                    recs = await loop.run_in_executor(self.search_pool, coll.fetch, loads(body))
                    return action, {"records": recs}, 200
                if action == "query":
                    qres = await loop.run_in_executor(self.search_pool, coll.query, loads(body))
                    return action, qres, 200
                if action == "count":
                    doc = loads(body) if body.strip() else {}
                    n = await loop.run_in_executor(self.search_pool, coll.count, doc)
                    return action, {"count": n}, 200
                raise NotFound(
                    "imports are served by the control plane (clusters issue), not by the engine directly",
                    code="not_implemented_here",
                )
            if len(parts) == 2:
                if method == "GET":
                    items = [c.describe() for c in eng.collections.values()]
                    return "collections", {"items": items, "next_page_token": None}, 200
                if method == "POST":
                    self._check_json(scope)
                    cfg = parse_collection(loads(await self._body(receive, scope)))
                    coll = await loop.run_in_executor(self.admin_pool, eng.create_collection, cfg)
                    return "collections", coll.describe(), 201
                raise MethodNotAllowed(f"{method} is not allowed here", code="method_not_allowed")
            if len(parts) == 3:
                if method == "GET":
                    return "collection", eng.get(parts[2]).describe(), 200
                if method == "DELETE":
                    await loop.run_in_executor(self.admin_pool, eng.drop_collection, parts[2])
                    return "collection", {"deleted": True, "name": parts[2]}, 200
                raise MethodNotAllowed(f"{method} is not allowed here", code="method_not_allowed")
        if parts[0] == "internal" and len(parts) == 2:
            return await self._internal(parts[1], method, scope, receive)
        if path == "/metrics" and method == "GET":
            return "metrics", (CONTENT_TYPE_LATEST.encode(), self._metrics_text()), 200
        raise NotFound(f"no route for {method} {path}", code="route_not_found")

    async def _search_batched(
        self, loop: asyncio.AbstractEventLoop, coll: Any, fn: Callable[[Any], Any], p: dict[str, Any]
    ) -> Any:
        """Micro-batching of concurrent single unfiltered queries with the same parameters: like the group
        commit, up to one runner per core takes every query waiting for it and makes one faiss call for all
        of them; a query that arrives while all runners are busy joins the next batch (no timer: the only wait
        is one event-loop turn, and only when a runner starts). Results are what each query gets alone.

        A lone query (nothing else waiting after that loop turn, no search running in the pool) on a fully
        indexed collection runs on the event loop itself: the thread hop would cost more than the search. The
        decision is taken after the loop turn, when every request that arrived with it has been read; deciding
        on arrival would see one request at a time and never use the pool's second core."""
        key = (coll.cfg.cid, p["top_k"], p["ef"], p["nprobe"], p["include_metadata"], p["include_vectors"])
        fut: asyncio.Future[Any] = loop.create_future()
        self._batch_pending.setdefault(key, []).append((p["q"], fut))
        if self._batch_runners.get(key, 0) < self.cores:
            self._batch_runners[key] = self._batch_runners.get(key, 0) + 1
            task = loop.create_task(self._batch_runner(key, fn, p, coll))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _batch_runner(self, key: tuple[Any, ...], fn: Callable[[Any], Any], p: dict[str, Any], coll: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(0)  # one loop turn: requests already read join this batch
                items = self._batch_pending.pop(key, None)
                if not items:
                    return
                if len(items) == 1 and self.inline_search and self._in_pool == 0 and coll.cheap_search():
                    f = items[0][1]
                    try:
                        r = fn({**p, "q": items[0][0], "multi": True})
                    except Exception as exc:
                        if not f.done():
                            f.set_exception(exc)
                    else:
                        if not f.done():
                            f.set_result(r[0])
                    continue
                # One faiss call per free search thread: HNSW gains nothing from batching within one thread, so
                # a batch on one thread would leave the other cores idle while its clients wait.
                parts = max(1, min(len(items), self.cores - self._in_pool))
                bounds = [len(items) * i // parts for i in range(parts + 1)]
                self._in_pool += parts
                try:
                    await asyncio.gather(
                        *(
                            _run_shared(
                                loop,
                                self.search_pool,
                                fn,
                                {**p, "q": _stack(items[a:b]), "multi": True},
                                [f for _, f in items[a:b]],
                            )
                            for a, b in itertools.pairwise(bounds)
                        )
                    )
                finally:
                    self._in_pool -= parts
        finally:
            n = self._batch_runners.get(key, 1) - 1
            if n > 0:
                self._batch_runners[key] = n
            else:
                self._batch_runners.pop(key, None)

    async def _search_split(self, fn: Callable[[Any], Any], p: dict[str, Any], nq: int) -> list[Any]:
        """An unfiltered multi-query search split into one slice per core, each a single-threaded faiss call in
        the search pool (faiss releases the GIL). Unlike OpenMP threads, which spin at barriers, this never
        makes a batch slower than one thread on a busy machine."""
        loop = asyncio.get_running_loop()
        parts = min(self.cores, nq // (OMP_MIN_QUERIES // 2))
        bounds = [nq * i // parts for i in range(parts + 1)]
        q = p["q"]
        futs = [
            loop.run_in_executor(self.search_pool, fn, {**p, "q": q[a:b], "multi": True})
            for a, b in itertools.pairwise(bounds)
        ]
        out: list[Any] = []
        for res in await asyncio.gather(*futs):
            out.extend(res)
        return out

    async def _internal(self, name: str, method: str, scope: dict[str, Any], receive: Receive) -> tuple[str, Any, int]:
        loop = asyncio.get_running_loop()
        eng = self.engine
        if name == "stats" and method == "GET":
            stats = await loop.run_in_executor(self.admin_pool, eng.stats)
            stats["requests"] = self.metrics.request_stats()
            stats["replication"] = (self.follower or self.replication).stats()
            return "internal_stats", stats, 200
        if name.startswith("replication-"):
            if self.follower is not None:
                raise Conflict("a read replica does not serve replicas", code="read_only_replica")
            return await self.replication.handle(name, method, await self._body(receive, scope))
        if name == "snapshot" and method == "POST":
            doc = expect_object(loads(await self._body(receive, scope)), {"uri"})
            store = open_store(doc.get("uri"))
            return "internal_snapshot", await loop.run_in_executor(self.admin_pool, eng.snapshot, store), 200
        if name == "restore" and method == "POST":
            if self.follower is not None:
                raise Conflict("a read replica copies its primary; restore the primary", code="read_only_replica")
            doc = expect_object(loads(await self._body(receive, scope)), {"uri", "data_keys"})
            extra = _data_keys(doc.get("data_keys"), "body.data_keys")
            store = open_store(doc.get("uri"))
            result = await loop.run_in_executor(self.admin_pool, eng.restore, store, extra)
            self.replication.new_epoch()  # replicas of the data before the restore copy it afresh
            return "internal_restore", result, 200
        if name == "rekey":
            if method == "GET":
                return "internal_rekey", eng.rekey_status(), 200
            if method == "POST":
                doc = expect_object(loads(await self._body(receive, scope)), {"data_key"})
                if doc.get("data_key") is None:
                    raise Unprocessable("body.data_key is required (32 bytes, base64)", code="validation_error")
                key = _data_key(doc["data_key"], "body.data_key")
                return "internal_rekey", eng.rekey(key), 202  # starts a thread; returns at once
            raise MethodNotAllowed(f"{method} is not allowed here; use GET or POST", code="method_not_allowed")
        if name == "flush" and method == "POST":
            await loop.run_in_executor(self.admin_pool, eng.wait_ready, 600.0)
            return "internal_flush", {"status": "ready"}, 200
        raise NotFound(f"no internal route {method} {name}", code="route_not_found")

    def _metrics_text(self) -> bytes:
        m = self.metrics
        for name, c in list(self.engine.collections.items()):
            m.vectors.labels(name).set(len(c.id_map))
            m.read_units.labels(name).set(c.read_units)
            m.write_units.labels(name).set(c.write_units)
        from .engine import rss_bytes

        m.rss.set(rss_bytes())
        return generate_latest(m.registry)


def _data_key(value: Any, where: str) -> bytes:
    """A 32-byte base64 key from a request; the error names the field, never the value."""
    try:
        return parse_data_key(value, where)
    except ValueError as exc:
        raise Unprocessable(str(exc), code="validation_error") from None


def _data_keys(value: Any, where: str) -> list[bytes]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > 16:
        raise Unprocessable(f"{where} must be a list of at most 16 base64 keys", code="validation_error")
    return [_data_key(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _search_wide(fn: Callable[[Any], Any], p: Any, threads: int) -> Any:
    """A multi-query search with faiss's OpenMP threads (per thread setting; the pool default is 1)."""
    faiss.omp_set_num_threads(threads)
    try:
        return fn(p)
    finally:
        faiss.omp_set_num_threads(1)


__all__ = ["BadRequest", "EngineApp"]


def _stack(items: list[tuple[np.ndarray, Any]]) -> np.ndarray:
    return items[0][0] if len(items) == 1 else np.concatenate([x for x, _ in items])


async def _run_shared(
    loop: asyncio.AbstractEventLoop, pool: Any, fn: Any, arg: Any, waiters: list[asyncio.Future[Any]]
) -> None:
    """Run one call for several waiting requests (group commit, micro-batched search) and hand each its share of
    the result, or the exception to all of them."""
    try:
        results = await loop.run_in_executor(pool, fn, arg)
    except BaseException as exc:
        for f in waiters:
            if not f.done():
                f.set_exception(exc)
        if not isinstance(exc, Exception):
            raise
    else:
        for f, r in zip(waiters, results, strict=True):
            if not f.done():
                f.set_result(r)

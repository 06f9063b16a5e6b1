"""A lean HTTP/1.1 front for the engine's ASGI app: asyncio protocol + httptools (llhttp), nothing else.

Why not uvicorn: on the engine's request path (a 0.1-0.3 ms faiss search) uvicorn's per-request machinery was a
large share of the CPU: a flow-control object, ASGI message dicts and, above all, two socket writes per response
(status line + headers, then the body) where one does. System calls are expensive on the VMs we run on, and the
engine's budget is the gap between raw faiss and a search over HTTP (docs/decisions/006-engine-http-server.md).

What it does: keep-alive, pipelining (one request handled at a time per connection, in order), Content-Length
and chunked request bodies (decoded by llhttp), ``Expect: 100-continue``, limits on the request line, headers and
body (431 / 413 answered before reading a too-large body), idle keep-alive timeout, back-pressure (a connection
whose client does not read its responses stops being read), graceful shutdown (stop accepting, finish in-flight
requests, then the app's lifespan shutdown). It serves exactly one app: ``EngineApp`` (ASGI ``http`` and
``lifespan`` scopes); responses are buffered by the app anyway (it always sends the whole body at once).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import httptools
import orjson

log = logging.getLogger("vecta.engine.http")

MAX_URL = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_PIPELINE = 16  # requests read ahead on one connection before it stops being read
KEEP_ALIVE_SECONDS = 30.0

App = Callable[
    [dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]],
    Coroutine[Any, Any, None],
]

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


def _plain(status: int, detail: str) -> bytes:
    """A problem document for errors found before the app sees the request (then the connection closes)."""
    body = orjson.dumps({"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail})
    return (
        _status_line(status)
        + b"content-type: application/problem+json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
        + body
    )


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool


class _Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()  # connections are made by the serving loop
        self.app = server.app
        self.max_body = server.max_body
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Request] = deque()
        self.busy = False
        self.closing = False
        self.read_paused = False
        self.write_paused = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.last_io = 0.0  # loop time of the last bytes read or response finished (the idle timer checks it)
        # the app's synchronous fast lane (EngineApp.fast_search), tried before a request becomes a task
        self.fast: Callable[[str, str, list[tuple[bytes, bytes]], bytes], bytes | None] | None = getattr(
            self.app, "fast_search", None
        )
        self._reset()

    def _reset(self) -> None:
        # the lists are the connection's own, cleared rather than replaced: made during a bulk load, new ones would
        # outlive it and pin the allocator arenas its short-lived objects used (a request keeps a copy)
        self.url = b""
        self.headers.clear()
        self.header_bytes = 0
        self.chunks.clear()
        self.size = 0

    # -- asyncio.Protocol ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        with self.server.lock:
            self.server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        with self.server.lock:
            self.server.connections.discard(self)
        self._disarm_idle()
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        # the keep-alive timeout is an inactivity timeout: a request that stops arriving midway is closed after it
        # too (a body that keeps arriving, however slowly, is not); none runs while a request is being served
        self.last_io = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:  # a callback's _Refused arrives as the error's context
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._fail(cause.status, cause.detail)
            else:
                self._fail(400, "malformed HTTP request")

    def pause_writing(self) -> None:  # the client is not reading its responses: stop reading its requests
        self.write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if len(self.queue) < MAX_PIPELINE:
            self._resume_reading()

    # -- llhttp callbacks ---------------------------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL:
            raise _Refused(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if len(self.headers) >= MAX_HEADERS or self.header_bytes > MAX_HEADER_BYTES:
            raise _Refused(431, "request headers too large")
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        for k, v in self.headers:
            if k == b"content-length" and v.strip().isdigit() and int(v) > self.max_body:
                raise _Refused(413, f"request body is larger than {self.max_body} bytes")
            if k == b"expect" and v.lower() == b"100-continue" and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            raise _Refused(413, f"request body is larger than {self.max_body} bytes")
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        if (
            self.fast is not None
            and not self.busy
            and b"?" not in self.url
            and b"#" not in self.url
            and self.parser.should_keep_alive()
        ):
            out = self.fast(self.parser.get_method().decode("ascii"), self.url.decode("latin-1"), self.headers, body)
            if out is not None:  # answered in full, in order (nothing is queued on a connection that is not busy)
                self._reset()
                if self.transport is not None and not self.closing:
                    self.transport.write(out)
                return
        url = httptools.parse_url(self.url)
        req = _Request(
            self.parser.get_method().decode("ascii"),
            url.path.decode("latin-1"),
            url.query or b"",
            list(self.headers),  # a copy: the connection clears its own list for the next request
            body,
            self.parser.should_keep_alive(),
        )
        self._reset()
        if self.busy:
            self.queue.append(req)
            if len(self.queue) >= MAX_PIPELINE:
                self._pause_reading()
        else:
            self._start(req)

    # -- requests -----------------------------------------------------------------------------------------
    def _start(self, req: _Request) -> None:
        self.busy = True
        server = self.server
        if self.loop is server.loop:
            server.spawn(self._run(req))
        else:  # a connection of a helper loop: the app (its state, locks, pools) lives on the server's loop
            assert server.loop is not None
            server.loop.call_soon_threadsafe(server.spawn, self._run(req))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(data)

    def _on_own_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on this connection's loop: transports belong to the loop that made them."""
        if self.loop is self.server.loop:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    async def _run(self, req: _Request) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": req.method,
            "scheme": "http",
            "path": req.path,
            "raw_path": req.path.encode("latin-1"),
            "query_string": req.query,
            "root_path": "",
            "headers": req.headers,
            "client": None,
            "server": None,
        }
        body = req.body
        head: list[bytes] = []
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body
            msg = {"type": "http.request", "body": body, "more_body": False}
            body = b""
            return msg

        async def send(msg: dict[str, Any]) -> None:
            nonlocal sent
            if msg["type"] == "http.response.start":
                head.append(_status_line(msg["status"]))
                for k, v in msg.get("headers", ()):
                    head.append(k + b": " + v + b"\r\n")
                if not req.keep_alive:
                    head.append(b"connection: close\r\n")
                head.append(b"\r\n")
            elif msg["type"] == "http.response.body" and not sent:
                if msg.get("more_body"):
                    raise RuntimeError("the engine's HTTP front only sends whole bodies")
                sent = True
                self._on_own_loop(self._write, b"".join(head) + msg.get("body", b""))

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("unhandled error serving %s %s", req.method, req.path)
        if not sent:
            self._on_own_loop(self._write, _plain(500, "internal error"))
            req.keep_alive = False
        self._on_own_loop(self._finished, req)

    def _finished(self, req: _Request) -> None:
        self.busy = False
        self.last_io = self.loop.time()
        if self.closing or self.transport is None:
            return
        if not req.keep_alive or self.server.stopping:
            self.closing = True
            self.transport.close()
            return
        if self.queue:
            self._start(self.queue.popleft())
            if self.read_paused and not self.write_paused and len(self.queue) < MAX_PIPELINE:
                self._resume_reading()

    def _fail(self, status: int, detail: str) -> None:
        """Answer a request that cannot be parsed or is over a limit, then close (the stream is unusable)."""
        if self.transport is None or self.closing:
            return
        self.closing = True
        self.queue.clear()
        self.transport.write(_plain(status, detail))
        self.transport.close()

    # -- helpers ------------------------------------------------------------------------------------------
    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.closing:
            self.read_paused = False
            self.transport.resume_reading()

    def _arm_idle(self) -> None:
        """One timer per connection, not one per request: it fires at the earliest moment the connection could
        have been idle for the whole timeout and checks ``last_io``, re-arming itself when there was traffic."""
        self.last_io = self.loop.time()
        if self.idle_timer is None:
            self.idle_timer = self.loop.call_later(self.server.keep_alive, self._idle)

    def _disarm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle(self) -> None:
        self.idle_timer = None
        if self.transport is None or self.closing:
            return
        if self.busy:  # no timeout while a request is served: the wait starts again when it is answered
            self.idle_timer = self.loop.call_later(self.server.keep_alive, self._idle)
            return
        left = self.last_io + self.server.keep_alive - self.loop.time()
        if left > 0:
            self.idle_timer = self.loop.call_later(left, self._idle)
            return
        self.closing = True
        self.transport.close()

    def close_if_idle(self) -> None:
        if not self.busy and not self.queue and self.transport is not None and not self.closing:
            self.closing = True
            self.transport.close()


class _Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Server:
    """Serve ``app`` on host:port until SIGTERM/SIGINT (or ``stop()``), with the ASGI lifespan around it."""

    def __init__(
        self,
        app: App,
        host: str,
        port: int,
        *,
        max_body: int,
        keep_alive: float = KEEP_ALIVE_SECONDS,
        shutdown_timeout: float = 30.0,
        loops: int = 1,
    ) -> None:
        self.app = app
        self.loops = max(1, loops)
        self.lock = threading.Lock()  # guards ``connections`` (helper loops add and remove theirs)
        self.host = host
        self.port = port
        self.max_body = max_body
        self.keep_alive = keep_alive
        self.shutdown_timeout = shutdown_timeout
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self._stop = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None  # set by serve()

    def stop(self) -> None:
        self.stopping = True
        self._stop.set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a request's task on the server's loop (where the app lives), tracked for graceful shutdown."""
        assert self.loop is not None
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, ready: Callable[[int], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        lifespan = _Lifespan(self.app)
        await lifespan.startup()
        helpers = [_HelperLoop(type(self.loop)) for _ in range(self.loops - 1)]
        server: asyncio.AbstractServer | _Acceptor
        if helpers:
            server = _Acceptor(self, helpers)
        else:
            server = await self.loop.create_server(
                lambda: _Connection(self), self.host, self.port, reuse_address=True, backlog=1024
            )
        self.port = server.sockets[0].getsockname()[1]
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError):
                pass  # only the main thread may set signal handlers: a server in another thread is stopped by stop()
        if ready is not None:
            ready(self.port)
        try:
            await self._stop.wait()
        finally:
            self.stopping = True
            server.close()
            loop = self.loop
            if helpers:  # sockets already handed to a helper loop become connections there
                await asyncio.sleep(0.05)
            for conn in self._connections():
                conn._on_own_loop(conn.close_if_idle)
            # wait for requests in flight: a helper loop's request is busy on its connection before its task
            # exists on this loop, so the connections are watched as well as the tasks
            deadline = loop.time() + self.shutdown_timeout
            while loop.time() < deadline:
                pending = list(self.tasks)
                if pending:
                    await asyncio.wait(pending, timeout=deadline - loop.time())
                elif any(c.busy or c.queue for c in self._connections()):
                    await asyncio.sleep(0.01)
                else:
                    break
            for conn in self._connections():
                if conn.transport is not None:
                    conn._on_own_loop(conn.transport.close)
            await server.wait_closed()
            for h in helpers:
                await asyncio.get_running_loop().run_in_executor(None, h.stop)
            await lifespan.shutdown()

    def _connections(self) -> list[_Connection]:
        with self.lock:
            return list(self.connections)


class _HelperLoop:
    """A second (third, ...) event loop in its own thread, serving the connections the acceptor hands it. Its
    connections answer the fast lane (``EngineApp.fast_search``) right there, so while one loop's search runs
    in faiss (which releases the GIL) another loop parses and answers the next request: single-query searches
    use every core without a thread hop per request. Anything else goes to the server's loop (``_start``)."""

    def __init__(self, loop_type: type[asyncio.AbstractEventLoop]) -> None:
        self.loop = loop_type()
        self.thread = threading.Thread(target=self._run, name="vecta-http", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _adopt(loop: asyncio.AbstractEventLoop, server: Server, sock: socket.socket) -> None:
    """On ``loop``: serve an accepted socket there."""

    async def connect() -> None:
        try:
            await loop.connect_accepted_socket(lambda: _Connection(server), sock)
        except OSError:
            sock.close()

    loop.create_task(connect())


class _Acceptor:
    """Accepts on the server's loop and deals connections round-robin over that loop and the helper loops
    (balanced by construction, unlike SO_REUSEPORT's hashing). Quacks like the asyncio server it replaces."""

    def __init__(self, server: Server, helpers: list[_HelperLoop]) -> None:
        assert server.loop is not None
        self.server = server
        self.loop = server.loop
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        self.sock = socket.create_server((server.host, server.port), family=family, backlog=1024)
        self.sock.setblocking(False)
        self.sockets = [self.sock]
        self._targets = itertools.cycle([None, *helpers])
        self._closed = False
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: stop accepting for a moment rather than spin
                log.warning("accept failed (%s); pausing for 0.5 s", exc)
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(0.5, self._resume)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            helper = next(self._targets)
            if helper is None:
                _adopt(self.loop, self.server, conn)
            else:
                helper.loop.call_soon_threadsafe(_adopt, helper.loop, self.server, conn)

    def _resume(self) -> None:
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    async def wait_closed(self) -> None:
        return None


class _Lifespan:
    """Drive the app's ASGI lifespan scope (startup before serving, shutdown after)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self.app({"type": "lifespan", "asgi": {"version": "3.0"}}, self.inbox.get, self.outbox.put)
        )
        await self.inbox.put({"type": "lifespan.startup"})
        msg = await self.outbox.get()
        if msg["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"engine failed to start: {msg.get('message', msg['type'])}")

    async def shutdown(self) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self.outbox.get(), timeout=60)
        except TimeoutError:
            log.error("engine shutdown did not finish within 60 s")
        if self.task is not None:
            await asyncio.wait([self.task], timeout=5)


def default_loops() -> int:
    """``VECTA_ENGINE_HTTP_LOOPS``, else one event loop per core this process may run on, at most 4."""
    value = os.environ.get("VECTA_ENGINE_HTTP_LOOPS", "")
    if value.strip().isdigit() and int(value) > 0:
        return int(value)
    return max(1, min(4, len(os.sched_getaffinity(0))))


def run(app: App, host: str, port: int, *, max_body: int, loops: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT on uvloop (the engine's entry point)."""
    import uvloop

    uvloop.run(Server(app, host, port, max_body=max_body, loops=loops or default_loops()).serve())

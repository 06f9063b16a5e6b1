"""The edge's HTTP/1.1 client for the engines: asyncio protocol + httptools (llhttp), keep-alive pools per engine.

Why not aiohttp (docs/decisions/005-edge-http-client.md): on a forwarded single-vector search aiohttp's per-request
machinery (request and response objects, header multidicts, stream readers, payload writers, a timer context
manager) cost ~220 µs of CPU in the API process against ~50 µs for a plain protocol round trip
(bench/edge_cpu.py). The engine is our own server, the requests are ours: what is needed is small.

What it does: one write per request (head and body joined; large bodies written as two buffers without a copy),
or, for a large write (``request_streamed``), the head first and then the body piece by piece as the client sends
it, with write back-pressure, so the engine receives an upsert while the client is still sending it; the answer
parsed in C, responses up to ``buffer_limit`` returned whole and larger ones streamed with
back-pressure, idle connections kept per engine (``max_idle_per_host``, dropped after ``idle_seconds``, below the
engine's 30 s keep-alive) and at most ``limit_per_host`` connections in use per engine, a connect timeout and a
total timeout per request. Errors: ``EngineUnreachable`` (``never_sent`` when no byte of the request can have
reached the engine, so even a write may be retried), ``TimeoutError`` and, for a streamed body,
``RequestBodyError``. A connection whose request was not written completely (a streamed body that failed, or an
engine that answered before reading all of it) is closed, never returned to the pool.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Protocol
from urllib.parse import urlsplit

import httptools

_RELAY = frozenset({b"content-type", b"retry-after"})  # the engine's headers the edge passes on
_JOIN_LIMIT = 64 << 10  # bodies up to this size are joined to the head (one buffer, one write)


class Sink(Protocol):
    """Where an answer goes for a request sent with ``EngineClient.send_on`` (the edge's fast lane): called on the
    event loop from the connection's parser callbacks, with no task or future in between. Exactly one of ``done``
    and ``failed`` ends every request; ``start``/``chunk`` come first when the answer is larger than the buffer
    limit (it is relayed as it arrives, and ``done`` then gets ``body=None``)."""

    def done(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes | None) -> None: ...

    def start(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None: ...

    def chunk(self, data: bytes) -> None: ...

    def failed(self, exc: BaseException) -> None: ...


class EngineUnreachable(Exception):
    """The engine could not be reached, or dropped the connection before answering completely."""

    def __init__(self, message: str, *, never_sent: bool) -> None:
        super().__init__(message)
        self.never_sent = never_sent


class RequestBodyError(Exception):
    """A streamed request body did not arrive as declared: longer or shorter than its Content-Length, or no piece
    of it for ``timeout`` seconds (``stalled``). The engine connection it was being written to was closed."""

    def __init__(self, message: str, *, stalled: bool = False) -> None:
        super().__init__(message)
        self.stalled = stalled


class EngineResponse:
    """An engine's answer: ``status``, the relayed ``headers``, and ``body`` (whole) or ``stream()`` (large)."""

    __slots__ = ("_conn", "body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes | None, conn: Any) -> None:
        self.status = status
        self.headers = headers
        self.body = body  # None: streamed, read it with stream()
        self._conn: Connection | None = conn

    async def stream(self) -> AsyncIterator[bytes]:
        """The body in pieces (for answers larger than the buffer limit); the connection goes back to the pool
        once it is read to the end, and is closed if the reader stops early."""
        conn = self._conn
        assert conn is not None
        try:
            while True:
                chunk = await conn.next_chunk()
                if chunk is None:
                    break
                yield chunk
        finally:
            self._conn = None
            conn.finish_stream()

    def close(self) -> None:
        """Abandon a streamed body without reading it (the connection is closed)."""
        if self._conn is not None:
            self._conn.abort()
            self._conn = None


class Connection(asyncio.Protocol):
    """One keep-alive connection to an engine; one request at a time."""

    def __init__(self, pool: _HostPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        # the request in flight
        self.waiter: asyncio.Future[EngineResponse] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False
        self.keep_alive = False
        self.streaming = False
        self.chunks: deque[bytes] = deque()
        self.chunk_waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.paused = False
        # a streamed request body being written: the connection cannot be reused until it is written completely
        self.writing = False
        self.write_paused = False  # the transport's write buffer is above its high-water mark
        self.drain_waiter: asyncio.Future[None] | None = None
        # a request of the fast lane (``send_to``): its answer goes to the sink, not to a future
        self.sink: Sink | None = None
        self.relaying = False  # the sink has been given the head of a large answer and gets its body piecewise
        self.length: int | None = None  # the answer's Content-Length (for relaying it)

    # -- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None and not self.streaming and self.sink is None:  # an engine must not answer unasked
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(EngineUnreachable(f"malformed answer from the engine: {exc}", never_sent=False))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        self._wake_writer()
        if not self.complete:
            self._fail(EngineUnreachable("the engine closed the connection", never_sent=False))

    def pause_writing(self) -> None:  # a whole body is buffered by the transport (bounded by the body limit);
        self.write_paused = True  # a streamed one waits in drain()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        w, self.drain_waiter = self.drain_waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport takes more (or the connection is gone)."""
        while self.write_paused and not self.closed:
            self.drain_waiter = self.loop.create_future()
            await self.drain_waiter

    # -- httptools callbacks -----------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _RELAY:
            self.headers.append((name, value))
        elif name == b"content-length" and value.isdigit():
            self.length = int(value)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None:
            if self.relaying:
                sink.chunk(body)
                return
            self.body.append(body)
            self.size += len(body)
            if self.size > self.pool.client.buffer_limit:  # too large to hold: relayed as it arrives
                self.relaying = True
                sink.start(self.status, self.headers, self.length)
                for piece in self.body:
                    sink.chunk(piece)
                self.body = []
            return
        if self.streaming:
            self.chunks.append(body)
            self.size += len(body)
            if self.size > self.pool.client.buffer_limit and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
            self._wake_reader()
            return
        self.body.append(body)
        self.size += len(body)
        if self.size > self.pool.client.buffer_limit and self.waiter is not None:
            # too large to relay whole: hand over what came so far, the rest is streamed
            self.streaming = True
            self.chunks.extend(self.body)
            self.body = []
            waiter, self.waiter = self.waiter, None
            if not waiter.done():
                waiter.set_result(EngineResponse(self.status, self.headers, None, self))

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # asked now: llhttp resets once the callback returns
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        sink = self.sink
        if sink is not None:
            self.sink = None
            body: bytes | None = None
            if not self.relaying:
                body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            self._release()
            self.pool.slot_freed()
            sink.done(self.status, self.headers, body)
            return
        if self.streaming:
            self._wake_reader()
            return
        waiter, self.waiter = self.waiter, None
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        response = EngineResponse(self.status, self.headers, body, None)
        self._release()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    # -- the request -------------------------------------------------------------------------------------
    def _begin(self) -> asyncio.Future[EngineResponse]:
        self._clear()
        waiter = self.waiter = self.loop.create_future()
        return waiter

    def _clear(self) -> None:
        self.status, self.headers, self.body, self.size, self.length = 0, [], [], 0, None
        self.complete = self.keep_alive = self.streaming = self.paused = self.relaying = False
        self.error = None
        self.chunks.clear()

    def send_to(self, sink: Sink, head: bytes, body: bytes, timeout: float) -> None:
        """Send a request whose answer goes to ``sink`` (see ``Sink``); the caller has counted it in flight."""
        assert self.transport is not None
        self._clear()
        self.sink = sink
        self.timer = self.loop.call_later(timeout, self._timed_out)
        if len(body) <= _JOIN_LIMIT:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))

    def begin_streamed(self, head: bytes) -> asyncio.Future[EngineResponse]:
        """Write the head of a request whose body follows in pieces (``write_body``); the answer timer starts
        once the body is written (``body_written``)."""
        assert self.transport is not None
        waiter = self._begin()
        self.writing = True
        self.transport.write(head)
        return waiter

    def body_written(self, timeout: float) -> None:
        self.writing = False
        if self.waiter is not None and not self.closed:
            self.timer = self.loop.call_later(timeout, self._timed_out)

    def send(self, head: bytes, body: bytes | list[bytes], timeout: float) -> asyncio.Future[EngineResponse]:
        assert self.transport is not None
        waiter = self._begin()
        self.timer = self.loop.call_later(timeout, self._timed_out)
        if isinstance(body, list):  # a large body as it was received: written without joining it first
            self.transport.writelines([head, *body])
        elif len(body) <= _JOIN_LIMIT:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))
        return waiter

    def _timed_out(self) -> None:
        self.timer = None
        self._fail(TimeoutError("the engine did not answer in time"))
        self.abort()

    def _fail(self, exc: BaseException) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        sink = self.sink
        if sink is not None:
            self.sink = None
            self.pool.slot_freed()
            sink.failed(exc)
            return
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.streaming and self.error is None:
            self.error = exc
            self._wake_reader()

    def _release(self) -> None:
        if self.closed:
            return
        if not self.keep_alive or self.writing:  # answered before its request was written whole: unusable
            self.abort()
            return
        self.pool.release(self)

    def abort(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.abort()
        self._wake_writer()

    def drop(self) -> None:
        """Abort after a failed or abandoned request; an answer (or error) still pending is discarded."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            if not waiter.done():
                waiter.cancel()
            elif not waiter.cancelled():
                waiter.exception()  # retrieved: not logged as never retrieved
        self.abort()

    # -- streamed bodies ---------------------------------------------------------------------------------
    def _wake_reader(self) -> None:
        w, self.chunk_waiter = self.chunk_waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    async def next_chunk(self) -> bytes | None:
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.size -= len(chunk)
                if self.paused and self.size <= self.pool.client.buffer_limit // 2 and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                return chunk
            if self.error is not None:
                raise self.error
            if self.complete:
                return None
            self.chunk_waiter = self.loop.create_future()
            await self.chunk_waiter

    def finish_stream(self) -> None:
        self.streaming = False
        if self.complete and not self.chunks and self.error is None:
            self._release()
        else:
            self.abort()


class _HostPool:
    def __init__(self, client: EngineClient, scheme: str, host: str, port: int) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.host, self.port = host, port
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if scheme == "https" else None
        default = 443 if scheme == "https" else 80
        self.host_header = (host if port == default else f"{host}:{port}").encode("idna")
        self.idle: list[Connection] = []
        self.in_flight = 0  # requests sent and not yet answered (at most client.limit_per_host)
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def wait_for_slot(self) -> None:
        while self.in_flight >= self.client.limit_per_host:
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # woken, then cancelled: pass the turn on
                    self._wake_next()
                raise

    def slot_freed(self) -> None:
        self.in_flight -= 1
        self._wake_next()

    def _wake_next(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():  # a cancelled waiter gave its turn up
                waiter.set_result(None)
                break

    async def acquire(self) -> Connection:
        """An idle connection (the most recently used) or a new one, for one request."""
        idle = self.take_idle()
        if idle is not None:
            return idle
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: Connection(self), self.host, self.port, ssl=self.ssl),
                self.client.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise EngineUnreachable(f"cannot connect to the engine: {exc!r}", never_sent=True) from exc
        return conn

    def take_idle(self) -> Connection | None:
        """An idle connection (the most recently used) without waiting, or None."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < self.client.idle_seconds:
                return conn
            conn.abort()
        return None

    def release(self, conn: Connection) -> None:
        if len(self.idle) >= self.client.max_idle_per_host:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def forget(self, conn: Connection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass


class EngineClient:
    def __init__(
        self,
        *,
        timeout: float,
        connect_timeout: float = 2.0,
        limit_per_host: int = 256,
        max_idle_per_host: int = 64,
        idle_seconds: float = 20.0,
        buffer_limit: int = 1 << 20,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.limit_per_host = limit_per_host
        self.max_idle_per_host = max_idle_per_host
        self.idle_seconds = idle_seconds
        self.buffer_limit = buffer_limit
        self._pools: dict[str, _HostPool] = {}

    def _pool(self, base_url: str) -> _HostPool:
        pool = self._pools.get(base_url)
        if pool is None:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise EngineUnreachable(f"unsupported engine address {base_url!r}", never_sent=True)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            pool = self._pools[base_url] = _HostPool(self, parts.scheme, parts.hostname, port)
        return pool

    async def request(
        self,
        method: str,
        base_url: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | list[bytes],
    ) -> EngineResponse:
        """Send ``method target`` (path and query, already encoded) with ``headers`` and ``body`` to the engine at
        ``base_url`` (``http://host:port``) and wait for its answer (see ``EngineResponse``). A large ``body`` may
        be given as the list of pieces it arrived in."""
        pool = self._pool(base_url)
        size = len(body) if isinstance(body, bytes) else sum(map(len, body))
        raw_head = _head(method, target, pool.host_header, headers, size)
        # At most limit_per_host requests in flight per engine (the rest wait; a streamed body is not counted).
        # A counter rather than an asyncio.Semaphore: nothing to await unless the limit is reached.
        if pool.in_flight >= self.limit_per_host:
            await pool.wait_for_slot()
        pool.in_flight += 1
        try:
            conn = await pool.acquire()
            try:
                return await conn.send(raw_head, body, self.timeout)
            except BaseException:
                conn.abort()  # failed, timed out or cancelled: the connection's state is unknown
                raise
        finally:
            pool.slot_freed()

    def take(self, base_url: str) -> Connection | None:
        """An idle keep-alive connection to ``base_url``, counted in flight, when one can be had without waiting;
        else None. For the edge's fast lane: ``send_on`` sends over it (``give_back`` returns it unused)."""
        pool = self._pools.get(base_url)
        if pool is None or pool.in_flight >= self.limit_per_host:
            return None
        conn = pool.take_idle()
        if conn is not None:
            pool.in_flight += 1
        return conn

    def give_back(self, conn: Connection) -> None:
        conn.pool.slot_freed()
        conn.pool.release(conn)

    def send_on(
        self, conn: Connection, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes, sink: Sink
    ) -> None:
        """Send a request over ``conn`` (from ``take``); its answer, or its failure, goes to ``sink``."""
        conn.send_to(sink, _head(method, target, conn.pool.host_header, headers, len(body)), body, self.timeout)

    async def request_streamed(
        self,
        method: str,
        base_url: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int,
        body: AsyncIterable[bytes],
    ) -> EngineResponse:
        """Like ``request``, for a body of ``length`` bytes that is still arriving: the head is written once a
        connection is had, then each piece of ``body`` as it comes, waiting while the transport's buffer is full.
        ``body`` is not iterated before the head is written, so an ``EngineUnreachable`` with ``never_sent`` means
        nothing of it was consumed. A body longer or shorter than ``length``, or with no progress (from ``body``
        or from the engine reading it) for ``timeout`` seconds, or an error raised by ``body`` (the client left)
        closes the connection and is raised (``RequestBodyError``, ``TimeoutError``, or the error itself).
        The answer gets ``timeout`` seconds once the body is written; an engine that answers earlier is answered
        with, and its connection closed."""
        pool = self._pool(base_url)
        raw_head = _head(method, target, pool.host_header, headers, length)
        if pool.in_flight >= self.limit_per_host:
            await pool.wait_for_slot()
        pool.in_flight += 1
        try:
            conn = await pool.acquire()
            try:
                waiter = conn.begin_streamed(raw_head)
                await self._write_body(conn, waiter, length, body)
                conn.body_written(self.timeout)
                return await waiter
            except BaseException:
                conn.drop()  # failed, timed out, cancelled, or the body went wrong: never reused
                raise
        finally:
            pool.slot_freed()

    async def _write_body(
        self, conn: Connection, waiter: asyncio.Future[EngineResponse], length: int, body: AsyncIterable[bytes]
    ) -> None:
        transport = conn.transport
        assert transport is not None
        loop = conn.loop
        sent = 0
        last = b""  # the piece that completes the body: held until the body is known to end there
        from_client = True  # what a timeout was waiting for: the client's next piece, or the engine to read
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                async for chunk in body:
                    if waiter.done() or conn.closed:  # answered or failed before the body was written: stop
                        return
                    if not chunk:
                        continue
                    sent += len(chunk)
                    if sent > length:  # the engine has not got the whole declared body: it cannot act on it
                        raise RequestBodyError(f"the request body is longer than its Content-Length ({length})")
                    if sent == length:
                        last = chunk
                        continue
                    transport.write(chunk)
                    if conn.write_paused:
                        from_client = False
                        await conn.drain()
                        from_client = True
                        if waiter.done() or conn.closed:
                            return
                    deadline.reschedule(loop.time() + self.timeout)
        except TimeoutError:
            if from_client:
                raise RequestBodyError("the request body stopped arriving", stalled=True) from None
            raise
        if waiter.done() or conn.closed:
            return
        if sent != length:
            raise RequestBodyError(f"the request body is shorter than its Content-Length ({length})")
        if last:
            transport.write(last)

    async def close(self) -> None:
        for pool in self._pools.values():
            for conn in list(pool.idle):
                conn.abort()
            pool.idle.clear()
        self._pools.clear()


def _head(method: str, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]], length: int) -> bytes:
    head = [method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    for name, value in headers:
        head += (name, b": ", value, b"\r\n")
    head += (b"content-length: ", str(length).encode(), b"\r\n\r\n")
    return b"".join(head)

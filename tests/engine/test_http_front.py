"""The engine's lean HTTP/1.1 front (services/engine/http.py), over real sockets on 127.0.0.1.

A small ASGI app stands in for the engine so that each HTTP behaviour is checked on its own: keep-alive,
pipelining in order, chunked bodies, Expect: 100-continue, limits (413/414/431) answered before the body is read,
malformed requests (400), Connection: close, a failing app (500, connection closed), graceful shutdown, lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from services.engine.http import Server

MAX_BODY = 1000


class EchoApp:
    """Echoes method, path, query, body length and a header; /slow sleeps; /boom raises."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    self.events.append("startup")
                    await send({"type": "lifespan.startup.complete"})
                else:
                    self.events.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = (await receive())["body"]
        if scope["path"] == "/boom":
            raise RuntimeError("boom")
        if scope["path"] == "/slow":
            await asyncio.sleep(0.3)
        hdr = dict(scope["headers"]).get(b"x-tag", b"").decode()
        out = orjson.dumps(
            {
                "method": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"].decode(),
                "len": len(body),
                "tag": hdr,
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": out})


@contextlib.contextmanager
def _serving(app: EchoApp, **kw: Any) -> Iterator[tuple[int, Server]]:
    """The front serving ``app`` on a free port in a thread of its own; stopped (and joined) on exit."""
    srv = Server(app, "127.0.0.1", 0, max_body=MAX_BODY, **kw)
    ready = threading.Event()
    port: list[int] = []

    def run() -> None:
        asyncio.run(srv.serve(lambda p: (port.append(p), ready.set())))

    th = threading.Thread(target=run, daemon=True)
    th.start()
    assert ready.wait(10)
    try:
        yield port[0], srv
    finally:
        if srv.loop is not None and not srv.stopping:
            srv.loop.call_soon_threadsafe(srv.stop)
        th.join(10)
        assert not th.is_alive()


@pytest.fixture(scope="module")
def front() -> Iterator[tuple[int, EchoApp, Server]]:
    app = EchoApp()
    with _serving(app, keep_alive=5.0) as (port, srv):
        yield port, app, srv
    assert app.events == ["startup", "shutdown"]


def _conn(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def _read_response(s: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        rest += chunk
    buf[:] = rest[n:]
    return status, headers, rest[:n]


def _closed(s: socket.socket) -> bool:
    """The server closed the connection (a peer that keeps it open makes recv time out: the test fails)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_keep_alive_and_one_write_per_response(front: tuple[int, EchoApp, Server]) -> None:
    port = front[0]
    with _conn(port) as s:
        buf = bytearray()
        for i in range(3):
            body = b"x" * i
            s.sendall(
                b"POST /a/b?q=%d HTTP/1.1\r\nHost: x\r\nX-Tag: t%d\r\nContent-Length: %d\r\n\r\n" % (i, i, i) + body
            )
            status, headers, out = _read_response(s, buf)
            assert status == 200
            assert orjson.loads(out) == {"method": "POST", "path": "/a/b", "query": f"q={i}", "len": i, "tag": f"t{i}"}
            assert headers["content-type"] == "application/json"


def test_pipelined_requests_answered_in_order(front: tuple[int, EchoApp, Server]) -> None:
    port = front[0]
    with _conn(port) as s:
        reqs = b"".join(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in (b"slow", b"one", b"two"))
        s.sendall(reqs)
        buf = bytearray()
        paths = [orjson.loads(_read_response(s, buf)[2])["path"] for _ in range(3)]
        assert paths == ["/slow", "/one", "/two"]


def test_chunked_body_is_decoded(front: tuple[int, EchoApp, Server]) -> None:
    with _conn(front[0]) as s:
        s.sendall(
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        status, _, out = _read_response(s, bytearray())
        assert status == 200 and orjson.loads(out)["len"] == 8


def test_expect_100_continue(front: tuple[int, EchoApp, Server]) -> None:
    with _conn(front[0]) as s:
        s.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        first = s.recv(100)
        assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"abcd")
        buf = bytearray(first[len(b"HTTP/1.1 100 Continue\r\n\r\n") :])
        status, _, out = _read_response(s, buf)
        assert status == 200 and orjson.loads(out)["len"] == 4


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n", 413),  # refused before the body arrives
        (b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n" + b"y" * 1001 + b"\r\n", 413),
        (b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(120)) + b"\r\n", 431),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 400),
    ],
)
def test_bad_requests_get_an_error_and_the_connection_closes(
    front: tuple[int, EchoApp, Server], request_bytes: bytes, status: int
) -> None:
    with _conn(front[0]) as s:
        s.sendall(request_bytes)
        got, headers, body = _read_response(s, bytearray())
        assert got == status
        assert headers["content-type"] == "application/problem+json"
        assert orjson.loads(body)["status"] == status
        assert _closed(s)


def test_connection_close_is_honoured(front: tuple[int, EchoApp, Server]) -> None:
    with _conn(front[0]) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, _ = _read_response(s, bytearray())
        assert status == 200 and headers.get("connection") == "close"
        assert _closed(s)


def test_http_1_0_without_keep_alive_closes(front: tuple[int, EchoApp, Server]) -> None:
    with _conn(front[0]) as s:
        s.sendall(b"GET /x HTTP/1.0\r\n\r\n")
        assert _read_response(s, bytearray())[0] == 200
        assert _closed(s)


def test_app_error_is_a_500_and_the_server_keeps_serving(front: tuple[int, EchoApp, Server]) -> None:
    port = front[0]
    with _conn(port) as s:
        s.sendall(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(s, bytearray())[0] == 500
        assert _closed(s)
    with _conn(port) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(s, bytearray())[0] == 200


def test_a_request_that_stops_arriving_is_closed_after_the_idle_timeout() -> None:
    with _serving(EchoApp(), keep_alive=0.3) as (port, _), _conn(port) as s:
        s.sendall(b"POST /half HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        for _ in range(3):  # still arriving: kept open past the timeout
            time.sleep(0.15)
            s.sendall(b"d")
        started = time.monotonic()
        assert _closed(s)  # then it stops: closed, with no answer
        assert time.monotonic() - started < 4


def test_client_gone_mid_request_does_not_hurt_others(front: tuple[int, EchoApp, Server]) -> None:
    port = front[0]
    s = _conn(port)
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    s.close()
    time.sleep(0.4)
    with _conn(port) as s2:
        s2.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(s2, bytearray())[0] == 200


def test_graceful_shutdown_finishes_in_flight_requests() -> None:
    app = EchoApp()
    with _serving(app) as (port, srv):
        with _conn(port) as s:
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.05)
            assert srv.loop is not None
            srv.loop.call_soon_threadsafe(srv.stop)
            assert _read_response(s, bytearray())[0] == 200
            assert _closed(s)
    assert app.events == ["startup", "shutdown"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

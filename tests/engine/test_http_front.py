"""The engine's lean HTTP/1.1 front (services/engine/http.py), over real sockets on 127.0.0.1.

A small ASGI app stands in for the engine so that each HTTP behaviour is checked on its own: keep-alive,
pipelining in order, chunked bodies, Expect: 100-continue, limits (413/414/431) answered before the body is read,
malformed requests (400), Connection: close, a failing app (500, connection closed), graceful shutdown, lifespan;
the app's synchronous fast lane; and all of it again with helper event loops (connections dealt round-robin over
two loops, the app living on the first).
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
    """Echoes method, path, query, body length and a header; /slow sleeps; /boom raises; POST /fast/... is
    answered by the fast lane (with the name of the thread that answered)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.fast_threads: set[str] = set()

    def fast_search(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes | None:
        if method != "POST" or not path.startswith("/fast/"):
            return None
        name = threading.current_thread().name
        self.fast_threads.add(name)
        out = orjson.dumps({"fast": True, "path": path, "len": len(body), "thread": name})
        return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(out), out)

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

    th = threading.Thread(target=run, daemon=True, name="front-main")
    th.start()
    assert ready.wait(10)
    try:
        yield port[0], srv
    finally:
        if srv.loop is not None and not srv.stopping:
            srv.loop.call_soon_threadsafe(srv.stop)
        th.join(10)
        assert not th.is_alive()


@pytest.fixture(scope="module", params=[1, 2], ids=["1-loop", "2-loops"])
def front(request: pytest.FixtureRequest) -> Iterator[tuple[int, EchoApp, Server]]:
    app = EchoApp()
    with _serving(app, keep_alive=5.0, loops=request.param) as (port, srv):
        yield port, app, srv
    assert app.events == ["startup", "shutdown"]
    assert not any(t.name == "vecta-http" for t in threading.enumerate())  # helper loops stopped and joined


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


@pytest.mark.parametrize("loops", [1, 2])
def test_a_request_that_stops_arriving_is_closed_after_the_idle_timeout(loops: int) -> None:
    with _serving(EchoApp(), keep_alive=0.3, loops=loops) as (port, _), _conn(port) as s, _conn(port) as s2:
        for c in (s, s2):  # with two loops: one connection on each
            c.sendall(b"POST /half HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        for _ in range(3):  # still arriving: kept open past the timeout
            time.sleep(0.15)
            s.sendall(b"d")
            s2.sendall(b"d")
        started = time.monotonic()
        assert _closed(s) and _closed(s2)  # then it stops: closed, with no answer
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


@pytest.mark.parametrize("loops", [1, 2])
def test_graceful_shutdown_finishes_in_flight_requests(loops: int) -> None:
    app = EchoApp()
    with _serving(app, loops=loops) as (port, srv):
        with _conn(port) as s, _conn(port) as s2:  # with two loops: one connection on each
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            s2.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.05)
            assert srv.loop is not None
            srv.loop.call_soon_threadsafe(srv.stop)
            assert _read_response(s, bytearray())[0] == 200
            assert _read_response(s2, bytearray())[0] == 200
            assert _closed(s) and _closed(s2)
    assert app.events == ["startup", "shutdown"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_fast_lane_in_order_and_on_every_loop(front: tuple[int, EchoApp, Server]) -> None:
    """The fast lane answers on the loop that read the request (each loop's own thread); a request pipelined
    behind a slow one waits its turn and goes through the app, so responses stay in order."""
    port, app, srv = front
    app.fast_threads.clear()
    conns = [_conn(port) for _ in range(4)]
    try:
        for i, s in enumerate(conns):
            buf = bytearray()
            s.sendall(b"POST /fast/%d HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab" % i)
            status, _, out = _read_response(s, buf)
            assert status == 200 and orjson.loads(out)["fast"] is True and orjson.loads(out)["len"] == 2
            s.sendall(
                b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /fast/behind HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz"
                b"POST /fast/last?q=1 HTTP/1.1\r\nHost: x\r\n\r\n"  # a query string: never the fast lane
            )
            answers = [orjson.loads(_read_response(s, buf)[2]) for _ in range(3)]
            assert [a["path"] for a in answers] == ["/slow", "/fast/behind", "/fast/last"]
            assert "fast" not in answers[1] and answers[1]["len"] == 1 and answers[2]["query"] == "q=1"
    finally:
        for s in conns:
            s.close()
    expected = {"front-main"} if srv.loops == 1 else {"front-main", "vecta-http"}
    assert app.fast_threads == expected

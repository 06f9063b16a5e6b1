"""The edge's HTTP/1.1 client (services/api/edge_client.py) against a real HTTP peer on loopback that can also
misbehave: keep-alive reuse, answers relayed whole or streamed, chunked bodies, ``Connection: close``, refused
connections, engines that drop the connection mid-answer or never answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from services.api.edge_client import EngineClient, EngineUnreachable, RequestBodyError

Handler = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[bool]]  # (method, target, writer) -> keep open


class Peer:
    """A loopback HTTP/1.1 server whose answers the test decides; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes, dict[bytes, bytes], bytes]] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *lines = head[:-4].split(b"\r\n")
                method, target, _ = line.split(b" ")
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines)}
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                self.requests.append((method, target, headers, body))
                if not await self.handler(method, target, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest_asyncio.fixture
async def peer_factory() -> AsyncIterator[Callable[[Handler], Awaitable[Peer]]]:
    peers: list[Peer] = []

    async def start(handler: Handler) -> Peer:
        peer = Peer(handler)
        peer.server = await asyncio.start_server(peer._serve, "127.0.0.1", 0)
        peers.append(peer)
        return peer

    yield start
    for p in peers:
        assert p.server is not None
        p.server.close()


def answer(status: int, body: bytes, *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 %d X" % status, b"content-type: application/json", b"content-length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


HEADERS = [(b"authorization", b"Bearer engine-token"), (b"content-type", b"application/json")]


async def test_small_answers_whole_over_one_kept_alive_connection(peer_factory) -> None:  # type: ignore[no-untyped-def]
    async def handler(method: bytes, target: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(answer(200, b'{"target":"%s"}' % target, b"retry-after: 3", b"x-private: no"))
        return True

    peer = await peer_factory(handler)
    client = EngineClient(timeout=5)
    try:
        for i in range(3):
            r = await client.request("POST", peer.url, b"/v1/collections/c/search?x=%d" % i, HEADERS, b'{"k":1}')
            assert r.status == 200
            assert r.body == b'{"target":"/v1/collections/c/search?x=%d"}' % i
            assert r.headers == [(b"content-type", b"application/json"), (b"retry-after", b"3")]  # relayed only
        assert peer.connections == 1
        method, target, headers, body = peer.requests[0]
        assert (method, target, body) == (b"POST", b"/v1/collections/c/search?x=0", b'{"k":1}')
        assert headers[b"authorization"] == b"Bearer engine-token"
        assert headers[b"host"] == peer.url.removeprefix("http://").encode()
        assert headers[b"content-length"] == b"7"
    finally:
        await client.close()


async def test_large_chunked_answers_are_streamed_then_the_connection_is_reused(peer_factory) -> None:  # type: ignore[no-untyped-def]
    piece = b"x" * 65536
    pieces = 50  # 3.2 MiB, past the 1 MiB buffer limit

    async def handler(method: bytes, target: bytes, w: asyncio.StreamWriter) -> bool:
        if target.endswith(b"/small"):
            w.write(answer(200, b"{}"))
            return True
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(pieces):
            w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await w.drain()
        w.write(b"0\r\n\r\n")
        return True

    peer = await peer_factory(handler)
    client = EngineClient(timeout=5)
    try:
        r = await client.request("POST", peer.url, b"/big", HEADERS, b"{}")
        assert r.status == 200 and r.body is None
        got = b"".join([chunk async for chunk in r.stream()])
        assert got == piece * pieces
        r = await client.request("GET", peer.url, b"/small", HEADERS, b"")
        assert r.body == b"{}"
        assert peer.connections == 1
        # a streamed answer abandoned half-way closes its connection instead of returning it to the pool
        r = await client.request("POST", peer.url, b"/big", HEADERS, b"{}")
        stream = r.stream()
        await stream.__anext__()
        await stream.aclose()
        assert (await client.request("GET", peer.url, b"/small", HEADERS, b"")).body == b"{}"
        assert peer.connections == 2
    finally:
        await client.close()


async def test_connection_close_is_not_reused(peer_factory) -> None:  # type: ignore[no-untyped-def]
    async def handler(method: bytes, target: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(answer(404, b'{"status":404}', b"connection: close"))
        return False

    peer = await peer_factory(handler)
    client = EngineClient(timeout=5)
    try:
        for _ in range(2):
            r = await client.request("GET", peer.url, b"/v1/collections/nope", HEADERS, b"")
            assert (r.status, r.body) == (404, b'{"status":404}')
        assert peer.connections == 2
    finally:
        await client.close()


async def test_refused_connection_was_never_sent() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    client = EngineClient(timeout=5)
    try:
        with pytest.raises(EngineUnreachable) as info:
            await client.request("POST", f"http://127.0.0.1:{port}", b"/x", HEADERS, b"{}")
        assert info.value.never_sent
    finally:
        await client.close()


async def test_dropped_mid_answer_may_have_been_sent(peer_factory) -> None:  # type: ignore[no-untyped-def]
    async def handler(method: bytes, target: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"partial')
        await w.drain()
        return False

    peer = await peer_factory(handler)
    client = EngineClient(timeout=5)
    try:
        with pytest.raises(EngineUnreachable) as info:
            await client.request("POST", peer.url, b"/x", HEADERS, b"{}")
        assert not info.value.never_sent
    finally:
        await client.close()


async def test_malformed_answer_is_an_error(peer_factory) -> None:  # type: ignore[no-untyped-def]
    async def handler(method: bytes, target: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"NOT HTTP AT ALL\r\n\r\n")
        return True

    peer = await peer_factory(handler)
    client = EngineClient(timeout=5)
    try:
        with pytest.raises(EngineUnreachable):
            await client.request("GET", peer.url, b"/x", HEADERS, b"")
    finally:
        await client.close()


async def test_no_answer_times_out_and_the_connection_is_dropped(peer_factory) -> None:  # type: ignore[no-untyped-def]
    async def handler(method: bytes, target: bytes, w: asyncio.StreamWriter) -> bool:
        if target == b"/slow":
            await asyncio.sleep(30)
        w.write(answer(200, b"{}"))
        return True

    peer = await peer_factory(handler)
    client = EngineClient(timeout=0.3)
    try:
        with pytest.raises(TimeoutError):
            await client.request("POST", peer.url, b"/slow", HEADERS, b"{}")
        assert (await client.request("GET", peer.url, b"/fast", HEADERS, b"")).body == b"{}"
        assert peer.connections == 2  # the timed-out connection was not reused
    finally:
        await client.close()


async def test_large_bodies_and_encoded_targets_go_as_given(peer_factory) -> None:  # type: ignore[no-untyped-def]
    async def handler(method: bytes, target: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(answer(200, b"{}"))
        return True

    peer = await peer_factory(handler)
    client = EngineClient(timeout=5)
    body = b"[" + b"1," * 100_000 + b"1]"  # past the size up to which head and body are joined
    try:
        pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]  # as a large body arrives
        for given in (body, pieces):
            await client.request("POST", peer.url, b"/v1/collections/a%20b/upsert", HEADERS, given)
        assert [(t, len(b)) for _, t, _, b in peer.requests] == [(b"/v1/collections/a%20b/upsert", len(body))] * 2
        assert peer.requests[0][3] == body and peer.requests[1][3] == body and peer.connections == 1
    finally:
        await client.close()


async def test_requests_in_flight_per_engine_are_bounded(peer_factory) -> None:  # type: ignore[no-untyped-def]
    release = asyncio.Event()

    async def handler(method: bytes, target: bytes, w: asyncio.StreamWriter) -> bool:
        await release.wait()
        w.write(answer(200, target))
        return True

    peer = await peer_factory(handler)
    client = EngineClient(timeout=10, limit_per_host=2)
    try:
        tasks = [asyncio.create_task(client.request("GET", peer.url, b"/%d" % i, HEADERS, b"")) for i in range(6)]
        while len(peer.requests) < 2:
            await asyncio.sleep(0.01)
        tasks[2].cancel()  # a waiting request given up does not hold a turn
        await asyncio.sleep(0.05)
        assert len(peer.requests) == 2  # the others wait for a free slot
        release.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[2], asyncio.CancelledError)
        assert sorted(r.body for r in done if not isinstance(r, BaseException)) == [b"/0", b"/1", b"/3", b"/4", b"/5"]
        assert peer.connections == 2
    finally:
        await client.close()


# -- streamed request bodies (request_streamed) ------------------------------------------------------------------


class ClientLeft(Exception):
    """What the edge's body source raises when the client disconnects mid-body."""


async def test_streamed_body_reaches_the_engine_while_it_is_still_arriving(peer_factory) -> None:  # type: ignore[no-untyped-def]
    piece = b"y" * 65536
    first_read = asyncio.Event()
    got: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            first = await reader.readexactly(len(piece))
            first_read.set()  # the engine has the first piece before the client sends the second
            got.append(first + await reader.readexactly(length - len(piece)))
            w.write(answer(200, b"{}"))

    connections = 0

    async def counted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await serve(r, w)

    server = await asyncio.start_server(counted, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = EngineClient(timeout=5)

    async def body() -> AsyncIterator[bytes]:
        yield piece
        await asyncio.wait_for(first_read.wait(), 10)  # would never come if the body were read whole first
        for _ in range(3):
            yield piece

    try:
        r = await client.request_streamed("POST", url, b"/v1/collections/c/upsert", HEADERS, 4 * len(piece), body())
        assert (r.status, r.body) == (200, b"{}")
        assert got == [piece * 4]
        # the connection is reused once the body was written whole and answered
        r = await client.request("POST", url, b"/v1/collections/c/upsert", HEADERS, piece)
        assert r.status == 200 and connections == 1
    finally:
        await client.close()
        server.close()


async def test_streamed_body_waits_for_the_engine_to_read(peer_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from services.api import edge_client

    conns: list[edge_client.Connection] = []
    begin = edge_client.Connection.begin_streamed

    def spy(self: edge_client.Connection, head: bytes) -> asyncio.Future[edge_client.EngineResponse]:
        conns.append(self)
        return begin(self, head)

    monkeypatch.setattr(edge_client.Connection, "begin_streamed", spy)
    drains = 0
    drain = edge_client.Connection.drain

    async def counted_drain(self: edge_client.Connection) -> None:
        nonlocal drains
        drains += 1
        await drain(self)

    monkeypatch.setattr(edge_client.Connection, "drain", counted_drain)
    piece = b"z" * 65536
    pieces = 400  # 25 MiB: more than the loopback socket buffers hold while the engine does not read
    go = asyncio.Event()

    async def handler(method: bytes, target: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(answer(200, b"{}"))
        return True

    peer = await peer_factory(handler)
    orig_serve = peer._serve

    async def slow_start(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(go.wait(), 0.5)  # the engine reads nothing for a while
        except TimeoutError:
            pass
        await orig_serve(reader, writer)

    assert peer.server is not None
    peer.server.close()
    peer.server = await asyncio.start_server(slow_start, "127.0.0.1", 0)
    buffered: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for _ in range(pieces):
            if conns and conns[0].transport is not None:
                buffered.append(conns[0].transport.get_write_buffer_size())
            yield piece
        go.set()

    client = EngineClient(timeout=10)
    try:
        r = await client.request_streamed("POST", peer.url, b"/up", HEADERS, pieces * len(piece), body())
        assert r.status == 200
        assert peer.requests[0][3] == piece * pieces
        assert drains  # the engine's stall was felt: the body waited for the transport to drain
        assert max(buffered) <= 2 * len(piece) + 65536  # never more than the high-water mark and a piece or two
    finally:
        await client.close()


@pytest.mark.parametrize("case", ["client left", "longer", "shorter", "stalled"])
async def test_failed_streamed_body_closes_the_connection(peer_factory, case: str) -> None:  # type: ignore[no-untyped-def]
    async def handler(method: bytes, target: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(answer(200, b"{}"))
        return True

    peer = await peer_factory(handler)
    client = EngineClient(timeout=0.3 if case == "stalled" else 5)
    piece = b"p" * 1000

    async def body() -> AsyncIterator[bytes]:
        yield piece
        await asyncio.sleep(0)
        if case == "client left":
            raise ClientLeft
        if case == "stalled":
            await asyncio.sleep(30)
        yield piece
        if case == "longer":
            yield piece

    try:
        # a kept-alive connection first, so the failed request would reuse (and poison) it
        assert (await client.request("POST", peer.url, b"/ok", HEADERS, b"{}")).status == 200
        with pytest.raises(ClientLeft if case == "client left" else RequestBodyError) as info:
            declared = 3000 if case == "shorter" else 2000
            await client.request_streamed("POST", peer.url, b"/up", HEADERS, declared, body())
        if case == "stalled":
            assert isinstance(info.value, RequestBodyError) and info.value.stalled
        # the half-written request was never completed on that connection, and it is not reused
        assert (await client.request("POST", peer.url, b"/ok", HEADERS, b"{}")).status == 200
        assert [t for _, t, _, _ in peer.requests] == [b"/ok", b"/ok"]
        assert peer.connections == 2
        assert not any(c for p in client._pools.values() for c in p.idle if c.closed)
    finally:
        await client.close()


async def test_streamed_body_to_an_unreachable_engine_consumes_nothing() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    started = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal started
        started = True
        yield b"{}"

    client = EngineClient(timeout=5)
    try:
        with pytest.raises(EngineUnreachable) as info:
            await client.request_streamed("POST", f"http://127.0.0.1:{port}", b"/x", HEADERS, 2, body())
        assert info.value.never_sent and not started  # safe to retry with the same body
    finally:
        await client.close()


async def test_engine_answering_before_the_body_is_written_closes_the_connection(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from services.api import edge_client

    conns: list[edge_client.Connection] = []
    begin = edge_client.Connection.begin_streamed

    def spy(self: edge_client.Connection, head: bytes) -> asyncio.Future[edge_client.EngineResponse]:
        conns.append(self)
        return begin(self, head)

    monkeypatch.setattr(edge_client.Connection, "begin_streamed", spy)

    async def serve(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        w.write(answer(413, b'{"status":413}'))  # answers without reading the body (as for a request it refuses)
        await w.drain()
        try:
            await reader.read()  # then keeps the connection open until the client closes it
        finally:
            w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = EngineClient(timeout=5)

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        while not conns[0].complete:  # the answer has come in before the rest of the body
            await asyncio.sleep(0.01)
        yield b"a" * 1000

    try:
        r = await client.request_streamed("POST", url, b"/early", HEADERS, 2000, body())
        assert (r.status, r.body) == (413, b'{"status":413}')
        assert conns[0].closed and all(not p.idle for p in client._pools.values())  # not returned to the pool
    finally:
        await client.close()
        server.close()

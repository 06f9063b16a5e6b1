"""The edge's fast lane (services/api/fast_lane.py) under a real uvicorn on loopback: reads answered from the parser
callbacks give the usual path's answers; everything it declines (writes, errors, unknown credentials, other tenants)
still gets the usual answer; pipelined requests keep their order; a forward that fails goes down the usual path;
a large answer is relayed whole; a graceful shutdown waits for a forward in flight."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx
import orjson
import pytest_asyncio
import uvicorn
from fastapi import FastAPI
from sqlalchemy import update

from services.api.fast_lane import EdgeProtocol
from services.control_plane.clusters.models import Cluster
from tests.clusterkit import api_with, create_cluster, insert_cluster, records, set_status
from tests.conftest import auth, create_key, signup


def dp(cluster_id: str, rest: str = "") -> str:
    return f"/v1/clusters/{cluster_id}/collections{rest}"


class Served:
    def __init__(self, app: FastAPI, http: Any = EdgeProtocol) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, http=http, lifespan="off", log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        for _ in range(200):
            if self.server.started:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("uvicorn did not start")

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.wait_for(self.task, 15)


async def _serve(app: FastAPI) -> AsyncIterator[Served]:
    served = Served(app)
    await served.start()
    try:
        yield served
    finally:
        await served.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """A real cluster with a collection ``docs`` (8-d, a string field, a text field) and 60 records, a reader key
    limited to it, a key for another cluster, and the API served by uvicorn with the fast lane."""
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50010))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        t = await signup(client, "fast-lane", "Fast Lane Org")
        cid = (await create_cluster(client, t.access_token, t.project_id, name="fast"))["id"]
        other = await insert_cluster(app, t.org_id, t.project_id, "RUNNING")
        try:
            spec = {"name": "docs", "dimension": 8, "metric": "cosine", "text_field": "body",
                    "fields": [{"name": "lang", "type": "string"}]}  # fmt: skip
            r = await client.post(dp(cid), json=spec, headers=t.headers)
            assert r.status_code == 201, r.text
            recs = records(60, dimension=8, prefix="d")
            for i, rec in enumerate(recs):
                rec["metadata"] = {"lang": "en" if i % 3 else "fr"}
                rec["text"] = f"document number {i} about {'cats' if i % 2 else 'dogs'}"
            r = await client.post(dp(cid, "/docs/upsert"), json={"records": recs}, headers=t.headers)
            assert r.status_code == 200, r.text
            roles = [{"project_id": t.project_id, "role": "data_reader", "cluster_ids": [cid]}]
            reader = (await create_key(client, t, project_roles=roles))["key"]
            roles = [{"project_id": t.project_id, "role": "project_admin", "cluster_ids": [other]}]
            elsewhere = (await create_key(client, t, project_roles=roles))["key"]
            async for served in _serve(app):
                yield {"t": t, "cid": cid, "reader": reader, "elsewhere": elsewhere, "served": served,
                       "usual": client, "recs": recs}  # fmt: skip
        finally:
            await client.delete(f"/v1/clusters/{cid}", headers=t.headers)
            await set_status(app, other, "DELETED")


READS = [
    ("/docs/search", {"vector": [0.1, 0.2, -0.3, 0.4, 0.5, -0.6, 0.7, 0.8], "top_k": 5}),
    (
        "/docs/search",
        {
            "vector": [0.1, 0.2, -0.3, 0.4, 0.5, -0.6, 0.7, 0.8],
            "top_k": 7,
            "filter": {"lang": "fr"},
            "include_metadata": True,
        },
    ),
    ("/docs/hybrid-search", {"vector": [0.3] * 8, "text": "cats", "top_k": 4}),
    ("/docs/fetch", {"ids": ["d1", "d2", "nope"], "include_vectors": True}),
    ("/docs/query", {"filter": {"lang": "en"}, "limit": 5}),
    ("/docs/count", {}),
]


async def test_reads_answer_as_on_the_usual_path(app: FastAPI, world: dict[str, Any]) -> None:
    edge = app.state.edge
    h = auth(world["reader"])
    async with httpx.AsyncClient(base_url=world["served"].url) as http:
        for rest, body in READS:
            usual = await world["usual"].post(dp(world["cid"], rest), json=body, headers=h)
            assert usual.status_code == 200, usual.text
            await http.post(dp(world["cid"], rest), json=body, headers=h)  # caches the key and the route
            before = edge.fast_forwarded
            fast = await http.post(dp(world["cid"], rest), json=body, headers={**h, "x-request-id": "req-fast-1"})
            assert edge.fast_forwarded == before + 1, f"{rest} did not take the fast lane"
            assert fast.status_code == 200
            assert fast.content == usual.content, rest
            assert fast.headers["content-type"] == usual.headers["content-type"]
            assert fast.headers["x-request-id"] == "req-fast-1"
            assert fast.headers["content-length"] == str(len(fast.content))
            assert "date" in fast.headers
        # Engine errors come back as the engine gave them, through the fast lane too.
        bad = {"vector": [0.1, 0.2], "top_k": 5}
        usual = await world["usual"].post(dp(world["cid"], "/docs/search"), json=bad, headers=h)
        before = edge.fast_forwarded
        fast = await http.post(dp(world["cid"], "/docs/search"), json=bad, headers=h)
        assert edge.fast_forwarded == before + 1
        assert (fast.status_code, fast.content) == (usual.status_code, usual.content)
        assert fast.status_code == 422 and fast.headers["content-type"].startswith("application/problem+json")
        # A body too large for the fast lane (a read never is) is handed over as it comes: the usual answer.
        huge = {"vector": [0.25] * 60_000, "top_k": 5}
        usual = await world["usual"].post(dp(world["cid"], "/docs/search"), json=huge, headers=h)
        before = edge.fast_forwarded
        fast = await http.post(dp(world["cid"], "/docs/search"), json=huge, headers=h)
        assert len(fast.request.content) > 256 << 10 and edge.fast_forwarded == before
        assert (fast.status_code, fast.content) == (usual.status_code, usual.content)
        assert fast.status_code == 422
        missing = await http.post(dp(world["cid"], "/nosuch/search"), json=READS[0][1], headers=h)
        assert missing.status_code == 404 and missing.json()["instance"] == dp(world["cid"], "/nosuch/search")


async def test_what_the_fast_lane_declines_gets_the_usual_answer(app: FastAPI, world: dict[str, Any]) -> None:
    edge = app.state.edge
    cid, body = world["cid"], READS[0][1]
    async with httpx.AsyncClient(base_url=world["served"].url) as http:
        await http.post(dp(cid, "/docs/search"), json=body, headers=auth(world["reader"]))  # route cached
        before = edge.fast_forwarded
        r = await http.post(dp(cid, "/docs/search"), json=body, headers=auth(world["elsewhere"]))
        assert r.status_code == 404 and r.json()["code"] == "cluster_not_found"  # another cluster's key
        r = await http.post(dp(cid, "/docs/search"), json=body, headers=auth("vk_nope_nope"))
        assert r.status_code == 401
        r = await http.post(dp(cid, "/docs/search"), json=body)
        assert r.status_code == 401
        r = await http.post(dp(cid, "/docs/upsert"), json={"records": records(1, 8)}, headers=auth(world["reader"]))
        assert r.status_code == 403  # a reader writing (writes never take the fast lane)
        r = await http.post(dp(cid, "/docs/search?x=1"), json=body, headers=auth(world["reader"]))
        assert r.status_code == 200  # a query string: the usual path
        r = await http.post(dp("cl_nope", "/docs/search"), json=body, headers=auth(world["reader"]))
        assert r.status_code == 404
        assert edge.fast_forwarded == before
        # A cluster that is not RUNNING: 503 from the usual path, even with its route cached a moment ago.
        await set_status(app, cid, "SUSPENDING")
        try:
            r = await http.post(dp(cid, "/docs/search"), json=body, headers=auth(world["reader"]))
            assert r.status_code == 503 and "retry-after" in r.headers
        finally:
            await set_status(app, cid, "RUNNING")
        assert edge.fast_forwarded == before


async def test_pipelined_requests_keep_their_order(app: FastAPI, world: dict[str, Any]) -> None:
    cid, key = world["cid"], world["reader"]
    port = world["served"].port

    def req(rest: str, body: dict[str, Any]) -> bytes:
        raw = orjson.dumps(body)
        return (
            f"POST {dp(cid, rest)} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(raw)}\r\n\r\n"
        ).encode() + raw

    expected = []
    async with httpx.AsyncClient(base_url=world["served"].url) as http:
        plan = [READS[0], ("/docs/count", {}), READS[3], READS[0], ("/docs/upsert", {"records": []}), READS[4]]
        for rest, body in plan:
            r = await http.post(dp(cid, rest), json=body, headers=auth(key))
            expected.append((r.status_code, r.content))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    before = app.state.edge.fast_forwarded
    try:
        for _ in range(3):  # the first pass warms the caches, the later ones go fast where they can
            writer.write(b"".join(req(rest, body) for rest, body in plan))
            got = await _read_responses(reader, len(plan))
            assert got == expected
        assert app.state.edge.fast_forwarded > before  # some went fast, with others queued behind them
    finally:
        writer.close()


async def _exchange(port: int, pieces: list[bytes], answers: int = 1) -> list[tuple[int, bytes]]:
    """Send ``pieces`` on a new connection, each in its own write (a short pause between them so that they
    arrive as separate reads), and read ``answers`` answers (or until the server closes the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(0.05)
            writer.write(piece)
            await writer.drain()
        return await _read_responses(reader, answers, until_closed=True)
    finally:
        writer.close()


def _raw_request(cid: str, key: str, rest: str, body: bytes, head: str | None = None, extra: str = "") -> bytes:
    head = head or f"POST {dp(cid, rest)} HTTP/1.1"
    return (
        f"{head}\r\nhost: x\r\nauthorization: Bearer {key}\r\n{extra}"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_a_request_whole_or_split_over_reads_goes_fast_alike(app: FastAPI, world: dict[str, Any]) -> None:
    """A read that arrives in one piece and the same request split over two reads both take the fast lane and
    answer the usual path's bytes."""
    edge = app.state.edge
    cid, key, port = world["cid"], world["reader"], world["served"].port
    for rest, doc in READS:
        body = orjson.dumps(doc)
        usual = await world["usual"].post(
            dp(cid, rest), content=body, headers={**auth(key), "content-type": "application/json"}
        )
        await _exchange(port, [_raw_request(cid, key, rest, body)])  # warms the caches
        fast_before = edge.fast_forwarded
        whole = await _exchange(port, [_raw_request(cid, key, rest, body)])
        req = _raw_request(cid, key, rest, body)
        split = await _exchange(port, [req[:40], req[40:]])
        assert edge.fast_forwarded == fast_before + 2, rest
        assert whole == split == [(200, usual.content)], rest


ODD_HEADS = [
    # each is answered exactly as with the fast lane turned off (uvicorn's own protocol)
    ("folded header", "", "x-note: a\r\n b\r\n"),
    ("two lengths", "", "content-length: 2\r\n"),
    ("chunked", "", "transfer-encoding: chunked\r\n"),
    ("connection close", "", "connection: close\r\n"),
    ("obs-text value", "", "x-note: caf\u00e9\r\n"),
    ("HTTP/1.0", "POST {path} HTTP/1.0", ""),
    ("lower-case method", "post {path} HTTP/1.1", ""),
    ("empty header value", "", "x-note:\r\n"),
    ("space before colon", "", "x-note : a\r\n"),
    ("query string", "POST {path}?a=1 HTTP/1.1", ""),
    ("encoded name", "POST {path_enc} HTTP/1.1", ""),
]


async def test_odd_requests_get_the_same_answer_with_and_without_the_fast_lane(
    app: FastAPI, world: dict[str, Any]
) -> None:
    cid, key, port = world["cid"], world["reader"], world["served"].port
    body = orjson.dumps(READS[0][1])
    path = dp(cid, "/docs/search")
    plain = Served(app, http="httptools")  # uvicorn's own protocol: the reference
    await plain.start()
    try:
        for what, head, extra in ODD_HEADS:
            head = head.format(path=path, path_enc=path.replace("docs", "d%6Fcs")) if head else ""
            req = _raw_request(cid, key, "/docs/search", body, head or None, extra).replace("é".encode(), b"\xe9")
            got = await _exchange(port, [req])
            want = await _exchange(plain.port, [req])
            assert len(want) == 1 and got == want, what
    finally:
        await plain.stop()


async def test_a_request_with_another_behind_it_in_one_read(app: FastAPI, world: dict[str, Any]) -> None:
    """Two requests in one read (pipelined): the first may go fast, the answers keep their order."""
    cid, key, port = world["cid"], world["reader"], world["served"].port
    one = _raw_request(cid, key, "/docs/search", orjson.dumps(READS[0][1]))
    two = _raw_request(cid, key, "/docs/count", b"{}")
    got = await _exchange(port, [one + two], answers=2)
    single = await _exchange(port, [one]) + await _exchange(port, [two])
    assert got == single and [s for s, _ in got] == [200, 200]


async def _read_responses(reader: asyncio.StreamReader, n: int, until_closed: bool = False) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    current: dict[str, Any] = {}

    class P:
        def on_message_begin(self) -> None:
            current.clear()
            current["body"] = []

        def on_body(self, b: bytes) -> None:
            current["body"].append(b)

        def on_message_complete(self) -> None:
            out.append((parser.get_status_code(), b"".join(current["body"])))

    parser = httptools.HttpResponseParser(P())
    while len(out) < n:
        data = await asyncio.wait_for(reader.read(65536), 10)
        if not data and until_closed:
            break
        assert data, f"connection closed after {len(out)} answers"
        parser.feed_data(data)
    return out


# -- against a fake engine --------------------------------------------------------------------------------------
class FakeEngine:
    """Answers every request with ``answer``; ``drop_next`` closes the connection the next request came on
    without answering; ``delay`` holds answers back."""

    def __init__(self) -> None:
        self.answer = b'{"matches":[]}'
        self.drop_next = 0
        self.delay = 0.0
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        self.split = 0  # write the answer in two pieces, this many bytes first

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                self.requests += 1
                if self.drop_next:
                    self.drop_next -= 1
                    writer.transport.abort()
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                out = (self.head % len(self.answer) if b"%d" in self.head else self.head) + self.answer
                if self.split:
                    writer.write(out[: self.split])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    out = out[self.split :]
                writer.write(out)
                await writer.drain()
                if b"connection: close" in self.head:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest_asyncio.fixture(loop_scope="session")
async def fake(app: FastAPI, world: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    t = world["t"]
    engine = FakeEngine()
    url = await engine.start()
    cid = await insert_cluster(app, t.org_id, t.project_id, "RUNNING")
    async with app.state.db.transaction() as s:
        await s.execute(update(Cluster).where(Cluster.id == cid).values(engine_url=url))
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50011))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        roles = [{"project_id": t.project_id, "role": "data_reader", "cluster_ids": [cid]}]
        key = (await create_key(client, t, project_roles=roles))["key"]
    try:
        yield {"engine": engine, "cid": cid, "h": auth(key)}
    finally:
        await engine.stop()
        await set_status(app, cid, "DELETED")


async def test_a_failed_forward_goes_down_the_usual_path(
    app: FastAPI, world: dict[str, Any], fake: dict[str, Any]
) -> None:
    edge, engine = app.state.edge, fake["engine"]
    async with httpx.AsyncClient(base_url=world["served"].url) as http:
        url = dp(fake["cid"], "/docs/search")
        r = await http.post(url, json={"vector": [1.0]}, headers=fake["h"])
        assert r.status_code == 200  # the usual path: pools a connection
        before, seen = edge.fast_forwarded, engine.requests
        engine.drop_next = 1
        r = await http.post(url, json={"vector": [1.0]}, headers=fake["h"])
        assert r.status_code == 200 and r.content == engine.answer
        assert edge.fast_forwarded == before + 1  # tried fast, dropped, then asked again on the usual path
        assert engine.requests == seen + 2


ANSWERS = [
    # (what, head, answer body, split): how the engine answers
    ("plain", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n", b"{}", 0),
    ("problem", b"HTTP/1.1 404 Not Found\r\ncontent-type: application/problem+json\r\ncontent-length: %d\r\n"
     b"x-other: 1\r\n\r\n", b'{"status":404}', 0),
    ("retry-after", b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 2\r\ncontent-type: application/json\r\n"
     b"content-length: %d\r\n\r\n", b'{"status":503}', 0),
    ("split", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n", b'{"a":1}', 20),
    ("chunked", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
     b'7\r\n{"a":2}\r\n0\r\n\r\n', 0),
    ("connection close", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
     b"content-length: %d\r\n\r\n", b'{"a":3}', 0),
    ("folded", b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-a: 1\r\n 2\r\ncontent-length: %d\r\n\r\n",
     b'{"a":4}', 0),
]  # fmt: skip


async def test_engine_answers_read_raw_or_by_llhttp_are_relayed_alike(
    app: FastAPI, world: dict[str, Any], fake: dict[str, Any]
) -> None:
    """Each way the engine may answer reaches the client the same through the fast lane as through the usual
    path."""
    edge, engine = app.state.edge, fake["engine"]
    url = dp(fake["cid"], "/docs/search")
    async with httpx.AsyncClient(base_url=world["served"].url) as http:
        for what, head, answer, split in ANSWERS:
            engine.head, engine.answer, engine.split = ANSWERS[0][1], answer, 0
            await http.post(url, json={"vector": [1.0]}, headers=fake["h"])  # a pooled connection for the next
            engine.head, engine.split = head, split
            fast_before = edge.fast_forwarded
            fast = await http.post(url, json={"vector": [1.0]}, headers=fake["h"])
            usual = await world["usual"].post(url, json={"vector": [1.0]}, headers=fake["h"])
            assert edge.fast_forwarded == fast_before + 1, what
            assert (fast.status_code, fast.content) == (usual.status_code, usual.content), what
            for name in ("content-type", "retry-after", "x-other"):
                assert fast.headers.get(name) == usual.headers.get(name), (what, name)
    engine.head = ANSWERS[0][1]
    engine.split = 0
    engine.answer = b'{"matches":[]}'


async def test_a_large_answer_is_relayed_whole(app: FastAPI, world: dict[str, Any], fake: dict[str, Any]) -> None:
    edge, engine = app.state.edge, fake["engine"]
    engine.answer = orjson.dumps({"records": [{"id": f"r{i}", "pad": "x" * 1000} for i in range(3000)]})
    assert len(engine.answer) > 2 << 20
    try:
        async with httpx.AsyncClient(base_url=world["served"].url) as http:
            url = dp(fake["cid"], "/docs/fetch")
            await http.post(url, json={"ids": ["a"]}, headers=fake["h"])
            before = edge.fast_forwarded
            for _ in range(2):  # and the connection stays usable after it
                r = await http.post(url, json={"ids": ["a"]}, headers=fake["h"])
                assert r.status_code == 200 and r.content == engine.answer
            assert edge.fast_forwarded == before + 2
    finally:
        engine.answer = b'{"matches":[]}'


async def test_graceful_shutdown_waits_for_a_forward_in_flight(
    app: FastAPI, world: dict[str, Any], fake: dict[str, Any]
) -> None:
    edge, engine = app.state.edge, fake["engine"]
    async for served in _serve(app):
        async with httpx.AsyncClient(base_url=served.url) as http:
            url = dp(fake["cid"], "/docs/count")
            assert (await http.post(url, json={}, headers=fake["h"])).status_code == 200
            before = edge.fast_forwarded
            engine.delay = 0.5
            try:
                pending = asyncio.create_task(http.post(url, json={}, headers=fake["h"]))
                await asyncio.sleep(0.2)
                assert edge.fast_forwarded == before + 1
                served.server.should_exit = True  # (the fixture's stop then finds it stopping)
                r = await pending
                assert r.status_code == 200 and r.content == engine.answer
            finally:
                engine.delay = 0.0


async def test_steady_use_stays_fast_and_a_revocation_still_lands_within_the_ttl(
    app: FastAPI, world: dict[str, Any]
) -> None:
    """The key's verification and the cluster's route are renewed in the background while in use, so steady traffic
    never falls back to the usual path; yet a key revoked by another API process (no cache invalidation here) is
    refused within the cache's TTL (1 s), as on the usual path."""
    from services.auth.models import ApiKey
    from services.core.db import utcnow

    t, cid, edge = world["t"], world["cid"], app.state.edge
    roles = [{"project_id": t.project_id, "role": "data_reader", "cluster_ids": [cid]}]
    key = await create_key(world["usual"], t, project_roles=roles)
    h = auth(key["key"])
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=world["served"].url) as http:
        url, body = dp(cid, "/docs/search"), READS[0][1]
        assert (await http.post(url, json=body, headers=h)).status_code == 200
        before, sent = edge.fast_forwarded, 0
        end = loop.time() + 2.6
        while loop.time() < end:
            r = await http.post(url, json=body, headers=h)
            assert r.status_code == 200
            sent += 1
            await asyncio.sleep(0.005)
        assert sent > 100
        assert edge.fast_forwarded - before >= sent - 2, (edge.fast_forwarded - before, sent)

        async with app.state.db.transaction() as s:
            await s.execute(update(ApiKey).where(ApiKey.id == key["id"]).values(revoked_at=utcnow()))
        revoked_at = loop.time()
        while True:
            r = await http.post(url, json=body, headers=h)
            if r.status_code == 401:
                break
            assert r.status_code == 200
            assert loop.time() - revoked_at < 1.5, "a revoked key was still served after the cache's TTL"
            await asyncio.sleep(0.01)
        assert r.json()["code"] == "invalid_api_key"


async def test_an_engine_that_does_not_answer_in_time_is_503_once(
    app: FastAPI, world: dict[str, Any], fake: dict[str, Any]
) -> None:
    edge, engine = app.state.edge, fake["engine"]
    url = dp(fake["cid"], "/docs/count")
    saved = edge.engine.timeout
    async with httpx.AsyncClient(base_url=world["served"].url) as http:
        assert (await http.post(url, json={}, headers=fake["h"])).status_code == 200
        edge.engine.timeout = 0.3
        engine.delay = 1.0
        try:
            before, seen = edge.fast_forwarded, engine.requests
            t0 = asyncio.get_running_loop().time()
            fast = await http.post(url, json={}, headers=fake["h"])
            waited = asyncio.get_running_loop().time() - t0
            asked = engine.requests - seen
            usual = await world["usual"].post(url, json={}, headers=fake["h"])
        finally:
            edge.engine.timeout = saved
            engine.delay = 0.0
    assert edge.fast_forwarded == before + 1 and asked == 1  # not asked twice
    assert waited < 0.9
    assert (fast.status_code, fast.content) == (usual.status_code, usual.content)
    assert fast.json()["code"] == "engine_timeout" and fast.headers["retry-after"] == usual.headers["retry-after"]


async def test_rate_limits_hold_on_the_fast_lane(app: FastAPI, world: dict[str, Any]) -> None:
    """A second API (same database) with 5 requests a second per key: reads that would go fast are counted there,
    and the sixth in a second gets the usual path's 429 with Retry-After (in process memory, or through Redis when
    the suite runs with it)."""
    env = {"VECTA_DATAPLANE_RATE_PER_KEY": "5", "VECTA_DATAPLANE_RATE_PER_CLUSTER": "1000"}
    async with api_with(env) as tight:
        t, cid = world["t"], world["cid"]
        roles = [{"project_id": t.project_id, "role": "data_reader", "cluster_ids": [cid]}]
        h = auth((await create_key(world["usual"], t, project_roles=roles))["key"])
        async for served in _serve(tight):
            async with httpx.AsyncClient(base_url=served.url) as http:
                url, body = dp(cid, "/docs/count"), {}
                loop = asyncio.get_running_loop()
                await asyncio.sleep(1.02 - time.time() % 1)  # a fresh one-second window
                assert (await http.post(url, json=body, headers=h)).status_code == 200  # warms the caches
                await asyncio.sleep(1.02 - time.time() % 1)
                start = loop.time()
                codes = [(await http.post(url, json=body, headers=h)) for _ in range(9)]
                assert loop.time() - start < 0.9, "the requests did not fit in one window"
    statuses = [r.status_code for r in codes]
    assert statuses[:5] == [200] * 5 and set(statuses[5:]) == {429}, statuses
    # (the first in the window may go the usual path: the caches warmed a second ago have just expired)
    assert tight.state.edge.fast_forwarded >= 4
    limited = codes[5]
    assert limited.json()["code"] == "rate_limited" and int(limited.headers["retry-after"]) >= 1


async def test_metrics_tell_how_much_goes_fast(app: FastAPI, world: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=world["served"].url) as http:
        for _ in range(3):
            r = await http.post(dp(world["cid"], "/docs/count"), json={}, headers=auth(world["reader"]))
            assert r.status_code == 200
        text = (await http.get("/metrics")).text
    line = next(x for x in text.splitlines() if x.startswith("vecta_edge_fast_lane_forwarded_total "))
    assert float(line.split()[1]) >= app.state.edge.fast_forwarded >= 2

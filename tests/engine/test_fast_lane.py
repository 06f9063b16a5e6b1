"""The engine's fast lane (EngineApp.fast_search, answered from the HTTP front's callback, on every event loop)
against the usual request path, in a real engine process: the same bytes for the same search, the usual errors
for everything it declines, metrics and read units still counted, and concurrent connections on several loops
getting exactly the single-connection answers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import numpy as np
import orjson
import pytest

from .conftest import TOKEN, EngineProcess

DIM = 8


def _request(path: bytes, body: bytes, token: str = TOKEN, ctype: bytes = b"application/json") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (path, token.encode(), ctype, len(body))
        + body
    )


def _response(s: socket.socket, buf: bytearray) -> bytes:
    """One whole response (head and body) as received."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, "closed before a response"
        buf += chunk
    head, _, _ = bytes(buf).partition(b"\r\n\r\n")
    n = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:"))
    total = len(head) + 4 + n
    while len(buf) < total:
        chunk = s.recv(65536)
        assert chunk, "closed mid-body"
        buf += chunk
    out = bytes(buf[:total])
    del buf[:total]
    return out


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def _body(resp: bytes) -> dict:
    return orjson.loads(resp.partition(b"\r\n\r\n")[2])


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    import os

    eng = EngineProcess(tmp_path_factory.mktemp("fast"), os.urandom(32), env={"VECTA_ENGINE_HTTP_LOOPS": "2"})
    eng.start()
    rng = np.random.default_rng(3)
    try:
        with eng.client() as c:
            for name, index in (("flatc", {"type": "flat"}), ("hnswc", {"type": "hnsw"})):
                spec = {"name": name, "dimension": DIM, "metric": "cosine", "index": index,
                        "fields": [{"name": "g", "type": "string"}, {"name": "n", "type": "int"}]}  # fmt: skip
                assert c.post("/v1/collections", json=spec).status_code == 201
                recs = [{"id": f"r{i}", "vector": rng.standard_normal(DIM).tolist(),
                         "metadata": {"g": "ab"[i % 2], "n": i}} for i in range(300)]  # fmt: skip
                assert c.post(f"/v1/collections/{name}/upsert", json={"records": recs}).status_code == 200
            assert c.post("/internal/flush", json={}).status_code == 200  # indexed: searches take the fast lane
        yield eng
    finally:
        eng.stop()


def test_fast_lane_answers_byte_for_byte_as_the_usual_path(engine: EngineProcess) -> None:
    rng = np.random.default_rng(4)
    with socket.create_connection(("127.0.0.1", engine.port), timeout=10) as s:
        buf = bytearray()
        for name in (b"flatc", b"hnswc"):
            for extra in (
                {},
                {"top_k": 3, "include_metadata": True},
                {"include_vectors": True, "params": {"ef": 50}},
                {"params": None, "include_metadata": False, "top_k": 7},
                {"filter": {"g": "a"}},  # not the fast lane's: the usual path both times
            ):
                body = orjson.dumps({"vector": rng.standard_normal(DIM).tolist(), **extra})
                s.sendall(_request(b"/v1/collections/%s/search" % name, body))
                fast = _response(s, buf)
                # a query string keeps a request out of the fast lane: the usual path answers the same body
                s.sendall(_request(b"/v1/collections/%s/search?via=usual" % name, body))
                usual = _response(s, buf)
                assert _status(fast) == 200 and fast == usual
                assert len(_body(fast)["results"]) == extra.get("top_k", 10)


@pytest.mark.parametrize(
    ("path", "body", "token", "ctype", "status", "code"),
    [
        (b"/v1/collections/hnswc/search", b'{"vector": [1, 2]}', TOKEN, b"application/json", 422,
         "dimension_mismatch"),
        (b"/v1/collections/hnswc/search", b'{"vector": [1,2,3,4,5,6,7,"x"]}', TOKEN, b"application/json", 400, None),
        (b"/v1/collections/hnswc/search", b'{"vector": [1,2,3,4,5,6,7,8], "top_k": 0}', TOKEN, b"application/json",
         400, "validation_error"),
        (b"/v1/collections/hnswc/search", b"{not json", TOKEN, b"application/json", 400, None),
        (b"/v1/collections/hnswc/search", b'{"vector": [0,0,0,0,0,0,0,0]}', TOKEN, b"application/json", 422,
         "invalid_vector"),  # cosine of a zero vector
        (b"/v1/collections/nope/search", b'{"vector": [1,2,3,4,5,6,7,8]}', TOKEN, b"application/json", 404,
         "collection_not_found"),
        (b"/v1/collections/hnswc/search", b'{"vector": [1,2,3,4,5,6,7,8]}', "wrong", b"application/json", 401, None),
        (b"/v1/collections/hnswc/search", b'{"vector": [1,2,3,4,5,6,7,8]}', TOKEN, b"text/plain", 415, None),
    ],
)  # fmt: skip
def test_what_the_fast_lane_declines_gets_the_usual_error(
    engine: EngineProcess, path: bytes, body: bytes, token: str, ctype: bytes, status: int, code: str | None
) -> None:
    with socket.create_connection(("127.0.0.1", engine.port), timeout=10) as s:
        buf = bytearray()
        s.sendall(_request(path, body, token, ctype))
        resp = _response(s, buf)
        assert _status(resp) == status
        assert b"content-type: application/problem+json" in resp.partition(b"\r\n\r\n")[0].lower()
        problem = _body(resp)
        assert problem["status"] == status and (code is None or problem["code"] == code)
        s.sendall(_request(b"/v1/collections/hnswc/search", b'{"vector": [1,2,3,4,5,6,7,8]}'))
        assert _status(_response(s, buf)) == 200  # the connection serves on


def test_fast_lane_counts_metrics_and_read_units(engine: EngineProcess) -> None:
    def counts() -> tuple[float, float]:
        with engine.client() as c:
            text = c.get("/metrics").text
            units = c.get("/internal/stats").json()["collections"]
        searches = sum(
            float(ln.rsplit(" ", 1)[1])
            for ln in text.splitlines()
            if ln.startswith("vecta_engine_requests_total{") and 'route="search"' in ln and 'status="200"' in ln
        )
        return searches, float(next(c["read_units"] for c in units if c["name"] == "flatc"))

    before = counts()
    with socket.create_connection(("127.0.0.1", engine.port), timeout=10) as s:
        buf = bytearray()
        for _ in range(5):
            s.sendall(_request(b"/v1/collections/flatc/search", b'{"vector": [1,2,3,4,5,6,7,8]}'))
            assert _status(_response(s, buf)) == 200
    after = counts()
    assert after[0] - before[0] == 5 and after[1] - before[1] >= 5


def test_concurrent_connections_on_several_loops_get_the_single_connection_answers(engine: EngineProcess) -> None:
    rng = np.random.default_rng(9)
    bodies = [orjson.dumps({"vector": rng.standard_normal(DIM).tolist(), "top_k": 5}) for _ in range(40)]
    with socket.create_connection(("127.0.0.1", engine.port), timeout=10) as s:
        buf = bytearray()
        expected = []
        for b in bodies:
            s.sendall(_request(b"/v1/collections/hnswc/search", b))
            expected.append(_body(_response(s, buf))["results"])
    got: dict[int, list] = {}
    errors: list[BaseException] = []
    with engine.client() as c:
        units0 = next(x["read_units"] for x in c.get("/internal/stats").json()["collections"] if x["name"] == "hnswc")

    def client(k: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", engine.port), timeout=10) as s:
                buf = bytearray()
                for rnd in range(5):
                    for i in range(k, len(bodies), 4):
                        s.sendall(_request(b"/v1/collections/hnswc/search", bodies[i]))
                        res = _body(_response(s, buf))["results"]
                        if rnd == 0:
                            got[i] = res
                        assert res == got[i]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert [got[i] for i in range(len(bodies))] == expected
    with engine.client() as c:  # one read unit per query (300 rows), none lost to the threads' races
        units1 = next(x["read_units"] for x in c.get("/internal/stats").json()["collections"] if x["name"] == "hnswc")
    assert units1 - units0 == 5 * len(bodies)

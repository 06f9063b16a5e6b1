"""The edge's fast lane: data-plane reads forwarded from uvicorn's parser callbacks, with no task, ASGI scope or await.

Why: with 8 clients on 2 cores every µs of the API's CPU per forwarded search adds ~4-8 µs at p50 (docs/benchmarks.md
sections 8, 12 and 13). On the usual path a forwarded search costs the API process ~150-175 µs of CPU: uvicorn's
request cycle and task, the ASGI messages, the edge's awaits and futures, and the engine client's. Here the
request is handled in ``on_message_complete`` and the engine's answer is written to the client from the engine
connection's own ``on_message_complete``: two parser callbacks and two writes (docs/decisions/008-edge-fast-lane.md).

What goes this way: a POST of one of the reads (``search``, ``hybrid-search``, ``fetch``, ``query``, ``count``) on a
plain collection name, HTTP/1.1 keep-alive, no query string, no percent-encoding, no ``Expect``, on a connection with
nothing else in flight, when ``Edge.fast_target`` finds everything it needs at hand (a cached verification of the
bearer, the cluster's cached RUNNING route, the privilege, the rate limits counted without waiting, an idle engine
connection).
Everything else, every error included, takes the usual path (``Edge.dispatch``): a request the fast lane declines is
handed to uvicorn as if it had just been parsed, and one whose forward fails (the engine went away, or a read
replica failed or is not in sync) is sent down the usual path then, which retries it as it retries any read (reads
are idempotent); a primary that does not answer in time gets the usual path's 503 ``engine_timeout`` at once. So the
answers are the usual path's, byte for byte, less the ordering of headers.

It subclasses uvicorn's httptools protocol and uses a few of its internals (the request cycle, the pipeline of
queued requests, ``on_response_complete``); ``uvicorn`` is pinned to a range where they are as used here, and if
they are missing the class is uvicorn's own, unchanged (``ENABLED``).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Iterator
from typing import Any

import orjson
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from services.api.edge import DATAPLANE_PREFIX, Edge, FastTarget, problem_instance
from services.api.middleware import observe, request_id_from
from services.core.errors import PROBLEM_CONTENT_TYPE, ServiceUnavailable

ENABLED = all(hasattr(HttpToolsProtocol, n) for n in ("_start_asgi_task", "on_response_complete", "shutdown"))
_TEMPLATE = DATAPLANE_PREFIX + "{rest}"
_PREFIX = b"/v1/clusters/"
FAST_BODY_LIMIT = 256 << 10  # reads are small: a larger body goes down the usual path (and its limits) as it comes


class _NoEvent:
    def set(self) -> None:  # uvicorn sets the current cycle's event when the connection is lost
        pass


class _InFlight:
    """Stands in for uvicorn's request cycle while a fast-lane request is in flight: requests pipelined behind it
    are queued, a graceful shutdown waits for it (``keep_alive`` False: closed once answered)."""

    __slots__ = ("disconnected", "keep_alive", "message_event", "response_complete")

    def __init__(self) -> None:
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = True
        self.message_event = _NoEvent()


class _Forward:
    """One request in the fast lane: the engine connection's sink (``edge_client.Sink``)."""

    __slots__ = ("body", "proto", "relayed", "rid", "scope", "started", "target")

    def __init__(self, proto: EdgeProtocol, scope: dict[str, Any], body: bytes, target: FastTarget, rid: bytes) -> None:
        self.proto = proto
        self.scope = scope
        self.body = body
        self.target = target
        self.rid = rid
        self.relayed: int | None = None  # the status of an answer being relayed piecewise
        self.started = time.perf_counter()

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], tail: bytes) -> list[bytes]:
        head = [STATUS_LINE[status]]
        for name, value in self.proto.server_state.default_headers:
            head += (name, b": ", value, b"\r\n")
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        head += (b"x-request-id: ", self.rid, b"\r\n", tail)
        return head

    def done(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes | None) -> None:
        proto = self.proto
        if body is None:  # relayed as it came (start/chunk)
            proto.fast_finished(self.scope["method"], status, self.started)
            return
        if status == 503 and self.target.member != self.target.route.engine_url:
            self.target_failed(None)  # a read replica not (yet) in sync: the usual path reads
            proto.fast_declined(self)  # from the primary
            return
        head = self._head(status, headers, b"content-length: %d\r\n\r\n" % len(body))
        head.append(body)
        if not proto.transport.is_closing():
            proto.transport.write(b"".join(head))
        proto.fast_finished(self.scope["method"], status, self.started)

    def start(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.relayed = status
        if length is None:  # no length given: the answer ends when the connection does
            tail = b"connection: close\r\n\r\n"
            self.proto.inflight.keep_alive = False
        else:
            tail = b"content-length: %d\r\n\r\n" % length
        if not self.proto.transport.is_closing():
            self.proto.transport.write(b"".join(self._head(status, headers, tail)))

    def chunk(self, data: bytes) -> None:
        if not self.proto.transport.is_closing():
            self.proto.transport.write(data)

    def failed(self, exc: BaseException) -> None:
        proto = self.proto
        status = self.relayed
        if status is not None:  # half relayed: as on the usual path, the connection is closed
            proto.transport.close()
            proto.fast_finished(self.scope["method"], status, self.started)
            return
        route = self.target.route
        if isinstance(exc, TimeoutError) and self.target.member == route.engine_url:
            # what the usual path answers (asking again would make the client wait twice as long for it)
            problem = ServiceUnavailable(
                f"cluster {route.id}'s engine did not answer in time", retry_after=2, code="engine_timeout"
            )
            doc = orjson.dumps(problem.problem(problem_instance(self.scope)))
            headers = [(b"content-type", PROBLEM_CONTENT_TYPE.encode())]
            headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in problem.headers.items()]
            self.done(problem.status, headers, doc)
            return
        self.target_failed(exc)
        proto.fast_declined(self)

    def target_failed(self, exc: BaseException | None) -> None:
        edge = self.proto.edge
        if edge is not None:
            edge.fast_failed(self.target, exc)


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the edge's fast lane (see the module's docstring). Run uvicorn with
    ``http=EdgeProtocol``; the app must be the ``VectaAPI`` (its ``state.edge``), possibly wrapped by uvicorn's
    middleware."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.edge: Edge | None = _find_edge(self.app)
        self.fast_body: list[bytes] | None = None  # a request being read for the fast lane
        self.fast_size = 0
        self.inflight = _InFlight()
        self.forward: _Forward | None = None  # the fast-lane request in flight
        self.auth_memo: list[bytes | str] = []  # the last bearer seen on this connection and its hash

    def on_headers_complete(self) -> None:
        url = self.url
        if (
            self.edge is not None
            and self.forward is None
            and url.startswith(_PREFIX)
            and self.parser.get_method() == b"POST"
            and (self.cycle is None or self.cycle.response_complete)
            and not self.pipeline
            and not self.expect_100_continue
            and self.parser.get_http_version() == "1.1"
            and self.parser.should_keep_alive()
            and not self.parser.should_upgrade()
            and b"?" not in url
            and b"%" not in url
            and b"#" not in url
            and url.isascii()
        ):
            path = url.decode("ascii", "replace")
            scope: Any = self.scope
            scope["method"] = "POST"
            scope["path"] = self.root_path + path
            scope["raw_path"] = self.root_path.encode("ascii") + url
            scope["query_string"] = b""
            self.fast_body = []
            self.fast_size = 0
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        pieces = self.fast_body
        if pieces is not None:
            pieces.append(body)
            self.fast_size += len(body)
            if self.fast_size > FAST_BODY_LIMIT:  # not for the fast lane: the app reads the rest as it comes
                self.fast_body = None
                self._to_asgi(self.scope, b"".join(pieces), more_body=True)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        pieces = self.fast_body
        if pieces is None:
            super().on_message_complete()
            return
        self.fast_body = None
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        scope: Any = self.scope
        edge = self.edge
        assert edge is not None  # the fast lane is only taken with an edge
        target = edge.fast_target(self.url, self.headers, body, self.auth_memo)
        if target is None:
            self._to_asgi(scope, body)
            return
        rid = None
        for name, value in self.headers:
            if name == b"x-request-id":
                rid = value
                break
        forward = _Forward(self, scope, body, target, request_id_from(rid).encode())
        self.forward = forward
        inflight = self.inflight
        inflight.response_complete = False
        inflight.keep_alive = True
        self.cycle = inflight  # type: ignore[assignment]  # requests pipelined behind this one wait
        edge.engine.send_on(target.conn, "POST", target.target, target.headers, body, forward)

    # -- the fast lane's ends ----------------------------------------------------------------------------
    def fast_finished(self, method: str, status: int, started: float) -> None:
        """The answer is written: what uvicorn does when a response completes."""
        self.forward = None
        inflight = self.inflight
        inflight.response_complete = True
        if self.cycle is inflight:
            self.cycle = None  # type: ignore[assignment]
        observe(method, _TEMPLATE, status, time.perf_counter() - started)
        if not inflight.keep_alive and not self.transport.is_closing():
            self.transport.close()  # asked to shut down meanwhile, or an answer delimited by the close
        self.on_response_complete()

    def fast_declined(self, forward: _Forward) -> None:
        """The forward failed before any of its answer was written: the request goes down the usual path."""
        self.forward = None
        keep_alive = self.inflight.keep_alive
        self.inflight.response_complete = True
        if self.transport.is_closing():
            if self.cycle is self.inflight:
                self.cycle = None  # type: ignore[assignment]
            return
        self._to_asgi(forward.scope, forward.body, keep_alive=keep_alive, first=self.cycle is not self.inflight)

    def _to_asgi(
        self,
        scope: Any,
        body: bytes,
        *,
        keep_alive: bool = True,
        first: bool = False,
        more_body: bool = False,
    ) -> None:
        """Serve a request read by the fast lane as uvicorn would have: its request cycle, holding the body (or
        its beginning, ``more_body``: the rest reaches the cycle through uvicorn's own ``on_body``), run by the app
        as a task. ``first``: requests were queued behind it meanwhile; it goes before them."""
        cycle = RequestResponseCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=keep_alive,
            on_response=self.on_response_complete,
        )
        cycle.body = bytearray(body) if more_body else body  # type: ignore[assignment]  # (bytes: handed over as is)
        cycle.more_body = more_body
        cycle.message_event.set()
        if not first:
            self.cycle = cycle
        self._start_asgi_task(cycle, self.app)

    def shutdown(self) -> None:
        if self.forward is not None:
            self.inflight.keep_alive = False  # closed once answered
            return
        super().shutdown()


class _Collector:
    """``vecta_edge_fast_lane_forwarded_total``: requests the fast lane forwarded, read from the edges at scrape
    time (nothing on the request path). Beside ``vecta_http_requests_total`` of the same route it tells how
    much of the traffic takes the fast lane."""

    def __init__(self) -> None:
        self.edges: weakref.WeakSet[Edge] = weakref.WeakSet()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "vecta_edge_fast_lane_forwarded", "Data-plane reads forwarded by the edge's fast lane (decision 008)"
        )
        family.add_metric([], float(sum(edge.fast_forwarded for edge in list(self.edges))))
        yield family


_COLLECTOR = _Collector()
REGISTRY.register(_COLLECTOR)


def _find_edge(app: Any) -> Edge | None:
    """The ``Edge`` of the VectaAPI behind uvicorn's wrappers (None before the app's startup ran, or for another
    app: then the protocol is uvicorn's own)."""
    for _ in range(8):
        state = getattr(app, "state", None)
        if state is not None:
            edge = getattr(state, "edge", None)
            if not isinstance(edge, Edge) or not ENABLED:
                return None
            _COLLECTOR.edges.add(edge)
            return edge
        app = getattr(app, "app", None)
        if app is None:
            break
    return None

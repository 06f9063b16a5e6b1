"""Shared helpers for the benchmarks: data loading, recall, a lean HTTP/1.1 client, closed-loop load runs,
process management and printing figures beside their baselines."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = Path(os.environ.get("BENCH_DATA") or BENCH / "data")  # BENCH_DATA: another data set (smoke tests)
PY = sys.executable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Dataset:
    ids: list[str]
    base: np.ndarray  # (n, d) float32, L2-normalised
    queries: np.ndarray  # (nq, d)
    gt: np.ndarray  # (nq, >=10) int indices into base, exact inner-product order
    metadata: list[dict]
    filters: dict[str, dict] = field(default_factory=dict)  # name -> {filter, mask, gt, selectivity}

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.base.shape[1])


def _exact(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    _, ids = index.search(queries, min(k, base.shape[0]))
    return ids.astype(np.int64)


def synthetic_dataset(n: int, k: int = 100, dim: int = 384, nq: int = 1000, seed: int = 7) -> Dataset:
    """Clustered random unit vectors with make_dataset.py's metadata: for iterating on the engine's HTTP path
    while bench/data is not built. Never the figures of record (those need the real embeddings)."""
    sys.path.insert(0, str(BENCH))
    from make_dataset import FILTERS, matches, metadata_for

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(16, n // 500), dim)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        x = centers[rng.integers(0, len(centers), m)] + 0.6 * rng.standard_normal((m, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    base, queries = draw(n), draw(nq)
    sources = ("python", "man", "info", "aws")
    metadata = [metadata_for(i, sources[i % 4]) for i in range(n)]
    filters = {}
    for name, flt in FILTERS.items():
        mask = np.fromiter((matches(m, flt) for m in metadata), dtype=bool, count=n)
        sel = np.flatnonzero(mask)
        sub = _exact(base[sel], queries, k)
        fgt = np.where(sub >= 0, sel[np.clip(sub, 0, None)], -1)
        filters[name] = {"filter": flt, "mask": mask, "gt": fgt, "selectivity": float(mask.mean())}
    ids = [f"p{i:07d}" for i in range(n)]
    return Dataset(ids=ids, base=base, queries=queries, gt=_exact(base, queries, k), metadata=metadata, filters=filters)


def load_dataset(n: int | None = None, k: int = 100, synthetic: bool = False) -> Dataset:
    """Load bench/data (built by make_dataset.py); with n smaller than the full set, use the first n records
    and recompute exact ground truth for that subset. ``synthetic``: see synthetic_dataset."""
    if synthetic:
        return synthetic_dataset(n or 100_000, k)
    manifest_path = DATA / "manifest.json"
    if not manifest_path.exists():
        sys.exit("bench/data is missing: run `HF_HUB_OFFLINE=1 .venv/bin/python bench/make_dataset.py` first")
    sys.path.insert(0, str(BENCH))
    from make_dataset import matches

    manifest = json.loads(manifest_path.read_text())
    full = manifest["n_base"]
    n = full if n is None else min(n, full)
    base = np.load(DATA / "base.npy", mmap_mode="r")[:n].copy()
    queries = np.load(DATA / "queries.npy")
    metadata = []
    with (DATA / "metadata.jsonl").open() as f:
        for line in itertools.islice(f, n):
            metadata.append(json.loads(line))
    ids = [f"p{i:07d}" for i in range(n)]
    gt = np.load(DATA / "gt.npy").astype(np.int64) if n == full else _exact(base, queries, k)
    filters = {}
    for name, spec in json.loads((DATA / "filters.json").read_text()).items():
        mask = np.fromiter((matches(m, spec["filter"]) for m in metadata), dtype=bool, count=n)
        if n == full:
            fgt = np.load(DATA / f"gt_{name}.npy").astype(np.int64)
        else:
            sel = np.flatnonzero(mask)
            sub = _exact(base[sel], queries, k)
            fgt = np.where(sub >= 0, sel[np.clip(sub, 0, None)], -1)
        filters[name] = {"filter": spec["filter"], "mask": mask, "gt": fgt, "selectivity": float(mask.mean())}
    return Dataset(ids=ids, base=base, queries=queries, gt=gt, metadata=metadata, filters=filters)


def recall_at(found: Sequence[Sequence[int]], gt: np.ndarray, k: int = 10) -> float:
    """Mean recall@k: |found[:k] ∩ gt[:k]| / |gt[:k]| (gt rows may be padded with -1)."""
    total = 0.0
    for row, truth in zip(found, gt, strict=False):
        t = {int(x) for x in truth[:k] if x >= 0}
        if not t:
            continue
        total += len(t.intersection(int(x) for x in list(row)[:k])) / len(t)
    return total / len(found)


def id_to_index(s: str) -> int:
    return int(s[1:])


# ---------------------------------------------------------------------------------------------- HTTP client


class RawHTTP:
    """A minimal keep-alive HTTP/1.1 client over one socket: it sends pre-built request bytes and reads one
    response (Content-Length or chunked).  Much cheaper per request than httpx/http.client, so the client
    is not what limits the measured server."""

    def __init__(self, host: str, port: int, timeout: float = 60.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self) -> None:
        self.close()
        s = socket.create_connection((self.host, self.port), timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = s, b""

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        self.sock.sendall(raw)
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            self._fill()
        head = self.buf[:end].lower()
        self.buf = self.buf[end + 4 :]
        status = int(head[9:12])
        cl = head.find(b"content-length:")
        if cl >= 0:
            eol = head.find(b"\r\n", cl)
            length = int(head[cl + 15 : eol if eol >= 0 else None])
            while len(self.buf) < length:
                self._fill()
            body, self.buf = self.buf[:length], self.buf[length:]
        elif b"transfer-encoding: chunked" in head:
            parts = []
            while True:
                while b"\r\n" not in self.buf:
                    self._fill()
                size_line, _, self.buf = self.buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    self._fill()
                parts.append(self.buf[:size])
                self.buf = self.buf[size + 2 :]
                if size == 0:
                    break
            body = b"".join(parts)
        else:
            body = b""
        if b"connection: close" in head:
            self.close()
        return status, body


def build_request(
    method: str, path: str, host: str, port: int, body: bytes | None = None, token: str | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head + (body or b"")


def http_json(
    host: str, port: int, method: str, path: str, obj=None, token: str | None = None, timeout: float = 600
) -> tuple[int, object]:
    import orjson

    c = RawHTTP(host, port, timeout=timeout)
    try:
        body = None if obj is None else orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
        status, data = c.request(build_request(method, path, host, port, body, token))
    finally:
        c.close()
    try:
        return status, orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        return status, data.decode(errors="replace")


# ---------------------------------------------------------------------------------------------- load runs


@dataclass
class RunResult:
    label: str
    requests: int
    queries: int
    seconds: float
    latencies: np.ndarray  # seconds per request
    errors: int = 0
    outputs: dict[int, object] = field(default_factory=dict)

    @property
    def qps(self) -> float:
        return self.queries / self.seconds if self.seconds else 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float:
        return float(np.percentile(self.latencies, p) * 1000) if len(self.latencies) else float("nan")


def closed_loop(
    label: str,
    make_worker: Callable[[], Callable[[int], object]],
    n_items: int,
    concurrency: int = 1,
    queries_per_item: int = 1,
    min_requests: int | None = None,
    max_seconds: float = 10.0,
    keep_outputs: bool = True,
    warmup: int = 50,
) -> RunResult:
    """Run `concurrency` threads, each calling its own worker(i) for items i = 0, 1, 2, ... (cycling over
    n_items) until min_requests are done (default one full pass) or max_seconds elapse (whichever is later
    for the first pass, so every item is answered once; bounded by max(3 * max_seconds, 300 s) in all)."""
    min_requests = n_items if min_requests is None else min_requests
    workers = [make_worker() for _ in range(concurrency)]
    for w in workers:  # warm up each connection / thread
        for i in range(min(warmup, n_items)):
            w(i)
    counter = itertools.count()
    lat_lists: list[list[float]] = [[] for _ in range(concurrency)]
    outputs: dict[int, object] = {}
    errors = [0] * concurrency
    start = time.perf_counter()
    soft_deadline = start + max_seconds
    hard_deadline = start + max(3 * max_seconds, 300.0)

    def run(k: int) -> None:
        w, lats = workers[k], lat_lists[k]
        pc = time.perf_counter
        while True:
            i = next(counter)
            now = pc()
            if i >= min_requests and now > soft_deadline:
                break
            if now > hard_deadline:
                break
            t0 = pc()
            try:
                out = w(i % n_items)
            except Exception:
                errors[k] += 1
                out = None
                if errors[k] > 100:
                    break
            lats.append(pc() - t0)
            if keep_outputs and i < n_items:
                outputs[i] = out

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - start
    lats = np.array([x for lst in lat_lists for x in lst])
    return RunResult(label, len(lats), len(lats) * queries_per_item, secs, lats, sum(errors), outputs)


def http_worker_factory(host: str, port: int, reqs: list[bytes], parse: Callable[[bytes], object] | None):
    def make():
        c = RawHTTP(host, port)
        c.connect()

        def w(i: int):
            status, body = c.request(reqs[i])
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
            return parse(body) if parse else None

        return w

    return make


class _Conn:
    """One connection of ``http_closed_loop``: the request in flight, what has been read of its answer."""

    __slots__ = ("buf", "item", "sent_at", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.item = -1
        self.sent_at = 0.0


def _answer_length(data: bytes) -> tuple[int, int, int] | None:
    """(status, end of the head, Content-Length) of an answer whose head is in ``data``; None if it is not yet."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    cl = data.find(b"content-length:", 0, end)
    if cl < 0:  # another spelling: look again case-insensitively
        cl = data[:end].lower().find(b"content-length:")
        if cl < 0:
            raise RuntimeError("http_closed_loop needs answers with Content-Length")
    eol = data.find(b"\r\n", cl, end + 2)
    return int(data[9:12]), end + 4, int(data[cl + 15 : eol])


def http_closed_loop(
    label: str,
    host: str,
    port: int,
    reqs: list[bytes],
    concurrency: int = 1,
    parse: Callable[[bytes], object] | None = None,
    queries_per_item: int = 1,
    min_requests: int | None = None,
    max_seconds: float = 10.0,
    keep_outputs: bool = True,
    warmup: int = 50,
) -> RunResult:
    """``closed_loop`` over HTTP with one thread driving ``concurrency`` keep-alive connections through epoll, as
    wrk and other load generators do, instead of one Python thread per connection. On a 2-core machine shared with
    the server the client's CPU is taken from the server: this costs less per request and has no GIL hand-offs
    between client threads. Each connection always has exactly one request in flight (closed loop, no
    pipelining); latency runs from the send to the last byte of the answer. Answers must carry Content-Length (the
    engine's and the API's do); bodies are kept and parsed after the run, off the clock. Same stopping rules as
    ``closed_loop``."""
    import select

    n_items = len(reqs)
    min_requests = n_items if min_requests is None else min_requests
    conns: dict[int, _Conn] = {}
    ep = select.epoll()
    try:
        for _ in range(concurrency):
            s = socket.create_connection((host, port), timeout=60)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            w = RawHTTP(host, port)  # warm up each connection with blocking requests
            w.sock = s
            for i in range(min(warmup, n_items)):
                status, body = w.request(reqs[i])
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
            s.setblocking(False)
            conns[s.fileno()] = _Conn(s)
        raw: dict[int, bytes] = {}
        lats: list[float] = []
        errors = 0
        nxt = 0
        pc = time.perf_counter
        start = pc()
        soft_deadline = start + max_seconds
        hard_deadline = start + max(3 * max_seconds, 300.0)
        stopping = False

        def send(c: _Conn) -> None:
            nonlocal nxt
            c.item, nxt = nxt, nxt + 1
            data = reqs[c.item % n_items]
            c.sent_at = pc()
            sent = c.sock.send(data)
            while sent < len(data):  # rare (small requests): a short blocking wait is fine for a client
                if not select.select([], [c.sock], [], 60)[1]:
                    raise TimeoutError("send timed out")
                sent += c.sock.send(data[sent:])

        for fd, c in conns.items():
            ep.register(fd, select.EPOLLIN)
            send(c)
        active = len(conns)
        while active:
            for fd, _ev in ep.poll(60):
                c = conns[fd]
                chunk = c.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                data = c.buf + chunk if c.buf else chunk
                got = _answer_length(data)
                if got is None or len(data) < got[1] + got[2]:
                    c.buf = data
                    continue
                now = pc()
                c.buf = b""
                status, start_of_body, length = got
                lats.append(now - c.sent_at)
                if status != 200:
                    errors += 1
                    stopping = errors > 100
                elif keep_outputs and c.item < n_items:
                    raw[c.item] = data[start_of_body : start_of_body + length]
                if stopping or (nxt >= min_requests and now > soft_deadline) or now > hard_deadline:
                    ep.unregister(fd)
                    active -= 1
                else:
                    send(c)
        secs = pc() - start
    finally:
        ep.close()
        for c in conns.values():
            c.sock.close()
    outputs: dict[int, object] = {}
    for i, body in raw.items():
        outputs[i] = parse(body) if parse else None
    n = len(lats)
    return RunResult(label, n, n * queries_per_item, secs, np.array(lats), errors, outputs)


def client_ceiling(host: str, port: int, path: str, token: str | None, concurrency: int, secs: float = 3.0):
    req = build_request("GET", path, host, port, None, token)
    return closed_loop(
        f"client ceiling GET {path} c={concurrency}",
        http_worker_factory(host, port, [req], None),
        1,
        concurrency,
        min_requests=2000,
        max_seconds=secs,
        keep_outputs=False,
    )


# ---------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(host: str, port: int, path: str, token: str | None, timeout: float = 90, proc=None) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} answered")
        try:
            status, body = http_json(host, port, "GET", path, token=token, timeout=5)
            if status == 200:
                return
            last = (status, body)
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{host}:{port}{path} not ready after {timeout}s: {last}")


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def rss_bytes(pid: int) -> int:
    import psutil

    p = psutil.Process(pid)
    total = p.memory_info().rss
    for c in p.children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.Error:
            pass
    return total


# settings a benchmark run may set for the API it starts (to compare with a feature off); every other VECTA_* is
# dropped so that a developer's environment does not change what is measured
PASSED_SETTINGS = frozenset({"VECTA_DATAPLANE_FAST_LANE"})


def start_vecta_up(prefix: str) -> tuple[subprocess.Popen, int, Path]:
    """`vecta up` on a free loopback port with a fresh home and unlimited data-plane rates, in its own session
    (stop_process signals the group: `vecta up`, its Celery worker and its engines). Returns (process, port, home)
    once /healthz answers."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VECTA_") or k in PASSED_SETTINGS}
    env.update(VECTA_LOG_LEVEL="WARNING", VECTA_DATAPLANE_RATE_PER_KEY="1e9", VECTA_DATAPLANE_RATE_PER_CLUSTER="1e9")
    up = subprocess.Popen(
        [PY, "-m", "services.cli", "up", "--host", "127.0.0.1", "--port", str(port), "--home", str(home)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_http("127.0.0.1", port, "/healthz", None, proc=up)
    except BaseException:
        stop_process(up)
        raise
    return up, port, home


def new_engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env["VECTA_ENGINE_TOKEN"] = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
    env["VECTA_ENGINE_DATA_KEY"] = base64.b64encode(os.urandom(32)).decode()
    return env


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------------------- printing


class Report:
    """Collects rows `figure | value | baseline | ratio | goal | ok` and prints them as a table."""

    def __init__(self, title: str):
        self.title = title
        self.rows: list[tuple[str, str, str, str, str, str]] = []

    def add(
        self,
        what: str,
        value: float,
        unit: str,
        baseline_name: str = "",
        baseline: float | None = None,
        goal: float | None = None,
        higher_is_better: bool = True,
        fmt: str = "{:,.1f}",
    ) -> float | None:
        ratio = None if baseline in (None, 0) else value / baseline
        ok = ""
        if goal is not None and ratio is not None:
            ok = "yes" if (ratio >= goal if higher_is_better else ratio <= goal) else "NO"
        elif goal is not None and baseline is None:
            ok = "yes" if (value >= goal if higher_is_better else value <= goal) else "NO"
        base_s = "" if baseline is None else f"{baseline_name} {fmt.format(baseline)} {unit}".strip()
        goal_s = "" if goal is None else (f"{'>=' if higher_is_better else '<='} {goal:g}" + ("x" if baseline else ""))
        self.rows.append(
            (
                what,
                f"{fmt.format(value)} {unit}",
                base_s,
                "" if ratio is None else f"{ratio:.2f}x",
                goal_s,
                ok,
            )
        )
        line = f"  {what}: {fmt.format(value)} {unit}"
        if baseline is not None:
            line += f"   | baseline {base_s}   | ratio {ratio:.2f}x" if ratio is not None else ""
        if goal_s:
            line += f"   | goal {goal_s} -> {ok}"
        print(line, flush=True)
        return ratio

    def note(self, what: str, text: str) -> None:
        self.rows.append((what, text, "", "", "", ""))
        print(f"  {what}: {text}", flush=True)

    def markdown(self) -> str:
        out = [
            f"### {self.title}",
            "",
            "| figure | value | baseline (same run) | ratio | goal | met |",
            "|---|---|---|---|---|---|",
        ]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(out) + "\n"

    def dump(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.markdown())
        print("\n" + self.markdown(), flush=True)


# ---------------------------------------------------------------------------------------------- profiling


class PySpy:
    """`py-spy record` on a running process (collapsed stacks), summarised as the top self/inclusive frames.
    Used with --profile, to point at where the engine spends its time under a given load."""

    def __init__(self, pid: int, out: Path, rate: int = 250):
        self.out = out
        exe = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        argv = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(out)]
        argv += ["--nonblocking", "--threads"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        time.sleep(0.5)

    def stop(self, top: int = 15) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if not self.out.exists():
            return f"py-spy wrote nothing: {self.proc.stderr.read().decode(errors='replace')[-300:]}"
        self_t: dict[str, int] = {}
        incl: dict[str, int] = {}
        total = 0
        for line in self.out.read_text().splitlines():
            stack, _, cnt = line.rpartition(" ")
            if not stack:
                continue
            n = int(cnt)
            frames = [f for f in stack.split(";") if not f.startswith("thread (")]
            idle = frames and any(w in frames[-1] for w in ("select", "epoll", "_wait", "wait (", "acquire"))
            if idle:
                continue
            total += n
            if frames:
                self_t[frames[-1]] = self_t.get(frames[-1], 0) + n
            for f in set(frames):
                incl[f] = incl.get(f, 0) + n
        lines = [f"py-spy: {total} busy samples ({self.out.name}); top self:"]
        for f, n in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {100 * n / max(total, 1):5.1f}%  {f}")
        lines.append("top inclusive:")
        for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[: top + 10]:
            lines.append(f"  {100 * n / max(total, 1):5.1f}%  {f}")
        return "\n".join(lines)


def merge_runs(runs: list[RunResult]) -> RunResult:
    first = runs[0]
    return RunResult(
        first.label,
        sum(r.requests for r in runs),
        sum(r.queries for r in runs),
        sum(r.seconds for r in runs),
        np.concatenate([r.latencies for r in runs]),
        sum(r.errors for r in runs),
        first.outputs,
    )


def alternate(fns: Sequence[Callable[[float], RunResult]], secs: float, rounds: int = 3) -> list[RunResult]:
    """Run each measurement in `rounds` slices of secs/rounds, interleaved (A B A B ...), and merge the
    slices: on a shared machine whose load changes minute by minute, a baseline and the figure compared
    with it then see the same conditions."""
    parts: list[list[RunResult]] = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            parts[k].append(fn(secs / rounds))
    return [merge_runs(p) for p in parts]

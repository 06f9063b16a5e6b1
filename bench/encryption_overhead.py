"""Encryption overhead: the share of the engine's ingest and search time spent in AES-256-GCM (issue 5).

    .venv/bin/python bench/encryption_overhead.py            # 100k x 384, 5 rounds per arm, then over HTTP
    .venv/bin/python bench/encryption_overhead.py --quick    # 20k x 384, shorter (smoke test)

Goal: encryption and decryption take <= 15 % of ingest time and <= 5 % of search time.

The workload is the engine issue's benchmark (bench/engine_search.py): one collection (ip, HNSW M=16
ef_construction=128, four indexed metadata fields), upserts in batches of 1,000 records with metadata, the index
build, then single-query searches and 100-query searches. It runs in-process through the layers the HTTP server
calls (services/engine/server.py): ``parse_upsert`` then ``Collection.upsert_many`` (group commit: WAL record
encrypted, written and fdatasynced in the WAL thread while the rows are staged); ``seal`` and ``maintain`` (index
build, encrypted segment file, encrypted manifest); ``search_native`` (the fast lane of ``fast_search``) and
``parse_search_body`` + ``search`` (the usual path); 100 queries split in one slice per core as
``_search_split`` does. Last, the engine is closed and opened again from disk (every file decrypted).

Two independent measures:

(a) instrumented: the engine's one ``DataCipher`` gets timers (``perf_counter_ns`` per call, summed under a
    lock over every thread): ``seal``/``seal_parts``/``open`` whole (they do no I/O: nonce, join of the record's
    parts, AEAD), and for ``write_file``/``read_file`` only their AEAD calls (their file writes, fsyncs and
    reads are not encryption); crypto time / wall time (and / process CPU time) per phase. Nothing else in the
    engine encrypts (services/engine/crypto.py is the only user of ``AESGCM`` there).
(b) differential: the same rounds with a null cipher (the same ``DataCipher``, its AESGCM replaced by identity
    copies of the same sizes: same files, same data movement, no AES and no GHASH), interleaved with the real
    one (A B B A A B ...); the time ratio real / null per phase, and the share it implies, (real - null) / real.

Then, unless --skip-http: the engine as a process (``python -m services.engine serve`` on 127.0.0.1) under the
same workload over HTTP with ``perf record`` on it (py-spy is not in the venv; perf samples native frames, and
AES-GCM runs in the ``cryptography`` package's ``_rust.abi3.so``, which the engine uses for nothing else): the
share of the engine's CPU samples in that library, per phase.

Synthetic data (clustered random unit vectors, ``common.synthetic_dataset``) unless bench/data exists (or with
--synthetic): encryption costs depend on byte counts, not on what the vectors mean. Loopback only; every loop is
bounded; the engine process and perf are stopped; temp dirs are removed. A short warm-up round (20 batches)
runs first and is not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    DATA,
    PY,
    ROOT,
    build_request,
    closed_loop,
    free_port,
    http_closed_loop,
    http_json,
    http_worker_factory,
    id_to_index,
    load_average,
    load_dataset,
    log,
    new_engine_env,
    recall_at,
    stop_process,
    wait_http,
)
from engine_search import search_bodies, upsert_bodies

from services.engine import malloc, schema
from services.engine.collection import Settings
from services.engine.crypto import DataCipher
from services.engine.engine import Engine, trim_memory, tune_malloc
from services.engine.schema import loads, parse_collection, parse_upsert, release_parse_buffers

HOST = "127.0.0.1"
NAME = "bench"
HNSW = {"M": 16, "ef_construction": 128}
INGEST_GOAL = 0.15
SEARCH_GOAL = 0.05
TAG = bytes(16)


# ---------------------------------------------------------------------------------------------- ciphers


class Meter:
    """Nanoseconds, calls and bytes per bucket, summed over every thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.b: dict[str, list[int]] = {}

    def add(self, bucket: str, ns: int, nbytes: int) -> None:
        with self.lock:
            e = self.b.setdefault(bucket, [0, 0, 0])
            e[0] += ns
            e[1] += 1
            e[2] += nbytes

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        with self.lock:
            return {k: (v[0], v[1], v[2]) for k, v in self.b.items()}


# buckets that are encryption or decryption; the ``incl.`` ones (whole write_file/read_file) are not
CRYPTO = ("WAL seal_parts", "seal", "open", "file encrypt", "file decrypt", "aead other")
_tls = threading.local()


class NullAEAD:
    """AESGCM's interface, no cryptography: the output a real call gives in size (a 16-byte zero tag), made with
    one copy as AESGCM makes its output."""

    def encrypt(self, nonce: bytes, data: Any, aad: Any) -> bytes:
        return b"".join((data, TAG))

    def decrypt(self, nonce: bytes, data: Any, aad: Any) -> bytes:
        return bytes(memoryview(data)[:-16])

    def decrypt_into(self, nonce: bytes, data: Any, aad: Any, buf: Any) -> None:
        memoryview(buf)[:] = memoryview(data)[:-16]


class TimedAEAD:
    """Times the AEAD calls made by write_file/read_file (calls inside seal/seal_parts/open are counted by their
    wrappers, whole)."""

    def __init__(self, inner: Any, meter: Meter) -> None:
        self.inner = inner
        self.meter = meter

    def _count(self, bucket: str, ns: int, nbytes: int) -> None:
        if not getattr(_tls, "inside", False):
            self.meter.add(bucket, ns, nbytes)

    def encrypt(self, nonce: bytes, data: Any, aad: Any) -> bytes:
        t = time.perf_counter_ns()
        out = self.inner.encrypt(nonce, data, aad)
        self._count("file encrypt", time.perf_counter_ns() - t, memoryview(data).nbytes)
        return out

    def decrypt(self, nonce: bytes, data: Any, aad: Any) -> bytes:
        t = time.perf_counter_ns()
        out = self.inner.decrypt(nonce, data, aad)
        self._count("aead other", time.perf_counter_ns() - t, len(out))
        return out

    def decrypt_into(self, nonce: bytes, data: Any, aad: Any, buf: Any) -> None:
        t = time.perf_counter_ns()
        self.inner.decrypt_into(nonce, data, aad, buf)
        self._count("file decrypt", time.perf_counter_ns() - t, memoryview(data).nbytes - 16)


def _nbytes(data: Any) -> int:
    if isinstance(data, list):
        return sum(memoryview(p).nbytes for p in data)
    return memoryview(data).nbytes


def instrument(cipher: DataCipher, meter: Meter, null: bool) -> None:
    """Replace the engine's cipher's AEAD (by a timed AESGCM, or a timed null one) and time its methods."""
    cipher._aead = TimedAEAD(NullAEAD() if null else cipher._aead, meter)  # type: ignore[assignment]
    pc = time.perf_counter_ns

    def whole(name: str, bucket: str) -> None:
        orig = getattr(cipher, name)

        def wrapper(data: Any, aad: bytes) -> Any:
            _tls.inside = True
            t = pc()
            try:
                return orig(data, aad)
            finally:
                meter.add(bucket, pc() - t, _nbytes(data))
                _tls.inside = False

        setattr(cipher, name, wrapper)

    whole("seal", "seal")
    whole("seal_parts", "WAL seal_parts")
    whole("open", "open")

    def files(name: str, bucket: str) -> None:
        orig = getattr(cipher, name)

        def wrapper(*args: Any, **kw: Any) -> Any:
            t = pc()
            try:
                return orig(*args, **kw)
            finally:
                meter.add(bucket, pc() - t, 0)

        setattr(cipher, name, wrapper)

    files("write_file", "write_file incl. I/O+fsync")
    files("read_file", "read_file incl. I/O")


# ---------------------------------------------------------------------------------------------- phases


@dataclass
class Phase:
    name: str
    wall: float = 0.0  # seconds
    cpu: float = 0.0  # process CPU seconds (every thread)
    buckets: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    items: int = 0

    @property
    def crypto(self) -> float:
        return sum(self.buckets.get(b, (0, 0, 0))[0] for b in CRYPTO) / 1e9

    @property
    def crypto_bytes(self) -> int:
        return sum(self.buckets.get(b, (0, 0, 0))[2] for b in CRYPTO)

    @property
    def crypto_calls(self) -> int:
        return sum(self.buckets.get(b, (0, 0, 0))[1] for b in CRYPTO)

    def add(self, other: Phase) -> None:
        self.wall += other.wall
        self.cpu += other.cpu
        self.items += other.items
        for k, v in other.buckets.items():
            e = self.buckets.get(k, (0, 0, 0))
            self.buckets[k] = (e[0] + v[0], e[1] + v[1], e[2] + v[2])


class Clock:
    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.phases: list[Phase] = []

    def run(self, name: str, fn: Any) -> Any:
        before = self.meter.snapshot()
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        after = self.meter.snapshot()
        d = {k: tuple(v[i] - before.get(k, (0, 0, 0))[i] for i in range(3)) for k, v in after.items()}
        ph = Phase(name, wall, cpu, {k: v for k, v in d.items() if v[1]}, out if isinstance(out, int) else 0)
        self.phases.append(ph)
        return out


@dataclass
class Work:
    bodies: list[bytes]
    coll_body: bytes
    q1: list[bytes]
    q100: list[bytes]
    n: int
    single_queries: int
    batch_requests: int
    gt: np.ndarray


def collection_body(dim: int) -> bytes:
    return orjson.dumps(
        {
            "name": NAME,
            "dimension": dim,
            "metric": "ip",
            "index": {"type": "hnsw", "params": HNSW},
            "fields": [
                {"name": "source", "type": "string", "indexed": True},
                {"name": "category", "type": "string", "indexed": True},
                {"name": "year", "type": "int", "indexed": True},
                {"name": "tags", "type": "string[]", "indexed": True},
            ],
        }
    )


def _live(
    eng: Engine, arm: str, meter: Meter, clock: Clock, w: Work, pool: ThreadPoolExecutor, check_recall: bool
) -> None:
    """Create, ingest, build and search on a fresh engine; closes it."""
    cores = os.cpu_count() or 2
    try:
        instrument(eng.cipher, meter, arm == "null")
        eng.open(background=False)  # no maintenance thread: seal and build below, in their own phase
        coll = clock.run("create collection", lambda: eng.create_collection(parse_collection(loads(w.coll_body))))

        def upsert() -> int:
            cfg = coll.cfg
            for body in w.bodies:
                malloc.write_burst()  # as server.py does before parsing an upsert
                coll.upsert_many([parse_upsert(body, cfg)])
            return w.n

        clock.run("ingest: upserts (batches of 1,000)", upsert)
        malloc.end_write_burst()  # what the maintenance loop does once writes pause

        def seal_build() -> int:
            coll.seal()
            while coll.maintain():
                pass
            assert coll.status() == "ready", coll.status()
            return w.n

        clock.run("ingest: seal + index build + persist", seal_build)
        release_parse_buffers()
        trim_memory()

        faiss.omp_set_num_threads(1)
        q1 = w.q1
        fast = schema._fastlane is not None

        def single_fast() -> int:
            for i in range(w.single_queries):
                body = q1[i % len(q1)]
                if fast:
                    res = coll.search_native(body)
                else:
                    parsed = schema.single_search(body, coll.cfg.dimension)
                    assert parsed is not None
                    res = coll.search_single(*parsed)
                assert res is not None
                orjson.dumps({"results": res}, option=orjson.OPT_SERIALIZE_NUMPY)
            return w.single_queries

        def single_usual() -> int:
            for i in range(w.single_queries):
                p = coll.parse_search_body(q1[i % len(q1)])
                orjson.dumps({"results": coll.search(p)}, option=orjson.OPT_SERIALIZE_NUMPY)
            return w.single_queries

        def batch100() -> int:
            for i in range(w.batch_requests):
                p = coll.parse_search_body(w.q100[i % len(w.q100)])
                q = p["q"]
                nq = len(q)
                bounds = [nq * j // cores for j in range(cores + 1)]
                futs = [
                    pool.submit(coll.search, {**p, "q": q[a:b], "multi": True}) for a, b in itertools.pairwise(bounds)
                ]
                out: list[Any] = []
                for f in futs:
                    out.extend(f.result())
                orjson.dumps({"results": out}, option=orjson.OPT_SERIALIZE_NUMPY)
            return w.batch_requests * 100

        if check_recall:
            found = [[id_to_index(r["id"]) for r in orjson.loads(orjson.dumps(coll.search_native(b)))] for b in q1]
            log(f"  recall@10 of the engine's single-query search: {recall_at(found, w.gt):.4f}")
        clock.run("search: 1 query/request, fast lane", single_fast)
        clock.run("search: 1 query/request, usual path", single_usual)
        clock.run("search: 100 queries/request", batch100)
        faiss.omp_set_num_threads(cores)
    finally:
        eng.close()


def one_round(arm: str, w: Work, check_recall: bool) -> list[Phase]:
    """One pass of the workload with the real cipher ("aes") or the null one ("null")."""
    meter = Meter()
    clock = Clock(meter)
    key = os.urandom(32)
    cores = os.cpu_count() or 2
    settings = Settings(build_threads=cores)  # as `serve` sets it (--build-threads 0: all cores)
    work = Path(tempfile.mkdtemp(prefix=f"vecta-bench-enc-{arm}-"))
    pool = ThreadPoolExecutor(
        cores, thread_name_prefix="bench-search", initializer=faiss.omp_set_num_threads, initargs=(1,)
    )
    try:
        _live(Engine(work / "data", key, settings), arm, meter, clock, w, pool, check_recall)
        gc.collect()
        trim_memory()

        def reopen() -> int:
            e2 = Engine(work / "data", key, settings)
            instrument(e2.cipher, meter, arm == "null")
            e2.open(background=False)
            n = len(e2.get(NAME).id_map)
            e2.close()
            return n

        clock.run("restart: open from disk", reopen)
    finally:
        pool.shutdown(wait=True)
        shutil.rmtree(work, ignore_errors=True)
        gc.collect()
        trim_memory()
    return clock.phases


# ---------------------------------------------------------------------------------------------- over HTTP


class Perf:
    """`perf record` on a running process (all its threads, native frames)."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["perf", "record", "-F", "999", "-p", str(pid), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        time.sleep(0.5)

    def stop(self) -> tuple[int, int, list[tuple[str, int]]]:
        """(samples, samples in the cryptography library, its top symbols)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self.out.exists():
            raise RuntimeError(f"perf wrote nothing: {self.proc.stderr.read().decode(errors='replace')[-300:]}")
        res = subprocess.run(
            ["perf", "script", "-i", str(self.out), "-F", "ip,sym,dso"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        total = 0
        syms: Counter[str] = Counter()
        for line in res.stdout.splitlines():
            line = line.strip()
            if not line:
                continue
            total += 1
            if "_rust.abi3.so" in line:
                parts = line.split()
                syms[parts[1] if len(parts) > 2 else "?"] += 1
        return total, sum(syms.values()), syms.most_common(4)


def http_phases(w: Work, dim: int, secs: float, tmp: Path) -> list[tuple[str, int, int, list[tuple[str, int]], str]]:
    """The workload over HTTP against `python -m services.engine serve`, perf on the engine per phase."""
    env = new_engine_env()
    token = env["VECTA_ENGINE_TOKEN"]
    port = free_port()
    argv = [PY, "-m", "services.engine", "serve", "--data-dir", str(tmp / "data"), "--host", HOST, "--port", str(port)]
    logf = (tmp / "engine.log").open("wb")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    out: list[tuple[str, int, int, list[tuple[str, int]], str]] = []
    spy: Perf | None = None
    try:
        wait_http(HOST, port, "/healthz", token, timeout=120, proc=proc)
        status, resp = http_json(HOST, port, "POST", "/v1/collections", orjson.loads(w.coll_body), token)
        if status not in (200, 201):
            raise RuntimeError(f"create collection: HTTP {status} {resp}")

        def req(path: str, body: bytes) -> bytes:
            return build_request("POST", path, HOST, port, body, token)

        up = [req(f"/v1/collections/{NAME}/upsert", b) for b in w.bodies]
        r1 = [req(f"/v1/collections/{NAME}/search", b) for b in w.q1]
        r100 = [req(f"/v1/collections/{NAME}/search", b) for b in w.q100]

        def ingest() -> str:
            res = closed_loop(
                "ingest", http_worker_factory(HOST, port, up, None), len(up), 1, 1000, len(up), 0.0, False, 0
            )
            if res.errors:
                raise RuntimeError(f"ingest: {res.errors} failed requests")
            return f"{w.n / res.seconds:,.0f} vectors/s"

        def flush() -> str:
            t = time.perf_counter()
            status, resp = http_json(HOST, port, "POST", "/internal/flush", {}, token, timeout=900)
            if status != 200:
                raise RuntimeError(f"flush: HTTP {status} {resp}")
            return f"{time.perf_counter() - t:.1f} s"

        def s1() -> str:
            r = http_closed_loop("c1", HOST, port, r1, 1, None, 1, None, secs, False)
            return f"{r.qps:,.0f} q/s, p50 {r.pct(50):.3f} ms"

        def s100() -> str:
            r = http_closed_loop("b100", HOST, port, r100, 1, None, 100, None, secs, False, warmup=2)
            return f"{r.qps:,.0f} q/s"

        for label, fn in (
            ("ingest over HTTP: upserts, 1 connection", ingest),
            ("ingest over HTTP: seal + build (POST /internal/flush)", flush),
            ("search over HTTP: 1 query/request, 1 client", s1),
            ("search over HTTP: 100 queries/request, 1 client", s100),
        ):
            spy = Perf(proc.pid, tmp / "perf.data")
            try:
                what = fn()
            finally:
                total, in_crypto, top = spy.stop()
                spy = None
                (tmp / "perf.data").unlink(missing_ok=True)
            out.append((label, total, in_crypto, top, what))
            log(f"  {label}: {what}; {in_crypto} of {total} engine samples in AES-GCM ({pct(in_crypto, total)})")
    finally:
        if spy is not None and spy.proc.poll() is None:
            spy.proc.send_signal(signal.SIGINT)
            spy.proc.wait(30)
        stop_process(proc)
        logf.close()
    return out


# ---------------------------------------------------------------------------------------------- output


def pct(a: float, b: float) -> str:
    return f"{100 * a / b:.2f} %" if b else "-"


def goal_for(name: str) -> float | None:
    if name.startswith("ingest"):
        return INGEST_GOAL
    if name.startswith("search"):
        return SEARCH_GOAL
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20k vectors, fewer queries (smoke test)")
    ap.add_argument("--n", type=int, help="base vectors (default 100,000; 20,000 with --quick)")
    ap.add_argument(
        "--rounds", type=int, help="rounds per arm (real, null cipher), interleaved (default 5; 3 with --quick)"
    )
    ap.add_argument("--ef", type=int, default=48, help="search ef (fixed: no raw-faiss tuning here)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic vectors even if bench/data exists")
    ap.add_argument("--skip-http", action="store_true", help="no engine process / perf part")
    ap.add_argument("--secs", type=float, help="seconds per search phase over HTTP (default 5, 2 with --quick)")
    args = ap.parse_args()
    n = args.n or (20_000 if args.quick else 100_000)
    secs = args.secs or (2.0 if args.quick else 5.0)
    args.rounds = args.rounds or (3 if args.quick else 5)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    log(f"encryption overhead ({'quick' if args.quick else 'full'}), {os.cpu_count()} cores, load {load_average()}")
    tune_malloc()

    synthetic = args.synthetic or not (DATA / "manifest.json").exists()
    ds = load_dataset(n, synthetic=synthetic)
    data_note = (
        f"{ds.n} x {ds.dim} float32, "
        + ("SYNTHETIC clustered unit vectors (common.synthetic_dataset, seed 7)" if synthetic else "bench/data")
        + f", make_dataset.py metadata, {len(ds.queries)} queries"
    )
    log(f"data: {data_note}")
    w = Work(
        bodies=upsert_bodies(ds),
        coll_body=collection_body(ds.dim),
        q1=search_bodies(ds.queries, args.ef),
        q100=search_bodies(ds.queries, args.ef, batch=100),
        n=ds.n,
        single_queries=1000 if args.quick else 10_000,
        batch_requests=10 if args.quick else 100,
        gt=ds.gt,
    )
    log(f"{len(w.bodies)} upsert bodies ({sum(map(len, w.bodies)) / 1e6:.0f} MB JSON), ef={args.ef}")

    # not measured: the process's first ingest (heap growth, parser buffers, first faiss calls) is slower than the
    # next ones, and would count against whichever arm came first
    t = time.perf_counter()
    one_round("aes", dataclasses.replace(w, bodies=w.bodies[:20], single_queries=500, batch_requests=5), False)
    log(f"warm-up round (20 batches, not measured): {time.perf_counter() - t:.0f} s")
    # A B B A A B ...: each arm sees the same share of early and late minutes on a machine whose load drifts
    order = [("aes", "null") if r % 2 == 0 else ("null", "aes") for r in range(args.rounds)]
    runs: dict[str, list[list[Phase]]] = {"aes": [], "null": []}
    k = 0
    for pair in order:
        for arm in pair:
            k += 1
            t = time.perf_counter()
            phases = one_round(arm, w, check_recall=k == 1)
            runs[arm].append(phases)
            brief = ", ".join(
                f"{p.name.split(':')[-1].strip()} {p.wall:.2f}s" for p in phases if p.name != "create collection"
            )
            log(f"round {k} ({arm}): {time.perf_counter() - t:.0f} s; {brief}")

    names = [p.name for p in runs["aes"][0]]
    tot: dict[str, dict[str, Phase]] = {arm: {nm: Phase(nm) for nm in names} for arm in runs}
    for arm, rs in runs.items():
        for phases in rs:
            for p in phases:
                tot[arm][p.name].add(p)
    # ingest as a whole: the upserts and the build that follows them
    for arm in runs:
        whole = Phase("ingest: total (upserts + build)")
        whole.add(tot[arm]["ingest: upserts (batches of 1,000)"])
        whole.add(tot[arm]["ingest: seal + index build + persist"])
        tot[arm][whole.name] = whole
    order_names = [nm for nm in names if nm != "create collection"]
    order_names.insert(order_names.index("search: 1 query/request, fast lane"), "ingest: total (upserts + build)")

    print()
    print(f"== (a) instrumented, real cipher: {args.rounds} rounds summed ({data_note}) ==")
    hdr = f"{'phase':42s} {'wall s':>8s} {'CPU s':>8s} {'crypto s':>9s} {'calls':>6s} {'MB':>7s} "
    hdr += f"{'% wall':>8s} {'% CPU':>8s} {'goal':>6s} {'met':>4s}"
    print(hdr)
    table_a = []
    for nm in order_names:
        p = tot["aes"][nm]
        g = goal_for(nm)
        share = p.crypto / p.wall if p.wall else 0.0
        met = "" if g is None else ("yes" if share <= g else "NO")
        print(
            f"{nm:42s} {p.wall:8.2f} {p.cpu:8.2f} {p.crypto:9.4f} {p.crypto_calls:6d} {p.crypto_bytes / 1e6:7.0f} "
            f"{pct(p.crypto, p.wall):>8s} {pct(p.crypto, p.cpu):>8s} {'' if g is None else f'<={g:.0%}':>6s} {met:>4s}"
        )
        table_a.append((nm, p, share, g, met))
    print("\n  where the crypto time goes (real cipher, all rounds; MB = plaintext bytes):")
    for nm in order_names:
        p = tot["aes"][nm]
        parts = [f"{b} {v[0] / 1e9:.3f}s/{v[1]} calls/{v[2] / 1e6:.0f} MB" for b, v in sorted(p.buckets.items())]
        if parts:
            print(f"    {nm}: " + "; ".join(parts))
    rates = [
        (v[2], v[0])
        for b, v in tot["aes"]["ingest: seal + index build + persist"].buckets.items()
        if b == "file encrypt"
    ]
    if rates and rates[0][1]:
        print(f"  AES-GCM file encryption speed: {rates[0][0] / rates[0][1]:.2f} GB/s")
    print("  the same buckets in the null-cipher rounds (its copies and allocations, no AES/GHASH):")
    for nm in order_names:
        p = tot["null"][nm]
        parts = [f"{b} {v[0] / 1e9:.3f}s/{v[1]} calls" for b, v in sorted(p.buckets.items())]
        if parts:
            print(f"    {nm}: " + "; ".join(parts))

    print()
    print(f"== (b) differential: real cipher vs null cipher, {args.rounds} rounds each, interleaved ==")
    print(f"{'':42s} {'-' * 16 + ' wall time ' + '-' * 16:>44s} {'-' * 12 + ' process CPU time ' + '-' * 13:>44s}")
    print(
        f"{'phase':42s} {'real s':>8s} {'null s':>8s} {'ratio':>8s} {'median':>8s} {'share':>8s} "
        f"{'real s':>8s} {'null s':>8s} {'ratio':>8s} {'median':>8s} {'share':>8s} {'null copy':>10s}"
    )
    both = ("ingest: upserts (batches of 1,000)", "ingest: seal + index build + persist")

    def per_round(nm: str, attr: str) -> list[float]:
        names = both if nm == "ingest: total (upserts + build)" else (nm,)
        return [
            sum(getattr(p, attr) for p in ra if p.name in names) / sum(getattr(p, attr) for p in rb if p.name in names)
            for ra, rb in zip(runs["aes"], runs["null"], strict=True)
        ]

    per_rounds = []
    for nm in order_names:
        cells = []
        for attr in ("wall", "cpu"):
            a, b = getattr(tot["aes"][nm], attr), getattr(tot["null"][nm], attr)
            per = per_round(nm, attr)
            med = float(np.median(per))
            cells.append(f"{a:8.2f} {b:8.2f} {a / b:7.3f}x {med:7.3f}x {100 * (1 - 1 / med):7.2f}%")
            per_rounds.append((nm, attr, per))
        print(f"{nm:42s} {cells[0]} {cells[1]} {tot['null'][nm].crypto:9.4f}s")
    print(
        "  ratio: summed real / summed null; median: of the per-round ratios (robust to one disturbed round); share:\n"
        "  1 - 1/median = (real - null) / real. Phases with no crypto at all (the searches) show the noise floor.\n"
        "  null copy: the null cipher's own time (copies into fresh buffers), which the real cipher's time includes."
    )
    for nm, attr, per in per_rounds:
        print(f"    per-round {attr} ratios, {nm}: {' '.join(f'{r:.3f}' for r in per)}")

    http_rows = []
    if args.skip_http:
        print("\n(over HTTP: skipped, --skip-http)")
    elif shutil.which("perf") is None:
        print("\n(over HTTP: skipped, perf is not installed)")
    else:
        print("\n== (c) over HTTP: `python -m services.engine serve` under the same workload, perf on the engine ==")
        tmp = Path(tempfile.mkdtemp(prefix="vecta-bench-enc-http-"))
        try:
            http_rows = http_phases(w, ds.dim, secs, tmp)
        except Exception as exc:  # report, don't lose parts (a) and (b)
            print(f"  over HTTP: failed: {exc!r}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for label, total, inc, top, what in http_rows:
            g = SEARCH_GOAL if label.startswith("search") else INGEST_GOAL
            share = inc / total if total else 0.0
            tops = ", ".join(f"{s} {c}" for s, c in top)
            print(
                f"{label:55s} {what:28s} samples {total:6d}, in AES-GCM {inc:5d} = {pct(inc, total):>8s} "
                f"(goal <= {g:.0%}: {'yes' if share <= g else 'NO'}) {tops}"
            )

    print()
    print(
        f"started {started} UTC, ended {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load {load_average()}"
    )
    print("verdict (instrumented share of wall time; the goals are about time spent):")
    for nm, _p, share, g, met in table_a:
        if g is not None:
            print(f"  {nm}: {100 * share:.2f} % (goal <= {g:.0%}): {'MET' if met == 'yes' else 'NOT MET'}")


if __name__ == "__main__":
    main()

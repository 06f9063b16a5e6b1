"""Gateway (data-plane edge) overhead and cluster lifecycle timings, from one run of the embedded product.

Starts `vecta up` (API + Celery worker) with a fresh VECTA_HOME on 127.0.0.1, signs up, creates a cluster
(timing create -> RUNNING), then on that cluster's one engine compares, interleaved in the same run:

  * ingest through the API (`/v1/clusters/{id}/collections/gw/upsert`, batches of 1,000) vs the same batches
    straight to the engine (`/v1/collections/direct/upsert`)                        goal >= 0.8x
  * search, one query per request, 1 client and 8 clients: QPS ratio and p50 added   goal >= 0.5x, <= 0.7 ms
  * search, 100 queries per request                                                  goal >= 0.9x
  * suspend, then resume of the cluster holding the ingested vectors: resume time    goal <= 2 s
  * create -> RUNNING with the local provisioner                                     goal <= 3 s

Data: bench/data (make_dataset.py) when present, else random unit vectors (said in the output).

    .venv/bin/python bench/gateway.py [--n 100000] [--secs 9] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DATA,
    Report,
    RunResult,
    alternate,
    build_request,
    closed_loop,
    http_closed_loop,
    http_json,
    http_worker_factory,
    load_average,
    recall_at,
    start_vecta_up,
    stop_process,
)

HOST = "127.0.0.1"
INDEX = {"type": "hnsw", "params": {"M": 16, "ef_construction": 100}}
EF = 64


def dataset(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    if (DATA / "manifest.json").exists():
        from common import load_dataset

        ds = load_dataset(n)
        return ds.base, ds.queries, ds.gt, f"bench/data: {ds.n} MiniLM embeddings, {len(ds.queries)} queries"
    import faiss

    rng = np.random.default_rng(7)
    base = rng.standard_normal((n, 384)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = rng.standard_normal((1000, 384)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(384)
    index.add(base)
    gt = index.search(queries, 10)[1]
    return base, queries, gt, f"random unit vectors ({n}; bench/data not built)"


def call(method: str, path: str, token: str, body: object = None, port: int = 0) -> object:
    status, data = http_json(HOST, port, method, path, body, token)
    if status >= 300:
        raise SystemExit(f"{method} {path} -> {status}: {data}")
    return data


def wait_status(port: int, token: str, cluster_id: str, want: str, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        data = call("GET", f"/v1/clusters/{cluster_id}", token, port=port)
        assert isinstance(data, dict)
        if data["status"] == want:
            return time.perf_counter() - t0
        if data["status"] == "FAILED":
            raise SystemExit(f"cluster failed: {data.get('status_reason')}")
        time.sleep(0.02)
    raise SystemExit(f"cluster did not reach {want}")


def engine_address(home: Path, cluster_id: str) -> tuple[int, str]:
    os.environ["VECTA_HOME"] = str(home)
    from services.auth.keyprovider import LocalKeyProvider

    row = (
        sqlite3.connect(home / "vecta.db")
        .execute("select org_id, engine_url, engine_token_wrapped from clusters where id = ?", (cluster_id,))
        .fetchone()
    )
    provider = LocalKeyProvider(home / "secrets" / "master.key")
    token = provider.unwrap(row[2], {"org_id": row[0], "cluster_id": cluster_id, "use": "engine_token"}).decode()
    return int(row[1].rsplit(":", 1)[1]), token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--secs", type=float, default=9.0, help="seconds per search measurement (split in 3 slices)")
    ap.add_argument("--quick", action="store_true", help="20,000 vectors, shorter runs")
    ap.add_argument(
        "--client",
        choices=("epoll", "threads"),
        default="epoll",
        help="search clients: one thread driving every connection through epoll (default), or a thread each",
    )
    args = ap.parse_args()
    if args.quick:
        args.n, args.secs = min(args.n, 20_000), 3.0
    base, queries, gt, source = dataset(args.n)
    report = Report(f"Gateway overhead and cluster lifecycle ({source}; load {load_average()})")

    up, port, home = start_vecta_up("vecta-bench-gw-")
    try:
        signup = call("POST", "/v1/auth/signup", "", {"email": "gw@example.com", "password": "benchmark password",
                                                        "name": "B", "org_name": "Bench"}, port=port)  # fmt: skip
        assert isinstance(signup, dict)
        session = signup["access_token"]
        org = signup["org"]["id"]
        projects = call("GET", f"/v1/orgs/{org}/projects", session, port=port)
        assert isinstance(projects, dict)
        project = projects["items"][0]["id"]
        key = call("POST", f"/v1/orgs/{org}/api-keys", session, {"name": "bench", "org_role": "org_owner"}, port=port)
        assert isinstance(key, dict)
        api_key = key["key"]

        t0 = time.perf_counter()
        created = call("POST", f"/v1/projects/{project}/clusters", api_key,
                       {"name": "bench", "plan": "serverless", "region": "local"}, port=port)  # fmt: skip
        assert isinstance(created, dict)
        cid = created["id"]
        wait_status(port, api_key, cid, "RUNNING")
        report.add("create -> RUNNING (local provisioner)", time.perf_counter() - t0, "s", goal=3.0,
                   higher_is_better=False, fmt="{:.2f}")  # fmt: skip
        eport, etoken = engine_address(home, cid)
        gw_prefix = f"/v1/clusters/{cid}/collections"
        call("POST", gw_prefix, api_key, {"name": "gw", "dimension": 384, "metric": "cosine", "index": INDEX}, port)
        call("POST", "/v1/collections", etoken, {"name": "direct", "dimension": 384, "metric": "cosine",
                                                 "index": INDEX}, eport)  # fmt: skip

        # -- ingest, alternating batches so both paths see the same machine load --------------------------
        batches = []
        for start in range(0, len(base), 1000):
            recs = [{"id": f"p{i:07d}", "vector": base[i]} for i in range(start, min(start + 1000, len(base)))]
            batches.append(orjson.dumps({"records": recs}, option=orjson.OPT_SERIALIZE_NUMPY))
        from common import RawHTTP

        gw_conn, eng_conn = RawHTTP(HOST, port), RawHTTP(HOST, eport)
        gw_time = eng_time = 0.0
        for body in batches:
            for conn, path, tok, pt, is_gw in (
                (gw_conn, f"{gw_prefix}/gw/upsert", api_key, port, True),
                (eng_conn, "/v1/collections/direct/upsert", etoken, eport, False),
            ):
                t = time.perf_counter()
                status, data = conn.request(build_request("POST", path, HOST, pt, body, tok))
                if status != 200:
                    raise SystemExit(f"upsert -> {status}: {data[:300]!r}")
                if is_gw:
                    gw_time += time.perf_counter() - t
                else:
                    eng_time += time.perf_counter() - t
        n = len(base)
        report.add("ingest through the API", n / gw_time, "vec/s", "direct to engine", n / eng_time, goal=0.8)
        call("POST", "/internal/flush", etoken, {}, eport)

        # -- search ----------------------------------------------------------------------------------------
        def reqs(path: str, tok: str, pt: int, batch: int = 1) -> list[bytes]:
            out = []
            for i in range(0, len(queries), batch):
                q = {"top_k": 10, "params": {"ef": EF}}
                if batch == 1:
                    q["vector"] = queries[i]
                else:
                    q["vectors"] = queries[i : i + batch]
                out.append(build_request("POST", path, HOST, pt, orjson.dumps(q, option=orjson.OPT_SERIALIZE_NUMPY),
                                         tok))  # fmt: skip
            return out

        def ids_of(body: bytes) -> list[int]:
            return [int(r["id"][1:]) for r in orjson.loads(body)["results"]]

        gw_1 = reqs(f"{gw_prefix}/gw/search", api_key, port)
        en_1 = reqs("/v1/collections/direct/search", etoken, eport)

        def single(label: str, pt: int, rs: list[bytes], c: int, s: float) -> RunResult:
            if args.client == "epoll":
                return http_closed_loop(label, HOST, pt, rs, c, ids_of, max_seconds=s, min_requests=0)
            return closed_loop(label, http_worker_factory(HOST, pt, rs, ids_of), len(rs), c, max_seconds=s,
                               min_requests=0)  # fmt: skip

        report.note("search clients", "one thread driving every connection (epoll)" if args.client == "epoll"
                    else "one Python thread per connection")  # fmt: skip
        for conc in (1, 8):
            runs = alternate(
                [
                    lambda s, c=conc: single("direct", eport, en_1, c, s),
                    lambda s, c=conc: single("api", port, gw_1, c, s),
                ],
                args.secs,
            )
            direct, api = runs
            report.add(f"search 1 query/request, {conc} client(s): QPS", api.qps, "q/s", "direct", direct.qps,
                       goal=0.5)  # fmt: skip
            report.add(f"search 1 query/request, {conc} client(s): p50 added", api.pct(50) - direct.pct(50), "ms",
                       goal=0.7, higher_is_better=False, fmt="{:.3f}")  # fmt: skip
            report.note(f"  p50 / p99 ({conc} client(s))", f"API {api.pct(50):.3f} / {api.pct(99):.3f} ms, direct "
                        f"{direct.pct(50):.3f} / {direct.pct(99):.3f} ms")  # fmt: skip
        gw_100 = reqs(f"{gw_prefix}/gw/search", api_key, port, 100)
        en_100 = reqs("/v1/collections/direct/search", etoken, eport, 100)

        def ids_batch(body: bytes) -> list[list[int]]:
            return [[int(r["id"][1:]) for r in row] for row in orjson.loads(body)["results"]]

        direct, api = alternate(
            [
                lambda s: closed_loop(
                    "direct",
                    http_worker_factory(HOST, eport, en_100, ids_batch),
                    len(en_100),
                    1,
                    queries_per_item=100,
                    max_seconds=s,
                    min_requests=0,
                    warmup=2,
                ),
                lambda s: closed_loop(
                    "api",
                    http_worker_factory(HOST, port, gw_100, ids_batch),
                    len(gw_100),
                    1,
                    queries_per_item=100,
                    max_seconds=s,
                    min_requests=0,
                    warmup=2,
                ),
            ],
            args.secs,
        )
        report.add("search 100 queries/request: QPS", api.qps, "q/s", "direct", direct.qps, goal=0.9)
        found = [api.outputs[i][j] for i in sorted(api.outputs) for j in range(len(api.outputs[i]))]
        report.add("recall@10 through the API (HNSW ef=64)", recall_at(found, gt[: len(found)]), "", fmt="{:.3f}")

        # -- suspend / resume ------------------------------------------------------------------------------
        call("DELETE", "/v1/collections/direct", etoken, None, eport)
        call("POST", f"/v1/clusters/{cid}/suspend", api_key, None, port)
        wait_status(port, api_key, cid, "SUSPENDED")
        t0 = time.perf_counter()
        call("POST", f"/v1/clusters/{cid}/resume", api_key, None, port)
        wait_status(port, api_key, cid, "RUNNING")
        report.add(f"resume of a suspended cluster holding {n:,} x 384", time.perf_counter() - t0, "s", goal=2.0,
                   higher_is_better=False, fmt="{:.2f}")  # fmt: skip
        check = call("POST", f"{gw_prefix}/gw/count", api_key, {}, port)
        report.note("vectors after resume", str(check))
        call("DELETE", f"/v1/clusters/{cid}", api_key, None, port)
    finally:
        stop_process(up, timeout=30)
    report.dump(Path(tempfile.gettempdir()) / "vecta-bench-gateway.md")


if __name__ == "__main__":
    main()

"""CPU time per request of the data-plane edge: what the API process spends forwarding one search.

Throughput and latency on a shared, loaded machine say little about the edge's own cost; CPU time does. This
starts `vecta up` (API + Celery worker, embedded defaults, fresh VECTA_HOME) like bench/gateway.py, signs up,
creates a cluster, ingests random 384-d unit vectors through the API, then runs the same single-query searches
(a) through the API (`/v1/clusters/{id}/collections/cpu/search`, API key) and (b) straight to the engine
(`/v1/collections/cpu/search`, engine token), alternating rounds, and reports per request:

  * the API process's CPU time (user + system, every thread; /proc/PID/task/*/schedstat, nanoseconds)
  * the engine process's CPU time, through the API and direct (they should match: the edge adds no engine work)
  * p50 latency of each path (noisy on a loaded machine; CPU time is the figure to compare)

The API's idle CPU over the same wall time is measured too and subtracted (background loops, other threads).

    .venv/bin/python bench/edge_cpu.py [--n 10000] [--requests 4000] [--rounds 3] [--clients 1]
        [--profile py-spy.raw]   # py-spy record --format raw --threads of the API during one API round
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, RawHTTP, build_request, http_json, load_average, start_vecta_up, stop_process

HOST = "127.0.0.1"
INDEX = {"type": "hnsw", "params": {"M": 16, "ef_construction": 100}}


def cpu_ns(pid: int) -> int:
    """CPU time (user + system) of every live thread of ``pid``, in nanoseconds (schedstat's first field)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended between listing and reading
    return total


def cpu_stat_ns(pid: int) -> tuple[int, int]:
    """The process's (utime, stime) from /proc/PID/stat (every thread, ended ones included), in nanoseconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return int(fields[11]) * tick, int(fields[12]) * tick


def call(port: int, method: str, path: str, token: str, body: object = None) -> object:
    status, data = http_json(HOST, port, method, path, body, token)
    if status >= 300:
        raise SystemExit(f"{method} {path} -> {status}: {data}")
    return data


def wait_running(port: int, token: str, cluster_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = call(port, "GET", f"/v1/clusters/{cluster_id}", token)
        assert isinstance(data, dict)
        if data["status"] == "RUNNING":
            return
        if data["status"] == "FAILED":
            raise SystemExit(f"cluster failed: {data.get('status_reason')}")
        time.sleep(0.05)
    raise SystemExit("cluster did not reach RUNNING")


def engine_of(home: Path, cluster_id: str) -> tuple[int, int, str]:
    """The engine's port, pid and token (unwrapped with the home's local master key, as the API does)."""
    os.environ["VECTA_HOME"] = str(home)
    from services.auth.keyprovider import LocalKeyProvider

    with sqlite3.connect(home / "vecta.db") as db:
        org_id, url, wrapped, state = db.execute(
            "select org_id, engine_url, engine_token_wrapped, engine_state from clusters where id = ?", (cluster_id,)
        ).fetchone()
    provider = LocalKeyProvider(home / "secrets" / "master.key")
    token = provider.unwrap(wrapped, {"org_id": org_id, "cluster_id": cluster_id, "use": "engine_token"}).decode()
    state = json.loads(state) if isinstance(state, str) else state
    return int(url.rsplit(":", 1)[1]), int(state["pid"]), token


def run_requests(port: int, reqs: list[bytes], n: int, clients: int) -> np.ndarray:
    """``n`` requests over ``clients`` keep-alive connections (one thread each); latencies in seconds."""
    lats: list[list[float]] = [[] for _ in range(clients)]
    per = n // clients

    def worker(k: int) -> None:
        conn = RawHTTP(HOST, port)
        pc = time.perf_counter
        out = lats[k]
        for i in range(per):
            raw = reqs[(k * per + i) % len(reqs)]
            t0 = pc()
            status, body = conn.request(raw)
            out.append(pc() - t0)
            if status != 200:
                raise SystemExit(f"search -> {status}: {body[:300]!r}")
        conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.array([x for lst in lats for x in lst])


Row = tuple[float, float, float, float, float, float, float, float]


def machine_ticks() -> tuple[int, int]:
    """(idle, total) clock ticks of the whole machine since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return fields[3] + fields[4], sum(fields)


def measure(port: int, reqs: list[bytes], n: int, clients: int, api_pid: int, engine_pid: int) -> Row:
    """(API CPU ns, API user ns and system ns from /proc/PID/stat, engine CPU ns, wall seconds, p50 ms, the
    client's (this process's) CPU ns, the machine's idle share in %)."""
    a0, (u0, s0), e0, w0 = cpu_ns(api_pid), cpu_stat_ns(api_pid), cpu_ns(engine_pid), time.perf_counter()
    c0, (i0, t0) = time.process_time_ns(), machine_ticks()
    lats = run_requests(port, reqs, n, clients)
    a1, (u1, s1), e1, w1 = cpu_ns(api_pid), cpu_stat_ns(api_pid), cpu_ns(engine_pid), time.perf_counter()
    c1, (i1, t1) = time.process_time_ns(), machine_ticks()
    idle = 100.0 * (i1 - i0) / max(1, t1 - t0)
    return a1 - a0, u1 - u0, s1 - s0, e1 - e0, w1 - w0, float(np.percentile(lats, 50) * 1000), c1 - c0, idle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000, help="vectors to ingest")
    ap.add_argument("--requests", type=int, default=4000, help="searches per round and path")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--profile", type=Path, help="py-spy raw output of the API during an extra API round")
    ap.add_argument("--perf", type=Path, help="`perf record -g` output of the API during an extra API round")
    args = ap.parse_args()

    up, port, home = start_vecta_up("vecta-bench-edgecpu-")
    try:
        signup = call(port, "POST", "/v1/auth/signup", "", {"email": "cpu@example.com", "password": "benchmark pw 1",
                                                             "name": "B", "org_name": "Bench"})  # fmt: skip
        assert isinstance(signup, dict)
        session, org = signup["access_token"], signup["org"]["id"]
        projects = call(port, "GET", f"/v1/orgs/{org}/projects", session)
        assert isinstance(projects, dict)
        project = projects["items"][0]["id"]
        key = call(port, "POST", f"/v1/orgs/{org}/api-keys", session, {"name": "bench", "org_role": "org_owner"})
        assert isinstance(key, dict)
        api_key = key["key"]
        created = call(port, "POST", f"/v1/projects/{project}/clusters", api_key,
                       {"name": "bench", "plan": "serverless", "region": "local"})  # fmt: skip
        assert isinstance(created, dict)
        cid = created["id"]
        wait_running(port, api_key, cid)
        eport, epid, etoken = engine_of(home, cid)
        prefix = f"/v1/clusters/{cid}/collections"
        call(port, "POST", prefix, api_key, {"name": "cpu", "dimension": 384, "metric": "cosine", "index": INDEX})

        rng = np.random.default_rng(7)
        base = rng.standard_normal((args.n, 384)).astype(np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        conn = RawHTTP(HOST, port)
        for start in range(0, args.n, 1000):
            recs = [{"id": f"p{i}", "vector": base[i]} for i in range(start, min(start + 1000, args.n))]
            body = orjson.dumps({"records": recs}, option=orjson.OPT_SERIALIZE_NUMPY)
            status, data = conn.request(build_request("POST", f"{prefix}/cpu/upsert", HOST, port, body, api_key))
            if status != 200:
                raise SystemExit(f"upsert -> {status}: {data[:300]!r}")
        conn.close()
        call(eport, "POST", "/internal/flush", etoken, {})

        queries = rng.standard_normal((500, 384)).astype(np.float32)
        bodies = [orjson.dumps({"vector": q, "top_k": 10}, option=orjson.OPT_SERIALIZE_NUMPY) for q in queries]
        via_api = [build_request("POST", f"{prefix}/cpu/search", HOST, port, b, api_key) for b in bodies]
        direct = [build_request("POST", "/v1/collections/cpu/search", HOST, eport, b, etoken) for b in bodies]
        run_requests(port, via_api, 500, 1)  # warm up both paths (connections, caches)
        run_requests(eport, direct, 500, 1)

        api_pid = up.pid  # `vecta up` runs uvicorn in its own process (the worker is a child process)
        rows: dict[str, list[Row]] = {"api": [], "direct": []}
        idle: list[float] = []
        for _ in range(args.rounds):
            rows["direct"].append(measure(eport, direct, args.requests, args.clients, api_pid, epid))
            rows["api"].append(measure(port, via_api, args.requests, args.clients, api_pid, epid))
            wall = rows["api"][-1][4]
            i0 = cpu_ns(api_pid)
            time.sleep(min(wall, 3.0))
            idle.append((cpu_ns(api_pid) - i0) / min(wall, 3.0))  # ns of API CPU per idle second
        if args.profile is not None:
            # --gil: only the thread holding the GIL is sampled, so the profile is where Python spends CPU, not
            # where the thread waits (a write on loopback that wakes the peer is often preempted in the syscall)
            spy = subprocess.Popen([str(Path(PY).parent / "py-spy"), "record", "--format", "raw", "--threads", "--gil",
                                    "--rate", "500", "--pid", str(api_pid), "--output", str(args.profile)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1.5)
            run_requests(port, via_api, args.requests * 2, args.clients)
            spy.send_signal(2)
            spy.wait(timeout=30)

        if args.perf is not None:
            perf = subprocess.Popen(["perf", "record", "-g", "-F", "2000", "-p", str(api_pid), "-o", str(args.perf)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1.0)
            run_requests(port, via_api, args.requests * 2, args.clients)
            perf.send_signal(2)
            perf.wait(timeout=60)

        idle_rate = float(np.median(idle))
        n = args.requests
        print(f"# edge CPU per request: {args.n} x 384 random vectors, {args.rounds} rounds x {n} single-query "
              f"searches, {args.clients} client(s), load {load_average()}")  # fmt: skip
        print(f"API idle CPU: {idle_rate / 1e3:.0f} us/s (subtracted)")
        for label in ("api", "direct"):
            for i, (a, u, sy, e, wall, p50, cl, idle_pct) in enumerate(rows[label]):
                api_us = (a - idle_rate * wall) / n / 1e3
                print(f"{label:6s} round {i}: API {api_us:7.1f} us/req (ticks: user {u / n / 1e3:5.0f} + sys "
                      f"{sy / n / 1e3:5.0f}), engine {e / n / 1e3:7.1f} us/req, client {cl / n / 1e3:5.0f} us/req, "
                      f"machine idle {idle_pct:4.1f}%, p50 {p50:.3f} ms, {n / wall:7.0f} req/s")  # fmt: skip
        api = rows["api"]
        med = lambda xs: float(np.median(xs))  # noqa: E731
        api_us = med([(r[0] - idle_rate * r[4]) / n / 1e3 for r in api])
        eng_api = med([r[3] / n / 1e3 for r in api])
        eng_direct = med([r[3] / n / 1e3 for r in rows["direct"]])
        print(f"SUMMARY API process {api_us:.1f} us/request; engine {eng_api:.1f} us/request via the API, "
              f"{eng_direct:.1f} direct; p50 API {med([r[5] for r in api]):.3f} ms, direct "
              f"{med([r[5] for r in rows['direct']]):.3f} ms")  # fmt: skip
        call(port, "DELETE", f"/v1/clusters/{cid}", api_key)
    finally:
        stop_process(up, timeout=30)


if __name__ == "__main__":
    main()

"""Where the time of create -> RUNNING and of resuming a suspended cluster goes, from one run of the embedded product.

Starts `vecta up` (API + Celery worker, embedded defaults: SQLite database and SQLite broker) with a fresh
VECTA_HOME on 127.0.0.1, signs up, then:

  * creates ``--creates`` clusters one after another, timing POST -> GET shows RUNNING (goal <= 3 s);
  * fills the first cluster with ``--n`` random unit vectors of 384 dimensions (HNSW M=16, ef_construction=100,
    straight to its engine: the load itself is not what is timed here), waits until they are indexed;
  * ``--rounds`` times: suspends it, then resumes it, alternating the two ways a resume starts:
      - ``explicit``: POST /v1/clusters/{id}/resume, until GET shows RUNNING, then until a search through the
        data-plane edge answers 200;
      - ``on-call``: a search through the edge on the suspended cluster (503 cluster_resuming), repeated every
        10 ms until it answers 200 -- what a serverless customer sees;
    and checks each time that the count is complete and a search returns top_k hits (goal <= 2 s).

Per resume it prints the steps: the job waiting for a worker (job created -> started), the task's own steps as the
worker logs them (engine start, snapshot load), the job finishing -> the client seeing RUNNING, and RUNNING ->
the edge answering. Medians over the rounds at the end.

    .venv/bin/python bench/resume_timing.py [--n 100000] [--rounds 6] [--creates 3] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, ROOT, free_port, http_json, load_average, log, stop_process, wait_http

HOST = "127.0.0.1"
INDEX = {"type": "hnsw", "params": {"M": 16, "ef_construction": 100}}
DIM = 384


class Api:
    def __init__(self, port: int) -> None:
        self.port = port

    def call(self, method: str, path: str, token: str, body: object = None, ok: tuple[int, ...] = ()) -> object:
        status, data = http_json(HOST, self.port, method, path, body, token)
        if status >= 300 and status not in ok:
            raise SystemExit(f"{method} {path} -> {status}: {data}")
        return data

    def status(self, token: str, cid: str) -> str:
        data = self.call("GET", f"/v1/clusters/{cid}", token)
        assert isinstance(data, dict)
        if data["status"] == "FAILED":
            raise SystemExit(f"cluster failed: {data.get('status_reason')}")
        return str(data["status"])

    def wait_status(self, token: str, cid: str, want: str, timeout: float = 600) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.status(token, cid) == want:
                return time.perf_counter()
            time.sleep(0.01)
        raise SystemExit(f"cluster {cid} did not reach {want}")


def job_times(home: Path, job_id: str) -> tuple[float, float]:
    """(created -> started, started -> finished) of a job, from the database."""
    row = (
        sqlite3.connect(home / "vecta.db")
        .execute("select created_at, started_at, finished_at from jobs where id = ?", (job_id,))
        .fetchone()
    )
    created, started, finished = (dt.datetime.fromisoformat(str(v)) for v in row)
    return (started - created).total_seconds(), (finished - started).total_seconds()


def last_job(home: Path, cid: str, kind: str) -> str:
    row = (
        sqlite3.connect(home / "vecta.db")
        .execute("select id from jobs where resource_id = ? and kind = ? order by created_at desc limit 1", (cid, kind))
        .fetchone()
    )
    return str(row[0])


STEP = re.compile(r"(cluster\.\w+) (\S+) timings: (.*)$")


def task_steps(home: Path, cid: str, kind: str) -> str:
    """The last step timings the worker logged for this cluster and task kind (tasks.py logs them)."""
    try:
        lines = (home / "logs" / "worker.log").read_text(errors="replace").splitlines()
    except OSError:
        return "?"
    for line in reversed(lines):
        m = STEP.search(line)
        if m and m.group(1) == kind and m.group(2) == cid:
            return m.group(3)
    return "(not logged)"


def engine_address(home: Path, cid: str) -> tuple[int, str]:
    os.environ["VECTA_HOME"] = str(home)
    sys.path.insert(0, str(ROOT))
    from services.auth.keyprovider import LocalKeyProvider

    row = (
        sqlite3.connect(home / "vecta.db")
        .execute("select org_id, engine_url, engine_token_wrapped from clusters where id = ?", (cid,))
        .fetchone()
    )
    provider = LocalKeyProvider(home / "secrets" / "master.key")
    token = provider.unwrap(row[2], {"org_id": row[0], "cluster_id": cid, "use": "engine_token"}).decode()
    return int(row[1].rsplit(":", 1)[1]), token


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})" if xs else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=6, help="suspend/resume rounds (alternating explicit, on-call)")
    ap.add_argument("--creates", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="10,000 vectors, 2 rounds, 2 creates")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds, args.creates = min(args.n, 10_000), 2, 2

    home = Path(tempfile.mkdtemp(prefix="vecta-bench-resume-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VECTA_")}
    env.update(VECTA_LOG_LEVEL="WARNING", VECTA_DATAPLANE_RATE_PER_KEY="1e9", VECTA_DATAPLANE_RATE_PER_CLUSTER="1e9")
    up = subprocess.Popen(
        [PY, "-m", "services.cli", "up", "--host", HOST, "--port", str(port), "--home", str(home)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    api = Api(port)
    log(f"vecta up at {HOST}:{port}, home {home}, load {load_average()}")
    try:
        wait_http(HOST, port, "/healthz", None, proc=up)
        signup = api.call("POST", "/v1/auth/signup", "", {"email": "rt@example.com", "password": "benchmark password",
                                                          "name": "B", "org_name": "Bench"})  # fmt: skip
        assert isinstance(signup, dict)
        session, org = signup["access_token"], signup["org"]["id"]
        projects = api.call("GET", f"/v1/orgs/{org}/projects", session)
        assert isinstance(projects, dict)
        project = projects["items"][0]["id"]
        key = api.call("POST", f"/v1/orgs/{org}/api-keys", session, {"name": "bench", "org_role": "org_owner"})
        assert isinstance(key, dict)
        token = key["key"]

        # -- create -> RUNNING ---------------------------------------------------------------------------
        creates: list[float] = []
        cid = ""
        for i in range(args.creates):
            t0 = time.perf_counter()
            created = api.call("POST", f"/v1/projects/{project}/clusters", token,
                               {"name": f"rt{i}", "plan": "serverless", "region": "local"})  # fmt: skip
            assert isinstance(created, dict)
            t1 = api.wait_status(token, created["id"], "RUNNING")
            pickup, work = job_times(home, created["job_id"])
            creates.append(t1 - t0)
            steps = task_steps(home, created["id"], "cluster.provision")
            log(f"create {i}: RUNNING after {t1 - t0:.3f} s (job waited {pickup:.3f} s, ran {work:.3f} s: {steps})")
            if i == 0:
                cid = created["id"]
            else:
                api.call("DELETE", f"/v1/clusters/{created['id']}", token)

        # -- data ----------------------------------------------------------------------------------------
        eport, etoken = engine_address(home, cid)
        api.call("POST", f"/v1/clusters/{cid}/collections", token,
                 {"name": "rt", "dimension": DIM, "metric": "cosine", "index": INDEX})  # fmt: skip
        rng = np.random.default_rng(7)
        t0 = time.perf_counter()
        for start in range(0, args.n, 1000):
            m = min(1000, args.n - start)
            vecs = rng.standard_normal((m, DIM)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            status, data = http_json(HOST, eport, "POST", "/v1/collections/rt/upsert",
                                     {"records": [{"id": f"p{start + j}", "vector": vecs[j]} for j in range(m)]},
                                     etoken)  # fmt: skip
            if status != 200:
                raise SystemExit(f"upsert -> {status}: {data}")
        http_json(HOST, eport, "POST", "/internal/flush", {}, etoken)
        log(f"{args.n:,} random vectors ingested and indexed in {time.perf_counter() - t0:.1f} s")
        query = {"vector": rng.standard_normal(DIM).astype(np.float32), "top_k": 10}
        search = f"/v1/clusters/{cid}/collections/rt/search"

        def check() -> None:
            count = api.call("POST", f"/v1/clusters/{cid}/collections/rt/count", token, {})
            hits = api.call("POST", search, token, query)
            assert isinstance(count, dict) and isinstance(hits, dict)
            if count.get("count") != args.n or len(hits["results"]) != 10:
                raise SystemExit(f"incomplete after resume: count {count}, {len(hits['results'])} hits")

        # -- suspend / resume ----------------------------------------------------------------------------
        results: dict[str, list[float]] = {"explicit": [], "on-call": []}
        steps_seen: dict[str, list[float]] = {}
        for r in range(args.rounds):
            api.call("POST", f"/v1/clusters/{cid}/suspend", token)
            api.wait_status(token, cid, "SUSPENDED")
            time.sleep(0.5)
            mode = "explicit" if r % 2 == 0 else "on-call"
            t0 = time.perf_counter()
            if mode == "explicit":
                accepted = api.call("POST", f"/v1/clusters/{cid}/resume", token)
                assert isinstance(accepted, dict)
                job_id = accepted["job_id"]
                t_running = api.wait_status(token, cid, "RUNNING")
            else:
                t_running = 0.0
            while True:  # the edge: 503 (resuming / not ready) until the engine serves the cluster
                status, body = http_json(HOST, port, "POST", search, query, token)
                if status == 200:
                    break
                if status != 503:
                    raise SystemExit(f"search during resume -> {status}: {body}")
                time.sleep(0.01)
            t_edge = time.perf_counter()
            if mode == "on-call":
                job_id = last_job(home, cid, "cluster.resume")
            check()
            pickup, work = job_times(home, job_id)
            steps = task_steps(home, cid, "cluster.resume")
            for part in steps.split(", "):
                name, _, value = part.partition(" ")
                if value.endswith(" s"):
                    steps_seen.setdefault(name, []).append(float(value[:-2]))
            results[mode].append(t_edge - t0)
            running = f"GET RUNNING {t_running - t0:.3f} s, " if mode == "explicit" else ""
            log(f"resume {r} ({mode}): {running}edge 200 after {t_edge - t0:.3f} s; job waited {pickup:.3f} s, "
                f"ran {work:.3f} s ({steps})")  # fmt: skip
        print(f"\nload {load_average()}; {args.n:,} x {DIM} random unit vectors")
        print(f"create -> RUNNING:                           {med(creates)}   goal <= 3 s")
        for mode, xs in results.items():
            print(f"resume ({mode:8}) -> search answers via edge: {med(xs)}   goal <= 2 s")
        for name, xs in steps_seen.items():
            print(f"  task step {name:24} {med(xs)}")
        api.call("DELETE", f"/v1/clusters/{cid}", token)
    finally:
        stop_process(up, timeout=30)


if __name__ == "__main__":
    main()

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

``--compare OLD_CHECKOUT`` (e.g. a `git worktree` of an older commit): the data is built once, then `vecta up`
is restarted on the same VECTA_HOME alternately from OLD_CHECKOUT and from this checkout, ``--legs`` times each;
every leg times ``--creates`` creates and two resumes (explicit, on-call) after letting the worker boot.

Per resume it prints the steps: the job waiting for a worker (job created -> started), the task's own steps as the
worker logs them (engine start, snapshot load), the job finishing -> the client seeing RUNNING, and RUNNING ->
the edge answering. Medians over the rounds at the end.

    .venv/bin/python bench/resume_timing.py [--n 100000] [--rounds 6] [--creates 3] [--quick]
    .venv/bin/python bench/resume_timing.py --compare /tmp/before [--legs 3]
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


def log_mark(home: Path) -> int:
    try:
        return (home / "logs" / "worker.log").stat().st_size
    except OSError:
        return 0


def task_steps(home: Path, cid: str, kind: str, since: int = 0) -> str:
    """The step timings the worker logged for this cluster and task kind after offset ``since`` of its log
    (tasks.py logs them; an older checkout does not)."""
    try:
        with (home / "logs" / "worker.log").open("rb") as fh:
            fh.seek(since)
            lines = fh.read().decode(errors="replace").splitlines()
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


class Run:
    """One VECTA_HOME, one tenant and API key, one cluster holding the vectors; `vecta up` (re)started from a
    given checkout."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.home = Path(tempfile.mkdtemp(prefix="vecta-bench-resume-"))
        self.port = free_port()
        self.api = Api(self.port)
        self.up: subprocess.Popen[bytes] | None = None
        self.token = self.project = self.cid = ""
        self.query: dict[str, object] = {}

    def start(self, root: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VECTA_")}
        env.update(VECTA_LOG_LEVEL="WARNING", VECTA_DATAPLANE_RATE_PER_KEY="1e9",
                   VECTA_DATAPLANE_RATE_PER_CLUSTER="1e9")  # fmt: skip
        self.up = subprocess.Popen(
            [PY, "-m", "services.cli", "up", "--host", HOST, "--port", str(self.port), "--home", str(self.home)],
            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        wait_http(HOST, self.port, "/healthz", None, proc=self.up)

    def stop(self) -> None:
        if self.up is not None:
            stop_process(self.up, timeout=30)
            self.up = None

    def tenant(self) -> None:
        api = self.api
        signup = api.call("POST", "/v1/auth/signup", "", {"email": "rt@example.com", "password": "benchmark password",
                                                          "name": "B", "org_name": "Bench"})  # fmt: skip
        assert isinstance(signup, dict)
        session, org = signup["access_token"], signup["org"]["id"]
        projects = api.call("GET", f"/v1/orgs/{org}/projects", session)
        assert isinstance(projects, dict)
        self.project = projects["items"][0]["id"]
        key = api.call("POST", f"/v1/orgs/{org}/api-keys", session, {"name": "bench", "org_role": "org_owner"})
        assert isinstance(key, dict)
        self.token = key["key"]

    def create(self, name: str, keep: bool) -> float:
        mark = log_mark(self.home)
        t0 = time.perf_counter()
        created = self.api.call("POST", f"/v1/projects/{self.project}/clusters", self.token,
                                {"name": name, "plan": "serverless", "region": "local"})  # fmt: skip
        assert isinstance(created, dict)
        t1 = self.api.wait_status(self.token, created["id"], "RUNNING")
        pickup, work = job_times(self.home, created["job_id"])
        steps = task_steps(self.home, created["id"], "cluster.provision", mark)
        log(f"create {name}: RUNNING after {t1 - t0:.3f} s (job waited {pickup:.3f} s, ran {work:.3f} s: {steps})")
        if keep:
            self.cid = created["id"]
        else:
            self.api.call("DELETE", f"/v1/clusters/{created['id']}", self.token)
        return t1 - t0

    def fill(self) -> None:
        eport, etoken = engine_address(self.home, self.cid)
        self.api.call("POST", f"/v1/clusters/{self.cid}/collections", self.token,
                      {"name": "rt", "dimension": DIM, "metric": "cosine", "index": INDEX})  # fmt: skip
        rng = np.random.default_rng(7)
        t0 = time.perf_counter()
        for start in range(0, self.n, 1000):
            m = min(1000, self.n - start)
            vecs = rng.standard_normal((m, DIM)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            status, data = http_json(HOST, eport, "POST", "/v1/collections/rt/upsert",
                                     {"records": [{"id": f"p{start + j}", "vector": vecs[j]} for j in range(m)]},
                                     etoken)  # fmt: skip
            if status != 200:
                raise SystemExit(f"upsert -> {status}: {data}")
        http_json(HOST, eport, "POST", "/internal/flush", {}, etoken)
        log(f"{self.n:,} random vectors ingested and indexed in {time.perf_counter() - t0:.1f} s")
        self.query = {"vector": rng.standard_normal(DIM).astype(np.float32), "top_k": 10}

    def suspend(self) -> None:
        self.api.call("POST", f"/v1/clusters/{self.cid}/suspend", self.token)
        self.api.wait_status(self.token, self.cid, "SUSPENDED")

    def resume(self, mode: str, steps_seen: dict[str, list[float]]) -> float:
        """From SUSPENDED: seconds until a search through the edge answers 200 (complete results checked)."""
        api, cid, token = self.api, self.cid, self.token
        search = f"/v1/clusters/{cid}/collections/rt/search"
        mark = log_mark(self.home)
        t0 = time.perf_counter()
        if mode == "explicit":
            accepted = api.call("POST", f"/v1/clusters/{cid}/resume", token)
            assert isinstance(accepted, dict)
            job_id = accepted["job_id"]
            t_running = api.wait_status(token, cid, "RUNNING")
        else:
            t_running = 0.0
        while True:  # the edge: 503 (resuming / not ready) until the engine serves the cluster
            status, body = http_json(HOST, self.port, "POST", search, self.query, token)
            if status == 200:
                break
            if status != 503:
                raise SystemExit(f"search during resume -> {status}: {body}")
            time.sleep(0.01)
        t_edge = time.perf_counter()
        if mode == "on-call":
            job_id = last_job(self.home, cid, "cluster.resume")
        count = api.call("POST", f"/v1/clusters/{cid}/collections/rt/count", token, {})
        hits = api.call("POST", search, token, self.query)
        assert isinstance(count, dict) and isinstance(hits, dict)
        if count.get("count") != self.n or len(hits["results"]) != 10:
            raise SystemExit(f"incomplete after resume: count {count}, {len(hits['results'])} hits")
        pickup, work = job_times(self.home, job_id)
        steps = task_steps(self.home, cid, "cluster.resume", mark)
        for part in steps.split(", "):
            name, _, value = part.partition(" ")
            if value.endswith(" s"):
                steps_seen.setdefault(name, []).append(float(value[:-2]))
        running = f"GET RUNNING {t_running - t0:.3f} s, " if mode == "explicit" else ""
        log(f"resume ({mode}): {running}edge 200 after {t_edge - t0:.3f} s; job waited {pickup:.3f} s, "
            f"ran {work:.3f} s ({steps})")  # fmt: skip
        return t_edge - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=6, help="suspend/resume rounds (alternating explicit, on-call)")
    ap.add_argument("--creates", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="10,000 vectors, 2 rounds, 2 creates")
    ap.add_argument("--compare", type=Path, help="another checkout of the product to alternate with this one")
    ap.add_argument("--legs", type=int, default=3, help="with --compare: legs per checkout")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds, args.creates = min(args.n, 10_000), 2, 2
    run = Run(args.n)
    log(f"home {run.home}, load {load_average()}")
    try:
        run.start(ROOT)
        run.tenant()
        if args.compare is None:
            creates = [run.create(f"rt{i}", keep=False) for i in range(args.creates)]
        run.create("data", keep=True)
        run.fill()
        if args.compare is not None:
            compare(run, args)
            return
        results: dict[str, list[float]] = {"explicit": [], "on-call": []}
        steps_seen: dict[str, list[float]] = {}
        for r in range(args.rounds):
            run.suspend()
            time.sleep(0.5)
            mode = "explicit" if r % 2 == 0 else "on-call"
            results[mode].append(run.resume(mode, steps_seen))
        print(f"\nload {load_average()}; {args.n:,} x {DIM} random unit vectors")
        print(f"create -> RUNNING:                           {med(creates)}   goal <= 3 s")
        for mode, xs in results.items():
            print(f"resume ({mode:8}) -> search answers via edge: {med(xs)}   goal <= 2 s")
        for name, xs in steps_seen.items():
            print(f"  task step {name:24} {med(xs)}")
        run.api.call("DELETE", f"/v1/clusters/{run.cid}", run.token)
    finally:
        run.stop()


def compare(run: Run, args: argparse.Namespace) -> None:
    roots = {"before": args.compare.resolve(), "after": ROOT}
    figures: dict[str, dict[str, list[float]]] = {k: {"create": [], "explicit": [], "on-call": []} for k in roots}
    run.suspend()
    for leg in range(args.legs):
        for which, root in roots.items():
            run.stop()
            run.start(root)
            time.sleep(3.0)  # the worker boots (and, where it has them, starts its spare engines)
            log(f"leg {leg} {which} ({root}), load {load_average()}")
            for i in range(args.creates):
                figures[which]["create"].append(run.create(f"{which}{leg}-{i}", keep=False))
                time.sleep(0.5)
            steps: dict[str, list[float]] = {}
            for mode in ("explicit", "on-call"):
                figures[which][mode].append(run.resume(mode, steps))
                run.suspend()
                time.sleep(0.5)
    print(f"\nload {load_average()}; {args.n:,} x {DIM} random unit vectors; medians over {args.legs} legs each")
    for what in ("create", "explicit", "on-call"):
        print(f"{what:9} before {med(figures['before'][what])}   after {med(figures['after'][what])}")


if __name__ == "__main__":
    main()

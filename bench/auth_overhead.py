"""What authentication costs per request.

Starts the API (uvicorn, one worker, on 127.0.0.1) with a fresh VECTA_HOME on the embedded defaults, signs up,
creates an API key, then times, in alternating rounds on one keep-alive connection:

  baseline:  GET /healthz            (no authentication, no database)
  measured:  GET /v1/me with the key (API-key authentication; the handler reads the key's row)
  measured:  GET /v1/orgs/{id}/roles (API-key authentication + an authorization check, no database read for
                                      built-in roles beyond the custom-role list)

and prints requests/s, p50 and p99 of each, and the p50 difference (goal: authentication adds <= 0.2 ms p50).

    .venv/bin/python bench/auth_overhead.py [--requests 4000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(conn: http.client.HTTPConnection, method: str, path: str, body: object = None, token: str = "") -> tuple:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, data


def timed(conn: http.client.HTTPConnection, path: str, token: str, n: int) -> list[float]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        out.append(time.perf_counter() - t0)
        if resp.status != 200:
            raise SystemExit(f"{path} answered {resp.status}")
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=4000, help="requests per endpoint per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="vecta-bench-auth-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VECTA_")}
    env.update(VECTA_HOME=str(home), VECTA_LOG_LEVEL="WARNING")
    subprocess.run([sys.executable, "-m", "services.cli", "db", "upgrade"], env=env, check=True)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "services.api.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                if call(conn, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        status, data = call(
            conn,
            "POST",
            "/v1/auth/signup",
            {"email": "bench@example.com", "password": "benchmark password", "name": "B", "org_name": "Bench"},
        )
        assert status == 201, data
        signup = json.loads(data)
        org_id = signup["org"]["id"]
        status, data = call(
            conn,
            "POST",
            f"/v1/orgs/{org_id}/api-keys",
            {"name": "bench", "org_role": "org_owner"},
            token=signup["access_token"],
        )
        assert status == 201, data
        key = json.loads(data)["key"]

        targets = {
            "GET /healthz (no auth, baseline)": ("/healthz", ""),
            "GET /v1/me (API key)": ("/v1/me", key),
            "GET /v1/orgs/{id}/roles (API key + authz)": (f"/v1/orgs/{org_id}/roles", key),
        }
        for path, token in targets.values():  # warm up: connection, caches, code paths
            timed(conn, path, token, 300)
        samples: dict[str, list[float]] = {name: [] for name in targets}
        wall: dict[str, float] = {name: 0.0 for name in targets}
        for _ in range(args.rounds):
            for name, (path, token) in targets.items():
                t0 = time.perf_counter()
                samples[name] += timed(conn, path, token, args.requests)
                wall[name] += time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=10)

    base = "GET /healthz (no auth, baseline)"
    base_p50 = statistics.median(samples[base])
    print(f"auth overhead: {args.rounds} rounds x {args.requests} requests, one keep-alive client, one server process")
    print(f"{'endpoint':45s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'ratio rps':>9s} {'+p50 ms':>8s}")
    for name, xs in samples.items():
        rps = len(xs) / wall[name]
        base_rps = len(samples[base]) / wall[base]
        p50 = statistics.median(xs)
        print(
            f"{name:45s} {rps:8.0f} {p50 * 1e3:8.3f} {pct(xs, 99) * 1e3:8.3f} {rps / base_rps:9.2f} "
            f"{(p50 - base_p50) * 1e3:8.3f}"
        )
    added = (statistics.median(samples["GET /v1/me (API key)"]) - base_p50) * 1e3
    print(f"authentication adds {added:.3f} ms at p50 (goal <= 0.2 ms): {'MET' if added <= 0.2 else 'NOT MET'}")


if __name__ == "__main__":
    main()

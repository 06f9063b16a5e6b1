"""The engine's request metrics (services/core/metrics.py; the API's middleware uses the same): plain counts
exported as Prometheus counter + histogram families, with the same names, labels, buckets and values a
prometheus_client Counter and Histogram would export."""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.engine.server import LATENCY_BUCKETS, _Metrics


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exposition_matches_prometheus_client():
    rng = np.random.default_rng(3)
    values = list(rng.lognormal(-7, 2, 3000)) + list(LATENCY_BUCKETS) + [0.0, 100.0]  # bounds: le is inclusive
    routes = ["search", "fetch", "upsert", "stats"]
    m = _Metrics()
    reg = CollectorRegistry()
    c = Counter("vecta_engine_requests", "x", ["route", "status"], registry=reg)
    h = Histogram("vecta_engine_request_seconds", "x", ["route"], registry=reg, buckets=LATENCY_BUCKETS)
    for i, v in enumerate(values):
        route, status = routes[i % 4], (200, 404, 200, 500)[i % 3]
        m.observe(route, status, float(v))
        c.labels(route, str(status)).inc()
        h.labels(route).observe(float(v))
    mine = _samples(generate_latest(m.registry))
    ref = _samples(generate_latest(reg))
    for key, value in ref.items():
        assert mine[key] == value or abs(mine[key] - value) < 1e-9 * max(1.0, abs(value)), key
    # and the routes made at start, with no requests yet, are there at zero
    assert mine[("vecta_engine_request_seconds_count", (("route", "query"),))] == 0


def test_request_stats_and_threads():
    m = _Metrics()

    def hammer() -> None:
        for _ in range(20_000):
            m.observe("search", 200, 0.0003)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m.observe("upsert", 200, 0.03)
    stats = m.request_stats()
    assert stats["read"]["count"] == 80_000  # nothing lost to races between threads
    i = LATENCY_BUCKETS.index(0.0005)
    assert stats["read"]["latency_counts"][i] == 80_000
    assert abs(stats["read"]["latency_sum_ms"] - 80_000 * 0.3) < 1e-3
    assert stats["write"]["count"] == 1 and stats["write"]["latency_counts"][LATENCY_BUCKETS.index(0.05)] == 1

"""Cluster metrics samples: the engine's cumulative request counters and latency histograms (from each member's
``/internal/stats``) turned into running totals, QPS inputs and p50/p99 per heartbeat interval (docs/clusters.md,
Metrics). Counters are per engine process (``boot_id``); the control plane keeps the totals."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.control_plane.clusters.models import Cluster, ClusterMetric

METRICS_CURSOR = "metrics_cursor"  # key in Cluster.engine_state: the engine's counters at the last sample
REPLICA_CURSORS = "replica_metrics_cursors"  # the same for each read replica, by URL


@dataclass(frozen=True)
class Interval:
    """What an engine served between two samples: requests (reads + writes) and the read latency percentiles."""

    requests: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    cursor: dict[str, Any]
    read_buckets: tuple[int, ...] = ()  # the interval's read-latency histogram (counts per bucket)
    bounds: tuple[float, ...] = ()


def histogram_quantile(q: float, bounds: list[float], counts: list[int]) -> float | None:
    """The q-quantile of a histogram (``counts[i]`` in ``(bounds[i-1], bounds[i]]``, the last count above every
    bound), interpolated linearly inside its bucket as Prometheus does; None without observations. A quantile in
    the last, open bucket is reported as the highest bound."""
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n <= 0:
            continue
        if seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lo = bounds[i - 1] if i > 0 else 0.0
            return lo + (bounds[i] - lo) * max(0.0, rank - seen) / n
        seen += n
    return float(bounds[-1])


def interval_since(cursor: Any, reported: Any) -> Interval | None:
    """The requests and read latencies between the engine's counters at the last sample (``cursor``) and now
    (``reported``: /internal/stats ``requests``). Counters are per engine process: another ``boot_id`` (a restart,
    a resume, a modify) or no cursor means everything reported was served since the last sample. Lower counts
    under the same ``boot_id`` mean a sample older than the cursor (an overlapping pass): None, nothing to add."""
    try:
        boot = str(reported["boot_id"])
        bounds = [float(b) for b in reported["latency_bounds_ms"]]
        reads = int(reported["read"]["count"])
        writes = int(reported["write"]["count"])
        buckets = [int(n) for n in reported["read"]["latency_counts"]]
    except (KeyError, TypeError, ValueError):
        return Interval(0, None, None, {})  # an engine that does not report requests: nothing measured
    now = {"boot_id": boot, "reads": reads, "writes": writes, "read_buckets": buckets}
    same = isinstance(cursor, dict) and cursor.get("boot_id") == boot
    before: dict[str, Any] = cursor if same else {"reads": 0, "writes": 0, "read_buckets": [0] * len(buckets)}
    prev_buckets = list(before.get("read_buckets") or [])
    if len(prev_buckets) != len(buckets):
        prev_buckets = [0] * len(buckets)
    delta = [a - b for a, b in zip(buckets, prev_buckets, strict=True)]
    d_reads, d_writes = reads - int(before.get("reads", 0)), writes - int(before.get("writes", 0))
    if d_reads < 0 or d_writes < 0 or any(d < 0 for d in delta):
        return None
    p50 = histogram_quantile(0.5, bounds, delta)
    p99 = histogram_quantile(0.99, bounds, delta)
    return Interval(
        d_reads + d_writes,
        None if p50 is None else round(p50, 3),
        None if p99 is None else round(p99, 3),
        now,
        tuple(delta),
        tuple(bounds),
    )


def _member_sample(cursor: Any, stats: dict[str, Any]) -> tuple[Interval, int, int, dict[str, Any]] | None:
    """One engine process's interval since its cursor: (interval, read units, write units, the new cursor), or
    None for a sample older than the cursor. Read and write units (what billing meters) are per process too, so
    they are deltas under the same boot_id like the request counts (everything reported, after a restart)."""
    interval = interval_since(cursor, stats.get("requests"))
    if interval is None:
        return None
    units = (int(stats.get("read_units", 0)), int(stats.get("write_units", 0)))
    before = (0, 0)
    if interval.cursor and isinstance(cursor, dict) and cursor.get("boot_id") == interval.cursor["boot_id"]:
        before = (int(cursor.get("read_units", 0)), int(cursor.get("write_units", 0)))
    new_cursor = {**interval.cursor, "read_units": units[0], "write_units": units[1]} if interval.cursor else {}
    return interval, max(0, units[0] - before[0]), max(0, units[1] - before[1]), new_cursor


def record_sample(
    s: Session,
    c: Cluster,
    stats: dict[str, Any],
    at: dt.datetime,
    replica_stats: dict[str, dict[str, Any]] | None = None,
) -> None:
    """A metrics row for this heartbeat, over the primary and the read replicas that answered
    (``replica_stats``: URL → stats): a replicated cluster's reads are spread over its members, and each member's
    counters are its own. ``requests``, read and write units are running totals kept by the control plane (the
    previous row's plus this interval's), so they never go down when an engine restarts and QPS is never
    negative; the latency percentiles come from the members' histograms added together."""
    state = dict(c.engine_state or {})
    primary = _member_sample(state.get(METRICS_CURSOR), stats)
    if primary is None:
        return
    samples = [primary]
    replica_cursors = dict(state.get(REPLICA_CURSORS) or {})
    for url, st in (replica_stats or {}).items():
        member = _member_sample(replica_cursors.get(url), st)
        if member is not None:
            samples.append(member)
            if member[3]:
                replica_cursors[url] = member[3]
    requests = sum(m[0].requests for m in samples)
    d_read = sum(m[1] for m in samples)
    d_write = sum(m[2] for m in samples)
    p50, p99 = primary[0].latency_p50_ms, primary[0].latency_p99_ms
    if len(samples) > 1:  # one histogram for the cluster: the members' interval buckets added (same bounds)
        bounds = primary[0].bounds
        merged = [0] * len(primary[0].read_buckets)
        for m in samples:
            if m[0].bounds == bounds and len(m[0].read_buckets) == len(merged):
                merged = [a + b for a, b in zip(merged, m[0].read_buckets, strict=True)]
        q50, q99 = histogram_quantile(0.5, list(bounds), merged), histogram_quantile(0.99, list(bounds), merged)
        p50 = None if q50 is None else round(q50, 3)
        p99 = None if q99 is None else round(q99, 3)
    last = s.execute(
        select(ClusterMetric.requests, ClusterMetric.read_units, ClusterMetric.write_units)
        .where(ClusterMetric.cluster_id == c.id)
        .order_by(ClusterMetric.at.desc())
        .limit(1)
    ).first()
    if primary[3]:
        state[METRICS_CURSOR] = primary[3]
    known = {r.get("url") for r in state.get("replicas") or [] if isinstance(r, dict)}
    state[REPLICA_CURSORS] = {u: cur for u, cur in replica_cursors.items() if u in known}
    c.engine_state = state
    s.add(
        ClusterMetric(
            cluster_id=c.id,
            at=at,
            requests=int(last[0] if last else 0) + requests,
            read_units=int(last[1] if last else 0) + d_read,
            write_units=int(last[2] if last else 0) + d_write,
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            vector_count=c.vector_count,
            storage_bytes=c.storage_bytes,
        )
    )

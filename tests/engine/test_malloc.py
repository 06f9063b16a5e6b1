"""The engine's allocator modes (services/engine/malloc.py): a write burst starts with a write, ends when writes
pause or a seal or build starts, and never starts while one runs; untuned processes are left alone."""

from __future__ import annotations

import time

import numpy as np
import pytest

from services.engine import malloc


@pytest.fixture
def tuned(monkeypatch):
    if not malloc._glibc():
        pytest.skip("not glibc")
    monkeypatch.setattr(malloc, "_tuned", True)
    malloc.tune_malloc()
    yield
    malloc.end_write_burst()


def test_untuned_process_is_left_alone(monkeypatch):
    monkeypatch.setattr(malloc, "_tuned", False)
    malloc.write_burst()
    assert malloc.state()["burst"] is False


def test_burst_starts_with_a_write_and_ends_when_writes_pause(tuned, monkeypatch):
    malloc.write_burst()
    assert malloc.state()["burst"] is True
    assert not malloc.write_burst_idle()
    assert malloc.write_burst_idle(time.monotonic() + malloc.BURST_IDLE_SECONDS + 0.01)
    # large temporaries allocated and freed in a burst work as ever (they come from the heap now)
    for _ in range(3):
        a = np.ones(3 << 20, dtype=np.uint8)
        assert int(a.sum()) == 3 << 20
        del a
    malloc.end_write_burst()
    assert malloc.state()["burst"] is False
    assert not malloc.write_burst_idle()


def test_seals_and_builds_run_in_the_steady_mode(tuned):
    malloc.write_burst()
    with malloc.steady():
        assert malloc.state() == {"tuned": True, "burst": False, "building": 1}
        malloc.write_burst()  # a write during a build does not start a burst
        assert malloc.state()["burst"] is False
        with malloc.steady():
            assert malloc.state()["building"] == 2
    assert malloc.state()["building"] == 0
    malloc.write_burst()
    assert malloc.state()["burst"] is True
    with malloc.bulk_allocations():  # opening or restoring ends it too, and none starts meanwhile
        assert malloc.state()["burst"] is False
        malloc.write_burst()
        assert malloc.state()["burst"] is False
    assert malloc.state()["building"] == 0


def test_a_write_never_waits_for_the_lock(tuned):
    with malloc._lock:  # held by a thread trimming the heap, say
        malloc.write_burst()  # returns at once, in the current mode
        assert malloc.state()["burst"] is False
    malloc.write_burst()
    assert malloc.state()["burst"] is True


def test_populate_faults_in_pages_without_changing_them():
    buf = np.empty((4096, 384), dtype=np.float32)  # 6 MiB: a fresh mapping, not faulted in yet
    buf[:10] = 1.5
    part = buf[10:3000]
    rss = _rss_kib()
    done = malloc.populate(part)
    if not done:
        pytest.skip("MADV_POPULATE_WRITE is not supported here")
    assert _rss_kib() - rss >= part.nbytes // 1024 // 2  # (huge pages may round it up)
    assert (buf[:10] == 1.5).all()
    part[:] = 2.0
    assert (buf[:10] == 1.5).all() and (buf[10:3000] == 2.0).all()
    assert malloc.populate(buf[5:5]) is False  # nothing to do


def _rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")

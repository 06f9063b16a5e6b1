"""The counters behind rate limits: exact in process memory; with a real Redis on loopback, ``incr_nowait`` counts
without waiting and sends the counts in the background, batched, reading the totals back."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from services.core.kv import MemoryKV, RedisKV

REDIS = os.environ.get("VECTA_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"


async def test_memory_counts_exactly_with_or_without_waiting() -> None:
    kv = MemoryKV()
    assert await kv.incr("a", 2) == 1
    assert kv.incr_nowait("a", 2) == 2
    assert await kv.incr("a", 2) == 3
    assert (await kv.get_int("a"))[0] == 3


async def _redis_or_skip() -> RedisKV:
    kv = RedisKV(REDIS)
    try:
        await kv._r.ping()
    except Exception:
        await kv.close()
        pytest.skip(f"no Redis at {REDIS}")
    return kv


async def test_redis_counts_without_waiting_and_sends_them_batched() -> None:
    a, b = await _redis_or_skip(), await _redis_or_skip()  # two API processes
    # a flush every 0.1 s, not 0.02: on a loaded machine a 20 ms timer can fire inside one of the awaits below
    # and move counts between "pending" and "sent" while a step is being checked (the sums are what is tested)
    a.FLUSH_SECONDS = b.FLUSH_SECONDS = 0.1  # type: ignore[misc]
    key = f"test:kv:{uuid.uuid4().hex}"
    try:
        assert [a.incr_nowait(key, 5) for _ in range(3)] == [1, 2, 3]  # nothing read yet: its own count
        assert (await b.get_int(key))[0] == 0  # not sent yet
        await asyncio.sleep(a.FLUSH_SECONDS * 3)
        value, ttl = await b.get_int(key)
        assert value == 3 and 1 <= ttl <= 5  # sent in one go, with the window's expiry
        assert await b.incr(key, 5) == 4  # the other process, waiting
        await asyncio.sleep(a.FLUSH_SECONDS * 3)
        assert a.incr_nowait(key, 5) == 4  # what it read back (3) + this one: b's count comes with the next read
        await asyncio.sleep(a.FLUSH_SECONDS * 3)
        assert a.incr_nowait(key, 5) == 6  # b's increment is known now
        assert await a.incr(key, 5) == 7  # the waiting path adds what is not sent yet
        await asyncio.sleep(a.FLUSH_SECONDS * 3)
        assert (await b.get_int(key))[0] == 7
        for _ in range(4):
            a.incr_nowait(key, 5)
    finally:
        await a.close()  # sends what is left
        assert (await b.get_int(key))[0] == 11
        await b.delete(key)
        await b.close()


async def test_redis_counts_what_is_on_its_way_to_redis() -> None:
    """Increments sent but not read back yet still count: before, a request arriving while the batch was on its
    way saw neither the sent increments nor their total, so a process could undercount its own traffic (the
    sixth request in a window of five went through)."""
    kv = await _redis_or_skip()
    kv.FLUSH_SECONDS = 60.0  # type: ignore[misc]  # flushed by hand below
    key = f"test:kv:{uuid.uuid4().hex}"
    try:
        assert [kv.incr_nowait(key, 5) for _ in range(5)] == [1, 2, 3, 4, 5]
        assert kv._flush is not None
        kv._flush.cancel()
        kv._start_flush()
        await asyncio.sleep(0)  # the flush has swapped its batch out and is waiting for Redis
        assert kv._flushing is not None and not kv._pending
        assert kv.incr_nowait(key, 5) == 6
        await kv._flushing
        assert kv.incr_nowait(key, 5) == 7  # 5 read back from Redis + 2 pending
        assert await kv.incr(key, 5) == 8
    finally:
        await kv.delete(key)
        await kv.close()


async def test_redis_unavailable_keeps_the_counts_for_later() -> None:
    kv = RedisKV("redis://127.0.0.1:1/0")  # nothing listens there
    key = f"test:kv:{uuid.uuid4().hex}"
    assert kv.incr_nowait(key, 5) == 1
    assert kv.incr_nowait(key, 5) == 2
    for _ in range(200):
        await asyncio.sleep(RedisKV.FLUSH_SECONDS)
        if kv.send_failures >= 1 and kv._flushing is None:
            break
    assert kv.send_failures >= 1
    assert kv._pending[key][0] == 2  # not lost: tried again with the next batch
    assert kv.incr_nowait(key, 5) == 3
    kv._closed = True
    if kv._flush is not None:
        kv._flush.cancel()
    await kv._r.aclose()

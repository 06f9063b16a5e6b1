"""A tiny key-value store for counters and flags shared by API processes: Redis in production, process memory in
the embedded default (one API process). Used for login throttling and rate limits."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from services.core.settings import get_settings

log = logging.getLogger(__name__)


class KV(Protocol):
    async def incr(self, key: str, ttl_seconds: int) -> int:
        """Increment a counter, starting its expiry window on the first increment; returns the new value."""

    async def get_int(self, key: str) -> tuple[int, int]:
        """The counter's value and the seconds left in its window (0, 0 when absent)."""

    def incr_nowait(self, key: str, ttl_seconds: int) -> int:
        """``incr`` without waiting, for the edge's fast lane: exact in process memory; with Redis, the count as
        last read from Redis plus this process's increments not yet sent (sent in the background, batched)."""

    async def delete(self, key: str) -> None: ...

    async def close(self) -> None: ...


class MemoryKV:
    def __init__(self) -> None:
        self._data: dict[str, tuple[int, float]] = {}

    def _live(self, key: str) -> tuple[int, float] | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= time.monotonic():
            del self._data[key]
            return None
        return item

    async def incr(self, key: str, ttl_seconds: int) -> int:
        return self.incr_nowait(key, ttl_seconds)  # nothing awaited: atomic on the event loop

    def incr_nowait(self, key: str, ttl_seconds: int) -> int:
        item = self._live(key)
        value, deadline = item if item else (0, time.monotonic() + ttl_seconds)
        self._data[key] = (value + 1, deadline)
        if len(self._data) > 100_000:
            for k in [k for k, (_, d) in self._data.items() if d <= time.monotonic()]:
                del self._data[k]
        return value + 1

    async def get_int(self, key: str) -> tuple[int, int]:
        item = self._live(key)
        if item is None:
            return 0, 0
        return item[0], max(1, int(item[1] - time.monotonic() + 0.999))

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def close(self) -> None:
        self._data.clear()


class RedisKV:
    FLUSH_SECONDS = 0.02  # how long increments counted without waiting (incr_nowait) stay in this process

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self._r = redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._known: dict[str, tuple[int, float]] = {}  # key -> (count last read from Redis, when)
        self._pending: dict[str, tuple[int, int]] = {}  # key -> (increments not sent yet, ttl)
        self._inflight: dict[str, int] = {}  # key -> increments sent, their total not read back yet
        self._flush: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._closed = False
        self.send_failures = 0

    async def incr(self, key: str, ttl_seconds: int) -> int:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, ttl_seconds, nx=True)
            value, _ = await pipe.execute()
        self._known[key] = (int(value), time.monotonic())
        return int(value) + self._pending.get(key, (0, 0))[0] + self._inflight.get(key, 0)

    def incr_nowait(self, key: str, ttl_seconds: int) -> int:
        """The count of ``key`` as this process knows it, one more: what Redis said last (0 for a key it has not
        read yet, e.g. a new one-second window) plus this process's own increments not sent yet or sent and not
        yet read back. They are sent in one pipeline every ``FLUSH_SECONDS``, which reads the totals back. So
        this process never undercounts its own traffic; a limit can be passed only by what the other API
        processes counted since this one last read the key (at most ~20 ms of their traffic): a fixed-window
        limit is approximate anyway (it lets up to twice the rate through across a window edge)."""
        n, _ = self._pending.get(key, (0, ttl_seconds))
        self._pending[key] = (n + 1, ttl_seconds)
        if self._flush is None and self._flushing is None:
            self._flush = asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self._start_flush)
        known = self._known.get(key)
        return (known[0] if known is not None else 0) + self._inflight.get(key, 0) + n + 1

    def _start_flush(self) -> None:
        self._flush = None
        self._flushing = asyncio.get_running_loop().create_task(self._send_pending())

    async def _send_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for key, (n, _ttl) in pending.items():  # still counted by incr_nowait while on their way
            self._inflight[key] = self._inflight.get(key, 0) + n
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                for key, (n, ttl) in pending.items():
                    pipe.incrby(key, n)
                    pipe.expire(key, ttl, nx=True)
                results = await pipe.execute()
            now = time.monotonic()
            for key, value in zip(pending, results[::2], strict=True):
                self._known[key] = (int(value), now)  # the total now includes them
                self._inflight.pop(key, None)
            if len(self._known) > 1000:  # keys are per one-second window: forget the old ones
                self._known = {k: v for k, v in self._known.items() if now - v[1] < 5.0}
        except Exception:  # Redis unavailable: keep the counts for the next attempt (the usual path fails too)
            self.send_failures += 1
            log.warning("could not send rate-limit counts to Redis", exc_info=True)
            for key, (n, ttl) in pending.items():
                self._inflight.pop(key, None)
                m, _ = self._pending.get(key, (0, ttl))
                self._pending[key] = (m + n, ttl)
        finally:
            self._flushing = None
            if self._pending and self._flush is None and not self._closed:
                self._flush = asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self._start_flush)

    async def get_int(self, key: str) -> tuple[int, int]:
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.ttl(key)
            value, ttl = await pipe.execute()
        if value is None:
            return 0, 0
        return int(value), max(1, int(ttl))

    async def delete(self, key: str) -> None:
        await self._r.delete(key)

    async def close(self) -> None:
        self._closed = True
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._flushing is not None:
            await self._flushing
        if self._pending:
            await self._send_pending()
        await self._r.aclose()


def make_kv() -> KV:
    url = get_settings().redis_url
    return RedisKV(url) if url else MemoryKV()

"""A tiny key-value store for counters and flags shared by API processes: Redis in production, process memory in
the embedded default (one API process). Used for login throttling and rate limits."""

from __future__ import annotations

import time
from typing import Protocol

from services.core.settings import get_settings


class KV(Protocol):
    async def incr(self, key: str, ttl_seconds: int) -> int:
        """Increment a counter, starting its expiry window on the first increment; returns the new value."""

    async def get_int(self, key: str) -> tuple[int, int]:
        """The counter's value and the seconds left in its window (0, 0 when absent)."""

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
        return self.incr_now(key, ttl_seconds)  # nothing awaited: atomic on the event loop

    def incr_now(self, key: str, ttl_seconds: int) -> int:
        """``incr`` without waiting (it never needs to: the store is in this process)."""
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
    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self._r = redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def incr(self, key: str, ttl_seconds: int) -> int:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, ttl_seconds, nx=True)
            value, _ = await pipe.execute()
        return int(value)

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
        await self._r.aclose()


def make_kv() -> KV:
    url = get_settings().redis_url
    return RedisKV(url) if url else MemoryKV()

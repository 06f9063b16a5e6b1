"""How the engine process uses glibc's allocator: where large buffers come from and when freed memory goes back.

Three modes (``M_MMAP_THRESHOLD``: buffers at least this large are their own mapping, returned to the OS when freed):

* **steady** (``tune_malloc``, at start): 1 MiB. Request bodies, vector batches and index builds are mapped and
  unmapped, instead of fragmenting the heap arenas that long-lived objects share; RSS follows the data.
* **bulk** (``bulk_allocations``, opening and restoring): 8 MiB, so the 4 MiB chunks decrypted one after another
  reuse heap pages.
* **write burst** (``write_burst``, each upsert): 64 MiB, and freed heap memory up to 128 MiB kept. An upsert of
  1,000 x 384 allocates and frees ~15-20 MB of temporaries (the body, simdjson's padded copy, float buffers, the
  WAL record and its ciphertext); mapped afresh each time, every page of them was faulted in and every unmapping
  shot down the other cores' TLBs: parsing took ~45 ms a batch instead of ~26 (measured: ingest over HTTP +45 %
  with the heap reused). Once writes pause for ``BURST_IDLE_SECONDS``, or as soon as a seal or an index build
  starts (their buffers are long-lived or huge: they must stay mapped, not land in the heap), the steady mode is
  back and the heap is trimmed, so RSS after a load is what it was.

Process-wide settings: flips are serialized by one lock; nothing changes in a process not tuned (tests, tools).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 1 << 20
BULK_MMAP_THRESHOLD = 8 << 20  # above crypto.CHUNK (4 MiB) plus its tag: chunk-sized temporaries reuse the heap
BURST_MMAP_THRESHOLD = 64 << 20
BURST_TRIM_THRESHOLD = 128 << 20
DEFAULT_TRIM_THRESHOLD = 128 << 10  # glibc's
BURST_IDLE_SECONDS = 1.0

_libc: Any = None
_tuned = False
_lock = threading.Lock()
_burst = False
_building = 0
_last_write = 0.0


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") else False
            if _libc:
                lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                lib.madvise.restype = ctypes.c_int
        except OSError:
            _libc = False
    return _libc


def tune_malloc() -> None:
    """Process-wide (the server calls it at start): the steady mode (see the module's docstring)."""
    global _tuned
    lib = _glibc()
    if lib:
        lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)  # (a fixed value also stops glibc from raising it)
        lib.mallopt(_M_ARENA_MAX, 2)  # fewer per-thread arenas holding freed memory
        _tuned = True


@contextlib.contextmanager
def bulk_allocations() -> Iterator[None]:
    """While loading data (open, restore): chunk-sized buffers come from the heap, not from fresh mmaps.
    Decrypting a segment allocates and frees one 4 MiB chunk after another; with the 1 MiB threshold each was a
    new mapping whose pages were faulted in anew (~20 % of a 100k-vector restore). Larger buffers (the whole
    segment, indexes, a growing segment's reserved space) stay mmap'ed: on the heap they would land on pages
    already touched and count in RSS untouched. Afterwards the tuned threshold is back and the freed heap is
    trimmed. Nothing changes in a process not tuned."""
    global _building
    lib: Any = _glibc() if _tuned else None
    if not lib:
        yield
        return
    with _lock:
        _building += 1  # no write burst meanwhile
        _end_burst(lib)
        lib.mallopt(_M_MMAP_THRESHOLD, BULK_MMAP_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _building -= 1
            lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            lib.malloc_trim(0)


def write_burst() -> None:
    """A write is about to be parsed and applied: its temporaries come from (and go back to) the heap, unless a
    seal or build is running. Cheap when already in the mode (one time read); never blocks."""
    global _burst, _last_write
    _last_write = time.monotonic()
    if _burst or not _tuned:
        return
    lib = _glibc()
    # called on the event loop: never wait for the lock (its holder may be trimming the heap, milliseconds);
    # a write that finds it taken runs in the current mode and the next one tries again
    if not _lock.acquire(blocking=False):
        return
    try:
        if _burst or _building:
            return
        lib.mallopt(_M_TRIM_THRESHOLD, BURST_TRIM_THRESHOLD)
        lib.mallopt(_M_MMAP_THRESHOLD, BURST_MMAP_THRESHOLD)
        _burst = True
    finally:
        _lock.release()


def write_burst_idle(now: float | None = None) -> bool:
    """Whether a write burst is on and no write came for ``BURST_IDLE_SECONDS`` (the maintenance loop then ends
    it with ``end_write_burst``)."""
    return _burst and (time.monotonic() if now is None else now) - _last_write >= BURST_IDLE_SECONDS


def end_write_burst() -> None:
    """Back to the steady mode; the heap kept during the burst is trimmed."""
    if not _burst:
        return
    with _lock:
        _end_burst(_glibc())


def _end_burst(lib: Any) -> None:
    global _burst
    if _burst and lib:
        lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        lib.mallopt(_M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        lib.malloc_trim(0)
    _burst = False


@contextlib.contextmanager
def steady() -> Iterator[None]:
    """Around a seal or an index build: the steady mode while it runs (a write burst ends; writes meanwhile do
    not start one)."""
    global _building
    with _lock:
        _building += 1
        if _burst:
            _end_burst(_glibc())
    try:
        yield
    finally:
        with _lock:
            _building -= 1


def trim_memory() -> None:
    """Give freed heap pages back to the OS (after index builds and bursts of writes)."""
    lib = _glibc()
    if lib:
        lib.malloc_trim(0)


_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_PAGE = 4096


def populate(buf: Any) -> bool:
    """Fault in the pages under ``buf`` (a C-contiguous numpy array, typically rows of a reserved buffer not
    written yet) without changing its contents: madvise(MADV_POPULATE_WRITE). Faulting in fresh memory is the
    kernel zeroing it (2 MiB at a time for numpy's huge-page buffers); done here, on a thread that would
    otherwise wait, a later copy into ``buf`` does not stop for it. Only whole pages inside ``buf`` are touched.
    False where it is not supported (older kernels, no glibc); nothing else changes then."""
    lib = _glibc()
    if not lib or not buf.nbytes:
        return False
    addr = buf.ctypes.data
    lo = -(-addr // _PAGE) * _PAGE
    hi = (addr + buf.nbytes) // _PAGE * _PAGE
    if hi <= lo:
        return False
    return bool(lib.madvise(lo, hi - lo, _MADV_POPULATE_WRITE) == 0)  # the GIL is released meanwhile


def state() -> dict[str, Any]:
    """For tests and stats: the current mode."""
    return {"tuned": _tuned, "burst": _burst, "building": _building}

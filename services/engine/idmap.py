"""Record ids in little memory: ``PackedIds`` (a sealed segment's ids) and ``IdMap`` (id -> live location).

A dict of 100,000 string ids to row numbers costs ~15 MiB in CPython (the dict, one str and one int object per
id): about 10 % of what a 100k x 384 HNSW collection needs in all. Here a sealed segment keeps its ids as one
UTF-8 blob plus offsets, and the map from id to location has two tiers:

- ``recent``: a dict for the rows of the growing segment: what writes touch;
- ``frozen``: for sealed and built segments, two sorted numpy arrays: the ids' hashes and their locations. A
  lookup hashes the id, binary-searches the hashes and accepts a candidate only if the row is live and its stored
  id is the one asked for (so hash collisions and rows deleted or replaced since are both harmless).

Deleting or replacing a record marks its row dead in its segment (as before); that alone hides a frozen entry,
so deletes never add to the map. A seal moves the sealed segment's entries from ``recent`` to the arrays and
packs its ids (``freeze``): its 100k str objects die then, before the index build allocates objects that outlive
it and would otherwise pin the allocator's arenas they share (~15 MiB per 100k rows). A build swapping segments
in replaces the old segments' entries by the new segment's (``swap``).

Hashes are Python's ``hash(str)``: salted per process, which is fine for a structure rebuilt on every start.
Callers hold the collection's ``state_lock`` for every method.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np

if TYPE_CHECKING:
    from .segment import Segment

SEG_SHIFT = 32
ROW_MASK = (1 << SEG_SHIFT) - 1
LIVE = np.iinfo(np.int64).max


class PackedIds(Sequence[str]):
    """An immutable list of ids as one UTF-8 blob and int64 end offsets: ~10 bytes per id instead of ~70. The
    offsets are an ``array('q')``, whose items index as Python ints several times faster than numpy's (search
    results read ids one by one)."""

    __slots__ = ("_blob", "_offs")

    def __init__(self, blob: bytes, offs: array[int]) -> None:
        self._blob = blob
        self._offs = offs  # n + 1 offsets: id i is blob[offs[i]:offs[i + 1]]

    @classmethod
    def from_list(cls, ids: Iterable[str]) -> PackedIds:
        enc = [s.encode() for s in ids]
        offs = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, enc), dtype=np.int64, count=len(enc)), out=offs[1:])
        packed = array("q")
        packed.frombytes(offs.tobytes())
        return cls(b"".join(enc), packed)

    def __len__(self) -> int:
        return len(self._offs) - 1

    def packed(self) -> tuple[bytes, array[int]]:
        """The blob and its n + 1 end offsets, for the fast lane's C code."""
        return self._blob, self._offs

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if type(i) is int and i >= 0:  # the hot path (search results)
            o = self._offs
            return self._blob[o[i] : o[i + 1]].decode()
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError("id index out of range")
        return self[j]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tolist())

    def tolist(self) -> list[str]:
        blob, out, start = self._blob, [], 0
        for end in self._offs.tolist()[1:]:
            out.append(blob[start:end].decode())
            start = end
        return out

    @property
    def nbytes(self) -> int:
        return len(self._blob) + self._offs.itemsize * len(self._offs)


def _hashes(ids: Iterable[str], count: int) -> np.ndarray:
    return np.fromiter(map(hash, ids), dtype=np.int64, count=count)


class IdMap:
    """id -> ``seg_no << SEG_SHIFT | row`` of its live row, for one collection (see the module docstring)."""

    def __init__(self, by_no: dict[int, Segment]) -> None:
        self._by_no = by_no  # the collection's own dict (segments come and go in it)
        self.recent: dict[str, int] = {}
        self._hashes = np.empty(0, dtype=np.int64)
        self._locs = np.empty(0, dtype=np.int64)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return int(self._hashes.nbytes + self._locs.nbytes) + 100 * len(self.recent)

    # --- lookups ------------------------------------------------------------------------------------------
    def _frozen(self, rid: str, h: int, pos: int) -> int | None:
        hashes, locs, by_no = self._hashes, self._locs, self._by_no
        n = len(hashes)
        while pos < n and hashes[pos] == h:
            loc = int(locs[pos])
            seg = by_no.get(loc >> SEG_SHIFT)
            if seg is not None:
                row = loc & ROW_MASK
                if seg.del_ver.arr[row] == LIVE and seg.ids[row] == rid:
                    return loc
            pos += 1
        return None

    def get(self, rid: str) -> int | None:
        loc = self.recent.get(rid)
        if loc is not None or not len(self._hashes):
            return loc
        h = hash(rid)
        return self._frozen(rid, h, int(np.searchsorted(self._hashes, h)))

    def get_many(self, ids: Sequence[str]) -> list[int | None]:
        """``get`` for a batch, with one vectorized search of the frozen tier."""
        recent = self.recent
        out = [recent.get(rid) for rid in ids]
        if not len(self._hashes):
            return out
        miss = [i for i, loc in enumerate(out) if loc is None]
        if not miss:
            return out
        hs = _hashes((ids[i] for i in miss), len(miss))
        pos = np.searchsorted(self._hashes, hs)
        hit = self._hashes[np.minimum(pos, len(self._hashes) - 1)] == hs
        for j in np.flatnonzero(hit).tolist():
            i = miss[j]
            out[i] = self._frozen(ids[i], int(hs[j]), int(pos[j]))
        return out

    # --- writes -------------------------------------------------------------------------------------------
    def put(self, rid: str, loc: int, old: int | None) -> None:
        """``rid`` now lives at ``loc`` (a row of the growing segment); ``old`` is what ``get`` gave."""
        self.recent[rid] = loc
        if old is None:
            self._count += 1

    def remove(self, rid: str) -> None:
        """``rid`` (present, its row already marked dead) is gone."""
        self.recent.pop(rid, None)
        self._count -= 1

    # --- segments -----------------------------------------------------------------------------------------
    def load(self, segments: list[Segment]) -> None:
        """At open: every live row of these built segments (the map is empty)."""
        hs, ls = [], []
        for seg in segments:
            live = np.flatnonzero(seg.del_ver.view(seg.n) == LIVE)
            h, loc = self._entries(seg, live)
            hs.append(h)
            ls.append(loc)
            self._count += len(live)
        self._set_frozen(hs, ls)

    def swap(self, old_seg_nos: set[int], new: Segment | None) -> None:
        """A build replaced the segments ``old_seg_nos`` by ``new`` (its live rows; None if nothing was live)."""
        if self.recent:  # a new dict: deleting keys never shrinks one (100k entries keep ~5 MiB of table)
            self.recent = {rid: loc for rid, loc in self.recent.items() if (loc >> SEG_SHIFT) not in old_seg_nos}
        keep = ~np.isin(self._locs >> SEG_SHIFT, np.fromiter(old_seg_nos, dtype=np.int64, count=len(old_seg_nos)))
        hs, ls = [self._hashes[keep]], [self._locs[keep]]
        if new is not None and new.n:
            h, loc = self._entries(new, np.flatnonzero(new.del_ver.view(new.n) == LIVE))
            hs.append(h)
            ls.append(loc)
        self._set_frozen(hs, ls)

    def freeze(self, seg: Segment, lock: Any) -> None:
        """``seg`` was just sealed (no more rows): pack its ids and move its live rows from the dict tier to the
        array tier. The caller holds the collection's write lock (nothing changes meanwhile); ``lock`` (its
        state lock) is taken only to publish the result."""
        ids = seg.ids
        if isinstance(ids, PackedIds) or not seg.n:
            return
        seg_no = seg.seg_no
        recent = {rid: loc for rid, loc in self.recent.items() if (loc >> SEG_SHIFT) != seg_no}
        h, loc = self._entries(seg, np.flatnonzero(seg.del_ver.view(seg.n) == LIVE))
        hashes = np.concatenate([self._hashes, h])
        locs = np.concatenate([self._locs, loc])
        order = np.argsort(hashes, kind="stable")
        packed = PackedIds.from_list(ids[: seg.n])
        with lock:
            seg.ids = packed
            self.recent = recent
            self._hashes, self._locs = hashes[order], locs[order]

    @staticmethod
    def _entries(seg: Segment, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = seg.ids
        if len(rows) == seg.n:
            h = _hashes(ids.tolist() if isinstance(ids, PackedIds) else ids[: seg.n], seg.n)
        else:
            h = _hashes((ids[r] for r in rows.tolist()), len(rows))
        return h, (np.int64(seg.seg_no) << SEG_SHIFT) | rows.astype(np.int64)

    def _set_frozen(self, hs: list[np.ndarray], ls: list[np.ndarray]) -> None:
        h = np.concatenate(hs) if hs else np.empty(0, dtype=np.int64)
        loc = np.concatenate(ls) if ls else np.empty(0, dtype=np.int64)
        order = np.argsort(h, kind="stable")
        self._hashes = h[order]
        self._locs = loc[order]

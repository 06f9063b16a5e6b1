"""A collection's maintenance: seal the growing segment, plan and build (merge, compact) indexed segments, swap
them in. ``Maintaining`` is a mixin of ``collection.Collection`` (the state it works on is declared below); a build
computes outside the locks and publishes under ``write_lock``/``state_lock`` (collection.py's docstring).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from . import malloc
from .idmap import IdMap, PackedIds
from .schema import CollectionConfig
from .segment import LIVE, Grow, Segment, build_index, concat_columns, segment_parts
from .text import TextIndex
from .wal import WalWriter

if TYPE_CHECKING:
    from pathlib import Path

    from .collection import Settings
    from .crypto import DataCipher


class Maintaining:
    """Seal, build and compact for ``Collection`` (see the module docstring)."""

    cfg: CollectionConfig
    settings: Settings
    cipher: DataCipher
    root: Path
    write_lock: threading.RLock
    state_lock: threading.Lock
    build_lock: threading.Lock
    segments: list[Segment]
    by_no: dict[int, Segment]
    id_map: IdMap
    growing: Segment
    version: int
    next_seg_no: int
    wal: WalWriter | None
    wal_files: list[str]
    wal_ends: dict[str, int]
    building: bool
    dropped: bool
    last_write: float

    if TYPE_CHECKING:

        def aad(self, name: str) -> bytes: ...

        def _new_growing(self) -> Segment: ...

        def _new_wal(self) -> None: ...

        def _write_manifest(self) -> None: ...

        def _delete_files(self, names: list[str]) -> None: ...

    def status(self) -> str:
        if any(s.index is None and s.n > 0 for s in self.segments if s is not self.growing) or self.building:
            return "indexing"
        if self.growing.n > 0:
            return "growing"
        return "ready"

    def needs_seal(self, now: float) -> bool:
        g = self.growing
        if g.n == 0:
            return False
        return g.n >= self.settings.seal_rows or now - self.last_write >= self.settings.idle_seal_seconds

    def seal(self) -> bool:
        """Freeze the growing segment (searched exactly until its index is built); start a new WAL."""
        with malloc.steady(), self.write_lock:
            if self.dropped or self.growing.n == 0:
                return False
            old = self.growing
            # its ids leave the dict tier first: their str objects die before anything that outlives this seal
            # (the next growing segment, the index build's objects) is allocated; allocated among them, those
            # would keep the allocator's arenas from being freed (~10 MiB per 100k rows)
            self.id_map.freeze(old, self.state_lock)
            new = self._new_growing()
            if self.wal is not None:  # replicas reading this file need to know where it ended
                self.wal_ends[self.wal.path.name] = self.wal.records
                if len(self.wal_ends) > 256:
                    del self.wal_ends[next(iter(self.wal_ends))]
            self.wal_files = []
            self._new_wal()
            # the frozen segment still depends on its WALs; the new growing one on the new WAL only
            self.wal_files = [*self._unpersisted_wals(), *self.wal_files]
            new.wal_files = [self.wal_files[-1]]
            with self.state_lock:
                old.growing = False
                self.growing = new
                self.segments = [*self.segments, new]
            self._write_manifest()
            return True

    def _unpersisted_wals(self) -> list[str]:
        out: list[str] = []
        for s in self.segments:
            for w in s.wal_files:
                if w not in out:
                    out.append(w)
        return out

    def build_plan(self) -> list[Segment]:
        """Sealed segments to (re)build into one: all unindexed ones, plus small or holey indexed ones."""
        with self.state_lock:
            sealed = [s for s in self.segments if s is not self.growing]
        frozen = [s for s in sealed if s.file is None]
        persisted = [s for s in sealed if s.file is not None]
        st = self.settings
        holey = [s for s in persisted if s.n and s.n_dead / s.n >= st.compact_dead_fraction]
        small = [s for s in persisted if s not in holey and (s.n - s.n_dead) < st.seal_rows // 2]
        plan = frozen + holey
        if plan and small:
            plan += small
        elif len(small) >= 2:
            plan += small
        if len(persisted) - len([s for s in plan if s.file]) + (1 if plan else 0) > st.max_segments:
            rest = sorted((s for s in persisted if s not in plan), key=lambda s: s.n - s.n_dead)
            plan += rest[: len(rest) - st.max_segments + 2]
        return sorted(plan, key=lambda s: s.seg_no)

    def maintain(self) -> bool:
        """Build (merge, compact) whatever ``build_plan`` asks for; True if something was built."""
        with self.build_lock:
            plan = self.build_plan()
            if not plan or self.dropped:
                return False
            with malloc.steady():  # its buffers are long-lived or huge: mapped, not in the heap
                self.build(plan)
            return True

    def build(self, plan: list[Segment]) -> Segment | None:
        """Merge ``plan`` (live rows only) into one indexed, persisted segment and swap it in."""
        if not plan:
            return None
        self.building = True
        try:
            with self.state_lock:
                v0 = self.version
                snap = [(s, s.n) for s in plan]
            live_rows = [np.flatnonzero(s.del_ver.view(n) > v0) for s, n in snap]
            total = sum(len(r) for r in live_rows)
            with self.write_lock:
                seg_no = self.next_seg_no
                self.next_seg_no += 1
            new = Segment(seg_no, self.cfg)
            new.growing = False
            if total:
                if len(snap) == 1 and len(live_rows[0]) == snap[0][1]:
                    vectors = snap[0][0].vectors(snap[0][1])  # one whole segment: no copy before faiss copies it
                else:
                    vectors = np.concatenate([s.vectors(n)[r] for (s, n), r in zip(snap, live_rows, strict=True)])
                new.vec = None
                new.ids = PackedIds.from_list(
                    s.ids[i] for (s, _), r in zip(snap, live_rows, strict=True) for i in r.tolist()
                )
                new.norms = Grow.wrap(
                    np.concatenate([s.norms.view(n)[r] for (s, n), r in zip(snap, live_rows, strict=True)])
                )
                for name in new.columns:
                    parts = [s.columns[name].take(r) for (s, _), r in zip(snap, live_rows, strict=True)]
                    new.columns[name] = concat_columns(parts)
                if self.cfg.text_field:
                    tparts = []
                    texts: list[str | None] = []
                    for (s, n), r in zip(snap, live_rows, strict=True):
                        assert s.text_index is not None and s.texts is not None
                        tparts.append(s.text_index.take(r, n))
                        texts.extend(s.texts[i] for i in r.tolist())
                    new.text_index = TextIndex.concat(tparts)
                    new.texts = texts
                index, kind, keep = build_index(self.cfg, vectors, self.settings.build_threads)
                new.n = total
                new.del_ver = Grow.wrap(np.full(total, LIVE, dtype=np.int64))
                if keep:
                    owned = vectors if vectors.base is None else vectors.copy()
                    new.vec = Grow.wrap(owned, self.cfg.dimension)
                new.attach_index(index, kind, keep)
                del vectors
            else:
                new.n = 0
                new.vec = Grow(np.float32, self.cfg.dimension)
                new.del_ver = Grow(np.int64)
                new.index_kind = "flat"
            name = f"seg-{seg_no:08d}.enc"
            if total:
                self.cipher.write_file(self.root / name, segment_parts(new), self.aad(name))
                new.file = name
            return self._swap(plan, snap, live_rows, new, v0)
        finally:
            self.building = False

    def _swap(
        self,
        plan: list[Segment],
        snap: list[tuple[Segment, int]],
        live_rows: list[np.ndarray],
        new: Segment,
        v0: int,
    ) -> Segment | None:
        with self.write_lock:
            if self.dropped:
                return None
            with self.state_lock:
                # carry over deletes that happened while building
                offset = 0
                for (s, n), rows in zip(snap, live_rows, strict=True):
                    dv = s.del_ver.view(n)[rows]
                    later = np.flatnonzero(dv != LIVE)
                    for j in later.tolist():
                        new.mark_dead(offset + j, int(dv[j]))
                    offset += len(rows)
                if new.n:
                    self.by_no[new.seg_no] = new
                self.id_map.swap({s.seg_no for s in plan}, new if new.n else None)
                keep = [s for s in self.segments if s not in plan]
                self.segments = ([new] if new.n else []) + keep
                for s in plan:
                    self.by_no.pop(s.seg_no, None)
            old_files = [s.file for s in plan if s.file]
            still_needed = self._unpersisted_wals()
            dropped_wals = [w for w in self.wal_files if w not in still_needed]
            self.wal_files = [w for w in self.wal_files if w in still_needed]
            self._write_manifest()
            self._delete_files([f for f in old_files if f] + dropped_wals)
            return new

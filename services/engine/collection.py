"""A collection: its segments, id map, WAL, manifest, and the write paths (the read paths are the
``search.Searching`` mixin, seal/build/compact the ``maintenance.Maintaining`` one).

Locks: ``write_lock`` serializes everything that changes the collection (writes, seals, index swaps,
manifest updates); ``state_lock`` is held only for the short moments where in-memory state is published or a
reader captures a consistent view (segment list, published row counts, version). Searches never hold a lock
while they compute.

On disk (``collections/<cid>/``, everything AES-256-GCM): ``MANIFEST.enc`` (persisted segments with their
deleted rows, the WAL files still needed), ``seg-N.enc`` (sealed segment + its index), ``wal-N.log``.
Recovery: load the manifest's segments, then replay its WALs, in order, into a growing segment.
"""

from __future__ import annotations

import base64
import heapq
import logging
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from services.core.errors import BadRequest, NotFound

from . import malloc
from .crypto import CorruptionError, DataCipher
from .filters import Filter, compile_filter
from .idmap import ROW_MASK, SEG_SHIFT, IdMap, PackedIds
from .maintenance import Maintaining
from .schema import (
    MAX_QUERY_LIMIT,
    Batch,
    CollectionConfig,
    expect_object,
    loads,
    parse_ids,
    vector_norms,
)
from .search import Searching, View
from .segment import LIVE, Segment, load_segment
from .wal import WalWriter, read_wal

log = logging.getLogger("vecta.engine")

OP_UPSERT = 1
OP_DELETE = 2
GROW_RESERVE_BYTES = 256 << 20  # at most this much address space reserved for a growing segment's vectors
INLINE_EXACT_FLOATS = 2_000_000  # exact scans up to this many floats may run inline (about 1 ms)


@dataclass
class Settings:
    seal_rows: int = 100_000
    idle_seal_seconds: float = 1.0
    build_threads: int = 2
    max_segments: int = 8
    compact_dead_fraction: float = 0.2


OVERLAP_ROWS = 256  # upserts of at least this many rows stage them while the WAL fsyncs (upsert_many)
_wal_executor: ThreadPoolExecutor | None = None
_wal_executor_lock = threading.Lock()


def _wal_pool() -> ThreadPoolExecutor:
    """Threads that write and fsync WAL records while the writer stages the rows (one per busy collection)."""
    global _wal_executor
    with _wal_executor_lock:
        if _wal_executor is None:
            _wal_executor = ThreadPoolExecutor(4, thread_name_prefix="vecta-wal")
        return _wal_executor


def _normalize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors and their lengths, computed in float64 (``vector_norms``); the lengths fit float32 (checked
    when the batch was parsed)."""
    norms = vector_norms(vectors)
    return (vectors / norms[:, None]).astype(np.float32), norms.astype(np.float32)


class Collection(Searching, Maintaining):
    def __init__(self, cfg: CollectionConfig, root: Path, data_dir: Path, cipher: DataCipher, settings: Settings):
        self.cfg = cfg
        self.root = root
        self.rel = root.relative_to(data_dir).as_posix()
        self.cipher = cipher
        self.settings = settings
        self.write_lock = threading.RLock()
        self.state_lock = threading.Lock()
        self.segments: list[Segment] = []  # persisted and frozen segments, then the growing one last
        self.by_no: dict[int, Segment] = {}
        self.id_map = IdMap(self.by_no)  # id -> seg_no << SEG_SHIFT | row of its live row
        self.version = 0
        self.next_seg_no = 1
        self.next_wal_no = 1
        self.wal_files: list[str] = []
        self.wal: WalWriter | None = None
        self.growing: Segment
        self.last_write = time.monotonic()
        self.read_units = 0  # billing's meter: searches on several threads add to it (``_add_read_units``)
        self.write_units = 0  # under the write lock
        self._units_lock = threading.Lock()
        self.building = False
        self.build_lock = threading.Lock()  # one build per collection at a time
        self.dropped = False
        self.pins = 0
        self.pending_deletes: list[str] = []
        self.torn_tail_dropped = 0
        self.wal_ends: dict[str, int] = {}  # closed WAL file -> its record count (replication: where it ended)

    # ------------------------------------------------------------------------------------------------------
    # files
    # ------------------------------------------------------------------------------------------------------
    def aad(self, name: str) -> bytes:
        return f"vecta|{self.rel}/{name}".encode()

    def _write_manifest(self) -> None:
        segs = []
        for s in self.segments:
            if s.file is None:
                continue
            dead = np.flatnonzero(s.del_ver.view(s.n) != LIVE).astype(np.int32)
            segs.append({"no": s.seg_no, "file": s.file, "n": s.n, "dead": base64.b64encode(dead.tobytes()).decode()})
        doc = {
            "version": 1,
            "segments": segs,
            "wals": self.wal_files,
            "next_seg_no": self.next_seg_no,
            "next_wal_no": self.next_wal_no,
        }
        self.manifest_doc = doc
        self.cipher.write_file(self.root / "MANIFEST.enc", [orjson.dumps(doc)], self.aad("MANIFEST.enc"))

    def _delete_files(self, names: list[str]) -> None:
        if self.pins > 0:
            self.pending_deletes.extend(names)
            return
        for name in names:
            (self.root / name).unlink(missing_ok=True)

    def unpin(self) -> None:
        with self.write_lock:
            self.pins -= 1
            if self.pins == 0 and self.pending_deletes:
                names, self.pending_deletes = self.pending_deletes, []
                self._delete_files(names)

    def _new_wal(self) -> None:
        name = f"wal-{self.next_wal_no:08d}.log"
        self.next_wal_no += 1
        if self.wal is not None:
            self.wal.close()
        self.wal = WalWriter(self.root / name, self.cipher, self.aad(name), valid_length=0, records=0)
        self.wal_files.append(name)

    def _new_growing(self) -> Segment:
        seg = Segment(self.next_seg_no, self.cfg)
        self.next_seg_no += 1
        # reserve the vector buffer up to the seal size (address space only: pages are touched as rows come),
        # so appends never copy the whole buffer to grow it
        assert seg.vec is not None
        seg.vec.reserve(max(0, min(self.settings.seal_rows, GROW_RESERVE_BYTES // (4 * self.cfg.dimension))))
        self.by_no[seg.seg_no] = seg
        return seg

    # ------------------------------------------------------------------------------------------------------
    # create / open
    # ------------------------------------------------------------------------------------------------------
    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=False)
        self.growing = self._new_growing()
        self.segments = [self.growing]
        self._new_wal()
        self.growing.wal_files = list(self.wal_files)
        self._write_manifest()

    def open(self) -> None:
        path = self.root / "MANIFEST.enc"
        doc = orjson.loads(self.cipher.read_file(path, self.aad("MANIFEST.enc")).tobytes())
        self.manifest_doc = doc
        self.next_seg_no = int(doc["next_seg_no"])
        self.next_wal_no = int(doc["next_wal_no"])
        segments: list[Segment] = []
        for s in doc["segments"]:
            buf = self.cipher.read_file(self.root / s["file"], self.aad(s["file"]))
            seg = load_segment(self.cfg, buf)
            del buf
            if seg.seg_no != s["no"] or seg.n != s["n"]:
                raise CorruptionError(f"{s['file']} does not match the manifest")
            seg.file = s["file"]
            dead = np.frombuffer(base64.b64decode(s["dead"]), dtype=np.int32)
            if len(dead):
                seg.del_ver.arr[dead] = 0
                seg.n_dead = len(dead)
            segments.append(seg)
            self.by_no[seg.seg_no] = seg
        self.id_map.load(segments)
        self.growing = self._new_growing()
        self.segments = [*segments, self.growing]
        # replay the WALs in order
        self.wal_files = list(doc["wals"])
        valid_len = 0
        records = 0
        for i, name in enumerate(self.wal_files):
            payloads, valid_len, torn = read_wal(self.root / name, self.cipher, self.aad(name))
            if torn:
                self.torn_tail_dropped += 1
                log.warning("collection %s: dropped a torn tail of %s", self.cfg.name, name)
            records = len(payloads)
            for p in payloads:
                self._replay(p)
            if i < len(self.wal_files) - 1 and torn:
                # only the last WAL can be appended to; cut the garbage now so later replays agree
                with open(self.root / name, "r+b") as fh:
                    fh.truncate(valid_len)
        if not self.wal_files:
            self._new_wal()
        else:
            last = self.wal_files[-1]
            self.wal = WalWriter(self.root / last, self.cipher, self.aad(last), valid_length=valid_len, records=records)
        self.growing.wal_files = list(self.wal_files)
        referenced = {"MANIFEST.enc", *self.wal_files, *(s.file for s in segments if s.file)}
        for f in self.root.iterdir():
            if f.name not in referenced:
                f.unlink(missing_ok=True)

    def close(self) -> None:
        with self.write_lock:
            if self.wal is not None:
                self.wal.close()
                self.wal = None

    # ------------------------------------------------------------------------------------------------------
    # WAL payloads
    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _encode_upsert(batch: Batch) -> list[bytes | memoryview]:
        head = orjson.dumps({"ids": batch.ids, "metas": batch.metas, "texts": batch.texts})
        vecs = np.ascontiguousarray(batch.vectors, dtype=np.float32)
        return [struct.pack("<BI", OP_UPSERT, len(head)), head, vecs.data.cast("B")]

    def _replay(self, payload: bytes) -> None:
        op = payload[0]
        if op == OP_UPSERT:
            (hlen,) = struct.unpack_from("<I", payload, 1)
            head = orjson.loads(payload[5 : 5 + hlen])
            vecs = np.frombuffer(payload, dtype=np.float32, offset=5 + hlen).reshape(-1, self.cfg.dimension)
            self._apply_upsert(Batch(head["ids"], vecs, head["metas"], head["texts"]))
        elif op == OP_DELETE:
            self._apply_delete(orjson.loads(payload[1:])["ids"])
        else:
            raise CorruptionError(f"unknown WAL op {op}")

    # ------------------------------------------------------------------------------------------------------
    # writes
    # ------------------------------------------------------------------------------------------------------
    def _apply_upsert(self, batch: Batch) -> None:
        self._publish(batch, self._stage(batch))

    def _stage(self, batch: Batch) -> int:
        """Write the batch's rows into the growing segment, invisible until ``_publish``; returns the first."""
        if self.cfg.metric == "cosine":
            vecs, norms = _normalize(batch.vectors)
        else:
            vecs, norms = batch.vectors, np.ones(len(batch.ids), dtype=np.float32)
        return self.growing.stage(batch.ids, vecs, norms, batch.metas)

    def _publish(self, batch: Batch, start: int) -> None:
        """Make a staged batch visible: its text postings, the id map (older rows of its ids die), the row count
        and the collection version, together under the state lock. Batches publish in the order they staged."""
        g = self.growing
        g.stage_text(start, batch.texts, len(batch.ids))
        with self.state_lock:
            v = self.version + 1
            id_map = self.id_map
            by_no = self.by_no
            loc = (g.seg_no << SEG_SHIFT) | start
            for rid, old in zip(batch.ids, id_map.get_many(batch.ids), strict=True):  # ids are unique in a batch
                if old is not None:
                    by_no[old >> SEG_SHIFT].mark_dead(old & ROW_MASK, v)
                id_map.put(rid, loc, old)
                loc += 1
            g.publish(len(batch.ids))
            self.version = v

    def _apply_delete(self, ids: list[str]) -> int:
        with self.state_lock:
            v = self.version + 1
            count = 0
            for rid, old in zip(ids, self.id_map.get_many(ids), strict=True):  # ids are unique
                if old is not None:
                    self.by_no[old >> SEG_SHIFT].mark_dead(old & ROW_MASK, v)
                    self.id_map.remove(rid)
                    count += 1
            self.version = v
        return count

    def upsert(self, batch: Batch) -> int:
        return self.upsert_many([batch])[0]

    def upsert_many(self, batches: list[Batch]) -> list[int]:
        """Write several batches with one WAL fsync (group commit); each is its own WAL record, so each is
        applied all or nothing, and none is visible before all are durable."""
        payloads = [self._encode_upsert(b) for b in batches]
        with self.write_lock:
            self._check_open()
            wal = self.wal
            assert wal is not None
            rows = sum(len(b.ids) for b in batches)
            if rows < OVERLAP_ROWS:
                wal.append_many(payloads)  # durable before anything becomes visible or is acknowledged
                starts = [self._stage(b) for b in batches]
            else:
                # large batches: stage their rows (invisible) while the WAL is written and fsynced in another
                # thread (encryption, writev and fdatasync run outside the GIL); published only once durable
                starts = self._stage_during(lambda: wal.append_many(payloads), batches, rows)
            for batch, start in zip(batches, starts, strict=True):
                self._publish(batch, start)
                self.write_units += len(batch.ids)
            self.last_write = time.monotonic()
        return [len(b.ids) for b in batches]

    def _stage_during(self, write: Callable[[], None], batches: list[Batch], rows: int) -> list[int]:
        """Stage ``batches`` (``rows`` rows in all) while ``write`` (the WAL append) runs in the WAL pool. On
        either error nothing stays staged and the error is raised (the WAL's own first); a staging error after
        a durable write is what the sequential path raises too."""
        pool = _wal_pool()
        job = pool.submit(write)
        vec = self.growing.vec
        ahead = vec.ahead(rows, rows) if vec is not None else None
        if ahead is not None:
            # the rows the next batch of this size will fill: faulting in fresh buffer pages costs the kernel
            # ~2-3 ms a batch of 1,000 x 384 here; done meanwhile on another thread, not waited for
            pool.submit(malloc.populate, ahead)
        try:
            return [self._stage(b) for b in batches]
        except BaseException:
            self.growing.unstage()
            raise
        finally:
            try:
                job.result()  # never leave the write lock while the WAL write runs
            except BaseException:
                self.growing.unstage()
                raise

    def delete(self, body: dict[str, Any]) -> int:
        expect_object(body, {"ids", "filter"})
        if ("ids" in body) == ("filter" in body):
            raise BadRequest("body needs exactly one of 'ids' or 'filter'", code="validation_error")
        flt = compile_filter(body["filter"], self.cfg) if "filter" in body else None
        ids = parse_ids(body) if flt is None else None
        with self.write_lock:
            self._check_open()
            if flt is not None:
                view = self.view()
                ids = [rid for seg, rows in self._matching(view, flt) for rid in (seg.ids[r] for r in rows.tolist())]
            assert ids is not None
            uniq = list(dict.fromkeys(ids))
            with self.state_lock:
                present = [rid for rid, loc in zip(uniq, self.id_map.get_many(uniq), strict=True) if loc is not None]
            if not present:
                return 0
            assert self.wal is not None
            self.wal.append(bytes([OP_DELETE]) + orjson.dumps({"ids": present}))
            count = self._apply_delete(present)
            self.write_units += count
            self.last_write = time.monotonic()
        return count

    def _add_read_units(self, n: int) -> None:
        with self._units_lock:  # `+=` on an attribute is not atomic: concurrent searches would lose counts
            self.read_units += n

    def _check_open(self) -> None:
        if self.dropped or self.wal is None:
            raise NotFound(f"collection {self.cfg.name!r} not found", code="collection_not_found")

    # ------------------------------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------------------------------
    def view(self) -> View:
        with self.state_lock:
            return View(self.version, [(s, s.n, s.n_dead) for s in self.segments])

    def _matching(self, view: View, flt: Filter | None) -> list[tuple[Segment, np.ndarray]]:
        out = []
        for seg, n, dead in view.parts:
            if n == 0:
                continue
            mask = self._mask(view, seg, n, dead, flt)
            out.append((seg, np.arange(n) if mask is None else np.flatnonzero(mask)))
        return out

    def cheap_search(self) -> bool:
        """Whether one unfiltered query is cheap enough to run on the event loop: every segment with rows is
        indexed, or small enough to scan exactly in well under a millisecond or two."""
        for s in self.segments:
            if s.n and s.index is None and s.n * self.cfg.dimension > INLINE_EXACT_FLOATS:
                return False
        return True

    def live_count(self) -> int:
        return len(self.id_map)

    def count(self, body: dict[str, Any]) -> int:
        expect_object(body, {"filter"})
        if body.get("filter") is None:
            return len(self.id_map)
        flt = compile_filter(body["filter"], self.cfg)
        return sum(len(rows) for _, rows in self._matching(self.view(), flt))

    def _record(self, seg: Segment, row: int, include_vectors: bool, include_metadata: bool = True) -> dict:
        rec: dict[str, Any] = {"id": seg.ids[row]}
        if include_metadata:
            rec["metadata"] = seg.metadata(row)
            if seg.texts is not None:
                rec["text"] = seg.texts[row]
        if include_vectors:
            rec["vector"] = seg.vector(row)
        return rec

    def fetch(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        expect_object(body, {"ids", "include_vectors", "include_metadata"})
        ids = parse_ids(body)
        inc_v = body.get("include_vectors", True)
        inc_m = body.get("include_metadata", True)
        if not isinstance(inc_v, bool) or not isinstance(inc_m, bool):
            raise BadRequest("include_vectors/include_metadata must be booleans", code="validation_error")
        with self.state_lock:
            uniq = list(dict.fromkeys(ids))
            keys = list(zip(uniq, self.id_map.get_many(uniq), strict=True))
            segs = {k >> SEG_SHIFT: self.by_no[k >> SEG_SHIFT] for _, k in keys if k is not None}
        out = []
        for _rid, key in keys:
            if key is None:
                continue
            out.append(self._record(segs[key >> SEG_SHIFT], key & ROW_MASK, inc_v, inc_m))
        self._add_read_units(max(1, (len(out) + 99) // 100))
        return out

    def query(self, body: dict[str, Any]) -> dict[str, Any]:
        expect_object(body, {"filter", "limit", "cursor", "include_vectors", "include_metadata"})
        limit = body.get("limit", 100)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_QUERY_LIMIT:
            raise BadRequest(f"body.limit must be an integer between 1 and {MAX_QUERY_LIMIT}", code="validation_error")
        cursor = body.get("cursor")
        after = ""
        if cursor is not None:
            try:
                after = base64.urlsafe_b64decode(cursor.encode()).decode()
            except Exception as exc:
                raise BadRequest("body.cursor is not a cursor returned by this API", code="invalid_cursor") from exc
        inc_v = body.get("include_vectors", False)
        if not isinstance(inc_v, bool):
            raise BadRequest("body.include_vectors must be a boolean", code="validation_error")
        flt = compile_filter(body["filter"], self.cfg) if body.get("filter") is not None else None
        found: list[tuple[str, Segment, int]] = []
        for seg, rows in self._matching(self.view(), flt):
            ids = seg.ids.tolist() if isinstance(seg.ids, PackedIds) else seg.ids
            found.extend((ids[r], seg, r) for r in rows.tolist() if ids[r] > after)
        page = heapq.nsmallest(limit + 1, found, key=lambda t: t[0])
        more = len(page) > limit
        page = page[:limit]
        records = [self._record(seg, r, inc_v) for _, seg, r in page]
        nxt = base64.urlsafe_b64encode(page[-1][0].encode()).decode() if more and page else None
        self._add_read_units(max(1, (len(records) + 99) // 100))
        return {"records": records, "next_cursor": nxt}

    # ------------------------------------------------------------------------------------------------------
    # stats / snapshot
    # ------------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        disk = sum(p.stat().st_size for p in self.root.iterdir() if p.is_file()) if self.root.exists() else 0
        segs = list(self.segments)
        return {
            "name": self.cfg.name,
            "vector_count": len(self.id_map),
            "status": self.status(),
            "segments": [
                {
                    "no": s.seg_no,
                    "rows": s.n,
                    "deleted": s.n_dead,
                    "index": s.index_kind,
                    "growing": s.growing,
                    "persisted": s.file is not None,
                }
                for s in segs
            ],
            "bytes_on_disk": disk,
            "bytes_in_memory": sum(s.memory_bytes() for s in segs) + self.id_map.nbytes,
            "read_units": self.read_units,
            "write_units": self.write_units,
        }

    def capture(self) -> tuple[dict[str, Any], dict[str, int]]:
        """Under the write lock: the manifest and the file lengths that make a consistent snapshot."""
        files: dict[str, int] = {}
        for s in self.segments:
            if s.file:
                files[s.file] = (self.root / s.file).stat().st_size
        for w in self.wal_files:
            files[w] = (
                self.wal.size if self.wal is not None and self.wal.path.name == w else (self.root / w).stat().st_size
            )
        self.pins += 1
        return dict(self.manifest_doc), files

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "name": c.name,
            "dimension": c.dimension,
            "metric": c.metric,
            "index": {"type": c.index_type, "params": c.index_params},
            "fields": [{"name": f.name, "type": f.type, "indexed": f.indexed} for f in c.fields.values()],
            "text_field": c.text_field,
            "vector_count": len(self.id_map),
            "status": self.status(),
            "created_at": c.created_at,
        }


def parse_body(body: bytes) -> Any:
    return loads(body)


__all__ = ["Collection", "Settings", "View", "parse_body"]

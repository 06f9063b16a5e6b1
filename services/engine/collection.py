"""A collection: its segments, id map, WAL, manifest, and the write / search / maintenance paths.

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
import math
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

from services.core.errors import BadRequest, NotFound, PayloadTooLarge, Unprocessable

from . import malloc, schema
from .crypto import CorruptionError, DataCipher
from .idmap import ROW_MASK, SEG_SHIFT, IdMap, PackedIds
from .schema import (
    MAX_QUERIES,
    MAX_QUERY_LIMIT,
    MAX_TOP_K,
    Batch,
    CollectionConfig,
    Filter,
    check_finite,
    compile_filter,
    expect_object,
    fast_search,
    loads,
    parse_ids,
    to_matrix,
    unit_queries,
    vector_norms,
)
from .segment import LIVE, Grow, Segment, build_index, concat_columns, load_segment, segment_parts
from .text import TextIndex, tokenize
from .wal import WalWriter, read_wal

log = logging.getLogger("vecta.engine")

OP_UPSERT = 1
OP_DELETE = 2
GROW_RESERVE_BYTES = 256 << 20  # at most this much address space reserved for a growing segment's vectors
INLINE_EXACT_FLOATS = 2_000_000  # exact scans up to this many floats may run inline (about 1 ms)
READ_UNIT_VECTORS = 100_000  # one read unit per query per this many vectors searched


@dataclass
class View:
    version: int
    parts: list[tuple[Segment, int, int]]  # (segment, published rows, dead rows at capture)


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


class Collection:
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

    def _mask(self, view: View, seg: Segment, n: int, dead: int, flt: Filter | None) -> np.ndarray | None:
        mask = seg.live_mask(view.version, n) if dead else None
        if flt is not None:
            fm = flt.mask(seg, n)
            mask = fm if mask is None else (mask & fm)
        return mask

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
    # search
    # ------------------------------------------------------------------------------------------------------
    def parse_search_body(self, body: bytes, hybrid: bool = False) -> dict[str, Any]:
        """Parse and validate a raw search body: the simdjson fast path for the query vectors when it accepts
        the body, else orjson (which names any error); both give the same result."""
        fast = fast_search(body, self.cfg.dimension)
        if fast is None:
            return self.parse_search(loads(body), hybrid)
        return self.parse_search(fast[0], hybrid, pre=fast[1])

    def search_native(self, body: bytes) -> list[dict[str, Any]] | None:
        """The fast lane in C (``schema._fastlane``, decision 011): parse the plainest search body, search and
        build the results with no Python layer per hit; what ``schema.single_search`` + ``search_single`` give
        for the same body. None when the usual path must answer (a body the C parser declines, a zero vector
        under cosine)."""
        fl = schema._fastlane
        assert fl is not None
        d = self.cfg.dimension
        q = np.empty((1, d), dtype=np.float32)
        got = fl.parse_single(body, d, q, MAX_TOP_K)
        if got is None:
            return None
        top_k, ef, nprobe, inc_m, inc_v = got
        live = [part for part in self.view().parts if part[1]]
        ids = live[0][0].ids if len(live) == 1 else None
        if inc_m or inc_v or not isinstance(ids, PackedIds) or live[0][2]:  # several segments, deletes, growing
            return self.search_single(q, top_k, ef, nprobe, inc_m, inc_v)
        if self.cfg.metric == "cosine" and not fl.unit_rows(q, 1, d):
            return None
        seg, n, _ = live[0]
        ef = ef or self.cfg.index_params.get("ef")
        nprobe = nprobe or self.cfg.index_params.get("nprobe")
        dist, lab = seg.search(q, top_k, n, None, n, ef, nprobe)  # as vector_search's one-segment case
        self._add_read_units(max(1, -(-n // READ_UNIT_VECTORS)))
        blob, offs = ids.packed()
        return fl.hits(np.ascontiguousarray(dist[0]), np.ascontiguousarray(lab[0]), dist.shape[1], n, blob, offs)

    def search_single(
        self, q: np.ndarray, top_k: int, ef: int | None, nprobe: int | None, inc_m: bool, inc_v: bool
    ) -> list[dict[str, Any]] | None:
        """The fast lane's search: what ``parse_search`` + ``search`` give for a body ``schema.single_search``
        accepted (same normalization, defaults and results); None when the usual path must answer (a zero
        vector under cosine: its error)."""
        if self.cfg.metric == "cosine":
            unit = unit_queries(q)
            if unit is None:
                return None
            q = unit
        p = {
            "q": q,
            "multi": True,
            "text": None,
            "top_k": top_k,
            "filter": None,
            "ef": ef or self.cfg.index_params.get("ef"),
            "nprobe": nprobe or self.cfg.index_params.get("nprobe"),
            "include_metadata": inc_m,
            "include_vectors": inc_v,
            "fusion": None,
        }
        return self.search(p)[0]

    def parse_search(self, doc: Any, hybrid: bool = False, pre: np.ndarray | None = None) -> dict[str, Any]:
        """Validate a search body. ``pre``: the queries already parsed by ``schema.fast_search`` (the body's
        ``vector``/``vectors`` value is then a placeholder)."""
        allowed = {"vector", "text", "top_k", "filter", "include_metadata", "include_vectors", "params"}
        allowed |= {"fusion"} if hybrid else {"vectors"}
        doc = expect_object(doc, allowed)
        top_k = doc.get("top_k", 10)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise BadRequest(f"body.top_k must be an integer between 1 and {MAX_TOP_K}", code="validation_error")
        given = [k for k in ("vector", "vectors", "text") if doc.get(k) is not None]
        d = self.cfg.dimension
        q: np.ndarray | None = None
        multi = False
        text = doc.get("text")
        if hybrid:
            if doc.get("vector") is None or text is None:
                raise BadRequest("hybrid search needs both 'vector' and 'text'", code="validation_error")
        elif len(given) != 1:
            raise BadRequest("body needs exactly one of 'vector', 'vectors' or 'text'", code="validation_error")
        if pre is not None:
            q = pre
            check_finite(q, "vectors[{i}]" if doc.get("vectors") is not None else "vector")
            multi = doc.get("vectors") is not None
        elif doc.get("vector") is not None:
            q = to_matrix([doc["vector"]], d, "vector")
        elif doc.get("vectors") is not None:
            vs = doc["vectors"]
            if not isinstance(vs, list) or not vs:
                raise BadRequest("body.vectors must be a non-empty list of vectors", code="validation_error")
            if len(vs) > MAX_QUERIES:
                raise PayloadTooLarge(
                    f"body.vectors has {len(vs)} queries; at most {MAX_QUERIES}", code="batch_too_large"
                )
            q = to_matrix(vs, d, "vectors[{i}]")
            multi = True
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise BadRequest("body.text must be a non-empty string", code="validation_error")
            if not self.cfg.text_field:
                raise Unprocessable(
                    f"collection {self.cfg.name!r} has no text_field; text search is not available",
                    code="no_text_field",
                )
        if q is not None and self.cfg.metric == "cosine":
            unit = unit_queries(q)
            if unit is None:
                raise Unprocessable("a zero query vector has no cosine similarity", code="invalid_vector")
            q = unit
        params = doc.get("params") or {}
        params = expect_object(params, {"ef", "nprobe"}, "body.params")
        for key in ("ef", "nprobe"):
            v = params.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65_536):
                raise BadRequest(f"body.params.{key} must be a positive integer", code="validation_error")
        inc_m = doc.get("include_metadata", False)
        inc_v = doc.get("include_vectors", False)
        if not isinstance(inc_m, bool) or not isinstance(inc_v, bool):
            raise BadRequest("include_metadata/include_vectors must be booleans", code="validation_error")
        flt = compile_filter(doc["filter"], self.cfg) if doc.get("filter") is not None else None
        fusion: dict[str, Any] = {"method": "rrf", "weights": None}
        if hybrid and doc.get("fusion") is not None:
            fdoc = expect_object(doc["fusion"], {"method", "weights", "k"}, "body.fusion")
            method = fdoc.get("method", "rrf")
            if method not in ("rrf", "weighted"):
                raise BadRequest("body.fusion.method must be 'rrf' or 'weighted'", code="validation_error")
            weights = fdoc.get("weights")
            if weights is not None:
                weights = expect_object(weights, {"vector", "text"}, "body.fusion.weights")
                for k2, w in weights.items():
                    if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
                        raise BadRequest(
                            f"body.fusion.weights.{k2} must be a non-negative number", code="validation_error"
                        )
            fusion = {"method": method, "weights": weights}
        return {
            "q": q,
            "multi": multi,
            "text": text,
            "top_k": top_k,
            "filter": flt,
            "ef": params.get("ef") or self.cfg.index_params.get("ef"),
            "nprobe": params.get("nprobe") or self.cfg.index_params.get("nprobe"),
            "include_metadata": inc_m,
            "include_vectors": inc_v,
            "fusion": fusion,
        }

    def vector_search(
        self, q: np.ndarray, k: int, flt: Filter | None, ef: int | None, nprobe: int | None
    ) -> list[list[tuple[float, Segment, int]]]:
        view = self.view()
        nq = len(q)
        isfinite = math.isfinite
        live = [part for part in view.parts if part[1]]
        if flt is None and len(live) == 1 and not live[0][2]:
            # the common case: one segment with rows, nothing deleted, no filter (what the loop below would do,
            # without its merging)
            seg, n, _ = live[0]
            dist, lab = seg.search(q, k, n, None, n, ef, nprobe)
            self._add_read_units(nq * max(1, -(-n // READ_UNIT_VECTORS)))
            return [
                [(s, seg, r) for s, r in zip(drow, lrow, strict=True) if r >= 0 and isfinite(s)]
                for drow, lrow in zip(dist.tolist(), lab.tolist(), strict=True)
            ]
        dists: list[np.ndarray] = []
        labs: list[np.ndarray] = []
        segs: list[Segment] = []
        scanned = 0
        for seg, n, dead in view.parts:
            if n == 0:
                continue
            mask = self._mask(view, seg, n, dead, flt)
            allowed = n if mask is None else int(np.count_nonzero(mask))
            if allowed == 0:
                continue
            scanned += n
            dist, lab = seg.search(q, k, n, mask, allowed, ef, nprobe)
            if dist.shape[1] == 0:
                continue
            dists.append(dist)
            labs.append(lab | (len(segs) << SEG_SHIFT) if segs else lab)  # -1 stays -1 for the first part
            segs.append(seg)
        self._add_read_units(nq * max(1, -(-scanned // READ_UNIT_VECTORS)))
        if not dists:
            return [[] for _ in range(nq)]
        dist = np.concatenate(dists, axis=1) if len(dists) > 1 else dists[0]
        lab = np.concatenate(labs, axis=1) if len(labs) > 1 else labs[0]
        lower_better = self.cfg.metric == "l2"
        if len(dists) > 1 or dist.shape[1] > k:
            dist = np.where((lab & ROW_MASK) == ROW_MASK, np.inf if lower_better else -np.inf, dist)  # -1 labels
            order = np.argsort(dist if lower_better else -dist, axis=1, kind="stable")[:, :k]
            dist = np.take_along_axis(dist, order, axis=1)
            lab = np.take_along_axis(lab, order, axis=1)
        out = []
        dist_l = dist.tolist()
        lab_l = lab.tolist()
        for qi in range(nq):
            row = []
            for s, key in zip(dist_l[qi], lab_l[qi], strict=True):
                r = key & ROW_MASK
                if r == ROW_MASK or not isfinite(s):
                    continue
                row.append((s, segs[key >> SEG_SHIFT], r))
            out.append(row)
        return out

    def text_search(self, text: str, k: int, flt: Filter | None) -> list[tuple[float, Segment, int]]:
        terms = list(dict.fromkeys(tokenize(text)))
        view = self.view()
        if not terms:
            return []
        docs = 0
        tokens = 0
        df = dict.fromkeys(terms, 0)
        for seg, _n, _dead in view.parts:
            ti = seg.text_index
            if ti is None:
                continue
            docs += ti.docs
            tokens += ti.total_tokens
            for t in terms:
                df[t] += ti.df(t)
        if docs == 0:
            return []
        avgdl = tokens / docs
        idf = {t: float(np.log(1.0 + (docs - df[t] + 0.5) / (df[t] + 0.5))) for t in terms}
        cands: list[tuple[float, Segment, int]] = []
        for seg, n, dead in view.parts:
            if seg.text_index is None or n == 0:
                continue
            rows, scores = seg.text_index.score(terms, n, idf, avgdl)
            if not len(rows):
                continue
            mask = self._mask(view, seg, n, dead, flt)
            if mask is not None:
                keep = mask[rows]
                rows, scores = rows[keep], scores[keep]
            if len(rows) > k:
                top = np.argpartition(-scores, k - 1)[:k]
                rows, scores = rows[top], scores[top]
            cands.extend((float(s), seg, int(r)) for s, r in zip(scores.tolist(), rows.tolist(), strict=True))
        self._add_read_units(1)
        cands.sort(key=lambda t: -t[0])
        return cands[:k]

    def search(self, p: dict[str, Any]) -> Any:
        k = p["top_k"]
        if p["q"] is None:
            hits = [self.text_search(p["text"], k, p["filter"])]
        else:
            hits = self.vector_search(p["q"], k, p["filter"], p["ef"], p["nprobe"])
        res = [self._results(h, p) for h in hits]
        return res if p["multi"] else res[0]

    def hybrid(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        k = p["top_k"]
        depth = min(max(k * 4, 50), MAX_TOP_K)
        vec = self.vector_search(p["q"], depth, p["filter"], p["ef"], p["nprobe"])[0]
        txt = self.text_search(p["text"], depth, p["filter"])
        method = p["fusion"]["method"]
        weights = p["fusion"]["weights"] or {}
        wv = float(weights.get("vector", 0.5 if method == "weighted" else 1.0))
        wt = float(weights.get("text", 0.5 if method == "weighted" else 1.0))
        fused: dict[tuple[int, int], list[Any]] = {}
        if method == "rrf":
            for lst, w in ((vec, wv), (txt, wt)):
                for rank, (_s, seg, r) in enumerate(lst):
                    e = fused.setdefault((seg.seg_no, r), [0.0, seg, r])
                    e[0] += w / (60.0 + rank + 1)
        else:
            lower_better = self.cfg.metric == "l2"
            for lst, w, flip in ((vec, wv, lower_better), (txt, wt, False)):
                if not lst:
                    continue
                vals = np.array([s for s, _, _ in lst], dtype=np.float64)
                if flip:
                    vals = -vals
                lo, hi = float(vals.min()), float(vals.max())
                norm = (vals - lo) / (hi - lo) if hi > lo else np.ones_like(vals)
                for x, (_s, seg, r) in zip(norm.tolist(), lst, strict=True):
                    e = fused.setdefault((seg.seg_no, r), [0.0, seg, r])
                    e[0] += w * x
        best = sorted(fused.values(), key=lambda e: -e[0])[:k]
        return self._results([(e[0], e[1], e[2]) for e in best], p)

    def _results(self, hits: list[tuple[float, Segment, int]], p: dict[str, Any]) -> list[dict[str, Any]]:
        inc_m = p["include_metadata"]
        inc_v = p["include_vectors"]
        if not inc_m and not inc_v:
            return [{"id": seg.ids[r], "score": s} for s, seg, r in hits]
        out = []
        for s, seg, r in hits:
            rec: dict[str, Any] = {"id": seg.ids[r], "score": s}
            if inc_m:
                rec["metadata"] = seg.metadata(r)
            if inc_v:
                rec["vector"] = seg.vector(r)
            out.append(rec)
        return out

    # ------------------------------------------------------------------------------------------------------
    # maintenance: seal, build, compact
    # ------------------------------------------------------------------------------------------------------
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

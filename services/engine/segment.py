"""Segments: columnar rows (vectors, ids, typed metadata, text) plus an optional faiss index.

A *growing* segment takes appends (written beyond the published row count, then published under the
collection's state lock) and is searched exactly. A *sealed* segment is immutable except for its deletion
versions and carries an index (flat, HNSW, IVF-Flat, IVF-PQ) built in the background.

Deletions are versions: ``del_ver[row]`` is the collection version that deleted the row (LIVE if alive), so a
search that captured version ``v`` sees exactly the rows alive at ``v`` even while writes go on.
"""

from __future__ import annotations

import math
import struct
from itertools import chain
from typing import Any

import faiss as _faiss
import numpy as np
import orjson

from .idmap import LIVE, PackedIds
from .schema import CollectionConfig
from .text import TextIndex

faiss: Any = _faiss  # the bundled stubs lag behind the SWIG API (selectors, search parameters)

MISSING: Any = object()

EXACT_MAX_ROWS = 10_000  # filtered searches that leave at most this many rows are answered exactly
EXACT_MAX_FRACTION = 0.02
PQ_RERANK = 10  # IVF-PQ candidates per result, re-ranked exactly with the stored vectors


class Grow:
    """A growable numpy buffer; rows beyond the published count may be written without locks."""

    def __init__(self, dtype: Any, width: int | None = None, cap: int = 0) -> None:
        self.dtype = np.dtype(dtype)
        self.width = width
        self.n = 0
        self.arr = np.empty(self._shape(cap), dtype=self.dtype)

    def _shape(self, cap: int) -> tuple[int, ...]:
        return (cap, self.width) if self.width else (cap,)

    def reserve(self, extra: int) -> None:
        need = self.n + extra
        if need > len(self.arr):
            cap = max(need, int(len(self.arr) * 1.5), 1024 if self.n else 0)
            new = np.empty(self._shape(cap), dtype=self.dtype)
            new[: self.n] = self.arr[: self.n]
            self.arr = new  # publish the copy before any new row is written into it

    def extend(self, data: Any) -> None:
        data = np.asarray(data, dtype=self.dtype)
        self.reserve(len(data))
        self.arr[self.n : self.n + len(data)] = data
        self.n += len(data)

    def view(self, n: int) -> np.ndarray:
        return self.arr[:n]

    def ahead(self, skip: int, count: int) -> np.ndarray | None:
        """The reserved rows ``skip`` to ``skip + count`` past the written ones (what a later append will write
        into), or None beyond the capacity."""
        lo = self.n + skip
        hi = min(lo + count, len(self.arr))
        return self.arr[lo:hi] if hi > lo else None

    @classmethod
    def wrap(cls, data: np.ndarray, width: int | None = None) -> Grow:
        g = cls(data.dtype, width)
        g.arr = data
        g.n = len(data)
        return g


# --------------------------------------------------------------------------------------------------------
# Metadata columns
# --------------------------------------------------------------------------------------------------------
class Column:
    kind = ""

    def __init__(self) -> None:
        self.present = Grow(np.bool_)

    def append(self, values: list[Any]) -> None:
        raise NotImplementedError

    def truncate(self, n: int) -> None:
        """Forget rows from ``n`` on (rows written but never published)."""
        self.present.n = n

    def get(self, row: int) -> Any:
        raise NotImplementedError

    def take(self, rows: np.ndarray) -> Column:
        raise NotImplementedError

    def dump(self, n: int) -> tuple[dict[str, Any], list[np.ndarray]]:
        raise NotImplementedError

    def exists(self, n: int) -> np.ndarray:
        return self.present.view(n).copy()

    def eq(self, value: Any, n: int) -> np.ndarray:
        raise NotImplementedError

    def isin(self, values: list[Any], n: int) -> np.ndarray:
        raise NotImplementedError

    def cmp(self, op: str, value: Any, n: int) -> np.ndarray:
        raise NotImplementedError

    def nbytes(self) -> int:
        return int(self.present.arr.nbytes)


class NumericColumn(Column):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.dtype = {"int": np.int64, "float": np.float64, "bool": np.bool_}[kind]
        self.values = Grow(self.dtype)

    def append(self, values: list[Any]) -> None:
        if None in values:
            present = [v is not None for v in values]
            values = [v if v is not None else 0 for v in values]
            self.present.extend(present)
        else:  # the usual batch: every row has the field
            self.present.extend(np.ones(len(values), dtype=np.bool_))
        self.values.extend(np.array(values, dtype=self.dtype))

    def truncate(self, n: int) -> None:
        super().truncate(n)
        self.values.n = n

    def get(self, row: int) -> Any:
        if not self.present.arr[row]:
            return MISSING
        return self.values.arr[row].item()

    def take(self, rows: np.ndarray) -> Column:
        c = NumericColumn(self.kind)
        c.values = Grow.wrap(self.values.arr[rows].copy())
        c.present = Grow.wrap(self.present.arr[rows].copy())
        return c

    def dump(self, n: int) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {}, [self.values.view(n), self.present.view(n)]

    @classmethod
    def load(cls, kind: str, arrays: list[np.ndarray]) -> NumericColumn:
        c = cls(kind)
        c.values = Grow.wrap(arrays[0].astype(c.dtype))
        c.present = Grow.wrap(arrays[1].astype(np.bool_))
        return c

    def eq(self, value: Any, n: int) -> np.ndarray:
        return (self.values.view(n) == value) & self.present.view(n)

    def isin(self, values: list[Any], n: int) -> np.ndarray:
        return np.isin(self.values.view(n), np.array(values, dtype=self.dtype)) & self.present.view(n)

    def cmp(self, op: str, value: Any, n: int) -> np.ndarray:
        v = self.values.view(n)
        if op == "$gt":
            m = v > value
        elif op == "$gte":
            m = v >= value
        elif op == "$lt":
            m = v < value
        else:
            m = v <= value
        return m & self.present.view(n)

    def nbytes(self) -> int:
        return super().nbytes() + int(self.values.arr.nbytes)


class StringColumn(Column):
    kind = "string"

    def __init__(self) -> None:
        super().__init__()
        self.codes = Grow(np.int32)
        self.vocab: list[str] = []
        self.lookup: dict[str, int] = {}

    def _code(self, s: str) -> int:
        c = self.lookup.get(s)
        if c is None:
            c = len(self.vocab)
            self.vocab.append(s)
            self.lookup[s] = c
        return c

    def _codes(self, values: list[Any]) -> list[int]:
        """The codes of these strings (-1 for None), new strings added to the vocabulary: one C-level pass of
        lookups, and Python only for the values it did not know."""
        codes: list[Any] = list(map(self.lookup.get, values))
        if None in codes:
            for i, c in enumerate(codes):
                if c is None:
                    v = values[i]
                    codes[i] = -1 if v is None else self._code(v)
        return codes

    def append(self, values: list[Any]) -> None:
        codes = np.array(self._codes(values), dtype=np.int32)
        self.codes.extend(codes)
        self.present.extend(codes >= 0)

    def truncate(self, n: int) -> None:
        super().truncate(n)
        self.codes.n = n

    def get(self, row: int) -> Any:
        c = int(self.codes.arr[row])
        return MISSING if c < 0 else self.vocab[c]

    def take(self, rows: np.ndarray) -> Column:
        new = StringColumn()
        codes = self.codes.arr[rows]
        used = np.unique(codes[codes >= 0])
        remap = np.full(len(self.vocab) + 1, -1, dtype=np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        new.vocab = [self.vocab[i] for i in used.tolist()]
        new.lookup = {s: i for i, s in enumerate(new.vocab)}
        new.codes = Grow.wrap(np.where(codes >= 0, remap[codes], -1).astype(np.int32))
        new.present = Grow.wrap(self.present.arr[rows].copy())
        return new

    def dump(self, n: int) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {"vocab": self.vocab[:]}, [self.codes.view(n), self.present.view(n)]

    @classmethod
    def load(cls, meta: dict[str, Any], arrays: list[np.ndarray]) -> StringColumn:
        c = cls()
        c.vocab = list(meta["vocab"])
        c.lookup = {s: i for i, s in enumerate(c.vocab)}
        c.codes = Grow.wrap(arrays[0].astype(np.int32))
        c.present = Grow.wrap(arrays[1].astype(np.bool_))
        return c

    def eq(self, value: Any, n: int) -> np.ndarray:
        c = self.lookup.get(value)
        if c is None:
            return np.zeros(n, dtype=bool)
        return self.codes.view(n) == c

    def isin(self, values: list[Any], n: int) -> np.ndarray:
        codes = [self.lookup[v] for v in values if v in self.lookup]
        if not codes:
            return np.zeros(n, dtype=bool)
        return np.isin(self.codes.view(n), np.array(codes, dtype=np.int32))

    def nbytes(self) -> int:
        return super().nbytes() + int(self.codes.arr.nbytes) + sum(len(s) + 50 for s in self.vocab)


class StringListColumn(StringColumn):
    kind = "string[]"

    def __init__(self) -> None:
        super().__init__()
        self.offsets = Grow(np.int64)
        self.offsets.extend([0])
        self.owner = Grow(np.int32)  # codes holds the flat element codes, owner their rows

    def append(self, values: list[Any]) -> None:
        start = self.present.n
        base = self.codes.n
        lens = np.array([len(v) if v else 0 for v in values], dtype=np.int64)
        self.codes.extend(self._codes(list(chain.from_iterable(v for v in values if v))))
        self.owner.extend(np.repeat(np.arange(start, start + len(values), dtype=np.int32), lens))
        self.offsets.extend(base + np.cumsum(lens))
        self.present.extend([v is not None for v in values])

    def truncate(self, n: int) -> None:
        m = int(self.offsets.arr[n])
        self.present.n = n
        self.offsets.n = n + 1
        self.codes.n = self.owner.n = m

    def get(self, row: int) -> Any:
        if not self.present.arr[row]:
            return MISSING
        a, b = int(self.offsets.arr[row]), int(self.offsets.arr[row + 1])
        return [self.vocab[c] for c in self.codes.arr[a:b].tolist()]

    def take(self, rows: np.ndarray) -> Column:
        new = StringListColumn()
        vals = [self.get(int(r)) for r in rows]
        new.append([None if v is MISSING else v for v in vals])
        return new

    def dump(self, n: int) -> tuple[dict[str, Any], list[np.ndarray]]:
        m = int(self.offsets.arr[n])
        return {"vocab": self.vocab[:]}, [
            self.offsets.view(n + 1),
            self.codes.view(m),
            self.owner.view(m),
            self.present.view(n),
        ]

    @classmethod
    def load(cls, meta: dict[str, Any], arrays: list[np.ndarray]) -> StringListColumn:
        c = cls()
        c.vocab = list(meta["vocab"])
        c.lookup = {s: i for i, s in enumerate(c.vocab)}
        c.offsets = Grow.wrap(arrays[0].astype(np.int64))
        c.codes = Grow.wrap(arrays[1].astype(np.int32))
        c.owner = Grow.wrap(arrays[2].astype(np.int32))
        c.present = Grow.wrap(arrays[3].astype(np.bool_))
        return c

    def _rows_with(self, codes: list[int], n: int) -> np.ndarray:
        out = np.zeros(n, dtype=bool)
        if not codes:
            return out
        m = int(self.offsets.arr[n])
        flat = self.codes.view(m)
        hit = np.isin(flat, np.array(codes, dtype=np.int32)) if len(codes) > 1 else flat == codes[0]
        out[self.owner.view(m)[hit]] = True
        return out

    def eq(self, value: Any, n: int) -> np.ndarray:
        c = self.lookup.get(value)
        return self._rows_with([c] if c is not None else [], n)

    def isin(self, values: list[Any], n: int) -> np.ndarray:
        return self._rows_with([self.lookup[v] for v in values if v in self.lookup], n)

    def nbytes(self) -> int:
        return super().nbytes() + int(self.offsets.arr.nbytes + self.owner.arr.nbytes)


class JsonColumn(Column):
    kind = "json"

    def __init__(self) -> None:
        super().__init__()
        self.values: list[Any] = []

    def append(self, values: list[Any]) -> None:
        self.values.extend(values)
        self.present.extend([v is not None for v in values])

    def truncate(self, n: int) -> None:
        super().truncate(n)
        del self.values[n:]

    def get(self, row: int) -> Any:
        return self.values[row] if self.present.arr[row] else MISSING

    def take(self, rows: np.ndarray) -> Column:
        new = JsonColumn()
        new.append([self.values[int(r)] for r in rows])
        return new

    def dump(self, n: int) -> tuple[dict[str, Any], list[np.ndarray]]:
        blob = orjson.dumps(self.values[:n])
        return {}, [np.frombuffer(blob, dtype=np.uint8), self.present.view(n)]

    @classmethod
    def load(cls, arrays: list[np.ndarray]) -> JsonColumn:
        c = cls()
        c.values = orjson.loads(arrays[0].tobytes())
        c.present = Grow.wrap(arrays[1].astype(np.bool_))
        return c

    def nbytes(self) -> int:
        return super().nbytes() + 64 * len(self.values)


def concat_columns(parts: list[Column]) -> Column:
    """Columns of consecutive row ranges -> one column."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, NumericColumn):
        out = NumericColumn(first.kind)
        out.values = Grow.wrap(np.concatenate([p.values.view(p.present.n) for p in parts]))  # type: ignore[attr-defined]
        out.present = Grow.wrap(np.concatenate([p.present.view(p.present.n) for p in parts]))
        return out
    col = new_column(first.kind)
    for p in parts:
        vals = [p.get(i) for i in range(p.present.n)]
        col.append([None if v is MISSING else v for v in vals])
    return col


def new_column(kind: str) -> Column:
    if kind in ("int", "float", "bool"):
        return NumericColumn(kind)
    if kind == "string":
        return StringColumn()
    if kind == "string[]":
        return StringListColumn()
    return JsonColumn()


def load_column(kind: str, meta: dict[str, Any], arrays: list[np.ndarray]) -> Column:
    if kind in ("int", "float", "bool"):
        return NumericColumn.load(kind, arrays)
    if kind == "string":
        return StringColumn.load(meta, arrays)
    if kind == "string[]":
        return StringListColumn.load(meta, arrays)
    return JsonColumn.load(arrays)


# --------------------------------------------------------------------------------------------------------
# Index building
# --------------------------------------------------------------------------------------------------------
def faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def plan_index(cfg: CollectionConfig, n: int) -> tuple[str, dict[str, Any]]:
    """The index a sealed segment of ``n`` rows gets (``auto`` and tiny segments resolved here)."""
    kind = cfg.index_type
    params = dict(cfg.index_params)
    if kind == "auto":
        if n < 5_000:
            return "flat", {}
        return "hnsw", {"M": 16, "ef_construction": 100}
    if kind in ("ivf_flat", "ivf_pq"):
        nlist = max(1, min(int(params.get("nlist", 128)), n // 39))
        params["nlist"] = nlist
        if kind == "ivf_pq" and n < (1 << int(params.get("nbits", 8))) * 4:
            return "flat", {}
        if nlist < 2:
            return "flat", {}
    return kind, params


def build_index(cfg: CollectionConfig, vectors: np.ndarray, threads: int) -> tuple[faiss.Index, str, bool]:
    """Returns (index, kind, whether the segment must keep its own copy of the vectors)."""
    n, d = vectors.shape
    kind, params = plan_index(cfg, n)
    metric = faiss_metric(cfg.metric)
    faiss.omp_set_num_threads(max(1, threads))
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlat(d, metric)
        index.add(vectors)
        return index, kind, False
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(params.get("M", 16)), metric)
        index.hnsw.efConstruction = int(params.get("ef_construction", 100))
        index.add(vectors)
        return index, kind, False
    quantizer = faiss.IndexFlat(d, metric)
    nlist = int(params["nlist"])
    if kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, nlist, int(params.get("m", 8)), int(params.get("nbits", 8)), metric)
    rng = np.random.default_rng(1234)
    sample = vectors if n <= 100_000 else vectors[np.sort(rng.choice(n, 100_000, replace=False))]
    index.cp.seed = 1234
    index.train(sample)
    index.add(vectors)
    index.own_fields = True
    quantizer.this.disown()
    return index, kind, True


def _raw_search(index: Any, x: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` without the Python wrapper's checks and copies (x is C-contiguous float32)."""
    nq = len(x)
    if not x.flags.c_contiguous or x.dtype != np.float32:
        x = np.ascontiguousarray(x, dtype=np.float32)
    dist = np.empty((nq, k), dtype=np.float32)
    lab = np.empty((nq, k), dtype=np.int64)
    index.search_c(nq, faiss.swig_ptr(x), k, faiss.swig_ptr(dist), faiss.swig_ptr(lab), params)
    return dist, lab


def flat_view(index: faiss.Index, n: int, d: int) -> np.ndarray:
    """Zero-copy view of the float32 vectors stored in a flat or HNSW-flat index."""
    storage = index if isinstance(index, faiss.IndexFlat) else faiss.downcast_index(index.storage)
    return faiss.rev_swig_ptr(storage.get_xb(), n * d).reshape(n, d)


# --------------------------------------------------------------------------------------------------------
# Segment
# --------------------------------------------------------------------------------------------------------
class Segment:
    def __init__(self, seg_no: int, cfg: CollectionConfig) -> None:
        self.seg_no = seg_no
        self.cfg = cfg
        self.d = cfg.dimension
        self.n = 0  # published rows
        self.growing = True
        self.ids: list[str] | PackedIds = []  # a list while growing, packed once built or loaded
        self.vec: Grow | None = Grow(np.float32, self.d)
        self.norms = Grow(np.float32)
        self.del_ver = Grow(np.int64)
        self.columns: dict[str, Column] = {name: new_column(f.type) for name, f in cfg.fields.items()}
        self.texts: list[str | None] | None = [] if cfg.text_field else None
        self.text_index: TextIndex | None = TextIndex() if cfg.text_field else None
        self.index: faiss.Index | None = None
        self.index_kind = "exact"
        self.index_bytes = 0
        self.n_dead = 0
        self.last_del_ver = 0
        self.wal_files: list[str] = []  # WALs holding this segment's rows (unpersisted segments only)
        self.file: str | None = None  # persisted segment file name
        self._mask_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._view: np.ndarray | None = None
        self._params: dict[tuple[str, int], Any] = {}  # read-only faiss search parameters, shared by threads
        self._storage_index: Any = None

    # --- writes (caller holds the collection's write lock) ----------------------------------------------
    def stage(
        self,
        ids: list[str],
        vectors: np.ndarray,
        norms: np.ndarray,
        metas: list[dict[str, Any] | None],
    ) -> int:
        """Write rows beyond those already written (the published ones and any staged before); ``publish``
        makes them visible, ``unstage`` takes them back. Returns the first new row. The text postings are
        written by ``stage_text``, once the rows are sure to be published."""
        assert self.growing and self.vec is not None and isinstance(self.ids, list)
        start = self.vec.n
        b = len(ids)
        self.vec.extend(vectors)
        self.norms.extend(norms)
        self.del_ver.extend(np.full(b, LIVE, dtype=np.int64))
        for name, col in self.columns.items():
            col.append([(m.get(name) if m else None) for m in metas])
        self.ids.extend(ids)
        return start

    def unstage(self) -> None:
        """Drop every row written beyond the published count (their write did not become durable)."""
        n = self.n
        assert self.vec is not None and isinstance(self.ids, list)
        self.vec.n = self.norms.n = self.del_ver.n = n
        for col in self.columns.values():
            col.truncate(n)
        del self.ids[n:]

    def stage_text(self, start: int, texts: list[str | None] | None, count: int) -> None:
        """The text postings of staged rows ``start .. start + count`` (in row order, just before they are
        published)."""
        if self.texts is not None and self.text_index is not None:
            t = texts or [None] * count
            for i, s in enumerate(t):
                self.text_index.add(start + i, s)
            self.texts.extend(t)

    def publish(self, count: int) -> None:
        self.n += count

    def mark_dead(self, row: int, version: int) -> None:
        if self.del_ver.arr[row] == LIVE:
            self.del_ver.arr[row] = version
            self.n_dead += 1
            self.last_del_ver = max(self.last_del_ver, version)

    # --- reads -------------------------------------------------------------------------------------------
    def vectors(self, n: int) -> np.ndarray:
        if self.vec is not None:
            return self.vec.view(n)
        assert self._view is not None
        return self._view[:n]

    def live_mask(self, version: int, n: int) -> np.ndarray:
        if not self.growing:
            cache = self._mask_cache
            if cache is not None and cache[0] == self.last_del_ver and version >= cache[0]:
                return cache[1]
            last = self.last_del_ver
            mask = self.del_ver.view(n) > version
            if version >= last:
                self._mask_cache = (last, mask, np.packbits(mask, bitorder="little"))
            return mask
        return self.del_ver.view(n) > version

    def _bitmap(self, mask: np.ndarray) -> np.ndarray:
        cache = self._mask_cache
        if cache is not None and cache[1] is mask:
            return cache[2]
        return np.packbits(mask, bitorder="little")

    def search(
        self,
        queries: np.ndarray,
        k: int,
        n: int,
        mask: np.ndarray | None,
        allowed: int,
        ef: int | None,
        nprobe: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, local rows) over rows < n allowed by ``mask`` (None: all)."""
        nq = len(queries)
        if allowed <= 0 or n == 0:
            return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)
        idx = self.index
        kind = self.index_kind
        if mask is None and idx is not None and n == self.n:
            # the common case: the whole indexed segment, no filter; search parameters are cached
            kk = min(k, n)
            cached: Any = None
            if kind == "hnsw":
                cached = self._cached_params(("hnsw", max(ef or 64, kk)))
            elif kind in ("ivf_flat", "ivf_pq"):
                cached = self._cached_params(("ivf", nprobe or max(1, min(idx.nlist, 10))))
            fetch = min(kk * PQ_RERANK, n) if kind == "ivf_pq" else kk
            dist, lab = _raw_search(idx, queries, fetch, cached)
            if kind == "ivf_pq":
                return self._rerank(queries, lab, kk)
            return dist, lab
        metric = faiss_metric(self.cfg.metric)
        frac = allowed / n
        exact = idx is None or (
            mask is not None and kind != "flat" and (allowed <= EXACT_MAX_ROWS or frac <= EXACT_MAX_FRACTION)
        )
        if exact:
            if mask is not None and idx is not None and kind in ("flat", "hnsw"):
                # exact over the allowed rows of the index's own flat storage: no copy of the rows
                storage = idx if kind == "flat" else self._storage()
                bitmap = self._bitmap(mask)
                sel0 = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
                dist, lab = _raw_search(storage, queries, min(k, allowed), faiss.SearchParameters(sel=sel0))
                del bitmap
                return dist, lab
            X = self.vectors(n)
            if mask is not None:
                rows = np.flatnonzero(mask)
                kk = min(k, len(rows))
                dist, lab = faiss.knn(queries, X[rows], kk, metric=metric)
                return dist, np.where(lab >= 0, rows[np.maximum(lab, 0)], -1)
            kk = min(k, n)
            dist, lab = faiss.knn(queries, X, kk, metric=metric)
            return dist, lab.astype(np.int64)
        sel = None
        bits = None
        if mask is not None:
            bits = self._bitmap(mask)
            sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
        kk = min(k, allowed)
        assert idx is not None
        if kind == "hnsw":
            e = max(ef or 64, kk)
            if mask is not None:
                e = min(max(e, int(e / max(frac, 1e-6))), 4096)
            params: Any = (
                faiss.SearchParametersHNSW(sel=sel, efSearch=e) if sel else faiss.SearchParametersHNSW(efSearch=e)
            )
        elif kind in ("ivf_flat", "ivf_pq"):
            nlist = idx.nlist
            p = nprobe or max(1, min(nlist, 10))
            if mask is not None:
                p = min(nlist, math.ceil(p / max(frac, 1e-6) ** 0.5))
            params = faiss.SearchParametersIVF(sel=sel, nprobe=p) if sel else faiss.SearchParametersIVF(nprobe=p)
        else:
            params = faiss.SearchParameters(sel=sel) if sel else None
        fetch = kk * PQ_RERANK if kind == "ivf_pq" else kk
        dist, lab = _raw_search(idx, queries, min(fetch, n), params)
        del bits
        if kind == "ivf_pq":
            dist, lab = self._rerank(queries, lab, kk)
        return dist, lab

    def _cached_params(self, key: tuple[str, int]) -> Any:
        p = self._params.get(key)
        if p is None:
            if key[0] == "hnsw":
                p = faiss.SearchParametersHNSW(efSearch=key[1])
            else:
                p = faiss.SearchParametersIVF(nprobe=key[1])
            if len(self._params) > 64:
                self._params.clear()
            self._params[key] = p
        return p

    def _storage(self) -> Any:
        st = self._storage_index
        if st is None:
            assert self.index is not None
            st = self._storage_index = faiss.downcast_index(self.index.storage)
        return st

    def _rerank(self, queries: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        X = self.vectors(self.n)
        out_d = np.full((len(queries), k), np.nan, dtype=np.float32)
        out_i = np.full((len(queries), k), -1, dtype=np.int64)
        l2 = self.cfg.metric == "l2"
        for qi in range(len(queries)):
            c = cand[qi]
            c = c[c >= 0]
            if not len(c):
                continue
            V = X[c]
            s = ((V - queries[qi]) ** 2).sum(1) if l2 else V @ queries[qi]
            order = np.argsort(s if l2 else -s, kind="stable")[:k]
            out_d[qi, : len(order)] = s[order]
            out_i[qi, : len(order)] = c[order]
        return out_d, out_i

    def metadata(self, row: int) -> dict[str, Any]:
        out = {}
        for name, col in self.columns.items():
            v = col.get(row)
            if v is not MISSING:
                out[name] = v
        return out

    def vector(self, row: int) -> list[float]:
        v = self.vectors(self.n)[row]
        if self.cfg.metric == "cosine":
            v = v * self.norms.arr[row]
        return v.astype(np.float32).tolist()

    def text(self, row: int) -> str | None:
        return self.texts[row] if self.texts is not None else None

    def memory_bytes(self) -> int:
        total = self.index_bytes + int(self.norms.arr.nbytes + self.del_ver.arr.nbytes)
        if self.vec is not None:  # rows written, not the reserved (untouched) capacity
            total += int(self.vec.arr[: self.vec.n].nbytes)
        total += sum(c.nbytes() for c in self.columns.values())
        ids = self.ids
        total += ids.nbytes if isinstance(ids, PackedIds) else sum(len(s) + 90 for s in ids)
        return total

    # --- sealing -----------------------------------------------------------------------------------------
    def attach_index(self, index: faiss.Index, kind: str, keep_vectors: bool) -> None:
        self.index = index
        self.index_kind = kind
        if kind in ("flat", "hnsw") and not keep_vectors:
            self._view = flat_view(index, self.n, self.d)
            self.vec = None
        self.index_bytes = _index_bytes(index, kind, self.n, self.d)


def _index_bytes(index: faiss.Index, kind: str, n: int, d: int) -> int:
    if kind == "flat":
        return n * d * 4
    if kind == "hnsw":
        m = faiss.downcast_index(index).hnsw.nb_neighbors(0)
        return n * d * 4 + n * m * 4 * 2
    if kind == "ivf_flat":
        return n * (d * 4 + 8)
    if kind == "ivf_pq":
        return n * (faiss.downcast_index(index).pq.code_size + 8)
    return 0


# --------------------------------------------------------------------------------------------------------
# Segment files
# --------------------------------------------------------------------------------------------------------
def segment_parts(seg: Segment) -> list[bytes | memoryview]:
    """Serialize a sealed segment: ``u64 header-length | header JSON | blobs``."""
    n = seg.n
    blobs: list[np.ndarray] = []
    cols: dict[str, Any] = {}

    def add(a: np.ndarray) -> int:
        blobs.append(np.ascontiguousarray(a))
        return len(blobs) - 1

    for name, col in seg.columns.items():
        meta, arrays = col.dump(n)
        cols[name] = {
            "kind": col.kind,
            "meta": meta,
            "blobs": [[add(a), a.dtype.str, list(a.shape)] for a in arrays],
        }
    text: dict[str, Any] | None = None
    if seg.text_index is not None and seg.texts is not None:
        tmeta, tarrays = seg.text_index.dump()
        texts_blob = np.frombuffer(orjson.dumps(seg.texts[:n]), dtype=np.uint8)
        text = {
            "meta": tmeta,
            "blobs": [[add(a), a.dtype.str, list(a.shape)] for a in tarrays],
            "texts": add(texts_blob),
        }
    ids_blob = add(np.frombuffer(orjson.dumps(seg.ids[:n]), dtype=np.uint8))
    norms = add(seg.norms.view(n))
    vectors = None
    if seg.index_kind in ("ivf_flat", "ivf_pq", "exact") and seg.vec is not None:
        vectors = add(seg.vectors(n))
    index_blob = None
    if seg.index is not None:
        index_blob = add(faiss.serialize_index(seg.index))
    header = {
        "version": 1,
        "seg_no": seg.seg_no,
        "n": n,
        "index_kind": seg.index_kind,
        "columns": cols,
        "text": text,
        "ids": ids_blob,
        "norms": norms,
        "vectors": vectors,
        "index": index_blob,
        "sizes": [int(b.nbytes) for b in blobs],
        "dtypes": [[b.dtype.str, list(b.shape)] for b in blobs],
    }
    hb = orjson.dumps(header)
    parts: list[bytes | memoryview] = [struct.pack("<Q", len(hb)), hb]
    parts.extend(memoryview(b.reshape(-1).view(np.uint8).data) for b in blobs)
    return parts


def _read_index(arr: np.ndarray) -> Any:
    """faiss.deserialize_index without its first step, a zero-filled copy of the whole serialized index: the
    reader hands faiss 4 MiB pieces of ``arr`` (restore and open of a 100k x 384 HNSW segment: ~0.15 s less)."""
    view = np.ascontiguousarray(arr).data.cast("B")
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        piece = view[pos : pos + n].tobytes()
        pos += len(piece)
        return piece

    return faiss.read_index(faiss.PyCallbackIOReader(read, 1 << 22))


def load_segment(cfg: CollectionConfig, buf: np.ndarray) -> Segment:
    (hlen,) = struct.unpack("<Q", buf[:8].tobytes())
    header = orjson.loads(buf[8 : 8 + hlen].tobytes())
    offs = [8 + hlen]
    for s in header["sizes"]:
        offs.append(offs[-1] + s)

    def blob(i: int, copy: bool = True) -> np.ndarray:
        dt, shape = header["dtypes"][i]
        a = buf[offs[i] : offs[i + 1]].view(np.dtype(dt)).reshape(shape)
        return a.copy() if copy else a

    seg = Segment(int(header["seg_no"]), cfg)
    n = int(header["n"])
    seg.growing = False
    seg.n = n
    seg.ids = PackedIds.from_list(orjson.loads(blob(header["ids"], copy=False).tobytes()))
    seg.norms = Grow.wrap(blob(header["norms"]))
    seg.del_ver = Grow.wrap(np.full(n, LIVE, dtype=np.int64))
    for name, c in header["columns"].items():
        if name in seg.columns:
            seg.columns[name] = load_column(c["kind"], c["meta"], [blob(b[0]) for b in c["blobs"]])
    if header["text"] is not None and cfg.text_field:
        t = header["text"]
        seg.text_index = TextIndex.load(t["meta"], [blob(b[0]) for b in t["blobs"]])
        seg.texts = orjson.loads(blob(t["texts"], copy=False).tobytes())
    if header["vectors"] is not None:
        seg.vec = Grow.wrap(blob(header["vectors"]), cfg.dimension)
    else:
        seg.vec = None
    if header["index"] is not None:
        index = _read_index(blob(header["index"], copy=False))
        seg.attach_index(index, header["index_kind"], seg.vec is not None)
    else:
        seg.index_kind = "exact"
    return seg

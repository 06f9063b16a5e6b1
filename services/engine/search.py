"""A collection's read paths: parsing and validating search bodies, vector search fanned out over segments and
merged, BM25 text search, hybrid fusion, result building, and the fast lane (``search_native``, decision 011).

``Searching`` is a mixin of ``collection.Collection``: it reads the collection's state only through ``view()``
(a consistent list of segments with their published and dead row counts, captured under ``state_lock``), so no
search holds a lock while it computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from services.core.errors import BadRequest, PayloadTooLarge, Unprocessable

from . import schema
from .filters import Filter, compile_filter
from .idmap import ROW_MASK, SEG_SHIFT, PackedIds
from .schema import (
    MAX_QUERIES,
    MAX_TOP_K,
    CollectionConfig,
    check_finite,
    expect_object,
    fast_search,
    loads,
    to_matrix,
    unit_queries,
)
from .segment import Segment
from .text import tokenize

READ_UNIT_VECTORS = 100_000  # one read unit per query per this many vectors searched


@dataclass
class View:
    version: int
    parts: list[tuple[Segment, int, int]]  # (segment, published rows, dead rows at capture)


class Searching:
    """The read paths of ``Collection`` (see the module docstring)."""

    cfg: CollectionConfig

    if TYPE_CHECKING:

        def view(self) -> View: ...

        def _add_read_units(self, n: int) -> None: ...

    def _mask(self, view: View, seg: Segment, n: int, dead: int, flt: Filter | None) -> np.ndarray | None:
        mask = seg.live_mask(view.version, n) if dead else None
        if flt is not None:
            fm = flt.mask(seg, n)
            mask = fm if mask is None else (mask & fm)
        return mask

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

"""Tokenizer and BM25 postings for the collection's text field.

Tokens: NFKC-normalized, lower-cased runs of letters/digits; runs of CJK characters (Han, kana, Hangul) become
overlapping character bigrams (a lone CJK character is its own token), so Chinese and Japanese without spaces
are searchable. Postings per segment: term -> (rows, term frequencies); growing segments append to compact
``array('i')`` buffers, sealed segments hold numpy arrays.
"""

from __future__ import annotations

import re
import unicodedata
from array import array
from collections import Counter
from typing import Any

import numpy as np

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W_{_CJK}]+", re.UNICODE)
_CJK_RUN = re.compile(rf"^[{_CJK}]+$")

K1 = 1.2
B = 0.75


def tokenize(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    out: list[str] = []
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if _CJK_RUN.match(tok):
            if len(tok) == 1:
                out.append(tok)
            else:
                out.extend(tok[i : i + 2] for i in range(len(tok) - 1))
        else:
            out.append(tok)
    return out


class TextIndex:
    def __init__(self) -> None:
        self.growing: dict[str, tuple[array, array]] = {}
        self.frozen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.doc_len = array("i")
        self.total_tokens = 0
        self.docs = 0

    def add(self, row: int, text: str | None) -> None:
        """Rows must be added in order, each exactly once (None: no text)."""
        if row != len(self.doc_len):
            raise RuntimeError("text rows out of order")
        if not text:
            self.doc_len.append(0)
            return
        counts = Counter(tokenize(text))
        length = sum(counts.values())
        for term, tf in counts.items():
            post = self.growing.get(term)
            if post is None:
                post = (array("i"), array("i"))
                self.growing[term] = post
            post[0].append(row)
            post[1].append(tf)
        self.doc_len.append(length)
        self.total_tokens += length
        self.docs += 1

    def df(self, term: str) -> int:
        f = self.frozen.get(term)
        if f is not None:
            return len(f[0])
        g = self.growing.get(term)
        return len(g[0]) if g is not None else 0

    def posting(self, term: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        f = self.frozen.get(term)
        if f is not None:
            rows, tfs = f
        else:
            g = self.growing.get(term)
            if g is None:
                return np.empty(0, np.int32), np.empty(0, np.int32)
            m = min(len(g[0]), len(g[1]))
            rows = np.array(g[0][:m], dtype=np.int32)
            tfs = np.array(g[1][:m], dtype=np.int32)
        cut = int(np.searchsorted(rows, n))
        return rows[:cut], tfs[:cut]

    def freeze(self) -> None:
        for term, (rows, tfs) in self.growing.items():
            self.frozen[term] = (np.array(rows, dtype=np.int32), np.array(tfs, dtype=np.int32))
        self.growing = {}

    def score(self, terms: list[str], n: int, idf: dict[str, float], avgdl: float) -> tuple[np.ndarray, np.ndarray]:
        """BM25 scores of the rows < n that contain any query term: (rows, scores)."""
        if n == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        dl = np.frombuffer(self.doc_len, dtype=np.int32)[:n].astype(np.float32)
        scores = np.zeros(n, dtype=np.float32)
        touched = np.zeros(n, dtype=bool)
        for term in terms:
            rows, tfs = self.posting(term, n)
            if not len(rows):
                continue
            tf = tfs.astype(np.float32)
            denom = tf + K1 * (1.0 - B + B * dl[rows] / max(avgdl, 1e-9))
            scores[rows] += idf[term] * tf * (K1 + 1.0) / denom
            touched[rows] = True
        hit = np.flatnonzero(touched)
        return hit, scores[hit]

    # --- persistence -------------------------------------------------------------------------------------
    def take(self, rows: np.ndarray, n_src: int) -> TextIndex:
        """A frozen index over ``rows`` of this one (renumbered 0..len(rows)-1)."""
        new = TextIndex()
        remap = np.full(n_src, -1, dtype=np.int64)
        remap[rows] = np.arange(len(rows))
        src_len = np.frombuffer(self.doc_len, dtype=np.int32)[:n_src]
        new_len = src_len[rows]
        new.doc_len = array("i", new_len.astype(np.int32).tobytes())
        new.total_tokens = int(new_len.sum())
        new.docs = int((new_len > 0).sum())
        terms = set(self.frozen) | set(self.growing)
        for term in terms:
            r, t = self.posting(term, n_src)
            m = remap[r]
            keep = m >= 0
            if keep.any():
                new.frozen[term] = (m[keep].astype(np.int32), t[keep].astype(np.int32))
        return new

    @classmethod
    def concat(cls, parts: list[TextIndex]) -> TextIndex:
        """Frozen indexes of consecutive row ranges -> one frozen index."""
        new = cls()
        offset = 0
        rows: dict[str, list[np.ndarray]] = {}
        tfs: dict[str, list[np.ndarray]] = {}
        lens = []
        for p in parts:
            p.freeze()
            for term, (r, t) in p.frozen.items():
                rows.setdefault(term, []).append(r + offset)
                tfs.setdefault(term, []).append(t)
            lens.append(np.frombuffer(p.doc_len, dtype=np.int32))
            offset += len(p.doc_len)
            new.total_tokens += p.total_tokens
            new.docs += p.docs
        for term in rows:
            new.frozen[term] = (np.concatenate(rows[term]).astype(np.int32), np.concatenate(tfs[term]))
        if lens:
            new.doc_len = array("i", np.concatenate(lens).astype(np.int32).tobytes())
        return new

    def dump(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        self.freeze()
        terms = sorted(self.frozen)
        lengths = np.array([len(self.frozen[t][0]) for t in terms], dtype=np.int64)
        rows = np.concatenate([self.frozen[t][0] for t in terms]) if terms else np.empty(0, np.int32)
        tfs = np.concatenate([self.frozen[t][1] for t in terms]) if terms else np.empty(0, np.int32)
        meta = {"terms": terms, "total_tokens": self.total_tokens, "docs": self.docs}
        return meta, [np.frombuffer(self.doc_len, dtype=np.int32).copy(), lengths, rows, tfs]

    @classmethod
    def load(cls, meta: dict[str, Any], arrays: list[np.ndarray]) -> TextIndex:
        new = cls()
        doc_len, lengths, rows, tfs = arrays
        new.doc_len = array("i", doc_len.astype(np.int32).tobytes())
        new.total_tokens = int(meta["total_tokens"])
        new.docs = int(meta["docs"])
        offs = np.concatenate([[0], np.cumsum(lengths)])
        for i, term in enumerate(meta["terms"]):
            a, b = int(offs[i]), int(offs[i + 1])
            new.frozen[term] = (rows[a:b].astype(np.int32), tfs[a:b].astype(np.int32))
        return new

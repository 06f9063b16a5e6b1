"""Import file formats, read in bounded chunks and validated against the collection's schema.

Every reader yields :class:`Chunk` objects of at most ``rows`` records whose ids, vectors, metadata and text have
been checked with the engine's own rules (``services.engine.schema``); the first problem raises
:class:`ImportFailed` naming the record (``line N`` of a JSON Lines file, 1-based; ``row N`` of a Parquet or
NumPy file, 0-based) and the field. Duplicate ids across the whole file are found by :func:`find_duplicate`.

- JSON Lines (``.jsonl``, ``.ndjson``, ``.json``; ``.gz`` compressed too): one upsert record per line,
  ``{"id", "vector", "metadata"?, "text"?}``; blank lines are skipped.
- Parquet: columns ``id`` (string or integer), ``vector`` (list of numbers), optional ``metadata`` (a struct or
  a JSON string), ``text``, and any column named after a declared metadata field.
- NumPy: ``.npy``, a 2-D number matrix whose row numbers (``"0"``, ``"1"``, …) are the ids; ``.npz`` with
  arrays ``ids`` (strings or integers) and ``vectors``. Read straight from the file in chunks (never whole).
"""

from __future__ import annotations

import gzip
import hashlib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from services.control_plane.imports.source import ImportFailed
from services.core.errors import VectaError
from services.engine.schema import MAX_TEXT_LEN, _check_value, check_id, cosine_vector_problem

FORMATS = ("jsonl", "parquet", "npy", "npz")
RECORD_KEYS = frozenset({"id", "vector", "metadata", "text"})
MAX_ROW_GROUP_BYTES = 1 << 30  # a Parquet row group is decoded whole: this bounds an import's memory


@dataclass(frozen=True)
class Schema:
    """What the collection accepts (from the engine's describe)."""

    dimension: int
    metric: str
    fields: dict[str, str]  # name -> type
    text_field: str | None

    @classmethod
    def from_describe(cls, d: dict[str, Any]) -> Schema:
        return cls(
            dimension=int(d["dimension"]),
            metric=str(d["metric"]),
            fields={f["name"]: f["type"] for f in d.get("fields") or []},
            text_field=d.get("text_field"),
        )

    def key(self) -> str:
        return orjson.dumps([self.dimension, self.metric, sorted(self.fields.items()), self.text_field]).decode()


@dataclass
class Chunk:
    first: int  # index in the file's records of the chunk's first record
    where: list[str]  # per record: "line 12 (id 'a')" / "row 11 (id 'a')"
    ids: list[str]
    vectors: np.ndarray  # float32 (n, dimension)
    metas: list[dict[str, Any] | None]
    texts: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)


def detect_format(name: str, head: bytes) -> str:
    """The format from the file's first bytes (magic numbers), else from its name."""
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04"):
        return "npz"
    lower = name.lower().removesuffix(".gz")
    if lower.endswith((".jsonl", ".ndjson", ".json")) or head.startswith(b"\x1f\x8b") or head.lstrip()[:1] == b"{":
        return "jsonl"
    raise ImportFailed(
        "unsupported format: expected JSON Lines (.jsonl), Parquet (.parquet) or NumPy (.npy, .npz); "
        'give "format" in the request if the name does not say'
    )


def read_chunks(path: Path, fmt: str, schema: Schema, rows: int) -> Iterator[Chunk]:
    readers: dict[str, Callable[[Path, Schema, int], Iterator[Chunk]]] = {
        "jsonl": _jsonl,
        "parquet": _parquet,
        "npy": _npy,
        "npz": _npz,
    }
    return readers[fmt](path, schema, rows)


# -- shared checks ------------------------------------------------------------------------------------------
def _id(v: Any, where: str) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    try:
        return check_id(v, where)
    except VectaError as exc:
        raise ImportFailed(exc.detail) from None


def _meta(md: Any, where: str, schema: Schema) -> dict[str, Any] | None:
    if md is None:
        return None
    if not isinstance(md, dict):
        raise ImportFailed(f"{where}: metadata must be an object")
    out: dict[str, Any] = {}
    for key, val in md.items():
        if val is None:
            continue
        ftype = schema.fields.get(key)
        if ftype is None:
            raise ImportFailed(f"{where}: metadata.{key} is not a declared field of the collection")
        try:
            out[key] = _check_value(ftype, val, f"{where}: metadata.{key}")
        except VectaError as exc:
            raise ImportFailed(exc.detail) from None
    return out or None


def _text(t: Any, where: str, schema: Schema) -> str | None:
    if t is None:
        return None
    if schema.text_field is None:
        raise ImportFailed(f"{where}: text given but the collection has no text_field")
    if not isinstance(t, str):
        raise ImportFailed(f"{where}: text must be a string")
    if len(t) > MAX_TEXT_LEN:
        raise ImportFailed(f"{where}: text is longer than {MAX_TEXT_LEN} characters")
    return t


def _dim_error(where: str, got: int, schema: Schema) -> ImportFailed:
    return ImportFailed(f"{where}: vector has dimension {got}, the collection has {schema.dimension}")


def _check_vectors(vectors: np.ndarray, where: list[str], schema: Schema) -> None:
    finite = np.isfinite(vectors)
    if not finite.all():
        r, c = (int(x) for x in np.argwhere(~finite)[0])
        raise ImportFailed(f"{where[r]}: vector[{c}] is NaN, infinite or outside float32 range")
    if schema.metric == "cosine":
        bad = cosine_vector_problem(vectors)
        if bad is not None:
            raise ImportFailed(f"{where[bad[0]]}: {bad[1]}")


# -- JSON Lines ---------------------------------------------------------------------------------------------
def _open_text(path: Path) -> Any:
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")  # closed by the caller's with


def _jsonl(path: Path, schema: Schema, rows: int) -> Iterator[Chunk]:
    dim = schema.dimension
    first = 0
    where: list[str] = []
    ids: list[str] = []
    vecs: list[Any] = []
    metas: list[dict[str, Any] | None] = []
    texts: list[str | None] = []

    def flush() -> Chunk:
        try:
            with np.errstate(over="ignore"):
                arr = np.array(vecs, dtype=np.float32)
        except (ValueError, TypeError, OverflowError):
            for k, v in enumerate(vecs):
                for j, x in enumerate(v):
                    if isinstance(x, bool) or not isinstance(x, int | float):
                        raise ImportFailed(f"{where[k]}: vector[{j}] is not a number") from None
            raise ImportFailed(f"{where[0]}..{where[-1]}: malformed vectors") from None
        if arr.ndim != 2 or arr.shape[1] != dim:  # a nested list inside a vector
            raise ImportFailed(f"{where[0]}..{where[-1]}: vectors must be flat lists of numbers")
        _check_vectors(arr, where, schema)
        return Chunk(first, list(where), list(ids), arr, list(metas), list(texts))

    try:
        with _open_text(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    doc = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise ImportFailed(f"line {lineno}: not valid JSON ({exc})") from None
                if not isinstance(doc, dict):
                    raise ImportFailed(f"line {lineno}: a record must be a JSON object")
                unknown = set(doc) - RECORD_KEYS
                if unknown:
                    raise ImportFailed(
                        f"line {lineno}: unknown field {sorted(unknown)[0]!r} (a record has id, vector, metadata, text)"
                    )
                rid = _id(doc.get("id"), f"line {lineno}")
                w = f"line {lineno} (id {rid!r})"
                v = doc.get("vector")
                if not isinstance(v, list):
                    raise ImportFailed(f"{w}: vector must be a list of numbers")
                if len(v) != dim:
                    raise _dim_error(w, len(v), schema)
                where.append(w)
                ids.append(rid)
                vecs.append(v)
                metas.append(_meta(doc.get("metadata"), w, schema))
                texts.append(_text(doc.get("text"), w, schema))
                if len(ids) >= rows:
                    yield flush()
                    first += len(ids)
                    where, ids, vecs, metas, texts = [], [], [], [], []
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ImportFailed(f"could not read the file: {exc}") from None
    if ids:
        yield flush()


# -- Parquet ------------------------------------------------------------------------------------------------
def _parquet(path: Path, schema: Schema, rows: int) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        # buffered, not pre-buffered reads: memory is bounded by one row group's decoded columns, not the file
        pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise ImportFailed(f"not a readable Parquet file: {exc}") from None
    for g in range(pf.metadata.num_row_groups):
        group_bytes = pf.metadata.row_group(g).total_byte_size
        if group_bytes > MAX_ROW_GROUP_BYTES:
            raise ImportFailed(
                f"row group {g} holds {group_bytes} bytes uncompressed; imports read Parquet files whose row "
                f"groups are at most {MAX_ROW_GROUP_BYTES} bytes (write with a smaller row_group_size)"
            )
    arrow_schema = pf.schema_arrow
    names = arrow_schema.names
    if len(set(names)) != len(names):
        raise ImportFailed("the Parquet file has two columns with the same name")
    for required in ("id", "vector"):
        if required not in names:
            raise ImportFailed(f"the Parquet file has no {required!r} column (columns: {', '.join(names)})")
    field_cols = [n for n in names if n not in ("id", "vector", "metadata", "text")]
    for n in field_cols:
        if n not in schema.fields:
            raise ImportFailed(
                f"column {n!r} is neither id, vector, metadata, text nor a declared field of the collection"
            )
    id_type = arrow_schema.field("id").type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_integer(id_type)):
        raise ImportFailed(f"column 'id' must hold strings or integers, not {id_type}")
    vtype = arrow_schema.field("vector").type
    if not (pa.types.is_list(vtype) or pa.types.is_large_list(vtype) or pa.types.is_fixed_size_list(vtype)):
        raise ImportFailed(f"column 'vector' must be a list of numbers, not {vtype}")
    vvalue = vtype.value_type
    if not (pa.types.is_floating(vvalue) or pa.types.is_integer(vvalue)):
        raise ImportFailed(f"column 'vector' must hold numbers, not {vvalue}")
    meta_json = False
    if "metadata" in names:
        mtype = arrow_schema.field("metadata").type
        if pa.types.is_string(mtype) or pa.types.is_large_string(mtype):
            meta_json = True
        elif not (pa.types.is_struct(mtype) or pa.types.is_map(mtype)):
            raise ImportFailed(f"column 'metadata' must be a struct or a JSON string, not {mtype}")
    dim = schema.dimension
    first = 0
    try:
        for batch in pf.iter_batches(batch_size=rows):
            n = batch.num_rows
            raw_ids = batch.column("id").to_pylist()
            ids: list[str] = []
            where: list[str] = []
            for k, v in enumerate(raw_ids):
                rid = _id(v, f"row {first + k}")
                ids.append(rid)
                where.append(f"row {first + k} (id {rid!r})")
            vcol = batch.column("vector")
            if vcol.null_count:
                k = int(np.flatnonzero(vcol.is_null().to_numpy(zero_copy_only=False))[0])
                raise ImportFailed(f"{where[k]}: vector is missing")
            lengths = pc.list_value_length(vcol).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(lengths != dim)
            if len(bad):
                raise _dim_error(where[int(bad[0])], int(lengths[int(bad[0])]), schema)
            values = pc.list_flatten(vcol)
            with np.errstate(over="ignore"):
                flat = values.to_numpy(zero_copy_only=False).astype(np.float32)  # a null component: NaN
            vectors = flat.reshape(n, dim)
            _check_vectors(vectors, where, schema)
            metas: list[dict[str, Any] | None] = [None] * n
            if "metadata" in names:
                for k, md in enumerate(batch.column("metadata").to_pylist()):
                    if md is None:
                        continue
                    if meta_json:
                        try:
                            md = orjson.loads(md)
                        except orjson.JSONDecodeError as exc:
                            raise ImportFailed(f"{where[k]}: metadata is not valid JSON ({exc})") from None
                    elif isinstance(md, list):  # a map column: [(key, value), ...]
                        md = dict(md)
                    metas[k] = _meta(md, where[k], schema)
            for col in field_cols:
                for k, val in enumerate(batch.column(col).to_pylist()):
                    if val is None:
                        continue
                    md = dict(metas[k] or {})
                    if col in md:
                        raise ImportFailed(f"{where[k]}: {col} is given both as a column and in metadata")
                    md.update(_meta({col: val}, where[k], schema) or {})
                    metas[k] = md
            texts: list[str | None] = [None] * n
            if "text" in names:
                texts = [_text(t, where[k], schema) for k, t in enumerate(batch.column("text").to_pylist())]
            yield Chunk(first, where, ids, vectors, metas, texts)
            first += n
    except pa.ArrowException as exc:
        raise ImportFailed(f"could not read the Parquet file near row {first}: {exc}") from None


# -- NumPy --------------------------------------------------------------------------------------------------
class _NpyStream:
    """An .npy array read from a stream in row chunks (the header first; never the whole array)."""

    def __init__(self, fh: IO[bytes], what: str) -> None:
        fmt = np.lib.format
        try:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(fh)
            else:
                raise ImportFailed(f"{what}: .npy format version {version} is not supported")
        except ValueError as exc:
            raise ImportFailed(f"{what}: not a valid .npy array ({exc})") from None
        if dtype.hasobject:
            raise ImportFailed(f"{what}: arrays of Python objects are not accepted (they need pickle)")
        if fortran and len(shape) > 1:
            raise ImportFailed(f"{what}: Fortran-ordered arrays are not supported (save np.ascontiguousarray(a))")
        self.fh, self.what, self.shape, self.dtype = fh, what, tuple(shape), dtype
        self.row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1

    def read(self, n: int) -> np.ndarray:
        want = n * self.row_items * self.dtype.itemsize
        data = self.fh.read(want)
        if len(data) != want:
            raise ImportFailed(f"{self.what}: the file is truncated")
        return np.frombuffer(data, dtype=self.dtype).reshape((n, *self.shape[1:]))


def _vector_stream(fh: IO[bytes], what: str, schema: Schema) -> _NpyStream:
    s = _NpyStream(fh, what)
    if len(s.shape) != 2:
        raise ImportFailed(f"{what}: expected a 2-D array (rows x dimension), got shape {s.shape}")
    if s.dtype.kind not in "fiu":
        raise ImportFailed(f"{what}: expected numbers (float32 preferably), got dtype {s.dtype}")
    if s.shape[1] != schema.dimension:
        raise ImportFailed(f"{what}: vectors have dimension {s.shape[1]}, the collection has {schema.dimension}")
    return s


def _number_chunks(
    vs: _NpyStream, ids_of: Callable[[int, int], list[Any]], schema: Schema, rows: int
) -> Iterator[Chunk]:
    total = vs.shape[0]
    first = 0
    while first < total:
        n = min(rows, total - first)
        with np.errstate(over="ignore"):
            vectors = np.ascontiguousarray(vs.read(n), dtype=np.float32)
        ids = [_id(v, f"row {first + k}") for k, v in enumerate(ids_of(first, n))]
        where = [f"row {first + k} (id {rid!r})" for k, rid in enumerate(ids)]
        _check_vectors(vectors, where, schema)
        yield Chunk(first, where, ids, vectors, [None] * n, [None] * n)
        first += n


def _npy(path: Path, schema: Schema, rows: int) -> Iterator[Chunk]:
    with open(path, "rb") as fh:
        vs = _vector_stream(fh, "the .npy file", schema)
        yield from _number_chunks(vs, lambda a, n: [str(i) for i in range(a, a + n)], schema, rows)


def _npz(path: Path, schema: Schema, rows: int) -> Iterator[Chunk]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ImportFailed(f"not a readable .npz file: {exc}") from None
    with zf:
        members = set(zf.namelist())
        if not {"ids.npy", "vectors.npy"} <= members:
            have = ", ".join(sorted(m.removesuffix(".npy") for m in members)) or "none"
            raise ImportFailed(f"a .npz import needs arrays 'ids' and 'vectors' (np.savez(f, ids=…, vectors=…)); "
                               f"this one has: {have}")  # fmt: skip
        try:
            with zf.open("vectors.npy") as vfh, zf.open("ids.npy") as ifh:
                vs = _vector_stream(vfh, "vectors", schema)
                ids = _NpyStream(ifh, "ids")
                if len(ids.shape) != 1 or ids.shape[0] != vs.shape[0]:
                    raise ImportFailed(f"ids: expected a 1-D array of {vs.shape[0]} ids, got shape {ids.shape}")
                if ids.dtype.kind not in "USiu":
                    raise ImportFailed(f"ids: expected strings or integers, got dtype {ids.dtype}")

                def ids_of(first: int, n: int) -> list[Any]:
                    arr = ids.read(n)
                    if arr.dtype.kind == "S":
                        try:
                            return [b.decode() for b in arr.tolist()]
                        except UnicodeDecodeError:
                            raise ImportFailed(f"ids: an id near row {first} is not UTF-8") from None
                    return [str(x) if not isinstance(x, str) else x for x in arr.tolist()]

                yield from _number_chunks(vs, ids_of, schema, rows)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ImportFailed(f"could not read the .npz file: {exc}") from None


# -- duplicates ---------------------------------------------------------------------------------------------
def id_digests(ids: list[str]) -> np.ndarray:
    """64-bit digests of ids: duplicates across millions of rows are found from 8 bytes a row."""
    return np.frombuffer(b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids), dtype=np.uint64)


def duplicate_digests(parts: list[np.ndarray]) -> set[int]:
    if not parts:
        return set()
    d = np.sort(np.concatenate(parts))
    return {int(x) for x in d[1:][d[1:] == d[:-1]]}


def find_duplicate(chunks: Iterator[Chunk], suspects: set[int]) -> str | None:
    """The message for the first id that really appears twice (digest matches are confirmed on the ids)."""
    seen: dict[str, str] = {}
    for chunk in chunks:
        for rid, where, dig in zip(chunk.ids, chunk.where, id_digests(chunk.ids).tolist(), strict=True):
            if dig not in suspects:
                continue
            if rid in seen:
                return f"{where}: id {rid!r} appears more than once in the file (first at {seen[rid].split(' (')[0]})"
            seen[rid] = where
    return None

"""Metadata filters: ``compile_filter`` checks a filter document against the collection's fields and compiles it
into a ``Filter``, whose ``mask(segment, n)`` gives the matching rows < n as a boolean array; each operator asks
the segment's column for its rows (segment.py)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from services.core.errors import BadRequest

from .schema import MAX_IDS, CollectionConfig

_CMP = ("$gt", "$gte", "$lt", "$lte")
_FIELD_OPS = ("$eq", "$ne", "$in", "$nin", "$exists", "$not", *_CMP)


class Filter:
    """A compiled filter: ``mask(segment, n)`` gives the rows < n that match."""

    def mask(self, seg: Any, n: int) -> np.ndarray:
        raise NotImplementedError

    def matches_missing(self) -> bool:
        raise NotImplementedError


class _And(Filter):
    def __init__(self, parts: list[Filter]) -> None:
        self.parts = parts

    def mask(self, seg: Any, n: int) -> np.ndarray:
        m = np.ones(n, dtype=bool)
        for p in self.parts:
            m &= p.mask(seg, n)
        return m


class _Or(Filter):
    def __init__(self, parts: list[Filter]) -> None:
        self.parts = parts

    def mask(self, seg: Any, n: int) -> np.ndarray:
        m = np.zeros(n, dtype=bool)
        for p in self.parts:
            m |= p.mask(seg, n)
        return m


class _Not(Filter):
    def __init__(self, inner: Filter) -> None:
        self.inner = inner

    def mask(self, seg: Any, n: int) -> np.ndarray:
        return ~self.inner.mask(seg, n)


class _Op(Filter):
    def __init__(self, fname: str, op: str, value: Any) -> None:
        self.fname, self.op, self.value = fname, op, value

    def mask(self, seg: Any, n: int) -> np.ndarray:
        col = seg.columns[self.fname]
        op = self.op
        if op == "$eq":
            return col.eq(self.value, n)
        if op == "$ne":
            return ~col.eq(self.value, n)
        if op == "$in":
            return col.isin(self.value, n)
        if op == "$nin":
            return ~col.isin(self.value, n)
        if op == "$exists":
            m = col.exists(n)
            return m if self.value else ~m
        return col.cmp(op, self.value, n)


def _check_operand(ftype: str, op: str, v: Any, where: str) -> Any:
    if ftype == "json":
        if op != "$exists":
            raise BadRequest(f"filter {where}: json fields support only $exists", code="invalid_filter")
    if op == "$exists":
        if not isinstance(v, bool):
            raise BadRequest(f"filter {where}.$exists must be true or false", code="invalid_filter")
        return v
    if op in ("$in", "$nin"):
        if not isinstance(v, list) or len(v) > MAX_IDS:
            raise BadRequest(f"filter {where}.{op} must be a list (at most {MAX_IDS} values)", code="invalid_filter")
        return [_check_scalar(ftype, op, x, f"{where}.{op}[{i}]") for i, x in enumerate(v)]
    if op in _CMP:
        if ftype not in ("int", "float"):
            raise BadRequest(f"filter {where}: {op} needs a numeric field, {where} is {ftype}", code="invalid_filter")
    return _check_scalar(ftype, op, v, f"{where}.{op}")


def _check_scalar(ftype: str, op: str, v: Any, where: str) -> Any:
    if ftype in ("int", "float"):
        if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not math.isfinite(v)):
            raise BadRequest(f"filter {where}: expected a number for a {ftype} field", code="invalid_filter")
    elif ftype == "bool":
        if not isinstance(v, bool):
            raise BadRequest(f"filter {where}: expected a boolean", code="invalid_filter")
    elif ftype in ("string", "string[]"):
        if not isinstance(v, str):
            raise BadRequest(f"filter {where}: expected a string", code="invalid_filter")
    return v


def compile_filter(doc: Any, cfg: CollectionConfig, where: str = "filter") -> Filter:
    if not isinstance(doc, dict):
        raise BadRequest(f"{where} must be an object", code="invalid_filter")
    parts: list[Filter] = []
    for key, val in doc.items():
        if key in ("$and", "$or"):
            if not isinstance(val, list) or not val:
                raise BadRequest(f"{where}.{key} must be a non-empty list of filters", code="invalid_filter")
            subs = [compile_filter(x, cfg, f"{where}.{key}[{i}]") for i, x in enumerate(val)]
            parts.append(_And(subs) if key == "$and" else _Or(subs))
        elif key == "$not":
            parts.append(_Not(compile_filter(val, cfg, f"{where}.$not")))
        elif key.startswith("$"):
            raise BadRequest(f"{where}: unknown operator {key!r}", code="invalid_filter")
        else:
            f = cfg.fields.get(key)
            if f is None:
                raise BadRequest(f"{where}: unknown field {key!r}", code="invalid_filter")
            parts.append(_field_filter(f.name, f.type, val, f"{where}.{key}"))
    if len(parts) == 1:
        return parts[0]
    return _And(parts)


def _field_filter(fname: str, ftype: str, val: Any, where: str) -> Filter:
    if isinstance(val, dict) and any(isinstance(k, str) and k.startswith("$") for k in val):
        ops: list[Filter] = []
        for op, operand in val.items():
            if op not in _FIELD_OPS:
                raise BadRequest(f"filter {where}: unknown operator {op!r}", code="invalid_filter")
            if op == "$not":
                if not isinstance(operand, dict) or not operand:
                    raise BadRequest(f"filter {where}.$not must be an operator object", code="invalid_filter")
                ops.append(_Not(_field_filter(fname, ftype, operand, f"{where}.$not")))
                continue
            ops.append(_Op(fname, op, _check_operand(ftype, op, operand, where)))
        if not ops:
            raise BadRequest(f"filter {where}: empty operator object", code="invalid_filter")
        return ops[0] if len(ops) == 1 else _And(ops)
    return _Op(fname, "$eq", _check_operand(ftype, "$eq", val, where))

"""Metadata columns: batch appends (vectorized) give exactly what row-by-row appends give, and what reads,
filters, dumps and loads see."""

from __future__ import annotations

import random

import numpy as np
import pytest

from services.engine.segment import MISSING, concat_columns, load_column, new_column

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "", "ünï", "数据"]


def _value(kind: str, rng: random.Random):
    if rng.random() < 0.15:
        return None
    if kind == "string":
        return rng.choice(WORDS) + ("" if rng.random() < 0.7 else str(rng.randrange(50)))
    if kind == "string[]":
        return [rng.choice(WORDS) for _ in range(rng.randrange(4))]  # empty lists too
    if kind == "int":
        return rng.randrange(-(2**63), 2**63)
    if kind == "float":
        return rng.uniform(-1e9, 1e9)
    return rng.random() < 0.5


@pytest.mark.parametrize("kind", ["string", "string[]", "int", "float", "bool"])
def test_batch_appends_match_one_row_at_a_time(kind):
    rng = random.Random(kind)
    rows = [_value(kind, rng) for _ in range(600)]
    batched, single = new_column(kind), new_column(kind)
    for start in range(0, len(rows), 97):  # uneven batches, new strings arriving in later ones
        batched.append(rows[start : start + 97])
    for v in rows:
        single.append([v])
    n = len(rows)
    for i, v in enumerate(rows):
        want = MISSING if v is None else v
        assert batched.get(i) == want, (i, v)
        assert single.get(i) == want
    assert np.array_equal(batched.exists(n), np.array([v is not None for v in rows]))
    for probe in (rows[3], rows[10], "alpha", 7):
        if probe is None or isinstance(probe, list):
            continue
        try:
            want_eq = single.eq(probe, n)
        except (TypeError, ValueError):
            continue
        assert np.array_equal(batched.eq(probe, n), want_eq)
    # what a sealed segment stores and loads back
    meta, arrays = batched.dump(n)
    loaded = load_column(kind, meta, [np.array(a) for a in arrays])
    assert [loaded.get(i) for i in range(n)] == [batched.get(i) for i in range(n)]


def test_string_lists_filter_by_element_after_batches():
    col = new_column("string[]")
    col.append([["a", "b"], None, [], ["b"]])
    col.append([["c"], ["a", "c", "a"]])
    n = 6
    assert col.eq("a", n).tolist() == [True, False, False, False, False, True]
    assert col.isin(["b", "c"], n).tolist() == [True, False, False, True, True, True]
    assert col.get(1) is MISSING and col.get(2) == [] and col.get(5) == ["a", "c", "a"]
    merged = concat_columns([col, col.take(np.array([5, 0]))])
    assert [merged.get(i) for i in range(8)][-2:] == [["a", "c", "a"], ["a", "b"]]


def test_numeric_batch_with_and_without_missing_values():
    col = new_column("int")
    col.append([1, 2, 3])
    col.append([None, 5])
    assert [col.get(i) for i in range(5)] == [1, 2, 3, MISSING, 5]
    assert col.cmp("$gt", 1, 5).tolist() == [False, True, True, False, True]

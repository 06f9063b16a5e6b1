"""The C half of the engine's fast lane (services/engine/_fastlane.c, decision 011): its numbers are exactly
float32(the correctly rounded double), as the Python parsers give them, including the cases its shortcut hands to
strtod; its normalization and result building agree with the Python path's."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine import schema

fl = schema._fastlane


def test_the_extension_is_built_in_ci() -> None:
    """CI builds it (pip install -e); a build that silently fell back to Python would hide a slower engine."""
    if os.environ.get("CI") and fl is None:
        pytest.fail("services.engine._fastlane is not built")


pytestmark_native = pytest.mark.skipif(fl is None, reason="the C fast lane is not built")


def _parse(tokens: list[str]) -> np.ndarray | None:
    body = ('{"vector": [' + ", ".join(tokens) + "]}").encode()
    out = np.empty(len(tokens), dtype=np.float32)
    return out if fl.parse_single(body, len(tokens), out, schema.MAX_TOP_K) is not None else None


def _expected(tok: str) -> np.float32:
    with np.errstate(over="ignore"):
        return np.float32(float(tok))  # Python's float() is correctly rounded, as simdjson and orjson are


def _assert_same(tokens: list[str]) -> None:
    got = _parse(tokens)
    if got is None:  # only when the sum of squares reaches 1e76 (the Python parser's own limit)
        assert sum(float(t) ** 2 for t in tokens) >= 0.99e76, tokens
        return
    want = np.array([_expected(t) for t in tokens], dtype=np.float32)
    assert got.tobytes() == want.tobytes(), [(t, g, w) for t, g, w in zip(tokens, got, want, strict=True) if g != w]


@pytestmark_native
def test_numbers_as_json_writers_print_them() -> None:
    rng = np.random.default_rng(11)
    r = random.Random(11)
    toks: list[str] = []
    for _ in range(20_000):
        x = rng.standard_normal()
        toks.append(repr(float(x)))  # 17 significant digits (Python, orjson)
        toks.append(repr(float(np.float32(x))))  # a float32 sent as a double
        toks.append(f"{x * 10 ** r.randint(-44, 37):.{r.randrange(0, 25)}e}")
        toks.append(str(r.randint(-(10 ** r.randint(1, 25)), 10 ** r.randint(1, 25))))
        toks.append("0." + "0" * r.randrange(0, 45) + str(r.randrange(1, 10**20)))
    for i in range(0, len(toks), 500):
        _assert_same(toks[i : i + 500])


@pytestmark_native
def test_float32_midpoints_and_edges() -> None:
    """Doubles exactly halfway between two float32 values (round half to even), a hair either side of them, float32
    subnormals and the largest values: where the shortcut must hand over to strtod."""
    rng = np.random.default_rng(12)
    toks: list[str] = []
    for _ in range(5_000):
        f = np.float32(rng.standard_normal() * 10.0 ** rng.integers(-30, 30))
        mid = (float(f) + float(np.nextafter(f, np.float32(np.inf)))) / 2
        toks += [repr(mid), f"{mid:.40e}", repr(float(np.nextafter(mid, 0.0))), repr(float(np.nextafter(mid, 1e300)))]
    toks += ["1e-45", "1.4e-45", "7e-46", "1.1754943508222875e-38", "1.1754942e-38", "3e-39", "-0", "-0.0", "0e5"]
    toks += ["3.4028234663852886e+38", "1e38", "9.999999e37", "1" + "0" * 30, "0." + "9" * 40, "1" * 40 + ".5"]
    toks += ["123456789012345678901234567890e-25", "1.000000059604644775390625", "1.00000005960464477539062"]
    for i in range(0, len(toks), 400):
        _assert_same(toks[i : i + 400])


@pytestmark_native
@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e37, max_value=1e37), min_size=1))
def test_any_finite_double(xs: list[float]) -> None:
    _assert_same([repr(x) for x in xs])


@pytestmark_native
def test_unit_rows_matches_the_python_fallback_and_refuses_zero_rows() -> None:
    rng = np.random.default_rng(13)
    q = (rng.standard_normal((50, 384)) * 10.0 ** rng.integers(-30, 30, size=(50, 1))).astype(np.float32)
    c = q.copy()
    assert fl.unit_rows(c, 50, 384)
    q64 = q.astype(np.float64)
    want = (q64 / np.sqrt((q64 * q64).sum(axis=1))[:, None]).astype(np.float32)
    assert np.allclose(c, want, rtol=1e-6, atol=0)
    assert np.allclose(np.linalg.norm(c.astype(np.float64), axis=1), 1.0, atol=1e-6)
    z = q[:3].copy()
    z[1] = 0
    before = z.tobytes()
    assert not fl.unit_rows(z, 3, 384)
    assert z.tobytes() == before  # untouched


@pytestmark_native
def test_hits_skips_empty_and_non_finite_results_and_refuses_rows_out_of_range() -> None:
    from services.engine.idmap import PackedIds

    ids = PackedIds.from_list(["a", "ünï", "c"])
    blob, offs = ids.packed()
    dist = np.array([0.5, np.inf, 0.25, 0.1], dtype=np.float32)
    lab = np.array([1, 0, -1, 2], dtype=np.int64)
    assert fl.hits(dist, lab, 4, 3, blob, offs) == [
        {"id": "ünï", "score": 0.5},
        {"id": "c", "score": float(np.float32(0.1))},
    ]
    assert fl.hits(dist, lab, 2, 3, blob, offs) == [{"id": "ünï", "score": 0.5}]
    finite = np.array([0.5, 0.3, 0.25, 0.1], dtype=np.float32)
    assert fl.hits(finite, np.array([1, 3, 0, 0], dtype=np.int64), 4, 3, blob, offs) is None  # row 3 of 3 ids
    with pytest.raises(ValueError):
        fl.hits(dist, lab, 9, 3, blob, offs)


@pytestmark_native
@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_the_python_fallback_answers_as_the_c_path(make_engine, monkeypatch: pytest.MonkeyPatch, metric: str) -> None:
    """Where the extension is not built the engine runs the Python fast lane (``single_search`` +
    ``search_single``) and the numpy normalization: the same hits, scores equal to float32 rounding."""
    import orjson

    from .conftest import create, upsert

    eng = make_engine()
    coll = create(eng, "c", dim=16, metric=metric, index={"type": "hnsw"})
    rng = np.random.default_rng(14)
    upsert(coll, [{"id": f"r{i}", "vector": rng.standard_normal(16).tolist()} for i in range(400)])
    assert coll.seal()
    while eng.maintain_once():
        pass
    bodies = [orjson.dumps({"vector": rng.standard_normal(16).tolist(), "top_k": 7}) for _ in range(30)]
    native = [coll.search_native(b) for b in bodies]
    monkeypatch.setattr(schema, "_fastlane", None)
    for b, got in zip(bodies, native, strict=True):
        parsed = schema.single_search(b, 16)
        assert parsed is not None and got is not None
        want = coll.search_single(*parsed)
        assert want is not None
        assert [h["id"] for h in got] == [h["id"] for h in want]
        assert np.allclose([h["score"] for h in got], [h["score"] for h in want], rtol=1e-5, atol=1e-6)

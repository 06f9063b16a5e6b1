"""The compact id map (services/engine/idmap.py) against a plain dict model: upserts, replacements and deletes
across the growing segment, seals, builds, merges and restarts, with real and forced hash collisions."""

from __future__ import annotations

import numpy as np
import pytest

from services.engine import idmap
from services.engine.idmap import PackedIds

from .conftest import create, upsert


def test_packed_ids_round_trip() -> None:
    ids = ["a", "", "é-ü", "漢字-id", "x" * 300, "b"]
    p = PackedIds.from_list(ids)
    assert len(p) == 6 and list(p) == ids and p.tolist() == ids
    assert [p[i] for i in range(6)] == ids and p[-1] == "b" and p[1:4] == ids[1:4]
    assert PackedIds.from_list([]).tolist() == []
    assert p.nbytes < sum(len(s) + 50 for s in ids)


@pytest.mark.parametrize("collide", [False, True])
def test_id_map_agrees_with_a_dict_through_builds_and_restarts(make_engine, monkeypatch, collide: bool) -> None:
    if collide:  # a handful of hash values for every id: lookups must compare the ids themselves
        monkeypatch.setattr(idmap, "hash", lambda s: len(s) % 3 - 1, raising=False)
    rng = np.random.default_rng(5)
    eng = make_engine(seal_rows=150, max_segments=3)
    coll = create(eng, dim=4, metric="l2", fields=[{"name": "v", "type": "int"}])
    model: dict[str, int] = {}
    universe = [f"id-{i}" for i in range(400)] + ["é", "漢字", "x" * 40]

    def check(c) -> None:
        assert c.live_count() == len(model)
        ask = list(rng.choice(universe, 60, replace=False))
        got = {r["id"]: r["metadata"]["v"] for r in c.fetch({"ids": ask, "include_vectors": False})}
        assert got == {i: model[i] for i in ask if i in model}
        assert c.count({}) == len(model)

    step = 0
    for rnd in range(12):
        for _ in range(3):
            batch = list(dict.fromkeys(rng.choice(universe, int(rng.integers(1, 80))).tolist()))
            step += 1
            upsert(coll, [{"id": i, "vector": rng.standard_normal(4).tolist(), "metadata": {"v": step}} for i in batch])
            model.update(dict.fromkeys(batch, step))
            gone = list(dict.fromkeys(rng.choice(universe, int(rng.integers(0, 20))).tolist()))
            if gone:
                assert coll.delete({"ids": gone}) == sum(1 for i in gone if i in model)
                for i in gone:
                    model.pop(i, None)
            check(coll)
        coll.seal()  # its ids move to the packed tier now, before any build
        check(coll)
        batch = list(dict.fromkeys(rng.choice(universe, 30).tolist()))  # replace rows of the sealed segment
        step += 1
        upsert(coll, [{"id": i, "vector": rng.standard_normal(4).tolist(), "metadata": {"v": step}} for i in batch])
        model.update(dict.fromkeys(batch, step))
        gone = batch[:5] + list(rng.choice(universe, 5))
        assert coll.delete({"ids": list(dict.fromkeys(gone))}) == sum(1 for i in dict.fromkeys(gone) if i in model)
        for i in gone:
            model.pop(i, None)
        check(coll)
        while coll.maintain():  # builds, merges, compactions: entries move between the map's tiers
            check(coll)
        # every built row is in the packed tier; the dict holds at most the (empty) growing segment's rows
        assert len(coll.id_map.recent) <= coll.growing.n and len(coll.id_map._hashes) >= len(model) - coll.growing.n
        if rnd % 4 == 3:
            eng.close()
            eng = make_engine(seal_rows=150, max_segments=3)
            coll = eng.get("docs")
            check(coll)
    coll.delete({"filter": {"v": {"$lt": step // 2}}})
    model = {i: v for i, v in model.items() if v >= step // 2}
    check(coll)
    eng.wait_ready()
    check(coll)


def test_packed_ids_index_errors() -> None:
    p = PackedIds.from_list(["a", "b"])
    assert p[1] == "b" and p[-2] == "a"
    for bad in (2, -3):
        with pytest.raises(IndexError):
            p[bad]

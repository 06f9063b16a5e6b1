"""Durability and encryption at rest: WAL replay, torn tails, tampering, plaintext scan, restart equivalence."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from services.engine.crypto import CorruptionError

from .conftest import create, search_ids, upsert

FIELDS = [{"name": "note", "type": "string"}, {"name": "n", "type": "int"}]


def _fill(coll, X, start=0, note="x"):
    upsert(coll, [{"id": f"v{i}", "vector": X[i], "metadata": {"note": note, "n": i}} for i in range(start, len(X))])


def test_restart_replays_wal_and_segments(make_engine, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1200, 16)).astype(np.float32)
    eng = make_engine()
    coll = create(eng, metric="l2", index={"type": "hnsw"}, fields=FIELDS, text_field="body")
    _fill(coll, X[:800])
    eng.wait_ready()  # 800 rows sealed + persisted
    _fill(coll, X[:1200], start=800)  # 400 rows only in the WAL
    upsert(coll, [{"id": "v5", "vector": X[6], "metadata": {"note": "moved"}, "text": "hello"}])
    coll.delete({"ids": ["v10", "v900"]})
    before = [search_ids(coll, {"vector": X[i].tolist(), "top_k": 5}) for i in range(0, 1200, 97)]
    eng.close()
    eng2 = make_engine()
    c2 = eng2.get("docs")
    assert c2.live_count() == 1198
    assert c2.fetch({"ids": ["v5"]})[0]["metadata"] == {"note": "moved"}
    assert c2.fetch({"ids": ["v10", "v900"]}) == []
    after = [search_ids(c2, {"vector": X[i].tolist(), "top_k": 5}) for i in range(0, 1200, 97)]
    assert after == before
    # and again after the WAL has been folded into segments
    eng2.wait_ready()
    assert [search_ids(c2, {"vector": X[i].tolist(), "top_k": 5}) for i in range(0, 1200, 97)] == before
    eng2.close()
    eng3 = make_engine()
    assert eng3.get("docs").live_count() == 1198
    assert len(list((tmp_path / "data" / "collections").glob("*/wal-*.log"))) == 1


def _wal(tmp_path: Path) -> Path:
    wals = sorted((tmp_path / "data" / "collections").glob("*/wal-*.log"))
    assert wals
    return wals[-1]


def test_torn_wal_tail_is_dropped(make_engine, tmp_path):
    X = np.random.default_rng(1).standard_normal((30, 16)).astype(np.float32)
    eng = make_engine()
    coll = create(eng)
    for i in range(30):
        upsert(coll, [{"id": f"v{i}", "vector": X[i]}])
    eng.close()
    wal = _wal(tmp_path)
    size = wal.stat().st_size
    with open(wal, "r+b") as fh:  # the last record half-written
        fh.truncate(size - 100)
    eng2 = make_engine()
    c2 = eng2.get("docs")
    assert c2.live_count() == 29 and c2.torn_tail_dropped == 1
    upsert(c2, [{"id": "new", "vector": X[0]}])  # appends after the cut, not after the garbage
    eng2.close()
    with open(wal, "ab") as fh:  # zeros left by a crash after the file grew
        fh.write(b"\0" * 4096)
    eng3 = make_engine()
    assert eng3.get("docs").live_count() == 30


def test_tampered_wal_record_is_detected(make_engine, tmp_path):
    X = np.random.default_rng(2).standard_normal((10, 16)).astype(np.float32)
    eng = make_engine()
    coll = create(eng)
    for i in range(10):
        upsert(coll, [{"id": f"v{i}", "vector": X[i]}])
    eng.close()
    wal = _wal(tmp_path)
    data = bytearray(wal.read_bytes())
    data[40] ^= 0x01  # inside the first record: CRC mismatch followed by more records
    wal.write_bytes(bytes(data))
    with pytest.raises(CorruptionError):
        make_engine()


def test_tampered_wal_with_fixed_crc_is_detected(make_engine, tmp_path):
    import struct
    import zlib

    X = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    eng = make_engine()
    coll = create(eng)
    for i in range(3):
        upsert(coll, [{"id": f"v{i}", "vector": X[i]}])
    eng.close()
    wal = _wal(tmp_path)
    data = bytearray(wal.read_bytes())
    length, _ = struct.unpack_from("<II", data, 0)
    data[8 + 20] ^= 0xFF
    struct.pack_into("<II", data, 0, length, zlib.crc32(bytes(data[8 : 8 + length])))
    wal.write_bytes(bytes(data))
    with pytest.raises(CorruptionError):
        make_engine()


@pytest.mark.parametrize("target", ["seg", "MANIFEST", "catalog"])
def test_tampered_files_are_detected(make_engine, tmp_path, target):
    X = np.random.default_rng(3).standard_normal((300, 16)).astype(np.float32)
    eng = make_engine()
    coll = create(eng, fields=FIELDS)
    _fill(coll, X)
    eng.wait_ready()
    eng.close()
    data_dir = tmp_path / "data"
    path = {
        "seg": next(data_dir.glob("collections/*/seg-*.enc")),
        "MANIFEST": next(data_dir.glob("collections/*/MANIFEST.enc")),
        "catalog": data_dir / "catalog.enc",
    }[target]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptionError):
        make_engine()


def test_swapped_segment_files_are_detected(make_engine, tmp_path):
    X = np.random.default_rng(4).standard_normal((300, 16)).astype(np.float32)
    eng = make_engine()
    a = create(eng, name="a", fields=FIELDS)
    b = create(eng, name="b", fields=FIELDS)
    _fill(a, X)
    _fill(b, X)
    eng.wait_ready()
    eng.close()
    sa = next((tmp_path / "data" / "collections" / a.cfg.cid).glob("seg-*.enc"))
    sb = next((tmp_path / "data" / "collections" / b.cfg.cid).glob("seg-*.enc"))
    sa.write_bytes(sb.read_bytes())  # a valid file of another collection
    with pytest.raises(CorruptionError):
        make_engine()


def test_wrong_key_cannot_read(make_engine, tmp_path):
    eng = make_engine()
    create(eng)
    eng.close()
    with pytest.raises(CorruptionError):
        make_engine(k=os.urandom(32))


def test_no_plaintext_under_the_data_dir(make_engine, tmp_path):
    secret = "CONFIDENTIAL-ZEBRA-7731"
    rng = np.random.default_rng(9)
    X = rng.standard_normal((400, 16)).astype(np.float32)
    eng = make_engine()
    coll = create(eng, metric="l2", index={"type": "hnsw"}, fields=FIELDS, text_field="body")
    upsert(
        coll,
        [
            {"id": f"v{i}", "vector": X[i], "metadata": {"note": f"{secret}-{i}", "n": i}, "text": f"{secret} text {i}"}
            for i in range(300)
        ],
    )
    eng.wait_ready()  # some rows in segment files, others only in the WAL
    upsert(coll, [{"id": f"v{i}", "vector": X[i], "metadata": {"note": f"{secret}-{i}"}} for i in range(300, 400)])
    from services.core.objectstore import LocalObjectStore

    eng.snapshot(LocalObjectStore(tmp_path / "data" / "snapshots"))  # snapshots too
    needles = [secret.encode()]
    for i in (0, 150, 299, 350, 399):
        needles.append(X[i].astype("<f4").tobytes()[:32])
        needles.append(X[i].astype("<f2").tobytes()[:16])
        unit = (X[i] / np.linalg.norm(X[i])).astype("<f4")
        needles.append(unit.tobytes()[:32])
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert any(p.name.startswith("seg-") for p in files) and any(p.name.startswith("wal-") for p in files)
    for p in files:
        blob = p.read_bytes()
        for needle in needles:
            assert needle not in blob, f"plaintext found in {p}"

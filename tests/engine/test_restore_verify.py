"""Restore checks every snapshot file against the digest its (authenticated) index records, while the collections
load: a damaged file the engine itself would accept (a WAL whose last record is cut, which replay takes for a torn
tail) fails the whole restore, leaves the engine empty, and a good snapshot restores afterwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.core.errors import Unprocessable
from services.core.objectstore import open_object_store

from .conftest import create, search_ids, upsert


def test_a_damaged_snapshot_file_fails_the_restore_and_leaves_nothing_behind(make_engine, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    X = rng.standard_normal((40, 8)).astype(np.float32)
    src = make_engine(tmp_path / "src")
    a = create(src, name="alpha", dim=8)
    upsert(a, [{"id": f"a{i}", "vector": X[i]} for i in range(20)])
    src.wait_ready()
    upsert(a, [{"id": f"a{i}", "vector": X[i]} for i in range(20, 30)])  # in the WAL only
    b = create(src, name="beta", dim=8, metric="l2")
    upsert(b, [{"id": f"b{i}", "vector": X[i]} for i in range(30, 40)])
    src.snapshot(open_object_store(f"file://{tmp_path / 'snap'}"))
    expected = [search_ids(a, {"vector": X[25].tolist(), "top_k": 3}), a.live_count(), b.live_count()]

    wal = next(
        p
        for p in (tmp_path / "snap" / "files" / "collections" / a.cfg.cid).iterdir()
        if p.name.startswith("wal-") and p.stat().st_size > 0
    )
    good = wal.read_bytes()
    wal.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))  # same size; replay alone would drop that record

    dst = make_engine(tmp_path / "dst")
    with pytest.raises(Unprocessable) as err:
        dst.restore(open_object_store(f"file://{tmp_path / 'snap'}"))
    assert err.value.code == "snapshot_invalid" and wal.name in str(err.value)
    assert dst.collections == {}
    assert not (tmp_path / "dst" / "catalog.enc").exists()
    assert list((tmp_path / "dst" / "collections").iterdir()) == []
    assert [p.name for p in (tmp_path / "dst").iterdir() if p.name.startswith(".restore-")] == []

    wal.write_bytes(good)
    done = dst.restore(open_object_store(f"file://{tmp_path / 'snap'}"))
    assert sorted(done["collections"]) == ["alpha", "beta"] and done["vector_count"] == 40
    ra, rb = dst.get("alpha"), dst.get("beta")
    assert [search_ids(ra, {"vector": X[25].tolist(), "top_k": 3}), ra.live_count(), rb.live_count()] == expected


def test_chunked_files_decrypt_in_place_and_every_damage_is_refused(tmp_path: Path) -> None:
    """read_file decrypts each chunk straight into the result (restore and open read every segment this way)."""
    import os

    from services.engine.crypto import CHUNK, CorruptionError, DataCipher

    cipher = DataCipher(os.urandom(32))
    data = os.urandom(2 * CHUNK + 12345)  # three chunks, the last one short
    path = tmp_path / "f.enc"
    cipher.write_file(path, [data[:1000], data[1000:]], b"aad")
    assert cipher.read_file(path, b"aad").tobytes() == data
    good = path.read_bytes()
    damaged = {
        "truncated": good[:-1],
        "cut after a chunk": good[: len(good) - (12345 + 16 + 4)],
        "trailing bytes": good + b"\0",
        "flipped": good[:100] + bytes([good[100] ^ 1]) + good[101:],
    }
    for what, blob in damaged.items():
        path.write_bytes(blob)
        try:
            cipher.read_file(path, b"aad")
        except CorruptionError:
            continue
        raise AssertionError(f"{what}: read without an error")
    path.write_bytes(good)
    with pytest.raises(CorruptionError):
        cipher.read_file(path, b"other aad")

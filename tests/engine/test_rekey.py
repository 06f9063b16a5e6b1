"""Online re-key (services/engine/rekey.py): a new data key, every file re-encrypted while the engine serves;
crash and resume; snapshots and restore; replication across the switch; the HTTP contract; secrets over stdin."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from services.core.errors import Conflict, Unprocessable
from services.core.objectstore import open_object_store
from services.engine.crypto import CorruptionError, DataCipher, key_id
from services.engine.engine import Engine
from services.engine.server import EngineApp
from services.engine.wal import read_wal

from .conftest import ROOT, TOKEN, EngineProcess, create, free_port, search_ids, upsert

DIM = 16
FIELDS = [{"name": "g", "type": "string"}]


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


# --- helpers ---------------------------------------------------------------------------------------------------
def encrypted_files(data_dir: Path) -> list[Path]:
    """Every file the engine keeps encrypted (not the plain epoch file, not staging folders or temp files)."""
    out = [data_dir / n for n in ("catalog.enc", "replica.enc") if (data_dir / n).exists()]
    for cdir in sorted((data_dir / "collections").iterdir()):
        out += [p for p in sorted(cdir.iterdir()) if not p.name.startswith(".")]
    return out


def opens_with(data_dir: Path, path: Path, key: bytes) -> bool | None:
    """Whether a cipher holding only ``key`` opens the file; None for an empty log (no key involved)."""
    cipher = DataCipher(key)
    aad = b"vecta|" + path.relative_to(data_dir).as_posix().encode()
    try:
        if path.name.endswith(".log"):
            payloads, _, torn = read_wal(path, cipher, aad)
            assert not torn
            return True if payloads else None
        cipher.read_file(path, aad)
        return True
    except CorruptionError:
        return False


def assert_all_under(data_dir: Path, new: bytes, old: bytes) -> int:
    files = encrypted_files(data_dir)
    assert files
    checked = 0
    for p in files:
        with_new = opens_with(data_dir, p, new)
        if with_new is None:
            continue
        assert with_new, f"{p.name} does not open with the new key"
        assert opens_with(data_dir, p, old) is False, f"{p.name} still opens with the old key"
        checked += 1
    return checked


def populate(eng: Engine, rng: np.random.Generator) -> np.ndarray:
    X = rng.standard_normal((1400, DIM)).astype(np.float32)
    a = create(eng, name="alpha", dim=DIM, metric="l2", index={"type": "hnsw"}, fields=FIELDS, text_field="body")
    b = create(eng, name="beta", dim=DIM, metric="cosine", index={"type": "flat"})
    upsert(a, [{"id": f"a{i}", "vector": X[i], "metadata": {"g": "xy"[i % 2]}, "text": f"doc {i}"} for i in range(800)])
    eng.wait_ready()  # a persisted, indexed segment
    upsert(a, [{"id": f"a{i}", "vector": X[i], "metadata": {"g": "z"}} for i in range(800, 1000)])
    a.seal()  # a sealed segment not yet built, and a second WAL
    upsert(a, [{"id": f"a{i}", "vector": X[i], "metadata": {"g": "w"}} for i in range(1000, 1200)])  # WAL only
    a.delete({"ids": ["a3", "a1100"]})
    upsert(b, [{"id": f"b{i}", "vector": X[i]} for i in range(300)])
    return X


def answers(eng: Engine, X: np.ndarray) -> list:
    a, b = eng.get("alpha"), eng.get("beta")
    out: list = [sorted(a.fetch({"ids": ["a0", "a3", "a900", "a1150"], "include_vectors": True}), key=str)]
    for q in X[:5]:
        out.append(search_ids(a, {"vector": q.tolist(), "top_k": 10, "params": {"ef": 400}}))
        out.append(search_ids(a, {"vector": q.tolist(), "top_k": 5, "filter": {"g": "z"}}))
        out.append(search_ids(b, {"vector": q.tolist(), "top_k": 10}))
    out.append(a.count({}))
    out.append(b.count({}))
    return out


def wait_rekey(eng: Engine, timeout: float = 60.0) -> dict:
    eng.rekeyer.join(timeout)
    st = eng.rekey_status()
    assert st["state"] in ("done", "failed"), st
    return st


def open_engine(data_dir: Path, key: bytes, previous: tuple[bytes, ...] = ()) -> Engine:
    from services.engine.collection import Settings

    eng = Engine(data_dir, key, Settings(idle_seal_seconds=3600.0), previous)
    eng.open(background=False)
    return eng


# --- the key ring ------------------------------------------------------------------------------------------------
def test_key_ring_reads_old_writes_new(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    c_old = DataCipher(old)
    blob = c_old.seal(b"hello", b"aad")
    c_old.write_file(tmp_path / "f.enc", [b"x" * 10_000_000], b"f")  # three chunks
    ring = DataCipher(new, [old])
    assert ring.open(blob, b"aad") == b"hello"
    assert ring.read_file(tmp_path / "f.enc", b"f").tobytes() == b"x" * 10_000_000
    assert not ring.file_is_current(tmp_path / "f.enc", b"f")
    tmp = ring.reencrypt_file(tmp_path / "f.enc", b"f")
    os.replace(tmp, tmp_path / "f.enc")
    assert ring.file_is_current(tmp_path / "f.enc", b"f")
    assert DataCipher(new).read_file(tmp_path / "f.enc", b"f").tobytes() == b"x" * 10_000_000
    with pytest.raises(CorruptionError):
        DataCipher(old).read_file(tmp_path / "f.enc", b"f")
    assert DataCipher(new).open(ring.seal(b"z", b"a"), b"a") == b"z"
    with pytest.raises(CorruptionError):
        DataCipher(os.urandom(32), [os.urandom(32)]).open(blob, b"aad")
    assert ring.key_ids() == [key_id(new), key_id(old)] and key_id(new) != key_id(old)
    ring.rotate(old)  # back and forth: the ring keeps whichever key is not current
    assert ring.key_ids() == [key_id(old), key_id(new)]
    assert ring.drop_previous() == [new] and not ring.has_previous


# --- the engine ----------------------------------------------------------------------------------------------
def test_rekey_rewrites_every_file_and_answers_stay(make_engine, tmp_path: Path, key: bytes) -> None:
    eng = make_engine()
    rng = np.random.default_rng(3)
    X = populate(eng, rng)
    before = answers(eng, X)
    new = os.urandom(32)
    st = eng.rekey(new)
    assert st["state"] in ("running", "done") and st["key_id"] == key_id(new)
    st = wait_rekey(eng)
    assert st["state"] == "done" and st["error"] is None
    assert st["files_total"] == st["files_done"] >= 7 and st["files_rewritten"] >= 7
    assert not eng.cipher.has_previous  # the old key is gone from memory
    assert answers(eng, X) == before
    # writes after the re-key, then a restart with the new key alone
    upsert(create(eng, name="gamma", dim=DIM), [{"id": "late", "vector": X[0]}])
    assert assert_all_under(tmp_path / "data", new, key) >= 7
    eng.close()
    again = open_engine(tmp_path / "data", new)
    try:
        assert answers(again, X) == before
        assert again.get("gamma").fetch({"ids": ["late"]})[0]["id"] == "late"
        # the key that is current, with nothing left under another: done at once, nothing rewritten
        st = again.rekey(new)
        assert st["state"] == "done" and st["files_rewritten"] == 0
    finally:
        again.close()
    with pytest.raises(CorruptionError):
        open_engine(tmp_path / "data", key)  # the old key alone no longer opens it


def test_writes_during_rekey_survive(make_engine, tmp_path: Path, key: bytes) -> None:
    eng = make_engine(seal_rows=150)
    rng = np.random.default_rng(5)
    X = populate(eng, rng)
    new = os.urandom(32)
    gate = threading.Event()
    eng.rekeyer.hook = lambda rel: time.sleep(0.02)  # slow it down: writes, seals and builds interleave
    acked: dict[str, int] = {}
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            a = eng.get("alpha")
            i = 0
            while not gate.is_set() or i < 40:
                ids = [f"w{(i * 7 + j) % 500}" for j in range(5)]
                upsert(a, [{"id": rid, "vector": X[i % 100] + i, "metadata": {"g": str(i)}} for rid in ids])
                for rid in ids:
                    acked[rid] = i
                if i % 9 == 0:
                    a.delete({"ids": [f"w{(i * 3) % 500}"]})
                    acked.pop(f"w{(i * 3) % 500}", None)
                if i % 10 == 0:
                    eng.maintain_once()  # seals (new WAL files) and builds (new segment files)
                i += 1
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.05)
    eng.rekey(new)
    st = wait_rekey(eng)
    gate.set()
    t.join(60)
    assert not errors and st["state"] == "done", (errors, st)
    expected = {rid: eng.get("alpha").fetch({"ids": [rid]}) for rid in acked}
    assert all(expected.values())
    eng.close()
    again = open_engine(tmp_path / "data", new)
    try:
        a = again.get("alpha")
        for rid, i in acked.items():
            rec = a.fetch({"ids": [rid]})
            assert rec and rec[0]["metadata"]["g"] == str(i), rid
        assert a.count({}) == len(acked) + 1198
    finally:
        again.close()
    # writes that went on after the re-key finished were under the new key too
    assert assert_all_under(tmp_path / "data", new, key) >= 7


def test_crash_midway_then_resume(make_engine, tmp_path: Path, key: bytes, monkeypatch) -> None:
    eng = make_engine()
    rng = np.random.default_rng(7)
    X = populate(eng, rng)
    before = answers(eng, X)
    new = os.urandom(32)
    done: list[str] = []

    def crash_after_4(rel: str) -> None:
        done.append(rel)
        if len(done) == 4:
            raise RuntimeError("simulated crash")

    eng.rekeyer.hook = crash_after_4
    eng.rekey(new)
    st = wait_rekey(eng)
    assert st["state"] == "failed" and "simulated crash" in st["error"] and st["files_done"] == 4
    upsert(eng.get("beta"), [{"id": "b0", "vector": X[0]}])  # the same record again, in a WAL with both keys
    upsert(create(eng, name="gamma", dim=DIM), [{"id": "after-switch", "vector": X[1]}])
    eng.close()  # abandoned mid-way; a stray temp file as a kill -9 would leave one
    cdir = next((tmp_path / "data" / "collections").iterdir())
    (cdir / ".tmp-seg-00000001.enc-1-abcd").write_bytes(b"partial")
    (tmp_path / "data" / ".tmp-catalog.enc-1-abcd").write_bytes(b"partial")

    with pytest.raises(CorruptionError):  # neither key alone opens a half re-keyed dir
        open_engine(tmp_path / "data", new)
    resumed = open_engine(tmp_path / "data", new, (key,))
    try:
        assert answers(resumed, X) == before
        assert resumed.get("gamma").count({}) == 1
        # a crash inside a file's rewrite: the move never happens, the file stays whole under the old key
        import services.engine.rekey as rekey_mod

        calls = {"n": 0}
        real_commit = rekey_mod.commit_file

        def flaky_commit(tmp: Path, path: Path) -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("simulated crash before the rename")
            real_commit(tmp, path)

        monkeypatch.setattr(rekey_mod, "commit_file", flaky_commit)
        resumed.rekey(new)
        st = wait_rekey(resumed)
        assert st["state"] == "failed" and "simulated crash before the rename" in st["error"]
        assert not [p for p in cdir.iterdir() if p.name.startswith(".tmp-") and p.read_bytes() != b"partial"]
        monkeypatch.setattr(rekey_mod, "commit_file", real_commit)
        # the control plane asks again with the same key: the job finishes
        resumed.rekey(new)
        st = wait_rekey(resumed)
        assert st["state"] == "done" and not resumed.cipher.has_previous
        assert answers(resumed, X) == before
    finally:
        resumed.close()
    assert assert_all_under(tmp_path / "data", new, key) >= 7
    final = open_engine(tmp_path / "data", new)
    try:
        assert answers(final, X) == before
        assert not list(cdir.glob(".tmp-*")) and not list((tmp_path / "data").glob(".tmp-*"))
    finally:
        final.close()


def test_rekey_is_idempotent_and_exclusive(make_engine) -> None:
    eng = make_engine()
    rng = np.random.default_rng(9)
    populate(eng, rng)
    new, other = os.urandom(32), os.urandom(32)
    release = threading.Event()
    eng.rekeyer.hook = lambda rel: release.wait(30)
    first = eng.rekey(new)
    assert first["state"] == "running"
    again = eng.rekey(new)  # the same key: its progress, not a restart
    assert again["state"] == "running" and again["key_id"] == key_id(new)
    with pytest.raises(Conflict):
        eng.rekey(other)
    release.set()
    st = wait_rekey(eng)
    assert st["state"] == "done"
    assert eng.rekey(new) == st  # done already: reported, not run again
    st2 = eng.rekey(other)  # a further rotation once the first finished
    assert st2["state"] == "running"
    assert wait_rekey(eng)["state"] == "done" and eng.cipher.key_id == key_id(other)


def test_snapshots_follow_the_key_and_restore_takes_older_keys(make_engine, tmp_path: Path, key: bytes) -> None:
    eng = make_engine()
    rng = np.random.default_rng(11)
    X = populate(eng, rng)
    before = answers(eng, X)
    old_snap = open_object_store(f"file://{tmp_path / 'snap-old'}")
    assert eng.snapshot(old_snap)["key_ids"] == [key_id(key)]
    new = os.urandom(32)
    eng.rekey(new)
    wait_rekey(eng)
    new_snap = open_object_store(f"file://{tmp_path / 'snap-new'}")
    assert eng.snapshot(new_snap)["key_ids"] == [key_id(new)]
    # the snapshot taken after the re-key: its files and index are under the new key only
    for p in (tmp_path / "snap-new").rglob("*"):
        if p.is_file() and p.name.startswith("seg-"):
            rel = p.relative_to(tmp_path / "snap-new" / "files").as_posix().encode()
            with pytest.raises(CorruptionError):
                DataCipher(key).read_file(p, b"vecta|" + rel)
            DataCipher(new).read_file(p, b"vecta|" + rel)
    r1 = make_engine(tmp_path / "r1", k=new)
    r1.restore(new_snap)
    assert answers(r1, X) == before
    # an older snapshot needs its own key: without it, refused; with it in the ring, restored under the current key
    r2 = make_engine(tmp_path / "r2", k=new)
    with pytest.raises(Unprocessable):
        r2.restore(old_snap)
    r2.restore(old_snap, [key])
    assert answers(r2, X) == before
    r2.close()
    assert assert_all_under(tmp_path / "r2", new, key) >= 7
    r3 = open_engine(tmp_path / "r2", new)  # everything it installed is under its own key
    try:
        assert answers(r3, X) == before
    finally:
        r3.close()


def test_snapshot_during_rekey_needs_both_keys(make_engine, tmp_path: Path, key: bytes) -> None:
    eng = make_engine()
    rng = np.random.default_rng(13)
    X = populate(eng, rng)
    before = answers(eng, X)
    new = os.urandom(32)
    release = threading.Event()
    seen: list[str] = []

    def hold(rel: str) -> None:
        seen.append(rel)
        if len(seen) == 3:
            release.wait(30)

    eng.rekeyer.hook = hold
    eng.rekey(new)
    while len(seen) < 3:
        time.sleep(0.01)
    store = open_object_store(f"file://{tmp_path / 'snap-mid'}")
    assert eng.snapshot(store)["key_ids"] == [key_id(new), key_id(key)]
    release.set()
    assert wait_rekey(eng)["state"] == "done"
    r = make_engine(tmp_path / "r", k=new)
    with pytest.raises(Unprocessable):
        r.restore(store)
    r.restore(store, [key])
    assert answers(r, X) == before


# --- HTTP ------------------------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_http_contract(app_client, caplog) -> None:
    client, eng = app_client
    populate(eng, np.random.default_rng(15))
    caplog.set_level(logging.DEBUG)
    r = await client.get("/internal/rekey")
    assert r.status_code == 200
    assert r.json() == {
        "state": "idle",
        "files_total": 0,
        "files_done": 0,
        "files_rewritten": 0,
        "error": None,
        "key_id": eng.cipher.key_id,
    }
    short = b64(os.urandom(31))
    bad = [
        ({"data_key": "not base64!!"}, "body.data_key is not valid base64"),
        ({"data_key": short}, "body.data_key must decode to 32 bytes, got 31"),
        ({"data_key": 12}, "body.data_key must be a base64 string"),
        ({}, "body.data_key is required"),
    ]
    for body, msg in bad:
        r = await client.post("/internal/rekey", json=body)
        assert r.status_code == 422, r.text
        assert msg in r.json()["detail"] and short not in r.text
    r = await client.post("/internal/rekey", json={"data_key": b64(os.urandom(32)), "extra": 1})
    assert r.status_code == 400 and r.json()["code"] == "unknown_field"
    new, other = os.urandom(32), os.urandom(32)
    release = threading.Event()
    eng.rekeyer.hook = lambda rel: release.wait(30)
    r = await client.post("/internal/rekey", json={"data_key": b64(new)})
    assert r.status_code == 202 and r.json()["state"] == "running"
    assert set(r.json()) >= {"state", "files_total", "files_done"}
    r = await client.post("/internal/rekey", json={"data_key": b64(new)})
    assert r.status_code == 202 and r.json()["state"] == "running"
    r = await client.post("/internal/rekey", json={"data_key": b64(other)})
    assert r.status_code == 409 and r.json()["code"] == "rekey_in_progress"
    # searches and writes go on meanwhile
    r = await client.post("/v1/collections/beta/upsert", json={"records": [{"id": "x", "vector": [1.0] * DIM}]})
    assert r.status_code == 200
    r = await client.post("/v1/collections/beta/search", json={"vector": [1.0] * DIM, "top_k": 1})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "x"
    stats = (await client.get("/internal/stats")).json()
    assert stats["rekey"]["state"] == "running"
    release.set()
    eng.rekeyer.join(30)
    r = await client.get("/internal/rekey")
    body = r.json()
    assert body["state"] == "done" and body["files_done"] == body["files_total"] > 0 and body["error"] is None
    r = await client.post("/internal/rekey", json={"data_key": b64(new)})
    assert r.status_code == 202 and r.json()["state"] == "done"
    r = await client.post("/internal/rekey", json={"data_key": b64(new)}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    for k in (new, other):
        assert b64(k) not in caplog.text and k.hex() not in caplog.text


@pytest.mark.asyncio
async def test_http_restore_with_an_older_key(make_engine, tmp_path: Path, key: bytes) -> None:
    src = make_engine(tmp_path / "src")
    X = populate(src, np.random.default_rng(17))
    before = answers(src, X)
    src.snapshot(open_object_store(f"file://{tmp_path / 'snap'}"))
    new = os.urandom(32)
    dst = make_engine(tmp_path / "dst", k=new)
    asgi = EngineApp(dst, TOKEN, manage_lifespan=False)
    transport = httpx.ASGITransport(app=asgi)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://e", headers=headers) as c:
        uri = f"file://{tmp_path / 'snap'}"
        r = await c.post("/internal/restore", json={"uri": uri})
        assert r.status_code == 422 and r.json()["code"] == "snapshot_invalid"
        r = await c.post("/internal/restore", json={"uri": uri, "data_keys": ["zz"]})
        assert r.status_code == 422 and "body.data_keys[0]" in r.json()["detail"]
        r = await c.post("/internal/restore", json={"uri": uri, "data_keys": [b64(key)]})
        assert r.status_code == 200, r.text
    asgi.shutdown_pools()
    assert answers(dst, X) == before


# --- the command line: secrets over stdin -----------------------------------------------------------------------
def _spawn_stdin(data_dir: Path, line: bytes) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VECTA_ENGINE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.engine", "serve", "--secrets-stdin", "--data-dir", str(data_dir),
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(line)
    proc.stdin.flush()  # left open: the engine must not wait for EOF, and reopens its stdin on /dev/null
    return proc, port


def _wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"engine exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("engine did not start")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for fh in (proc.stdin, proc.stderr):
        if fh is not None:
            fh.close()


def test_serve_secrets_stdin_then_rekey_over_http(tmp_path: Path, key: bytes) -> None:
    # a data dir left half re-keyed (as after a crash): it needs both keys
    data = tmp_path / "data"
    eng = open_engine(data, key)
    X = populate(eng, np.random.default_rng(19))
    before_count = eng.get("alpha").count({})
    new = os.urandom(32)
    eng.rekeyer.hook = lambda rel: (_ for _ in ()).throw(RuntimeError("crash"))
    eng.rekey(new)
    wait_rekey(eng)
    eng.close()
    line = json.dumps({"token": TOKEN, "data_key": b64(new), "previous_data_keys": [b64(key)]}).encode() + b"\n"
    proc, port = _spawn_stdin(data, line)
    try:
        _wait_healthy(proc, port)
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        for secret in (b64(new), b64(key), TOKEN):
            assert secret.encode() not in environ
        assert os.readlink(f"/proc/{proc.pid}/fd/0") == "/dev/null"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            assert c.get("/internal/stats").status_code == 200
            assert httpx.get(f"http://127.0.0.1:{port}/internal/stats").status_code == 401
            r = c.post("/v1/collections/alpha/count", json={})
            assert r.status_code == 200 and r.json()["count"] == before_count
            r = c.post("/internal/rekey", json={"data_key": b64(new)})
            assert r.status_code == 202, r.text
            deadline = time.monotonic() + 60
            while c.get("/internal/rekey").json()["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.get("/internal/rekey").json()["state"] == "done"
            r = c.post("/v1/collections/alpha/search", json={"vector": X[0].tolist(), "top_k": 3})
            assert r.status_code == 200 and len(r.json()["results"]) == 3
    finally:
        _stop(proc)
    assert assert_all_under(data, new, key) >= 7
    # only the new key now
    proc, port = _spawn_stdin(data, json.dumps({"token": TOKEN, "data_key": b64(new)}).encode() + b"\n")
    try:
        _wait_healthy(proc, port)
    finally:
        _stop(proc)


def test_serve_secrets_stdin_refuses_bad_lines_without_echo(tmp_path: Path) -> None:
    secret = b64(os.urandom(31))
    for line in (
        b"not json " + secret.encode() + b"\n",
        json.dumps({"token": TOKEN, "data_key": secret}).encode() + b"\n",
        json.dumps({"token": TOKEN, "data_key": b64(os.urandom(32)), "previous_data_keys": secret}).encode() + b"\n",
        json.dumps({"data_key": b64(os.urandom(32))}).encode() + b"\n",
        b"\n",
    ):
        proc, _ = _spawn_stdin(tmp_path / "data", line)
        try:
            assert proc.wait(30) == 2
            err = proc.stderr.read().decode()  # type: ignore[union-attr]
            assert "refusing to start" in err and secret not in err and TOKEN not in err
        finally:
            _stop(proc)


def test_serve_env_secrets_leave_the_environment(tmp_path: Path, key: bytes) -> None:
    old = os.urandom(32)
    proc = EngineProcess(tmp_path / "data", key, env={"VECTA_ENGINE_PREVIOUS_DATA_KEYS": f"{b64(old)},{b64(old)}"})
    proc.start()
    try:
        assert proc.proc is not None
        environ = Path(f"/proc/{proc.proc.pid}/environ").read_bytes()
        assert b64(key).encode() not in environ and b64(old).encode() not in environ
        assert TOKEN.encode() not in environ
        with proc.client() as c:
            assert c.get("/internal/rekey").json()["state"] == "idle"
    finally:
        proc.stop()


# --- replication across a re-key -----------------------------------------------------------------------------
def _records(rng: np.random.Generator, start: int, n: int) -> list[dict]:
    vecs = rng.standard_normal((n, 8)).astype(np.float32)
    return [{"id": f"d{start + i}", "vector": vecs[i].tolist()} for i in range(n)]


def _count(c: httpx.Client) -> int | None:
    r = c.post("/v1/collections/docs/count", json={})
    return r.json()["count"] if r.status_code == 200 else None


def _until(fn, timeout: float = 20.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (httpx.HTTPError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def _boots(c: httpx.Client) -> int:
    return int(c.get("/internal/stats").json()["replication"]["bootstraps"])


def _rekey_done(c: httpx.Client) -> bool:
    return c.get("/internal/rekey").json()["state"] == "done"


def test_replicas_follow_a_rekeyed_primary_in_either_order(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    primary = EngineProcess(tmp_path / "p", old, "--idle-seal-seconds", "0.3")
    rng = np.random.default_rng(21)
    primary.start()
    first = EngineProcess(tmp_path / "r1", old, "--replica-of", primary.url)  # re-keyed before its primary
    late = EngineProcess(tmp_path / "r2", old, "--replica-of", primary.url)  # re-keyed after its primary
    try:
        first.start()
        late.start()
        with primary.client() as p, first.client() as r1, late.client() as r2:
            body = {"name": "docs", "dimension": 8, "metric": "l2", "index": {"type": "flat"}}
            assert p.post("/v1/collections", json=body).status_code == 201
            assert p.post("/v1/collections/docs/upsert", json={"records": _records(rng, 0, 100)}).status_code == 200
            _until(lambda: _count(r1) == 100 and _count(r2) == 100, what="both replicas")
            boots = {u: _boots(c) for u, c in (("r1", r1), ("r2", r2))}

            # replica first: it re-keys its own files, keeps following frames under the old key
            assert r1.post("/internal/rekey", json={"data_key": b64(new)}).status_code == 202
            _until(lambda: _rekey_done(r1), what="the first replica's re-key")
            assert p.post("/v1/collections/docs/upsert", json={"records": _records(rng, 100, 50)}).status_code == 200
            _until(lambda: _count(r1) == 150 and _count(r2) == 150, what="frames under the old key")

            # the primary: frames under the new key from now on; the late replica waits (no bootstrap)
            assert p.post("/internal/rekey", json={"data_key": b64(new)}).status_code == 202
            assert p.post("/v1/collections/docs/upsert", json={"records": _records(rng, 150, 50)}).status_code == 200
            _until(lambda: _count(r1) == 200, what="the first replica past the switch")
            _until(
                lambda: r2.get("/internal/stats").json()["replication"]["waiting_for_key"],
                what="the late replica to wait for the key",
            )
            _until(lambda: _rekey_done(p), what="the primary's re-key")
            time.sleep(0.5)
            assert _count(r2) in (150, None)  # stalled, never past frames it cannot open
            assert _boots(r2) == boots["r2"]  # waiting, not copying the primary afresh

            # the late replica gets the key: it follows again, without copying the primary afresh
            assert r2.post("/internal/rekey", json={"data_key": b64(new)}).status_code == 202
            _until(lambda: _count(r2) == 200, what="the late replica after its re-key")
            _until(lambda: _rekey_done(r2), what="the late replica's re-key")
            assert p.post("/v1/collections/docs/upsert", json={"records": _records(rng, 200, 50)}).status_code == 200
            _until(lambda: _count(r1) == 250 and _count(r2) == 250, what="both replicas after the re-keys")
            q = {"vector": [0.5] * 8, "top_k": 10}
            res = [c.post("/v1/collections/docs/search", json=q).json() for c in (p, r1, r2)]
            assert res[0] == res[1] == res[2]
            for u, c in (("r1", r1), ("r2", r2)):
                st = c.get("/internal/stats").json()["replication"]
                assert not st["waiting_for_key"] and st["in_sync"], (u, st)
            # the replica re-keyed first never stalled; the late one may have found its WAL file compacted away on
            # the primary meanwhile (idle seal 0.3 s) and copied it afresh: that copy opened with its key ring
            assert _boots(r1) == boots["r1"]
    finally:
        late.stop()
        first.stop()
        primary.stop()
    for d in ("p", "r1", "r2"):
        assert assert_all_under(tmp_path / d, new, old) >= 2


@pytest.mark.slow
def test_kill9_during_rekey_loses_no_acknowledged_write(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    rng = np.random.default_rng(23)
    proc = EngineProcess(tmp_path / "data", old, "--seal-rows", "400", "--idle-seal-seconds", "0.2")
    proc.start()
    acked: set[str] = set()
    with proc.client() as c:
        body = {"name": "docs", "dimension": 8, "metric": "l2", "index": {"type": "hnsw"}}
        assert c.post("/v1/collections", json=body).status_code == 201
        for i in range(0, 3000, 500):
            assert c.post("/v1/collections/docs/upsert", json={"records": _records(rng, i, 500)}).status_code == 200
            acked.update(f"d{j}" for j in range(i, i + 500))
        stop = threading.Event()

        def writer() -> None:
            n = 10_000
            with proc.client() as w:
                while not stop.is_set():
                    try:
                        r = w.post("/v1/collections/docs/upsert", json={"records": _records(rng, n, 20)}, timeout=5)
                    except httpx.HTTPError:
                        return
                    if r.status_code != 200:
                        return
                    acked.update(f"d{j}" for j in range(n, n + 20))
                    n += 20

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.3)
        assert c.post("/internal/rekey", json={"data_key": b64(new)}).status_code == 202
        time.sleep(float(rng.random()) * 0.02)  # the re-key of these few files takes tens of ms
        proc.kill9()
        stop.set()
        t.join(10)
    proc.stop()
    again = EngineProcess(tmp_path / "data", new, env={"VECTA_ENGINE_PREVIOUS_DATA_KEYS": b64(old)})
    again.start()
    try:
        with again.client() as c:
            assert c.post("/internal/rekey", json={"data_key": b64(new)}).status_code == 202
            _until(lambda: _rekey_done(c), timeout=60, what="the resumed re-key")
            ids = sorted(acked)
            for i in range(0, len(ids), 1000):
                got = c.post("/v1/collections/docs/fetch", json={"ids": ids[i : i + 1000], "include_vectors": False})
                assert len(got.json()["records"]) == len(ids[i : i + 1000])
    finally:
        again.stop()
    assert assert_all_under(tmp_path / "data", new, old) >= 2
    final = EngineProcess(tmp_path / "data", new)  # the new key alone
    final.start()
    final.stop()

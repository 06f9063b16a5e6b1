"""Read replicas: an engine started with ``--replica-of URL`` follows a primary engine's write-ahead logs.

Primary side (``Primary``, served on the primary's authenticated ``/internal/replication-*`` routes):

* ``replication-state`` (GET): the catalog (name, cid, config) and each collection's WAL head.
* ``replication-snapshot`` (POST): a consistent snapshot (``Engine.snapshot``) into a staging folder of the data
  dir; ``replication-file`` (POST ``{id, key, offset}``) hands it out in 8 MiB pieces and ``replication-release``
  (POST ``{id}``) removes it. The files are the engine's encrypted files, as a backup is.
* ``replication-wal`` (POST ``{epoch, positions: {cid: [wal_no, record, offset]}, wait_ms, max_bytes}``): a
  long poll that answers as soon as a collection has records after the replica's position, the catalog changed,
  or ``wait_ms`` passed. The answer is ``u32 header length | header JSON | frames``: the WAL frames as they are
  on disk, still AES-GCM under the cluster's data key, bound to their file and record number.

A position is (WAL file number, records already read in it, byte offset of the next frame). Files are numbered in
order and a primary starts a new file exactly when it seals its growing segment, so a replica seals where its
primary did. When a file the replica still needs was deleted (its segment was persisted and the file compacted
away), or the primary's data was replaced (a restore: a new *epoch*), the answer says so and the replica
bootstraps again from a fresh snapshot.

Replica side (``Follower``, a thread in the replica's engine process): bootstraps from a snapshot when it has no
valid state, then polls; each record is decrypted (which also authenticates it), appended to the replica's own
WAL and applied through the same code path as a restart's replay (``Collection._replay``). Its position per
collection is kept in ``replica.enc`` (encrypted) after each applied answer; records applied again after a crash
between the two are harmless (upserts and deletes by id are idempotent). The replica refuses writes (409
``read_only_replica``) and answers reads with 503 ``replica_not_ready`` until its first bootstrap is done or
while it has been behind its primary for more than ``LAG_GRACE_SECONDS``.

Re-key (rekey.py): the primary and each replica re-encrypt their own data dirs, each when told to. Every answer
names the primary's keys (``keys``: public key ids, current first, then those its files may still be under). A
replica goes on only while it holds all of them (its ring, plus the keys its own finished re-key retired, kept
until the primary names none of them); otherwise it waits (no bootstrap, reads 503 once behind for
``LAG_GRACE_SECONDS``) until it is given the primary's new key. Re-keying the replicas first, then the primary,
never stalls them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from services.core.errors import BadRequest, Conflict, NotFound, ServiceUnavailable
from services.core.objectstore import LocalObjectStore

from .collection import Collection
from .crypto import CorruptionError, DataCipher, key_id
from .engine import Engine
from .schema import CollectionConfig, expect_object, loads
from .wal import open_frames, read_frames

if TYPE_CHECKING:
    import httpx  # a follower's client, imported when one starts: a primary never pays for it (~4 MiB of RSS)

log = logging.getLogger("vecta.engine.replication")

EPOCH_FILE = "replication.epoch"
STATE_FILE = "replica.enc"
STAGE = ".replication"  # primary: snapshots being handed to replicas
BOOTSTRAP = ".bootstrap"  # replica: a snapshot being downloaded
PIECE = 8 << 20  # bytes per replication-file answer
MAX_POLL_BYTES = 16 << 20
MAX_WAIT_MS = 5000
POLL_INTERVAL = 0.005  # how often a waiting long poll looks at the WAL heads
SNAPSHOT_TTL = 1800.0  # a staged snapshot nobody released is removed after this long
LAG_GRACE_SECONDS = 5.0
_HLEN = struct.Struct("<I")

Position = tuple[int, int, int]  # (WAL file number, records read in it, byte offset of the next frame)


def wal_name(no: int) -> str:
    return f"wal-{no:08d}.log"


def wal_no(name: str) -> int:
    return int(name[4:12])


def _position(value: Any, where: str) -> Position:
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise BadRequest(f"{where}: expected [wal_no, record, offset], non-negative integers", code="validation_error")
    return (value[0], value[1], value[2])


class Truncated(Exception):
    """The replica's position is no longer (or never was) in the primary's WAL."""


# ------------------------------------------------------------------------------------------------------------
# primary
# ------------------------------------------------------------------------------------------------------------
class Primary:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pool: ThreadPoolExecutor | None = None
        self._epoch: str | None = None
        self._snapshots: dict[str, tuple[Path, float, dict[str, int]]] = {}
        self.followers: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="vecta-repl")
        return self._pool

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def epoch(self) -> str:
        """Identifies this data dir's history: a replica that followed another (a wiped or restored primary)
        bootstraps again. Not secret (it names nothing)."""
        if self._epoch is None:
            path = self.engine.data_dir / EPOCH_FILE
            try:
                self._epoch = path.read_text().strip() or None
            except FileNotFoundError:
                self._epoch = None
            if self._epoch is None:
                self.new_epoch()
        assert self._epoch is not None
        return self._epoch

    def new_epoch(self) -> None:
        self._epoch = secrets.token_hex(8)
        path = self.engine.data_dir / EPOCH_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self._epoch)
        tmp.replace(path)

    def _collections(self) -> dict[str, Collection]:
        return {c.cfg.cid: c for c in list(self.engine.collections.values()) if not c.dropped}

    def catalog(self, colls: dict[str, Collection]) -> list[dict[str, Any]]:
        return [{"name": c.cfg.name, "cid": cid, "config": c.cfg.to_json()} for cid, c in colls.items()]

    def state(self) -> dict[str, Any]:
        colls = self._collections()
        out = []
        for entry in self.catalog(colls):
            wal = colls[entry["cid"]].wal
            if wal is not None:
                entry["head"] = [wal_no(wal.path.name), wal.records, wal.size]
            out.append(entry)
        return {"epoch": self.epoch(), "collections": out}

    def has_news(self, positions: dict[str, Position]) -> bool:
        """Cheap, lock-free look at the WAL heads (the answer itself is built under the write locks)."""
        colls = self._collections()
        if colls.keys() != positions.keys():
            return True
        for cid, (w, r, _) in positions.items():
            wal = colls[cid].wal
            if wal is not None and (w != wal_no(wal.path.name) or r != wal.records):
                return True
        return False

    def chunk(self, coll: Collection, pos: Position, budget: int) -> tuple[dict[str, Any], bytes]:
        """Frames after ``pos`` in one WAL file, and where the replica stands after them."""
        w, r, off = pos
        with coll.write_lock:
            if coll.dropped or coll.wal is None:
                raise Truncated
            files = list(coll.wal_files)
            head = coll.wal.path.name
            head_size, head_records = coll.wal.size, coll.wal.records
            ends = dict(coll.wal_ends)
            while wal_name(w) not in files:
                # a file that ended exactly where the replica stands may be gone: go on to the next one
                if ends.get(wal_name(w)) == r and w < wal_no(head):
                    w, r, off = w + 1, 0, 0
                    continue
                raise Truncated
            name = wal_name(w)
            closed = name != head
            if closed:
                end = (coll.root / name).stat().st_size
            else:
                end = head_size
                if r > head_records:
                    raise Truncated
            if off > end:
                raise Truncated
            later = [f for f in files if wal_no(f) > w]
            coll.pins += 1  # no file is deleted while it is read
        try:
            try:
                frames, count = read_frames(coll.root / name, off, end, budget) if off < end else (b"", 0)
            except CorruptionError as exc:
                raise Truncated from exc
            noff = off + len(frames)
            nxt: Position = (w + 1, 0, 0) if closed and noff == end else (w, r + count, noff)
            lag = end - noff
            for f in later:
                lag += head_size if f == head else (coll.root / f).stat().st_size
        finally:
            coll.unpin()
        meta = {"cid": coll.cfg.cid, "wal": w, "rec": r, "offset": off, "count": count, "bytes": len(frames)}
        meta["next"] = list(nxt)
        meta["lag_bytes"] = lag
        return meta, frames

    def collect(self, positions: dict[str, Position], max_bytes: int) -> bytes:
        colls = self._collections()
        chunks: list[dict[str, Any]] = []
        parts: list[bytes] = []
        budget = max_bytes
        for cid, pos in positions.items():
            coll = colls.get(cid)
            if coll is None:
                continue  # dropped: the catalog tells the replica
            try:
                meta, frames = self.chunk(coll, pos, max(1, budget))
            except Truncated:
                chunks.append({"cid": cid, "truncated": True})
                continue
            budget -= len(frames)
            chunks.append(meta)
            parts.append(frames)
        keys = self.engine.cipher.key_ids()
        header = orjson.dumps({"epoch": self.epoch(), "keys": keys, "catalog": self.catalog(colls), "chunks": chunks})
        return b"".join([_HLEN.pack(len(header)), header, *parts])

    # -- snapshots for bootstrapping -----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        self._expire()
        sid = secrets.token_hex(8)
        root = self.engine.data_dir / STAGE / sid
        root.mkdir(parents=True)
        try:
            epoch = self.epoch()
            store = LocalObjectStore(root)
            self.engine.snapshot(store)
            files = {k: (root / k).stat().st_size for k in store.list_keys()}
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        with self._lock:
            self._snapshots[sid] = (root, time.monotonic(), files)
        return {
            "id": sid,
            "epoch": epoch,
            "keys": self.engine.cipher.key_ids(),
            "files": [{"key": k, "size": n} for k, n in sorted(files.items())],
        }

    def piece(self, sid: str, key: str, offset: int) -> bytes:
        with self._lock:
            snap = self._snapshots.get(sid)
        if snap is None:
            raise NotFound(f"no replication snapshot {sid!r} (released or expired)", code="snapshot_not_found")
        root, _, files = snap
        if key not in files:  # only the snapshot's own files: no path from the request reaches the disk
            raise NotFound(f"snapshot {sid} has no file {key!r}", code="snapshot_file_not_found")
        with open(root / key, "rb") as fh:
            fh.seek(offset)
            return fh.read(PIECE)

    def release(self, sid: str) -> None:
        with self._lock:
            snap = self._snapshots.pop(sid, None)
        if snap is not None:
            shutil.rmtree(snap[0], ignore_errors=True)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            old = [sid for sid, (_, t, _) in self._snapshots.items() if now - t > SNAPSHOT_TTL]
        for sid in old:
            self.release(sid)
        stage = self.engine.data_dir / STAGE
        if stage.is_dir():  # left by an earlier process
            with self._lock:
                live = set(self._snapshots)
            for p in stage.iterdir():
                if p.name not in live:
                    shutil.rmtree(p, ignore_errors=True)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        followers = [
            {"id": fid, "seconds_since_poll": round(now - f["seen"], 3), "lag_bytes": f["lag_bytes"]}
            for fid, f in list(self.followers.items())
            if now - f["seen"] < 60
        ]
        return {"role": "primary", "epoch": self.epoch(), "replicas": followers}

    # -- routes ----------------------------------------------------------------------------------------------
    async def handle(self, name: str, method: str, body: bytes) -> tuple[str, Any, int]:
        loop = asyncio.get_running_loop()
        route = "internal_" + name.replace("-", "_")
        if name == "replication-state" and method == "GET":
            return route, await loop.run_in_executor(self.pool, self.state), 200
        if method != "POST":
            raise NotFound(f"no internal route {method} {name}", code="route_not_found")
        doc = loads(body) if body.strip() else {}
        if name == "replication-wal":
            expect_object(doc, {"epoch", "positions", "wait_ms", "max_bytes", "replica", "lag_bytes"})
            raw = doc.get("positions", {})
            if not isinstance(raw, dict):
                raise BadRequest("positions must be an object {cid: [wal_no, record, offset]}", code="validation_error")
            positions = {str(k): _position(v, f"positions.{k}") for k, v in raw.items()}
            wait = _int(doc, "wait_ms", 1000, 0, MAX_WAIT_MS) / 1000
            max_bytes = _int(doc, "max_bytes", MAX_POLL_BYTES, 1, 256 << 20)
            replica = doc.get("replica")
            if isinstance(replica, str) and replica:
                self.followers[replica[:64]] = {"seen": time.monotonic(), "lag_bytes": doc.get("lag_bytes")}
            if doc.get("epoch") != self.epoch():
                keys = self.engine.cipher.key_ids()
                header = orjson.dumps({"epoch": self.epoch(), "keys": keys, "rebootstrap": True})
                return route, (b"application/octet-stream", _HLEN.pack(len(header)) + header), 200
            deadline = time.monotonic() + wait
            # polling the in-memory WAL heads keeps the write path free of any notification hook
            while time.monotonic() < deadline:
                if self.has_news(positions):
                    break
                await asyncio.sleep(POLL_INTERVAL)
            data = await loop.run_in_executor(self.pool, self.collect, positions, max_bytes)
            return route, (b"application/octet-stream", data), 200
        if name == "replication-snapshot":
            expect_object(doc, set())
            return route, await loop.run_in_executor(self.pool, self.snapshot), 200
        if name == "replication-file":
            expect_object(doc, {"id", "key", "offset"})
            sid, key = doc.get("id"), doc.get("key")
            if not isinstance(sid, str) or not isinstance(key, str):
                raise BadRequest("id and key must be strings", code="validation_error")
            offset = _int(doc, "offset", 0, 0, 1 << 50)
            data = await loop.run_in_executor(self.pool, self.piece, sid, key, offset)
            return route, (b"application/octet-stream", data), 200
        if name == "replication-release":
            expect_object(doc, {"id"})
            sid = doc.get("id")
            if not isinstance(sid, str):
                raise BadRequest("id must be a string", code="validation_error")
            await loop.run_in_executor(self.pool, self.release, sid)
            return route, {"released": True}, 200
        raise NotFound(f"no internal route {method} {name}", code="route_not_found")


def _int(doc: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = doc.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f"{key} must be an integer from {lo} to {hi}", code="validation_error")
    return v


# ------------------------------------------------------------------------------------------------------------
# replica
# ------------------------------------------------------------------------------------------------------------
class NeedBootstrap(Exception):
    pass


WRITE_ACTIONS = {"upsert", "delete", "imports"}


class Follower:
    """Keeps this engine a copy of the primary at ``primary_url`` (a thread; see the module docstring)."""

    def __init__(self, engine: Engine, primary_url: str, token: str, *, wait_ms: int = 1000) -> None:
        self.engine = engine
        self.primary_url = primary_url.rstrip("/")
        self._token = token
        self.wait_ms = wait_ms
        self.id = secrets.token_hex(6)
        self.epoch: str | None = None
        self.positions: dict[str, Position] = {}
        self.bootstrapped = False
        self.bootstraps = 0
        self.lag_bytes = 0
        self.behind_since: float | None = None  # when the primary first said this replica is behind
        self.last_contact: float | None = None
        self.errors = 0
        self.last_error: str | None = None
        self.applied_records = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retained: list[bytes] = []  # keys this replica's own re-key retired, while the primary may use them
        self._ring: tuple[tuple[str, ...], DataCipher] | None = None
        self.waiting_for_key = False  # the primary names a key this replica does not hold

    # -- public-route gate (hot path: attribute reads only) -------------------------------------------------
    def check(self, method: str, parts: list[str]) -> None:
        write = (
            (len(parts) == 2 and method == "POST")
            or (len(parts) == 3 and method == "DELETE")
            or (len(parts) == 4 and parts[3] in WRITE_ACTIONS)
        )
        if write:
            raise Conflict("this engine is a read replica: send writes to the primary", code="read_only_replica")
        if not self.bootstrapped:
            raise ServiceUnavailable("the read replica is still copying its primary", retry_after=1,
                                     code="replica_not_ready")  # fmt: skip
        since = self.behind_since
        if since is not None and time.monotonic() - since > LAG_GRACE_SECONDS:
            raise ServiceUnavailable("the read replica is behind its primary", retry_after=1,
                                     code="replica_not_ready")  # fmt: skip

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "role": "replica",
            "primary": self.primary_url,
            "bootstrapped": self.bootstrapped,
            "in_sync": self.bootstrapped
            and (self.behind_since is None or now - self.behind_since <= LAG_GRACE_SECONDS),
            "lag_bytes": self.lag_bytes,
            "lag_seconds": round(now - self.behind_since, 3) if self.behind_since is not None else 0.0,
            "seconds_since_contact": round(now - self.last_contact, 3) if self.last_contact is not None else None,
            "applied_records": self.applied_records,
            "bootstraps": self.bootstraps,
            "errors": self.errors,
            "last_error": self.last_error,
            "waiting_for_key": self.waiting_for_key,
        }

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """After the engine opened: resume from the saved positions, or bootstrap."""
        self.engine.auto_seal = False
        self.engine.on_keys_retired = self._retain_keys
        self._load_state()
        self._thread = threading.Thread(target=self._run, name="vecta-replica", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _state_path(self) -> Path:
        return self.engine.data_dir / STATE_FILE

    # -- keys ------------------------------------------------------------------------------------------------
    def _retain_keys(self, keys: list[bytes]) -> None:
        """This engine's re-key is about to drop ``keys``: keep them for the primary's frames."""
        self._retained = [*self._retained, *keys]
        self._ring = None

    def _frame_ring(self) -> DataCipher:
        """The engine's ring, plus the retained keys (if any) for frames the primary wrote under them."""
        cipher = self.engine.cipher
        if not self._retained:
            return cipher
        ids = tuple(cipher.key_ids())
        if self._ring is None or self._ring[0] != ids:
            self._ring = (ids, cipher.with_extra(self._retained))
        return self._ring[1]

    def _check_keys(self, keys: Any) -> None:
        """Go on only with every key the primary's data may be under (see the module docstring)."""
        if not isinstance(keys, list):
            return  # an older primary: frames tell
        own = set(self.engine.cipher.key_ids())
        if self._retained and set(keys) <= own:
            self._retained, self._ring = [], None  # the primary is done with the old keys: so is this replica
        known = own | {key_id(k) for k in self._retained}
        if not set(keys) <= known:
            self.waiting_for_key = True
            if self.behind_since is None:
                self.behind_since = time.monotonic()
            raise KeyMismatch("the primary's data is under a key this replica does not hold (waiting for a rekey)")
        self.waiting_for_key = False

    def _load_state(self) -> None:
        path = self._state_path()
        if not path.exists():
            return
        try:
            with self.engine.catalog_lock:  # a re-key may be re-encrypting it
                doc = orjson.loads(self.engine.cipher.read_file(path, b"vecta|" + STATE_FILE.encode()).tobytes())
        except (CorruptionError, ValueError):
            log.warning("replica state unreadable: bootstrapping again")
            return
        positions = {cid: (p[0], p[1], p[2]) for cid, p in doc["positions"].items()}
        local = {c.cfg.cid for c in self.engine.collections.values()}
        if set(positions) == local:
            self.epoch, self.positions, self.bootstrapped = doc["epoch"], positions, True

    def _save_state(self) -> None:
        doc = {"epoch": self.epoch, "positions": {cid: list(p) for cid, p in self.positions.items()}}
        with self.engine.catalog_lock:  # a re-key re-encrypts it under this lock: no newer state is overwritten
            self.engine.cipher.write_file(self._state_path(), [orjson.dumps(doc)], b"vecta|" + STATE_FILE.encode())

    def _run(self) -> None:
        import httpx

        client = httpx.Client(
            base_url=self.primary_url,
            headers={"authorization": f"Bearer {self._token}"},
            timeout=httpx.Timeout(self.wait_ms / 1000 + 60, connect=2.0),
        )
        backoff = 0.05
        try:
            while not self._stop.is_set():
                try:
                    if not self.bootstrapped:
                        self.bootstrap(client)
                    self.poll_once(client)
                    backoff = 0.05
                except NeedBootstrap:
                    log.warning("replica: bootstrapping again from %s", self.primary_url)
                    self.bootstrapped = False
                except (httpx.HTTPError, ReplicationError) as exc:
                    self._error(exc)
                    self._stop.wait(backoff)
                    backoff = min(2.0, backoff * 2)
                except CorruptionError as exc:  # a frame failed authentication: never apply, copy afresh
                    self._error(exc)
                    self.bootstrapped = False
                    self._stop.wait(backoff)
                except Exception as exc:
                    log.exception("replica: unexpected error")
                    self._error(exc)
                    self._stop.wait(backoff)
                    backoff = min(2.0, backoff * 2)
        finally:
            client.close()

    def _error(self, exc: Exception) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        log.warning("replica: %s", self.last_error)

    def _post(self, client: httpx.Client, name: str, body: dict[str, Any]) -> httpx.Response:
        r = client.post(f"/internal/{name}", json=body)
        if r.status_code != 200:
            raise ReplicationError(f"primary answered {r.status_code} to {name}: {r.text[:200]}")
        return r

    # -- bootstrap ---------------------------------------------------------------------------------------------
    def bootstrap(self, client: httpx.Client) -> None:
        self.bootstrapped = False
        self._state_path().unlink(missing_ok=True)
        snap = self._post(client, "replication-snapshot", {}).json()
        try:
            self._check_keys(snap.get("keys"))
        except KeyMismatch:
            self._post(client, "replication-release", {"id": snap["id"]})
            raise
        stage = self.engine.data_dir / BOOTSTRAP
        shutil.rmtree(stage, ignore_errors=True)
        try:
            for f in snap["files"]:
                dest = stage / f["key"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as fh:
                    got = 0
                    while got < f["size"]:
                        body = {"id": snap["id"], "key": f["key"], "offset": got}
                        piece = self._post(client, "replication-file", body).content
                        if not piece:
                            raise ReplicationError(f"snapshot file {f['key']} ended early")
                        fh.write(piece)
                        got += len(piece)
            self._post(client, "replication-release", {"id": snap["id"]})
            eng = self.engine
            with eng.catalog_lock:
                for name in list(eng.collections):
                    eng.drop_collection(name)
                # checks every file's size and hash, re-encrypts under this engine's key, then loads
                eng.restore(LocalObjectStore(stage), self._retained)
                positions: dict[str, Position] = {}
                for c in eng.collections.values():
                    with c.write_lock:
                        assert c.wal is not None
                        # the restored WAL head is the primary's at the snapshot, cut at a frame boundary
                        positions[c.cfg.cid] = (wal_no(c.wal.path.name), c.wal.records, c.wal.size)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        self.epoch, self.positions = snap["epoch"], positions
        self._save_state()
        self.bootstraps += 1
        self.behind_since = time.monotonic()  # until the first poll says otherwise
        self.bootstrapped = True
        log.info("replica: bootstrapped from %s (%d collections)", self.primary_url, len(positions))

    # -- following ---------------------------------------------------------------------------------------------
    def poll_once(self, client: httpx.Client) -> None:
        body = {
            "epoch": self.epoch,
            "positions": {cid: list(p) for cid, p in self.positions.items()},
            "wait_ms": self.wait_ms,
            "max_bytes": MAX_POLL_BYTES,
            "replica": self.id,
            "lag_bytes": self.lag_bytes,
        }
        data = self._post(client, "replication-wal", body).content
        (hlen,) = _HLEN.unpack_from(data, 0)
        header = orjson.loads(data[4 : 4 + hlen])
        self.last_contact = time.monotonic()
        self._check_keys(header.get("keys"))
        if header.get("rebootstrap"):
            raise NeedBootstrap
        changed = self._sync_catalog(header["catalog"])
        pos = 4 + hlen
        lag = 0
        for ch in header["chunks"]:
            if ch.get("truncated"):
                raise NeedBootstrap
            frames = data[pos : pos + ch["bytes"]]
            pos += ch["bytes"]
            changed |= self._apply_chunk(ch, frames)
            lag += ch["lag_bytes"]
        if changed:
            self._save_state()
        self.lag_bytes = lag
        if lag == 0:
            self.behind_since = None
        elif self.behind_since is None:
            self.behind_since = time.monotonic()

    def _sync_catalog(self, catalog: list[dict[str, Any]]) -> bool:
        eng = self.engine
        primary = {d["name"]: d for d in catalog}
        changed = False
        for name, coll in list(eng.collections.items()):
            p = primary.get(name)
            if p is None or p["cid"] != coll.cfg.cid:
                eng.drop_collection(name)
                self.positions.pop(coll.cfg.cid, None)
                changed = True
        for name, d in primary.items():
            if name not in eng.collections:
                eng.create_collection(CollectionConfig.from_json(d["config"]), cid=d["cid"])
                self.positions[d["cid"]] = (1, 0, 0)  # a new collection's first WAL file is number 1
                changed = True
        return changed

    def _apply_chunk(self, ch: dict[str, Any], frames: bytes) -> bool:
        cid = ch["cid"]
        coll = next((c for c in self.engine.collections.values() if c.cfg.cid == cid), None)
        if coll is None or cid not in self.positions:
            return False
        start: Position = (ch["wal"], ch["rec"], ch["offset"])
        cur = self.positions[cid]
        if start != cur:
            # the primary skipped files that ended where this replica stood: only ever forward, to a file start
            if not (start[0] > cur[0] and start[1:] == (0, 0)):
                raise NeedBootstrap
            coll.seal()
        ring = self._frame_ring()
        payloads = open_frames(frames, ring, coll.aad(wal_name(start[0])), start[1]) if frames else []
        if len(payloads) != ch["count"]:
            raise ReplicationError("frame count does not match the header")
        if payloads:
            apply_records(coll, payloads)
            self.applied_records += len(payloads)
        nxt: Position = (ch["next"][0], ch["next"][1], ch["next"][2])
        if nxt[0] != start[0]:
            coll.seal()  # the primary sealed here: so does the replica (same segments on both)
        self.positions[cid] = nxt
        return bool(payloads) or nxt != cur


class ReplicationError(Exception):
    pass


class KeyMismatch(ReplicationError):
    """The primary's data is under a key this replica does not hold: wait for a rekey (never bootstrap)."""


def apply_records(coll: Collection, payloads: list[bytes]) -> None:
    """Replicated records: durable in this engine's own WAL first, then applied as a restart replays them."""
    with coll.write_lock:
        coll._check_open()
        assert coll.wal is not None
        coll.wal.append_many(payloads)
        for p in payloads:
            coll._replay(p)
        coll.last_write = time.monotonic()


__all__ = ["Follower", "Primary", "apply_records"]

"""The engine: the catalog of collections in one data dir, background maintenance, stats, snapshots.

Data dir layout (every file AES-256-GCM with the data key, bound to its relative path)::

    catalog.enc                      collections and their configs
    collections/<cid>/MANIFEST.enc   persisted segments, their deleted rows, live WAL files
    collections/<cid>/seg-N.enc      sealed segment: rows, columns, text postings, faiss index
    collections/<cid>/wal-N.log      write-ahead log (per-record CRC + GCM)

A snapshot copies these encrypted files as they are (segment files are immutable; WALs are cut at the
length captured under the collections' write locks) plus an encrypted ``SNAPSHOT.enc`` index written last.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from services.core.errors import Conflict, NotFound, Unprocessable
from services.core.objectstore import ObjectStore, ObjectStoreError, open_object_store

from .collection import Collection, Settings
from .crypto import CorruptionError, DataCipher, commit_file, temp_path
from .malloc import bulk_allocations, end_write_burst, trim_memory, tune_malloc, write_burst_idle
from .rekey import Rekeyer
from .schema import CollectionConfig, release_parse_buffers
from .wal import reencrypt_frames, wal_is_current

__all__ = ["Engine", "bulk_allocations", "rss_bytes", "trim_memory", "tune_malloc"]

log = logging.getLogger("vecta.engine")

CATALOG = "catalog.enc"
SNAPSHOT_INDEX = "SNAPSHOT.enc"


class Engine:
    def __init__(
        self, data_dir: Path, key: bytes, settings: Settings | None = None, previous_keys: Iterable[bytes] = ()
    ) -> None:
        """``key`` encrypts; ``previous_keys`` (a re-key that did not finish) only decrypt (``rekey``)."""
        self.data_dir = Path(data_dir)
        self.cipher = DataCipher(key, previous_keys)
        self.settings = settings or Settings()
        self.collections: dict[str, Collection] = {}
        self.catalog_lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = time.time()
        self.maintenance_errors = 0
        self.auto_seal = True  # a replica seals only where its primary did (replication.py)
        self.rekeyer = Rekeyer(self)
        # called with the old keys just before a finished re-key drops them (a replica keeps them for as long as
        # its primary's frames may still be under them: replication.py)
        self.on_keys_retired: Callable[[list[bytes]], None] | None = None

    # ------------------------------------------------------------------------------------------------------
    def open(self, *, background: bool = True) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "collections").mkdir(exist_ok=True)
        with bulk_allocations():
            self._load()
        if background:
            self._thread = threading.Thread(target=self._maintenance_loop, name="vecta-maintenance", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        path = self.data_dir / CATALOG
        configs: list[CollectionConfig] = []
        if path.exists():
            doc = orjson.loads(self.cipher.read_file(path, b"vecta|" + CATALOG.encode()).tobytes())
            configs = [CollectionConfig.from_json(c) for c in doc["collections"]]
        for coll in self._open_collections(configs):
            self.collections[coll.cfg.name] = coll
        known = {cfg.cid for cfg in configs}
        for p in (self.data_dir / "collections").iterdir():
            if p.name not in known:  # a half-created or dropped collection
                shutil.rmtree(p, ignore_errors=True)
        for p in self.data_dir.glob(".tmp-*"):  # a catalog or replica state write (or re-key) cut by a crash
            p.unlink(missing_ok=True)

    def _open_collections(self, configs: list[CollectionConfig]) -> list[Collection]:
        """Open (load segments, replay WALs) these collections, several at once when there are several: reading
        and decrypting files and deserializing indexes mostly run outside the GIL. All or nothing: on a failure
        the ones already opened are closed again and the error is raised."""
        colls = [
            Collection(cfg, self.data_dir / "collections" / cfg.cid, self.data_dir, self.cipher, self.settings)
            for cfg in configs
        ]
        if len(colls) <= 1:
            for coll in colls:
                coll.open()
            return colls
        workers = min(len(colls), os.cpu_count() or 2, 4)
        with ThreadPoolExecutor(workers, thread_name_prefix="vecta-open") as pool:
            futures = [pool.submit(c.open) for c in colls]
            errors = [f.exception() for f in futures]
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            for coll, err in zip(colls, errors, strict=True):
                if err is None:
                    coll.close()
            raise failed
        return colls

    def _write_catalog(self) -> None:
        doc = {"version": 1, "collections": [c.cfg.to_json() for c in self.collections.values()]}
        self.cipher.write_file(self.data_dir / CATALOG, [orjson.dumps(doc)], b"vecta|" + CATALOG.encode())

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.rekeyer.join(timeout=30)
        for c in list(self.collections.values()):
            c.close()

    # ------------------------------------------------------------------------------------------------------
    def create_collection(self, cfg: CollectionConfig, *, cid: str | None = None) -> Collection:
        with self.catalog_lock:
            if cfg.name in self.collections:
                raise Conflict(f"collection {cfg.name!r} already exists", code="collection_exists")
            cfg.cid = cid or "c_" + secrets.token_hex(8)  # a replica keeps its primary's ids
            coll = Collection(cfg, self.data_dir / "collections" / cfg.cid, self.data_dir, self.cipher, self.settings)
            coll.create()
            self.collections[cfg.name] = coll
            try:
                self._write_catalog()
            except BaseException:
                del self.collections[cfg.name]
                shutil.rmtree(coll.root, ignore_errors=True)
                raise
            return coll

    def get(self, name: str) -> Collection:
        coll = self.collections.get(name)
        if coll is None:
            raise NotFound(f"collection {name!r} not found", code="collection_not_found")
        return coll

    def drop_collection(self, name: str) -> None:
        with self.catalog_lock:
            coll = self.get(name)
            with coll.write_lock:
                coll.dropped = True
                del self.collections[name]
                self._write_catalog()
                coll.close()
            shutil.rmtree(coll.root, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------------
    def maintain_once(self) -> bool:
        """One round of sealing and index building; True if anything was done."""
        did = False
        now = time.monotonic()
        for coll in list(self.collections.values()):
            if coll.dropped:
                continue
            if self.auto_seal and coll.needs_seal(now):
                did |= coll.seal()
            did |= coll.maintain()
        return did

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Seal and build until every collection is fully indexed (tests, snapshots of idle engines)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for coll in list(self.collections.values()):
                coll.seal()
                coll.maintain()
            if all(c.status() == "ready" for c in self.collections.values()):
                trim_memory()
                return
            time.sleep(0.01)
        raise TimeoutError("collections did not become ready")

    def _maintenance_loop(self) -> None:
        dirty = False
        while not self._stop.is_set():
            try:
                did = self.maintain_once()
            except Exception:
                self.maintenance_errors += 1
                log.exception("maintenance failed")
                did = False
            dirty |= did
            if write_burst_idle():
                end_write_burst()
            if not did:
                if dirty:  # a seal or build just finished: writes paused; return build and parse buffers
                    release_parse_buffers()
                    trim_memory()
                    dirty = False
                self._stop.wait(0.2)

    # ------------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        colls = [c.stats() for c in list(self.collections.values())]
        return {
            "collections": colls,
            "vector_count": sum(c["vector_count"] for c in colls),
            "bytes_on_disk": _dir_size(self.data_dir),
            "bytes_in_memory": sum(c["bytes_in_memory"] for c in colls),
            "rss_bytes": rss_bytes(),
            "read_units": sum(c["read_units"] for c in colls),
            "write_units": sum(c["write_units"] for c in colls),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "maintenance_errors": self.maintenance_errors,
            "rekey": self.rekeyer.status(),
        }

    # ------------------------------------------------------------------------------------------------------
    def rekey(self, new_key: bytes) -> dict[str, Any]:
        """Make ``new_key`` the data key now and re-encrypt every file under it in the background (rekey.py).
        The same key again returns the progress (and finishes an interrupted re-key after a restart with the
        old key among ``previous_keys``); another key while one runs is a Conflict."""
        return self.rekeyer.start(new_key)

    def rekey_status(self) -> dict[str, Any]:
        return self.rekeyer.status()

    # ------------------------------------------------------------------------------------------------------
    def snapshot(self, store: ObjectStore) -> dict[str, Any]:
        """A consistent point-in-time copy of every collection, taken while writes continue."""
        with self.catalog_lock:
            colls = sorted(self.collections.values(), key=lambda c: c.cfg.name)
            for c in colls:
                c.write_lock.acquire()
            try:
                captured = [(c, *c.capture()) for c in colls]
                catalog = {"version": 1, "collections": [c.cfg.to_json() for c in colls]}
                key_ids = self.cipher.key_ids()  # during a re-key its files may be under either key
            finally:
                for c in reversed(colls):
                    c.write_lock.release()
        files: list[dict[str, Any]] = []
        total = 0
        try:
            for coll, manifest, lengths in captured:
                for name, length in sorted(lengths.items()):
                    rel = f"{coll.rel}/{name}"
                    digest = _sha256_prefix(coll.root / name, length)
                    store.put_file(f"files/{rel}", coll.root / name, length=length)
                    files.append({"path": rel, "size": length, "sha256": digest})
                    total += length
                blob = coll.cipher.seal(orjson.dumps(manifest), coll.aad("MANIFEST.snapshot"))
                store.put_bytes(f"files/{coll.rel}/MANIFEST.snapshot", blob)
                total += len(blob)
                files.append(
                    {
                        "path": f"{coll.rel}/MANIFEST.snapshot",
                        "size": len(blob),
                        "sha256": hashlib.sha256(blob).hexdigest(),
                    }
                )
        finally:
            for coll, _, _ in captured:
                coll.unpin()
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        index = {"version": 1, "created_at": created, "catalog": catalog, "files": files}
        sealed = self.cipher.seal(orjson.dumps(index), b"vecta|snapshot")
        store.put_bytes(SNAPSHOT_INDEX, sealed)
        total += len(sealed)  # `bytes`: everything the snapshot stored (what a backup is listed and billed at)
        return {
            "uri": store.uri,
            "created_at": created,
            "collections": [c.cfg.name for c in colls],
            "files": len(files),
            "bytes": total,
            "vector_count": sum(len(c.id_map) for c in colls),
            "key_ids": key_ids,
        }

    def restore(self, store: ObjectStore, extra_keys: Iterable[bytes] = ()) -> dict[str, Any]:
        """Load a snapshot into this (empty) engine. The snapshot opens with the engine's key ring plus
        ``extra_keys`` (a backup taken under an older key, or during a re-key); its files are re-encrypted
        under the engine's current key as they are installed."""
        extra = list(extra_keys)
        ring = self.cipher.with_extra(extra) if extra else self.cipher
        with self.catalog_lock:
            if self.collections:
                raise Conflict("restore needs an empty engine; drop its collections first", code="engine_not_empty")
            try:
                index = orjson.loads(ring.open(store.get_bytes(SNAPSHOT_INDEX), b"vecta|snapshot"))
            except CorruptionError as exc:
                raise Unprocessable(
                    "the snapshot index failed authentication (tampered, or another data key)",
                    code="snapshot_invalid",
                ) from exc
            with bulk_allocations():
                return self._restore(store, index, ring)

    def _restore(self, store: ObjectStore, index: dict[str, Any], ring: DataCipher) -> dict[str, Any]:
        """Fetch, verify, load and publish a snapshot; the caller holds the catalog lock."""
        stage = self.data_dir / f".restore-{secrets.token_hex(4)}"
        stage.mkdir(parents=True)
        configs = [CollectionConfig.from_json(c) for c in index["catalog"]["collections"]]
        moved: list[Path] = []
        opened: list[Collection] = []
        checks: list[tuple[dict[str, Any], Future[str]]] = []
        handles: list[Any] = []
        hasher = ThreadPoolExecutor(2, thread_name_prefix="vecta-verify")
        try:
            # Fetch every file; each one's digest is computed in the background (on a handle opened now, so
            # moving it below does not disturb that) while the next is fetched and the collections load.
            for f in index["files"]:
                dest = stage / f["path"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                store.get_file(f"files/{f['path']}", dest)
                if dest.stat().st_size != f["size"]:
                    raise Unprocessable(f"snapshot file {f['path']} is damaged", code="snapshot_invalid")
                handles.append(open(dest, "rb"))  # closed by _sha256_of, or below if never hashed
                checks.append((f, hasher.submit(_sha256_of, handles[-1], f["size"])))
            for f in index["files"]:  # what is not under the current key is re-encrypted (handles hash the copy)
                if not f["path"].endswith("/MANIFEST.snapshot"):
                    _to_current_key(ring, stage / f["path"], f"vecta|{f['path']}".encode())
            for cfg_doc in index["catalog"]["collections"]:
                cdir = stage / "collections" / cfg_doc["cid"]
                rel = f"collections/{cfg_doc['cid']}"
                aad = f"vecta|{rel}/".encode()
                manifest = ring.open((cdir / "MANIFEST.snapshot").read_bytes(), aad + b"MANIFEST.snapshot")
                (cdir / "MANIFEST.snapshot").unlink()
                self.cipher.write_file(cdir / "MANIFEST.enc", [manifest], aad + b"MANIFEST.enc")
            self.cipher.write_file(stage / CATALOG, [orjson.dumps(index["catalog"])], b"vecta|" + CATALOG.encode())
            # Into place and loaded while the digests are checked; the catalog goes last (it is what makes the
            # collections exist: a crash before it leaves folders the next open removes).
            (self.data_dir / "collections").mkdir(exist_ok=True)
            for cfg in configs:
                os.replace(stage / "collections" / cfg.cid, self.data_dir / "collections" / cfg.cid)
                moved.append(self.data_dir / "collections" / cfg.cid)
            opened = self._open_collections(configs)
            for f, digest in checks:
                if digest.result() != f["sha256"]:
                    raise Unprocessable(f"snapshot file {f['path']} is damaged", code="snapshot_invalid")
            os.replace(stage / CATALOG, self.data_dir / CATALOG)
        except BaseException as exc:
            for coll in opened:
                coll.close()
            for path in moved:
                shutil.rmtree(path, ignore_errors=True)
            if isinstance(exc, ObjectStoreError):
                raise Unprocessable(f"snapshot could not be read: {exc}", code="snapshot_invalid") from exc
            if isinstance(exc, CorruptionError):
                raise Unprocessable(f"snapshot failed authentication: {exc}", code="snapshot_invalid") from exc
            raise
        finally:
            hasher.shutdown(wait=True, cancel_futures=True)
            for fh in handles:
                fh.close()
            shutil.rmtree(stage, ignore_errors=True)
        for coll in opened:
            self.collections[coll.cfg.name] = coll
        return {
            "uri": store.uri,
            "created_at": index["created_at"],
            "collections": sorted(self.collections),
            "vector_count": sum(len(c.id_map) for c in self.collections.values()),
        }


def _to_current_key(ring: DataCipher, path: Path, aad: bytes) -> None:
    """Re-encrypt a restored segment or WAL file under the current key unless it is under it already."""
    if path.name.endswith(".log"):
        if wal_is_current(path, ring, aad):
            return
        tmp = temp_path(path)
        try:
            with open(tmp, "wb") as dst:
                reencrypt_frames(path, dst, 0, path.stat().st_size, 0, ring, aad)
                dst.flush()
                os.fsync(dst.fileno())
            commit_file(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    elif not ring.file_is_current(path, aad):
        commit_file(ring.reencrypt_file(path, aad), path)


def open_store(uri: Any) -> ObjectStore:
    if not isinstance(uri, str) or not uri:
        from services.core.errors import BadRequest

        raise BadRequest("body.uri must be an s3:// or file:// URI", code="validation_error")
    try:
        return open_object_store(uri)
    except ObjectStoreError as exc:
        from services.core.errors import BadRequest

        raise BadRequest(str(exc), code="invalid_uri") from exc


def _sha256_of(fh: Any, length: int) -> str:
    """SHA-256 of the first ``length`` bytes of an open file, which it closes."""
    with fh:
        h = hashlib.sha256()
        remaining = length
        while remaining > 0:
            buf = fh.read(min(1 << 20, remaining))
            if not buf:
                break
            h.update(buf)
            remaining -= len(buf)
        return h.hexdigest()


def _sha256_prefix(path: Path, length: int) -> str:
    return _sha256_of(open(path, "rb"), length)  # _sha256_of closes it


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            try:
                total += os.stat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

"""Online re-key: replace the data key and re-encrypt every file of the data dir while the engine serves.

``Rekeyer.start(new_key)`` makes ``new_key`` current at once (the engine's one ``DataCipher`` is shared by the
catalog, every collection and every WAL writer, so everything written from then on uses it; the old keys stay
in the ring for reading), then a background thread rewrites each file still under an older key:

* ``catalog.enc``, ``replica.enc``: small; re-encrypted under the catalog lock (their writers hold it too).
* ``collections/<cid>/MANIFEST.enc``: under the collection's write lock (its only writer holds it).
* ``seg-N.enc`` (immutable): streamed into a temp file outside any lock, one 4 MiB chunk at a time; the temp
  file is moved over the original under the write lock once no snapshot or replication read has the collection
  pinned (and only if the segment is still there: a compaction may have removed it meanwhile).
* ``wal-N.log``: frame by frame into a temp file (same lengths, so replicas' byte offsets stay valid), first up
  to the length captured under the write lock, then, under the write lock (appends wait), the frames appended
  since; then the move, and the active log's writer reopens the new file at the same position.

Every replacement is a fsynced temp file renamed over the original (then the folder fsynced): a crash leaves
each file whole under one key or the other, and an acknowledged write (fsynced before it was acknowledged, and
always in the log under the write lock) is in whichever copy is in place. After a crash the engine opens with
``data_key=new`` and ``previous_data_keys=[old]``; a ``start(new)`` then finishes the job (files already under
the new key are recognised by their first chunk or frame and left alone). When every file is under the current
key the previous keys are dropped from memory.

Staged replication snapshots (``.replication/``, removed on release or after 30 minutes) and restore/bootstrap
staging folders are transient and not rewritten.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.core.errors import Conflict

from .crypto import commit_file, key_id, temp_path
from .wal import reencrypt_frames, wal_is_current

if TYPE_CHECKING:
    from .collection import Collection
    from .engine import Engine

log = logging.getLogger("vecta.engine.rekey")

STATE_FILE = "replica.enc"  # replication.py's replica state (kept here: replication imports the engine)
PIN_WAIT = 0.02  # seconds between looks while a snapshot or a replication read has a collection pinned


class Aborted(Exception):
    """The engine is closing."""


class Rekeyer:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.state = "idle"
        self.key_id: str | None = None
        self.files_total = 0
        self.files_done = 0
        self.files_rewritten = 0
        self.error: str | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.hook: Callable[[str], None] | None = None  # tests: called after each file with its relative path

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "files_total": self.files_total,
            "files_done": self.files_done,
            "files_rewritten": self.files_rewritten,
            "error": self.error,
            "key_id": self.engine.cipher.key_id,
        }

    def start(self, key: bytes) -> dict[str, Any]:
        """Make ``key`` current and re-encrypt in the background. Idempotent for the key being applied or
        applied already; Conflict while another key's re-key runs."""
        kid = key_id(key)
        cipher = self.engine.cipher
        with self._lock:
            if self.state == "running":
                if kid == self.key_id:
                    return self.status()
                raise Conflict("a re-key to another data key is running; wait for it to finish",
                               code="rekey_in_progress")  # fmt: skip
            if cipher.is_current(key) and not cipher.has_previous:
                # the engine opened (or rewrote) everything it has under this key, and holds no other
                if not (self.state == "done" and self.key_id == kid):
                    self._reset("done", kid)
                return self.status()
            cipher.rotate(key)  # from now on every write uses the new key
            self._reset("running", kid)
            self._thread = threading.Thread(target=self._run, name="vecta-rekey", daemon=True)
            self._thread.start()
            log.info("re-key to key %s started", kid)
            return self.status()

    def _reset(self, state: str, kid: str) -> None:
        self.state = state
        self.key_id = kid
        self.files_total = self.files_done = self.files_rewritten = 0
        self.error = None
        self.started_at = time.time()
        self.finished_at = self.started_at if state == "done" else None

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        cipher = eng.cipher
        try:
            # files whose write began under the old key land first; every write started since uses the new one,
            # so whatever the listing below misses is under the new key already
            while cipher.old_writes():
                self._wait(0.005)
            seen: set[str] = set()
            for _ in range(2):  # the second pass only checks files that appeared during the first
                todo = [rel for rel in self._files() if rel not in seen]
                self.files_total += len(todo)
                for rel in todo:
                    self._check_stop()
                    if self._one(rel):
                        self.files_rewritten += 1
                    seen.add(rel)
                    self.files_done += 1
                    if self.hook is not None:
                        self.hook(rel)
            retired = cipher.previous_keys()
            if eng.on_keys_retired is not None and retired:
                eng.on_keys_retired(retired)  # a replica keeps them for its primary's frames (replication.py)
            cipher.drop_previous()
            self.finished_at = time.time()
            self.state = "done"
            log.info("re-key to key %s done: %d files, %d rewritten", self.key_id, self.files_done,
                     self.files_rewritten)  # fmt: skip
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.finished_at = time.time()
            self.state = "failed"
            if not isinstance(exc, Aborted):
                log.warning("re-key to key %s failed: %s", self.key_id, self.error)

    def _check_stop(self) -> None:
        if self.engine._stop.is_set():
            raise Aborted("the engine is closing")

    def _wait(self, seconds: float) -> None:
        if self.engine._stop.wait(seconds):
            raise Aborted("the engine is closing")

    def _files(self) -> list[str]:
        """Every encrypted file of the engine, relative to the data dir."""
        from .engine import CATALOG

        eng = self.engine
        out = [n for n in (CATALOG, STATE_FILE) if (eng.data_dir / n).exists()]
        for coll in list(eng.collections.values()):
            if coll.dropped:
                continue
            try:
                names = sorted(p.name for p in coll.root.iterdir())
            except FileNotFoundError:
                continue
            out += [f"{coll.rel}/{n}" for n in names if _collection_file(n)]
        return out

    def _one(self, rel: str) -> bool:
        """Re-encrypt one file if it is under an older key; True if it was rewritten."""
        eng = self.engine
        if "/" not in rel:
            with eng.catalog_lock:  # the catalog's and the replica state's writers hold it
                path = eng.data_dir / rel
                aad = b"vecta|" + rel.encode()
                if not path.exists() or eng.cipher.file_is_current(path, aad):
                    return False
                self._rewrite(path, aad)
                return True
        cdir, name = rel.rsplit("/", 1)
        coll = next((c for c in list(eng.collections.values()) if c.rel == cdir), None)
        if coll is None or coll.dropped:
            return False
        try:
            if name == "MANIFEST.enc":
                with coll.write_lock:
                    path = coll.root / name
                    if coll.dropped or eng.cipher.file_is_current(path, coll.aad(name)):
                        return False
                    self._rewrite(path, coll.aad(name))
                    return True
            if name.endswith(".log"):
                return self._wal(coll, name)
            return self._segment(coll, name)
        except FileNotFoundError:  # removed meanwhile (a compaction, a drop): nothing left to re-encrypt
            return False

    def _rewrite(self, path: Path, aad: bytes) -> None:
        """Re-encrypt a small file in place (the caller holds the lock its writers take)."""
        tmp = self.engine.cipher.reencrypt_file(path, aad)
        try:
            commit_file(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _segment(self, coll: Collection, name: str) -> bool:
        path = coll.root / name
        if self.engine.cipher.file_is_current(path, coll.aad(name)):
            return False
        before = path.stat()
        tmp = self.engine.cipher.reencrypt_file(path, coll.aad(name))  # outside the lock: segments never change
        try:
            while True:
                with coll.write_lock:
                    if coll.pins == 0:
                        now = _stat(path)
                        if coll.dropped or now is None or (now.st_ino, now.st_size) != (before.st_ino, before.st_size):
                            return False
                        commit_file(tmp, path)
                        return True
                self._wait(PIN_WAIT)
        finally:
            tmp.unlink(missing_ok=True)

    def _wal(self, coll: Collection, name: str) -> bool:
        cipher = self.engine.cipher
        path = coll.root / name
        aad = coll.aad(name)
        if wal_is_current(path, cipher, aad):
            return False
        with coll.write_lock:  # where the log ends now (a frame boundary: appends happen under this lock)
            end0 = _wal_end(coll, name, path)
        tmp = temp_path(path)
        try:
            with open(tmp, "wb") as dst:
                records = reencrypt_frames(path, dst, 0, end0, 0, cipher, aad)  # the bulk, appends go on
                while True:
                    with coll.write_lock:
                        if coll.pins == 0:
                            if coll.dropped or name not in coll.wal_files or not path.exists():
                                return False
                            end1 = _wal_end(coll, name, path)
                            reencrypt_frames(path, dst, end0, end1, records, cipher, aad)  # appended meanwhile
                            dst.flush()
                            os.fsync(dst.fileno())
                            commit_file(tmp, path)
                            if coll.wal is not None and coll.wal.path.name == name:
                                coll.wal.reopen()  # the active log: appends go on in the new file
                            return True
                    self._wait(PIN_WAIT)
        finally:
            tmp.unlink(missing_ok=True)


def _collection_file(name: str) -> bool:
    return (
        name == "MANIFEST.enc"
        or (name.startswith("seg-") and name.endswith(".enc"))
        or (name.startswith("wal-") and name.endswith(".log"))
    )


def _stat(path: Path) -> Any:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _wal_end(coll: Collection, name: str, path: Path) -> int:
    """Under the write lock: the valid length of a log (the writer's for the active one)."""
    if coll.wal is not None and coll.wal.path.name == name:
        return coll.wal.size
    return path.stat().st_size


__all__ = ["Rekeyer"]

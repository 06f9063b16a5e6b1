"""AES-256-GCM for everything the engine keeps at rest.

Two shapes:

* ``seal``/``open``: one small authenticated blob (``nonce | ciphertext+tag``), used by WAL records.
* ``write_file``/``read_file``: a chunked file for large payloads (segments, indexes, manifests).
  Layout: ``MAGIC | file-nonce(8) | total-length(u64)`` then chunks ``u32 length | ciphertext+tag``.
  Chunk ``i`` uses nonce ``file-nonce | i`` and is authenticated with the file's associated data (its role and
  relative path), the header, its index and a final-chunk flag, so a modified, reordered, truncated, extended
  or swapped-in file fails to decrypt instead of being served.

Writes are atomic: a temp file in the same folder, fsync, rename, fsync of the folder.

Key ring (re-key, ``rekey.py``): a ``DataCipher`` encrypts with its current key only and decrypts with the
current key first, then each previous key (GCM's tag tells which one is right), so the usual path costs what it
did with one key. No key id is stored: files written before re-keys read as before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"VCTAENC1"
CHUNK = 4 << 20
_HDR = struct.Struct("<8s8sQ")
_LEN = struct.Struct("<I")


class CorruptionError(Exception):
    """Stored data failed authentication or is structurally broken: tampered with or damaged."""


def parse_data_key(value: object, name: str = "VECTA_ENGINE_DATA_KEY") -> bytes:
    """A 32-byte key from its base64 text; errors name ``name`` and never show the value."""
    if not value:
        raise ValueError(f"{name} is not set (32 bytes, base64)")
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a base64 string")
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not valid base64") from None
    if len(key) != 32:
        raise ValueError(f"{name} must decode to 32 bytes, got {len(key)}")
    return key


def parse_data_keys(values: object, name: str) -> list[bytes]:
    """Optional previous keys: a list of base64 strings (or a comma-separated string, from the environment)."""
    if values is None or values == "":
        return []
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    if not isinstance(values, list):
        raise ValueError(f"{name} must be a list of base64 strings")
    return [parse_data_key(v, f"{name}[{i}]") for i, v in enumerate(values)]


def key_id(key: bytes) -> str:
    """A public name for a key (HMAC-SHA256 of a constant under the key, 8 bytes, hex): tells keys apart in
    replication headers, status documents and logs without revealing anything about them."""
    return hmac.new(key, b"vecta engine data key id", hashlib.sha256).hexdigest()[:16]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DataCipher:
    """AES-256-GCM with a key ring: ``key`` encrypts; ``key`` then each of ``previous`` decrypt.

    ``rotate`` makes another key current at once (the engine shares one cipher among all its collections and
    WAL writers, so everything written afterwards uses it); ``drop_previous`` forgets the old keys once nothing
    needs them. Attribute updates are ordered so a concurrent reader always finds the key it needs."""

    def __init__(self, key: bytes, previous: Iterable[bytes] = ()) -> None:
        for k in (key, *previous):
            if len(k) != 32:
                raise ValueError("the data key must be 32 bytes (AES-256)")
        self._key = bytes(key)
        self._aead = AESGCM(key)
        self._prev_keys: tuple[bytes, ...] = ()
        self._prev: tuple[AESGCM, ...] = ()
        self._set_previous([k for k in previous if not hmac.compare_digest(k, key)])
        self._writes_lock = threading.Lock()
        self._writing: dict[int, int] = {}  # key generation -> chunked files being written under it
        self._generation = 0

    # --- the ring ----------------------------------------------------------------------------------------
    def _set_previous(self, keys: list[bytes]) -> None:
        uniq: list[bytes] = []
        for k in keys:
            if not any(hmac.compare_digest(k, u) for u in uniq):
                uniq.append(bytes(k))
        self._prev_keys = tuple(uniq)
        self._prev = tuple(AESGCM(k) for k in uniq)

    @property
    def key_id(self) -> str:
        return key_id(self._key)

    def key_ids(self) -> list[str]:
        """Public ids of the ring's keys, the current one first."""
        return [key_id(k) for k in (self._key, *self._prev_keys)]

    def is_current(self, key: bytes) -> bool:
        return hmac.compare_digest(key, self._key)

    @property
    def has_previous(self) -> bool:
        return bool(self._prev)

    def previous_keys(self) -> list[bytes]:
        return list(self._prev_keys)

    def rotate(self, key: bytes) -> None:
        """Make ``key`` current; the old current key (and the previous ones) stay in the ring for reading."""
        if len(key) != 32:
            raise ValueError("the data key must be 32 bytes (AES-256)")
        if self.is_current(key):
            return
        old = self._key
        # previous first: a reader that still sees the old current key, or already the new one, finds both
        self._set_previous([k for k in (old, *self._prev_keys) if not hmac.compare_digest(k, key)])
        with self._writes_lock:
            self._generation += 1
            self._key = bytes(key)
            self._aead = AESGCM(key)

    def drop_previous(self) -> list[bytes]:
        """Forget the previous keys (every file is under the current one); returns them."""
        keys = list(self._prev_keys)
        self._prev = ()
        self._prev_keys = ()
        return keys

    def with_extra(self, keys: Iterable[bytes]) -> DataCipher:
        """A new ring: this one's keys (current first) plus ``keys`` for reading."""
        return DataCipher(self._key, [*self._prev_keys, *keys])

    def old_writes(self) -> int:
        """Chunked files still being written under a key that was current when they started but is not any
        more (a re-key waits these out before it lists the files to re-encrypt)."""
        with self._writes_lock:
            return sum(n for gen, n in self._writing.items() if gen != self._generation)

    def _aeads(self) -> tuple[AESGCM, ...]:
        return (self._aead, *self._prev)

    def current_opens(self, blob: bytes | memoryview, aad: bytes) -> bool:
        """Whether the current key (alone) opens this ``seal``ed blob."""
        if len(blob) < 28:
            raise CorruptionError("encrypted blob too short")
        try:
            self._aead.decrypt(bytes(blob[:12]), bytes(blob[12:]), aad)
        except InvalidTag:
            return False
        return True

    # --- small blobs -------------------------------------------------------------------------------------
    def seal(self, data: bytes | memoryview, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def seal_parts(self, data: bytes | list[bytes | memoryview], aad: bytes) -> tuple[bytes, bytes]:
        """(nonce, ciphertext+tag) for ``data`` (or its parts concatenated), without joining nonce and text."""
        if isinstance(data, list):
            data = b"".join(data)
        nonce = os.urandom(12)
        return nonce, self._aead.encrypt(nonce, data, aad)

    def open(self, blob: bytes | memoryview, aad: bytes) -> bytes:
        if len(blob) < 28:
            raise CorruptionError("encrypted blob too short")
        nonce, ct = bytes(blob[:12]), bytes(blob[12:])
        try:
            return self._aead.decrypt(nonce, ct, aad)
        except InvalidTag:
            for aead in self._prev:  # empty unless a re-key is running (or was interrupted)
                try:
                    return aead.decrypt(nonce, ct, aad)
                except InvalidTag:
                    pass
        raise CorruptionError("authentication failed (tampered or wrong key)")

    # --- chunked files -----------------------------------------------------------------------------------
    def write_file(self, path: Path, parts: Iterable[bytes | memoryview], aad: bytes) -> int:
        """Encrypt ``parts`` (concatenated) into ``path`` atomically; returns the file size."""
        pieces: list[memoryview] = []
        total = 0
        for part in parts:
            mv = memoryview(part).cast("B")
            total += len(mv)
            for off in range(0, len(mv), CHUNK):
                pieces.append(mv[off : off + CHUNK])
        if not pieces:
            pieces.append(memoryview(b""))
        prefix = os.urandom(8)
        header = _HDR.pack(MAGIC, prefix, total)
        tmp = temp_path(path)
        size = 0
        with self._writes_lock:  # one key for the whole file, even if the ring rotates meanwhile
            aead, gen = self._aead, self._generation
            self._writing[gen] = self._writing.get(gen, 0) + 1
        try:
            with open(tmp, "wb") as fh:
                fh.write(header)
                size += len(header)
                last = len(pieces) - 1
                for i, piece in enumerate(pieces):
                    nonce = prefix + struct.pack("<I", i)
                    ct = aead.encrypt(nonce, piece, self._chunk_aad(aad, header, i, i == last))
                    fh.write(_LEN.pack(len(ct)))
                    fh.write(ct)
                    size += 4 + len(ct)
                fh.flush()
                os.fsync(fh.fileno())
            commit_file(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            with self._writes_lock:
                self._writing[gen] -= 1
                if not self._writing[gen]:
                    del self._writing[gen]
        return size

    @staticmethod
    def _chunk_aad(aad: bytes, header: bytes, i: int, final: bool) -> bytes:
        return aad + b"|" + header + struct.pack("<IB", i, 1 if final else 0)

    def read_file(self, path: Path, aad: bytes) -> np.ndarray:
        """Decrypt a chunked file into one uint8 array (peak memory: the plaintext plus one chunk)."""
        with open(path, "rb") as fh:
            prefix, total, header = _header(fh, path)
            out = np.empty(total, dtype=np.uint8)
            dest = out.data
            ct_buf = memoryview(bytearray(CHUNK + 16))  # one buffer for every chunk's ciphertext
            aeads = self._aeads()  # the first chunk picks the key (current first); every other chunk uses it
            pos = 0
            for i, ct, final in _chunks(fh, path, total, ct_buf):
                nonce = prefix + struct.pack("<I", i)
                chunk_aad = self._chunk_aad(aad, header, i, final)
                plain = dest[pos : pos + len(ct) - 16]
                for k, aead in enumerate(aeads):
                    try:  # straight into the result: no plaintext chunk to allocate and copy (restore, open)
                        aead.decrypt_into(nonce, ct, chunk_aad, plain)
                    except InvalidTag:
                        if k == len(aeads) - 1:
                            raise CorruptionError(
                                f"{path.name}: authentication failed (tampered or wrong key)"
                            ) from None
                    else:
                        aeads = (aead,)
                        break
                pos += len(plain)
        return out

    # --- re-key ------------------------------------------------------------------------------------------
    def file_is_current(self, path: Path, aad: bytes) -> bool:
        """Whether the current key opens ``path`` (a chunked file; its first chunk is checked: a file is
        written under one key). Raises CorruptionError for a file no key of the ring opens."""
        with open(path, "rb") as fh:
            prefix, total, header = _header(fh, path)
            ct_buf = memoryview(bytearray(CHUNK + 16))
            for i, ct, final in _chunks(fh, path, total, ct_buf):
                nonce = prefix + struct.pack("<I", i)
                chunk_aad = self._chunk_aad(aad, header, i, final)
                for k, aead in enumerate(self._aeads()):
                    try:
                        aead.decrypt(nonce, bytes(ct), chunk_aad)
                    except InvalidTag:
                        continue
                    return k == 0
                raise CorruptionError(f"{path.name}: authentication failed (tampered or wrong key)")
        raise CorruptionError(f"{path.name}: no chunk")  # pragma: no cover  (_chunks yields at least one)

    def reencrypt_file(self, path: Path, aad: bytes) -> Path:
        """Stream ``path`` (a chunked file, under any key of the ring) into a fsynced temp file beside it under
        the current key, one chunk in memory at a time; returns the temp file, for the caller to move into
        place (``commit_file``) or remove."""
        tmp = temp_path(path)
        aead = self._aead
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                old_prefix, total, old_header = _header(src, path)
                prefix = os.urandom(8)
                header = _HDR.pack(MAGIC, prefix, total)
                dst.write(header)
                ct_buf = memoryview(bytearray(CHUNK + 16))
                aeads = self._aeads()
                for i, ct, final in _chunks(src, path, total, ct_buf):
                    plain = None
                    nonce = old_prefix + struct.pack("<I", i)
                    chunk_aad = self._chunk_aad(aad, old_header, i, final)
                    for old in aeads:
                        try:
                            plain = old.decrypt(nonce, bytes(ct), chunk_aad)
                        except InvalidTag:
                            continue
                        aeads = (old,)
                        break
                    if plain is None:
                        raise CorruptionError(f"{path.name}: authentication failed (tampered or wrong key)")
                    out = aead.encrypt(prefix + struct.pack("<I", i), plain, self._chunk_aad(aad, header, i, final))
                    dst.write(_LEN.pack(len(out)))
                    dst.write(out)
                dst.flush()
                os.fsync(dst.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp


def temp_path(path: Path) -> Path:
    """A temp file beside ``path`` (``.tmp-`` names are removed when a collection opens)."""
    return path.with_name(f".tmp-{path.name}-{os.getpid()}-{os.urandom(4).hex()}")


def commit_file(tmp: Path, path: Path) -> None:
    """Move a fsynced temp file over ``path`` atomically and make the rename durable."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _header(fh: Any, path: Path) -> tuple[bytes, int, bytes]:
    header = fh.read(_HDR.size)
    if len(header) != _HDR.size:
        raise CorruptionError(f"{path.name}: truncated header")
    magic, prefix, total = _HDR.unpack(header)
    if magic != MAGIC:
        raise CorruptionError(f"{path.name}: not an engine file")
    if total > (1 << 40):
        raise CorruptionError(f"{path.name}: implausible length")
    return prefix, total, header


def _chunks(fh: Any, path: Path, total: int, ct_buf: memoryview) -> Iterator[tuple[int, memoryview, bool]]:
    """(index, ciphertext, final) of each chunk of an open chunked file after its header; checks the framing
    (lengths, the final chunk, nothing after it). The ciphertext view is reused for the next chunk."""
    pos = 0
    i = 0
    while True:
        raw_len = fh.read(4)
        if len(raw_len) != 4:
            raise CorruptionError(f"{path.name}: truncated (no final chunk)")
        (clen,) = _LEN.unpack(raw_len)
        if clen < 16 or clen > CHUNK + 16:
            raise CorruptionError(f"{path.name}: bad chunk length")
        ct = ct_buf[:clen]
        if fh.readinto(ct) != clen:
            raise CorruptionError(f"{path.name}: truncated chunk")
        plain_len = clen - 16
        if pos + plain_len > total:
            raise CorruptionError(f"{path.name}: longer than its header says")
        final = pos + plain_len == total
        yield i, ct, final
        pos += plain_len
        i += 1
        if final:
            break
    if fh.read(1):
        raise CorruptionError(f"{path.name}: trailing bytes after the final chunk")

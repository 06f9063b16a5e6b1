"""AES-256-GCM for everything the engine keeps at rest.

Two shapes:

* ``seal``/``open``: one small authenticated blob (``nonce | ciphertext+tag``), used by WAL records.
* ``write_file``/``read_file``: a chunked file for large payloads (segments, indexes, manifests).
  Layout: ``MAGIC | file-nonce(8) | total-length(u64)`` then chunks ``u32 length | ciphertext+tag``.
  Chunk ``i`` uses nonce ``file-nonce | i`` and is authenticated with the file's associated data (its role and
  relative path), the header, its index and a final-chunk flag, so a modified, reordered, truncated, extended
  or swapped-in file fails to decrypt instead of being served.

Writes are atomic: a temp file in the same folder, fsync, rename, fsync of the folder.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"VCTAENC1"
CHUNK = 4 << 20
_HDR = struct.Struct("<8s8sQ")
_LEN = struct.Struct("<I")


class CorruptionError(Exception):
    """Stored data failed authentication or is structurally broken: tampered with or damaged."""


def parse_data_key(value: str | None) -> bytes:
    if not value:
        raise ValueError("VECTA_ENGINE_DATA_KEY is not set (32 bytes, base64)")
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("VECTA_ENGINE_DATA_KEY is not valid base64") from exc
    if len(key) != 32:
        raise ValueError(f"VECTA_ENGINE_DATA_KEY must decode to 32 bytes, got {len(key)}")
    return key


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DataCipher:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the data key must be 32 bytes (AES-256)")
        self._aead = AESGCM(key)

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
        try:
            return self._aead.decrypt(bytes(blob[:12]), bytes(blob[12:]), aad)
        except InvalidTag as exc:
            raise CorruptionError("authentication failed (tampered or wrong key)") from exc

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
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{os.urandom(4).hex()}")
        size = 0
        try:
            with open(tmp, "wb") as fh:
                fh.write(header)
                size += len(header)
                last = len(pieces) - 1
                for i, piece in enumerate(pieces):
                    nonce = prefix + struct.pack("<I", i)
                    ct = self._aead.encrypt(nonce, piece, self._chunk_aad(aad, header, i, i == last))
                    fh.write(_LEN.pack(len(ct)))
                    fh.write(ct)
                    size += 4 + len(ct)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    @staticmethod
    def _chunk_aad(aad: bytes, header: bytes, i: int, final: bool) -> bytes:
        return aad + b"|" + header + struct.pack("<IB", i, 1 if final else 0)

    def read_file(self, path: Path, aad: bytes) -> np.ndarray:
        """Decrypt a chunked file into one uint8 array (peak memory: the plaintext plus one chunk)."""
        with open(path, "rb") as fh:
            header = fh.read(_HDR.size)
            if len(header) != _HDR.size:
                raise CorruptionError(f"{path.name}: truncated header")
            magic, prefix, total = _HDR.unpack(header)
            if magic != MAGIC:
                raise CorruptionError(f"{path.name}: not an engine file")
            if total > (1 << 40):
                raise CorruptionError(f"{path.name}: implausible length")
            out = np.empty(total, dtype=np.uint8)
            dest = out.data
            ct_buf = memoryview(bytearray(CHUNK + 16))  # one buffer for every chunk's ciphertext
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
                nonce = prefix + struct.pack("<I", i)
                plain_len = clen - 16
                if pos + plain_len > total:
                    raise CorruptionError(f"{path.name}: longer than its header says")
                final = pos + plain_len == total
                try:  # straight into the result: no plaintext chunk to allocate and copy (restore, open)
                    self._aead.decrypt_into(
                        nonce, ct, self._chunk_aad(aad, header, i, final), dest[pos : pos + plain_len]
                    )
                except InvalidTag as exc:
                    raise CorruptionError(f"{path.name}: authentication failed (tampered or wrong key)") from exc
                pos += plain_len
                i += 1
                if final:
                    break
            if fh.read(1):
                raise CorruptionError(f"{path.name}: trailing bytes after the final chunk")
        return out

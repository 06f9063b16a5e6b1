"""Write-ahead log: one append-only file per collection generation.

Frame: ``u32 body-length | u32 crc32(body) | body`` where ``body = nonce | AES-GCM(payload)`` with associated
data ``aad | record-number``. The CRC finds torn writes cheaply; the GCM tag (bound to the record's position)
finds tampering, reordering and records moved between files. Every append is followed by ``fdatasync``
before the caller acknowledges the write.

Recovery rule: a bad frame that reaches the end of the file (or is followed only by zero bytes, as a file
system may leave after a crash) is a torn tail and is cut off; a bad frame followed by more data, or a frame
whose CRC is right but whose tag is not, is corruption and refuses to load.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .crypto import CorruptionError, DataCipher

_FRAME = struct.Struct("<II")


def _aad(base: bytes, lsn: int) -> bytes:
    return base + struct.pack("<Q", lsn)


def read_wal(path: Path, cipher: DataCipher, aad: bytes) -> tuple[list[bytes], int, bool]:
    """Returns (payloads, length of the valid prefix, whether a torn tail was found)."""
    data = path.read_bytes() if path.exists() else b""
    out: list[bytes] = []
    pos = 0
    n = len(data)
    while pos < n:
        bad = False
        end = pos + _FRAME.size
        if end > n:
            bad = True
        else:
            length, crc = _FRAME.unpack_from(data, pos)
            end = pos + _FRAME.size + length
            if length < 28 or end > n or zlib.crc32(data[pos + _FRAME.size : end]) != crc:
                bad = True
        if bad:
            if end >= n or not data[pos:].strip(b"\x00"):
                return out, pos, True
            raise CorruptionError(f"{path.name}: corrupt record #{len(out)} at offset {pos} followed by more data")
        body = data[pos + _FRAME.size : end]
        out.append(cipher.open(body, _aad(aad, len(out))))
        pos = end
    return out, pos, False


def _writev_all(fd: int, parts: list[bytes | memoryview]) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        written = os.writev(fd, views[:512])
        while written and views:
            n = len(views[0])
            if written >= n:
                written -= n
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0


class WalWriter:
    def __init__(self, path: Path, cipher: DataCipher, aad: bytes, *, valid_length: int, records: int) -> None:
        self.path = path
        self._cipher = cipher
        self._aad = aad
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        size = os.fstat(self._fd).st_size
        if size != valid_length:
            os.ftruncate(self._fd, valid_length)
            os.fsync(self._fd)
        os.lseek(self._fd, valid_length, os.SEEK_SET)
        self.size = valid_length
        self.records = records

    def append(self, payload: bytes | list[bytes | memoryview]) -> None:
        self.append_many([payload])

    def append_many(self, payloads: Sequence[bytes | list[bytes | memoryview]]) -> None:
        """Append records (each given whole or as parts to concatenate) and fdatasync once (group commit)."""
        frames: list[bytes | memoryview] = []
        size = 0
        for i, payload in enumerate(payloads):
            # one encryption per record; the frame is written with writev, not copied together
            nonce, ct = self._cipher.seal_parts(payload, _aad(self._aad, self.records + i))
            length = len(nonce) + len(ct)
            crc = zlib.crc32(ct, zlib.crc32(nonce))
            frames += (_FRAME.pack(length, crc), nonce, ct)
            size += _FRAME.size + length
        try:
            _writev_all(self._fd, frames)
            os.fdatasync(self._fd)
        except OSError:
            # never leave half a frame behind an acknowledged one: cut back to the last good end
            os.ftruncate(self._fd, self.size)
            os.lseek(self._fd, self.size, os.SEEK_SET)
            raise
        self.size += size
        self.records += len(payloads)

    def reopen(self) -> None:
        """Write to whatever file is at ``path`` now (a re-key moved a re-encrypted copy, same frames and length,
        over it), from the same position. The caller holds the collection's write lock (no append in flight)."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            if os.fstat(fd).st_size != self.size:
                raise CorruptionError(f"{self.path.name}: the re-encrypted copy does not match the log's length")
            os.lseek(fd, self.size, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# -- replication: frames travel as they are on disk (still encrypted) -----------------------------------------
def read_frames(path: Path, offset: int, end: int, max_bytes: int) -> tuple[bytes, int]:
    """Whole frames of ``path`` from byte ``offset`` up to ``end`` (a frame boundary captured under the write
    lock), at most ``max_bytes`` of them but always at least one. Returns (raw frames, how many). A frame whose
    length or CRC is wrong means the caller's position is not a frame boundary: CorruptionError."""
    avail = max(0, end - offset)
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(min(avail, max(max_bytes, _FRAME.size)))
        if len(data) >= _FRAME.size:
            first = _FRAME.size + _FRAME.unpack_from(data, 0)[0]
            if len(data) < first <= avail:  # one frame larger than the budget still goes out whole
                data += fh.read(first - len(data))
    pos = count = 0
    n = len(data)
    while pos < n:
        stop = pos + _FRAME.size
        if stop <= n:
            length, crc = _FRAME.unpack_from(data, pos)
            stop += length
        if stop > n:
            if n < avail:  # cut by the budget: the rest goes in the next answer
                break
            raise CorruptionError(f"{path.name}: no whole frame at offset {offset + pos}")
        if length < 28 or zlib.crc32(data[pos + _FRAME.size : stop]) != crc:
            raise CorruptionError(f"{path.name}: no valid frame at offset {offset + pos}")
        pos = stop
        count += 1
    return data[:pos], count


def open_frames(data: bytes, cipher: DataCipher, aad: bytes, first_record: int) -> list[bytes]:
    """Decrypt frames produced by ``read_frames`` (record numbers from ``first_record``, bound to the file's
    associated data as on disk): any change, reordering or a wrong position fails authentication."""
    out: list[bytes] = []
    pos = 0
    view = memoryview(data)
    while pos < len(data):
        if pos + _FRAME.size > len(data):
            raise CorruptionError("truncated replication frame")
        length, crc = _FRAME.unpack_from(data, pos)
        body = view[pos + _FRAME.size : pos + _FRAME.size + length]
        if len(body) != length or zlib.crc32(body) != crc:
            raise CorruptionError("replication frame failed its CRC")
        out.append(cipher.open(bytes(body), _aad(aad, first_record + len(out))))
        pos += _FRAME.size + length
    return out


# -- re-key: the same frames (same lengths, so every byte offset stays valid) under the current key ---------------
def wal_is_current(path: Path, cipher: DataCipher, aad: bytes) -> bool:
    """Whether the log holds nothing under an older key. Its first frame tells: a log's frames are written under
    the key current at each append, and keys only move forward, so older frames always come first."""
    with open(path, "rb") as fh:
        head = fh.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return True
        length, crc = _FRAME.unpack(head)
        body = fh.read(length)
    if length < 28 or len(body) != length or zlib.crc32(body) != crc:
        raise CorruptionError(f"{path.name}: corrupt first record")
    if cipher.current_opens(body, _aad(aad, 0)):
        return True
    cipher.open(body, _aad(aad, 0))  # opened by an older key of the ring, or CorruptionError
    return False


def reencrypt_frames(
    src: Path, dst: Any, offset: int, end: int, first_record: int, cipher: DataCipher, aad: bytes
) -> int:
    """Append the frames of ``src`` from byte ``offset`` (record ``first_record``) up to byte ``end`` to the open
    file ``dst``, each decrypted with the ring and encrypted again under the current key: same lengths, new
    nonces and CRCs. Returns how many frames. Anything that is not whole valid frames is CorruptionError."""
    count = 0
    with open(src, "rb") as fh:
        fh.seek(offset)
        pos = offset
        while pos < end:
            head = fh.read(_FRAME.size)
            if len(head) != _FRAME.size:
                raise CorruptionError(f"{src.name}: no whole frame at offset {pos}")
            length, crc = _FRAME.unpack(head)
            body = fh.read(length)
            if length < 28 or len(body) != length or zlib.crc32(body) != crc or pos + _FRAME.size + length > end:
                raise CorruptionError(f"{src.name}: no valid frame at offset {pos}")
            rec_aad = _aad(aad, first_record + count)
            nonce, ct = cipher.seal_parts(cipher.open(body, rec_aad), rec_aad)
            if len(nonce) + len(ct) != length:  # pragma: no cover  (GCM keeps lengths)
                raise CorruptionError(f"{src.name}: re-encrypted frame changed length")
            dst.write(_FRAME.pack(length, zlib.crc32(ct, zlib.crc32(nonce))))
            dst.write(nonce)
            dst.write(ct)
            pos += _FRAME.size + length
            count += 1
    return count

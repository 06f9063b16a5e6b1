"""Object-store client: one typed protocol, an S3 implementation (boto3) and a local-folder implementation.

URIs: ``s3://bucket/prefix`` (credentials and endpoint from boto3's usual sources, e.g. ``AWS_ENDPOINT_URL``,
or an explicit ``endpoint_url``) and ``file:///absolute/path``. Keys are ``/``-separated and relative to the
URI's prefix; ``..`` and absolute keys are refused so a key can never escape the prefix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse


class ObjectStoreError(Exception):
    """A failure talking to the object store (missing object, bad URI, transport error)."""


class ObjectNotFound(ObjectStoreError):
    pass


@runtime_checkable
class ObjectStore(Protocol):
    uri: str

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def put_file(self, key: str, path: Path, *, length: int | None = None) -> None:
        """Upload a local file (only its first ``length`` bytes when given)."""
        ...

    def get_file(self, key: str, path: Path) -> None: ...

    def list_keys(self, prefix: str = "") -> list[str]: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ObjectStoreError(f"invalid object key {key!r}")
    return key


def _copy_prefix(src: Path, dst_fh: Any, length: int | None) -> None:
    with open(src, "rb") as fh:
        if length is None:
            shutil.copyfileobj(fh, dst_fh, 1 << 20)
            return
        remaining = length
        while remaining > 0:
            buf = fh.read(min(1 << 20, remaining))
            if not buf:
                raise ObjectStoreError(f"{src} is shorter than {length} bytes")
            dst_fh.write(buf)
            remaining -= len(buf)


class LocalObjectStore:
    """Objects as files under a root folder; writes are atomic (temp file + fsync + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.uri = self.root.resolve().as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _atomic_write(self, key: str, writer: Any) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                writer(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda fh: fh.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.uri}/{key} not found") from exc

    def put_file(self, key: str, path: Path, *, length: int | None = None) -> None:
        self._atomic_write(key, lambda fh: _copy_prefix(Path(path), fh, length))

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(f"{self.uri}/{key} not found")
        shutil.copyfile(src, path)

    def list_keys(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.rglob("*"):
            if p.is_file() and not p.name.startswith(".tmp-"):
                rel = p.relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


class S3ObjectStore:
    """Objects under ``s3://bucket/prefix`` through boto3, with explicit timeouts and retries."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region_name or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 5, "mode": "standard"}),
        )

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _wrap(self, exc: Exception, key: str) -> ObjectStoreError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectNotFound(f"{self.uri}/{key} not found")
        return ObjectStoreError(f"object store error on {self.uri}/{key}: {exc}")

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return bytes(resp["Body"].read())
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def put_file(self, key: str, path: Path, *, length: int | None = None) -> None:
        try:
            if length is None:
                self._client.upload_file(str(path), self.bucket, self._key(key))
                return
            with tempfile.TemporaryFile() as tmp:
                _copy_prefix(Path(path), tmp, length)
                tmp.seek(0)
                self._client.upload_fileobj(tmp, self.bucket, self._key(key))
        except ObjectStoreError:
            raise
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def get_file(self, key: str, path: Path) -> None:
        try:
            self._client.download_file(self.bucket, self._key(key), str(path))
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def list_keys(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                out.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except Exception as exc:
            raise self._wrap(exc, prefix) from exc
        return sorted(out)

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as exc:
            err = self._wrap(exc, key)
            if isinstance(err, ObjectNotFound):
                return False
            raise err from exc


def open_object_store(uri: str, *, endpoint_url: str | None = None, client: Any = None) -> ObjectStore:
    """An object store for ``s3://bucket/prefix`` or ``file:///path``."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ObjectStoreError(f"s3 URI {uri!r} has no bucket")
        return S3ObjectStore(parsed.netloc, parsed.path, client=client, endpoint_url=endpoint_url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ObjectStoreError(f"file URI {uri!r} must be local (file:///path)")
        return LocalObjectStore(Path(unquote(parsed.path)))
    raise ObjectStoreError(f"unsupported object store URI {uri!r}: use s3://bucket/prefix or file:///path")

"""Where an import reads from: URI rules (checked at the edge and again by the task) and fetching the object.

``s3://bucket/key`` is read with the deployment's own credentials (boto3's usual chain), optionally limited to
``VECTA_IMPORT_ALLOWED_BUCKETS``. ``file:///path`` is accepted only when the configured object store is a local
folder and the path, with symlinks resolved, lies inside it. Either way the object store's own areas
(``clusters/``, ``backups/``: every tenant's snapshots) are off limits.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from services.control_plane.imports.settings import ImportSettings
from services.core.errors import BadRequest
from services.core.settings import get_settings

RESERVED_AREAS = ("clusters", "backups")  # object-store prefixes that hold engine snapshots
MAX_URI_LEN = 2048


class ImportFailed(Exception):
    """The import cannot go on; the message (shown in the job's ``error``) says why."""


@dataclass(frozen=True)
class Target:
    uri: str
    scheme: str  # "s3" | "file"
    bucket: str = ""
    key: str = ""
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.key if self.scheme == "s3" else str(self.path)


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    version: str  # ETag (S3) or size:mtime (local): a resumed import checks the object did not change


def _forbidden(detail: str) -> BadRequest:
    return BadRequest(f"uri: {detail}", code="import_uri_forbidden")


def check_uri(uri: Any, settings: ImportSettings) -> Target:
    """The parsed target of an import URI, or a 400 naming what is wrong with it."""
    if not isinstance(uri, str) or not uri.strip():
        raise BadRequest("uri is required: s3://bucket/key or a file:// URI in the object store", code="invalid_uri")
    uri = uri.strip()
    if len(uri) > MAX_URI_LEN:
        raise BadRequest(f"uri is longer than {MAX_URI_LEN} characters", code="invalid_uri")
    parsed = urlparse(uri)
    store = urlparse(get_settings().objects_uri)
    if parsed.scheme == "s3":
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        if not bucket or not key or key.endswith("/"):
            raise BadRequest("uri: an s3 URI names one object: s3://bucket/key", code="invalid_uri")
        if parsed.query or parsed.fragment:
            raise BadRequest("uri: an s3 URI has no query or fragment", code="invalid_uri")
        if settings.buckets and bucket not in settings.buckets:
            raise _forbidden(f"bucket {bucket!r} is not one imports may read in this deployment")
        if store.scheme == "s3" and bucket == store.netloc:
            prefix = store.path.strip("/")
            rel = key[len(prefix) + 1 :] if prefix and key.startswith(prefix + "/") else (None if prefix else key)
            if rel is not None and rel.split("/", 1)[0] in RESERVED_AREAS:
                raise _forbidden("that part of the object store holds cluster data and cannot be imported from")
        return Target(uri=uri, scheme="s3", bucket=bucket, key=key)
    if parsed.scheme == "file":
        if store.scheme != "file":
            raise _forbidden("file:// URIs are accepted only when the object store is a local folder; use s3://")
        if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
            raise BadRequest("uri: a file URI is file:///absolute/path", code="invalid_uri")
        root = Path(unquote(store.path)).resolve()
        path = Path(unquote(parsed.path))
        if not path.is_absolute():
            raise BadRequest("uri: a file URI is file:///absolute/path", code="invalid_uri")
        resolved = path.resolve()  # symlinks and '..' resolved: the real location must be inside the root
        if not resolved.is_relative_to(root) or resolved == root:
            raise _forbidden("file:// URIs must point to a file inside the object store's folder")
        if resolved.relative_to(root).parts[0] in RESERVED_AREAS:
            raise _forbidden("that part of the object store holds cluster data and cannot be imported from")
        return Target(uri=uri, scheme="file", path=resolved)
    raise BadRequest(
        f"uri: unsupported scheme {parsed.scheme or '(none)'!r}; use s3://bucket/key or a file:// URI inside the "
        "object store",
        code="invalid_uri",
    )


def _s3_client() -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 5, "mode": "standard"}),
    )


def _s3_error(exc: Exception, target: Target) -> ImportFailed:
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return ImportFailed(f"cannot read {target.uri}: no S3 credentials are configured for the import workers")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code == "NoSuchBucket":
            return ImportFailed(f"cannot read {target.uri}: bucket {target.bucket!r} does not exist")
        if code in ("NoSuchKey", "404", "NotFound"):
            return ImportFailed(f"cannot read {target.uri}: the object does not exist")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId"):
            return ImportFailed(
                f"cannot read {target.uri}: access denied (the bucket must grant this deployment read access)"
            )
        return ImportFailed(f"cannot read {target.uri}: S3 answered {code or 'an error'}")
    return ImportFailed(f"cannot read {target.uri}: {type(exc).__name__} talking to S3")


@contextlib.contextmanager
def fetch(target: Target, settings: ImportSettings) -> Iterator[Fetched]:
    """The object as a local file: a local-store file is read in place; an S3 object is streamed to a temporary
    file (never held in memory) that is removed afterwards. Over ``max_bytes`` fails before anything is read."""
    if target.scheme == "file":
        assert target.path is not None
        try:
            st = target.path.stat()
        except FileNotFoundError:
            raise ImportFailed(f"cannot read {target.uri}: the object does not exist") from None
        except OSError as exc:
            raise ImportFailed(f"cannot read {target.uri}: {exc.strerror or 'not readable'}") from None
        if not target.path.is_file():
            raise ImportFailed(f"cannot read {target.uri}: not a file")
        _check_size(st.st_size, target, settings)
        yield Fetched(target.path, st.st_size, f"{st.st_size}:{st.st_mtime_ns}")
        return
    client = _s3_client()
    try:
        head = client.head_object(Bucket=target.bucket, Key=target.key)
    except Exception as exc:
        if _is_404_without_bucket_info(exc):
            # HEAD answers carry no error code: ask the bucket whether it exists to say which is missing
            try:
                client.head_bucket(Bucket=target.bucket)
            except Exception as bexc:
                if _is_404_without_bucket_info(bexc):
                    raise ImportFailed(f"cannot read {target.uri}: bucket {target.bucket!r} does not exist") from None
        raise _s3_error(exc, target) from None
    size = int(head.get("ContentLength", 0))
    _check_size(size, target, settings)
    version = str(head.get("ETag", "")) or f"{size}"
    tmp_root = get_settings().home / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_root, prefix="import-") as tmp:
        path = Path(tmp) / "object"
        try:
            client.download_file(target.bucket, target.key, str(path))
        except Exception as exc:
            raise _s3_error(exc, target) from None
        yield Fetched(path, path.stat().st_size, version)


def _is_404_without_bucket_info(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NotFound")


def _check_size(size: int, target: Target, settings: ImportSettings) -> None:
    if size > settings.max_bytes:
        raise ImportFailed(
            f"{target.uri} is {size} bytes; imports read at most {settings.max_bytes} bytes "
            "(VECTA_IMPORT_MAX_BYTES): split the file into several imports"
        )
    if size == 0:
        raise ImportFailed(f"{target.uri} is empty")

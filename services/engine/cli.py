"""``python -m services.engine serve`` (or ``vecta engine serve``): run one engine worker (uvloop + httptools
behind a lean HTTP/1.1 front, one process)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

UVICORN_OPTIONS: dict[str, Any] = {  # what `serve` and an assigned `spare` run uvicorn with
    "loop": "uvloop",
    "http": "httptools",
    "lifespan": "on",
    "access_log": False,
    "timeout_keep_alive": 30,
    "proxy_headers": False,
    "server_header": False,
    "date_header": False,
}


def serve_http(asgi: Any, host: str, port: int, log_level: str) -> None:
    """The engine's own lean HTTP/1.1 front (services/engine/http.py); VECTA_ENGINE_HTTP=uvicorn runs it under
    uvicorn instead (the benchmark's baseline for that choice, and a fallback)."""
    if os.environ.get("VECTA_ENGINE_HTTP", "lean") == "uvicorn":
        import uvicorn

        uvicorn.run(asgi, host=host, port=port, log_level=log_level, **UVICORN_OPTIONS)
        return
    from .http import run

    run(asgi, host, port, max_body=asgi.max_body)


def build_parser() -> argparse.ArgumentParser:
    """The engine's command line. argparse rather than typer: typer (0.29) coerces every option through pydantic,
    and importing it costs every engine process ~11 MiB of RSS and ~60 ms of start-up for a handful of flags.
    ``vecta engine ...`` (typer, services/cli.py) hands its arguments to this parser untouched."""
    ap = argparse.ArgumentParser(prog="vecta engine", description="Vecta vector engine worker")
    sub = ap.add_subparsers(dest="command", required=True)
    sv = sub.add_parser(
        "serve", help="Serve the data-plane API", description="Serve the data-plane API. Needs VECTA_ENGINE_TOKEN "
        "and VECTA_ENGINE_DATA_KEY (32 bytes, base64) in the environment (optional: VECTA_ENGINE_PREVIOUS_DATA_KEYS, "
        "comma-separated), or with --secrets-stdin one JSON line on stdin."
    )  # fmt: skip
    sv.add_argument("--data-dir", required=True, help="Folder holding this worker's encrypted data")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8700)
    sv.add_argument("--seal-rows", type=int, default=100_000, help="Rows after which the growing segment is sealed")
    sv.add_argument("--idle-seal-seconds", type=float, default=1.0, help="Seal after this long without writes")
    sv.add_argument("--build-threads", type=int, default=0, help="Threads for index builds (0: all cores)")
    sv.add_argument("--search-threads", type=int, default=0, help="Search pool size (0: cores, at least 2)")
    sv.add_argument("--max-segments", type=int, default=8, help="Merge sealed segments beyond this many")
    sv.add_argument("--log-level", default="warning")
    sv.add_argument(
        "--secrets-stdin",
        action="store_true",
        help='Read the secrets from one JSON line on stdin: {"token": ..., "data_key": base64, '
        '"previous_data_keys": [base64, ...]} (stdin is then reopened on /dev/null)',
    )
    sv.add_argument(
        "--replica-of", default="", help="Serve as a read replica of the engine at this URL (same token and data key)"
    )
    sv.add_argument(
        "--replica-unless-ordinal-0",
        action="store_true",
        help="With --replica-of: be the primary when the host name ends in -0 (StatefulSet pod 0)",
    )
    sp = sub.add_parser("spare", help=argparse.SUPPRESS, description="A warm engine for the local provisioner")
    sp.add_argument("--spare-id", required=True, help="Names this process for its provisioner (not a secret)")
    sp.add_argument("--title-room", default="", help="Padding: room for the command line once assigned")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "spare":
        return spare(args.spare_id)
    return serve(args)


SECRET_ENV = ("VECTA_ENGINE_TOKEN", "VECTA_ENGINE_DATA_KEY", "VECTA_ENGINE_PREVIOUS_DATA_KEYS")


class SecretsError(ValueError):
    """Unusable secrets; the message names the field and never shows a value."""


def secrets_from_env() -> tuple[str, bytes, list[bytes]]:
    """The token, data key and previous data keys from the environment, which then forgets them (child processes
    do not inherit them, and the process's initial environment block is blanked where they were)."""
    from .crypto import parse_data_key, parse_data_keys

    try:
        token = os.environ.get("VECTA_ENGINE_TOKEN", "")
        if not token:
            raise SecretsError("VECTA_ENGINE_TOKEN is not set")
        try:
            key = parse_data_key(os.environ.get("VECTA_ENGINE_DATA_KEY"))
            previous = parse_data_keys(
                os.environ.get("VECTA_ENGINE_PREVIOUS_DATA_KEYS"), "VECTA_ENGINE_PREVIOUS_DATA_KEYS"
            )
        except ValueError as exc:
            raise SecretsError(str(exc)) from None
    finally:
        for name in SECRET_ENV:
            os.environ.pop(name, None)
        scrub_initial_environ(SECRET_ENV)
    return token, key, previous


def secrets_from_line(line: bytes) -> tuple[str, bytes, list[bytes], dict[str, Any]]:
    """(token, data key, previous data keys, the rest) from one JSON line; errors never echo it."""
    import json

    from .crypto import parse_data_key, parse_data_keys

    try:
        doc = json.loads(line)
    except ValueError:
        raise SecretsError("the secrets line is not valid JSON") from None
    if not isinstance(doc, dict):
        raise SecretsError("the secrets line must be a JSON object")
    token = doc.pop("token", None)
    if not isinstance(token, str) or not token:
        raise SecretsError("token is missing or not a non-empty string")
    try:
        key = parse_data_key(doc.pop("data_key", None), "data_key")
        previous = parse_data_keys(list_or_none(doc.pop("previous_data_keys", None)), "previous_data_keys")
    except ValueError as exc:
        raise SecretsError(str(exc)) from None
    return token, key, previous, doc


def list_or_none(value: Any) -> Any:
    """JSON's previous_data_keys must be a list (the comma-separated form is the environment's)."""
    if value is not None and not isinstance(value, list):
        raise ValueError("previous_data_keys must be a list of base64 strings")
    return value


def read_secrets_stdin() -> tuple[str, bytes, list[bytes]]:
    """One JSON line from stdin (``{"token", "data_key", "previous_data_keys"?}``), then stdin is /dev/null."""
    try:
        line = sys.stdin.buffer.readline(1 << 16)
    finally:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    if not line.strip():
        raise SecretsError("no secrets line on stdin")
    token, key, previous, rest = secrets_from_line(line)
    del line
    if rest:
        raise SecretsError(f"unknown field {sorted(rest)[0]!r} in the secrets line")
    return token, key, previous


def scrub_initial_environ(names: tuple[str, ...]) -> None:
    """Blank ``NAME=value`` entries of ``names`` in the environment block the process started with, which
    /proc/<pid>/environ shows even after ``os.environ`` forgot them (as ``set_cmdline`` rewrites argv in place).
    Best effort: nothing happens where /proc or the block cannot be read."""
    import ctypes

    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50 and 51 of proc(5))
    except (OSError, IndexError, ValueError):
        return
    if not 0 < start < end or end - start > (1 << 24):
        return
    block = ctypes.string_at(start, end - start)
    prefixes = tuple(n.encode() + b"=" for n in names)
    pos = 0
    for entry in block.split(b"\0"):
        if entry.startswith(prefixes):
            ctypes.memset(start + pos, 0, len(entry))
        pos += len(entry) + 1


def serve(args: argparse.Namespace) -> int:
    """Serve the data-plane API. Secrets: VECTA_ENGINE_TOKEN, VECTA_ENGINE_DATA_KEY (32 bytes, base64) and the
    optional VECTA_ENGINE_PREVIOUS_DATA_KEYS (comma-separated) from the environment, or with ``--secrets-stdin``
    one JSON line on stdin."""
    from .collection import Settings
    from .engine import Engine, tune_malloc
    from .server import EngineApp

    try:
        token, key, previous = read_secrets_stdin() if args.secrets_stdin else secrets_from_env()
    except SecretsError as exc:
        print(f"{exc}; refusing to start", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cores = os.cpu_count() or 2
    settings = Settings(
        seal_rows=args.seal_rows,
        idle_seal_seconds=args.idle_seal_seconds,
        build_threads=args.build_threads or cores,
        max_segments=args.max_segments,
    )
    tune_malloc()
    engine = Engine(Path(args.data_dir), key, settings, previous)
    asgi = EngineApp(engine, token, search_threads=args.search_threads or None)
    if args.replica_of and not (args.replica_unless_ordinal_0 and socket.gethostname().endswith("-0")):
        from .replication import Follower

        asgi.follower = Follower(engine, args.replica_of, token)
    serve_http(asgi, args.host, args.port, args.log_level)
    return 0


def spare(spare_id: str) -> int:
    """A warm engine for the local provisioner: imports the engine, uvicorn and their libraries now, then waits
    on stdin for one assignment (a JSON line: data dir, port, threads, limits, log file, token, data key, optional
    previous data keys) and
    serves that cluster exactly as `serve` would. The secrets arrive only through the pipe (never argv, the
    environment or a file). Exits without serving when stdin closes first: its provisioner went away."""
    import json

    import httptools  # noqa: F401  (imported now rather than after the assignment)
    import uvloop  # noqa: F401

    from . import http  # noqa: F401
    from .collection import Settings
    from .crypto import parse_data_key, parse_data_keys
    from .engine import Engine, tune_malloc
    from .server import EngineApp

    tune_malloc()
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0
    try:
        job = json.loads(line)
        token = str(job.pop("token"))
        key = parse_data_key(job.pop("data_key"), "data_key")
        previous = parse_data_keys(list_or_none(job.pop("previous_data_keys", None)), "previous_data_keys")
        data_dir = Path(job["data_dir"])
        host, port = str(job.get("host", "127.0.0.1")), int(job["port"])
        log_level = str(job.get("log_level", "warning"))
        search_threads = int(job.get("search_threads", 0))
        settings = Settings(
            seal_rows=int(job.get("seal_rows", 100_000)),
            idle_seal_seconds=float(job.get("idle_seal_seconds", 1.0)),
            build_threads=int(job.get("build_threads", 0)) or (os.cpu_count() or 2),
            max_segments=int(job.get("max_segments", 8)),
        )
    except (ValueError, KeyError, TypeError) as exc:  # never echo the line: it holds the secrets
        print(f"spare {spare_id}: invalid assignment ({type(exc).__name__}); refusing to start", file=sys.stderr)
        return 2
    del line
    _adopt_assignment(job)
    if isinstance(job.get("title"), list):
        set_cmdline([str(a) for a in job["title"]])
    if not token:
        print(f"spare {spare_id}: empty engine token; refusing to start", file=sys.stderr)
        return 2
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    engine = Engine(data_dir, key, settings, previous)
    asgi = EngineApp(engine, token, search_threads=search_threads or None)
    serve_http(asgi, host, port, log_level)
    return 0


def _adopt_assignment(job: dict[str, Any]) -> None:
    """What the provisioner's Popen would have set up for a cold `serve`: stdin from /dev/null, stdout and stderr
    to the cluster's log file, the address-space limit and the OpenMP thread count."""
    import resource

    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if job.get("log_path"):
        fd = os.open(job["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    if job.get("memory_bytes"):
        limit = int(job["memory_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if job.get("omp_threads"):
        import faiss

        os.environ["OMP_NUM_THREADS"] = str(int(job["omp_threads"]))
        faiss.omp_set_num_threads(int(job["omp_threads"]))


def set_cmdline(argv: list[str]) -> bool:
    """Show ``argv`` as this process's command line (/proc/<pid>/cmdline, ps), as setproctitle does: the original
    argv strings are overwritten in place (CPython copied them at startup and never reads them again). An
    assigned spare shows the command line a cold ``serve`` of its cluster would have, so everything that finds
    engines by their command line (re-adoption, stray detection, operators) sees no difference. False, and
    nothing changed, when the new line does not fit in the original one (the spare's ``--title-room``)."""
    import ctypes

    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48 and 49 of proc(5))
    except (OSError, IndexError, ValueError):
        return False
    new = b"\0".join(a.encode() for a in argv) + b"\0"
    room = end - start
    if room <= 0 or len(new) > room:
        return False
    ctypes.memmove(start, new + b"\0" * (room - len(new)), room)
    return True

"""``vecta engine serve``: run one engine worker (uvicorn + uvloop + httptools, one process)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

app = typer.Typer(help="Vecta vector engine worker", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Vecta vector engine worker."""


@app.command()
def serve(
    data_dir: Path = typer.Option(..., "--data-dir", help="Folder holding this worker's encrypted data"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8700, "--port"),
    seal_rows: int = typer.Option(100_000, "--seal-rows", help="Rows after which the growing segment is sealed"),
    idle_seal_seconds: float = typer.Option(1.0, "--idle-seal-seconds", help="Seal after this long without writes"),
    build_threads: int = typer.Option(0, "--build-threads", help="Threads for index builds (0: all cores)"),
    search_threads: int = typer.Option(0, "--search-threads", help="Search pool size (0: cores, at least 2)"),
    max_segments: int = typer.Option(8, "--max-segments", help="Merge sealed segments beyond this many"),
    log_level: str = typer.Option("warning", "--log-level"),
) -> None:
    """Serve the data-plane API. Needs VECTA_ENGINE_TOKEN and VECTA_ENGINE_DATA_KEY (32 bytes, base64)."""
    import uvicorn

    from .collection import Settings
    from .crypto import parse_data_key
    from .engine import Engine, tune_malloc
    from .server import EngineApp

    token = os.environ.get("VECTA_ENGINE_TOKEN", "")
    if not token:
        typer.echo("VECTA_ENGINE_TOKEN is not set; refusing to start", err=True)
        raise typer.Exit(2)
    try:
        key = parse_data_key(os.environ.get("VECTA_ENGINE_DATA_KEY"))
    except ValueError as exc:
        typer.echo(f"{exc}; refusing to start", err=True)
        raise typer.Exit(2) from exc
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cores = os.cpu_count() or 2
    settings = Settings(
        seal_rows=seal_rows,
        idle_seal_seconds=idle_seal_seconds,
        build_threads=build_threads or cores,
        max_segments=max_segments,
    )
    tune_malloc()
    engine = Engine(data_dir, key, settings)
    asgi = EngineApp(engine, token, search_threads=search_threads or None)
    uvicorn.run(
        asgi,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        timeout_keep_alive=30,
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )

"""The ``vecta`` command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from services.core.settings import get_settings, reset_settings

app = typer.Typer(help="Vecta: a managed vector database.", no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")

# ``vecta engine serve|spare``: the engine's own argparse command line (services/engine/cli.py, which engines
# run as ``python -m services.engine`` without typer and pydantic), reached with its arguments untouched.
engine_app = typer.Typer(help="The per-cluster vector engine worker.", no_args_is_help=True)
app.add_typer(engine_app, name="engine")
_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@engine_app.command("serve", context_settings=_PASSTHROUGH, help="Serve the data-plane API (--help: its options).")
def engine_serve(ctx: typer.Context) -> None:
    from services.engine.cli import main

    raise typer.Exit(main(["serve", *ctx.args]))


@engine_app.command("spare", context_settings=_PASSTHROUGH, hidden=True)
def engine_spare(ctx: typer.Context) -> None:
    from services.engine.cli import main

    raise typer.Exit(main(["spare", *ctx.args]))


ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str | None = None) -> Any:
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().sync_database_url).replace("%", "%%"))
    return cfg


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: head)."""
    from alembic import command

    get_settings().ensure_home()
    command.upgrade(alembic_config(), revision)


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()]) -> None:
    """Revert migrations down to REVISION (``base`` for an empty database)."""
    from alembic import command

    command.downgrade(alembic_config(), revision)


@db_app.command("current")
def db_current() -> None:
    """Show the database's current revision."""
    from alembic import command

    command.current(alembic_config())


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8080,
    home: Annotated[Path | None, typer.Option(help="State folder (default: $VECTA_HOME or ~/.vecta)")] = None,
    worker: Annotated[bool, typer.Option(help="Also run a Celery worker and beat for background tasks")] = True,
) -> None:
    """Run Vecta on its embedded defaults: migrate the database, start the background worker and the API."""
    if home is not None:
        os.environ["VECTA_HOME"] = str(home.expanduser().resolve())
    os.environ.setdefault("VECTA_PUBLIC_URL", f"http://{host}:{port}")
    reset_settings()
    settings = get_settings()
    settings.ensure_home()
    db_upgrade("head")
    children: list[subprocess.Popen[bytes]] = []
    if worker:
        log = open(settings.log_dir / "worker.log", "ab")
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "services.core.celery_app:celery_app",
                    "worker",
                    "--beat",
                    "--pool=threads",
                    "--concurrency=4",
                    "--loglevel=INFO",
                    f"--schedule={settings.home / 'celerybeat-schedule'}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ.copy(),
                # Its own process group (the worker and its beat child are stopped together), and a SIGTERM
                # from the kernel should `vecta up` die without cleaning up: no orphaned workers.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        )
    if worker:  # engines stopped by the last `vecta up` start again now rather than at the first beat
        from services.core.celery_app import reconfigure, send

        reconfigure()
        send("cluster.reconcile", (), {})
    typer.echo(f"Vecta is running at http://{host}:{port}  (home: {settings.home})")
    typer.echo(f"API docs: http://{host}:{port}/docs   logs: {settings.log_dir}")
    import uvicorn

    # uvicorn handles SIGTERM itself while it serves, then restores the previous handler and raises the signal
    # again; with the default handler the process would die right there, skipping the cleanup below (the worker
    # and engines would be left running). This handler turns it into SystemExit, so the cleanup runs.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        # No access log (at level warning it printed nothing, but uvicorn still built its arguments per request)
        # and no Server header; httptools and uvloop are picked when installed (uvicorn[standard]).
        uvicorn.run(
            "services.api.app:create_app",
            factory=True,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            server_header=False,
            # uvicorn's httptools protocol with the edge's fast lane (services/api/fast_lane.py), or without it
            http="services.api.fast_lane:EdgeProtocol" if settings.dataplane_fast_lane else "httptools",
        )
    finally:
        for child in children:
            _signal_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(child.pid, signal.SIGKILL)  # whatever of the group is left (e.g. the beat child)
        stopped = stop_local_engines()
        if stopped:
            typer.echo(f"stopped {stopped} engine process(es); they start again with the next `vecta up`")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _die_with_parent() -> None:
    """In the child before exec: ask the kernel for SIGTERM when the parent dies (Linux PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_local_engines() -> int:
    """Stop the engine processes this home's clusters run (like `docker compose down`); their clusters stay
    RUNNING in the database and the reconciler starts the engines again on the next `vecta up`."""
    from sqlalchemy import select

    from services.control_plane.clusters.models import Cluster
    from services.control_plane.provisioners.local import LocalProvisioner
    from services.core.db import make_sync_engine
    from services.core.models import metadata  # noqa: F401 - every table, for foreign keys

    engine = make_sync_engine()
    provisioner = LocalProvisioner()
    stopped = 0
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Cluster.id, Cluster.engine_state).where(Cluster.provisioner == "local"))
            for cluster_id, state in rows:
                if state and provisioner.is_running(cluster_id, state):
                    provisioner.stop(cluster_id, state)
                    stopped += 1
    finally:
        engine.dispose()
    return stopped


@app.command()
def worker(
    beat: Annotated[bool, typer.Option(help="Also run the periodic scheduler")] = False,
    concurrency: Annotated[int, typer.Option()] = 4,
) -> None:
    """Run a Celery worker (production: one or more per deployment, with Redis as the broker)."""
    args = [
        "-A",
        "services.core.celery_app:celery_app",
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
    ]
    if beat:
        args.append("--beat")
    os.execv(sys.executable, [sys.executable, "-m", "celery", *args])  # noqa: S606 - fixed argv, no shell


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

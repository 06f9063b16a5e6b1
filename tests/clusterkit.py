"""Helpers for tests that run real clusters: create one through the public API, find and stop engine processes.

Engines are child processes started in their own session (they outlive whoever started them), so every test
session stops them at the end: the conftest's session fixture calls :func:`stop_engines` for every engine whose
data folder lies under the test home, whether or not its pid made it into the clusters table.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import auth


def engine_pids(under: Path | str) -> list[int]:
    """Pids of ``engine serve`` processes whose --data-dir lies under ``under``."""
    root = str(Path(under).resolve())
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not any(a.endswith(b"engine") for a in argv) or b"serve" not in argv or b"--data-dir" not in argv:
            continue
        i = argv.index(b"--data-dir")
        if i + 1 < len(argv) and argv[i + 1].decode(errors="replace").startswith(root):
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def stop_engines(under: Path | str, grace: float = 5.0) -> list[int]:
    """SIGTERM (then SIGKILL) every engine process under ``under``; returns the pids found."""
    pids = engine_pids(under)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        for pid in pids:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
    return pids


def dp(cluster_id: str, rest: str = "") -> str:
    """A path on the cluster's data plane."""
    return f"/v1/clusters/{cluster_id}/collections{rest}"


def ok(r: httpx.Response, status: int = 200) -> Any:
    """The body of a response that must have ``status`` (the assertion names the request and the answer)."""
    assert r.status_code == status, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}"
    return r.json() if r.content else None


def unique_name(tag: str = "cl") -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


async def create_cluster(
    client: httpx.AsyncClient, token: str, project_id: str, *, name: str | None = None, **body: Any
) -> dict[str, Any]:
    """Create a cluster through the API; with eager Celery it is RUNNING when the 202 comes back."""
    payload = {"name": name or unique_name(), "plan": "serverless", "region": "local", **body}
    r = await client.post(f"/v1/projects/{project_id}/clusters", json=payload, headers=auth(token))
    assert r.status_code == 202, r.text
    created: dict[str, Any] = r.json()
    got = await client.get(f"/v1/clusters/{created['id']}", headers=auth(token))
    assert got.status_code == 200, got.text
    assert got.json()["status"] == "RUNNING", got.text
    return {**got.json(), "job_id": created["job_id"]}


async def cluster_row(app: Any, cluster_id: str) -> Any:
    from services.control_plane.clusters.models import Cluster

    async with app.state.db.session() as s:
        return await s.get(Cluster, cluster_id)


def collection_body(name: str, dimension: int = 4, **extra: Any) -> dict[str, Any]:
    return {"name": name, "dimension": dimension, "metric": "cosine", **extra}


def records(n: int, dimension: int = 4, prefix: str = "r", start: int = 0) -> list[dict[str, Any]]:
    """Records with distinct random directions (seeded by index, so ``records(1, start=i)`` is record i again)."""
    import random

    out = []
    for i in range(start, start + n):
        rng = random.Random(i)
        vec = [round(rng.uniform(-1, 1), 4) + (0.01 if j == 0 else 0.0) for j in range(dimension)]
        out.append({"id": f"{prefix}{i}", "vector": vec})
    return out


async def insert_cluster(
    app: Any, org_id: str, project_id: str, status: str, *, provisioner: str = "none", plan: str = "serverless"
) -> str:
    """A cluster row written straight into the database, with no engine behind it. ``provisioner="none"`` is not
    available in this deployment, so any task run for it fails at once instead of starting a process."""
    import secrets

    from services.auth.keyprovider import local_provider
    from services.control_plane.clusters.models import Cluster
    from services.core.ids import new_id

    cluster_id = new_id("cl")
    ctx = {"org_id": org_id, "cluster_id": cluster_id}
    provider = local_provider()
    _, wrapped_key = provider.generate_data_key(ctx)
    token = provider.wrap(secrets.token_urlsafe(16).encode(), {**ctx, "use": "engine_token"})
    row = Cluster(
        id=cluster_id, org_id=org_id, project_id=project_id, name=unique_name("row"), plan=plan,
        region="local", cu_size=1, replicas=1, status=status, provisioner=provisioner,
        key_provider="local", engine_state={}, engine_token_wrapped=token, data_key_wrapped=wrapped_key,
    )  # fmt: skip
    async with app.state.db.transaction() as s:
        s.add(row)
    return cluster_id


async def set_status(app: Any, cluster_id: str, status: str) -> None:
    from sqlalchemy import update

    from services.control_plane.clusters.models import Cluster

    async with app.state.db.transaction() as s:
        await s.execute(update(Cluster).where(Cluster.id == cluster_id).values(status=status))
    app.state.edge.invalidate(cluster_id)


@contextlib.asynccontextmanager
async def api_with(env: dict[str, str]) -> AsyncIterator[Any]:
    """A second API instance (same database) with some settings changed (``VECTA_*`` → value), started; the
    settings are put back afterwards."""
    from services.api.app import create_app
    from services.core.settings import reset_settings

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_settings()
    try:
        other = create_app()
        async with other.router.lifespan_context(other):
            yield other
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_settings()

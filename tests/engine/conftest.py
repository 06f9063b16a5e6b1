from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from services.engine.collection import Collection, Settings
from services.engine.engine import Engine
from services.engine.schema import parse_collection, parse_upsert
from services.engine.server import EngineApp

TOKEN = "test-engine-token"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def make_engine(tmp_path: Path, key: bytes) -> Iterator:
    engines: list[Engine] = []

    def make(data_dir: Path | None = None, *, k: bytes | None = None, **settings) -> Engine:
        settings.setdefault("idle_seal_seconds", 3600.0)
        eng = Engine(data_dir or tmp_path / "data", k or key, Settings(**settings))
        eng.open(background=False)
        engines.append(eng)
        return eng

    yield make
    for e in engines:
        e.close()


def create(
    eng: Engine,
    name: str = "docs",
    dim: int = 16,
    metric: str = "cosine",
    index: dict | None = None,
    fields: list | None = None,
    text_field: str | None = None,
) -> Collection:
    doc = {
        "name": name,
        "dimension": dim,
        "metric": metric,
        "index": index or {"type": "flat"},
        "fields": fields or [],
        "text_field": text_field,
    }
    return eng.create_collection(parse_collection(doc))


def upsert(coll: Collection, records: list[dict]) -> int:
    return coll.upsert(
        parse_upsert(orjson.dumps(records and {"records": records}, option=orjson.OPT_SERIALIZE_NUMPY), coll.cfg)
    )


def search_ids(coll: Collection, body: dict) -> list:
    res = coll.search(coll.parse_search(body))
    if body.get("vectors") is not None:
        return [[r["id"] for r in row] for row in res]
    return [r["id"] for r in res]


def brute_force(X: np.ndarray, Q: np.ndarray, metric: str, k: int) -> np.ndarray:
    if metric == "cosine":
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        return np.argsort(-(Qn @ Xn.T), axis=1, kind="stable")[:, :k]
    if metric == "ip":
        return np.argsort(-(Q @ X.T), axis=1, kind="stable")[:, :k]
    d = (Q**2).sum(1)[:, None] - 2 * Q @ X.T + (X**2).sum(1)[None, :]
    return np.argsort(d, axis=1, kind="stable")[:, :k]


@pytest.fixture
def app_client(make_engine) -> Iterator:
    """An httpx client on the raw ASGI app (no network), with its engine."""
    eng = make_engine()
    asgi = EngineApp(eng, TOKEN, manage_lifespan=False)
    transport = httpx.ASGITransport(app=asgi)
    client = httpx.AsyncClient(
        transport=transport, base_url="http://engine", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    yield client, eng
    asgi.shutdown_pools()


# --- a real engine process ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineProcess:
    def __init__(self, data_dir: Path, key: bytes, *extra: str, env: dict | None = None) -> None:
        self.data_dir = data_dir
        self.key = key
        self.extra = extra
        self.env_extra = env or {}
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        env = dict(
            os.environ,
            VECTA_ENGINE_TOKEN=TOKEN,
            VECTA_ENGINE_DATA_KEY=base64.b64encode(self.key).decode(),
            **self.env_extra,
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.engine",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *self.extra,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("engine did not start")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

"""Background work runs in real processes: the API enqueues after its commit, a real Celery worker consumes.

1. Production shape: an API server (uvicorn) and a Celery worker as separate processes, Redis as the broker, and
   a real SMTP server (aiosmtpd) on loopback: a sign-up's verification email arrives over SMTP.
2. Embedded default: ``vecta up`` with a fresh VECTA_HOME (SQLite, SQLAlchemy broker, worker child process,
   file mail backend): the email lands in VECTA_HOME/mail, and state stays under that home.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiosmtpd.controller import Controller

from services.core.settings import get_settings

REDIS = os.environ.get("VECTA_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up in {timeout}s")


def redis_available() -> bool:
    import redis

    try:
        return bool(redis.from_url(REDIS, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


@pytest.mark.skipif(not redis_available(), reason="needs Redis on 127.0.0.1:6379")
def test_signup_email_goes_through_redis_celery_worker_to_smtp(
    smtp: tuple[Inbox, int], tmp_path: Path, migrated_db: str
) -> None:
    inbox, smtp_port = smtp
    settings = get_settings()
    broker = REDIS.rsplit("/", 1)[0] + "/14"
    import redis

    redis.from_url(broker).flushdb()
    env = {
        **os.environ,
        "VECTA_HOME": str(tmp_path / "home"),
        "VECTA_DATABASE_URL": settings.async_database_url,
        "VECTA_BROKER_URL": broker,
        "VECTA_REDIS_URL": REDIS,
        "VECTA_CELERY_EAGER": "false",
        "VECTA_EMAIL_BACKEND": "smtp",
        "VECTA_SMTP_HOST": "127.0.0.1",
        "VECTA_SMTP_PORT": str(smtp_port),
    }
    api_port = free_port()
    procs = [
        _spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "services.api.app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(api_port),
                "--log-level",
                "warning",
            ],
            env,
            tmp_path / "api.log",
        )
    ]
    try:
        wait_http(f"http://127.0.0.1:{api_port}/healthz")
        email = f"celery-{uuid.uuid4().hex[:8]}@example.com"
        r = httpx.post(
            f"http://127.0.0.1:{api_port}/v1/auth/signup",
            json={"email": email, "password": "a long enough password", "name": "C", "org_name": "Celery Org"},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        # No worker yet: the task waits in Redis instead of being dropped or run inline.
        time.sleep(1.0)
        assert inbox.messages == []
        assert redis.from_url(broker).llen("celery") >= 1
        procs.append(
            _spawn(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "services.core.celery_app:celery_app",
                    "worker",
                    "--pool=threads",
                    "--concurrency=2",
                    "--without-mingle",
                    "--without-gossip",
                    "--loglevel=INFO",
                ],
                env,
                tmp_path / "worker.log",
            )
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not inbox.messages:
            time.sleep(0.2)
        assert inbox.messages, (tmp_path / "worker.log").read_text()[-3000:]
        mail_from, rcpt, content = inbox.messages[0]
        assert "vecta" in mail_from.lower()
        assert rcpt == [email]
        assert b"Verify your Vecta email address" in content
        assert b"/console/verify-email?token=" in content
    finally:
        _stop(procs)


def test_vecta_up_embedded_default_runs_tasks_in_background(tmp_path: Path) -> None:
    home = tmp_path / "vecta-home"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VECTA_")}
    env["VECTA_LAST_USED_FLUSH_SECONDS"] = "1"
    proc = _spawn(
        [sys.executable, "-m", "services.cli", "up", "--host", "127.0.0.1", "--port", str(port), "--home", str(home)],
        env,
        tmp_path / "up.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        email = f"embedded-{uuid.uuid4().hex[:8]}@example.com"
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/auth/signup",
            json={"email": email, "password": "a long enough password", "name": "E", "org_name": "Embedded"},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 30
        mails: list[Path] = []
        while time.monotonic() < deadline and not mails:
            mails = list((home / "mail").glob("*.eml"))
            time.sleep(0.2)
        assert mails, (tmp_path / "up.log").read_text()[-3000:]
        assert email in mails[0].read_text()
        # All local state lives under the chosen home.
        assert (home / "vecta.db").exists() and (home / "broker.db").exists()
        assert (home / "secrets" / "secret_key").stat().st_mode & 0o777 == 0o600

        # A cluster's engine runs as a process of its own; `vecta up` stops it when it is stopped (SIGTERM)
        h = {"authorization": f"Bearer {r.json()['access_token']}"}
        projects = httpx.get(f"http://127.0.0.1:{port}/v1/orgs/{r.json()['org']['id']}/projects", headers=h).json()
        c = httpx.post(
            f"http://127.0.0.1:{port}/v1/projects/{projects['items'][0]['id']}/clusters",
            json={"name": "c1", "plan": "dedicated", "region": "local"},
            headers=h,
            timeout=10,
        )
        assert c.status_code == 202, c.text
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = httpx.get(f"http://127.0.0.1:{port}/v1/clusters/{c.json()['id']}", headers=h).json()["status"]
            if status == "RUNNING":
                break
            time.sleep(0.1)
        assert status == "RUNNING", (tmp_path / "up.log").read_text()[-3000:]
        with sqlite3.connect(home / "vecta.db") as db:
            (state,) = db.execute("select engine_state from clusters").fetchone()
        engine_pid = json.loads(state)["pid"]
        os.kill(engine_pid, 0)  # alive
        proc.terminate()
        proc.wait(timeout=30)
        assert "stopped 1 engine process" in (tmp_path / "up.log").read_text()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(engine_pid):
            time.sleep(0.05)
        assert not _alive(engine_pid)
    finally:
        _stop([proc])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

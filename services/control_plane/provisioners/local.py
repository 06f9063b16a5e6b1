"""The ``local`` provisioner: each cluster's engine is a ``vecta engine serve`` child process on 127.0.0.1.

* The token and data keys reach the child as one JSON line on its stdin (never argv, the environment, a file or
  a log line).
* The process runs in its own session so it outlives the API and worker processes that started it; its pid and
  port are recorded on the cluster row, and ``start`` re-adopts a live process (checked by pid, by its command line
  naming the cluster, and by an authenticated health check) instead of starting a second one.
* Resource limits from ``cu_size``: search threads = ``cu_size`` and an address-space limit of
  ``VECTA_LOCAL_MEMORY_PER_CU_GIB`` x ``cu_size`` (plus a floor for the interpreter and libraries).
* Warm spares (``VECTA_LOCAL_SPARE_ENGINES``, default 1): the process that starts engines (a Celery worker)
  keeps ``vecta engine spare`` processes that have already imported the engine and its libraries and wait on a
  pipe. Starting an engine hands one of them the cluster (data dir, port, limits, token, data key: one JSON
  line over that pipe) instead of paying a new interpreter's imports. A spare serves exactly one cluster, ever;
  a new one is started a little later. A spare whose starter dies sees its pipe close and exits.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from services.control_plane.provisioners.base import EngineHandle, EngineSpec, Provisioner, ProvisionError
from services.core.settings import get_settings

_GIB = 1 << 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _secrets(spec: EngineSpec) -> dict[str, Any]:
    return {
        "token": spec.token,
        "data_key": base64.b64encode(spec.data_key).decode(),
        "previous_data_keys": [base64.b64encode(k).decode() for k in spec.previous_keys],
    }


def _send_secrets(proc: subprocess.Popen[bytes], spec: EngineSpec) -> None:
    """The engine's token and data keys, as one JSON line on its stdin (``serve --secrets-stdin``): never argv,
    the environment (readable in /proc/<pid>/environ for the process's life), a file or a log line."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(json.dumps(_secrets(spec)).encode() + b"\n")
        proc.stdin.close()
    except OSError:  # it died at once: the health wait reports it
        pass


def _pid_is_engine(pid: int, cluster_id: str, spare_id: str | None = None) -> bool:
    """``pid`` is this cluster's engine: a ``serve`` naming the cluster, or the spare recorded as assigned to it
    (its command line names only its own spare id, which is never given to another cluster)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if b"engine\x00serve" in cmdline and cluster_id.encode() in cmdline:
        return True
    return bool(spare_id) and b"engine\x00spare" in cmdline and str(spare_id).encode() in cmdline.split(b"\x00")


_http_client: httpx.Client | None = None
_http_lock = threading.Lock()


def _http() -> httpx.Client:
    """One client for health checks: a new one per call costs ~50 ms (it loads the CA bundle)."""
    global _http_client
    with _http_lock:
        if _http_client is None:
            _http_client = httpx.Client(trust_env=False, timeout=2.0)
        return _http_client


def engine_env() -> dict[str, str]:
    """The environment an engine starts with, before its secrets and thread count."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VECTA_ENGINE_") and k != "OMP_NUM_THREADS"}


class _Spare:
    def __init__(self, proc: subprocess.Popen[bytes], spare_id: str, env: dict[str, str]) -> None:
        self.proc, self.spare_id, self.env = proc, spare_id, env


TITLE_ROOM = 2048  # bytes of command line a spare reserves for the `serve` command line it shows once assigned


class SparePool:
    """The warm ``vecta engine spare`` processes of this process. Each is handed to one cluster at most."""

    REFILL_DELAY = 3.0  # seconds after a spare is taken: its replacement's imports do not compete with the start

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spares: list[_Spare] = []
        self._timer: threading.Timer | None = None
        self._due = 0.0

    def take(self, env: dict[str, str]) -> _Spare | None:
        """A live spare started with this environment (one started under another is of no use: discarded)."""
        with self._lock:
            while self._spares:
                spare = self._spares.pop(0)
                if spare.proc.poll() is None and spare.env == env:
                    return spare
                _discard(spare)
        return None

    def fill(self, count: int, log_dir: Path) -> int:
        """Start spares until ``count`` are alive; returns how many were started."""
        env = engine_env()
        started = 0
        with self._lock:
            keep = []
            for spare in self._spares:
                if spare.proc.poll() is None and spare.env == env:
                    keep.append(spare)
                else:
                    _discard(spare)
            self._spares = keep
            log_dir.mkdir(parents=True, exist_ok=True)
            while len(self._spares) < count:
                spare_id = "sp_" + secrets.token_hex(8)
                with (log_dir / "engine-spares.log").open("ab") as log:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "services.engine", "spare", "--spare-id", spare_id,
                         "--title-room", "." * TITLE_ROOM],
                        env={**env, "OMP_NUM_THREADS": "1"},  # its assignment sets the cluster's count
                        stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True,  # once assigned it must outlive this process, as any engine
                    )  # fmt: skip
                self._spares.append(_Spare(proc, spare_id, env))
                started += 1
        return started

    def refill_later(self, count: int, log_dir: Path, delay: float | None = None) -> None:
        """Top the pool up in the background after ``delay`` (default REFILL_DELAY); an earlier request wins."""
        if count <= 0:
            return
        delay = self.REFILL_DELAY if delay is None else delay
        due = time.monotonic() + delay
        with self._lock:
            if self._timer is not None and self._timer.is_alive():
                if self._due <= due:
                    return
                self._timer.cancel()
            self._due = due
            self._timer = threading.Timer(delay, self._refill, (count, log_dir))
            self._timer.daemon = True
            self._timer.start()

    def _refill(self, count: int, log_dir: Path) -> None:
        try:
            self.fill(count, log_dir)
        except OSError:
            pass  # the next start is a cold one; it schedules another refill

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            for spare in self._spares:
                _discard(spare)
            self._spares = []


def _discard(spare: _Spare) -> None:
    """An unassigned spare: closing its pipe ends it; killed too, so it need not finish its imports first."""
    with contextlib.suppress(OSError):
        if spare.proc.stdin is not None:
            spare.proc.stdin.close()
    with contextlib.suppress(ProcessLookupError):
        spare.proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        spare.proc.wait(5)


SPARES = SparePool()


class LocalProvisioner:
    name = "local"

    def __init__(self, root: Path | None = None) -> None:
        settings = get_settings()
        self.root = root or settings.data_dir / "clusters"
        self.log_dir = settings.log_dir

    def data_dir(self, cluster_id: str) -> Path:
        return self.root / cluster_id

    def _healthy(self, url: str, token: str) -> bool:
        try:
            r = _http().get(f"{url}/internal/stats", headers={"authorization": f"Bearer {token}"}, timeout=2.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def is_running(self, cluster_id: str, state: dict[str, Any]) -> bool:
        pid = state.get("pid")
        return isinstance(pid, int) and _pid_is_engine(pid, cluster_id, state.get("spare_id"))

    def warm(self) -> int:
        """Start the configured number of spare engines now (a worker calls this when it boots)."""
        return SPARES.fill(get_settings().local_spare_engines, self.log_dir)

    def replenish(self) -> None:
        """Replace used spares now, in the background: the caller's engine has started and loaded its data, so
        the new spare's imports no longer compete with that (tasks call this when a start is complete)."""
        SPARES.refill_later(get_settings().local_spare_engines, self.log_dir, delay=0.0)

    @contextlib.contextmanager
    def _locked(self, cluster_id: str) -> Iterator[dict[str, Any]]:
        """Serializes operations on one cluster across threads and processes (Celery workers, the reconciler,
        `vecta up`), and yields the provisioner's own record of the engine (pid, port), which is authoritative
        over what the caller last stored: two racing callers must not both start an engine."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.root / f"{cluster_id}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.root / f"{cluster_id}.state.json"
            try:
                record: dict[str, Any] = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                record = {}
            before = dict(record)
            try:
                yield record
            finally:
                if record != before:
                    self._save_record(cluster_id, record)
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _save_record(self, cluster_id: str, record: dict[str, Any]) -> None:
        path = self.root / f"{cluster_id}.state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    def _strays(self, cluster_id: str) -> list[tuple[int, int | None]]:
        """Engine processes serving this cluster's data folder that no record names (pid, port): one whose
        starter was killed between fork and recording it. Found by their command line in /proc."""
        found: list[tuple[int, int | None]] = []
        for pid, argv in _serving(self.data_dir(cluster_id)):
            if b"serve" in argv and _pid_is_engine(pid, cluster_id):
                j = argv.index(b"--port") + 1 if b"--port" in argv else len(argv)
                found.append((pid, int(argv[j]) if j < len(argv) and argv[j].isdigit() else None))
        return found

    def start(self, spec: EngineSpec, timeout: float = 60.0) -> EngineHandle:
        with self._locked(spec.cluster_id) as record:
            state = {**spec.state, **record} if self.is_running(spec.cluster_id, record) else dict(spec.state)
            if not self.is_running(spec.cluster_id, state):
                # Adopt an engine nobody recorded (never two engines on one data folder); stop any others.
                strays = self._strays(spec.cluster_id)
                for pid, _ in strays[1:]:
                    self._kill(pid)
                if strays:
                    state.update(pid=strays[0][0], port=strays[0][1])
            handle = self._start(spec, state, timeout)
            handle = self._ensure_replicas(spec, handle, record.get("replicas", state.get("replicas")), timeout)
            record.clear()
            record.update(handle.state)
            return handle

    def _start(self, spec: EngineSpec, state: dict[str, Any], timeout: float) -> EngineHandle:
        port = state.get("port")
        if self.is_running(spec.cluster_id, state) and isinstance(port, int):
            url = f"http://127.0.0.1:{port}"
            if self._wait_healthy(url, spec.token, state["pid"], timeout):
                return EngineHandle(url=url, state=state)
            self._kill(state["pid"])
        if not isinstance(port, int) or not _port_free(port):
            port = _free_port()
        data_dir = self.data_dir(spec.cluster_id)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VECTA_ENGINE_")}
        env["OMP_NUM_THREADS"] = str(spec.cu_size)
        args = [
            sys.executable, "-m", "services.engine", "serve",
            "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port),
            "--search-threads", str(max(2, spec.cu_size)), "--build-threads", str(spec.cu_size),
            "--secrets-stdin",
        ]  # fmt: skip
        memory = (get_settings().local_memory_per_cu_gib * spec.cu_size + 4) * _GIB

        def limits() -> None:  # runs in the child before exec
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

        proc = self._assign_spare(spec, port, data_dir, memory, args, state)
        if proc is None:
            log = (self.log_dir / f"engine-{spec.cluster_id}.log").open("ab")
            try:
                proc = subprocess.Popen(
                    args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                    start_new_session=True, preexec_fn=limits,
                )  # fmt: skip
            finally:
                log.close()
            _send_secrets(proc, spec)
            state.pop("spare_id", None)
            state.update(pid=proc.pid, port=port, data_dir=str(data_dir))
            # Recorded at once: if the caller dies while the engine boots (a Celery worker killed mid-provision),
            # the next start re-adopts this process instead of starting a second engine on the same data folder.
            self._save_record(spec.cluster_id, {"pid": proc.pid, "port": port, "data_dir": str(data_dir)})
        url = f"http://127.0.0.1:{port}"
        if not self._wait_healthy(url, spec.token, proc.pid, timeout, proc) or proc.poll() is not None:
            self._kill(proc.pid)
            raise ProvisionError("the engine did not become healthy in time")
        return EngineHandle(url=url, state=state)

    def _assign_spare(
        self, spec: EngineSpec, port: int, data_dir: Path, memory: int, args: list[str], state: dict[str, Any]
    ) -> subprocess.Popen[bytes] | None:
        """Hand this cluster to a warm spare (recorded first, then told over its pipe); None: start cold."""
        count = get_settings().local_spare_engines
        if count <= 0:
            return None
        spare = SPARES.take(engine_env())
        SPARES.refill_later(count, self.log_dir)
        if spare is None or spare.proc.stdin is None:
            return None
        # Recorded before the spare learns its cluster: if this process dies in between, the spare sees its pipe
        # close and exits, and the record names a dead process (the next start begins afresh).
        state.update(pid=spare.proc.pid, port=port, data_dir=str(data_dir), spare_id=spare.spare_id)
        self._save_record(
            spec.cluster_id,
            {"pid": spare.proc.pid, "port": port, "data_dir": str(data_dir), "spare_id": spare.spare_id},
        )
        job = {
            "data_dir": str(data_dir), "host": "127.0.0.1", "port": port,
            "search_threads": max(2, spec.cu_size), "build_threads": spec.cu_size, "omp_threads": spec.cu_size,
            "memory_bytes": memory, "log_path": str(self.log_dir / f"engine-{spec.cluster_id}.log"), "title": args,
            **_secrets(spec),
        }  # fmt: skip
        try:
            spare.proc.stdin.write(json.dumps(job).encode() + b"\n")
            spare.proc.stdin.close()
        except OSError:  # it died meanwhile
            _discard(spare)
            state.pop("spare_id", None)
            return None
        return spare.proc

    def _wait_healthy(
        self, url: str, token: str, pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
    ) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return False
            if proc is None and not Path(f"/proc/{pid}").exists():
                return False
            if self._healthy(url, token):
                return True
            time.sleep(delay)
            delay = min(0.05, delay * 1.5)
        return False

    def _kill(self, pid: int, grace: float = 10.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG) != (0, 0):
                        return
                if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                    return
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def stop(self, cluster_id: str, state: dict[str, Any]) -> None:
        with self._locked(cluster_id) as record:
            for known in (state, record):
                pid = known.get("pid")
                if isinstance(pid, int) and _pid_is_engine(pid, cluster_id, known.get("spare_id")):
                    self._kill(pid)
            for pid, _ in self._strays(cluster_id):
                self._kill(pid)
            record.pop("pid", None)
            self._stop_replicas(cluster_id, [*state.get("replicas", []), *record.pop("replicas", [])], wipe=False)

    def destroy(self, cluster_id: str, state: dict[str, Any]) -> None:
        self.stop(cluster_id, state)
        shutil.rmtree(self.data_dir(cluster_id), ignore_errors=True)
        shutil.rmtree(self.replicas_root(cluster_id), ignore_errors=True)
        for suffix in (".state.json", ".lock"):
            (self.root / f"{cluster_id}{suffix}").unlink(missing_ok=True)

    # -- read replicas: `replicas - 1` engines following the primary (``vecta engine serve --replica-of``) -------
    def replicas_root(self, cluster_id: str) -> Path:
        return self.root / f"{cluster_id}.replicas"

    def replicas_running(self, cluster_id: str, state: dict[str, Any], replicas: int) -> bool:
        """Every read replica the cluster should have is recorded and its process alive."""
        entries = [r for r in state.get("replicas", []) if isinstance(r, dict)]
        if len(entries) != max(0, replicas - 1):
            return False
        return all(isinstance(r.get("pid"), int) and _pid_is_engine(r["pid"], cluster_id) for r in entries)

    def _ensure_replicas(self, spec: EngineSpec, primary: EngineHandle, known: Any, timeout: float) -> EngineHandle:
        """Adopt or start replicas 1 … replicas-1 following ``primary``; stop (and wipe) any beyond. Each has its own
        port, data folder (``<root>/<cluster>.replicas/r<i>``) and record entry; a replica following an old
        primary address is restarted."""
        entries = {r["index"]: r for r in (known or []) if isinstance(r, dict) and isinstance(r.get("index"), int)}
        want = max(0, spec.replicas - 1)
        extra = [r for i, r in entries.items() if i > want]
        self._stop_replicas(spec.cluster_id, extra, wipe=True)
        out: list[dict[str, Any]] = []
        for i in range(1, want + 1):
            entry = entries.get(i, {})
            pid, port = entry.get("pid"), entry.get("port")
            if isinstance(pid, int) and _pid_is_engine(pid, spec.cluster_id):
                if entry.get("primary_url") == primary.url and isinstance(port, int):
                    if self._wait_healthy(f"http://127.0.0.1:{port}", spec.token, pid, min(timeout, 10.0)):
                        out.append(entry)
                        continue
                self._kill(pid)
            for stray in self._replica_strays(spec.cluster_id, i):
                self._kill(stray)
            out.append(self._spawn_replica(spec, i, primary.url, port, timeout))
        return EngineHandle(url=primary.url, state={**primary.state, "replicas": out})

    def _spawn_replica(self, spec: EngineSpec, index: int, primary_url: str, port: Any, timeout: float) -> dict:
        if not isinstance(port, int) or not _port_free(port):
            port = _free_port()
        data_dir = self.replicas_root(spec.cluster_id) / f"r{index}"
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VECTA_ENGINE_")}
        env["OMP_NUM_THREADS"] = str(spec.cu_size)
        args = [
            sys.executable, "-m", "services.engine", "serve",
            "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port),
            "--search-threads", str(max(2, spec.cu_size)), "--build-threads", str(spec.cu_size),
            "--replica-of", primary_url, "--secrets-stdin",
        ]  # fmt: skip
        memory = (get_settings().local_memory_per_cu_gib * spec.cu_size + 4) * _GIB

        def limits() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

        with (self.log_dir / f"engine-{spec.cluster_id}-r{index}.log").open("ab") as log:
            proc = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                start_new_session=True, preexec_fn=limits,
            )  # fmt: skip
        _send_secrets(proc, spec)
        url = f"http://127.0.0.1:{port}"
        if not self._wait_healthy(url, spec.token, proc.pid, timeout, proc) or proc.poll() is not None:
            self._kill(proc.pid)
            raise ProvisionError(f"read replica {index} did not become healthy in time")
        entry = {"index": index, "pid": proc.pid, "port": port, "url": url, "data_dir": str(data_dir)}
        return {**entry, "primary_url": primary_url}

    def _replica_strays(self, cluster_id: str, index: int) -> list[int]:
        """Processes serving replica ``index``'s data folder (one whose starter died before recording it)."""
        return [pid for pid, argv in _serving(self.replicas_root(cluster_id) / f"r{index}") if b"--replica-of" in argv]

    def _stop_replicas(self, cluster_id: str, entries: list[Any], wipe: bool) -> None:
        """Stop the given replicas (and with ``wipe`` remove their data folders: scaled away)."""
        for r in entries:
            if not isinstance(r, dict):
                continue
            pid = r.get("pid")
            if isinstance(pid, int) and _pid_is_engine(pid, cluster_id):
                self._kill(pid)
            index = r.get("index")
            if isinstance(index, int):
                for stray in self._replica_strays(cluster_id, index):
                    self._kill(stray)
                if wipe:
                    shutil.rmtree(self.replicas_root(cluster_id) / f"r{index}", ignore_errors=True)


def _serving(data_dir: Path) -> list[tuple[int, list[bytes]]]:
    """(pid, argv) of the processes whose command line serves ``data_dir`` (``--data-dir`` it), found in /proc."""
    want = str(data_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--data-dir" in argv:
            i = argv.index(b"--data-dir")
            if i + 1 < len(argv) and argv[i + 1] == want:
                found.append((int(entry.name), argv))
    return found


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (OSError, IndexError):
        return True


def get_provisioner(name: str) -> Provisioner:
    if name == "local":
        return LocalProvisioner()
    if name == "kubernetes":
        from kubernetes import client, config

        from services.control_plane.provisioners.kubernetes import KubernetesProvisioner

        try:  # in a pod: the service account; elsewhere: ~/.kube/config
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        s = get_settings()
        return KubernetesProvisioner(
            client.ApiClient(),
            namespace=s.k8s_namespace,
            image=s.k8s_engine_image,
            memory_per_cu_gib=s.k8s_memory_per_cu_gib,
            storage_per_cu_gib=s.k8s_storage_per_cu_gib,
            storage_class=s.k8s_storage_class or None,
        )
    raise ProvisionError(f"provisioner {name!r} is not available in this deployment")

"""The provisioner protocol: how the control plane gets engine workers for a cluster.

Implementations: ``local`` (engine worker child processes on loopback; the embedded default) and, later,
``kubernetes`` (a StatefulSet per cluster). Every method is idempotent by cluster id, because the Celery tasks that
call them may be retried after a worker dies half-way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class EngineSpec:
    cluster_id: str
    cu_size: int
    replicas: int
    token: str  # plaintext, in memory only
    data_key: bytes  # plaintext, in memory only
    state: dict[str, Any] = field(default_factory=dict)  # what the provisioner recorded last time
    # During a re-key: the data keys files may still be encrypted under (plaintext, in memory only).
    previous_keys: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class EngineHandle:
    url: str  # base URL of the engine's HTTP API
    state: dict[str, Any]  # bookkeeping to store on the cluster row (no secrets)


class ProvisionError(Exception):
    """The engine could not be started or did not become healthy; ``reason`` is safe to show customers."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Provisioner(Protocol):
    name: str

    def start(self, spec: EngineSpec, timeout: float = 60.0) -> EngineHandle:
        """Make sure the cluster's engine runs and is healthy (re-adopting one that already runs)."""

    def stop(self, cluster_id: str, state: dict[str, Any]) -> None:
        """Stop the engine, keeping its data."""

    def destroy(self, cluster_id: str, state: dict[str, Any]) -> None:
        """Stop the engine and remove its local data."""

    def is_running(self, cluster_id: str, state: dict[str, Any]) -> bool: ...

    def replicas_running(self, cluster_id: str, state: dict[str, Any], replicas: int) -> bool:
        """Every read replica (``replicas - 1`` engines following the primary) is alive."""

"""A cluster's data keys: read wrapped from its row, unwrapped only when an engine needs them.

During a re-key (``data_key_next_wrapped`` set) an engine is started with the new key as its current key and the
old one as a previous key: files not yet re-encrypted still open.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from services.control_plane.clusters.models import Cluster
from services.control_plane.keys import ring
from services.control_plane.keys.ring import KeyRef


def key_context(c: Cluster) -> dict[str, str]:
    """The encryption context a cluster's data key (and, with ``use``, its engine token) is bound to."""
    return {"org_id": c.org_id, "cluster_id": c.id}


@dataclass(frozen=True)
class SealedKeys:
    """A cluster's data keys as stored (wrapped), with the key version that unwraps them."""

    ref: KeyRef
    context: dict[str, str]
    current: bytes
    next: bytes | None = None

    def open(self) -> tuple[bytes, tuple[bytes, ...]]:
        """(the engine's current data key, its previous keys); raises KeyUnavailable."""
        current = ring.unwrap(self.ref, self.current, self.context)
        if self.next:
            return ring.unwrap(self.ref, self.next, self.context), (current,)
        return current, ()


def sealed_from(c: Cluster, ref: KeyRef) -> SealedKeys:
    return SealedKeys(ref, key_context(c), c.data_key_wrapped, c.data_key_next_wrapped)


def sealed_keys(s: Session, c: Cluster) -> SealedKeys:
    return sealed_from(c, ring.load_ref_sync(s, c.encryption_key_id, c.key_version, c.org_id))

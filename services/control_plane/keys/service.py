"""Encryption-key rules: register, list, describe, rotate, delete; the key a new cluster gets; KMS errors as API
errors. Provider calls (AWS KMS through boto3) run in a worker thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.keyprovider import KeyUnavailable, new_external_id
from services.auth.subject import AuthSubject
from services.control_plane import service as org_service
from services.control_plane.backups.models import Backup
from services.control_plane.clusters.models import Cluster
from services.control_plane.clusters.state import Status
from services.control_plane.keys import ring
from services.control_plane.keys.clusterkeys import key_context
from services.control_plane.keys.models import EncryptionKey, EncryptionKeyVersion
from services.control_plane.keys.ring import KeyRef
from services.control_plane.keys.schemas import AwsSetupOut, KeyIn, KeyOut, KeyVersionOut, RotateIn
from services.control_plane.models import Organization, Project
from services.core import audit
from services.core.celery_app import enqueue
from services.core.db import utcnow
from services.core.errors import Conflict, NotFound, ServiceUnavailable, Unprocessable, VectaError
from services.core.ids import new_id

KEY_UNAVAILABLE = "encryption_key_unavailable"
ROLE_SESSION_NAME = "vecta-cmek"
T = TypeVar("T")


def key_error(exc: KeyUnavailable, doing: str) -> VectaError:
    """A provider failure as an API error: 503 when the provider could not be asked (retry), else 409."""
    if exc.transient:
        return ServiceUnavailable(
            f"{doing}: the key provider is unreachable: {exc}", retry_after=5, code=KEY_UNAVAILABLE
        )
    return Conflict(f"{doing}: the encryption key is unavailable: {exc}", code=KEY_UNAVAILABLE)


async def call(fn: Callable[[], T], doing: str) -> T:
    """Run provider calls in a worker thread; KeyUnavailable becomes the API error for ``doing``."""
    try:
        return await anyio.to_thread.run_sync(fn)
    except KeyUnavailable as exc:
        raise key_error(exc, doing) from None


def _audit(session: AsyncSession, subject: AuthSubject, action: str, key: EncryptionKey, **details: Any) -> None:
    audit.record(
        session, action=action, org_id=key.org_id, actor_type=subject.kind, actor_id=subject.id,
        target_type="encryption_key", target_id=key.id, details=details,
    )  # fmt: skip


async def external_id(session: AsyncSession, org_id: str) -> str:
    """The organization's sts:ExternalId, made on first use."""
    org = await session.get(Organization, org_id, with_for_update=True)
    assert org is not None
    if not org.kms_external_id:
        org.kms_external_id = new_external_id()
        await session.flush()
    return org.kms_external_id


async def aws_setup(session: AsyncSession, subject: AuthSubject, project_id: str) -> AwsSetupOut:
    project = await org_service.get_project(session, subject, project_id, "key:manage")
    ext = await external_id(session, project.org_id)
    return AwsSetupOut(
        external_id=ext,
        role_session_name=ROLE_SESSION_NAME,
        trust_policy_condition={"StringEquals": {"sts:ExternalId": ext}},
    )


def verify(ref: KeyRef) -> None:
    """The key can be used for what Vecta needs: state, then a data key made and unwrapped under a test context."""
    st = ring.describe(ref)
    if not st.usable:
        raise KeyUnavailable(st.reason or f"the key is {st.state.replace('_', ' ')}", transient=st.transient)
    ctx = {"org_id": ref.org_id, "purpose": "vecta-key-check"}
    plain, wrapped = ring.generate(ref, ctx)
    if ring.unwrap(ref, wrapped, ctx) != plain:
        raise KeyUnavailable("the key did not give back the data key it made")


async def register(session: AsyncSession, subject: AuthSubject, project_id: str, body: KeyIn) -> EncryptionKey:
    project = await org_service.get_project(session, subject, project_id, "key:manage")
    key = EncryptionKey(
        id=new_id("ek"), org_id=project.org_id, project_id=project.id, provider=body.provider, is_default=False,
        status="ENABLED", current_version=1,
    )  # fmt: skip
    version = EncryptionKeyVersion(key_id=key.id, version=1)
    if body.provider == "managed":
        version.material_wrapped = ring.new_managed_material(key.org_id, key.id, 1)
    else:
        version.key_arn, version.role_arn = body.key_arn, body.role_arn
        ext = await external_id(session, project.org_id) if body.role_arn else None
        ref = KeyRef(key.id, key.org_id, "aws-kms", 1, body.key_arn, body.role_arn, ext)
        try:
            await anyio.to_thread.run_sync(verify, ref)
        except KeyUnavailable as exc:
            if exc.transient:
                raise key_error(exc, "cannot register the key") from None
            raise Unprocessable(
                f"key_arn: Vecta cannot use this key: {exc}. Check the key is enabled, that its key policy allows "
                "kms:DescribeKey, kms:GenerateDataKey, kms:Encrypt and kms:Decrypt"
                + (", and that the role trusts Vecta with this organization's external id" if body.role_arn else ""),
                code="encryption_key_unusable",
            ) from None
    session.add(key)
    await session.flush()
    session.add(version)
    _audit(session, subject, "encryption_key.create", key, provider=key.provider, key_arn=body.key_arn)
    await session.flush()
    return key


async def default_key(session: AsyncSession, project: Project) -> EncryptionKey:
    """The project's managed key for clusters created without ``encryption_key_id`` (made on first use)."""
    await session.get(Project, project.id, with_for_update=True)  # one default per project, even when racing
    stmt = select(EncryptionKey).where(
        EncryptionKey.project_id == project.id, EncryptionKey.is_default.is_(True), EncryptionKey.status != "DELETED"
    )
    key = (await session.execute(stmt.limit(1))).scalars().first()
    if key is not None:
        return key
    key = EncryptionKey(
        id=new_id("ek"), org_id=project.org_id, project_id=project.id, provider="managed", is_default=True,
        status="ENABLED", current_version=1,
    )  # fmt: skip
    session.add(key)
    await session.flush()
    session.add(
        EncryptionKeyVersion(
            key_id=key.id, version=1, material_wrapped=ring.new_managed_material(key.org_id, key.id, 1)
        )
    )
    audit.record(
        session, action="encryption_key.create", org_id=key.org_id, actor_type="system", actor_id=None,
        target_type="encryption_key", target_id=key.id, details={"provider": "managed", "default": True},
    )  # fmt: skip
    await session.flush()
    return key


async def key_for_new_cluster(session: AsyncSession, project: Project, key_id: str | None) -> KeyRef:
    """The current version of the key a new cluster in ``project`` is created under."""
    if key_id is None:
        key = await default_key(session, project)
    else:
        found = await session.get(EncryptionKey, key_id)
        if found is None or found.project_id != project.id or found.status == "DELETED":
            raise Unprocessable(
                f"encryption_key_id: key {key_id} not found in this project", code="encryption_key_not_found"
            )
        key = found
    if key.status != "ENABLED":
        raise Conflict(
            f"encryption key {key.id} is {key.status}: {key.status_reason or 'not usable'}", code=KEY_UNAVAILABLE
        )
    return await ring.load_ref(session, key.id, None, key.org_id)


async def get_key(
    session: AsyncSession, subject: AuthSubject, key_id: str, privilege: str, *, lock: bool = False
) -> EncryptionKey:
    key = await session.get(EncryptionKey, key_id, with_for_update=lock)
    if key is None or key.status == "DELETED" or not subject.can_see_project(key.org_id, key.project_id):
        raise NotFound(f"encryption key {key_id} not found", code="encryption_key_not_found")
    subject.require_project(key.org_id, key.project_id, privilege)
    return key


async def list_keys(
    session: AsyncSession, subject: AuthSubject, project_id: str, after: str | None, limit: int
) -> Sequence[EncryptionKey]:
    project = await org_service.get_project(session, subject, project_id, "key:read")
    stmt = select(EncryptionKey).where(EncryptionKey.project_id == project.id, EncryptionKey.status != "DELETED")
    if after:
        stmt = stmt.where(EncryptionKey.id > after)
    return (await session.execute(stmt.order_by(EncryptionKey.id).limit(limit + 1))).scalars().all()


async def clusters_using(session: AsyncSession, key_id: str) -> Sequence[Cluster]:
    stmt = select(Cluster).where(Cluster.encryption_key_id == key_id, Cluster.status != Status.DELETED.value)
    return (await session.execute(stmt.order_by(Cluster.id))).scalars().all()


async def key_out(session: AsyncSession, key: EncryptionKey, **extra: Any) -> dict[str, Any]:
    versions = (
        (
            await session.execute(
                select(EncryptionKeyVersion)
                .where(EncryptionKeyVersion.key_id == key.id)
                .order_by(EncryptionKeyVersion.version)
            )
        )
        .scalars()
        .all()
    )
    current = next((v for v in versions if v.version == key.current_version), None)
    count = await session.scalar(
        select(func.count())
        .select_from(Cluster)
        .where(Cluster.encryption_key_id == key.id, Cluster.status != Status.DELETED.value)
    )
    ext = None
    if current is not None and current.role_arn:
        org = await session.get(Organization, key.org_id)
        ext = org.kms_external_id if org else None
    out = KeyOut(
        id=key.id,
        project_id=key.project_id,
        provider=key.provider,
        key_arn=current.key_arn if current else None,
        role_arn=current.role_arn if current else None,
        external_id=ext,
        is_default=key.is_default,
        status=key.status,
        status_reason=key.status_reason,
        current_version=key.current_version,
        versions=[KeyVersionOut.model_validate(v) for v in versions],
        clusters=int(count or 0),
        last_checked_at=key.last_checked_at,
        created_at=key.created_at,
        updated_at=key.updated_at,
    )
    return {**out.model_dump(), **extra}


async def rotate(
    session: AsyncSession, subject: AuthSubject, key_id: str, body: RotateIn
) -> tuple[EncryptionKey, int, list[str]]:
    """A new key version; every data key the key wraps is re-wrapped under it in one transaction (all or
    nothing: a provider failure half-way changes nothing). With ``rekey``, running clusters also get a new data
    key, which their engines re-encrypt their files under in the background (``cluster.rekey``)."""
    key = await get_key(session, subject, key_id, "key:manage", lock=True)
    if key.status != "ENABLED":
        raise Conflict(f"encryption key {key.id} is {key.status}: {key.status_reason or ''}".rstrip(": "),
                       code=KEY_UNAVAILABLE)  # fmt: skip
    if key.provider == "managed" and (body.key_arn or body.role_arn):
        raise Unprocessable("key_arn and role_arn apply only to aws-kms keys", code="invalid_rotation")
    current = await ring.load_ref(session, key.id, None, key.org_id)
    version = EncryptionKeyVersion(key_id=key.id, version=key.current_version + 1)
    if key.provider == "managed":
        version.material_wrapped = ring.new_managed_material(key.org_id, key.id, version.version)
        ext = None
    else:
        version.key_arn = body.key_arn or current.key_arn
        version.role_arn = body.role_arn or current.role_arn
        ext = await external_id(session, key.org_id) if version.role_arn else None
    new_ref = KeyRef(key.id, key.org_id, key.provider, version.version, version.key_arn, version.role_arn, ext,
                     version.material_wrapped)  # fmt: skip
    if key.provider == "aws-kms":  # the new version is checked even without clusters to re-wrap
        try:
            await anyio.to_thread.run_sync(verify, new_ref)
        except KeyUnavailable as exc:
            if exc.transient:
                raise key_error(exc, "cannot rotate") from None
            raise Unprocessable(f"key_arn: Vecta cannot use this key: {exc}", code="encryption_key_unusable") from None
    clusters = await clusters_using(session, key.id)
    refs = {c.id: await ring.load_ref(session, key.id, c.key_version, key.org_id) for c in clusters}

    def rewrap() -> list[tuple[Cluster, bytes, bytes | None]]:
        out = []
        for c in clusters:
            ctx = key_context(c)
            old = refs[c.id]
            wrapped = ring.wrap(new_ref, ring.unwrap(old, c.data_key_wrapped, ctx), ctx)
            nxt = None
            if c.data_key_next_wrapped:  # a re-key still in progress keeps its new data key
                nxt = ring.wrap(new_ref, ring.unwrap(old, c.data_key_next_wrapped, ctx), ctx)
            elif body.rekey and c.status == Status.RUNNING.value:
                nxt = ring.generate(new_ref, ctx)[1]
            out.append((c, wrapped, nxt))
        return out

    done = await call(rewrap, "cannot rotate")
    session.add(version)
    key.current_version = version.version
    rekeyed: list[str] = []
    for c, wrapped, nxt in done:
        if nxt is not None and not c.data_key_next_wrapped:
            rekeyed.append(c.id)
        c.data_key_wrapped, c.data_key_next_wrapped, c.key_version = wrapped, nxt, version.version
    _audit(session, subject, "encryption_key.rotate", key, version=version.version, rewrapped=len(done),
           rekey=body.rekey, rekey_clusters=rekeyed, key_arn=version.key_arn)  # fmt: skip
    await session.flush()
    for cluster_id in rekeyed:
        enqueue("cluster.rekey", cluster_id)
    return key, len(done), rekeyed


async def delete(session: AsyncSession, subject: AuthSubject, key_id: str) -> None:
    key = await get_key(session, subject, key_id, "key:manage", lock=True)
    users = await clusters_using(session, key.id)
    if users:
        names = ", ".join(c.id for c in users[:5]) + (" ..." if len(users) > 5 else "")
        raise Conflict(
            f"encryption key {key.id} is in use by {len(users)} cluster(s): {names}; delete them first",
            code="encryption_key_in_use",
        )
    backups = await session.scalar(
        select(func.count())
        .select_from(Backup)
        .where(Backup.encryption_key_id == key.id, Backup.status.in_(["CREATING", "AVAILABLE"]))
    )
    if backups:
        raise Conflict(
            f"encryption key {key.id} wraps {backups} backup(s); they could never be restored without it. "
            "Delete those backups first",
            code="encryption_key_in_use",
        )
    key.status, key.deleted_at = "DELETED", utcnow()
    if key.provider == "managed":  # crypto-shredding: without the material nothing it wrapped can be unwrapped
        for v in (await session.execute(select(EncryptionKeyVersion).where(EncryptionKeyVersion.key_id == key.id))
                  ).scalars():  # fmt: skip
            v.material_wrapped = None
    _audit(session, subject, "encryption_key.delete", key)
    await session.flush()

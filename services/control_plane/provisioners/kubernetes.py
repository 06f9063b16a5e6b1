"""The ``kubernetes`` provisioner: per cluster one Secret (engine token + data key), one Service and one
StatefulSet with a PersistentVolumeClaim template, applied with the official ``kubernetes`` client.

Resources follow ``cu_size``: requests = limits = ``cu_size`` CPUs and ``VECTA_K8S_MEMORY_PER_CU_GIB`` x
``cu_size`` of memory; the volume is ``VECTA_K8S_STORAGE_PER_CU_GIB`` x ``cu_size``. ``stop`` scales the StatefulSet
to zero (the volume stays); ``destroy`` deletes everything including the claims.

What is verified here (no Kubernetes API server can run on this machine): every rendered object is built from
the client's models and survives the client's own serialize/deserialize round trip, and the exact API calls
(method, path, body) are recorded against a local HTTP server in the tests. Scheduling, volumes and networking
on a real cluster are not verified.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from services.control_plane.provisioners.base import EngineHandle, EngineSpec, ProvisionError

ENGINE_PORT = 8700
_GIB = "Gi"


def names(cluster_id: str) -> dict[str, str]:
    base = "vecta-" + cluster_id.replace("_", "-").lower()
    return {"statefulset": base, "service": base, "secret": base + "-keys", "headless": base + "-pods"}


def pod_url(cluster_id: str, namespace: str, ordinal: int) -> str:
    """A pod's own address through the headless Service (ordinal 0 is the primary, the others its replicas)."""
    n = names(cluster_id)
    return f"http://{n['statefulset']}-{ordinal}.{n['headless']}.{namespace}.svc.cluster.local:{ENGINE_PORT}"


def labels(cluster_id: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "vecta-engine", "vecta.dev/cluster": cluster_id.replace("_", "-").lower()}


def render(
    spec: EngineSpec,
    *,
    namespace: str,
    image: str,
    memory_per_cu_gib: int = 4,
    storage_per_cu_gib: int = 20,
    storage_class: str | None = None,
) -> tuple[client.V1Secret, client.V1Service, client.V1Service, client.V1StatefulSet]:
    n = names(spec.cluster_id)
    lab = labels(spec.cluster_id)
    meta = {"namespace": namespace, "labels": lab}
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name=n["secret"], **meta),
        type="Opaque",
        data={
            "token": base64.b64encode(spec.token.encode()).decode(),
            "data-key": base64.b64encode(base64.b64encode(spec.data_key)).decode(),
            # During a re-key: the keys files may still be under (comma-separated base64; empty otherwise).
            "previous-data-keys": base64.b64encode(
                ",".join(base64.b64encode(k).decode() for k in spec.previous_keys).encode()
            ).decode(),
        },
    )
    # The cluster's address is the primary (pod 0) only: writes must never reach a read replica.
    service = client.V1Service(
        metadata=client.V1ObjectMeta(name=n["service"], **meta),
        spec=client.V1ServiceSpec(
            selector={**lab, "statefulset.kubernetes.io/pod-name": f"{n['statefulset']}-0"},
            ports=[client.V1ServicePort(name="http", port=ENGINE_PORT, target_port=ENGINE_PORT)],
            type="ClusterIP",
        ),
    )
    # Governs the StatefulSet: every pod gets a DNS name (replicas follow pod 0 by it; the edge reads from all).
    headless = client.V1Service(
        metadata=client.V1ObjectMeta(name=n["headless"], **meta),
        spec=client.V1ServiceSpec(
            selector=lab,
            cluster_ip="None",
            publish_not_ready_addresses=True,
            ports=[client.V1ServicePort(name="http", port=ENGINE_PORT, target_port=ENGINE_PORT)],
        ),
    )
    cpu = str(spec.cu_size)
    memory = f"{memory_per_cu_gib * spec.cu_size}{_GIB}"
    resources = client.V1ResourceRequirements(
        requests={"cpu": cpu, "memory": memory}, limits={"cpu": cpu, "memory": memory}
    )

    def from_secret(var: str, key: str) -> client.V1EnvVar:
        return client.V1EnvVar(
            name=var,
            value_from=client.V1EnvVarSource(secret_key_ref=client.V1SecretKeySelector(name=n["secret"], key=key)),
        )

    container = client.V1Container(
        name="engine",
        image=image,
        # the engine's own entry point (argparse), not the image's `vecta` (typer, which loads pydantic: 11 MiB)
        command=["python", "-m", "services.engine"],
        args=[
            "serve",
            "--data-dir",
            "/data",
            "--host",
            "0.0.0.0",  # noqa: S104 - inside the pod; the Service is the only way in
            "--port",
            str(ENGINE_PORT),
            "--search-threads",
            str(max(2, spec.cu_size)),
            "--build-threads",
            str(spec.cu_size),
            "--replica-of",  # pods other than 0 follow pod 0 (no effect in pod 0)
            pod_url(spec.cluster_id, namespace, 0),
            "--replica-unless-ordinal-0",
        ],
        ports=[client.V1ContainerPort(name="http", container_port=ENGINE_PORT)],
        env=[
            from_secret("VECTA_ENGINE_TOKEN", "token"),
            from_secret("VECTA_ENGINE_DATA_KEY", "data-key"),
            from_secret("VECTA_ENGINE_PREVIOUS_DATA_KEYS", "previous-data-keys"),
            client.V1EnvVar(name="OMP_NUM_THREADS", value=cpu),
        ],
        resources=resources,
        volume_mounts=[client.V1VolumeMount(name="data", mount_path="/data")],
        readiness_probe=client.V1Probe(
            http_get=client.V1HTTPGetAction(path="/healthz", port=ENGINE_PORT), period_seconds=2, failure_threshold=3
        ),
        liveness_probe=client.V1Probe(
            http_get=client.V1HTTPGetAction(path="/healthz", port=ENGINE_PORT), period_seconds=10, failure_threshold=6
        ),
        security_context=client.V1SecurityContext(
            run_as_non_root=True, allow_privilege_escalation=False, read_only_root_filesystem=True
        ),
    )
    statefulset = client.V1StatefulSet(
        metadata=client.V1ObjectMeta(name=n["statefulset"], **meta),
        spec=client.V1StatefulSetSpec(
            replicas=spec.replicas,
            service_name=n["headless"],
            selector=client.V1LabelSelector(match_labels=lab),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=lab),
                spec=client.V1PodSpec(
                    containers=[container],
                    automount_service_account_token=False,
                    security_context=client.V1PodSecurityContext(run_as_user=10001, fs_group=10001),
                ),
            ),
            volume_claim_templates=[
                client.V1PersistentVolumeClaim(
                    metadata=client.V1ObjectMeta(name="data", labels=lab),
                    spec=client.V1PersistentVolumeClaimSpec(
                        access_modes=["ReadWriteOnce"],
                        storage_class_name=storage_class,
                        resources=client.V1VolumeResourceRequirements(
                            requests={"storage": f"{storage_per_cu_gib * spec.cu_size}{_GIB}"}
                        ),
                    ),
                )
            ],
        ),
    )
    return secret, service, headless, statefulset


class KubernetesProvisioner:
    name = "kubernetes"

    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        image: str,
        memory_per_cu_gib: int = 4,
        storage_per_cu_gib: int = 20,
        storage_class: str | None = None,
        poll_seconds: float = 1.0,
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.namespace = namespace
        self.image = image
        self.sizes = {"memory_per_cu_gib": memory_per_cu_gib, "storage_per_cu_gib": storage_per_cu_gib}
        self.storage_class = storage_class
        self.poll_seconds = poll_seconds

    def _apply(self, create: Any, replace: Any, name: str, body: Any) -> None:
        try:
            create(self.namespace, body, _request_timeout=30)
        except ApiException as exc:
            if exc.status != 409:
                raise ProvisionError(f"kubernetes refused {body.kind} {name}: {exc.status} {exc.reason}") from exc
            replace(name, self.namespace, body, _request_timeout=30)

    def start(self, spec: EngineSpec, timeout: float = 60.0) -> EngineHandle:
        secret, service, headless, sts = render(
            spec, namespace=self.namespace, image=self.image, storage_class=self.storage_class, **self.sizes
        )
        secret.kind, service.kind, headless.kind, sts.kind = "Secret", "Service", "Service", "StatefulSet"
        n = names(spec.cluster_id)
        self._apply(self.core.create_namespaced_secret, self.core.replace_namespaced_secret, n["secret"], secret)
        self._apply(self.core.create_namespaced_service, self.core.patch_namespaced_service, n["service"], service)
        self._apply(self.core.create_namespaced_service, self.core.patch_namespaced_service, n["headless"], headless)
        self._apply(
            self.apps.create_namespaced_stateful_set, self.apps.replace_namespaced_stateful_set, n["statefulset"], sts
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.apps.read_namespaced_stateful_set_status(
                n["statefulset"], self.namespace, _request_timeout=10
            )
            if status.status is not None and (status.status.ready_replicas or 0) >= spec.replicas:
                url = f"http://{n['service']}.{self.namespace}.svc.cluster.local:{ENGINE_PORT}"
                replicas = [
                    {"index": i, "url": pod_url(spec.cluster_id, self.namespace, i)} for i in range(1, spec.replicas)
                ]
                return EngineHandle(url=url, state={"namespace": self.namespace, **n, "replicas": replicas})
            time.sleep(self.poll_seconds)
        raise ProvisionError("the engine pods did not become ready in time")

    def stop(self, cluster_id: str, state: dict[str, Any]) -> None:
        n = names(cluster_id)
        try:
            self.apps.patch_namespaced_stateful_set_scale(
                n["statefulset"], self.namespace, {"spec": {"replicas": 0}}, _request_timeout=30
            )
        except ApiException as exc:
            if exc.status != 404:
                raise ProvisionError(f"kubernetes refused to scale down: {exc.status} {exc.reason}") from exc

    def destroy(self, cluster_id: str, state: dict[str, Any]) -> None:
        n = names(cluster_id)
        selector = ",".join(f"{k}={v}" for k, v in labels(cluster_id).items())
        for call, name in (
            (self.apps.delete_namespaced_stateful_set, n["statefulset"]),
            (self.core.delete_namespaced_service, n["service"]),
            (self.core.delete_namespaced_service, n["headless"]),
            (self.core.delete_namespaced_secret, n["secret"]),
        ):
            try:
                call(name, self.namespace, _request_timeout=30)
            except ApiException as exc:
                if exc.status != 404:
                    raise ProvisionError(f"kubernetes refused to delete {name}: {exc.status}") from exc
        self.core.delete_collection_namespaced_persistent_volume_claim(
            self.namespace, label_selector=selector, _request_timeout=30
        )

    def is_running(self, cluster_id: str, state: dict[str, Any]) -> bool:
        try:
            sts = self.apps.read_namespaced_stateful_set_status(
                names(cluster_id)["statefulset"], self.namespace, _request_timeout=10
            )
        except ApiException:
            return False
        return sts.status is not None and bool(sts.status.ready_replicas)

    def replicas_running(self, cluster_id: str, state: dict[str, Any], replicas: int) -> bool:
        """The StatefulSet controller restarts dead pods itself: all are there once ``replicas`` are ready."""
        try:
            sts = self.apps.read_namespaced_stateful_set_status(
                names(cluster_id)["statefulset"], self.namespace, _request_timeout=10
            )
        except ApiException:
            return False
        return sts.status is not None and (sts.status.ready_replicas or 0) >= replicas

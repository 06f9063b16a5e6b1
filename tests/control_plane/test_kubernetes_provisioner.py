"""The kubernetes provisioner without a Kubernetes API server (none can run here):

* every rendered object is built from the official client's models and survives the client's own
  serialize -> deserialize round trip unchanged;
* the exact API calls (method, path, body) of start / restart / stop / destroy are recorded against a local HTTP
  server on 127.0.0.1 that answers like the API server would.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from services.control_plane.provisioners.base import EngineSpec
from services.control_plane.provisioners.kubernetes import KubernetesProvisioner, names, render

SPEC = EngineSpec("cl_01abc", cu_size=4, replicas=1, token="engine-token-xyz", data_key=b"k" * 32)
NS = "vecta-tenants"


class _Fake:
    def __init__(self, data: Any) -> None:
        self.data = json.dumps(data)


def roundtrip(obj: Any, kind: str) -> dict[str, Any]:
    api = client.ApiClient()
    raw = api.sanitize_for_serialization(obj)
    back = api.deserialize(_Fake(raw), kind)
    assert api.sanitize_for_serialization(back) == raw
    return raw


def test_rendered_objects_are_valid_client_models() -> None:
    secret, service, headless, sts = render(
        SPEC, namespace=NS, image="vecta:1.0", memory_per_cu_gib=4, storage_per_cu_gib=20
    )
    s = roundtrip(secret, "V1Secret")
    svc = roundtrip(service, "V1Service")
    pods = roundtrip(headless, "V1Service")
    st = roundtrip(sts, "V1StatefulSet")
    n = names(SPEC.cluster_id)
    assert s["metadata"] == {"name": n["secret"], "namespace": NS, "labels": st["metadata"]["labels"]}
    assert base64.b64decode(s["data"]["token"]).decode() == SPEC.token
    assert base64.b64decode(base64.b64decode(s["data"]["data-key"])) == SPEC.data_key
    assert st["spec"]["selector"]["matchLabels"] == st["spec"]["template"]["metadata"]["labels"]
    # the cluster's Service reaches pod 0 (the primary) only
    pod0 = {"statefulset.kubernetes.io/pod-name": f"{n['statefulset']}-0"}
    assert svc["spec"]["selector"] == {**st["spec"]["selector"]["matchLabels"], **pod0}
    pod = st["spec"]["template"]["spec"]
    (engine,) = pod["containers"]
    # cu_size 4: 4 CPUs and 16 GiB, requests == limits; an 80 GiB claim per replica.
    assert engine["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}}
    (claim,) = st["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"] == {"storage": "80Gi"}
    assert engine["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    # The secrets reach the engine only by reference: neither appears in the StatefulSet.
    rendered = json.dumps(st)
    assert SPEC.token not in rendered and base64.b64encode(SPEC.data_key).decode() not in rendered
    env = {e["name"]: e for e in engine["env"]}
    assert env["VECTA_ENGINE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": n["secret"], "key": "token"}
    assert env["VECTA_ENGINE_DATA_KEY"]["valueFrom"]["secretKeyRef"] == {"name": n["secret"], "key": "data-key"}
    assert engine["command"] == ["python", "-m", "services.engine"] and engine["args"][0] == "serve"
    # read replicas: pods other than 0 follow pod 0 through the headless Service that governs the StatefulSet
    assert pods["spec"]["clusterIP"] == "None" and st["spec"]["serviceName"] == n["headless"]
    assert pods["spec"]["selector"] == st["spec"]["selector"]["matchLabels"]
    i = engine["args"].index("--replica-of")
    assert engine["args"][i + 1] == f"http://{n['statefulset']}-0.{n['headless']}.{NS}.svc.cluster.local:8700"
    assert "--replica-unless-ordinal-0" in engine["args"]
    assert engine["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["automountServiceAccountToken"] is False
    assert engine["securityContext"]["runAsNonRoot"] is True


class Recorder(BaseHTTPRequestHandler):
    calls: list[tuple[str, str, Any]] = []
    existing: set[str] = set()

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.calls.append((self.command, self.path, body))
        return body

    def do_POST(self) -> None:
        body = self._record()
        key = self.path + "/" + body["metadata"]["name"]
        if key in self.existing:
            self._answer(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
                               "code": 409})  # fmt: skip
            return
        self.existing.add(key)
        self._answer(201, body)

    def do_PUT(self) -> None:
        self._answer(200, self._record())

    def do_PATCH(self) -> None:
        body = self._record()
        if self.path.endswith("/scale"):
            self._answer(200, {"kind": "Scale", "apiVersion": "autoscaling/v1", **body})
        else:
            self._answer(200, {"kind": "Service", "apiVersion": "v1", **body})

    def do_GET(self) -> None:
        self._record()
        name = self.path.split("/")[-2]
        self._answer(200, {"kind": "StatefulSet", "apiVersion": "apps/v1", "metadata": {"name": name},
                           "status": {"replicas": 1, "readyReplicas": 1}})  # fmt: skip

    def do_DELETE(self) -> None:
        self._record()
        self._answer(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})


@pytest.fixture
def api_server() -> Iterator[str]:
    Recorder.calls = []
    Recorder.existing = set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_exact_api_calls(api_server: str) -> None:
    cfg = client.Configuration()
    cfg.host = api_server
    prov = KubernetesProvisioner(client.ApiClient(cfg), namespace=NS, image="vecta:1.0", poll_seconds=0.01)
    n = names(SPEC.cluster_id)
    core, apps = f"/api/v1/namespaces/{NS}", f"/apis/apps/v1/namespaces/{NS}"

    handle = prov.start(SPEC, timeout=5)
    assert handle.url == f"http://{n['service']}.{NS}.svc.cluster.local:8700"
    assert [(m, p) for m, p, _ in Recorder.calls] == [
        ("POST", f"{core}/secrets"),
        ("POST", f"{core}/services"),
        ("POST", f"{core}/services"),  # the headless Service governing the pods (read replicas)
        ("POST", f"{apps}/statefulsets"),
        ("GET", f"{apps}/statefulsets/{n['statefulset']}/status"),
    ]
    sts_body = Recorder.calls[3][2]
    assert sts_body["kind"] == "StatefulSet" and sts_body["spec"]["replicas"] == 1
    assert sts_body["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "4",
        "memory": "16Gi",
    }

    # Starting again (a retried task) updates in place: create answers 409, then replace/patch.
    Recorder.calls.clear()
    prov.start(SPEC, timeout=5)
    assert [(m, p) for m, p, _ in Recorder.calls] == [
        ("POST", f"{core}/secrets"),
        ("PUT", f"{core}/secrets/{n['secret']}"),
        ("POST", f"{core}/services"),
        ("PATCH", f"{core}/services/{n['service']}"),
        ("POST", f"{core}/services"),
        ("PATCH", f"{core}/services/{n['headless']}"),
        ("POST", f"{apps}/statefulsets"),
        ("PUT", f"{apps}/statefulsets/{n['statefulset']}"),
        ("GET", f"{apps}/statefulsets/{n['statefulset']}/status"),
    ]

    Recorder.calls.clear()
    prov.stop(SPEC.cluster_id, handle.state)
    assert Recorder.calls == [("PATCH", f"{apps}/statefulsets/{n['statefulset']}/scale", {"spec": {"replicas": 0}})]

    Recorder.calls.clear()
    prov.destroy(SPEC.cluster_id, handle.state)
    paths = [(m, p.split("?")[0]) for m, p, _ in Recorder.calls]
    assert paths == [
        ("DELETE", f"{apps}/statefulsets/{n['statefulset']}"),
        ("DELETE", f"{core}/services/{n['service']}"),
        ("DELETE", f"{core}/services/{n['headless']}"),
        ("DELETE", f"{core}/secrets/{n['secret']}"),
        ("DELETE", f"{core}/persistentvolumeclaims"),
    ]
    assert "labelSelector=app.kubernetes.io%2Fname%3Dvecta-engine" in Recorder.calls[-1][1]

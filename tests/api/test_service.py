"""Cross-cutting API behaviour: problem+json errors (validation, unknown routes, 405, bad JSON, pagination),
service endpoints (/healthz, /readyz, /metrics), the OpenAPI document and /docs."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.conftest import create_key, signup
from tests.control_plane.test_orgs import problem


async def test_validation_errors_are_400_naming_the_field(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    body = problem(
        await client.post(f"/v1/orgs/{t.org_id}/api-keys", json={"project_roles": []}, headers=t.headers),
        400,
        "validation_error",
    )
    assert body["detail"].startswith("name:")
    assert body["errors"][0] == {"field": "name", "in": "body", "message": "Field required"}
    body = problem(
        await client.post(
            f"/v1/orgs/{t.org_id}/api-keys",
            json={"name": "k", "project_roles": [{"project_id": t.project_id}]},
            headers=t.headers,
        ),
        400,
    )
    assert body["errors"][0]["field"] == "project_roles[0].role"
    body = problem(
        await client.post(f"/v1/orgs/{t.org_id}/api-keys", json={"name": "k", "expires_at": "soon"}, headers=t.headers),
        400,
    )
    assert "expires_at" in body["detail"]
    body = problem(await client.post("/v1/auth/login", json={"email": "x@example.com"}), 400)
    assert body["errors"][0]["field"] == "password"
    # A query parameter is named too, with where it was.
    body = problem(await client.get(f"/v1/orgs/{t.org_id}/members", params={"limit": "many"}, headers=t.headers), 400)
    assert body["errors"][0]["field"] == "limit" and body["errors"][0]["in"] == "query"
    # Unknown fields are refused, not ignored.
    body = problem(
        await client.post(f"/v1/orgs/{t.org_id}/projects", json={"name": "a", "color": "red"}, headers=t.headers), 400
    )
    assert "color" in body["detail"]
    assert "Traceback" not in body["detail"]


async def test_invalid_json_and_wrong_body_type(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    headers = {**t.headers, "content-type": "application/json"}
    for raw in (b'{"name": ', b"not json at all", b"\xff\xfe"):
        r = await client.post(f"/v1/orgs/{t.org_id}/projects", content=raw, headers=headers)
        problem(r, 400, "validation_error")
    problem(await client.post(f"/v1/orgs/{t.org_id}/projects", json=["a", "list"], headers=t.headers), 400)
    problem(await client.post(f"/v1/orgs/{t.org_id}/projects", json="name", headers=t.headers), 400)
    problem(await client.post(f"/v1/orgs/{t.org_id}/projects", headers=t.headers), 400)
    r = await client.post("/v1/auth/login", content=b"{", headers={"content-type": "application/json"})
    problem(r, 400)


async def test_unknown_routes_and_methods(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    for path in ("/v1/nothing", "/nothing", "/v1/orgs", "/v1/orgs/x/y/z"):
        body = problem(await client.get(path, headers=t.headers), 404, "route_not_found")
        assert path in body["detail"]
    problem(await client.get("/v1/nothing"), 404)  # no credentials needed to learn a route does not exist
    body = problem(await client.put(f"/v1/orgs/{t.org_id}", json={}, headers=t.headers), 405, "method_not_allowed")
    assert "allow" in {k.lower() for k in (await client.put(f"/v1/orgs/{t.org_id}", headers=t.headers)).headers}
    problem(await client.delete("/v1/me", headers=t.headers), 405)
    problem(await client.post("/healthz"), 405)


async def test_body_too_large(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    big = {"name": "x" * (2 << 20)}
    problem(await client.post(f"/v1/orgs/{t.org_id}/projects", json=big, headers=t.headers), 413, "payload_too_large")


@pytest.mark.parametrize("route", ["members", "projects", "api-keys", "invitations", "audit-logs"])
async def test_pagination_bounds(client: httpx.AsyncClient, route: str) -> None:
    t = await signup(client)
    url = f"/v1/orgs/{t.org_id}/{route}"
    for limit in ("0", "-1", "501", "abc"):
        body = problem(await client.get(url, params={"limit": limit}, headers=t.headers), 400)
        assert body["errors"][0]["field"] == "limit", body
    for token in ("%%%garbage%%%", "!!", "AAAA", "x" * 300):
        body = problem(await client.get(url, params={"page_token": token}, headers=t.headers), 400)
        assert "page_token" in body["detail"], body
    r = await client.get(url, params={"limit": 500}, headers=t.headers)
    assert r.status_code == 200 and set(r.json()) == {"items", "next_page_token"}
    assert (await client.get(url, params={"limit": 1}, headers=t.headers)).status_code == 200


async def test_pagination_walk_projects_and_keys(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    for n in range(4):
        assert (
            await client.post(f"/v1/orgs/{t.org_id}/projects", json={"name": f"p{n}"}, headers=t.headers)
        ).status_code == 201
        await create_key(client, t, name=f"k{n}", org_role="org_member")
    for route, expected in (("projects", 5), ("api-keys", 4)):
        full = (await client.get(f"/v1/orgs/{t.org_id}/{route}", headers=t.headers)).json()
        assert len(full["items"]) == expected and full["next_page_token"] is None
        walked: list[str] = []
        token = None
        while True:
            params: dict[str, Any] = {"limit": 2, **({"page_token": token} if token else {})}
            page = (await client.get(f"/v1/orgs/{t.org_id}/{route}", params=params, headers=t.headers)).json()
            walked += [x["id"] for x in page["items"]]
            token = page["next_page_token"]
            if token is None:
                break
        assert walked == [x["id"] for x in full["items"]], route


async def test_health_and_ready(client: httpx.AsyncClient, backend: str) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await client.get("/readyz")
    body = r.json()
    assert body["checks"]["database"] == "ok"
    if r.status_code == 200:
        assert body["status"] == "ok" and body["checks"]["broker"] == "ok"
    else:
        assert r.status_code == 503 and body["status"] == "unavailable"
    if backend == "postgresql":  # the CI configuration has Redis as broker
        assert r.status_code == 200, body


async def test_metrics_by_route_template(client: httpx.AsyncClient) -> None:
    t = await signup(client)
    assert (await client.get(f"/v1/orgs/{t.org_id}", headers=t.headers)).status_code == 200
    assert (await client.get("/v1/orgs/org_missing", headers=t.headers)).status_code == 404
    assert (await client.get("/v1/definitely/unknown")).status_code == 404
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text

    def count(method: str, route: str, status: str) -> float:
        m = re.search(
            rf'^vecta_http_requests_total\{{method="{method}",route="{re.escape(route)}",status="{status}"\}} (\S+)$',
            text,
            re.M,
        )
        return float(m.group(1)) if m else 0.0

    assert count("GET", "/v1/orgs/{org_id}", "200") >= 1
    assert count("GET", "/v1/orgs/{org_id}", "404") >= 1
    assert count("POST", "/v1/auth/signup", "201") >= 1
    assert count("GET", "<unmatched>", "404") >= 1
    # Concrete ids never become labels (bounded cardinality).
    assert t.org_id not in text
    assert re.search(
        r'^vecta_http_request_duration_seconds_bucket\{le="0\.005",method="GET",route="/v1/orgs/\{org_id\}"\} ',
        text,
        re.M,
    ) or re.search(r'^vecta_http_request_duration_seconds_bucket\{.*route="/v1/orgs/\{org_id\}".*\} ', text, re.M)
    assert re.search(
        r'^vecta_http_request_duration_seconds_count\{method="GET",route="/v1/orgs/\{org_id\}"\} ', text, re.M
    )
    assert re.search(
        r'^vecta_http_request_duration_seconds_sum\{method="GET",route="/v1/orgs/\{org_id\}"\} ', text, re.M
    )


async def test_openapi_and_docs(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    paths = doc["paths"]
    expected = {
        "/v1/auth/signup": {"post"},
        "/v1/auth/login": {"post"},
        "/v1/auth/refresh": {"post"},
        "/v1/auth/logout": {"post"},
        "/v1/me": {"get"},
        "/v1/orgs/{org_id}": {"get", "patch"},
        "/v1/orgs/{org_id}/members": {"get"},
        "/v1/orgs/{org_id}/members/{user_id}": {"patch", "delete"},
        "/v1/orgs/{org_id}/invitations": {"post", "get"},
        "/v1/invitations/{token}/accept": {"post"},
        "/v1/orgs/{org_id}/projects": {"get", "post"},
        "/v1/projects/{project_id}": {"get", "patch", "delete"},
        "/v1/orgs/{org_id}/roles": {"get", "post"},
        "/v1/orgs/{org_id}/api-keys": {"get", "post"},
        "/v1/api-keys/{key_id}": {"get", "patch", "delete"},
        "/v1/api-keys/{key_id}/rotate": {"post"},
        "/v1/orgs/{org_id}/audit-logs": {"get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
        "/metrics": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    for path, ops in paths.items():
        if not path.startswith("/v1/") or path.startswith("/v1/clusters/{cluster_id}/collections"):
            continue
        for method, op in ops.items():
            responses = op["responses"]
            assert "422" not in responses or "application/problem+json" in responses["422"]["content"], (path, method)
            for status, resp in responses.items():
                if status.startswith(("4", "5")):
                    assert "application/problem+json" in resp.get("content", {}), (path, method, status)
            public = op.get("security") == []
            if not public:
                assert "401" in responses, (path, method)
    assert paths["/v1/auth/login"]["post"]["security"] == []
    assert "security" not in paths["/v1/me"]["get"] and doc["security"] == [{"bearer": []}]
    schemas = doc["components"]["schemas"]
    assert {"Problem", "ValidationProblem"} <= set(schemas)
    assert "HTTPValidationError" not in schemas

    r = await client.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/openapi.json" in r.text and "swagger" in r.text.lower()

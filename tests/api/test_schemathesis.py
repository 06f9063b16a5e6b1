"""Property-based API tests: schemathesis generates requests from the app's own OpenAPI document (the issue-2
routes: identity, organizations, members, invitations, projects, roles, API keys, audit, service endpoints) and
checks every response: no 5xx, no status code the operation does not document, no body that violates its schema,
the documented content type, and errors always as ``application/problem+json``.

It runs twice: authenticated as a real signed-up owner (path parameters are sometimes the ids of real objects of
that owner's organization, so requests get past the 404s), and without valid credentials.

The app is a second instance of ``create_app()`` called in-process over ASGI by schemathesis (on its own event-loop
thread, with its own lifespan), against the session's migrated database.

Left out while authenticated: ``POST /v1/auth/logout`` and ``POST /v1/auth/password`` end or replace the very
session the test runs with (``tests/auth`` covers both); they still run in the unauthenticated pass.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import checks as st_checks
from schemathesis.core.failures import Failure
from schemathesis.python import asgi

from services.api.app import create_app
from tests.conftest import PASSWORD

TAGS = ("identity", "organizations", "projects", "roles", "api-keys", "audit", "service")
# Would end the test's own session; see the module docstring.
SESSION_ENDING = {("POST", "/v1/auth/logout"), ("POST", "/v1/auth/password")}
PROBLEM = "application/problem+json"

SETTINGS = settings(
    max_examples=int(os.environ.get("VECTA_SCHEMATHESIS_EXAMPLES", "12")),
    deadline=None,  # the first requests of a run pay for argon2 and connection set-up
    suppress_health_check=list(HealthCheck),
    database=None,
    derandomize=os.environ.get("VECTA_SCHEMATHESIS_RANDOM", "") == "",
)


@dataclass
class World:
    """A real tenant the generated requests can hit: ids by path-parameter name."""

    app: Any
    token: str
    ids: dict[str, list[str]] = field(default_factory=dict)


def _call(client: asgi.ASGIClient, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = client.request(method, path, headers=headers, **kw)
    assert r.status_code < 300, (method, path, r.status_code, r.text)
    return r.json() if r.content else None


@pytest.fixture(scope="module")
def world(migrated_db: str) -> Iterator[World]:
    with asgi.get_client(APP) as c:
        owner = _call(
            c,
            "POST",
            "/v1/auth/signup",
            json={
                "email": f"st-owner-{uuid.uuid4().hex[:10]}@example.com",
                "password": PASSWORD,
                "name": "Owner",
                "org_name": "Schemathesis",
            },
        )
        token, org_id, owner_id = owner["access_token"], owner["org"]["id"], owner["user"]["id"]
        projects = [p["id"] for p in _call(c, "GET", f"/v1/orgs/{org_id}/projects", token)["items"]]
        projects.append(_call(c, "POST", f"/v1/orgs/{org_id}/projects", token, json={"name": "second"})["id"])
        role = _call(
            c,
            "POST",
            f"/v1/orgs/{org_id}/roles",
            token,
            json={"name": "reader", "privileges": ["cluster:read", "data:read"]},
        )
        member_email = f"st-member-{uuid.uuid4().hex[:10]}@example.com"
        member = _call(
            c, "POST", "/v1/auth/signup", json={"email": member_email, "password": PASSWORD, "name": "Member"}
        )
        inv = _call(c, "POST", f"/v1/orgs/{org_id}/invitations", token, json={"email": member_email})
        _call(c, "POST", f"/v1/invitations/{inv['token']}/accept", member["access_token"])
        # One invitation to be revoked through its id, another whose token the owner tries to accept (403).
        pending = [
            _call(c, "POST", f"/v1/orgs/{org_id}/invitations", token, json={"email": f"st-{uuid.uuid4().hex[:8]}@x.io"})
            for _ in range(2)
        ]
        keys = [
            _call(c, "POST", f"/v1/orgs/{org_id}/api-keys", token, json={"name": f"k{n}", "org_role": "org_member"})
            for n in range(2)
        ]
        world = World(
            app=APP,
            token=token,
            ids={
                "org_id": [org_id],
                "user_id": [owner_id, member["user"]["id"]],
                "project_id": projects,
                "role_id": [role["id"]],
                "key_id": [k["id"] for k in keys],
                "invitation_id": [pending[0]["id"]],
                "token": [pending[1]["token"]],
            },
        )
    REAL_IDS.update(world.ids)
    yield world
    REAL_IDS.clear()
    asgi.shutdown_lifespans()


APP = create_app()
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP
schema.location = "/openapi.json"
schema = schema.include(tag=list(TAGS))
REAL_IDS: dict[str, list[str]] = {}  # filled by the ``world`` fixture before any case is generated
STATUSES: dict[str, Counter[str]] = {}  # operation -> "status code" seen in the authenticated run
_UNAUTHENTICATED_CALLS = itertools.count()


@schema.hook
def flatmap_path_parameters(ctx: Any, path_parameters: dict[str, Any]) -> Any:
    """Half of the time, replace the path parameters with ids of real objects of the tenant."""
    real = {k: REAL_IDS[k] for k in path_parameters or {} if k in REAL_IDS}
    if not real:
        return st.just(path_parameters)
    return st.one_of(
        st.just(path_parameters),
        st.fixed_dictionaries({k: st.sampled_from(v) for k, v in real.items()}).map(
            lambda chosen: {**path_parameters, **chosen}
        ),
    )


CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
    st_checks.response_headers_conformance,
]


class NotProblemJson(Failure):
    def __init__(self, status: int, content_type: str | None, body: str) -> None:
        self.status = status
        super().__init__(
            operation="",
            title="Error response is not application/problem+json",
            message=f"status {status} answered with content type {content_type!r}: {body[:300]}",
            code="not_problem_json",
        )

    @property
    def _unique_key(self) -> str:
        return f"not_problem_json:{self.status}"


def problem_json_errors(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx is a problem document with the fields API.md promises and the response's own status."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [None])[0]
    if not content_type or content_type.split(";")[0].strip() != PROBLEM:
        raise NotProblemJson(response.status_code, content_type, response.text)
    body = response.json()
    missing = {"type", "title", "status", "detail", "code"} - set(body)
    assert not missing, f"problem document without {sorted(missing)}: {body}"
    assert body["status"] == response.status_code, body
    return None


def _skip_session_ending(case: Any) -> None:
    if (case.method.upper(), case.path) in SESSION_ENDING:
        pytest.skip("ends the test's own session")


def _needs_credentials(case: Any) -> bool:
    return bool(case.operation.definition.raw.get("security", [{"bearer": []}]))


@schema.parametrize()
@SETTINGS
def test_api_authenticated(case: Any, world: World) -> None:
    _skip_session_ending(case)
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {world.token}"}
    response = case.call_and_validate(checks=CHECKS, additional_checks=[problem_json_errors])
    code = response.json().get("code") if response.status_code >= 400 else None
    STATUSES.setdefault(f"{case.operation.method.upper()} {case.operation.path}", Counter())[
        f"{response.status_code} {code or ''}".strip()
    ] += 1
    if _needs_credentials(case):
        assert response.status_code != 401, f"the owner's session was refused: {response.text}"


@schema.parametrize()
@SETTINGS
def test_api_unauthenticated(case: Any, world: World) -> None:
    """No credentials at all, or a well-formed API key that does not exist."""
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    if next(_UNAUTHENTICATED_CALLS) % 2:
        headers["Authorization"] = f"Bearer vk_{secrets.token_hex(8)}_{secrets.token_hex(16)}"
    case.headers = headers
    response = case.call_and_validate(checks=CHECKS, additional_checks=[problem_json_errors])
    if case.method.upper() != case.operation.method.upper():
        assert response.status_code == 405  # the coverage phase tries methods the route does not have
    elif _needs_credentials(case):
        # A body that is not JSON at all is refused (400) before the credentials are looked at.
        assert response.status_code in (400, 401), f"{case.method} {case.path}: {response.status_code}"


NOT_REACHED = re.compile(r"^(400 validation_error|400 invalid_page_token|404 .*|405 .*)$")


def test_generated_requests_reached_real_objects() -> None:
    """The authenticated run (above, same module) got past validation and the 404s: every operation with a path
    parameter answered at least once with a success or with a business rule about a real object (403, 409...)."""
    if not STATUSES:
        pytest.skip("the authenticated run did not run in this session")
    never = sorted(op for op, seen in STATUSES.items() if "{" in op and all(NOT_REACHED.match(s) for s in seen))
    assert not never, {op: dict(STATUSES[op]) for op in never}

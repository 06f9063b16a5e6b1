"""The ASGI app: ``create_app()`` wires settings, the database, the authenticator, middleware, error handlers and
the routers of every domain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import fastapi.routing
from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.api import edge, errors
from services.api.edge import Edge
from services.api.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from services.auth import deps as auth_deps
from services.auth.authenticate import Authenticator
from services.auth.endpoints import router as identity_router
from services.control_plane.backups.endpoints import router as backups_router
from services.control_plane.clusters.endpoints import router as clusters_router
from services.control_plane.endpoints import router as control_router
from services.control_plane.keys.endpoints import router as keys_router
from services.core.celery_app import celery_app, reconfigure
from services.core.db import Database
from services.core.kv import make_kv
from services.core.logging import configure_logging
from services.core.responses import Problem, ValidationProblem
from services.core.settings import get_settings

MAX_CONTROL_BODY = 1 << 20  # control-plane bodies are small; the data plane sets its own limits


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    settings.ensure_home()
    reconfigure()
    db = Database()
    app.state.db = db
    app.state.kv = make_kv()
    app.state.authenticator = Authenticator(db)
    app.state.edge = Edge(db, app.state.authenticator, app.state.kv)
    flusher = asyncio.create_task(_flush_loop(app.state.authenticator, settings.last_used_flush_seconds))
    try:
        yield
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await app.state.authenticator.flush_last_used()
        await app.state.edge.close()
        await app.state.kv.close()
        await db.dispose()


async def _flush_loop(authenticator: Authenticator, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        await authenticator.flush_last_used()


class VectaAPI(FastAPI):
    """The FastAPI app, with data-plane requests (``/v1/clusters/{id}/collections…``) served first.

    They are the hot path: the edge answers them at the ASGI level, ahead of FastAPI's and Starlette's layers
    (server-error, telemetry and body-limit wrappers, our request-context and body-size middleware, the router),
    each of which costs every request an await, closures and dictionary work. ``Edge.dispatch`` does what those
    layers do for it: request context and id, metrics, problem+json errors including a 500 for the unexpected.
    (FastAPI's OpenTelemetry instrumentation, when configured, therefore sees control-plane requests only.)
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match = edge.dataplane_match(scope)
            if match is not None:
                scope["app"] = self
                await self.state.edge.dispatch(scope, receive, send, *match)
                return
        await super().__call__(scope, receive, send)


def create_app() -> FastAPI:
    configure_logging()
    app = VectaAPI(
        title="Vecta API",
        version="1.0.0",
        description="Managed vector database: control plane and data plane. Errors are RFC 9457 problems.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_CONTROL_BODY, exempt=edge.body_limit_exempt)
    app.add_middleware(RequestContextMiddleware)
    app.include_router(identity_router)
    app.include_router(control_router)
    app.include_router(clusters_router)
    app.include_router(backups_router)
    app.include_router(keys_router)
    app.router.routes.extend(edge.routes(lambda request: request.app.state.edge))
    _service_routes(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _service_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["service"], include_in_schema=True)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"], responses={503: {"model": Problem}})
    async def readyz(request: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            async with request.app.state.db.session() as s:
                await s.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        checks["broker"] = await asyncio.to_thread(_broker_check)
        ok = all(v == "ok" for v in checks.values())
        import orjson

        return Response(
            orjson.dumps({"status": "ok" if ok else "unavailable", "checks": checks}),
            status_code=200 if ok else 503,
            media_type="application/json",
        )

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _broker_check() -> str:
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:
        return f"error: {type(exc).__name__}"


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (Problem, ValidationProblem):
        components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    # Validation errors are 400 problem documents here, not FastAPI's default 422 body.
    for path in schema.get("paths", {}).values():
        for op in path.values():
            responses = op.get("responses", {})
            default_422 = responses.get("422", {}).get("content", {}).get("application/json", {})
            if default_422.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
            responses.setdefault(
                "400",
                {
                    "description": "Bad Request",
                    "content": {
                        "application/problem+json": {"schema": {"$ref": "#/components/schemas/ValidationProblem"}}
                    },
                },
            )
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    schema["components"]["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A console session access token (JWT) or an API key (vk_<id>_<secret>)",
        }
    }
    schema["security"] = [{"bearer": []}]
    schema["paths"].update(edge.openapi_paths())
    # Routes that authenticate nobody (sign-up, login, health...) say so, instead of inheriting the bearer.
    # FastAPI >= 0.16x includes routers lazily: iter_route_contexts flattens them (older versions list them flat).
    route: Any
    for route in getattr(fastapi.routing, "iter_route_contexts", iter)(app.routes):
        if not isinstance(getattr(route, "original_route", route), APIRoute) or not route.include_in_schema:
            continue
        if not _needs_subject(route.dependant):
            for method in route.methods or ():
                op = schema["paths"].get(route.path_format, {}).get(method.lower())
                if op is not None:
                    op["security"] = []
    app.openapi_schema = schema
    return schema


def _needs_subject(dependant: Dependant) -> bool:
    return any(d.call is auth_deps._subject or _needs_subject(d) for d in dependant.dependencies)

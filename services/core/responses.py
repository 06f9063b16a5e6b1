"""OpenAPI ``responses`` for problem+json errors, so every route documents the errors it can return."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from services.core.errors import PROBLEM_CONTENT_TYPE, STATUS_TITLES


class Problem(BaseModel):
    type: str = Field(examples=["https://docs.vecta.dev/errors/cluster_not_found"])
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None


class ValidationProblem(Problem):
    errors: list[dict[str, Any]] = Field(default_factory=list)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted(set(statuses) | {400}):
        model = ValidationProblem if status == 400 else Problem
        out[status] = {
            "model": model,
            "description": STATUS_TITLES.get(status, "Error"),
            "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    return out

"""Shared response-model plumbing: strict request models and the list envelope."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class RequestModel(BaseModel):
    """Request bodies reject unknown fields, so a typo is a 400 naming it rather than silently ignored."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ListOf(BaseModel, Generic[T]):
    items: list[T]
    next_page_token: str | None = None

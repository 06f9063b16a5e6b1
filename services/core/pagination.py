"""Keyset pagination over time-ordered ids: ``?limit=&page_token=`` → ``{items, next_page_token}``."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from services.core.errors import BadRequest

T = TypeVar("T")


@dataclass(frozen=True)
class Page:
    limit: int
    after: str | None

    @classmethod
    def from_query(cls, limit: int, page_token: str | None) -> Page:
        if not page_token:
            return cls(limit, None)
        try:
            # validate=True: characters outside the alphabet are an error, not silently skipped.
            padded = page_token + "=" * (-len(page_token) % 4)
            after = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BadRequest("page_token is not a token this API issued", code="invalid_page_token") from None
        if not after or not after.isprintable() or len(after) > 100:
            raise BadRequest("page_token is not a token this API issued", code="invalid_page_token")
        return cls(limit, after)

    def cut(self, rows: Sequence[T], key: Any = lambda r: r.id) -> tuple[list[T], str | None]:
        """``rows`` were fetched with ``limit + 1``: returns this page and the next token (or None)."""
        items = list(rows[: self.limit])
        if len(rows) > self.limit and items:
            token = base64.urlsafe_b64encode(str(key(items[-1])).encode()).decode().rstrip("=")
            return items, token
        return items, None

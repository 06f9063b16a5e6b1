"""Import limits and tuning, read from ``VECTA_IMPORT_*`` environment variables (see docs/clusters.md, Imports).

Kept apart from ``services.core.settings`` because only the import task and its edge hook read them; they are
read afresh for every import (a cheap object), so a changed environment applies to the next import.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ImportSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VECTA_IMPORT_", extra="ignore")

    max_bytes: int = Field(10 << 30, ge=1, description="largest object an import reads (bytes)")
    max_rows: int = Field(10_000_000, ge=1, description="most records one import may hold")
    batch_rows: int = Field(1_000, ge=1, le=10_000, description="records per upsert sent to the engine")
    batch_bytes: int = Field(16 << 20, ge=1 << 16, description="approximate JSON size of one upsert")
    lease_seconds: float = Field(120.0, gt=0, description="a running import not heard from this long is taken over")
    allowed_buckets: str = Field("", description="comma-separated S3 buckets imports may read; empty: any")
    engine_timeout_seconds: float = Field(120.0, gt=0)
    engine_retry_seconds: float = Field(60.0, ge=0, description="how long an unreachable engine is waited for")

    @property
    def buckets(self) -> frozenset[str]:
        return frozenset(b.strip() for b in self.allowed_buckets.split(",") if b.strip())


def import_settings() -> ImportSettings:
    return ImportSettings()

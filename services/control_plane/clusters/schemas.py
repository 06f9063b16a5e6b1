from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field

from services.core.schemas import RequestModel, ResponseModel


class ClusterIn(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    plan: Literal["serverless", "dedicated"]
    region: str = Field(min_length=2, max_length=32, pattern=r"^[a-z0-9][a-z0-9-]*$")
    cu_size: int = Field(1, ge=1, le=64, description="Compute units: cores and memory of the engine worker")
    replicas: int = Field(1, ge=1, le=10)
    encryption_key_id: str | None = Field(None, max_length=40)


class ClusterPatch(RequestModel):
    cu_size: int | None = Field(None, ge=1, le=64)
    replicas: int | None = Field(None, ge=1, le=10)


class EncryptionOut(ResponseModel):
    key_id: str | None
    provider: str
    key_version: int | None = Field(None, description="The version of the key that wraps the data key")
    rekey_in_progress: bool = Field(False, description="The data key is being replaced; files are re-encrypted")


class ClusterOut(ResponseModel):
    id: str
    name: str
    project_id: str
    org_id: str
    plan: str
    region: str
    cu_size: int
    replicas: int
    status: str
    status_reason: str | None
    endpoint: str = Field(description="Base URL of the cluster's data plane")
    created_at: dt.datetime
    updated_at: dt.datetime
    storage_bytes: int
    vector_count: int
    encryption: EncryptionOut


class ClusterAccepted(ClusterOut):
    job_id: str


class JobOut(ResponseModel):
    id: str
    kind: str
    resource_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: float
    error: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class MetricPoint(ResponseModel):
    t: dt.datetime = Field(description="Start of the step this point covers")
    qps: float | None = Field(
        description="Data-plane requests (reads and writes) per second, averaged since the previous sample; "
        "null without an earlier sample"
    )
    requests: int | None = Field(description="Data-plane requests counted for this point; null like qps")
    latency_p50_ms: float | None = Field(
        description="Median latency in milliseconds of read requests (search, hybrid-search, query, fetch, count) "
        "inside the engine; null when there were none"
    )
    latency_p99_ms: float | None = Field(description="99th percentile of the same, in milliseconds")
    vectors: int = Field(description="Live vectors at the step's last sample")
    storage_bytes: int = Field(description="Bytes the engine holds on disk at the step's last sample")


class MetricsOut(ResponseModel):
    cluster_id: str
    start: dt.datetime
    end: dt.datetime
    step: int
    points: list[MetricPoint]

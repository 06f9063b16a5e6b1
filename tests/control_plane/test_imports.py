"""Bulk imports through the public API: JSON Lines, Parquet and NumPy objects from S3 (moto's server on loopback)
and from the local object store, imported by the ``collection.import`` task into a real engine process, then
searched and fetched through the edge. Bad files fail naming the record and write nothing; URIs outside the
object store are refused; a task whose worker died resumes after the last acknowledged batch; authorization."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from services.control_plane.clusters.models import Job
from services.control_plane.clusters.tasks import engine_call, engine_token
from services.control_plane.imports import api as imports_api
from services.control_plane.imports import tasks as import_tasks
from services.control_plane.imports.settings import ImportSettings
from services.core.settings import get_settings
from tests.awskit import moto_server
from tests.clusterkit import cluster_row, create_cluster, records
from tests.conftest import Tenant, auth, create_key, signup

DIM = 8
BUCKET = "imports"
FIELDS = [{"name": "genre", "type": "string"}, {"name": "year", "type": "int"}]


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    with moto_server("AWS_ENDPOINT_URL_S3") as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture(autouse=True)
def _small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VECTA_IMPORT_BATCH_ROWS", "50")  # several batches even for small files


_box: dict[str, Any] = {}


async def world(client: httpx.AsyncClient) -> dict[str, Any]:
    """One tenant and one RUNNING cluster for the whole module (a cluster costs a second or two to start)."""
    if not _box:
        owner = await signup(client, "imports", "Imports Org")
        cluster = await create_cluster(client, owner.access_token, owner.project_id)
        _box.update(owner=owner, cid=cluster["id"])
    return _box


def store_root() -> Path:
    root = Path(get_settings().objects_uri.removeprefix("file://"))
    (root / "imports").mkdir(parents=True, exist_ok=True)
    return root


def dp(cid: str, rest: str = "") -> str:
    return f"/v1/clusters/{cid}/collections{rest}"


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}"
    return r.json()


async def new_collection(client: httpx.AsyncClient, w: dict[str, Any], metric: str = "cosine") -> str:
    name = f"c{uuid.uuid4().hex[:8]}"
    body = {"name": name, "dimension": DIM, "metric": metric, "fields": FIELDS, "text_field": "body"}
    ok(await client.post(dp(w["cid"]), json=body, headers=w["owner"].headers), 201)
    return name


async def start(client: httpx.AsyncClient, w: dict[str, Any], coll: str, uri: str, **extra: Any) -> dict[str, Any]:
    """POST an import; the eager Celery task has run by the time the 202 comes back; returns the finished import."""
    r = await client.post(dp(w["cid"], f"/{coll}/imports"), json={"uri": uri, **extra}, headers=w["owner"].headers)
    accepted = ok(r, 202)
    assert accepted["id"] == accepted["job_id"] and accepted["kind"] == "collection.import"
    assert accepted["collection"] == coll and accepted["cluster_id"] == w["cid"]
    job = ok(await client.get(f"/v1/jobs/{accepted['job_id']}", headers=w["owner"].headers))
    got = ok(await client.get(dp(w["cid"], f"/{coll}/imports/{accepted['job_id']}"), headers=w["owner"].headers))
    assert got["status"] == job["status"] and got["error"] == job["error"]
    return got


async def count(client: httpx.AsyncClient, w: dict[str, Any], coll: str) -> int:
    return int(ok(await client.post(dp(w["cid"], f"/{coll}/count"), json={}, headers=w["owner"].headers))["count"])


def rows(n: int, *, meta: bool = True) -> list[dict[str, Any]]:
    out = records(n, DIM, prefix="doc")
    for i, r in enumerate(out):
        if meta:
            r["metadata"] = {"genre": "ab"[i % 2], "year": 2000 + i}
            r["text"] = f"document number {i}"
    return out


def jsonl(recs: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in recs)


async def check_searchable(client: httpx.AsyncClient, w: dict[str, Any], coll: str, recs: list[dict[str, Any]]) -> None:
    """Search and fetch through the API find what was imported."""
    h = w["owner"].headers
    for probe in (recs[0], recs[len(recs) // 2], recs[-1]):
        res = ok(await client.post(dp(w["cid"], f"/{coll}/search"), json={"vector": probe["vector"], "top_k": 3},
                                   headers=h))["results"]  # fmt: skip
        assert res[0]["id"] == probe["id"], res
    body = {"ids": [recs[3]["id"]], "include_vectors": True}
    fetched = ok(await client.post(dp(w["cid"], f"/{coll}/fetch"), json=body, headers=h))["records"]
    assert fetched[0]["id"] == recs[3]["id"]
    assert np.allclose(fetched[0]["vector"], recs[3]["vector"], atol=1e-6)
    if "metadata" in recs[3]:
        assert fetched[0]["metadata"] == recs[3]["metadata"]


async def write_units(app: FastAPI, cid: str) -> int:
    c = await cluster_row(app, cid)
    return int(engine_call(c.engine_url, engine_token(c), "GET", "/internal/stats")["write_units"])


# -- formats ----------------------------------------------------------------------------------------------------
async def test_jsonl_from_s3_is_searchable_and_metered(client: httpx.AsyncClient, app: FastAPI, s3: Any) -> None:
    w = await world(client)
    coll = await new_collection(client, w)
    recs = rows(230)
    s3.put_object(Bucket=BUCKET, Key="data/docs.jsonl", Body=jsonl(recs[:100]) + b"\n" + jsonl(recs[100:]))
    before = await write_units(app, w["cid"])
    imp = await start(client, w, coll, f"s3://{BUCKET}/data/docs.jsonl")
    assert imp["status"] == "succeeded", imp
    assert imp["rows_total"] == 230 and imp["rows_imported"] == 230 and imp["progress"] == 1.0
    assert imp["format"] == "jsonl" and imp["error"] is None and imp["finished_at"]
    assert await count(client, w, coll) == 230
    await check_searchable(client, w, coll, recs)
    assert await write_units(app, w["cid"]) - before == 230  # imported vectors are write units like upserts
    hits = ok(await client.post(dp(w["cid"], f"/{coll}/search"), json={"text": "number 17", "top_k": 1},
                                headers=w["owner"].headers))["results"]  # fmt: skip
    assert hits[0]["id"] == "doc17"  # the text went in too


async def test_gzipped_jsonl_from_the_local_store(client: httpx.AsyncClient) -> None:
    w = await world(client)
    coll = await new_collection(client, w)
    recs = rows(60)
    path = store_root() / "imports" / f"{coll}.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(recs)))
    imp = await start(client, w, coll, path.as_uri())
    assert imp["status"] == "succeeded" and imp["rows_imported"] == 60, imp
    await check_searchable(client, w, coll, recs)


def parquet_bytes(recs: list[dict[str, Any]], layout: str) -> bytes:
    cols: dict[str, Any] = {
        "id": [r["id"] for r in recs],
        "vector": pa.array([r["vector"] for r in recs], type=pa.list_(pa.float32())),
        "text": [r["text"] for r in recs],
    }
    if layout == "struct":
        cols["metadata"] = pa.array([r["metadata"] for r in recs])
    elif layout == "json":
        cols["metadata"] = [json.dumps(r["metadata"]) for r in recs]
    else:  # one column per field
        cols["genre"] = [r["metadata"]["genre"] for r in recs]
        cols["year"] = pa.array([r["metadata"]["year"] for r in recs], type=pa.int64())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), sink, row_group_size=70)
    return bytes(sink.getvalue().to_pybytes())


@pytest.mark.parametrize(("where", "layout"), [("s3", "struct"), ("local", "columns"), ("local", "json")])
async def test_parquet(client: httpx.AsyncClient, s3: Any, where: str, layout: str) -> None:
    w = await world(client)
    coll = await new_collection(client, w)
    recs = rows(150)
    data = parquet_bytes(recs, layout)
    if where == "s3":
        s3.put_object(Bucket=BUCKET, Key=f"pq/{coll}.parquet", Body=data)
        uri = f"s3://{BUCKET}/pq/{coll}.parquet"
    else:
        path = store_root() / "imports" / f"{coll}.parquet"
        path.write_bytes(data)
        uri = path.as_uri()
    imp = await start(client, w, coll, uri)
    assert imp["status"] == "succeeded" and imp["format"] == "parquet" and imp["rows_imported"] == 150, imp
    await check_searchable(client, w, coll, recs)


@pytest.mark.parametrize(("where", "kind"), [("local", "npy"), ("s3", "npz")])
async def test_numpy(client: httpx.AsyncClient, s3: Any, tmp_path: Path, where: str, kind: str) -> None:
    w = await world(client)
    coll = await new_collection(client, w, metric="l2")
    matrix = np.random.default_rng(7).standard_normal((120, DIM)).astype(np.float32)
    file = tmp_path / f"data.{kind}"
    if kind == "npy":
        np.save(file, matrix)
        ids = [str(i) for i in range(120)]
    else:
        ids = [f"vec-{i}" for i in range(120)]
        np.savez_compressed(file, ids=np.array(ids), vectors=matrix)
    if where == "s3":
        s3.upload_file(str(file), BUCKET, f"np/{coll}.{kind}")
        uri = f"s3://{BUCKET}/np/{coll}.{kind}"
    else:
        dest = store_root() / "imports" / f"{coll}.{kind}"
        dest.write_bytes(file.read_bytes())
        uri = dest.as_uri()
    imp = await start(client, w, coll, uri)
    assert imp["status"] == "succeeded" and imp["format"] == kind and imp["rows_imported"] == 120, imp
    await check_searchable(client, w, coll, [{"id": i, "vector": v.tolist()} for i, v in zip(ids, matrix, strict=True)])


# -- bad files: the job fails naming the record, and nothing is written -------------------------------------------
def _bad_jsonl_dim() -> tuple[bytes, str, str]:
    recs = rows(200)
    recs[149]["vector"] = recs[149]["vector"][:3]
    return jsonl(recs), "jsonl", "line 150 (id 'doc149'): vector has dimension 3, the collection has 8"


def _bad_jsonl_dup() -> tuple[bytes, str, str]:
    recs = rows(120)
    recs[110]["id"] = "doc7"
    return jsonl(recs), "jsonl", "line 111 (id 'doc7'): id 'doc7' appears more than once in the file (first at line 8)"


def _bad_jsonl_type() -> tuple[bytes, str, str]:
    recs = rows(80)
    recs[64]["metadata"]["year"] = "1999"
    return jsonl(recs), "jsonl", "line 65 (id 'doc64'): metadata.year must be a 64-bit integer"


def _bad_parquet_nan() -> tuple[bytes, str, str]:
    recs = rows(150)
    recs[120]["vector"][5] = float("nan")
    return parquet_bytes(recs, "struct"), "parquet", "row 120 (id 'doc120'): vector[5] is NaN"


def _bad_parquet_dim() -> tuple[bytes, str, str]:
    recs = rows(150)
    recs[99]["vector"] = [*recs[99]["vector"], 1.0]
    return parquet_bytes(recs, "columns"), "parquet", "row 99 (id 'doc99'): vector has dimension 9"


def _bad_jsonl_length() -> tuple[bytes, str, str]:
    recs = rows(60)
    recs[42]["vector"] = [3e38] * len(recs[42]["vector"])  # finite, but its length is beyond float32
    return jsonl(recs), "jsonl", "line 43 (id 'doc42'): the vector's length exceeds the float32 range"


@pytest.mark.parametrize(
    "case", [_bad_jsonl_dim, _bad_jsonl_dup, _bad_jsonl_type, _bad_parquet_nan, _bad_parquet_dim, _bad_jsonl_length]
)
async def test_bad_file_fails_naming_the_record_and_writes_nothing(client: httpx.AsyncClient, case: Any) -> None:
    w = await world(client)
    coll = await new_collection(client, w)
    data, ext, message = case()
    path = store_root() / "imports" / f"{coll}.{ext}"
    path.write_bytes(data)
    imp = await start(client, w, coll, path.as_uri())
    assert imp["status"] == "failed", imp
    assert message in imp["error"], imp["error"]
    assert imp["rows_imported"] == 0
    assert await count(client, w, coll) == 0


async def test_missing_or_unreadable_objects_fail_the_job(client: httpx.AsyncClient, s3: Any) -> None:
    w = await world(client)
    coll = await new_collection(client, w)
    cases = [
        (f"s3://{BUCKET}/nothing/here.jsonl", "the object does not exist"),
        ("s3://no-such-bucket-vecta/x.jsonl", "bucket 'no-such-bucket-vecta' does not exist"),
        ((store_root() / "imports" / "absent.parquet").as_uri(), "the object does not exist"),
    ]
    bad_fmt = store_root() / "imports" / f"{coll}.csv"
    bad_fmt.write_text("id,vector\n")
    cases.append((bad_fmt.as_uri(), "unsupported format"))
    for uri, message in cases:
        imp = await start(client, w, coll, uri)
        assert imp["status"] == "failed" and message in imp["error"], (uri, imp)


async def test_limits_fail_the_job(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    w = await world(client)
    coll = await new_collection(client, w)
    path = store_root() / "imports" / f"{coll}.jsonl"
    path.write_bytes(jsonl(rows(30)))
    monkeypatch.setenv("VECTA_IMPORT_MAX_ROWS", "20")
    imp = await start(client, w, coll, path.as_uri())
    assert imp["status"] == "failed" and "more than 20 records (VECTA_IMPORT_MAX_ROWS)" in imp["error"], imp
    monkeypatch.setenv("VECTA_IMPORT_MAX_BYTES", "1000")
    imp = await start(client, w, coll, path.as_uri())
    assert imp["status"] == "failed" and "at most 1000 bytes (VECTA_IMPORT_MAX_BYTES)" in imp["error"], imp
    assert await count(client, w, coll) == 0


# -- the request --------------------------------------------------------------------------------------------------
async def test_bad_requests_are_400_and_create_no_job(client: httpx.AsyncClient, app: FastAPI, tmp_path: Path) -> None:
    w = await world(client)
    coll = await new_collection(client, w)
    root = store_root()
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(jsonl(rows(3)))
    link = root / "imports" / f"{coll}-link.jsonl"
    link.symlink_to(outside)
    cases: list[tuple[Any, str]] = [
        ({"uri": outside.as_uri()}, "import_uri_forbidden"),  # outside the object store's folder
        ({"uri": "file:///etc/passwd"}, "import_uri_forbidden"),
        ({"uri": f"file://{root}/imports/../../outside.jsonl"}, "import_uri_forbidden"),
        ({"uri": link.as_uri()}, "import_uri_forbidden"),  # a symlink inside pointing outside
        ({"uri": f"file://{root}/clusters/cl_x/suspend/SNAPSHOT.enc"}, "import_uri_forbidden"),  # cluster data
        ({"uri": "https://example.com/data.jsonl"}, "invalid_uri"),
        ({"uri": "s3://bucket-only"}, "invalid_uri"),
        ({"uri": "relative/path.jsonl"}, "invalid_uri"),
        ({}, "validation_error"),
        ({"uri": 42}, "validation_error"),
        ({"uri": "s3://b/k.jsonl", "format": "csv"}, "validation_error"),
        ({"uri": "s3://b/k.jsonl", "mode": "fast"}, "unknown_field"),
        ([1, 2], "validation_error"),
    ]
    for body, code in cases:
        r = await client.post(dp(w["cid"], f"/{coll}/imports"), json=body, headers=w["owner"].headers)
        assert r.status_code == 400, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == code, (body, r.json())
        assert "uri" in r.json()["detail"] or code in ("unknown_field", "validation_error"), r.json()
    r = await client.post(dp(w["cid"], "/nope/imports"), json={"uri": "s3://b/k.jsonl"}, headers=w["owner"].headers)
    assert r.status_code == 404 and r.json()["code"] == "collection_not_found", r.text
    r = await client.post(dp(w["cid"], f"/{coll}/imports"), content=b"{not json", headers=w["owner"].headers)
    assert r.status_code == 400 and r.json()["code"] == "invalid_json"
    async with app.state.db.session() as s:
        jobs = (await s.scalars(select(Job).where(Job.kind == "collection.import"))).all()
    assert not [j for j in jobs if j.params.get("collection") == coll]  # no job for any refused request


async def test_idempotency_key(client: httpx.AsyncClient, s3: Any) -> None:
    w = await world(client)
    coll = await new_collection(client, w)
    s3.put_object(Bucket=BUCKET, Key=f"idem/{coll}.jsonl", Body=jsonl(rows(10)))
    body = {"uri": f"s3://{BUCKET}/idem/{coll}.jsonl"}
    h = {**w["owner"].headers, "Idempotency-Key": f"imp-{coll}"}
    first = ok(await client.post(dp(w["cid"], f"/{coll}/imports"), json=body, headers=h), 202)
    again = ok(await client.post(dp(w["cid"], f"/{coll}/imports"), json=body, headers=h), 202)
    assert again["job_id"] == first["job_id"]
    other = await client.post(dp(w["cid"], f"/{coll}/imports"), json={"uri": body["uri"] + "x"}, headers=h)
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    assert await count(client, w, coll) == 10  # imported once


# -- resume -------------------------------------------------------------------------------------------------------
class WorkerDied(BaseException):
    """Stands for the worker process dying mid-import (not an error the task could catch and report)."""


async def test_resume_after_the_worker_died(
    client: httpx.AsyncClient, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = await world(client)
    coll = await new_collection(client, w)
    recs = rows(200)
    s3.put_object(Bucket=BUCKET, Key=f"resume/{coll}.jsonl", Body=jsonl(recs))
    sent: list[Any] = []
    monkeypatch.setattr(imports_api, "send", lambda *a: sent.append(a))  # the message is delivered by hand below
    accepted = ok(await client.post(dp(w["cid"], f"/{coll}/imports"), json={"uri": f"s3://{BUCKET}/resume/{coll}.jsonl"},
                                    headers=w["owner"].headers), 202)  # fmt: skip
    job_id = accepted["job_id"]
    assert accepted["status"] == "queued" and sent == [("collection.import", (job_id,), {})]

    # the sweeper sends a lost message again once the job has sat unclaimed for STUCK_QUEUED, not before
    resent: list[str] = []
    monkeypatch.setattr(import_tasks.celery_app, "send_task", lambda name, args=(), **kw: resent.append(args[0]))
    import_tasks.sweep()
    assert job_id not in resent
    monkeypatch.setattr(import_tasks, "STUCK_QUEUED", dt.timedelta(0))
    import_tasks.sweep()
    assert job_id in resent

    settings = ImportSettings(batch_rows=20, lease_seconds=1.0)
    real_send = import_tasks.Importer._send
    batches: list[list[str]] = []

    def dying_send(self: Any, parts: list[bytes], schema: Any) -> None:
        if len(batches) == 3:
            raise WorkerDied()
        real_send(self, parts, schema)
        batches.append([orjson.loads(p)["id"] for p in parts])

    monkeypatch.setattr(import_tasks.Importer, "_send", dying_send)
    with pytest.raises(WorkerDied):
        import_tasks.Importer(job_id, settings).run()
    job = ok(await client.get(dp(w["cid"], f"/{coll}/imports/{job_id}"), headers=w["owner"].headers))
    assert job["status"] == "running" and job["rows_imported"] == 60 and job["rows_total"] == 200, job
    assert job["progress"] == pytest.approx(0.3)
    assert await count(client, w, coll) == 60

    # redelivered while the dead worker's lease still holds: it does not import a second time alongside
    assert import_tasks.Importer(job_id, settings).run() == "busy"
    assert await count(client, w, coll) == 60
    resent.clear()
    import_tasks.sweep()  # running under a live lease: not sent again
    assert job_id not in resent

    monkeypatch.setattr(import_tasks.Importer, "_send", lambda self, parts, schema: (
        batches.append([orjson.loads(p)["id"] for p in parts]), real_send(self, parts, schema)))  # fmt: skip
    import time

    time.sleep(1.1)  # the lease lapses
    import_tasks.sweep()  # the dead worker's job is sent again
    assert job_id in resent
    batches.clear()
    assert import_tasks.Importer(job_id, settings).run() == "succeeded"
    assert batches[0][0] == "doc60" and len(batches) == 7  # resumed after the last acknowledged batch
    job = ok(await client.get(f"/v1/jobs/{job_id}", headers=w["owner"].headers))
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert await count(client, w, coll) == 200
    await check_searchable(client, w, coll, recs)


# -- authorization ------------------------------------------------------------------------------------------------
async def test_authorization(client: httpx.AsyncClient, s3: Any) -> None:
    w = await world(client)
    owner: Tenant = w["owner"]
    coll = await new_collection(client, w)
    s3.put_object(Bucket=BUCKET, Key=f"authz/{coll}.jsonl", Body=jsonl(rows(5)))
    body = {"uri": f"s3://{BUCKET}/authz/{coll}.jsonl"}
    imp = await start(client, w, coll, body["uri"])
    reader = await create_key(client, owner, name="reader",
                              project_roles=[{"project_id": owner.project_id, "role": "data_reader"}])  # fmt: skip
    writer = await create_key(client, owner, name="writer",
                              project_roles=[{"project_id": owner.project_id, "role": "data_writer"}])  # fmt: skip
    r = await client.post(dp(w["cid"], f"/{coll}/imports"), json=body, headers=auth(reader["key"]))
    assert r.status_code == 403 and "data:write" in r.json()["detail"], r.text
    got = await client.get(dp(w["cid"], f"/{coll}/imports/{imp['job_id']}"), headers=auth(reader["key"]))
    assert got.status_code == 200 and got.json()["status"] == "succeeded"  # reading an import's status: data:read
    r = await client.post(dp(w["cid"], f"/{coll}/imports"), json=body, headers=auth(writer["key"]))
    assert r.status_code == 202, r.text

    stranger = await signup(client, "imports-other", "Other Org")
    r = await client.post(dp(w["cid"], f"/{coll}/imports"), json=body, headers=stranger.headers)
    assert r.status_code == 404 and r.json()["code"] == "cluster_not_found"
    r = await client.get(dp(w["cid"], f"/{coll}/imports/{imp['job_id']}"), headers=stranger.headers)
    assert r.status_code == 404
    r = await client.get(f"/v1/jobs/{imp['job_id']}", headers=stranger.headers)
    assert r.status_code == 404
    # an import is only found under its own collection
    r = await client.get(dp(w["cid"], f"/other/imports/{imp['job_id']}"), headers=owner.headers)
    assert r.status_code == 404 and r.json()["code"] == "import_not_found"

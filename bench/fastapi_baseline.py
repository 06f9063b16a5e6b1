"""Second baseline: the "plain" way to put faiss behind HTTP, a FastAPI endpoint with a pydantic body model
wrapping the same faiss index the engine benchmark measures.  Run by engine_search.py as

    BENCH_FAISS_INDEX=... BENCH_EF=... python -m uvicorn bench.fastapi_baseline:app --port PORT

It deliberately does nothing clever: pydantic parses the body into list[float], the endpoint is a normal
sync `def` (so it runs in Starlette's thread pool), the response goes through a response_model.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, Field

INDEX = faiss.read_index(os.environ["BENCH_FAISS_INDEX"])
EF = int(os.environ.get("BENCH_EF", "64"))
if hasattr(INDEX, "hnsw"):
    INDEX.hnsw.efSearch = EF
IDS = [f"p{i:07d}" for i in range(INDEX.ntotal)]

app = FastAPI(title="plain FastAPI + faiss baseline")


class SearchParams(BaseModel):
    ef: int | None = None


class SearchRequest(BaseModel):
    vector: list[float]
    top_k: int = Field(10, ge=1, le=1000)
    params: SearchParams | None = None


class Hit(BaseModel):
    id: str
    score: float


class SearchResponse(BaseModel):
    results: list[Hit]


@app.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@app.post("/search", response_model=SearchResponse)
def search(req: SearchRequest) -> SearchResponse:
    q = np.asarray([req.vector], dtype=np.float32)
    scores, idx = INDEX.search(q, req.top_k)
    return SearchResponse(
        results=[Hit(id=IDS[i], score=float(s)) for s, i in zip(scores[0], idx[0], strict=True) if i >= 0]
    )

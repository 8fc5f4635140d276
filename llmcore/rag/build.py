"""Building an index dir: documents -> passages -> vectors -> HNSW, written as one atomic step.

`build_index` checks every flag and `--out`, reads and validates every document and cuts it into passages
(`llmcore.rag.documents`) before any model loads; then embeds the passages, builds (or, on append, loads
and extends) the HNSW graph, writes the index and passages files into a temp dir beside `--out`, and lets
`llmcore.rag.store` write the manifest last and install the dir.

Invariants:
- On any error (bad input, a bad flag, Ctrl-C during embedding) nothing at `--out` changes, and no temp
  dir of this build is left (a kill -9 leaves one; the next build of that `--out` removes it, only if its
  writer is dead: `llmcore.io.remove_leftovers`).
- `--out` must be absent, an empty dir, or an index dir (then `append` or `overwrite` is required);
  never a dir holding `--docs`. `--overwrite` replaces only a dir that verifies as an index and holds
  nothing but its three files. `--append` never removes or renames a file llmcore did not write, and
  verifies the old index (manifest, sizes, checksums) before anything is embedded.
- Appended passages are embedded and chunked exactly as the index's others (the manifest's embedder,
  chunking, fields and HNSW settings; naming another embedder is an error).
- Replacing a document on append marks its old labels deleted in HNSW (never returned again) and
  drops its rows; pids are never reused.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

import llmcore
from llmcore.errors import LLMCoreError
from llmcore.io import check_out_dir, remove_leftovers, temp_dir_for
from llmcore.rag.chunking import check_chunking
from llmcore.rag.documents import chunk_docs, embed_text, read_docs
from llmcore.rag.embedders import DEFAULT_EMBEDDER, Embedder, get_embedder, get_embedder_name
from llmcore.rag.store import (
    DEFAULT_EF,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    PASSAGES_FILE,
    index_dir_problem,
    install_index,
    is_index_dir,
    load_hnsw,
    load_hnswlib,
    read_manifest,
    read_passages,
    verify_files,
    write_manifest,
    write_passages,
)

log = logging.getLogger(__name__)


def _check_out(out: Path, append: bool, overwrite: bool, inputs: list[Path]) -> bool:
    """Whether `out` already holds an index (then append or overwrite was asked for); refuses an `--out`
    that writing would damage, by `llmcore.io.check_out_dir`'s rules (as prep): never a path below a file,
    never a dir holding an input, and `--overwrite` replaces only a dir that verifies as an index and holds
    nothing else. `--append` writes into an existing index and keeps every other file there."""
    if append:
        if out.exists() and not out.is_dir():
            raise LLMCoreError(f"--out {out}: exists and is not a directory")
        if not out.is_dir():
            raise LLMCoreError(f"--append: {out} is not an existing index (no such directory)")
        if not any(out.iterdir()):
            raise LLMCoreError(f"--append: {out} is an empty directory, not an index")
        return True  # read_manifest and verify_files check it before anything is embedded
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        if is_index_dir(out):
            raise LLMCoreError(
                f"--out {out}: already an index; pass --append to add documents or --overwrite to rebuild"
            )
        raise LLMCoreError(f"--out {out}: exists and is not an index dir (refusing to write into it)")
    check_out_dir(
        out,
        overwrite=overwrite,
        what="an index dir llmcore wrote (its three files, verified)",
        inputs=inputs,
        replaceable=index_dir_problem,
    )
    return out.is_dir() and any(out.iterdir())


def _embed(embedder: Embedder, texts: list[str], batch_size: int, progress: bool) -> tuple[np.ndarray, float]:
    """Embed passages in batches of similar length (less padding, even work per thread), with a progress bar."""
    from llmcore.log import Progress

    vecs = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    order = np.argsort([-len(t) for t in texts], kind="stable")  # longest first: the ETA errs high
    t0 = time.perf_counter()
    bar = Progress(len(texts), "passage", f"embed ({embedder.name})", log, enabled=progress)
    try:
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            vecs[idx] = embedder.embed_passages([texts[j] for j in idx])
            bar.update(len(idx))
    finally:
        bar.close()
    return vecs, time.perf_counter() - t0


def build_index(
    docs: str | Path | Iterable[dict[str, Any]],
    out: str | Path,
    *,
    embedder: str | Embedder | None = None,
    text_field: str = "text",
    id_field: str = "id",
    title_field: str | None = None,
    chunk_chars: int = 480,
    overlap: int = 64,
    m: int = 32,
    ef_construction: int = 200,
    batch_size: int = 16,
    append: bool = False,
    replace: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    num_threads: int = -1,
    vectors: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build an index dir at `out` from a docs jsonl (or dicts); returns the written manifest.

    `append=True` adds documents to the index at `out` with the index's own embedder, chunking, fields and
    HNSW settings (those arguments are then ignored; naming another embedder is an error); a document id
    already in the index is an error unless `replace=True`, which swaps the old passages for the new.
    `vectors` (one row per passage, for benchmarks with synthetic embeddings) skips the embedder.
    """
    out = Path(out)
    check_chunking(chunk_chars, overlap)
    if not 2 <= m <= 256:
        raise LLMCoreError(f"--m {m}: expected 2..256")
    if ef_construction < 1:
        raise LLMCoreError(f"--ef-construction {ef_construction}: must be >= 1")
    if batch_size < 1:
        raise LLMCoreError(f"--batch-size {batch_size}: must be >= 1")
    existing = _check_out(out, append, overwrite, [Path(docs)] if isinstance(docs, (str, Path)) else [])
    remove_leftovers(out.parent, out.name)  # temp dirs of killed builds (only those of dead writers)
    old: dict[str, Any] | None = None
    if append:
        old = read_manifest(out, "--out")
        verify_files(out, old, flag="--out")
        emb_name = old["embedder"]["name"]
        if embedder is not None and get_embedder_name(embedder) != emb_name:
            raise LLMCoreError(
                f"--append: the index was built with embedder {emb_name!r}, not {get_embedder_name(embedder)!r}"
            )
        ch = old["chunking"]
        chunk_chars, overlap = int(ch["chunk_chars"]), int(ch["overlap"])
        text_field, id_field = ch.get("text_field", text_field), ch.get("id_field", id_field)
        title_field = ch.get("title_field")  # appended passages are embedded exactly as the others
        m, ef_construction = int(old["hnsw"]["m"]), int(old["hnsw"]["ef_construction"])
        embedder = emb_name if vectors is None else embedder
    new_docs = read_docs(docs, text_field, id_field, title_field)

    # Chunk (cheap) before loading any model, so every input error comes first.
    cols = chunk_docs(new_docs, chunk_chars, overlap)
    n_new = len(cols["text"])

    hnswlib = load_hnswlib()
    old_table = None
    old_pids = np.zeros(0, dtype=np.int64)
    deleted_pids: list[int] = []
    replaced_ids: set[str] = set()
    if old is not None:
        old_table = read_passages(out / PASSAGES_FILE)
        old_pids = old_table.column("pid").to_numpy()
        old_ids = set(old_table.column("doc_id").to_pylist())
        dup = [d.id for d in new_docs if d.id in old_ids]
        if dup and not replace:
            more = f" and {len(dup) - 1} more" if len(dup) > 1 else ""
            raise LLMCoreError(
                f"--append: document id {dup[0]!r}{more} already in the index; pass --replace to "
                "replace those documents"
            )
        if dup:
            dup_set = replaced_ids = set(dup)
            doc_col = np.asarray(old_table.column("doc_id").to_pylist(), dtype=object)
            drop = np.fromiter((x in dup_set for x in doc_col), dtype=bool, count=len(doc_col))
            deleted_pids = old_table.column("pid").to_numpy()[drop].tolist()
            import pyarrow as pa

            old_table = old_table.filter(pa.array(~drop))
    if vectors is not None:
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.shape[0] != n_new:
            raise LLMCoreError(f"vectors: {vecs.shape[0]} rows for {n_new} passages")
        emb_info = {
            "name": get_embedder_name(embedder) if embedder is not None else "external",
            "model": "",
            "version": "",
            "dim": int(vecs.shape[1]),
            "normalized": True,
            "query_prefix": "",
            "passage_prefix": "",
        }
        embed_s = 0.0
    else:
        emb = get_embedder(embedder or DEFAULT_EMBEDDER)
        if old is not None and emb.dim != int(old["embedder"]["dim"]):
            raise LLMCoreError(f"embedder {emb.name}: dim {emb.dim}, the index has {old['embedder']['dim']}")
        vecs, embed_s = _embed(
            emb, [embed_text(t, x) for t, x in zip(cols["title"], cols["text"])], batch_size, progress
        )
        emb_info = emb.info()
    dim = int(vecs.shape[1])

    next_pid = int(old["counts"]["next_pid"]) if old is not None else 0
    pids = np.arange(next_pid, next_pid + n_new, dtype=np.int64)
    cols["pid"] = pids.tolist()
    t0 = time.perf_counter()
    prev_deleted = int(old["counts"]["deleted"]) if old is not None else 0
    if old is not None:
        prev_labels = int(old["counts"]["passages"]) + prev_deleted
        index = load_hnsw(out / INDEX_FILE, old, old_pids, max_elements=prev_labels + n_new)
        for pid in deleted_pids:
            index.mark_deleted(int(pid))
    else:
        index = hnswlib.Index(space="cosine", dim=dim)
        index.init_index(max_elements=max(n_new, 1), ef_construction=ef_construction, M=m, random_seed=100)
    if n_new:
        index.add_items(vecs, pids, num_threads=num_threads)
    index.set_ef(DEFAULT_EF)
    hnsw_s = time.perf_counter() - t0

    tmp = temp_dir_for(out)
    try:
        index.save_index(str(tmp / INDEX_FILE))
        if old_table is not None and old_table.num_rows:
            merged = {k: old_table.column(k).to_pylist() + cols[k] for k in cols}
        else:
            merged = cols
        write_passages(tmp / PASSAGES_FILE, merged)
        n_docs = len(set(merged["doc_id"]))
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        op = {
            "op": "append" if old is not None else "build",
            "at": now,
            "docs": len(new_docs),
            "passages": n_new,
            "replaced_docs": len(replaced_ids),
            "deleted_passages": len(deleted_pids),
            "chars": int(sum(len(t) for t in cols["text"])),
            "embed_s": round(embed_s, 3),
            "hnsw_s": round(hnsw_s, 3),
            "build_s": round(embed_s + hnsw_s, 3),
            "passages_per_s": round(n_new / embed_s, 3) if embed_s > 0 else None,
        }
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "llmcore_version": llmcore.__version__,
            "created": old["created"] if old is not None else now,
            "updated": now,
            "embedder": emb_info if old is None else old["embedder"],
            "space": "cosine",
            "hnsw": {
                "m": m,
                "ef_construction": ef_construction,
                "ef_search_default": DEFAULT_EF,
                "hnswlib_version": _hnswlib_version(),
            },
            "chunking": {
                "chunk_chars": chunk_chars,
                "overlap": overlap,
                "text_field": text_field,
                "id_field": id_field,
                "title_field": title_field,
                "unit": "characters",
            },
            "counts": {
                "docs": n_docs,
                "passages": len(merged["pid"]),
                "deleted": prev_deleted + len(deleted_pids),
                "next_pid": next_pid + n_new,
            },
            "builds": (old.get("builds", []) if old is not None else []) + [op],
            "files": {},
        }
        write_manifest(tmp, manifest)
        install_index(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "wrote %s: %d docs, %d passages (%s)",
        out,
        manifest["counts"]["docs"],
        manifest["counts"]["passages"],
        "replaced" if existing and not append else "new" if not existing else "appended",
    )
    return manifest


def _hnswlib_version() -> str:
    try:
        from importlib.metadata import version

        return version("hnswlib")
    except Exception:
        return ""


__all__ = ["build_index"]

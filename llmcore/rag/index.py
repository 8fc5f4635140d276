"""The RAG index dir: build (and append to) it, open it, search it.

An index dir holds exactly three files:
- `index.hnsw`     hnswlib's own file (cosine space); item labels are passage ids (`pid`);
- `passages.arrow` Arrow IPC file, one row per live passage, sorted by `pid`: `pid` int64,
                   `doc_id` string, `start`/`end` int32 (character offsets into the document's text),
                   `title` string (nullable), `text` string (= document text[start:end]);
- `manifest.json`  format name and version, the embedder (name, model, dim, normalisation, query and
                   passage prefixes), the space, the HNSW and chunking parameters, counts (docs, live
                   passages, deleted labels, next pid), per-build timings, and size + sha256 per file.

Invariants:
- The dir is written into a temp dir beside it and renamed into place (`llmcore.io.install_dir`), files
  and dirs fsynced: a reader sees the old complete index or the new complete one, never a mix; on any
  error (bad input, Ctrl-C during embedding) nothing at `--out` changes.
- All input is validated (every line, ids unique; prep's line reader) before anything is embedded.
- `--out` must be absent, an empty dir, or an index dir (then `append` or `overwrite` is required);
  never a dir holding `--docs`. `--overwrite` replaces only a dir that verifies as an index (manifest,
  sizes, checksums) and holds nothing but its three files. `--append` never removes or renames a file
  llmcore did not write: an index dir holding other files (the docs being appended, notes) gets its
  three files replaced in place, the manifest last (a kill between those renames leaves an index that
  opening refuses by checksum, never a silent mix).
- Opening checks the format version, each file's size and checksum, and the counts before hnswlib
  reads anything; a failed check is an LLMCoreError that says what is wrong.
- A query is embedded only by the embedder named in the manifest (same name and dim).
- Replacing a document on append marks its old labels deleted in HNSW (never returned again) and
  drops its rows; pids are never reused.
- No pickles: hnswlib's binary format, Arrow and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

import llmcore
from llmcore.errors import DataError, LLMCoreError, install_hint
from llmcore.io import check_out_dir, install_dir, install_file, remove_leftovers, temp_dir_for
from llmcore.rag.chunking import check_chunking, chunk_spans
from llmcore.rag.embedders import DEFAULT_EMBEDDER, Embedder, get_embedder

log = logging.getLogger(__name__)

FORMAT = "llmcore-rag-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.hnsw"
PASSAGES_FILE = "passages.arrow"
DEFAULT_EF = 64


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


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    title: str | None = None


def _hnswlib() -> Any:
    try:
        import hnswlib
    except ImportError as err:
        raise LLMCoreError("the RAG index needs hnswlib: " + install_hint("rag")) from err
    return hnswlib


# ---------------------------------------------------------------- input documents

def _doc_from(obj: Any, text_field: str, id_field: str, title_field: str | None, where: tuple[str, int | None]
              ) -> Doc:
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


def read_docs(docs: str | Path | Iterable[dict[str, Any]], text_field: str = "text", id_field: str = "id",
              title_field: str | None = None) -> list[Doc]:
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
        items: Iterator[tuple[Any, tuple[str, int | None]]] = _jsonl(path)
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


def _jsonl(path: Path) -> Iterator[tuple[Any, tuple[str, int | None]]]:
    """Each record of a docs jsonl (plain or gzip/bzip2/xz/zstd), through prep's line reader, so the same
    bad lines (invalid UTF-8, lone surrogates, deep nesting, huge numbers, over-long lines) are the same
    one-line errors naming the file and line."""
    from data_prep.jsonl import BadLine, iter_records

    for n, rec in iter_records(path):
        if isinstance(rec, BadLine):
            raise DataError(rec.message, str(path), n)
        yield rec, (str(path), n)


# ---------------------------------------------------------------- files

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


OWN_FILES = (INDEX_FILE, PASSAGES_FILE, MANIFEST)


def _install(tmp: Path, out: Path) -> None:
    """Make the complete index in `tmp` (beside `out`) the index at `out`.

    A dir holding only the index's own files is replaced whole (one atomic dir rename). A dir that also
    holds files llmcore did not write (notes, the docs being appended) keeps them: the three files are
    renamed over the old ones, the manifest last, so a kill between those renames leaves files that do not
    match the manifest, which `Retriever.open` refuses (checksums) instead of reading a mix."""
    foreign = out.is_dir() and any(p.name not in OWN_FILES for p in out.iterdir())
    if not foreign:
        install_dir(tmp, out)
        return
    try:
        for name in OWN_FILES:
            install_file(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_index_dir(path: Path) -> bool:
    """Whether `path` has a manifest that claims to be an index (a cheap test; `index_dir_problem` verifies)."""
    m = path / MANIFEST
    if not m.is_file():
        return False
    try:
        return json.loads(m.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def index_dir_problem(path: Path) -> str | None:
    """Why `path` is not an index dir that `--overwrite` may replace (None when it is): it must verify as
    an index (manifest, sizes, checksums, counts) and hold nothing but the index's three files."""
    try:
        manifest = read_manifest(path)
        verify_files(path, manifest)
    except LLMCoreError as err:
        return f"it does not verify as an index ({err})"
    for p in sorted(path.iterdir()):
        if p.name not in OWN_FILES:
            return f"it holds {p.name}, which rag index did not write"
    return None


def read_manifest(index_dir: str | Path, flag: str = "--index") -> dict[str, Any]:
    """The manifest of an index dir, after the format, version and key checks (`flag`: the option that
    named the dir, for the messages)."""
    d = Path(index_dir)
    if not d.exists():
        raise LLMCoreError(f"{flag} {d}: no such directory")
    if not d.is_dir():
        raise LLMCoreError(f"{flag} {d}: not a directory")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise LLMCoreError(f"{flag} {d}: not an llmcore RAG index (no {MANIFEST}); build one with `llmcore rag index`")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise LLMCoreError(f"{mpath}: corrupted manifest ({err.__class__.__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LLMCoreError(f"{flag} {d}: not an llmcore RAG index (manifest format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise LLMCoreError(f"{flag} {d}: index format version {version!r}, this llmcore "
                           f"({llmcore.__version__}) reads version {FORMAT_VERSION}; rebuild it with `llmcore rag index`")
    _check_manifest(manifest, mpath)
    return manifest


# The manifest keys every reader relies on: section -> {key: (type, minimum)}; `str` keys must be non-empty.
_MANIFEST_SCHEMA: dict[str, dict[str, tuple[type, int | None]]] = {
    "embedder": {"name": (str, None), "dim": (int, 1)},
    "counts": {"docs": (int, 0), "passages": (int, 0), "deleted": (int, 0), "next_pid": (int, 0)},
    "hnsw": {"m": (int, 2), "ef_construction": (int, 1), "ef_search_default": (int, 1)},
    "chunking": {"chunk_chars": (int, 1), "overlap": (int, 0), "text_field": (str, None), "id_field": (str, None)},
    "files": {},
}


def _check_manifest(manifest: dict[str, Any], mpath: Path) -> None:
    """Every key a reader uses is present with its type and range, so a hand-edited or truncated manifest
    is one line naming the key, never a KeyError deep inside."""
    for section, keys in _MANIFEST_SCHEMA.items():
        sec = manifest.get(section)
        if not isinstance(sec, dict):
            raise LLMCoreError(f"{mpath}: corrupted manifest ({section!r} is missing or not an object)")
        for key, (typ, lo) in keys.items():
            v = sec.get(key)
            if typ is int and (isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo)):
                raise LLMCoreError(f"{mpath}: corrupted manifest ({section}.{key} = {v!r}, expected an integer"
                                   f"{f' >= {lo}' if lo is not None else ''})")
            if typ is str and (not isinstance(v, str) or not v):
                raise LLMCoreError(f"{mpath}: corrupted manifest ({section}.{key} = {v!r}, expected a string)")
    if manifest.get("space") != "cosine":
        raise LLMCoreError(f"{mpath}: corrupted manifest (space {manifest.get('space')!r}, expected 'cosine')")
    c = manifest["counts"]
    if c["passages"] + c["deleted"] > c["next_pid"]:
        raise LLMCoreError(f"{mpath}: corrupted manifest (counts: {c['passages']} passages + {c['deleted']} deleted "
                           f"> next_pid {c['next_pid']})")


def verify_files(index_dir: Path, manifest: dict[str, Any], checksums: bool = True, flag: str = "--index") -> None:
    """Each file listed in the manifest exists with its recorded size (and sha256)."""
    files = manifest.get("files") or {}
    for name in (INDEX_FILE, PASSAGES_FILE):
        meta = files.get(name)
        p = index_dir / name
        if not isinstance(meta, dict):
            raise LLMCoreError(f"{flag} {index_dir}: manifest lists no {name}")
        if not p.is_file():
            raise LLMCoreError(f"{flag} {index_dir}: {name} is missing")
        size = p.stat().st_size
        if size != meta.get("bytes"):
            raise LLMCoreError(f"{p}: truncated or corrupted ({size} bytes, the manifest says {meta.get('bytes')})")
        if checksums and sha256_file(p) != meta.get("sha256"):
            raise LLMCoreError(f"{p}: corrupted (sha256 differs from the manifest)")


def _passages_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("pid", pa.int64()), ("doc_id", pa.string()), ("start", pa.int32()), ("end", pa.int32()),
                      ("title", pa.string()), ("text", pa.large_string())])


def _write_passages(path: Path, cols: dict[str, Any]) -> None:
    import pyarrow as pa

    table = pa.table({name: pa.array(cols[name], type=_passages_schema().field(name).type)
                      for name in _passages_schema().names})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=65536)


def _read_passages(path: Path) -> Any:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path), "r") as src:
            table = pa.ipc.open_file(src).read_all()
        # Full validation checks offsets and UTF-8, so a crafted file is this error, not a decode
        # error (or an out-of-bounds read) when a passage is read later.
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise LLMCoreError(f"{path}: corrupted passages file ({str(err).splitlines()[0][:200]})") from None
    expected = _passages_schema()
    if not table.schema.equals(expected):
        raise LLMCoreError(f"{path}: corrupted passages file (columns {table.schema.names}, expected "
                           f"{expected.names} with their types)")
    pids = table.column("pid").to_numpy()
    if len(pids) > 1 and not (np.diff(pids) > 0).all():
        raise LLMCoreError(f"{path}: corrupted passages file (pids are not strictly increasing)")
    return table


# hnswlib's file (hnswalg.h saveIndex): a 96-byte header, then `count` level-0 records of
# `size_data_per_element` bytes (link count u16, flags u8 (bit 0 = deleted), pad u8, maxM0 neighbour ids
# u32, the vector as dim f32, the label u64), then per element a u32 byte size and its upper-level link
# blocks (per level: count u16, flags, pad, maxM ids u32). hnswlib's loader trusts all of it: an entry
# point, a neighbour id or a level out of range makes a search read outside its buffers (a segfault).
_HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")


def check_hnsw_file(path: Path, *, dim: int, elements: int, deleted: int, m: int, pids: np.ndarray) -> None:
    """Bounds-check an hnswlib index file against what the manifest and passages file say, before hnswlib
    reads it: header fields, every level-0 and upper-level link list (counts, neighbour ids < element
    count, a neighbour present on each level it is linked at), entry point and max level, vector values,
    the deleted marks, and the live labels (== the passage ids). Raises LLMCoreError naming the file.
    The file is memory-mapped and read in blocks of rows (bounded extra memory at any size)."""
    import mmap

    def bad(why: str) -> LLMCoreError:
        return LLMCoreError(f"{path}: not a valid HNSW index for this manifest ({why}); rebuild it with "
                            "`llmcore rag index`")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < _HNSW_HEADER.size:
            raise bad("shorter than its header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        _check_hnsw(buf, bad, dim=dim, elements=elements, deleted=deleted, m=m, pids=pids)
    finally:
        try:
            buf.close()
        except BufferError:  # an error's traceback still holds views of it: closed when they are freed
            pass


def _check_hnsw(buf: Any, bad: Any, *, dim: int, elements: int, deleted: int, m: int, pids: np.ndarray) -> None:
    (off0, max_el, count, per_el, label_off, data_off, max_level, enter, max_m, max_m0, hm, _mult,
     _efc) = _HNSW_HEADER.unpack_from(buf, 0)
    links0 = 4 + 4 * max_m0
    links_up = 4 + 4 * max_m
    if count != elements:
        raise bad(f"{count} elements, the manifest says {elements}")
    if hm != m or max_m != m or max_m0 != 2 * m:
        raise bad(f"M {hm}/{max_m}/{max_m0}, the manifest says m {m}")
    if (off0, data_off, label_off, per_el) != (0, links0, links0 + 4 * dim, links0 + 4 * dim + 8):
        raise bad("record layout does not match dim and M")
    if not count <= max_el <= max(count, 1) * 4 + 1_000_000:
        raise bad(f"capacity {max_el} for {count} elements")
    level0_end = _HNSW_HEADER.size + count * per_el
    if len(buf) < level0_end or (len(buf) - level0_end) % 4:
        raise bad("truncated level-0 records")
    if count == 0:
        if len(buf) != level0_end:
            raise bad("trailing bytes")
        return
    # Level 0, in blocks of rows: link counts and ids, vectors, deleted marks, labels.
    n_deleted = 0
    live_labels = []
    rows = max(1, (64 << 20) // per_el)  # about 64 MB of records per block
    for r0 in range(0, count, rows):
        n = min(rows, count - r0)
        rec = np.frombuffer(buf, dtype=np.uint8, count=n * per_el, offset=_HNSW_HEADER.size + r0 * per_el
                            ).reshape(n, per_el)
        n_links = rec[:, 0:2].copy().view("<u2").ravel()
        if (n_links > max_m0).any():
            raise bad("a level-0 link count is larger than M0")
        ids = rec[:, 4:links0].copy().view("<u4")
        if (ids[np.arange(max_m0)[None, :] < n_links[:, None]] >= count).any():
            raise bad("a level-0 neighbour id is out of range")
        if not np.isfinite(rec[:, data_off:label_off].copy().view("<f4")).all():
            raise bad("a vector holds NaN or infinity")
        is_deleted = (rec[:, 2] & 1).astype(bool)
        n_deleted += int(is_deleted.sum())
        live_labels.append(rec[:, label_off:per_el].copy().view("<u8").ravel()[~is_deleted])
    if n_deleted != deleted:
        raise bad(f"{n_deleted} deleted marks, the manifest says {deleted}")
    live = np.sort(np.concatenate(live_labels))
    if live.shape != pids.shape or not np.array_equal(live, pids.astype(np.uint64)):
        raise bad("its labels are not the passage ids of passages.arrow")
    # Upper levels: per element a u32 byte size, then its blocks; almost all sizes are 0, so the walk
    # jumps over runs of empty records (everything is 4-byte aligned) and loops only over the others.
    words = np.frombuffer(buf, dtype="<u4", offset=level0_end)
    nonzero = np.flatnonzero(words)
    levels = np.zeros(count, dtype=np.int64)
    blocks: list[tuple[int, int, int]] = []  # (element, level, word offset of its block)
    i = w = 0
    while i < count:
        k = int(np.searchsorted(nonzero, w))
        nxt = int(nonzero[k]) if k < len(nonzero) else len(words)
        if i + (nxt - w) >= count:  # the rest are empty
            w += count - i
            break
        i, w = i + (nxt - w), nxt
        size = int(words[w])
        if size % links_up or w + 1 + size // 4 > len(words):
            raise bad(f"element {i}: bad link list size {size}")
        levels[i] = size // links_up
        blocks.extend((i, lvl, w + 1 + (lvl - 1) * links_up // 4) for lvl in range(1, int(levels[i]) + 1))
        w += 1 + size // 4
        i += 1
    if w != len(words):
        raise bad("trailing bytes")
    if max_level != int(levels.max()) or enter >= count or levels[enter] != max_level:
        raise bad(f"entry point {enter} / max level {max_level} do not match the link lists")
    for i, lvl, at in blocks:
        n = int(words[at]) & 0xFFFF
        if n > max_m:
            raise bad(f"element {i}: level {lvl} link count {n} is larger than M")
        nb = words[at + 1:at + 1 + n]
        if (nb >= count).any() or (levels[nb] < lvl).any():
            raise bad(f"element {i}: a level-{lvl} neighbour is out of range")


def _load_hnsw(path: Path, manifest: dict[str, Any], pids: np.ndarray, max_elements: int = 0) -> Any:
    """hnswlib's index at `path`, after `check_hnsw_file` (so a crafted file is an error, not a crash)."""
    hnswlib = _hnswlib()
    c = manifest["counts"]
    dim = int(manifest["embedder"]["dim"])
    check_hnsw_file(path, dim=dim, elements=c["passages"] + c["deleted"], deleted=c["deleted"],
                    m=int(manifest["hnsw"]["m"]), pids=pids)
    index = hnswlib.Index(space="cosine", dim=dim)
    try:
        index.load_index(str(path), max_elements=max_elements)
    except RuntimeError as err:
        raise LLMCoreError(f"{path}: hnswlib could not read it ({err})") from None
    return index


# ---------------------------------------------------------------- build

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
            raise LLMCoreError(f"--out {out}: already an index; pass --append to add documents or --overwrite to rebuild")
        raise LLMCoreError(f"--out {out}: exists and is not an index dir (refusing to write into it)")
    check_out_dir(out, overwrite=overwrite, what="an index dir llmcore wrote (its three files, verified)",
                  inputs=inputs, replaceable=index_dir_problem)
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
            idx = order[i:i + batch_size]
            vecs[idx] = embedder.embed_passages([texts[j] for j in idx])
            bar.update(len(idx))
    finally:
        bar.close()
    return vecs, time.perf_counter() - t0


def _embed_text(title: str | None, text: str) -> str:
    return f"{title}\n{text}" if title else text


def build_index(docs: str | Path | Iterable[dict[str, Any]], out: str | Path, *,
                embedder: str | Embedder | None = None, text_field: str = "text", id_field: str = "id",
                title_field: str | None = None, chunk_chars: int = 480, overlap: int = 64, m: int = 32,
                ef_construction: int = 200, batch_size: int = 16, append: bool = False, replace: bool = False,
                overwrite: bool = False, progress: bool = True, num_threads: int = -1,
                vectors: np.ndarray | None = None) -> dict[str, Any]:
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
            raise LLMCoreError(f"--append: the index was built with embedder {emb_name!r}, not "
                               f"{get_embedder_name(embedder)!r}")
        ch = old["chunking"]
        chunk_chars, overlap = int(ch["chunk_chars"]), int(ch["overlap"])
        text_field, id_field = ch.get("text_field", text_field), ch.get("id_field", id_field)
        title_field = ch.get("title_field")  # appended passages are embedded exactly as the others
        m, ef_construction = int(old["hnsw"]["m"]), int(old["hnsw"]["ef_construction"])
        embedder = emb_name if vectors is None else embedder
    new_docs = read_docs(docs, text_field, id_field, title_field)

    # Chunk (cheap) before loading any model, so every input error comes first.
    cols: dict[str, list[Any]] = {"pid": [], "doc_id": [], "start": [], "end": [], "title": [], "text": []}
    for d in new_docs:
        for s, e in chunk_spans(d.text, chunk_chars, overlap):
            cols["doc_id"].append(d.id)
            cols["start"].append(s)
            cols["end"].append(e)
            cols["title"].append(d.title)
            cols["text"].append(d.text[s:e])
    n_new = len(cols["text"])

    hnswlib = _hnswlib()
    old_table = None
    old_pids = np.zeros(0, dtype=np.int64)
    deleted_pids: list[int] = []
    replaced_ids: set[str] = set()
    if old is not None:
        old_table = _read_passages(out / PASSAGES_FILE)
        old_pids = old_table.column("pid").to_numpy()
        old_ids = set(old_table.column("doc_id").to_pylist())
        dup = [d.id for d in new_docs if d.id in old_ids]
        if dup and not replace:
            more = f" and {len(dup) - 1} more" if len(dup) > 1 else ""
            raise LLMCoreError(f"--append: document id {dup[0]!r}{more} already in the index; pass --replace to "
                               "replace those documents")
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
        emb_info = {"name": get_embedder_name(embedder) if embedder is not None else "external", "model": "",
                    "version": "", "dim": int(vecs.shape[1]), "normalized": True, "query_prefix": "",
                    "passage_prefix": ""}
        embed_s = 0.0
    else:
        emb = get_embedder(embedder or DEFAULT_EMBEDDER)
        if old is not None and emb.dim != int(old["embedder"]["dim"]):
            raise LLMCoreError(f"embedder {emb.name}: dim {emb.dim}, the index has {old['embedder']['dim']}")
        vecs, embed_s = _embed(emb, [_embed_text(t, x) for t, x in zip(cols["title"], cols["text"])],
                               batch_size, progress)
        emb_info = emb.info()
    dim = int(vecs.shape[1])

    next_pid = int(old["counts"]["next_pid"]) if old is not None else 0
    pids = np.arange(next_pid, next_pid + n_new, dtype=np.int64)
    cols["pid"] = pids.tolist()
    t0 = time.perf_counter()
    prev_deleted = int(old["counts"]["deleted"]) if old is not None else 0
    if old is not None:
        prev_labels = int(old["counts"]["passages"]) + prev_deleted
        index = _load_hnsw(out / INDEX_FILE, old, old_pids, max_elements=prev_labels + n_new)
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
        _write_passages(tmp / PASSAGES_FILE, merged)
        n_docs = len(set(merged["doc_id"]))
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        op = {"op": "append" if old is not None else "build", "at": now, "docs": len(new_docs),
              "passages": n_new, "replaced_docs": len(replaced_ids), "deleted_passages": len(deleted_pids),
              "chars": int(sum(len(t) for t in cols["text"])), "embed_s": round(embed_s, 3),
              "hnsw_s": round(hnsw_s, 3), "build_s": round(embed_s + hnsw_s, 3),
              "passages_per_s": round(n_new / embed_s, 3) if embed_s > 0 else None}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "llmcore_version": llmcore.__version__,
            "created": old["created"] if old is not None else now,
            "updated": now,
            "embedder": emb_info if old is None else old["embedder"],
            "space": "cosine",
            "hnsw": {"m": m, "ef_construction": ef_construction, "ef_search_default": DEFAULT_EF,
                     "hnswlib_version": _hnswlib_version()},
            "chunking": {"chunk_chars": chunk_chars, "overlap": overlap, "text_field": text_field,
                         "id_field": id_field, "title_field": title_field, "unit": "characters"},
            "counts": {"docs": n_docs, "passages": len(merged["pid"]), "deleted": prev_deleted + len(deleted_pids),
                       "next_pid": next_pid + n_new},
            "builds": (old.get("builds", []) if old is not None else []) + [op],
            "files": {},
        }
        for name in (INDEX_FILE, PASSAGES_FILE):
            p = tmp / name
            manifest["files"][name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %d docs, %d passages (%s)", out, manifest["counts"]["docs"], manifest["counts"]["passages"],
             "replaced" if existing and not append else "new" if not existing else "appended")
    return manifest


def _hnswlib_version() -> str:
    try:
        from importlib.metadata import version

        return version("hnswlib")
    except Exception:
        return ""


def get_embedder_name(embedder: str | Embedder | None) -> str:
    if isinstance(embedder, Embedder):
        return embedder.name
    return (embedder or DEFAULT_EMBEDDER).strip()


# ---------------------------------------------------------------- search

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
        raise LLMCoreError(f"the question is not valid text: character {err.start} is {q[err.start]!r} (a lone "
                           "surrogate, or bytes that are not UTF-8)") from None
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

    def __init__(self, index_dir: Path, manifest: dict[str, Any], index: Any, table: Any, embedder: Embedder | None,
                 embedder_name: str) -> None:
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
    def open(cls, index_dir: str | Path, embedder: str | Embedder | None = None, verify: bool = True,
             load_embedder: bool = True, flag: str = "--index") -> "Retriever":
        """Open an index dir. `embedder` (a name or instance) must be the one the index was built with
        (default: that one). `verify` checks the files' sha256 (sizes are always checked). `flag` is the
        option that named the dir, for the messages (`serve` passes `--rag`)."""
        d = Path(index_dir)
        manifest = read_manifest(d, flag)
        verify_files(d, manifest, checksums=verify, flag=flag)
        built = manifest["embedder"]
        if embedder is not None and get_embedder_name(embedder) != built["name"]:
            raise LLMCoreError(f"{flag} {d}: built with embedder {built['name']!r}; refusing to query it with "
                               f"{get_embedder_name(embedder)!r} (vectors from different embedders do not compare)")
        table = _read_passages(d / PASSAGES_FILE)
        counts = manifest["counts"]
        if table.num_rows != counts["passages"]:
            raise LLMCoreError(f"{d / PASSAGES_FILE}: {table.num_rows} passages, the manifest says {counts['passages']}")
        index = _load_hnsw(d / INDEX_FILE, manifest, table.column("pid").to_numpy())
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

    def search_vectors(self, vecs: np.ndarray, k: int, ef: int | None = None, num_threads: int = 1
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
            sims = q[i:i + 256] @ base.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            part = np.take_along_axis(sims, top, axis=1)
            order = np.argsort(-part, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            pids_out[i:i + 256] = self._pids[top]
            scores_out[i:i + 256] = np.take_along_axis(part, order, axis=1)
        return pids_out, scores_out

    def passage(self, pid: int, score: float = 0.0) -> Passage:
        row = int(np.searchsorted(self._pids, pid))
        if row >= len(self._pids) or self._pids[row] != pid:
            raise LLMCoreError(f"passage id {pid} is not in the index")
        return self._row(row, score)

    def _row(self, row: int, score: float) -> Passage:
        t = self._table
        return Passage(doc_id=t.column("doc_id")[row].as_py(), text=t.column("text")[row].as_py(), score=float(score),
                       start=int(t.column("start")[row].as_py()), end=int(t.column("end")[row].as_py()),
                       pid=int(self._pids[row]), title=t.column("title")[row].as_py())

    def passages_for(self, pids: np.ndarray, scores: np.ndarray) -> list[Passage]:
        return [self.passage(int(p), float(s)) for p, s in zip(pids, scores) if p >= 0]

    def search(self, query: str, k: int = 5, ef: int | None = None, mode: str = "dense") -> list[Passage]:
        """Top-k passages for one question, best first. `mode="hybrid"` fuses dense with BM25 over
        character bigrams by reciprocal rank (score = fused RRF score)."""
        return self.search_many([query], k, ef, mode)[0]

    def search_many(self, queries: list[str], k: int = 5, ef: int | None = None, mode: str = "dense"
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
            from llmcore.rag.bm25 import BM25

            titles = self._table.column("title").to_pylist()
            texts = self._table.column("text").to_pylist()
            self._bm25 = BM25([_embed_text(t, x) for t, x in zip(titles, texts)], self._pids)
        return self._bm25


def rrf(rankings: list[list[int]], k: int, c: int = 60) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: `sum 1/(c + rank)` over the rankings (rank from 1); top k `(id, score)`."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for r, pid in enumerate(ranking, 1):
            score[pid] = score.get(pid, 0.0) + 1.0 / (c + r)
    return sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


__all__ = ["Passage", "Doc", "Retriever", "query_text", "MAX_QUERY_CHARS", "check_hnsw_file", "build_index", "read_docs", "read_manifest", "verify_files", "rrf",
           "FORMAT", "FORMAT_VERSION", "is_index_dir"]

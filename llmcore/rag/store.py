"""The RAG index dir: its format, reading it back, and its integrity checks.

An index dir holds exactly three files:
- `index.hnsw`     hnswlib's own file (cosine space); item labels are passage ids (`pid`);
- `passages.arrow` Arrow IPC file, one row per live passage, sorted by `pid`: `pid` int64,
                   `doc_id` string, `start`/`end` int32 (character offsets into the document's text),
                   `title` string (nullable), `text` string (= document text[start:end]);
- `manifest.json`  format name and version, the embedder (name, model, dim, normalisation, query and
                   passage prefixes), the space, the HNSW and chunking parameters, counts (docs, live
                   passages, deleted labels, next pid), per-build timings, and size + sha256 per file.

Invariants:
- Nothing in an index dir is used before it is checked: `read_manifest` checks the format, version and
  every key a reader uses (`_MANIFEST_SCHEMA`); `verify_files` each file's size and sha256
  (`llmcore.io.sha256_file`); `read_passages` fully validates the Arrow file (offsets, UTF-8, schema,
  increasing pids); `check_hnsw_file` bounds-checks every hnswlib structure against the manifest and the
  passages before hnswlib reads the file (`load_hnsw`). A failed check is an LLMCoreError that says what
  is wrong: a crafted or damaged file is one line, never a segfault or a KeyError.
- A new index is made in a temp dir beside `out` (`llmcore.io.temp_dir_for`); `write_manifest` writes
  its manifest (with each file's size and sha256) last, and `install_index` puts it in place through
  `llmcore.io` (`install_dir`; in a dir that also holds files llmcore did not write, `install_file` per
  file, manifest last): a reader sees the old complete index or the new one, or (a kill between per-file
  renames) files the manifest's checksums refuse, never a silent mix.
- `--overwrite` may replace only a dir that verifies as an index and holds nothing but its three files
  (`index_dir_problem`).
- No pickles: hnswlib's binary format, Arrow and JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

import llmcore
from llmcore.errors import LLMCoreError, install_hint
from llmcore.io import install_dir, install_file, sha256_file

FORMAT = "llmcore-rag-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.hnsw"
PASSAGES_FILE = "passages.arrow"
OWN_FILES = (INDEX_FILE, PASSAGES_FILE, MANIFEST)
DEFAULT_EF = 64


def load_hnswlib() -> Any:
    """The hnswlib module, or an LLMCoreError saying how to install it."""
    try:
        import hnswlib
    except ImportError as err:
        raise LLMCoreError("the RAG index needs hnswlib: " + install_hint("rag")) from err
    return hnswlib


def install_index(tmp: Path, out: Path) -> None:
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
        raise LLMCoreError(
            f"{flag} {d}: index format version {version!r}, this llmcore "
            f"({llmcore.__version__}) reads version {FORMAT_VERSION}; rebuild it with `llmcore rag index`"
        )
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
                raise LLMCoreError(
                    f"{mpath}: corrupted manifest ({section}.{key} = {v!r}, expected an integer"
                    f"{f' >= {lo}' if lo is not None else ''})"
                )
            if typ is str and (not isinstance(v, str) or not v):
                raise LLMCoreError(f"{mpath}: corrupted manifest ({section}.{key} = {v!r}, expected a string)")
    if manifest.get("space") != "cosine":
        raise LLMCoreError(f"{mpath}: corrupted manifest (space {manifest.get('space')!r}, expected 'cosine')")
    c = manifest["counts"]
    if c["passages"] + c["deleted"] > c["next_pid"]:
        raise LLMCoreError(
            f"{mpath}: corrupted manifest (counts: {c['passages']} passages + {c['deleted']} deleted "
            f"> next_pid {c['next_pid']})"
        )


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


def passages_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("pid", pa.int64()),
            ("doc_id", pa.string()),
            ("start", pa.int32()),
            ("end", pa.int32()),
            ("title", pa.string()),
            ("text", pa.large_string()),
        ]
    )


def write_passages(path: Path, cols: dict[str, Any]) -> None:
    import pyarrow as pa

    table = pa.table(
        {name: pa.array(cols[name], type=passages_schema().field(name).type) for name in passages_schema().names}
    )
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=65536)


def read_passages(path: Path) -> Any:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path), "r") as src:
            table = pa.ipc.open_file(src).read_all()
        # Full validation checks offsets and UTF-8, so a crafted file is this error, not a decode
        # error (or an out-of-bounds read) when a passage is read later.
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise LLMCoreError(f"{path}: corrupted passages file ({str(err).splitlines()[0][:200]})") from None
    expected = passages_schema()
    if not table.schema.equals(expected):
        raise LLMCoreError(
            f"{path}: corrupted passages file (columns {table.schema.names}, expected "
            f"{expected.names} with their types)"
        )
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
        return LLMCoreError(
            f"{path}: not a valid HNSW index for this manifest ({why}); rebuild it with `llmcore rag index`"
        )

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
    (off0, max_el, count, per_el, label_off, data_off, max_level, enter, max_m, max_m0, hm, _mult, _efc) = (
        _HNSW_HEADER.unpack_from(buf, 0)
    )
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
        rec = np.frombuffer(buf, dtype=np.uint8, count=n * per_el, offset=_HNSW_HEADER.size + r0 * per_el).reshape(
            n, per_el
        )
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
        nb = words[at + 1 : at + 1 + n]
        if (nb >= count).any() or (levels[nb] < lvl).any():
            raise bad(f"element {i}: a level-{lvl} neighbour is out of range")


def load_hnsw(path: Path, manifest: dict[str, Any], pids: np.ndarray, max_elements: int = 0) -> Any:
    """hnswlib's index at `path`, after `check_hnsw_file` (so a crafted file is an error, not a crash)."""
    hnsw = load_hnswlib()
    c = manifest["counts"]
    dim = int(manifest["embedder"]["dim"])
    check_hnsw_file(
        path,
        dim=dim,
        elements=c["passages"] + c["deleted"],
        deleted=c["deleted"],
        m=int(manifest["hnsw"]["m"]),
        pids=pids,
    )
    index = hnsw.Index(space="cosine", dim=dim)
    try:
        index.load_index(str(path), max_elements=max_elements)
    except RuntimeError as err:
        raise LLMCoreError(f"{path}: hnswlib could not read it ({err})") from None
    return index


def write_manifest(tmp: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Record the size and sha256 of the index and passages files in `tmp` in `manifest["files"]` and
    write `tmp/manifest.json` (the last file of a new index); returns `manifest`."""
    manifest["files"] = {}
    for name in (INDEX_FILE, PASSAGES_FILE):
        p = tmp / name
        manifest["files"][name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "INDEX_FILE",
    "PASSAGES_FILE",
    "OWN_FILES",
    "DEFAULT_EF",
    "load_hnswlib",
    "install_index",
    "is_index_dir",
    "index_dir_problem",
    "read_manifest",
    "verify_files",
    "passages_schema",
    "write_passages",
    "read_passages",
    "check_hnsw_file",
    "load_hnsw",
    "write_manifest",
]

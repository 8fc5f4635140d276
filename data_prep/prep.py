"""jsonl -> shard dir: streaming, multi-process tokenization into Arrow IPC files plus a manifest.

The main process reads each input in blocks of whole lines (256 KiB: small enough that the last
blocks spread evenly over the workers) and hands them to a pool of workers
(at most a few blocks in flight, so memory stays flat whatever the input size). A worker decodes
the lines, has the shard kind (`kinds.py`) check each record and encode the block with the
tokenizer's batch encoder, and returns flat numpy arrays (values + lengths), which the main process appends to the current shard file as one Arrow
record batch, in input order. Everything is written into a temp dir beside the output and renamed
into place only when complete.

Reliability: a line longer than `max_line_bytes` is never held whole (it becomes a bad line of
its own reason); `--overwrite` replaces only a shard dir of the same kind and never one holding an
input; a write error (disk full) is one line and leaves nothing behind; a killed prep leaves only
a temp dir named after its pid, which the next prep beside it removes; pool workers die with their
parent. `LLMCORE_FAULT=prep:POINT[:N]` (tests only, see `faults.py`) kills or pauses the process at
a named point.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmcore.data_prep.faults import fault_point
from llmcore.data_prep.format import FORMAT, FORMAT_VERSION, MANIFEST_FILE, UINT16_LIMIT, shard_file_name
from llmcore.data_prep.jsonl import (
    DEFAULT_MAX_LINE_BYTES,
    REASONS,
    BadLine,
    input_files,
    open_input,
    parse_line,
    too_long,
)
from llmcore.data_prep.kinds import EncodeOptions, ShardKind, get_kind
from llmcore.data_prep.tokenizer import ChatTemplateError, Tokenizer, load_tokenizer
from llmcore.errors import DataError, LLMCoreError
from llmcore.io import check_out_dir, install_dir, remove_leftovers, sha256_file, temp_dir_for, write_json

# ---------------------------------------------------------------------------------------------
# Worker side: one block of lines in, flat arrays out.


@dataclass
class Chunk:
    source: int  # index into the input list
    first_line: int  # 1-based line number of the block's first line
    data: bytes  # whole lines
    too_long: int = 0  # > 0: the block is one line of this many bytes, over the limit, not read


@dataclass
class ChunkResult:
    source: int
    lines: int = 0
    blank: int = 0
    docs: int = 0
    columns: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (values, lengths)
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (line, reason, message), in line order


_WORKER: dict = {}


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when its parent dies (a killed prep leaves no workers)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass


def _init_worker(
    tokenizer_dir: str,
    kind: str | ShardKind,
    field_name: str,
    single_thread: bool,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    in_pool: bool = False,
    options: EncodeOptions | None = None,
) -> None:
    if in_pool:
        _die_with_parent()
        # A pool worker must end when the pool terminates it (SIGTERM), whatever handler or SIG_IGN
        # the parent process had installed when it forked us.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if single_thread:
        # Each pool process is one core's worth; the Rust thread pool would only oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(
        tok=load_tokenizer(tokenizer_dir),
        kind=get_kind(kind),
        field=field_name,
        max_line_bytes=max_line_bytes,
        options=options,
    )


def process_chunk(chunk: Chunk) -> ChunkResult:
    """Validate and tokenize one block of lines (runs in a worker, or in-process with one worker)."""
    tok: Tokenizer = _WORKER["tok"]
    kind: ShardKind = _WORKER["kind"]
    limit: int = _WORKER.get("max_line_bytes", DEFAULT_MAX_LINE_BYTES)
    res = ChunkResult(source=chunk.source)
    if chunk.too_long:
        bad = too_long(chunk.too_long, limit)
        res.lines = 1
        res.bad.append((chunk.first_line, bad.reason, bad.message))
        res.columns = {name: (np.zeros(0, dtype=t), np.zeros(0, dtype=np.int64)) for name, t in kind.columns.items()}
        return res
    raw_lines = chunk.data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the block ends with a newline
    res.lines = len(raw_lines)
    line_nos: list[int] = []
    payloads: list = []
    for offset, raw in enumerate(raw_lines):
        line_no = chunk.first_line + offset
        rec = parse_line(raw, limit)
        if rec is None:
            res.blank += 1
            continue
        if not isinstance(rec, BadLine):
            rec = kind.check(rec, _WORKER["field"])
        if isinstance(rec, BadLine):
            res.bad.append((line_no, rec.reason, rec.message))
            continue
        line_nos.append(line_no)
        payloads.append(rec)

    options = _WORKER.get("options")
    while True:
        try:  # only chat kinds take options (a kind written before them keeps its two-argument encode)
            columns = kind.encode(tok, payloads, options) if kind.chat else kind.encode(tok, payloads)
            break
        except ChatTemplateError as err:  # a row the template cannot render is a bad line, not a crash
            if err.index is None or not 0 <= err.index < len(payloads):
                raise
            res.bad.append((line_nos.pop(err.index), "template_error", str(err)))
            payloads.pop(err.index)
    res.bad.sort()

    keep = np.ones(len(payloads), dtype=bool)
    if tok.vocab_size > UINT16_LIMIT:  # only then can an id overflow the uint16 columns
        for name in kind.token_columns:
            values, lengths = columns[name]
            doc_max = _per_doc_max(values, lengths)
            for j in np.nonzero(doc_max >= UINT16_LIMIT)[0]:
                if keep[j]:
                    keep[j] = False
                    res.bad.append(
                        (
                            line_nos[j],
                            "token_id_overflow",
                            f"token id {int(doc_max[j])} does not fit uint16 (vocab size {tok.vocab_size} > {UINT16_LIMIT})",
                        )
                    )
        res.bad.sort()
        if not keep.all():
            columns = {name: _select_docs(v, lens, keep) for name, (v, lens) in columns.items()}

    res.docs = int(keep.sum())
    res.columns = {
        name: (values.astype(kind.columns[name], copy=False), lengths) for name, (values, lengths) in columns.items()
    }
    return res


def _per_doc_max(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    out = np.full(len(lengths), -1, dtype=np.int64)
    nonempty = lengths > 0
    if nonempty.any():
        starts = (np.cumsum(lengths) - lengths)[nonempty]
        out[nonempty] = np.maximum.reduceat(values, starts)
    return out


def _select_docs(values: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return values[np.repeat(keep, lengths)], lengths[keep]


# ---------------------------------------------------------------------------------------------
# Main side: reading blocks, ordering results, writing shards atomically.


def _read_chunks(
    paths: list[Path], block_bytes: int, progress, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> "collections.abc.Iterator[Chunk]":
    """Blocks of whole lines from each file in turn (plain or compressed). A line longer than a
    block makes a longer block, up to `max_line_bytes`; past that the rest of the line is read and
    dropped piece by piece, and the line becomes a one-line `too_long` chunk."""
    for source, path in enumerate(paths):
        with open_input(path) as f:
            line_no = 1
            parts: list[bytes] = []  # the start of a line that has no newline yet
            pending = 0
            skipping = -1  # >= 0: inside an over-long line, this many bytes of it seen
            seen = 0
            while True:
                block = f.read(block_bytes)
                if progress is not None:
                    now = f.consumed()
                    progress.update(now - seen)
                    seen = now
                if not block:
                    if skipping >= 0:
                        yield Chunk(source, line_no, b"", too_long=skipping)
                    elif parts:
                        yield Chunk(source, line_no, b"".join(parts))
                    break
                start = 0
                if skipping >= 0:
                    nl = block.find(b"\n")
                    if nl < 0:
                        skipping += len(block)
                        continue
                    yield Chunk(source, line_no, b"", too_long=skipping + nl)
                    line_no += 1
                    skipping = -1
                    start = nl + 1
                cut = block.rfind(b"\n", start) + 1
                if cut == 0:  # no line ends in this block
                    parts.append(block[start:])
                    pending += len(block) - start
                    if pending > max_line_bytes:
                        skipping, parts, pending = pending, [], 0
                    continue
                if parts:
                    first_nl = block.find(b"\n", start)
                    if pending + first_nl - start > max_line_bytes:  # the pending line ends here, too long
                        yield Chunk(source, line_no, b"", too_long=pending + first_nl - start)
                        line_no += 1
                        start = first_nl + 1
                        parts, pending = [], 0
                whole = b"".join(parts) + block[start:cut] if parts else block[start:cut]
                parts = [block[cut:]] if cut < len(block) else []
                pending = len(block) - cut
                if whole:
                    yield Chunk(source, line_no, whole)
                    line_no += whole.count(b"\n")


class _ShardWriter:
    """Appends record batches to shard-NNNNN.arrow files of at most `shard_docs` documents."""

    def __init__(self, out_dir: Path, kind: ShardKind, shard_docs: int):
        self.out_dir, self.kind, self.shard_docs = out_dir, kind, shard_docs
        self.schema = kind.schema()
        self.shards: list[dict] = []
        self._writer = None
        self._sink = None
        self._docs = 0
        self._tokens = 0

    def _open(self) -> None:
        name = shard_file_name(len(self.shards))
        self._sink = pa.OSFile(str(self.out_dir / name), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self.shards.append({"file": name})
        self._docs = self._tokens = 0
        fault_point("prep:shard")

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        entry = self.shards[-1]
        path = self.out_dir / entry["file"]
        entry.update(num_docs=self._docs, num_tokens=self._tokens, bytes=path.stat().st_size, sha256=sha256_file(path))
        self._writer = self._sink = None

    def write(self, columns: dict[str, tuple[np.ndarray, np.ndarray]], n_docs: int) -> None:
        arrays = []
        for name, col in zip(self.schema.names, self.schema):
            values, lengths = columns[name]
            offsets = np.zeros(len(lengths) + 1, dtype=np.int32)  # one block is far below 2**31 tokens
            np.cumsum(lengths, out=offsets[1:])
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=col.type.value_type)))
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        lengths_by_col = {name: columns[name][1] for name in self.kind.token_columns}
        start = 0
        while start < n_docs:
            if self._writer is None or self._docs >= self.shard_docs:
                self._close()
                self._open()
            take = min(n_docs - start, self.shard_docs - self._docs)
            self._writer.write_batch(batch.slice(start, take))
            self._docs += take
            self._tokens += int(sum(lens[start : start + take].sum() for lens in lengths_by_col.values()))
            start += take

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def shard_dir_problem(path: Path, kind: ShardKind) -> str | None:
    """Why `path` is not a shard dir of `kind` that prep may replace (None when it is): its manifest
    must say llmcore wrote it, for this kind, and it may hold nothing but the manifest and shards."""
    import json

    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return "it has no manifest.json (it is not a shard dir)"
    try:
        m = json.loads(manifest.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        return f"its manifest.json is unreadable ({type(err).__name__})"
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return f"its manifest.json is not an {FORMAT} manifest"
    if m.get("kind") != kind.name:
        return f"it holds {m.get('kind')!r} shards, not {kind.name!r}"
    for p in path.iterdir():
        if p.name != MANIFEST_FILE and not (p.name.startswith("shard-") and p.name.endswith(".arrow")):
            return f"it holds {p.name}, which prep did not write"
    return None


def _shard_write_error(out: Path, err: OSError) -> LLMCoreError:
    return LLMCoreError(
        f"{out}: cannot write the shard dir: {err.strerror or err} "
        "(nothing was written there; any old shard dir is unchanged)"
    )


def prep(
    kind: str | ShardKind,
    inputs: list[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    workers: int | None = None,
    on_bad_line: str = "fail",
    overwrite: bool = False,
    shard_docs: int = 200_000,
    field: str = "text",
    block_bytes: int = 1 << 18,
    progress: bool = False,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    options: EncodeOptions | None = None,
) -> dict:
    """Tokenize jsonl `inputs` into a shard dir at `out_dir`; returns the manifest.

    kind: a name in `kinds.KINDS` (or the kind itself): "pretrain" (field `field`, default text),
    "sft" (`conversations`) or "dpo" (`chosen`, `rejected`). on_bad_line: "fail" raises DataError naming file and line and leaves nothing at
    `out_dir`; "skip" drops bad lines and counts them per reason in the manifest.
    Inputs may be gzip/bzip2/xz (and zstd with `zstandard`) compressed. A line over `max_line_bytes`
    is a bad line (`line_too_long`), and so is a conversation the tokenizer's chat template cannot
    render (`template_error`). `overwrite` replaces only a shard dir of the same kind, never one that
    holds an input or the tokenizer. `options` (chat kinds only): MiniMind's empty-think rule.
    """
    kind = get_kind(kind)
    options = options or EncodeOptions()
    if options != EncodeOptions() and not kind.chat:
        raise LLMCoreError(f"--drop-empty-think and --seed apply to conversations (sft, dpo), not to {kind.name}")
    if on_bad_line not in ("fail", "skip"):
        raise LLMCoreError(f"--on-bad-line must be fail or skip, not {on_bad_line!r}")
    if shard_docs < 1:
        raise LLMCoreError("shard_docs must be at least 1")
    if max_line_bytes < 1:
        raise LLMCoreError("--max-line-bytes must be at least 1")
    paths = input_files(inputs, try_open=True)  # fail on permission problems before any work
    out = Path(out_dir)
    check_out_dir(
        out,
        overwrite=overwrite,
        what=f"a shard dir of kind {kind.name}",
        inputs=[*paths, Path(tokenizer_dir)],
        replaceable=lambda p: shard_dir_problem(p, kind),
    )
    tok_dir = str(Path(tokenizer_dir))
    tok = load_tokenizer(tok_dir)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))

    remove_leftovers(out.parent, out.name)  # temp dirs of killed preps (only of dead processes)
    try:
        tmp = temp_dir_for(out)
    except OSError as err:
        raise _shard_write_error(out, err) from err
    sources = [
        {"path": str(p), "lines_read": 0, "blank_lines": 0, "docs": 0, "lines_skipped": 0, "skipped_by_reason": {}}
        for p in paths
    ]
    bar = None
    if progress:  # a bar on a terminal; in a pipe a line every 30 s with the time left
        import logging

        from llmcore.log import Progress

        bar = Progress(sum(p.stat().st_size for p in paths), "B", f"prep {kind.name}", logging.getLogger(__name__))
    started = time.perf_counter()
    pool = None
    try:
        writer = _ShardWriter(tmp, kind, shard_docs)

        def consume(res: ChunkResult) -> None:
            src = sources[res.source]
            src["lines_read"] += res.lines
            src["blank_lines"] += res.blank
            src["docs"] += res.docs
            for line_no, reason, message in res.bad:
                if on_bad_line == "fail":
                    raise DataError(message, src["path"], line_no, reason)
                src["lines_skipped"] += 1
                src["skipped_by_reason"][reason] = src["skipped_by_reason"].get(reason, 0) + 1
            if res.docs:
                writer.write(res.columns, res.docs)
            fault_point("prep:chunk")

        chunks = _read_chunks(paths, block_bytes, bar, max_line_bytes)
        if workers == 1:
            _init_worker(tok_dir, kind, field, single_thread=False, max_line_bytes=max_line_bytes, options=options)
            for chunk in chunks:
                consume(process_chunk(chunk))
        else:
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            pool = ctx.Pool(
                workers, initializer=_init_worker, initargs=(tok_dir, kind, field, True, max_line_bytes, True, options)
            )
            in_flight: collections.deque = collections.deque()
            for chunk in chunks:
                in_flight.append(pool.apply_async(process_chunk, (chunk,)))
                if len(in_flight) >= 2 * workers:  # bounded: memory does not grow with the input
                    consume(in_flight.popleft().get())
            while in_flight:
                consume(in_flight.popleft().get())
            pool.close()
            pool.join()
            pool = None
        shards = writer.finish()
        manifest = _manifest(kind, tok, sources, shards, on_bad_line, field)
        if options.drop_empty_think > 0:
            manifest["empty_think"] = {"drop": options.drop_empty_think, "seed": options.seed}
        if manifest["num_docs"] == 0:
            raise DataError("no valid documents in the inputs", str(paths[0]), reason="empty_text")
        manifest["seconds"] = round(time.perf_counter() - started, 3)
        write_json(tmp / MANIFEST_FILE, manifest)
        fault_point("prep:install")
        install_dir(tmp, out)  # fsynced, then renamed over any old shard dir
    except BaseException as err:
        if pool is not None:
            pool.terminate()
            pool.join()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, LLMCoreError):
            raise _shard_write_error(out, err) from err
        raise
    finally:
        if bar is not None:
            bar.close()
    return manifest


def _manifest(
    kind: ShardKind, tok: Tokenizer, sources: list[dict], shards: list[dict], on_bad_line: str, field_name: str
) -> dict:
    skipped: dict[str, int] = {}
    for s in sources:
        for reason, n in s["skipped_by_reason"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind.name,
        "columns": kind.manifest_columns(),
        "text_field": field_name if kind.text_field else None,
        "tokenizer": {
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "path": str(tok.path.resolve()),  # absolute, so `prep inspect --decode` works from any cwd
            "special_ids": {"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id},
        },
        "num_docs": sum(s.get("num_docs", 0) for s in shards),
        "num_tokens": sum(s.get("num_tokens", 0) for s in shards),
        "shards": shards,
        "sources": sources,
        "on_bad_line": on_bad_line,
        "lines_skipped": sum(skipped.values()),
        "skipped_by_reason": skipped,
        "reasons": {k: REASONS[k] for k in skipped},
    }

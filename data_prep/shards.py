"""Reading a shard dir: memory-mapped Arrow IPC files, per-document zero-copy numpy views.

The reader imports neither the tokenizer nor the writer (prep.py): the format constants come
from `format.py` and the columns from the shard kind (`kinds.py`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmcore.data_prep.format import FORMAT, FORMAT_VERSION, MANIFEST_FILE
from llmcore.data_prep.kinds import ShardKind, get_kind
from llmcore.errors import LLMCoreError
from llmcore.io import sha256_file

log = logging.getLogger(__name__)

_REPREP = "re-run `llmcore prep`"


class ShardReader:
    """A shard dir opened read-only. `doc(i)` returns views into the mapped files, no copies.

    Each column of each record batch is kept as (values, offsets) numpy views; a document is
    `values[offsets[j]:offsets[j+1]]` of the batch that holds it, found by binary search.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST_FILE
        if not manifest_file.is_file():
            raise LLMCoreError(f"{self.path}: not a shard dir (no manifest.json); make one with `llmcore prep`")
        try:
            self.manifest: dict = json.loads(manifest_file.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or invalid UTF-8
            raise LLMCoreError(f"{manifest_file}: corrupt manifest: {err}") from None
        if not isinstance(self.manifest, dict):
            raise LLMCoreError(f"{manifest_file}: corrupt manifest: not a JSON object; {_REPREP}")
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise LLMCoreError(
                f"{self.path}: shard format {self.manifest.get('format')!r} v{self.manifest.get('format_version')} "
                f"is not {FORMAT} v{FORMAT_VERSION}; {_REPREP}"
            )
        try:
            self.shard_kind: ShardKind = get_kind(self.manifest["kind"])
        except (KeyError, LLMCoreError) as err:
            raise LLMCoreError(f"{self.path}: manifest names no known shard kind ({err})") from None
        self.kind: str = self.shard_kind.name
        self.columns = list(self.shard_kind.columns)
        shards = self.manifest.get("shards")
        if not isinstance(shards, list) or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) for e in shards
        ):
            raise LLMCoreError(f"{manifest_file}: corrupt manifest: no list of shards with file names; {_REPREP}")
        tokenizer = self.manifest.get("tokenizer")
        if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("fingerprint"), str):
            raise LLMCoreError(f"{manifest_file}: corrupt manifest: no tokenizer fingerprint; {_REPREP}")
        self._views: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {c: [] for c in self.columns}
        self._shard_batches: list[range] = []  # which record batches each shard holds
        batch_sizes = []
        self._maps = []  # keep the memory maps alive as long as the views
        expected = self.shard_kind.schema()
        for shard in shards:
            name = shard["file"]
            file = self.path / name
            if os.sep in name or name in (".", "..") or (os.altsep and os.altsep in name):
                raise LLMCoreError(
                    f"{manifest_file}: corrupt manifest: shard file {name!r} is not a plain file name; {_REPREP}"
                )
            try:
                size = file.stat().st_size
            except OSError as err:
                raise LLMCoreError(f"{file}: cannot open shard: {err.strerror or err}; {_REPREP}") from None
            if isinstance(shard.get("bytes"), int) and size != shard["bytes"]:
                raise LLMCoreError(
                    f"{file}: corrupt shard: {size} bytes, the manifest says {shard['bytes']} "
                    f"(truncated or changed); {_REPREP}"
                )
            first = len(batch_sizes)
            try:
                source = pa.memory_map(str(file), "r")
                reader = pa.ipc.open_file(source)
                if not reader.schema.equals(expected):
                    raise LLMCoreError(
                        f"{file}: corrupt shard: its columns are not those of a {self.kind} shard; {_REPREP}"
                    )
                for b in range(reader.num_record_batches):
                    batch = reader.get_batch(b)
                    batch_sizes.append(batch.num_rows)
                    for c in self.columns:
                        arr = batch.column(c)
                        self._views[c].append(
                            (arr.values.to_numpy(zero_copy_only=True), arr.offsets.to_numpy(zero_copy_only=True))
                        )
            except (OSError, pa.ArrowException, ValueError, IndexError) as err:
                raise LLMCoreError(
                    f"{file}: corrupt shard, cannot read it ({str(err).splitlines()[0] if str(err) else type(err).__name__}); {_REPREP}"
                ) from None
            self._maps.append(source)
            self._shard_batches.append(range(first, len(batch_sizes)))
            rows = sum(batch_sizes[first:])
            if isinstance(shard.get("num_docs"), int) and rows != shard["num_docs"]:
                raise LLMCoreError(
                    f"{file}: corrupt shard: it holds {rows} documents, the manifest says {shard['num_docs']}; {_REPREP}"
                )
        self._batch_starts = np.concatenate([[0], np.cumsum(batch_sizes, dtype=np.int64)])
        self._n = int(self._batch_starts[-1])
        if self._n != self.manifest.get("num_docs", self._n):
            raise LLMCoreError(
                f"{self.path}: shard files hold {self._n} documents, manifest says {self.manifest['num_docs']}"
            )
        self._lengths: np.ndarray | None = None

    def verify(self, vocab_size: int | None = None, checksums: bool = True, threads: int | None = None) -> None:
        """Check the shard dir before training spends time on it; LLMCoreError (one line naming the
        shard file) on the first problem.

        Per shard: the file's sha256 against the manifest (`checksums`), the document and token counts
        against the manifest, offsets that stay inside the values, every token id below `vocab_size`
        (default: the manifest's tokenizer vocab size) and masks of 0/1 as long as their tokens.
        Files are hashed by `threads` threads at once (default: up to 8).
        """
        started = time.perf_counter()
        limit = int(vocab_size if vocab_size is not None else self.manifest["tokenizer"].get("vocab_size") or (1 << 16))
        shards = self.manifest["shards"]
        if checksums:
            missing = [s["file"] for s in shards if not isinstance(s.get("sha256"), str)]
            if missing:
                raise LLMCoreError(f"{self.path / missing[0]}: the manifest has no sha256 for it; {_REPREP}")
            n = threads or min(8, os.cpu_count() or 1, max(1, len(shards)))
            with ThreadPoolExecutor(max_workers=n) as pool:
                digests = list(pool.map(lambda s: sha256_file(self.path / s["file"]), shards))
            for shard, digest in zip(shards, digests):
                if digest != shard["sha256"]:
                    raise LLMCoreError(
                        f"{self.path / shard['file']}: corrupt shard: sha256 {digest[:12]} does not match "
                        f"the manifest's {shard['sha256'][:12]} (changed since prep); {_REPREP}"
                    )
        token_cols = self.shard_kind.token_columns
        mask_cols = [c for c in self.columns if c not in token_cols]
        total_tokens = 0
        for shard, batches in zip(shards, self._shard_batches):
            file = self.path / shard["file"]
            tokens = 0
            for b in batches:
                lengths = {}
                for c in self.columns:
                    values, offsets = self._views[c][b]
                    if len(offsets) and (offsets[0] < 0 or offsets[-1] > len(values) or (np.diff(offsets) < 0).any()):
                        raise LLMCoreError(
                            f"{file}: corrupt shard: column {c} has offsets outside its values; {_REPREP}"
                        )
                    used = values[offsets[0] : offsets[-1]] if len(offsets) else values[:0]
                    lengths[c] = np.diff(offsets)
                    if c in token_cols:
                        tokens += int(lengths[c].sum())
                        top = int(used.max()) if len(used) else -1
                        if top >= limit:
                            at = int(offsets[0]) + int(np.argmax(used >= limit))
                            doc = int(self._batch_starts[b]) + int(np.searchsorted(offsets, at, side="right")) - 1
                            raise LLMCoreError(
                                f"{file}: corrupt shard: token id {top} (document {doc}) is not below "
                                f"the vocab size {limit}; {_REPREP}"
                            )
                    elif len(used) and int(used.max()) > 1:
                        raise LLMCoreError(
                            f"{file}: corrupt shard: column {c} holds {int(used.max())}, not a 0/1 mask; {_REPREP}"
                        )
                for c in mask_cols:
                    partner = c.removesuffix("_mask") if c.removesuffix("_mask") in token_cols else token_cols[0]
                    if not np.array_equal(lengths[c], lengths[partner]):
                        raise LLMCoreError(f"{file}: corrupt shard: column {c} is not as long as {partner}; {_REPREP}")
            if isinstance(shard.get("num_tokens"), int) and tokens != shard["num_tokens"]:
                raise LLMCoreError(
                    f"{file}: corrupt shard: it holds {tokens} tokens, the manifest says {shard['num_tokens']}; {_REPREP}"
                )
            total_tokens += tokens
        if isinstance(self.manifest.get("num_tokens"), int) and total_tokens != self.manifest["num_tokens"]:
            raise LLMCoreError(
                f"{self.path}: shard files hold {total_tokens} tokens, the manifest says {self.manifest['num_tokens']}; {_REPREP}"
            )
        seconds = time.perf_counter() - started
        size = sum(int(s.get("bytes") or 0) for s in shards)
        log.log(
            logging.INFO if seconds >= 1 else logging.DEBUG,
            "verified %s: %d shard(s), %d documents, %.0f MB in %.1f s",
            self.path,
            len(shards),
            self._n,
            size / 1e6,
            seconds,
        )

    def __len__(self) -> int:
        return self._n

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self.manifest["tokenizer"]["special_ids"])

    def _locate(self, i: int) -> tuple[int, int]:
        if not -self._n <= i < self._n:
            raise IndexError(f"document {i} out of range (0..{self._n - 1})")
        if i < 0:
            i += self._n
        b = int(np.searchsorted(self._batch_starts, i, side="right")) - 1
        return b, i - int(self._batch_starts[b])

    def doc(self, i: int) -> dict[str, np.ndarray]:
        """Document `i` as read-only numpy views (uint16 tokens, uint8 masks)."""
        b, j = self._locate(int(i))
        out = {}
        for c in self.columns:
            values, offsets = self._views[c][b]
            out[c] = values[offsets[j] : offsets[j + 1]]
        return out

    def column_lengths(self, column: str) -> np.ndarray:
        return (
            np.concatenate([np.diff(off).astype(np.int64) for _, off in self._views[column]])
            if self._n
            else np.zeros(0, np.int64)
        )

    def lengths(self) -> np.ndarray:
        """Tokens per document (int64), as the kind defines it (for dpo the longer of chosen and rejected)."""
        if self._lengths is None:
            self._lengths = self.shard_kind.doc_lengths(self.column_lengths)
        return self._lengths

    def check_tokenizer(self, tok) -> None:
        """Refuse a tokenizer other than the one the shards were made with (compared by fingerprint)."""
        if tok.fingerprint != self.fingerprint:
            raise LLMCoreError(
                f"{self.path}: shards were made with tokenizer {self.fingerprint[:12]} "
                f"({self.manifest['tokenizer'].get('path')}), not {tok.fingerprint[:12]} ({tok.path}); "
                "re-run `llmcore prep` with this tokenizer"
            )

    def __repr__(self) -> str:
        return f"ShardReader({str(self.path)!r}, kind={self.kind!r}, docs={self._n})"

"""Reading a shard dir: memory-mapped Arrow IPC files, per-document zero-copy numpy views.

The reader imports neither the tokenizer nor the writer (prep.py): the format constants come
from `format.py` and the columns from the shard kind (`kinds.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmcore.data_prep.format import FORMAT, FORMAT_VERSION, MANIFEST_FILE
from llmcore.data_prep.kinds import ShardKind, get_kind
from llmcore.errors import LLMCoreError


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
            self.manifest: dict = json.loads(manifest_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise LLMCoreError(f"{manifest_file}: corrupt manifest: {err}") from err
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise LLMCoreError(
                f"{self.path}: shard format {self.manifest.get('format')!r} v{self.manifest.get('format_version')} "
                f"is not {FORMAT} v{FORMAT_VERSION}; re-run `llmcore prep`"
            )
        try:
            self.shard_kind: ShardKind = get_kind(self.manifest["kind"])
        except (KeyError, LLMCoreError) as err:
            raise LLMCoreError(f"{self.path}: manifest names no known shard kind ({err})") from None
        self.kind: str = self.shard_kind.name
        self.columns = list(self.shard_kind.columns)
        self._views: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {c: [] for c in self.columns}
        batch_sizes = []
        self._maps = []  # keep the memory maps alive as long as the views
        for shard in self.manifest["shards"]:
            file = self.path / shard["file"]
            try:
                source = pa.memory_map(str(file), "r")
                reader = pa.ipc.open_file(source)
            except (OSError, pa.ArrowInvalid) as err:
                raise LLMCoreError(f"{file}: cannot open shard: {err}") from err
            self._maps.append(source)
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                batch_sizes.append(batch.num_rows)
                for c in self.columns:
                    arr = batch.column(c)
                    self._views[c].append((arr.values.to_numpy(zero_copy_only=True), arr.offsets.to_numpy(zero_copy_only=True)))
        self._batch_starts = np.concatenate([[0], np.cumsum(batch_sizes, dtype=np.int64)])
        self._n = int(self._batch_starts[-1])
        if self._n != self.manifest.get("num_docs", self._n):
            raise LLMCoreError(f"{self.path}: shard files hold {self._n} documents, manifest says {self.manifest['num_docs']}")
        self._lengths: np.ndarray | None = None

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
            out[c] = values[offsets[j]:offsets[j + 1]]
        return out

    def column_lengths(self, column: str) -> np.ndarray:
        return np.concatenate([np.diff(off).astype(np.int64) for _, off in self._views[column]]) if self._n else np.zeros(0, np.int64)

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

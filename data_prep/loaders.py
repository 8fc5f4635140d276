"""Batches for training from a shard dir: packed, bestfit, padded and DPO pairs (contract in docs/INTERNALS.md).

Row layouts (every row holds seq_len+1 tokens: inputs row[:-1], labels row[1:]):
- packed: the shuffled document stream cut into rows; a document may continue in the next row.
- bestfit: whole documents placed into rows by best-fit decreasing, so no document that fits a
  row is ever cut. A longer one is split into row-sized pieces (no loss mask: pretraining) or,
  for masked kinds (SFT), truncated at the end and counted (`on_long="fail"` refuses it), so an
  assistant token always has its whole prompt in the same row.
- padded: one document per row, right-padded (MiniMind's layout); pairs: DPO chosen/rejected.
In every layout positions restart at 0 at each document (or piece) start, and no label crosses
from one document into the next.

Each epoch has a plan fixed by (seed, epoch): a permutation of the documents and, for packed
mode, the cumulative token offsets of the concatenated stream (for bestfit, the rows' pieces). A global row r is then a pure
function of the plan, so rank r of W takes rows r, r+W, ... and a resumed loader rebuilds the
plan and continues at exactly the next batch. The last global batch of an epoch is filled up by
wrapping to the epoch's first rows (as torch's DistributedSampler pads), so every rank runs the
same number of steps.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np
import torch

from llmcore.data_prep.shards import ShardReader
from llmcore.errors import LLMCoreError

IGNORE_INDEX = -100
MODES = ("packed", "bestfit", "padded", "pairs")
ON_LONG = ("truncate", "fail")
STATE_VERSION = 1


def train_eval_split(n_docs: int, eval_docs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted doc indices: `eval_docs` chosen at random (by seed) for eval, the rest for training."""
    if not 0 <= eval_docs < n_docs:
        raise LLMCoreError(f"eval_docs must be in [0, {n_docs}) for {n_docs} documents, got {eval_docs}")
    perm = np.random.default_rng([seed, 0x5E1]).permutation(n_docs)
    return np.sort(perm[eval_docs:]), np.sort(perm[:eval_docs])


def first_rows(batch: dict, n: int) -> dict | None:
    """The first `n` rows (pairs for DPO batches) of a batch; None when n is 0.

    A loader fills an epoch's last global batch by wrapping to the epoch's first rows (so ranks
    stay in step); a one-pass evaluation keeps only `unwrapped_rows(step)` rows so none counts twice."""
    if n <= 0:
        return None
    if "num_pairs" in batch:
        b = int(batch["num_pairs"])
        if n >= b:
            return batch
        pick = torch.cat([torch.arange(n), b + torch.arange(n)])
        out = {k: (v[pick] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        out["num_pairs"] = n
        return out
    if n >= batch["input_ids"].shape[0]:
        return batch
    return {k: (v[:n] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Assign items to bins of `capacity` by best-fit decreasing; returns (bin of each item, bins).

    Items are taken longest first (ties in the given order) and each goes into the open bin whose
    free space is the smallest that still fits it, else into a new bin. The number of bins depends
    only on the multiset of lengths. Every length must be in 1..capacity."""
    order = np.argsort(-lengths, kind="stable")
    free: dict[int, list[int]] = {}  # free space -> bins with exactly that much left
    spaces: list[int] = []  # sorted distinct free spaces that some bin has
    bin_of = np.empty(len(lengths), dtype=np.int64)
    n_bins = 0
    for i in order.tolist():
        need = int(lengths[i])
        j = bisect.bisect_left(spaces, need)
        if j < len(spaces):
            space = spaces[j]
            stack = free[space]
            b = stack.pop()
            if not stack:
                del free[space]
                spaces.pop(j)
            left = space - need
        else:
            b, n_bins = n_bins, n_bins + 1
            left = capacity - need
        bin_of[i] = b
        if left > 0:
            if left in free:
                free[left].append(b)
            else:
                free[left] = [b]
                bisect.insort(spaces, left)
    return bin_of, n_bins


class Loader:
    """Iterator of batches (dicts of CPU torch.long tensors) over `reader` (infinite unless `epochs` is given).

    mode "packed" (pretrain/sft: documents concatenated, cut into rows of seq_len+1), "padded"
    (one document per row, MiniMind's semantics) or "pairs" (dpo). `shuffle=False` keeps document
    order (e.g. for eval). Built through its public name `make_loader`.
    """

    def __init__(
        self,
        reader: ShardReader,
        mode: str,
        seq_len: int,
        micro_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        doc_indices: Sequence[int] | np.ndarray | None = None,
        shuffle: bool = True,
        epochs: int | None = None,
        on_long: str = "truncate",
    ):
        if mode not in MODES:
            raise LLMCoreError(f"unknown loader mode {mode!r}; expected one of {', '.join(MODES)}")
        paired = "chosen" in reader.columns
        if (mode == "pairs") != paired:
            raise LLMCoreError(f"loader mode {mode!r} does not fit a {reader.kind} shard dir ({reader.path})")
        if on_long not in ON_LONG:
            raise LLMCoreError(f"on_long must be one of {', '.join(ON_LONG)}, got {on_long!r}")
        if seq_len < 1 or micro_batch_size < 1:
            raise LLMCoreError("seq_len and micro_batch_size must be positive")
        if not 0 <= rank < world_size:
            raise LLMCoreError(f"rank {rank} is not in [0, {world_size})")
        self.reader = reader
        self.mode = mode
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.epochs = epochs
        self.docs = (
            np.arange(len(reader), dtype=np.int64) if doc_indices is None else np.asarray(doc_indices, dtype=np.int64)
        )
        if len(self.docs) == 0:
            raise LLMCoreError(f"{reader.path}: no documents to load")
        self.pad_id = int(reader.special_ids.get("pad", 0))
        self._has_mask = "loss_mask" in reader.columns
        self._doc_lengths = reader.lengths()[self.docs]
        self.on_long = on_long
        self.epoch = 0
        self.step = 0  # batches already yielded in this epoch
        self._plan_epoch = -1
        width = self.seq_len + 1
        # Documents longer than a row: masked ones are truncated (bestfit, padded, pairs), counted here.
        long_docs = self._doc_lengths > width
        self.long_docs = int(long_docs.sum())
        if self.long_docs and self._has_mask and on_long == "fail" and mode != "packed":
            first = int(np.flatnonzero(long_docs)[0])
            raise LLMCoreError(
                f"{reader.path}: {self.long_docs} conversation(s) are longer than --seq-len {self.seq_len} + 1 tokens "
                f"(the first is document {int(self.docs[first])}, {int(self._doc_lengths[first])} tokens); raise "
                "--seq-len, or drop --on-long fail to truncate them at the end"
            )
        # Truncated conversations whose assistant tokens all lie past the cut teach nothing.
        self.docs_without_loss = 0
        if self.long_docs and self._has_mask and mode != "packed":
            for j in np.flatnonzero(long_docs).tolist():
                self.docs_without_loss += int(not self._tokens(int(self.docs[j]))[1][1:width].any())
        self.tokens_per_epoch = int(self._doc_lengths.sum())  # tokens in the documents (before any cut)
        # Rows in one epoch: one per document (padded, pairs), the packed stream cut into seq_len+1,
        # or the best-fit rows (their count does not depend on the epoch's order).
        if mode == "packed":
            self.rows_per_epoch = math.ceil(self.tokens_per_epoch / width)
        elif mode == "bestfit":
            self.rows_per_epoch = self._bestfit_plan(np.arange(len(self.docs)))[0]
        else:
            self.rows_per_epoch = len(self.docs)
        self.steps_per_epoch = math.ceil(self.rows_per_epoch / (self.world_size * self.micro_batch_size))

    # -- plan -------------------------------------------------------------------------------
    def _plan(self) -> None:
        if self._plan_epoch == self.epoch:
            return
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.docs))
        else:
            order = np.arange(len(self.docs))
        self._order = self.docs[order]
        if self.mode == "packed":
            self._stream_starts = np.concatenate([[0], np.cumsum(self._doc_lengths[order])])
        if self.mode == "bestfit":
            n_rows, self._row_ptr, self._pieces = self._bestfit_plan(order)
            if n_rows != self.rows_per_epoch:  # cannot happen: the count depends only on the lengths
                raise RuntimeError("best-fit row count changed between epochs")
            if self.shuffle:
                # Rows come out of best-fit roughly longest-first; shuffle them so batches mix.
                row_order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(n_rows)
                self._row_order = row_order
            else:
                self._row_order = np.arange(n_rows)
        self._plan_epoch = self.epoch

    def _bestfit_plan(self, order: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """(rows, row start offsets into pieces, pieces as (doc, start, end) rows) for the documents
        in `order` (positions into self.docs)."""
        width = self.seq_len + 1
        lengths = self._doc_lengths[order]
        docs = self.docs[order]
        if self._has_mask:
            # Conversations: at most one piece each, truncated at the end.
            pieces = np.stack([docs, np.zeros_like(docs), np.minimum(lengths, width)], axis=1)
        else:
            # Plain text: full row-sized pieces of long documents, then the remainder.
            n_pieces = np.maximum(1, -(-lengths // width))
            piece_doc = np.repeat(docs, n_pieces)
            piece_len = np.repeat(lengths, n_pieces)
            k = np.arange(len(piece_doc)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
            start = k * width
            pieces = np.stack([piece_doc, start, np.minimum(start + width, piece_len)], axis=1)
        sizes = pieces[:, 2] - pieces[:, 1]
        bin_of, n_rows = best_fit_decreasing(sizes, width)
        # Pieces grouped by row, in the order best-fit placed them (longest first within a row).
        placed = np.argsort(np.argsort(-sizes, kind="stable"), kind="stable")
        by_row = np.lexsort((placed, bin_of))
        row_ptr = np.concatenate([[0], np.cumsum(np.bincount(bin_of, minlength=n_rows))])
        return n_rows, row_ptr, pieces[by_row]

    def _slots(self, step: int) -> np.ndarray:
        per_step = self.world_size * self.micro_batch_size
        return step * per_step + self.rank + self.world_size * np.arange(self.micro_batch_size)

    def _global_rows(self, step: int) -> np.ndarray:
        """Indices of the epoch's rows that this rank gets at `step` (wrapping past the last row)."""
        return self._slots(step) % self.rows_per_epoch

    def unwrapped_rows(self, step: int) -> int:
        """How many of this rank's rows at `step` lie inside the epoch; the rest of the batch wraps
        to the epoch's first rows, which a one-pass evaluation must not count twice."""
        return int((self._slots(step) < self.rows_per_epoch).sum())

    # -- rows -------------------------------------------------------------------------------
    def _tokens(self, doc: int) -> tuple[np.ndarray, np.ndarray | None]:
        d = self.reader.doc(doc)
        return d["tokens"], d.get("loss_mask")

    def _packed_row(self, r: int, ids: np.ndarray, labels: np.ndarray, pos: np.ndarray) -> None:
        width = self.seq_len + 1
        lo, hi = r * width, min((r + 1) * width, int(self._stream_starts[-1]))
        row = np.full(width, self.pad_id, dtype=np.int64)
        keep = np.zeros(width, dtype=bool)  # may position t be a label target?
        positions = np.zeros(width, dtype=np.int64)
        first = int(np.searchsorted(self._stream_starts, lo, side="right")) - 1
        at = lo
        j = first
        while at < hi:
            d_start, d_end = int(self._stream_starts[j]), int(self._stream_starts[j + 1])
            take_lo, take_hi = at - d_start, min(hi, d_end) - d_start
            tokens, mask = self._tokens(int(self._order[j]))
            dst = slice(at - lo, at - lo + (take_hi - take_lo))
            row[dst] = tokens[take_lo:take_hi]
            keep[dst] = True if mask is None else mask[take_lo:take_hi].astype(bool)
            # A document's first token is never a target: its label would cross from the previous document.
            if take_lo == 0:
                keep[dst.start] = False
            # Positions restart at each document start and at the row start.
            positions[dst] = np.arange(take_hi - take_lo)
            at += take_hi - take_lo
            j += 1
        ids[:] = row[:-1]
        pos[:] = positions[:-1]
        labels[:] = np.where(keep[1:], row[1:], IGNORE_INDEX)

    def row_pieces(self, r: int) -> np.ndarray:
        """bestfit mode: the (doc, start, end) token ranges that make row `r` of the current epoch."""
        if self.mode != "bestfit":
            raise LLMCoreError(f"row_pieces is for bestfit rows, not {self.mode}")
        self._plan()
        rr = int(self._row_order[r])
        return self._pieces[self._row_ptr[rr] : self._row_ptr[rr + 1]]

    def _bestfit_row(self, r: int, ids: np.ndarray, labels: np.ndarray, pos: np.ndarray) -> None:
        width = self.seq_len + 1
        row = np.full(width, self.pad_id, dtype=np.int64)
        keep = np.zeros(width, dtype=bool)
        positions = np.zeros(width, dtype=np.int64)
        at = 0
        for doc, start, end in self.row_pieces(r).tolist():
            tokens, mask = self._tokens(doc)
            n = end - start
            row[at : at + n] = tokens[start:end]
            keep[at : at + n] = True if mask is None else mask[start:end].astype(bool)
            keep[at] = False  # a piece's first token is no target: its label would cross from the previous piece
            positions[at : at + n] = np.arange(n)
            at += n
        ids[:] = row[:-1]
        pos[:] = positions[:-1]
        labels[:] = np.where(keep[1:], row[1:], IGNORE_INDEX)

    def _padded_row(self, doc: int, width: int, ids: np.ndarray, labels: np.ndarray, tokens_mask=None) -> None:
        tokens, mask = tokens_mask if tokens_mask is not None else self._tokens(doc)
        n = min(len(tokens), width + 1)
        row = np.full(width + 1, self.pad_id, dtype=np.int64)
        row[:n] = tokens[:n]
        keep = np.zeros(width + 1, dtype=bool)
        keep[:n] = True if mask is None else mask[:n].astype(bool)
        ids[:] = row[:-1]
        labels[:] = np.where(keep[1:], row[1:], IGNORE_INDEX)

    def _batch(self, step: int) -> dict:
        rows = self._global_rows(step)
        B, T = self.micro_batch_size, self.seq_len
        if self.mode == "pairs":
            return self._pairs_batch(rows)
        ids = np.empty((B, T), dtype=np.int64)
        labels = np.empty((B, T), dtype=np.int64)
        pos = np.empty((B, T), dtype=np.int64)
        for b, r in enumerate(rows):
            if self.mode == "packed":
                self._packed_row(int(r), ids[b], labels[b], pos[b])
            elif self.mode == "bestfit":
                self._bestfit_row(int(r), ids[b], labels[b], pos[b])
            else:
                self._padded_row(int(self._order[r]), T, ids[b], labels[b])
                pos[b] = np.arange(T)
        # Padded rows hold one document each (position_ids == arange): the model may then skip the
        # document mask, which it could only find out by reading the positions back from the device.
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos),
            "single_documents": self.mode == "padded",
        }

    def _pairs_batch(self, rows: np.ndarray) -> dict:
        docs = [self.reader.doc(int(self._order[r])) for r in rows]
        sides = [(d["chosen"], d["chosen_mask"]) for d in docs] + [(d["rejected"], d["rejected_mask"]) for d in docs]
        width = max(min(len(t), self.seq_len + 1) for t, _ in sides) - 1  # longest in the batch, capped at T
        width = max(width, 1)
        n = len(sides)
        ids = np.empty((n, width), dtype=np.int64)
        labels = np.empty((n, width), dtype=np.int64)
        for b, tm in enumerate(sides):
            self._padded_row(-1, width, ids[b], labels[b], tokens_mask=tm)
        pos = np.broadcast_to(np.arange(width, dtype=np.int64), (n, width)).copy()
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos),
            "num_pairs": len(docs),
            "single_documents": True,
        }

    # -- iteration and state ----------------------------------------------------------------
    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict:
        if self.step >= self.steps_per_epoch:
            self.epoch += 1
            self.step = 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        self._plan()
        batch = self._batch(self.step)
        self.step += 1
        return batch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _config(self) -> dict:
        return {
            "mode": self.mode,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "num_docs": len(self.docs),
            "fingerprint": self.reader.fingerprint,
        }

    def state_dict(self) -> dict:
        """JSON-able position: loading it into an equally configured loader yields exactly the next batch."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._config()
        diff = {k: (state.get(k), v) for k, v in mine.items() if k != "rank" and state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise LLMCoreError(f"loader state does not match this loader ({detail})")
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])


# The public constructor: same arguments as `Loader` (documented there).
make_loader = Loader

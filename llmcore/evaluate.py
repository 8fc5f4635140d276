"""`llmcore eval`: loss and perplexity of a trained model on a shard dir, over loss tokens only
(every next token for pretrain shards, the assistant tokens for SFT shards).

Invariants: the shard dir is verified as `train` verifies it (sha256 of every shard, counts, offsets,
every token id below the model's vocab) before any batch is scored, so a corrupted or mismatched dir
is a one-line error, never a silent number or an IndexError; progress is shown (a bar on a terminal,
a line every 30 s with the time left otherwise).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llmcore.data_prep.loaders import IGNORE_INDEX
from llmcore.errors import LLMCoreError

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy (nats) over the loss tokens
    perplexity: float
    tokens: int  # loss tokens scored
    batches: int
    seq_len: int = 0  # tokens per row used (the run's training seq len, or 512 for a folder without one)

    def line(self) -> str:
        return (
            f"loss {self.loss:.4f}  perplexity {self.perplexity:.2f}  "
            f"({self.tokens:,} tokens, {self.batches} batches, seq len {self.seq_len})"
        )


def _run_seq_len(ckpt: Path) -> int | None:
    for cand in (ckpt / "config.json", ckpt.parent.parent / "config.json"):
        if cand.is_file():
            try:
                return int(json.loads(cand.read_text())["train"]["seq_len"])
            except (KeyError, TypeError, ValueError, json.JSONDecodeError):
                return None
    return None


@torch.no_grad()
def evaluate(
    ckpt: str | Path,
    data: str | Path,
    batch_size: int = 8,
    seq_len: int | None = None,
    packing: str = "packed",
    attn_backend: str | None = None,
    max_batches: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> EvalResult:
    """Mean masked next-token cross-entropy of the model at `ckpt` (run dir, checkpoint dir or HF
    folder) over one pass of the shards at `data` (a kind some language-model stage trains on),
    on `device` (auto: the GPU when there is one)."""
    from llmcore.checkpoint import load_model, resolve_checkpoint
    from llmcore.common import resolve_device
    from llmcore.data_prep.loaders import first_rows, make_loader
    from llmcore.data_prep.shards import ShardReader
    from llmcore.train.objectives import masked_ce_sum, perplexity
    from llmcore.train.protocols import model_positions
    from llmcore.train.stages import LanguageModelStage, all_stages

    if batch_size < 1:
        raise LLMCoreError(f"--batch-size must be >= 1, got {batch_size}")
    if packing not in ("packed", "padded"):
        raise LLMCoreError(f"packing must be packed or padded, got {packing!r}")
    dev = resolve_device(device)
    reader = ShardReader(data)
    lm_kinds = [st.shard_kind for st in all_stages() if isinstance(st, LanguageModelStage)]
    if reader.kind not in lm_kinds:
        raise LLMCoreError(f"--data {data} holds {reader.kind} shards; eval scores {' or '.join(lm_kinds)} shards")
    ckpt_dir = resolve_checkpoint(ckpt)
    model, tok = load_model(ckpt, device=dev, attn_backend=attn_backend)
    if tok is not None:
        reader.check_tokenizer(tok)
    vocab = int(reader.manifest.get("tokenizer", {}).get("vocab_size", 0))
    if vocab > model.config.vocab_size:
        raise LLMCoreError(f"the shards' vocab ({vocab}) is larger than the model's ({model.config.vocab_size})")
    reader.verify(vocab_size=model.config.vocab_size)  # checksums, counts, ids < the model's vocab
    if seq_len is None:
        seq_len = _run_seq_len(ckpt_dir) or 512
    if seq_len < 1 or seq_len > model.config.max_position_embeddings:
        raise LLMCoreError(f"--seq-len must be in 1..{model.config.max_position_embeddings}, got {seq_len}")
    model.float().eval()
    loader = make_loader(reader, packing, seq_len, batch_size, seed=0, rank=0, world_size=1, shuffle=False)
    n = loader.steps_per_epoch if max_batches is None else min(loader.steps_per_epoch, max_batches)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    count = 0
    from llmcore.log import Progress

    log.info("eval: %d batches of %d rows x %d tokens on %s", n, batch_size, seq_len, dev)
    bar = Progress(n, "batch", "eval", log, enabled=progress)
    try:
        for step in range(n):
            batch = first_rows(next(loader), loader.unwrapped_rows(step))
            if batch is not None:
                count += int((batch["labels"] != IGNORE_INDEX).sum())
                pos = model_positions(batch)
                out = model(batch["input_ids"].to(dev), position_ids=None if pos is None else pos.to(dev))
                s, _ = masked_ce_sum(out.logits, batch["labels"].to(dev))
                total += s.double()
            bar.update(1)
    finally:
        bar.close()
    if count == 0:
        raise LLMCoreError(f"{data}: no loss tokens to score")
    loss = float(total) / count
    return EvalResult(loss=loss, perplexity=perplexity(loss), tokens=count, batches=n, seq_len=seq_len)

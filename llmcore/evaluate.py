"""`llmcore eval`: the held-out loss of a trained model on a shard dir, scored as its training stage
scores its held-out documents (`llmcore.train.evaluation`, the loop the trainer's eval runs).

The stage is `--stage`, else the run's (the run dir's config.json) when it trains on the data's
shard kind, else the stage registered for that kind (pretrain, sft, dpo). The stage decides the
row layout (`Stage.loader_mode`: bestfit/padded for SFT, pairs for DPO, never packed SFT), the
objective (masked next-token CE; DPO against the run's reference) and which metric is `eval_loss`.
The run's own settings (seq len, micro batch size, packing, --on-long, dtype, beta, ...) are used
unless a flag changes them, so scoring a run's held-out documents (`llmcore prep split` with the
run's --eval-docs and --seed) prints the `eval_loss` the run logged for that checkpoint.

Invariants: the shard dir is verified as `train` verifies it (sha256 of every shard, counts, offsets,
every token id below the model's vocab) before any batch is scored, so a corrupted or mismatched dir
is a one-line error, never a silent number or an IndexError; progress is shown (a bar on a terminal,
a line every 30 s with the time left otherwise).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmcore.checkpoint import load_model, resolve_checkpoint
from llmcore.common import resolve_device
from llmcore.data_prep.shards import ShardReader
from llmcore.errors import LLMCoreError
from llmcore.io import read_json
from llmcore.log import Progress
from llmcore.train.config import TrainConfig, saved_settings
from llmcore.train.engine import autocast_ctx, resolve_dtype
from llmcore.train.evaluation import COUNT, eval_metrics, eval_sums
from llmcore.train.protocols import model_positions
from llmcore.train.stages import ObjectiveContext, Stage, all_stages, get_stage, stage_only_settings
from llmcore.train.trainer import stage_loaders

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    stage: str  # the stage whose objective and row layout scored the data
    metrics: dict[str, float]  # as the run logs them: eval_loss, eval_ppl (LM stages), eval_<term>
    items: int  # what eval_loss is a mean over: loss tokens, or pairs
    unit: str  # "loss tokens" or "pairs"
    batches: int
    rows: int  # rows per batch (a DPO batch holds this many pairs)
    seq_len: int
    layout: str  # the loader mode: packed, bestfit, padded or pairs

    @property
    def loss(self) -> float:
        return self.metrics["eval_loss"]

    @property
    def perplexity(self) -> float | None:
        return self.metrics.get("eval_ppl")

    def line(self) -> str:
        """`loss` is the run's `eval_loss` (6 decimals: the logged value to 1e-6), then perplexity or
        the stage's other eval terms, then what was scored."""
        words = [f"loss {self.loss:.6f}"]
        if self.perplexity is not None:
            words.append(f"perplexity {self.perplexity:.2f}")
        words += [
            f"{k.removeprefix('eval_')} {v:.4f}" for k, v in self.metrics.items() if k not in ("eval_loss", "eval_ppl")
        ]
        return "  ".join(words) + (
            f"  ({self.stage}: {self.items:,} {self.unit} in {self.batches} batches of {self.rows} {self.layout} "
            f"rows x {self.seq_len} tokens)"
        )


def run_of(ckpt_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """(stage, saved training settings) of the run a checkpoint dir belongs to (RUN/checkpoints/step-N,
    or a run-less checkpoint or HF folder: (None, {}))."""
    run_dir = ckpt_dir.parent.parent
    if ckpt_dir.parent.name != "checkpoints" or not (run_dir / "config.json").is_file():
        return None, {}
    saved = read_json(run_dir / "config.json", object_only=True)
    stage = saved.get("stage")
    return (stage if isinstance(stage, str) else None), (saved_settings(run_dir) or {})


def eval_stage(name: str | None, run_stage: str | None, data: str | Path, kind: str) -> Stage:
    """The stage that scores `kind` shards: `--stage`, else the run's stage when it trains on that
    kind, else the first stage registered with it as its own kind."""
    if name is not None:
        try:
            st = get_stage(name)
        except LLMCoreError as err:
            raise LLMCoreError(f"--stage {name}: {err}") from None
        if kind not in st.shard_kinds:
            raise LLMCoreError(
                f"--data {data} holds {kind} shards; --stage {st.name} scores {' or '.join(st.shard_kinds)} shards"
            )
        return st
    if run_stage is not None:
        st = get_stage(run_stage)
        if kind in st.shard_kinds:
            return st
    for st in all_stages():
        if st.shard_kind == kind:
            return st
    raise LLMCoreError(f"--data {data} holds {kind} shards, which no training stage scores")


def eval_config(
    st: Stage, run_stage: str | None, saved: dict[str, Any], ckpt: str | Path, overrides: dict[str, Any]
) -> TrainConfig:
    """The settings to score with: the run's (all of them when `st` is the run's stage; otherwise
    without the ones some stage claims as its own, which come from `st`'s defaults), then the flags
    in `overrides` (None: not given), validated as `st` validates a training config."""
    same = run_stage is not None and get_stage(run_stage) is st
    if not same and st.needs_init:
        where = f"a {run_stage} run" if run_stage else "not a run dir"
        raise LLMCoreError(
            f"scoring {st.shard_kind} shards as {st.name} needs a {st.name} run dir (its --init: {st.needs_init}); "
            f"--ckpt {ckpt} is {where}"
        )
    values = dict(saved) if same else {k: v for k, v in saved.items() if k not in stage_only_settings()}
    if not values.get("init") and not values.get("model"):
        values["init"] = str(ckpt)  # the scored weights stand for the model the stage starts from
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values, source="--ckpt's run config and the flags").resolved(st, check_paths=False)


@torch.no_grad()
def evaluate(
    ckpt: str | Path,
    data: str | Path,
    *,
    stage: str | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    packing: str | None = None,
    attn_backend: str | None = None,
    max_batches: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> EvalResult:
    """The stage's held-out metrics for the model at `ckpt` (run dir, checkpoint dir or HF folder)
    over one pass of the shards at `data`, on `device` (auto: the GPU when there is one).
    `batch_size`, `seq_len` and `packing` default to the run's (else the stage's defaults)."""
    if batch_size is not None and batch_size < 1:
        raise LLMCoreError(f"--batch-size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise LLMCoreError(f"--max-batches must be >= 1, got {max_batches}")
    dev = resolve_device(device)
    reader = ShardReader(data)
    ckpt_dir = resolve_checkpoint(ckpt)
    run_stage, saved = run_of(ckpt_dir)
    st = eval_stage(stage, run_stage, data, reader.kind)
    # A conversation longer than a row is truncated at the end (as training's default does); a run
    # with --on-long fail had none in its data, so its held-out documents are scored as it scored them.
    overrides = {"data": str(data), "device": device, "micro_batch_size": batch_size, "seq_len": seq_len}
    cfg = eval_config(st, run_stage, saved, ckpt, {**overrides, "packing": packing, "on_long": "truncate"})
    model, tok = load_model(ckpt, device=dev, attn_backend=attn_backend)
    if tok is not None:
        reader.check_tokenizer(tok)
    vocab = int(reader.manifest.get("tokenizer", {}).get("vocab_size", 0))
    if vocab > model.config.vocab_size:
        raise LLMCoreError(f"the shards' vocab ({vocab}) is larger than the model's ({model.config.vocab_size})")
    reader.verify(vocab_size=model.config.vocab_size)  # checksums, counts, ids < the model's vocab
    seq_len, rows = cfg.seq_len, cfg.micro_batch_size
    assert seq_len is not None and rows is not None  # `resolved` filled them from the run or the stage
    if seq_len > model.config.max_position_embeddings:
        raise LLMCoreError(f"--seq-len must be in 1..{model.config.max_position_embeddings}, got {seq_len}")
    model.float().eval()
    loader_for = stage_loaders(cfg, st, reader)
    loader = loader_for(None, 0, 1, shuffle=False)
    mode = loader.mode
    dtype = resolve_dtype(cfg.dtype, dev)

    def autocast() -> contextlib.AbstractContextManager:
        return autocast_ctx(dtype, dev)

    def forward(batch: dict[str, Any]) -> Any:
        with autocast():
            return model(batch["input_ids"], position_ids=model_positions(batch))

    # The stage's own objective (DPO: its reference model, or log-probs precomputed over these rows).
    objective = st.build_objective(
        ObjectiveContext(
            cfg=cfg,
            autocast=autocast,
            device=dev,
            make_loader=loader_for,
            train_idx=None,
            eval_idx=None,
            model=model,
            tokenizer=tok,
        )
    )
    n = loader.steps_per_epoch if max_batches is None else min(loader.steps_per_epoch, max_batches)
    log.info(
        "eval: %d batches of %d rows x %d tokens (%s, %s rows) on %s",
        n,
        rows,
        seq_len,
        st.name,
        mode,
        dev,
    )
    bar = Progress(n, "batch", "eval", log, enabled=progress)
    try:
        sums = eval_sums(objective, forward, loader, dev, max_batches=n, on_batch=lambda: bar.update(1))
    finally:
        bar.close()
    totals = {k: float(v) for k, v in sums.items()}
    items = int(totals[COUNT])
    unit = "pairs" if mode == "pairs" else "loss tokens"
    if items == 0:
        raise LLMCoreError(f"--data {data}: no {unit} to score within --seq-len {seq_len}")
    return EvalResult(
        stage=st.name,
        metrics=eval_metrics(st, totals),
        items=items,
        unit=unit,
        batches=n,
        rows=rows,
        seq_len=seq_len,
        layout=mode,
    )


__all__ = ["EvalResult", "evaluate", "eval_stage", "eval_config", "run_of"]

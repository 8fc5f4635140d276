"""The one training loop. Pretrain, SFT and DPO differ only in the objective and the loader mode.

A step: take `accum` micro batches from the loader, count the loss items of the whole global batch
(all processes), run forward/backward per micro batch with the loss normalised by that global count,
check the loss is finite, then let the engine clip and step with the scheduled LR. Logging, eval and
checkpoints happen between steps, so a checkpoint always holds a state between two global batches
and `--resume` continues with exactly the next one.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from llmcore.errors import LLMCoreError
from llmcore.train.checkpointing import CheckpointManager, set_rng_state, write_json_atomic
from llmcore.train.config import TrainConfig
from llmcore.train.engine import PlainEngine, autocast_ctx
from llmcore.train.metrics import MetricsLogger, Throughput
from llmcore.train.objectives import DPOObjective, LMObjective, precompute_reference

KIND_FOR_STAGE = {"pretrain": "pretrain", "sft": "sft", "dpo": "dpo"}


class TrainingDiverged(LLMCoreError):
    """The loss (or gradient norm) became NaN/Inf; the run stopped without saving the bad state."""


@dataclass
class TrainHooks:
    """Callbacks for tests and embedding programs (the demo)."""

    on_step: Callable[[int, dict[str, Any]], None] | None = None  # after each optimizer step (step, record)
    on_save_file: Callable[[Path], None] | None = None  # after each file a checkpoint save writes


@dataclass
class RunSummary:
    stage: str
    run_dir: Path
    steps: int  # optimizer steps completed (including those before a resume)
    total_steps: int
    tokens: int  # real (non-pad) input tokens consumed
    loss: float  # loss of the last step
    eval_loss: float | None
    tokens_per_s: float  # over this invocation
    elapsed_s: float
    checkpoint: Path | None  # newest complete checkpoint
    last_record: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        ev = ""
        if self.eval_loss is not None:
            ev = f" eval_loss {self.eval_loss:.4f}"
            if self.stage != "dpo":
                ev += f" (ppl {math.exp(min(self.eval_loss, 50)):.2f})"
        return (f"done: {self.stage} {self.steps}/{self.total_steps} steps, {self.tokens:,} tokens, "
                f"loss {self.loss:.4f}{ev}, {self.tokens_per_s:,.0f} tok/s, {self.elapsed_s:.1f}s -> {self.run_dir}")


def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to `lr`, then cosine down to `min_lr`
    at the last step. One function for both engines."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# distributed helpers (no-ops in one process)


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def all_sum(t: torch.Tensor) -> torch.Tensor:
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        t = t.clone()
        d.all_reduce(t, op=d.ReduceOp.SUM)
    return t


def barrier() -> None:
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.barrier()


# ----------------------------------------------------------------------------------------------
# one exact pass over a split: the loader fills an epoch's last global batch by wrapping to its
# first rows (so ranks stay in step); evaluation must not count those rows twice.


def only_rows(batch: dict[str, Any], n: int) -> dict[str, Any] | None:
    """The first `n` rows (pairs for DPO batches) of a batch; None when n is 0."""
    if n <= 0:
        return None
    if "num_pairs" in batch:
        b = int(batch["num_pairs"])
        if n >= b:
            return batch
        pick = torch.cat([torch.arange(n), b + torch.arange(n)])
        out = {k: v[pick] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out["num_pairs"] = n
        return out
    if n >= batch["input_ids"].shape[0]:
        return batch
    return {k: (v[:n] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# setup helpers


def _load_tokenizer(path: str | Path) -> Any:
    from llmcore.data_prep.tokenizer import load_tokenizer

    return load_tokenizer(path)


def resolve_tokenizer(cfg: TrainConfig, reader: Any, run_dir: Path, resuming: bool) -> Any:
    """The run's tokenizer: --tokenizer, else the resumed run's or --init run's copy, else the path the
    shard manifest records. It must be the one the shards were made with."""
    candidates: list[tuple[str, Path]] = []
    if cfg.tokenizer:
        candidates.append(("--tokenizer", Path(cfg.tokenizer)))
    if resuming and (run_dir / "tokenizer" / "tokenizer.json").is_file():
        candidates.append(("the run dir", run_dir / "tokenizer"))
    if cfg.init:
        from llmcore.checkpoint import find_tokenizer_dir, resolve_checkpoint

        tok_dir = find_tokenizer_dir(resolve_checkpoint(cfg.init))
        if tok_dir is None and (Path(cfg.init) / "tokenizer" / "tokenizer.json").is_file():
            tok_dir = Path(cfg.init) / "tokenizer"
        if tok_dir is not None:
            candidates.append(("--init", tok_dir))
    manifest_path = reader.manifest.get("tokenizer", {}).get("path")
    if manifest_path:
        candidates.append(("the shard manifest", Path(manifest_path)))
    for source, path in candidates:
        if (path / "tokenizer.json").is_file():
            tok = _load_tokenizer(path)
            try:
                reader.check_tokenizer(tok)
            except LLMCoreError as err:
                raise LLMCoreError(f"tokenizer from {source} ({path}) does not match --data: {err}") from None
            return tok
        if source == "--tokenizer":
            raise LLMCoreError(f"--tokenizer {path}: no tokenizer.json there")
    raise LLMCoreError(f"cannot find the tokenizer of {reader.path} (manifest names {manifest_path!r}); "
                       "pass --tokenizer DIR")


class Trainer:
    """Builds data, model, objective and engine from a resolved TrainConfig; `run()` trains."""

    def __init__(self, stage: str, cfg: TrainConfig, hooks: TrainHooks | None = None) -> None:
        from llmcore.data_prep.loaders import make_loader, train_eval_split
        from llmcore.data_prep.shards import ShardReader

        self.stage, self.cfg = stage, cfg
        self.hooks = hooks or TrainHooks()
        self.run_dir = Path(cfg.out)
        self.distributed = cfg.deepspeed is not None
        if self.distributed:
            from llmcore.train.engine import init_distributed

            self.rank, self.world, _ = init_distributed()
        else:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise LLMCoreError("more than one process needs DeepSpeed: add --deepspeed launch/ds_zero2.json")
            self.rank, self.world = 0, 1
        if cfg.global_batch_size % (cfg.micro_batch_size * self.world):
            raise LLMCoreError(
                f"--global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
                f"{cfg.micro_batch_size} x {self.world} process(es) = {cfg.micro_batch_size * self.world}")
        self.accum = cfg.global_batch_size // (cfg.micro_batch_size * self.world)

        # -- data --------------------------------------------------------------------------------
        self.reader = ShardReader(cfg.data)
        want = KIND_FOR_STAGE[stage]
        if self.reader.kind != want:
            raise LLMCoreError(f"--data {cfg.data} holds {self.reader.kind} shards, but `train {stage}` needs "
                               f"{want} shards (make them with `llmcore prep {want}`)")
        self.ckpts = CheckpointManager(self.run_dir, self.rank, self.world, barrier)
        existing = self.ckpts.latest() if self.ckpts.root.is_dir() and (self.ckpts.root / "latest").exists() else None
        if existing is not None and not cfg.resume:
            raise LLMCoreError(f"--out {self.run_dir} already holds checkpoints ({existing.name}); "
                               "pass --resume to continue it or choose another --out")
        self.resume_from = existing if cfg.resume else None
        self.tokenizer = resolve_tokenizer(cfg, self.reader, self.run_dir, self.resume_from is not None)
        shard_vocab = int(self.reader.manifest.get("tokenizer", {}).get("vocab_size", self.tokenizer.vocab_size))
        self.pad_id = int(self.tokenizer.pad_id)

        # -- model ---------------------------------------------------------------------------------
        self.model = self._build_model(shard_vocab)
        if self.model.config.vocab_size < shard_vocab:
            raise LLMCoreError(f"model vocab size {self.model.config.vocab_size} is smaller than the shards' "
                               f"tokenizer vocab {shard_vocab}; use a model made for this tokenizer")
        if cfg.seq_len > self.model.config.max_position_embeddings:
            raise LLMCoreError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                               f"{self.model.config.max_position_embeddings}")

        mode = "pairs" if stage == "dpo" else cfg.packing
        n_docs = len(self.reader)
        if cfg.eval_docs >= n_docs:
            raise LLMCoreError(f"--eval-docs {cfg.eval_docs} leaves no training documents (the shards hold {n_docs})")
        if cfg.eval_docs > 0:
            train_idx, eval_idx = train_eval_split(n_docs, cfg.eval_docs, cfg.seed)
        else:
            train_idx, eval_idx = None, None
        self.mode, self.eval_idx = mode, eval_idx

        def loader(idx: Any, rank: int, world: int, shuffle: bool = True) -> Any:
            return make_loader(self.reader, mode, cfg.seq_len, cfg.micro_batch_size, seed=cfg.seed,
                               rank=rank, world_size=world, doc_indices=idx, shuffle=shuffle)

        self._make_loader = loader
        self.loader = loader(train_idx, self.rank, self.world)
        steps_per_epoch = self.loader.steps_per_epoch // self.accum
        if steps_per_epoch < 1:
            raise LLMCoreError(
                f"--data gives only {self.loader.steps_per_epoch} micro batches per process per epoch, fewer than "
                f"the {self.accum} one global batch needs; lower --global-batch-size or --seq-len")
        self.steps_per_epoch = steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, int(math.floor(float(cfg.epochs or 1) * steps_per_epoch)))

        # -- objective -------------------------------------------------------------------------
        if stage == "dpo":
            self.objective: Any = self._dpo_objective(train_idx)
        else:
            self.objective = LMObjective()

        # -- engine --------------------------------------------------------------------------------
        if self.distributed:
            from llmcore.train.engine import DeepSpeedEngine

            self.engine: Any = DeepSpeedEngine(self.model, cfg, self.accum)
        else:
            self.engine = PlainEngine(self.model, cfg)

        self.step, self.tokens = 0, 0
        self.last_eval: float | None = None
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        barrier()
        self.ckpts.clean_partial()
        if self.rank == 0:
            self._write_run_files()

    # ------------------------------------------------------------------------------------------
    def _build_model(self, shard_vocab: int) -> torch.nn.Module:
        from llmcore.checkpoint import load_model
        from llmcore.model import LLM, ModelConfig

        cfg = self.cfg
        if self.resume_from is not None:
            # The weights come from the checkpoint (and the engine state for DeepSpeed).
            model, _ = load_model(self.resume_from, attn_backend=cfg.attn_backend, with_tokenizer=False)
        elif cfg.init:
            model, init_tok = load_model(cfg.init, attn_backend=cfg.attn_backend, with_tokenizer=True)
            if init_tok is not None:
                try:
                    self.reader.check_tokenizer(init_tok)
                except LLMCoreError as err:
                    raise LLMCoreError(f"--init {cfg.init} was trained with another tokenizer than --data: {err}") \
                        from None
        else:
            special = self.reader.manifest.get("tokenizer", {}).get("special_ids", {})
            mcfg = ModelConfig.from_preset(
                cfg.model, attn_backend=cfg.attn_backend, vocab_size=shard_vocab,
                pad_token_id=int(special.get("pad", 0)), bos_token_id=int(special.get("bos", 1)),
                eos_token_id=int(special.get("eos", 2)))
            # Same seed on every process: ZeRO partitions one identical initial model.
            torch.manual_seed(cfg.seed)
            model = LLM(mcfg)
        model = model.float()
        model.train()
        return model

    def _dpo_objective(self, train_idx: Any) -> DPOObjective:
        from llmcore.checkpoint import load_model

        cfg = self.cfg
        ref, _ = load_model(cfg.init, attn_backend=cfg.attn_backend, with_tokenizer=False)  # type: ignore[arg-type]
        ref = ref.float().eval()
        ref.requires_grad_(False)
        average = cfg.dpo_logp == "mean"
        autocast = lambda: autocast_ctx(cfg.dtype)  # noqa: E731
        if cfg.ref_logps == "model":
            return DPOObjective(cfg.beta, average, ref_model=ref, autocast=autocast)
        # One pass over every row this run can see (all ranks' rows: shuffling moves rows between ranks
        # from epoch to epoch), then the reference model is dropped.
        cache: dict[bytes, float] = {}
        for idx in [train_idx] + ([self.eval_idx] if self.eval_idx is not None else []):
            ld = self._make_loader(idx, 0, 1, shuffle=False)
            batches = (next(ld) for _ in range(ld.steps_per_epoch))
            cache.update(precompute_reference(ref, batches, average, autocast))
        del ref
        return DPOObjective(cfg.beta, average, ref_cache=cache)

    def _restore(self, step_dir: Path) -> None:
        trainer_state, loader_state, rng = self.ckpts.load_side_state(step_dir)
        self.engine.load_state(step_dir)
        self.loader.load_state_dict(loader_state)
        set_rng_state(rng)
        self.step = int(trainer_state["step"])
        self.tokens = int(trainer_state["tokens"])
        self.last_eval = trainer_state.get("eval_loss")
        if self.rank == 0:
            MetricsLogger.truncate(self.run_dir, self.step)

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "config.json", {
            "stage": self.stage,
            "model": self.model.config.to_dict(),
            "train": self.cfg.to_dict(),
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "engine": self.engine.kind,
            "world_size": self.world,
            "accumulation": self.accum,
            "total_steps": self.total_steps,
        })
        tok_dir = self.run_dir / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            tmp = self.run_dir / ".tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.tokenizer.save(tmp)
            os.replace(tmp, tok_dir)

    # ------------------------------------------------------------------------------------------
    def _global_sums(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(values)
        if not keys:
            return {}
        stacked = torch.stack([values[k].detach().double().reshape(()) for k in keys])
        stacked = all_sum(stacked)
        return {k: float(v) for k, v in zip(keys, stacked.tolist())}

    def _real_tokens(self, batch: dict[str, Any]) -> int:
        # Documents are [bos] ... [eos]; the pad id only fills padding (and a packed epoch's last row).
        return int((batch["input_ids"] != self.pad_id).sum())

    def train_step(self) -> dict[str, Any]:
        micro = [next(self.loader) for _ in range(self.accum)]
        counts = torch.tensor([sum(self.objective.count(b) for b in micro),
                               sum(self._real_tokens(b) for b in micro)], dtype=torch.float64)
        counts = all_sum(counts)
        denom = max(float(counts[0]), 1.0)
        lr = lr_at(self.step, self.total_steps, self.cfg.lr, self.cfg.min_lr, self.cfg.warmup_steps)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            out = self.objective(self.engine.forward, batch, denom, self.accum, self.world)
            self.engine.backward(out.loss)
            for k, v in out.terms.items():
                sums[k] = sums.get(k, 0) + v.double()
            if i < self.accum - 1:
                self.engine.micro_step_end(False, lr)
        terms = self._global_sums(sums)
        loss = terms["loss"]
        if not math.isfinite(loss):
            self.engine.zero_grad()
            raise TrainingDiverged(self._diverged_msg("loss", loss))
        grad_norm = self.engine.micro_step_end(True, lr)
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise TrainingDiverged(self._diverged_msg("gradient norm", grad_norm))
        self.step += 1
        self.tokens += int(counts[1])
        record: dict[str, Any] = {"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens,
                                  "grad_norm": grad_norm, "epoch": int(getattr(self.loader, "epoch", 0))}
        record.update({k: v for k, v in terms.items() if k != "loss"})
        return record

    def _diverged_msg(self, what: str, value: float) -> str:
        last = None
        try:
            last = self.ckpts.latest()
        except LLMCoreError:
            pass
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        return (f"{what} is {value} at step {self.step + 1}; training stopped and nothing was saved from this "
                f"state ({where}). Lower --lr or check the data.")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss on the held-out documents (mean over all their loss tokens / pairs, all processes)."""
        assert self.eval_idx is not None
        self.engine.train(False)
        try:
            ld = self._make_loader(self.eval_idx, self.rank, self.world, shuffle=False)
            sums: dict[str, torch.Tensor] = {}
            count = 0
            for step in range(ld.steps_per_epoch):
                batch = only_rows(next(ld), ld.unwrapped_rows(step))
                if batch is None:
                    continue
                count += self.objective.count(batch)
                out = self.objective(self.engine.forward, batch, 1.0, 1, 1)
                for k, v in out.terms.items():
                    if k not in ("loss", "aux_loss"):
                        sums[k] = sums.get(k, 0) + v.double()
            sums["_count"] = torch.tensor(float(count), dtype=torch.float64)
            totals = self._global_sums(sums)
        finally:
            self.engine.train(True)
        n = max(totals.pop("_count"), 1.0)
        main_key = "dpo_loss" if self.stage == "dpo" else "ce_loss"
        res = {"eval_loss": totals.pop(main_key) / n}
        for k, v in totals.items():
            res[f"eval_{k}"] = v / n
        if self.stage != "dpo":
            res["eval_ppl"] = math.exp(min(res["eval_loss"], 50.0))
        return res

    def save(self) -> Path:
        eng = self.engine

        def write_model(d: Path) -> None:
            from llmcore.checkpoint import save_model

            with eng.full_weights() as module:
                if self.rank == 0:
                    save_model(module, d)

        state = {"step": self.step, "tokens": self.tokens, "epoch": int(getattr(self.loader, "epoch", 0)),
                 "stage": self.stage, "total_steps": self.total_steps, "eval_loss": self.last_eval}
        return self.ckpts.save(self.step, write_model, eng.save_state, self.loader.state_dict(), state,
                               self.cfg.keep_last, on_file=self.hooks.on_save_file)

    def run(self) -> RunSummary:
        cfg = self.cfg
        wandb_cfg = {"project": cfg.wandb_project, "config": {"stage": self.stage, **cfg.to_dict()}} \
            if cfg.wandb else None
        log = MetricsLogger(self.run_dir, self.rank == 0, self.total_steps, self.step, cfg.quiet, wandb_cfg)
        start_step, t_start = self.step, time.perf_counter()
        thr = Throughput()
        run_tokens0 = self.tokens
        record: dict[str, Any] = {}
        last_ckpt: Path | None = self.resume_from
        if self.step >= self.total_steps:
            log.message(f"{self.run_dir} is already at step {self.step} of {self.total_steps}; nothing to do")
        try:
            while self.step < self.total_steps:
                tokens_before = self.tokens
                record = self.train_step()
                thr.add(self.tokens - tokens_before)
                last = self.step == self.total_steps
                stop_now = cfg.stop_after is not None and self.step - start_step >= cfg.stop_after
                if self.step % cfg.log_every == 0 or last or stop_now:
                    record["tokens_per_s"] = thr.take()
                    log.log(record)
                    log.progress(self.step, record["loss"], record["lr"], record["tokens_per_s"],
                                 time.perf_counter() - t_start, self.step - start_step, start_step)
                if self.eval_idx is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    ev = self.evaluate()
                    self.last_eval = ev["eval_loss"]
                    log.log({"step": self.step, "tokens": self.tokens, **ev})
                    log.message(f"step {self.step}: eval_loss {ev['eval_loss']:.4f}")
                    log.plot()
                if (cfg.save_every and self.step % cfg.save_every == 0) or last or stop_now:
                    last_ckpt = self.save()
                    log.plot()
                if self.hooks.on_step is not None:
                    self.hooks.on_step(self.step, record)
                if stop_now:
                    break
        finally:
            log.plot()
            log.close()
        elapsed = time.perf_counter() - t_start
        summary = RunSummary(
            stage=self.stage, run_dir=self.run_dir, steps=self.step, total_steps=self.total_steps,
            tokens=self.tokens, loss=float(record.get("loss", float("nan"))), eval_loss=self.last_eval,
            tokens_per_s=(self.tokens - run_tokens0) / max(elapsed, 1e-9), elapsed_s=elapsed,
            checkpoint=last_ckpt, last_record=record)
        if self.rank == 0:
            print(summary.line(), flush=True)
        return summary


def train(stage: str, cfg: TrainConfig, hooks: TrainHooks | None = None) -> RunSummary:
    """Train one stage into `cfg.out`; returns the summary. Raises LLMCoreError on user errors and
    TrainingDiverged (an LLMCoreError) when the loss stops being finite.

    With `cfg.deepspeed` the process joins torch.distributed and stays in the group, so one process
    can run several stages (DeepSpeed caches its groups; it cannot re-create them in a process). A
    group this process made for itself (no launcher) is destroyed at interpreter exit; under a
    launcher the CLI ends it with `shutdown_distributed()` and os._exit."""
    cfg = cfg.resolved(stage)
    trainer = Trainer(stage, cfg, hooks)
    return trainer.run()


def shutdown_distributed() -> None:
    """Destroy the process group if one is up (call before exiting a DeepSpeed run)."""
    d = _dist()
    if d is not None:
        try:
            d.barrier()
        except Exception:
            pass
        d.destroy_process_group()

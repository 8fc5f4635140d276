"""The one training loop. Stages differ only in what their registry object says (objective, shard
kind, loader mode); the loop never asks a stage its name.

Building a run is one straight sequence of named steps (`Trainer.from_config`):
engine (device, process group, precision) -> run dir -> shards -> tokenizer -> model -> data ->
objective -> engine.prepare(model) -> restore -> run files.

A step: take `accum` micro batches from the device feed, count the loss items of the whole global
batch (all processes; counted on the host copies, so no device sync), run forward/backward per
micro batch with the loss normalised by that global count, check the loss is finite, then let the
engine clip and step with the scheduled LR. Logging, eval and checkpoints happen between steps, so
a checkpoint always holds a state between two global batches and `--resume` continues with
exactly the next one.

Host syncs: on CPU every step's loss is read at once (it costs nothing), so a NaN stops the run
before its optimizer step. On CUDA the step's values stay on the device until the next log point
(`--log-every`), where they are read, checked and logged together; a non-finite loss then stops
the run naming the first bad step, and nothing from that state is ever saved (every save and eval
is preceded by a read).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from llmcore.errors import LLMCoreError
from llmcore.io import write_json
from llmcore.train.checkpointing import CheckpointManager, RunDirLock, set_rng_state
from llmcore.train.config import TrainConfig
from llmcore.train.engine import make_engine
from llmcore.train.evaluation import eval_metrics, eval_sums
from llmcore.train.feed import DeviceFeed
from llmcore.train.metrics import MetricsLogger, format_duration
from llmcore.train.objectives import perplexity
from llmcore.train.protocols import Engine, ModelHook, Objective
from llmcore.train.speed import Throughput, flops_per_token, peak_memory_gb, peak_tflops
from llmcore.train.stages import ObjectiveContext, Stage, get_stage

PROGRESS_EVERY_S = 30.0  # in a pipe, a progress line at least this often, whatever --log-every says


class TrainingDiverged(LLMCoreError):
    """The loss (or gradient norm) became NaN/Inf; the run stopped without saving the bad state."""


class TrainingInterrupted(LLMCoreError):
    """SIGINT/SIGTERM stopped the run between two steps, after it saved a checkpoint there.

    `exit_code` is the shell's convention for the signal (130 for SIGINT, 143 for SIGTERM);
    `checkpoint` is the step dir that `--resume` continues from."""

    def __init__(self, signum: int, step: int, total_steps: int, checkpoint: Path | None, run_dir: Path) -> None:
        self.signum, self.step, self.total_steps = signum, step, total_steps
        self.checkpoint, self.run_dir = checkpoint, run_dir
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name
        saved = f"checkpoint saved in {checkpoint}" if checkpoint else "no checkpoint was saved"
        super().__init__(f"{name} at step {step}/{total_steps}: {saved}; continue with --resume")


class StopSignals:
    """SIGINT and SIGTERM ask the run to stop after the current step (`signum` is set); a second
    one ends it at once (KeyboardInterrupt). Installed only in the main thread (Python's rule);
    the previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        logging.getLogger(__name__).warning(
            "%s: finishing this step and saving a checkpoint (again to quit at once)", signal.Signals(signum).name
        )

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


@dataclass
class TrainHooks:
    """Callbacks for tests and embedding programs (the demo)."""

    on_step: Callable[[int, dict[str, Any]], None] | None = None  # after each logged step (step, record)
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
    reports_perplexity: bool = True
    vocab_size: int | None = None  # for the reference point: a uniform guess over the vocab scores ln(V)
    # Preference stages: the last step's reward accuracy and margin (TRL's rewards/accuracy, rewards/margin)
    # and the held-out ones when evaluated; the loss of a model that cannot tell the pair apart is ln 2.
    rewards: dict[str, float] | None = None
    eval_step: int | None = None  # the step eval_loss was measured at (an earlier one after --stop-after)

    def line(self) -> str:
        ev = ""
        if self.eval_loss is not None:
            ev = f" eval_loss {self.eval_loss:.4f}"
            if self.reports_perplexity:
                ev += f" (ppl {perplexity(self.eval_loss):.2f})"
            if self.eval_step is not None and self.eval_step != self.steps:
                ev += f" [at step {self.eval_step}]"
        ref = ""
        if self.reports_perplexity and self.vocab_size:
            ref = f" (a uniform guess scores ln {self.vocab_size} = {math.log(self.vocab_size):.2f})"
        elif self.rewards is not None:
            ref = f" (ln 2 = {math.log(2):.4f} = chance)" + reward_words(self.rewards)
        return (
            f"done: {self.stage} {self.steps}/{self.total_steps} steps, {self.tokens:,} tokens, "
            f"loss {self.loss:.4f}{ev}{ref}, {self.tokens_per_s:,.0f} tok/s, {format_duration(self.elapsed_s)} "
            f"-> {self.run_dir}"
        )


def reward_words(rewards: dict[str, float]) -> str:
    """`, reward accuracy 55% (chance 50%), margin +0.0123` from a record's DPO terms (eval ones too)."""
    out = ""
    for prefix, label in (("", "reward accuracy"), ("eval_", "eval reward accuracy")):
        acc, margin = rewards.get(f"{prefix}rewards/accuracy"), rewards.get(f"{prefix}rewards/margin")
        if acc is not None and math.isfinite(acc):
            out += f", {label} {acc:.0%}" + (" (chance 50%)" if not prefix else "")
            if margin is not None and math.isfinite(margin):
                out += f", margin {margin:+.4f}"
    return out


def lr_at(
    step: int,
    total_steps: int,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to `lr`, then cosine down to `min_lr`
    at the last step; or `schedule="wsd"`: warmup, flat at `lr`, then linear down to `min_lr` over
    the last D = max(1, round(decay_fraction * total_steps)) steps (never inside the warmup), reaching
    `min_lr` at the last step. One function for both engines; other optimizer groups (Muon) get their
    own base lr times lr_at / lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "wsd":
        start = max(total_steps - max(1, round(decay_fraction * total_steps)), warmup_steps)
        if step < start:
            return lr
        return lr - (lr - min_lr) * min((step - start + 1) / max(total_steps - start, 1), 1.0)
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# the named build steps, in the order Trainer.from_config runs them


def find_resume_point(cfg: TrainConfig, ckpts: CheckpointManager, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (with --resume): the newest step dir whose manifest
    verifies, with or without `latest` naming it; newer ones that do not verify are reported and
    left alone. None for a fresh run. A fresh run into a run dir that holds any checkpoint is
    refused, and so is --resume when checkpoints exist but none is intact."""
    if not ckpts.has_checkpoints():
        if cfg.resume and (run_dir / "config.json").is_file() and ckpts.rank == 0:
            logging.getLogger(__name__).warning(
                "--resume: %s has no checkpoint yet (its run stopped before the first save); starting at step 0",
                run_dir,
            )
        return None
    if not cfg.resume:
        names = ", ".join(f"step-{s}" for s in ckpts.steps()) or "checkpoints/latest"
        raise LLMCoreError(
            f"--out {run_dir} already holds checkpoints ({names}); pass --resume to continue it or choose another --out"
        )
    found, skipped = ckpts.resume_point()
    if ckpts.rank == 0:
        for name, why in skipped:
            logging.getLogger(__name__).warning("resume: skipping checkpoints/%s: %s", name, why)
    if found is None:
        detail = "; ".join(f"{n}: {w}" for n, w in skipped) or "no step dirs"
        raise LLMCoreError(f"--resume: {run_dir} has no intact checkpoint ({detail}); nothing was changed")
    return found


def check_resume_settings(cfg: TrainConfig, stage: Stage, run_dir: Path, rank: int) -> None:
    """--resume against the run's config.json (`llmcore.train.config.check_resume`): refuses a change
    that would alter the run, and says which accepted changes apply from here on."""
    import json

    from llmcore.train.config import check_resume

    log = logging.getLogger(__name__)
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        if rank == 0:
            log.warning(
                "--resume: cannot read %s (%s), so the settings of this command cannot be compared with the "
                "run's; check they are the same",
                path,
                type(err).__name__,
            )
        return
    if not isinstance(saved, dict):
        return
    for change in check_resume(saved, stage.name, cfg, run_dir):
        if rank == 0:
            log.warning("--resume: %s", change)


def open_shards(cfg: TrainConfig, stage: Stage) -> Any:
    """The shard reader of --data, which must hold the stage's shard kind."""
    from llmcore.data_prep.shards import ShardReader

    reader = ShardReader(cfg.data)
    if reader.kind not in stage.shard_kinds:
        raise LLMCoreError(
            f"--data {cfg.data} holds {reader.kind} shards, but `train {stage.name}` needs "
            f"{' or '.join(stage.shard_kinds)} shards (make them with `llmcore prep "
            f"{stage.shard_kind}`)"
        )
    reader.verify()  # checksums, counts, ids below the vocab: a bad shard is one line naming it, before training
    return reader


def resolve_tokenizer(cfg: TrainConfig, reader: Any, run_dir: Path, resuming: bool) -> Any:
    """The run's tokenizer: --tokenizer, else the resumed run's or --init run's copy, else the path the
    shard manifest records. It must be the one the shards were made with."""
    from llmcore.checkpoint import find_tokenizer_dir, resolve_checkpoint
    from llmcore.data_prep.tokenizer import load_tokenizer

    candidates: list[tuple[str, Path]] = []
    if cfg.tokenizer:
        candidates.append(("--tokenizer", Path(cfg.tokenizer)))
    if resuming and (run_dir / "tokenizer" / "tokenizer.json").is_file():
        candidates.append(("the run dir", run_dir / "tokenizer"))
    if cfg.init:
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
            tok = load_tokenizer(path)
            try:
                reader.check_tokenizer(tok)
            except LLMCoreError as err:
                raise LLMCoreError(f"tokenizer from {source} ({path}) does not match --data: {err}") from None
            return tok
        if source == "--tokenizer":
            raise LLMCoreError(f"--tokenizer {path}: no tokenizer.json there")
    raise LLMCoreError(
        f"cannot find the tokenizer of {reader.path} (manifest names {manifest_path!r}); pass --tokenizer DIR"
    )


def build_model(
    cfg: TrainConfig, reader: Any, resume_from: Path | None, model_hook: ModelHook | None = None
) -> torch.nn.Module:
    """Fresh weights from a preset or the --init run's, then the stage's model hook (`convert`:
    e.g. adapters on a frozen base); resuming, the hook loads the checkpoint's model back. fp32
    master weights on the CPU (the engine moves them to its device)."""
    from llmcore.checkpoint import load_model
    from llmcore.model import LLM, ModelConfig
    from llmcore.train.stages import FullWeights

    hook: ModelHook = model_hook if model_hook is not None else FullWeights(cfg)
    shard_vocab = int(reader.manifest.get("tokenizer", {}).get("vocab_size", 0))
    if resume_from is not None:
        # The weights come from the checkpoint (and the engine state for DeepSpeed), as the hook saved them.
        model = hook.load(resume_from)
    elif cfg.init:
        model, init_tok = load_model(cfg.init, attn_backend=cfg.attn_backend, with_tokenizer=True)
        if init_tok is not None:
            try:
                reader.check_tokenizer(init_tok)
            except LLMCoreError as err:
                raise LLMCoreError(f"--init {cfg.init} was trained with another tokenizer than --data: {err}") from None
    else:
        special = reader.manifest.get("tokenizer", {}).get("special_ids", {})
        mcfg = ModelConfig.from_preset(
            cfg.model,
            attn_backend=cfg.attn_backend,
            vocab_size=shard_vocab,
            pad_token_id=int(special.get("pad", 0)),
            bos_token_id=int(special.get("bos", 1)),
            eos_token_id=int(special.get("eos", 2)),
        )
        # Same seed on every process: ZeRO partitions one identical initial model.
        torch.manual_seed(cfg.seed)
        model = LLM(mcfg)
    if resume_from is None:
        model = hook.convert(model)
    if model.config.vocab_size < shard_vocab:
        raise LLMCoreError(
            f"model vocab size {model.config.vocab_size} is smaller than the shards' "
            f"tokenizer vocab {shard_vocab}; use a model made for this tokenizer"
        )
    if cfg.seq_len > model.config.max_position_embeddings:
        raise LLMCoreError(
            f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}"
        )
    model = model.float()
    model.train()
    return model


@dataclass
class RunData:
    """The run's split and loaders: `make_loader(doc_indices, rank, world, shuffle=True)`."""

    train_idx: Any
    eval_idx: Any
    make_loader: Callable[..., Any]
    loader: Any  # this rank's training loader
    accum: int
    steps_per_epoch: int  # optimizer steps
    total_steps: int


def stage_loaders(cfg: TrainConfig, stage: Stage, reader: Any) -> Callable[..., Any]:
    """A run's loader factory `(doc_indices, rank, world, shuffle=True) -> Loader` over `reader`: the
    stage's row layout (`stage.loader_mode(cfg)`) at the run's seq len, micro batch size, seed and
    --on-long. Training, the trainer's eval and `llmcore eval` all take their loaders from it."""
    from llmcore.data_prep.loaders import make_loader

    mode = stage.loader_mode(cfg)

    def loader_for(idx: Any, r: int, w: int, shuffle: bool = True) -> Any:
        return make_loader(
            reader,
            mode,
            cfg.seq_len,
            cfg.micro_batch_size,
            seed=cfg.seed,
            rank=r,
            world_size=w,
            doc_indices=idx,
            shuffle=shuffle,
            on_long=cfg.on_long,
        )

    return loader_for


def build_data(cfg: TrainConfig, stage: Stage, reader: Any, rank: int, world: int) -> RunData:
    """Batch arithmetic, the held-out split and this rank's loader; the run's length in steps."""
    from llmcore.data_prep.loaders import train_eval_split

    if cfg.global_batch_size % (cfg.micro_batch_size * world):
        raise LLMCoreError(
            f"--global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
            f"{cfg.micro_batch_size} x {world} process(es) = {cfg.micro_batch_size * world}"
        )
    accum = cfg.global_batch_size // (cfg.micro_batch_size * world)
    n_docs = len(reader)
    if cfg.eval_docs >= n_docs:
        raise LLMCoreError(f"--eval-docs {cfg.eval_docs} leaves no training documents (the shards hold {n_docs})")
    train_idx, eval_idx = train_eval_split(n_docs, cfg.eval_docs, cfg.seed) if cfg.eval_docs > 0 else (None, None)
    loader_for = stage_loaders(cfg, stage, reader)
    loader = loader_for(train_idx, rank, world)
    if loader.docs_without_loss == len(loader.docs):
        raise LLMCoreError(
            f"--data {cfg.data}: no conversation keeps an assistant token within --seq-len "
            f"{cfg.seq_len} (each is truncated at the end to fit a row); raise --seq-len"
        )
    steps_per_epoch = loader.steps_per_epoch // accum
    if steps_per_epoch < 1:
        raise LLMCoreError(
            f"--data gives only {loader.steps_per_epoch} micro batches per process per epoch, fewer than "
            f"the {accum} one global batch needs; lower --global-batch-size or --seq-len"
        )
    if cfg.max_steps is not None:
        total = cfg.max_steps
    else:
        total = max(1, int(math.floor(float(cfg.epochs or 1) * steps_per_epoch)))
    return RunData(train_idx, eval_idx, loader_for, loader, accum, steps_per_epoch, total)


def build_objective(
    stage: Stage, cfg: TrainConfig, engine: Engine, data: RunData, model: Any = None, tokenizer: Any = None
) -> Objective:
    return stage.build_objective(
        ObjectiveContext(
            cfg=cfg,
            autocast=engine.autocast,
            device=engine.device,
            make_loader=data.make_loader,
            train_idx=data.train_idx,
            eval_idx=data.eval_idx,
            model=model,
            tokenizer=tokenizer,
        )
    )


def write_run_files(
    run_dir: Path, stage: Stage, cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any, engine: Engine, data: RunData
) -> None:
    """config.json (what this run is) and the tokenizer copy, so the run dir alone serves generate,
    chat, eval and export."""
    from llmcore.io import atomic_dir

    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        run_dir / "config.json",
        {
            "stage": stage.name,
            "model": model.config.to_dict(),
            "train": cfg.to_dict(),
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "engine": engine.kind,
            "device": str(engine.device),
            "world_size": engine.world,
            "accumulation": data.accum,
            "total_steps": data.total_steps,
        },
    )
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        with atomic_dir(tok_dir) as tmp:
            tokenizer.save(tmp)


def resolve_backend(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """`--attn-backend auto` made concrete for the engine's device; triton needs CUDA or the
    Triton interpreter (TRITON_INTERPRET=1, tests only)."""
    import dataclasses

    from llmcore.common import resolve_attn_backend

    return dataclasses.replace(cfg, attn_backend=resolve_attn_backend(cfg.attn_backend, device, strict=True))


# ----------------------------------------------------------------------------------------------


class Trainer:
    """A built run: `Trainer.from_config(stage, cfg)` makes it, `run()` trains."""

    def __init__(
        self,
        stage: Stage,
        cfg: TrainConfig,
        engine: Engine,
        run_dir: Path,
        ckpts: CheckpointManager,
        resume_from: Path | None,
        reader: Any,
        tokenizer: Any,
        model: torch.nn.Module,
        data: RunData,
        objective: Objective,
        hooks: TrainHooks,
        model_hook: ModelHook | None = None,
    ) -> None:
        from llmcore.train.stages import FullWeights

        self.stage, self.cfg, self.engine = stage, cfg, engine
        # How checkpoints hold the weights (the stage's hook: full weights, or LoRA's adapters).
        self.model_hook: ModelHook = model_hook if model_hook is not None else FullWeights(cfg)
        self.run_dir, self.ckpts, self.resume_from = run_dir, ckpts, resume_from
        self.reader, self.tokenizer, self.model = reader, tokenizer, model
        self.data, self.objective, self.hooks = data, objective, hooks
        self.rank, self.world, self.accum = engine.rank, engine.world, data.accum
        self.total_steps, self.steps_per_epoch = data.total_steps, data.steps_per_epoch
        self.eval_idx = data.eval_idx
        self.pad_id = int(tokenizer.pad_id)
        self.feed = DeviceFeed(data.loader, engine.device, self._host_stats)
        self.step, self.tokens = 0, 0
        self.last_eval: float | None = None
        self.last_eval_step: int | None = None  # the step last_eval was measured at
        # CPU: read every step (free); CUDA: keep values on the device until a log point.
        self.sync_every = 1 if engine.device.type == "cpu" else cfg.log_every
        self._pending: list[dict[str, Any]] = []
        self.last_record: dict[str, Any] | None = None  # the newest step record read (for the summary)
        self.last_eval_record: dict[str, Any] | None = None
        self.lock: RunDirLock | None = None  # the run dir's writer lock (rank 0), released when run() ends
        self._last_save_t = time.monotonic()  # --save-minutes counts from here
        self.flops_per_token = flops_per_token(model.config, cfg.seq_len)
        self.peak_tflops, self.device_name = peak_tflops(engine.device, cfg.peak_tflops)

    @classmethod
    def from_config(cls, stage: str | Stage, cfg: TrainConfig, hooks: TrainHooks | None = None) -> "Trainer":
        st = get_stage(stage) if isinstance(stage, str) else stage
        st.check_inputs(cfg)  # before joining a process group or locking (and creating) the run dir
        engine = make_engine(cfg)
        cfg = resolve_backend(cfg, engine.device)
        engine.cfg = cfg
        # One writer per run dir, taken before anything in it is read or changed (rank 0 holds it
        # for the whole job; the other ranks write only inside checkpoints rank 0 coordinates).
        lock = RunDirLock(Path(cfg.out)).acquire() if engine.rank == 0 else None
        try:
            trainer = cls._build(st, cfg, engine, hooks)
        except BaseException:
            if lock is not None:
                lock.release(failed=True)
            raise
        trainer.lock = lock
        return trainer

    @classmethod
    def _build(cls, st: Stage, cfg: TrainConfig, engine: Engine, hooks: TrainHooks | None) -> "Trainer":
        run_dir = Path(cfg.out)
        ckpts = CheckpointManager(run_dir, engine.rank, engine.world, engine.barrier)
        resume_from = find_resume_point(cfg, ckpts, run_dir)
        if resume_from is not None:
            check_resume_settings(cfg, st, run_dir, engine.rank)  # before anything in the run dir changes
        reader = open_shards(cfg, st)
        tokenizer = resolve_tokenizer(cfg, reader, run_dir, resume_from is not None)
        model_hook = st.model_hook(cfg)
        model = build_model(cfg, reader, resume_from, model_hook)
        data = build_data(cfg, st, reader, engine.rank, engine.world)
        objective = build_objective(st, cfg, engine, data, model, tokenizer)
        engine.prepare(model, data.accum)
        trainer = cls(
            st,
            cfg,
            engine,
            run_dir,
            ckpts,
            resume_from,
            reader,
            tokenizer,
            model,
            data,
            objective,
            hooks or TrainHooks(),
            model_hook,
        )
        if resume_from is not None:
            trainer.restore(resume_from)
        elif engine.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        engine.barrier()
        ckpts.clean_partial()
        if engine.rank == 0:
            write_run_files(run_dir, st, cfg, model, tokenizer, engine, data)
        return trainer

    # ------------------------------------------------------------------------------------------
    def restore(self, step_dir: Path) -> None:
        trainer_state, loader_state, rng = self.ckpts.load_side_state(step_dir, self.data.loader)
        self.engine.load_state(step_dir)
        self.feed.load_state_dict(loader_state)
        set_rng_state(rng)
        self.step = int(trainer_state["step"])
        self.tokens = int(trainer_state["tokens"])
        self.last_eval = trainer_state.get("eval_loss")
        self.last_eval_step = trainer_state.get("eval_step")
        if self.rank == 0:
            MetricsLogger.truncate(self.run_dir, self.step)

    def _host_stats(self, batch: dict[str, Any]) -> dict[str, int]:
        # Documents are [bos] ... [eos]; the pad id only fills padding (and a packed epoch's last row).
        return {"count": self.objective.count(batch), "real": int((batch["input_ids"] != self.pad_id).sum())}

    def _global_sums(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each value summed over processes, as float64 device tensors (no host read)."""
        keys = sorted(values)
        if not keys:
            return {}
        stacked = torch.stack([values[k].detach().double().reshape(()) for k in keys])
        stacked = self.engine.all_sum(stacked)
        return dict(zip(keys, stacked.unbind()))

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its record (values may still be device tensors, see `_read`)."""
        micro = [next(self.feed) for _ in range(self.accum)]
        # Host numbers from the feed's CPU copies: no device read for one process. Several processes
        # need the global count before the first forward: one all-reduce and one read per step.
        count, real = sum(s["count"] for _, s in micro), sum(s["real"] for _, s in micro)
        if self.world > 1:
            counts = torch.tensor([count, real], dtype=torch.float64, device=self.engine.device)
            count, real = (int(x) for x in self.engine.all_sum(counts).tolist())
        denom = max(float(count), 1.0)
        lr = lr_at(
            self.step,
            self.total_steps,
            self.cfg.lr,
            self.cfg.min_lr,
            self.cfg.warmup_steps,
            self.cfg.lr_schedule,
            self.cfg.decay_fraction,
        )
        sums: dict[str, torch.Tensor] = {}
        for i, (batch, _) in enumerate(micro):
            out = self.objective(self.engine.forward, batch, denom, self.accum, self.world)
            self.engine.backward(out.loss)
            for k, v in out.terms.items():
                sums[k] = sums.get(k, 0) + v.double()
            if i < self.accum - 1:
                self.engine.micro_step_end(False, lr)
        terms = self._global_sums(sums)
        record: dict[str, Any] = {
            "step": self.step + 1,
            "loss": terms.pop("loss"),
            "lr": lr,
            "tokens": self.tokens + int(real),
            "grad_norm": None,
            "epoch": self.feed.epoch,
            **terms,
        }
        if self.sync_every == 1:
            # Read before the optimizer step: a non-finite loss stops the run with the weights untouched.
            self._check_finite("loss", float(record["loss"]), record["step"], zero_grad=True)
        record["grad_norm"] = self.engine.micro_step_end(True, lr)
        self.step += 1
        self.tokens = record["tokens"]
        return record

    def _check_finite(self, what: str, value: float, step: int, zero_grad: bool = False) -> None:
        if math.isfinite(value):
            return
        if zero_grad:
            self.engine.zero_grad()
        last = None
        try:
            last = self.ckpts.latest()
        except LLMCoreError:
            pass
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise TrainingDiverged(
            f"{what} is {value} at step {step}; training stopped and nothing was saved from this "
            f"state ({where}). Lower --lr or check the data."
        )

    def _read(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Device values of pending records as Python floats, checked in step order."""
        out = []
        for rec in records:
            plain = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in rec.items()}
            self._check_finite("loss", plain["loss"], plain["step"])
            if plain["grad_norm"] is not None:
                self._check_finite("gradient norm", plain["grad_norm"], plain["step"])
            out.append(plain)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss on the held-out documents (mean over all their loss tokens / pairs, all processes):
        `llmcore.train.evaluation`, the loop `llmcore eval` runs too.

        Runs the model uncompiled even under --compile (`force_eager`): no-grad, eval mode and the
        trimmed last batch are each a new guard, so the compiled training graph would recompile
        (20-60 s per graph on a GPU) for a pass that is run rarely."""
        assert self.eval_idx is not None
        loader = self.data.make_loader(self.eval_idx, self.rank, self.world, shuffle=False)
        self.engine.train(False)
        try:
            with torch.compiler.set_stance("force_eager"):
                sums = eval_sums(self.objective, self.engine.forward, loader, self.engine.device)
        finally:
            self.engine.train(True)
        return eval_metrics(self.stage, {k: float(v) for k, v in self._global_sums(sums).items()})

    def save(self) -> Path:
        eng = self.engine

        def write_model(d: Path) -> None:
            with eng.full_weights() as module:
                if self.rank == 0:
                    self.model_hook.save(module, d)

        state = {
            "step": self.step,
            "tokens": self.tokens,
            "epoch": self.feed.epoch,
            "stage": self.stage.name,
            "total_steps": self.total_steps,
            "eval_loss": self.last_eval,
            "eval_step": self.last_eval_step,
        }
        return self.ckpts.save(
            self.step,
            write_model,
            eng.save_state,
            self.feed.state_dict(),
            state,
            self.cfg.keep_last,
            on_file=self.hooks.on_save_file,
        )

    def plan_lines(self) -> list[str]:
        """What the run will do, said once at the start: steps, tokens per step, tokens in the data and
        the epochs that makes (plus a warning when that repeats the data many times)."""
        loader = self.data.loader
        rows_per_step = self.cfg.global_batch_size
        epochs = self.total_steps / self.steps_per_epoch
        lines = [
            f"{self.stage.name}: {self.total_steps:,} steps x {rows_per_step} rows of {self.cfg.seq_len} tokens "
            f"({rows_per_step * self.cfg.seq_len:,} token slots per step) on {self.engine.device}; the training "
            f"data holds {loader.tokens_per_epoch:,} tokens in {len(loader.docs):,} {self._unit()} = "
            f"{self.steps_per_epoch:,} steps per epoch, so this run makes {epochs:.2f} epochs"
        ]
        if getattr(loader, "long_docs", 0) and loader.mode != "packed":
            # Name --on-long only where this stage's command has it (`train dpo` has not).
            fix = "; --on-long fail refuses them" if "on_long" in self.stage.settings else ""
            lines.append(
                f"note: {loader.long_docs:,} {self._unit()} are longer than a row of {self.cfg.seq_len + 1} "
                f"tokens and are cut (conversations: truncated at the end{fix})"
            )
        if getattr(loader, "docs_without_loss", 0):
            lines.append(
                f"warning: {loader.docs_without_loss:,} conversations keep no assistant token after the cut "
                "and teach nothing; raise --seq-len"
            )
        if self.step:
            lines.append(f"resumed from step {self.step} (checkpoint {self.resume_from})")
        if epochs > self.cfg.repeat_warning:
            lines.append(
                f"warning: the run passes over its data {epochs:.1f} times (more than --repeat-warning "
                f"{self.cfg.repeat_warning:g}); a small model memorises repeated data: lower --max-steps or "
                "--epochs, or add data"
            )
        return lines

    def _chance_loss(self) -> float | None:
        """ln 2 for a preference objective (its loss is -log sigmoid of the reward margin, which is
        ln 2 while the policy cannot tell chosen from rejected, as at the start, where it equals the
        reference); None for the others (their summary names ln V instead)."""
        return math.log(2) if self.stage.loss_unit == "nats/pair" else None

    def _unit(self) -> str:
        return "pairs" if self.data.loader.mode == "pairs" else "documents"

    def _stop_or_save_due(self, stop: StopSignals, at_sync: bool) -> tuple[int | None, bool]:
        """(the signal that asks the run to stop, or None; whether --save-minutes has passed since the
        last save). One process decides alone, every step. Several must agree, because a save is
        collective: they combine their flags with one all-reduce at the steps where all of them read
        their values anyway (`at_sync` is the same on every rank), so a signal that reached only some
        processes, or clocks that differ, still stop or save all of them at the same step."""
        time_due = bool(self.cfg.save_minutes) and time.monotonic() - self._last_save_t >= self.cfg.save_minutes * 60
        signum = stop.signum
        if self.world == 1:
            return signum, time_due
        if not at_sync:
            return None, False
        flags = torch.tensor(
            [float(signum is not None), float(time_due)], dtype=torch.float64, device=self.engine.device
        )
        flags = self.engine.all_sum(flags).cpu()
        return ((signum or signal.SIGTERM) if flags[0] > 0 else None), bool(flags[1] > 0)

    def _first_step_line(self, first_s: float) -> str:
        """After the first step of this invocation: its time and what the rest takes at that pace."""
        left = self.total_steps - self.step
        line = (
            f"first step took {first_s:.2f} s; at that pace the {left:,} remaining steps take about "
            f"{format_duration(first_s * left)} (the first step includes start-up; the progress lines refine it)"
        )
        if self.engine.device.type == "cpu" and first_s * left > 3600 and self.cfg.model not in (None, "tiny"):
            # The README's main command on a laptop: say so now, not after a day.
            line += f"; {self.cfg.model} is slow on a CPU: --model tiny trains in minutes, a GPU runs this one"
        return line

    def _speed_fields(self, tokens_per_s: float, step_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tokens_per_s": tokens_per_s,
            "step_s": step_s,
            "peak_mem_gb": round(peak_memory_gb(self.engine.device), 3),
        }
        if self.peak_tflops:
            # Per process: each rank's tokens on its own device.
            out["mfu"] = tokens_per_s / max(self.world, 1) * self.flops_per_token / (self.peak_tflops * 1e12)
        return out

    def run(self) -> RunSummary:
        cfg = self.cfg
        wandb_cfg = (
            {"project": cfg.wandb_project, "config": {"stage": self.stage.name, **cfg.to_dict()}} if cfg.wandb else None
        )
        mc = self.model.config
        n_params = sum(p.numel() for p in self.model.parameters())
        title = (
            f"{self.run_dir.name}: {self.stage.name}, {n_params / 1e6:.1f}M-parameter model "
            f"(d{mc.hidden_size} x {mc.num_hidden_layers} layers), {self.device_name}"
        )
        metrics = MetricsLogger(
            self.run_dir,
            self.rank == 0,
            self.total_steps,
            self.step,
            cfg.quiet,
            wandb_cfg,
            title=title,
            panels=self.stage.plot_panels,
            loss_unit=self.stage.loss_unit,
            chance_loss=self._chance_loss(),
        )
        start_step, t_start = self.step, time.perf_counter()
        thr = Throughput(self.engine.device)
        run_tokens0 = self.tokens
        last_loss = float("nan")
        last_ckpt: Path | None = self.resume_from
        if self.step >= self.total_steps:
            metrics.message(f"{self.run_dir} is already at step {self.step} of {self.total_steps}; nothing to do")
        else:
            for line in self.plan_lines():
                (metrics.warning if line.startswith("warning:") else metrics.message)(line)
        if self.peak_tflops is None and self.engine.device.type == "cuda":
            metrics.warning(f"mfu: the bf16 peak of {self.device_name} is not known; pass --peak-tflops to log it")
        stop = StopSignals()
        self._last_save_t = time.monotonic()
        last_progress_t = time.monotonic()
        timed_progress = metrics.enabled and not cfg.quiet and metrics.bar is None  # a pipe or a job log
        signum: int | None = None
        try:
            stop.__enter__()
            while self.step < self.total_steps:
                tokens_before = self.tokens
                self._pending.append(self.train_step())
                thr.add(self.tokens - tokens_before)
                first = self.step == start_step + 1
                last = self.step == self.total_steps
                stop_now = cfg.stop_after is not None and self.step - start_step >= cfg.stop_after
                log_now = self.step % cfg.log_every == 0 or self.step == 1 or last or stop_now
                eval_now = self.eval_idx is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last)
                save_now = bool(cfg.save_every and self.step % cfg.save_every == 0) or last or stop_now
                sync = log_now or eval_now or save_now or first or self.step % self.sync_every == 0
                signum, time_due = self._stop_or_save_due(stop, sync)
                if signum is not None:
                    # Stop here: save this state (between two global batches) and skip the eval.
                    save_now, eval_now = True, False
                save_now = save_now or time_due
                progress_now = timed_progress and time.monotonic() - last_progress_t >= PROGRESS_EVERY_S
                if not (sync or save_now or progress_now):
                    continue
                records = self._read(self._pending)
                self._pending.clear()
                record = records[-1]
                last_loss = record["loss"]
                self.last_record = record
                if log_now:
                    record.update(self._speed_fields(*thr.take()))
                    metrics.log(record)
                if log_now or progress_now:
                    elapsed = time.perf_counter() - t_start
                    rate = record.get("tokens_per_s") if log_now else (self.tokens - run_tokens0) / max(elapsed, 1e-9)
                    metrics.progress(
                        self.step,
                        record["loss"],
                        record["lr"],
                        rate,
                        elapsed,
                        self.step - start_step,
                        extra=reward_words(record).lstrip(", ").replace(" (chance 50%)", ""),
                    )
                    last_progress_t = time.monotonic()
                if first and not last:
                    metrics.message(self._first_step_line(time.perf_counter() - t_start))
                if eval_now:
                    metrics.message(
                        f"step {self.step}: evaluating on {len(self.eval_idx):,} held-out {self._unit()} ..."
                    )
                    ev = self.evaluate()
                    self.last_eval = ev["eval_loss"]
                    self.last_eval_record = ev
                    self.last_eval_step = self.step
                    metrics.log({"step": self.step, "tokens": self.tokens, **ev})
                    metrics.message(f"step {self.step}: eval_loss {ev['eval_loss']:.4f}")
                    metrics.plot()
                if save_now:
                    last_ckpt = self.save()
                    self._last_save_t = time.monotonic()
                    metrics.plot()
                if self.hooks.on_step is not None:
                    self.hooks.on_step(self.step, record)
                if stop_now or signum is not None:
                    break
        finally:
            stop.__exit__()
            self.feed.close()
            metrics.plot()
            metrics.close()
            if self.lock is not None:
                self.lock.release()
        if signum is not None:
            raise TrainingInterrupted(signum, self.step, self.total_steps, last_ckpt, self.run_dir)
        elapsed = time.perf_counter() - t_start
        record, ev_record = self._last_logged()
        if record is not None and not math.isfinite(last_loss):
            last_loss = float(record["loss"])  # nothing ran now (a finished run resumed): the run's last step
        rewards = {k: float(v) for rec in (record, ev_record) if rec for k, v in rec.items() if "rewards/" in k}
        summary = RunSummary(
            stage=self.stage.name,
            run_dir=self.run_dir,
            steps=self.step,
            total_steps=self.total_steps,
            tokens=self.tokens,
            loss=last_loss,
            eval_loss=self.last_eval,
            eval_step=self.last_eval_step,
            tokens_per_s=(self.tokens - run_tokens0) / max(elapsed, 1e-9),
            elapsed_s=elapsed,
            checkpoint=last_ckpt,
            reports_perplexity=self.stage.reports_perplexity,
            vocab_size=int(self.model.config.vocab_size),
            rewards=rewards or None,
        )
        return summary

    def _last_logged(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the newest step record, the newest eval record) of the run so far: this invocation's,
        else metrics.jsonl's (a resumed run that had nothing left to do)."""
        record, ev = self.last_record, self.last_eval_record
        if record is None and self.rank == 0:
            from llmcore.train.metrics import read_metrics

            rows = [r for r in read_metrics(self.run_dir / "metrics.jsonl") if int(r.get("step", 0)) <= self.step]
            steps = [r for r in rows if "loss" in r and "eval_loss" not in r]
            evals = [r for r in rows if "eval_loss" in r]
            record = steps[-1] if steps else None
            ev = ev or (evals[-1] if evals else None)
        return record, ev


def train(stage: str, cfg: TrainConfig, hooks: TrainHooks | None = None) -> RunSummary:
    """Train one stage into `cfg.out`; returns the summary. Raises LLMCoreError on user errors and
    TrainingDiverged (an LLMCoreError) when the loss stops being finite.

    With `cfg.deepspeed` the process joins torch.distributed and stays in the group, so one process
    can run several stages (DeepSpeed caches its groups; it cannot re-create them in a process). A
    group this process made for itself (no launcher) is destroyed at interpreter exit; under a
    launcher the CLI ends it with `shutdown_distributed()` and os._exit."""
    st = get_stage(stage)
    cfg = cfg.resolved(st)
    return st.run(cfg, hooks)

"""CLI: `llmcore train pretrain|sft|dpo` and `llmcore eval`. Flags are parsed here; the work is in
`llmcore.train.train` and `llmcore.evaluate.evaluate`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from llmcore.errors import LLMCoreError

EXAMPLES = {
    "pretrain": "llmcore train pretrain --data shards/pretrain --model minimind2-small --out runs/pre",
    "sft": "llmcore train sft --data shards/sft --init runs/pre --out runs/sft",
    "dpo": "llmcore train dpo --data shards/dpo --init runs/sft --out runs/dpo --beta 0.1",
}


def _distributed_up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _finish_distributed(code: int, message: str | None = None) -> None:
    """End a DeepSpeed process: print, tear the process group down, and leave with os._exit, because
    torch's gloo teardown at interpreter exit aborts some finished processes (SIGABRT)."""
    from llmcore.train.trainer import shutdown_distributed

    if message:
        typer.echo(message, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        shutdown_distributed()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _make_train_command(stage: str) -> Any:
    def command(
        data: Path = typer.Option(..., "--data", help="Shard dir made by `llmcore prep`."),
        out: Path = typer.Option(..., "--out", help="Run dir to create (or continue with --resume)."),
        model: Optional[str] = typer.Option(None, "--model", help="Preset for fresh weights: tiny, minimind2-small, minimind2, minimind2-moe."),
        init: Optional[Path] = typer.Option(None, "--init", help="Run dir or checkpoint to start from (DPO: also the frozen reference)."),
        config: Optional[Path] = typer.Option(None, "--config", help="TOML file with any of these settings; flags override it."),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer dir, when the shard manifest's path is gone."),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per row."),
        micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Rows (DPO: pairs) per forward pass per process."),
        global_batch_size: Optional[int] = typer.Option(None, "--global-batch-size", help="Rows per optimizer step; accumulation = global / (micro x processes)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate."),
        min_lr: Optional[float] = typer.Option(None, "--min-lr", help="Floor of the cosine decay."),
        warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warmup steps."),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW decay of 2-D weights (not norms, biases, embeddings)."),
        grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Max gradient norm (0: off)."),
        epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs)."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 or bf16 (autocast)."),
        packed: Optional[bool] = typer.Option(None, "--packed/--padded", help="Pack documents into full rows (default) or pad one per row."),
        attn_backend: Optional[str] = typer.Option(None, "--attn-backend", help="eager, sdpa or triton."),
        compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
        eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N steps (and at the end)."),
        eval_docs: Optional[int] = typer.Option(None, "--eval-docs", help="Documents held out for evaluation."),
        save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (and at the end)."),
        keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Checkpoints to keep."),
        resume: Optional[bool] = typer.Option(None, "--resume", help="Continue from RUN_DIR's latest checkpoint."),
        wandb: Optional[bool] = typer.Option(None, "--wandb", help="Log to Weights & Biases (offline unless configured)."),
        wandb_project: Optional[str] = typer.Option(None, "--wandb-project", help="wandb project name."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for init, data order and RNG."),
        deepspeed: Optional[Path] = typer.Option(None, "--deepspeed", help="DeepSpeed config, e.g. launch/ds_zero2.json."),
        log_every: Optional[int] = typer.Option(None, "--log-every", help="Write metrics every N steps."),
        beta: Optional[float] = typer.Option(None, "--beta", help="DPO: strength of the KL constraint."),
        dpo_logp: Optional[str] = typer.Option(None, "--dpo-logp", help="DPO: sum (default) or mean log-prob per response."),
        ref_logps: Optional[str] = typer.Option(None, "--ref-logps", help="DPO: model (frozen reference each step) or precompute (one pass, then dropped)."),
        quiet: Optional[bool] = typer.Option(None, "--quiet", help="No progress output except the summary."),
    ) -> None:
        from llmcore.train import build_config, train

        flags = dict(
            data=str(data), out=str(out), model=model, init=str(init) if init else None,
            tokenizer=str(tokenizer) if tokenizer else None, seq_len=seq_len, micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
            weight_decay=weight_decay, grad_clip=grad_clip, epochs=epochs, max_steps=max_steps, dtype=dtype,
            packed=packed, attn_backend=attn_backend, compile=compile, eval_every=eval_every, eval_docs=eval_docs,
            save_every=save_every, keep_last=keep_last, resume=resume, wandb=wandb, wandb_project=wandb_project,
            seed=seed, deepspeed=str(deepspeed) if deepspeed else None, log_every=log_every, beta=beta,
            dpo_logp=dpo_logp, ref_logps=ref_logps, quiet=quiet,
        )
        if deepspeed is None:
            cfg = build_config(stage, flags, config)
            train(stage, cfg)
            return
        # DeepSpeed: once the process group is up, every exit path tears it down and leaves through
        # os._exit; errors before that (bad flags) take the normal path of the root CLI.
        cfg = build_config(stage, flags, config)
        try:
            train(stage, cfg)
        except LLMCoreError as err:
            if not _distributed_up():
                raise
            _finish_distributed(2, f"error: {err}")
        except KeyboardInterrupt:
            if not _distributed_up():
                raise
            _finish_distributed(130, "interrupted")
        except BaseException:
            if not _distributed_up():
                raise
            import traceback

            traceback.print_exc()
            _finish_distributed(1)
        _finish_distributed(0)

    command.__doc__ = (f"{stage.upper() if stage == 'dpo' else stage.capitalize()} training into a run dir.\n\n"
                       f"Example: {EXAMPLES[stage]}")
    return command


def eval_command(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run dir, checkpoint dir or exported HF folder."),
    data: Path = typer.Option(..., "--data", help="Pretrain or SFT shard dir."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per forward pass."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per row (default: the run's training seq len; 512 for an exported HF folder)."),
    packed: bool = typer.Option(True, "--packed/--padded", help="Pack documents into rows or pad one per row."),
    max_batches: Optional[int] = typer.Option(None, "--max-batches", help="Stop after N batches."),
) -> None:
    """Loss and perplexity over the loss tokens of a shard dir.

    Example: llmcore eval --ckpt runs/pre --data shards/pretrain_eval
    """
    from llmcore.evaluate import evaluate

    res = evaluate(ckpt, data, batch_size=batch_size, seq_len=seq_len, packing="packed" if packed else "padded",
                   max_batches=max_batches)
    typer.echo(res.line())


def register(app: typer.Typer) -> None:
    """Add `train pretrain|sft|dpo` and `eval` to the root app."""
    group = typer.Typer(help="Train a model: pretrain, sft, dpo.\n\nExample: " + EXAMPLES["pretrain"],
                        no_args_is_help=True)
    for stage in ("pretrain", "sft", "dpo"):
        group.command(stage)(_make_train_command(stage))
    app.add_typer(group, name="train")
    app.command("eval")(eval_command)

"""CLI: the `llmcore eval` group. `llmcore eval --ckpt RUN --data SHARDS` (the held-out loss as the
run's stage scores it, `llmcore.evaluate`: the `loss` command, also the default when no command is
named) and `llmcore eval bench` (multiple-choice benchmarks, `llmcore.eval_bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
import typer
from typer.core import TyperGroup

from llmcore.common import DEVICE_HELP


class _LossByDefault(TyperGroup):
    """`llmcore eval --ckpt ...` keeps working: arguments that name no command go to `loss`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["loss", *args]
        return super().parse_args(ctx, args)


def loss_command(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run dir, checkpoint dir or exported HF folder."),
    data: Path = typer.Option(..., "--data", help="Shard dir (pretrain, sft or dpo) to score."),
    stage: Optional[str] = typer.Option(
        None,
        "--stage",
        help="Score as this training stage does (its rows and objective; default: the run's stage when it "
        "trains on --data's kind, else the stage of that kind).",
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Rows per forward pass (default: the run's micro batch size)."
    ),
    seq_len: Optional[int] = typer.Option(
        None, "--seq-len", help="Tokens per row (default: the run's; the stage's default for an HF folder)."
    ),
    packing: Optional[str] = typer.Option(
        None,
        "--packing",
        help="Row layout of a pretrain/SFT stage: packed (pretrain only), bestfit or padded (default: the run's).",
    ),
    max_batches: Optional[int] = typer.Option(None, "--max-batches", help="Stop after N batches."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Held-out loss (and perplexity) of a model on a shard dir, as its training stage scores it.

    Prints eval_loss as the run's metrics.jsonl logs it: on the documents a run held out (`llmcore prep
    split` with its --eval-docs and --seed) the same number for the same checkpoint.

    Example: llmcore eval --ckpt runs/sft --data shards/sft_heldout
    """
    from llmcore.evaluate import evaluate

    res = evaluate(
        ckpt,
        data,
        stage=stage,
        batch_size=batch_size,
        seq_len=seq_len,
        packing=packing,
        max_batches=max_batches,
        device=device,
    )
    typer.echo(res.line())


def bench_command(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run dir, checkpoint dir or HF folder to score."),
    task: str = typer.Option(..., "--task", help="cmmlu, ceval, or mc (a generic jsonl)."),
    data: Path = typer.Option(
        ...,
        "--data",
        help="The task's official dir (cmmlu: test/ dev/; ceval: val/ dev/) "
        "or, for mc, a jsonl file or a dir with test.jsonl and optionally dev.jsonl.",
    ),
    shots: int = typer.Option(0, "--shots", help="Solved examples from dev/ before each question (0..5)."),
    subjects: Optional[str] = typer.Option(
        None, "--subjects", help="Comma-separated subjects (default: all in --data)."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N questions per subject."),
    batch_size: int = typer.Option(16, "--batch-size", help="Questions per forward pass."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Write results.json, predictions.jsonl and results.png here."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an --out dir this command wrote before."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Score a multiple-choice benchmark (CMMLU, C-Eval, jsonl) as lm-evaluation-harness does.

    The log-likelihood of each choice after the prompt; acc and acc_norm per subject and overall.

    Example: llmcore eval bench --ckpt runs/dpo --task cmmlu --data cmmlu/ --shots 5 --out results/cmmlu
    """
    from llmcore.eval_bench import eval_bench

    names = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    res = eval_bench(
        ckpt,
        task,
        data,
        out=out,
        shots=shots,
        subjects=names,
        limit=limit,
        batch_size=batch_size,
        device=device,
        overwrite=overwrite,
    )
    for line in res.lines():
        typer.echo(line)
    if out is not None:
        typer.echo(f"wrote {out}/results.json, predictions.jsonl, results.png")


def register(app: typer.Typer) -> None:
    """Add the `eval` group (`loss`, the default, and `bench`) to the root app."""
    group = typer.Typer(
        cls=_LossByDefault,
        no_args_is_help=True,
        help="Score a model: its held-out loss on a shard dir as its training stage scores it (default), "
        "or a multiple-choice benchmark.\n\n"
        "Example: llmcore eval --ckpt runs/pre --data shards/pretrain_eval\n\n"
        "Example: llmcore eval bench --ckpt runs/dpo --task cmmlu --data cmmlu/",
    )
    group.command("loss")(loss_command)
    group.command("bench")(bench_command)
    app.add_typer(group, name="eval")

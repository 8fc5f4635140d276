"""CLI: the `llmcore eval` group. `llmcore eval --ckpt RUN --data SHARDS` (loss and perplexity, the
`loss` command, also the default when no command is named) and `llmcore eval bench` (multiple-choice
benchmarks, `llmcore.eval_bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

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


def register(app: typer.Typer, loss_command: Callable[..., Any]) -> None:
    """Add the `eval` group (`loss`, the default, and `bench`) to the root app."""
    group = typer.Typer(
        cls=_LossByDefault,
        no_args_is_help=True,
        help="Score a model: loss/perplexity on a shard dir (default), or a multiple-choice benchmark.\n\n"
        "Example: llmcore eval --ckpt runs/pre --data shards/pretrain_eval\n\n"
        "Example: llmcore eval bench --ckpt runs/dpo --task cmmlu --data cmmlu/",
    )
    group.command("loss")(loss_command)
    group.command("bench")(bench_command)
    app.add_typer(group, name="eval")

"""The `llmcore` command: a thin Typer layer; each group lives beside the library code it calls."""

from __future__ import annotations

import os
import sys

import typer

from llmcore.errors import LLMCoreError

app = typer.Typer(
    name="llmcore",
    help="llmcore: tokenizer, data prep, model, pretrain/SFT/DPO training, chat and export.\n\n"
    "Example: llmcore prep stats dataset/pretrain_hq.jsonl --plot stats.png",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        import platform

        import torch

        from llmcore import __version__

        typer.echo(f"llmcore {__version__} (python {platform.python_version()}, torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_show_version, is_eager=True
    ),
) -> None:
    """llmcore: tokenizer, data prep, model, pretrain/SFT/DPO training, chat and export."""


def _register_all() -> None:
    from llmcore import cli_model, cli_train
    from llmcore.data_prep import cli as data_cli

    data_cli.register(app)
    cli_model.register(app)
    cli_train.register(app)
    from llmcore import serve as serve_cli

    serve_cli.register(app)
    __import__("llmcore.rag.cli", fromlist=["register"]).register(app)
    __import__("llmcore.launch.cli", fromlist=["register"]).register(app)
    __import__("llmcore.bench.cli", fromlist=["register"]).register(app)
    _plain_help(app)


def _plain_help(typer_app: typer.Typer) -> None:
    """Help and usage errors as click prints them, for this app and every group under it.

    Rich's option table crops flag names to fit the width (`--latency-queri…` at 80 columns, as in
    a pipe) and prints `<bool>` for flags; click's layout never cuts a flag name and wraps only the
    descriptions. Set on every Typer instance, so it holds however the command tree is built."""
    typer_app.rich_markup_mode = None
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _plain_help(group.typer_instance)


_register_all()


@app.command("demo")
def demo_command(
    out: str = typer.Option("demo_out", "--out", help="Folder for the demo's data, tokenizer, shards and runs."),
) -> None:
    """Run the whole pipeline on built-in real text: corpus, stats, tokenizer, shards, pretrain, SFT, DPO.

    Example: llmcore demo --out demo_out
    """
    from llmcore.demo import run_demo

    run_demo(out)


def without_launcher_local_rank(args: list[str]) -> list[str]:
    """Drop the `--local_rank=N` that the DeepSpeed launcher puts before our subcommand (the root
    app would reject it); LOCAL_RANK in the environment carries the same value."""
    keep: list[str] = []
    it = iter(args)
    for a in it:
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank"):
            value = next(it, None)
            if value is not None:
                os.environ.setdefault("LOCAL_RANK", value)
        else:
            keep.append(a)
    return keep


def main(argv: list[str] | None = None) -> None:
    """Entry point for `llmcore` and `python -m llmcore`: user errors become one line and exit 2."""
    from llmcore.log import setup_cli_logging

    setup_cli_logging()  # library messages (progress lines, warnings) reach the terminal as plain lines
    args = without_launcher_local_rank(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, standalone_mode=True)
    except LLMCoreError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as err:
        if os.environ.get("LLMCORE_DEBUG"):
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)

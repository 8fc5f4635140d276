"""`python -m llmcore.bench SUBCOMMAND ...`: the `llmcore bench` commands without loading the other
command groups (the GPU check uses it; it needs torch, triton, typer and matplotlib, and bench train
also numpy, pyarrow and tokenizers: gpu_check.sh's versions phase checks them all up front).
Same code and flags as `llmcore bench`; user errors print one line `error: ...` and exit 2."""

from __future__ import annotations

import sys

import typer

from llmcore.bench.cli import bench_app
from llmcore.errors import LLMCoreError
from llmcore.log import setup_cli_logging


def main(argv: list[str] | None = None) -> None:
    setup_cli_logging()
    try:
        bench_app(
            args=sys.argv[1:] if argv is None else argv, prog_name="python -m llmcore.bench", standalone_mode=True
        )
    except LLMCoreError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

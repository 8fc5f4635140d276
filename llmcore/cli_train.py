"""CLI commands for this part; filled in by its owner."""

import typer


def register(app: typer.Typer) -> None:
    """Add this part's command groups to the root app."""

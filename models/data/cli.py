"""Subcommands of this area (see slidr/cli.py)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``slidr`` app."""

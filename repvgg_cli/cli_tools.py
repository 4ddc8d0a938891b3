"""More `repvgg` commands (bench, export), registered on the same Typer app as cli.py's."""

from __future__ import annotations

from .cli import app, handle_errors  # noqa: F401 - commands below register on this app

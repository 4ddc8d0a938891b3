"""The ``repvgg`` command line: a thin face over :mod:`repvgg_cli.api`.

:mod:`.app` holds the Typer app, the error table and the entry point; :mod:`.options` the option
types every command shares; one module per command group registers its commands on the app.
"""

from __future__ import annotations

from . import convert, diff, env, inspect, tools, verify  # noqa: F401 - each registers its commands on the app
from .app import app, main

__all__ = ["app", "main"]

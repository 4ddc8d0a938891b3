"""``repvgg inspect`` and ``repvgg families``: what is in a checkpoint, what the tool knows."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, handle_errors, print_json, stdout_console
from .options import (
    Activity,
    DebugOption,
    EntryOption,
    JsonOption,
    PickleOption,
    QuietOption,
    reading,
)


@app.command()
@handle_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="Any checkpoint: train, deploy or neither.")],
    entry: EntryOption = None,
    allow_pickle: PickleOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """What is in a checkpoint: format, entry, dtypes, blocks by family, train or deploy form."""
    from ..inspection import summarize
    from ..io.read import load_checkpoint
    from ..render.inspect import summary_json, summary_tree

    with Activity(quiet) as activity:
        reading(activity, path)
        loaded = load_checkpoint(path, allow_pickle=allow_pickle, entry=entry)
        activity.step("finding blocks")
        summary = summarize(loaded)
    if as_json:
        print_json(summary_json(summary))
    else:
        stdout_console().print(summary_tree(summary))

@app.command()
@handle_errors
def families(
    as_json: JsonOption = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table as Markdown (the README's).")] = False,
    debug: DebugOption = False,
) -> None:
    """List every supported block family with its train and deploy key patterns."""
    from ..render.inspect import families_markdown, families_rows, families_table

    if as_json:
        print_json({"command": "families", "families": families_rows()})
    elif markdown:
        typer.echo(families_markdown())
    else:
        stdout_console().print(families_table())

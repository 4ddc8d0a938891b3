"""``repvgg diff A B``: compare two checkpoints, key by key or block by block (see :mod:`repvgg_cli.diff`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .app import app, handle_errors, print_json, stderr_console, stdout_console
from .options import (
    AtolOption,
    DebugOption,
    EntryOption,
    EpsOption,
    JsonOption,
    PickleOption,
    RtolOption,
)

if TYPE_CHECKING:  # the library imports torch; keep `repvgg --help` fast
    from ..diff.compare import KeyComparison, KeyEntry
    from ..diff.files import CheckpointSide, FileDiff


@app.command()
@handle_errors
def diff(
    a: Annotated[Path, typer.Argument(metavar="A", help="First checkpoint (e.g. the train form).")],
    b: Annotated[Path, typer.Argument(metavar="B", help="Second checkpoint (e.g. a deploy form written by another converter).")],
    rtol: RtolOption = None,
    atol: AtolOption = 0.0,
    bn_eps: EpsOption = None,
    entry: EntryOption = None,
    allow_pickle: PickleOption = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Compare two checkpoints: keys only in A or B, and each shared key's shape, dtype and difference.

    A train form against a deploy form of the same model: the train form is fused, each block compared.

    Keys must be bit-identical and blocks agree within rtol by dtype (fp32 1e-5), unless --rtol/--atol.

    Exit 0: the same (within the tolerances), 1: different, 2: unreadable.
    """
    from ..diff.files import diff_files, file_diff_json

    result = diff_files(a, b, rtol=rtol, atol=atol, bn_eps=bn_eps, allow_pickle=allow_pickle, entry=entry)
    if as_json:
        print_json(file_diff_json(result))
    else:
        render(result, stdout_console(), stderr_console())
    if not result.same:
        raise typer.Exit(1)


# -- rendering ---------------------------------------------------------------------------------


def shorten_middle(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters by an ellipsis in the middle, keeping more of the end
    (where a key's distinguishing leaf is)."""
    if len(text) <= width or width < 5:
        return text
    head = (width - 1) // 3
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _number(value: float | None) -> str:
    from ..diff.files import format_number

    return format_number(value)


def _tensor_text(shape: tuple[int, ...], dtype: str) -> str:
    from ..diff.compare import shape_text, short_dtype

    return f"{shape_text(shape)} {short_dtype(dtype)}"


def _side_line(label: str, side: CheckpointSide) -> Text:
    from ..render.text import human_size

    entry = f", entry {side.entry}" if side.entry else ""
    role = f", {side.role}" if side.role else ""
    line = Text(f"{label}  ", style="bold")
    line.append(side.path)
    line.append(f"  ({side.format}{entry}, {side.keys} keys, {human_size(side.nbytes)}{role})")
    return line


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)


def _verdict(ok: bool, bad: str = "DIFFERS") -> Text:
    return Text("ok", style="green") if ok else Text(bad, style="bold red")


def blocks_table(result: FileDiff, width: int) -> Table:
    """Each fused block against the other side: max abs / max rel difference and the verdict."""
    other = "B" if result.fused_side == "A" else "A"
    table = _table(f"Blocks: {result.fused_side} fused by repvgg vs {other}")
    name_width = max(16, width - 48)
    table.add_column("block", overflow="fold")
    table.add_column("family", overflow="fold")
    table.add_column("max abs", justify="right", no_wrap=True)
    table.add_column("max rel", justify="right", no_wrap=True)
    table.add_column("rtol", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for block in result.blocks:
        table.add_row(Text(shorten_middle(block.name or "<root>", name_width)), Text(block.family),
                      _number(block.max_abs), _number(block.max_rel), f"{block.rtol:.0e}",
                      _verdict(block.agree, "MISSING" if block.missing else "DIFFERS"))
    return table


def keys_table(title: str, comparisons: tuple[KeyComparison, ...], width: int) -> Table:
    """Shared keys that differ: shape and dtype (A → B where they differ), max abs, max rel, why."""
    table = _table(title)
    key_width = max(16, width - 44)
    table.add_column("key", overflow="fold")
    table.add_column("shape dtype", overflow="fold")
    table.add_column("max abs", justify="right", no_wrap=True)
    table.add_column("max rel", justify="right", no_wrap=True)
    for c in comparisons:
        left, right = _tensor_text(c.shape_a, c.dtype_a), _tensor_text(c.shape_b, c.dtype_b)
        detail = left if left == right else f"{left} → {right}"
        if c.problem:
            detail += f" ({c.problem})"
        elif c.max_abs == 0 and not c.bit_identical:
            detail += " (same values, other bits: ±0 or NaN payload)"
        table.add_row(Text(shorten_middle(c.key, key_width)), Text(detail), _number(c.max_abs), _number(c.max_rel))
    return table


def entries_table(title: str, entries: tuple[KeyEntry, ...], width: int) -> Table:
    table = _table(title)
    table.add_column("key", overflow="fold")
    table.add_column("shape dtype", overflow="fold")
    for e in entries:
        table.add_row(Text(shorten_middle(e.key, max(16, width - 24))), Text(_tensor_text(e.shape, e.dtype)))
    return table


def render(result: FileDiff, console: Console, notes: Console) -> None:
    """The terminal report on ``console``: the two files, the tables that have rows, the summary;
    what loading and the comparison noted goes to ``notes`` (stderr)."""
    from ..diff.files import summary_line

    width = console.width
    console.print(_side_line("A", result.a))
    console.print(_side_line("B", result.b))
    for label, side in (("A", result.a), ("B", result.b)):
        for note in side.notes:
            notes.print(Text(f"{label}: {note}", style="dim"))
    if result.mode == "fused":
        console.print()
        console.print(blocks_table(result, width))
        for block in result.blocks:
            if block.problem:
                console.print(Text(f"{block.name or '<root>'}: {block.problem}", style="red"))
    keys = result.keys
    other = "other " if result.mode == "fused" else ""
    if keys.different:
        console.print()
        console.print(keys_table(f"{len(keys.different)} {other}shared key(s) differ", keys.different, width))
    if keys.only_a:
        console.print()
        console.print(entries_table(f"{len(keys.only_a)} key(s) only in A", keys.only_a, width))
    if keys.only_b:
        console.print()
        console.print(entries_table(f"{len(keys.only_b)} key(s) only in B", keys.only_b, width))
    if result.dropped:
        console.print(Text(f"dropped by the fusion (training-only): {', '.join(result.dropped)}"))
    for note in result.notes:
        notes.print(Text(note, style="dim"))
    console.print()
    console.print(Text(summary_line(result), style="green" if result.same else "bold red"))

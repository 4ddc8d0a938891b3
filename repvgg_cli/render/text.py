"""The pieces every rendering is made of: text from data on one line (:func:`printable`), names
in natural order, shortened names, numbers and sizes, and :class:`FittedTable` (a table laid out
for the width it is printed at). Imports rich only (the CLI uses it before torch is imported).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

ELLIPSIS = "\u2026"
UNKNOWN = "unknown"
NAME_TIERS = {1: 24, 3: 12, 5: 4}
"""How narrow a block-name column may get at each tier of :meth:`FittedTable.widths`."""


def printable(text: object) -> str:
    """``text`` on one line, safe for a terminal: every character that is not printable (newline,
    tab, escape, other control and format characters) is written as Python writes it in a ``repr``
    (``\\n``, ``\\t``, ``\\x1b``, ``\\u200b``); everything else is kept as it is."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def natural_key(name: str | None) -> tuple:
    """Sort key for block names: runs of digits compare as numbers (``stages.2.9`` < ``stages.2.10``)."""
    parts = re.split(r"(\d+)", name or "")
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def natural_sorted(items: Iterable[Any], name: Callable[[Any], str | None]) -> list[Any]:
    """``items`` in the natural order of their names (stable for equal names)."""
    return sorted(items, key=lambda item: natural_key(name(item)))


def shorten_start(text: str, width: int) -> str:
    """``…ages.2.10.rbr``: the end of ``text`` in ``width`` characters (block names differ at the end)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS
    tail = text[len(text) - width + 1:]
    dot = tail.find(".")
    if 0 <= dot < len(tail) // 2:  # start at a name part: "…stages.2.10", not "…s.stages.2.10" or "….stages"
        tail = tail[dot + 1:]
    return ELLIPSIS + tail


def shorten_middle(text: str, width: int) -> str:
    """``ultra…repconv``: the start and the end of ``text`` in ``width`` characters."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS
    head = width // 2
    tail = width - 1 - head
    return text[:head] + ELLIPSIS + (text[len(text) - tail:] if tail else "")


def plain_text(value: object) -> Text:
    """A table cell or tree label from data: never markup, always one line."""
    return Text(printable(value))


def finite_or_none(value: float) -> float | None:
    """JSON has no Inf/NaN: they become null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def err_text(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.1e}"


def _status(ok: bool) -> Text:
    return Text("ok", style="green") if ok else Text("FAIL", style="bold red")


def pair_text(p: tuple[int, int] | list[int]) -> str:
    return f"{p[0]}x{p[1]}"


def known_text(value: object) -> str:
    return UNKNOWN if value is None else str(value)


def count(n: int) -> str:
    """A parameter count in at most 6 characters: ``9,999``, ``82.4k``, ``2.36M``, ``1.20G``."""
    if n < 10_000:
        return f"{n:,}"
    if n < 999_950:
        return f"{n / 1e3:.1f}k"
    if n < 999_995_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e9:.2f}G"


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


# -- tables that fit the terminal ---------------------------------------------------------------


class Column:
    """One column of a :class:`FittedTable`: its cells as plain strings, and how it may shrink.

    ``shrink``: ``"start"`` (cut at the front, keep the end: block names), ``"middle"`` (keep
    both ends: family names), ``"fold"`` (wrap onto more lines: free text) or None (never).
    ``tiers``: ``{tier: width}``, how narrow the column may become from that tier of
    :meth:`FittedTable.widths` on (a fold column never goes below its longest word).
    """

    def __init__(self, header: str, cells: Sequence[str], *, justify: str = "left", shrink: str | None = None,
                 tiers: dict[int, int] | None = None, styles: Sequence[str | None] | None = None,
                 short: Sequence[str] | None = None, short_tier: int = 4) -> None:
        self.header, self.cells, self.justify, self.shrink = header, list(cells), justify, shrink
        self.styles = list(styles) if styles is not None else [None] * len(self.cells)
        self.short, self.short_tier = (list(short) if short is not None else None), short_tier
        self._tiers_asked = dict(tiers or {})
        self._measure()

    def use_short(self) -> None:
        """Switch to the shorter form of the cells (e.g. ``2.36M`` for ``2,363,392``)."""
        assert self.short is not None
        self.cells, self.short = self.short, None
        self._measure()

    def _measure(self) -> None:
        self.natural = max([len(self.header), *(len(c) for c in self.cells)])
        longest_word = max([len(self.header), *(len(w) for c in self.cells for w in c.split())])
        floor = longest_word if self.shrink == "fold" else 1
        self.tiers = {tier: min(self.natural, max(floor, least)) for tier, least in self._tiers_asked.items()}

    def least(self, tier: int) -> int:
        """The narrowest this column may be at ``tier``."""
        allowed = [least for t, least in self.tiers.items() if t <= tier]
        return min(allowed) if allowed else self.natural


class FittedTable:
    """A table that is laid out for the width it is printed at (a Rich renderable).

    Tiers of shrinking, each tried only when the one before is not enough: names to a comfortable
    width (tier 1), free text folds (2), names to their least (3), numbers that may wrap (4), names
    to almost nothing (5). Within a tier the column with the most room to give gives first.
    """

    GAP = 2  # columns are two spaces apart; no edges
    TIERS = 5

    def __init__(self, columns: list[Column], title: str | None = None, caption: str | None = None) -> None:
        self.columns, self.title, self.caption = columns, title, caption

    def widths(self, width: int) -> list[int]:
        widths = [c.natural for c in self.columns]
        excess = sum(widths) + self.GAP * (len(widths) - 1) - width
        for tier in range(1, self.TIERS + 1):
            for i, column in enumerate(self.columns):
                if excess > 0 and column.short is not None and column.short_tier == tier:
                    column.use_short()
                    excess -= widths[i] - column.natural
                    widths[i] = column.natural
            least = [c.least(tier) for c in self.columns]
            while excess > 0:
                candidates = [i for i in range(len(widths)) if widths[i] > least[i]]
                if not candidates:
                    break
                widest = max(candidates, key=lambda i: widths[i] - least[i])
                step = min(excess, max(1, (widths[widest] - least[widest] + 1) // 2))
                widths[widest] -= step
                excess -= step
        return widths

    def table(self, width: int) -> Table:
        widths = self.widths(width)
        table = Table(title=plain_text(self.title) if self.title else None, title_justify="left", box=box.SIMPLE_HEAD,
                      show_edge=False, pad_edge=False, collapse_padding=True,
                      caption=plain_text(self.caption) if self.caption else None, caption_justify="left")
        for column, w in zip(self.columns, widths):
            table.add_column(column.header, justify=column.justify, width=w, no_wrap=column.shrink != "fold",
                             overflow="fold")
        for row in range(len(self.columns[0].cells) if self.columns else 0):
            cells = []
            for column, w in zip(self.columns, widths):
                value = column.cells[row]
                if column.shrink == "start":
                    value = shorten_start(value, w)
                elif column.shrink == "middle":
                    value = shorten_middle(value, w)
                cells.append(Text(value, style=column.styles[row] or ""))
            table.add_row(*cells)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table(options.max_width)

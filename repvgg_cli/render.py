"""Results to Rich tables and trees, JSON documents and Markdown. Decides nothing.

Three rules hold for everything rendered here:

- Text that comes from a checkpoint or the command line (block names, keys, paths, messages) is
  never read as Rich markup (it goes into :class:`rich.text.Text` or is printed with
  ``markup=False``) and is shown on one line (:func:`printable`), so ``ckpt[best].pt`` stays
  ``ckpt[best].pt`` and a key holding ``[/x]`` or a newline cannot break the output.
- Blocks are listed in natural order (:func:`natural_key`): ``stages.2.9`` before ``stages.2.10``.
- Tables fit the terminal they are printed on: at 80 columns long block names are shortened at
  the front (the end of a name is what tells blocks apart), long family names in the middle, and
  free text folds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

if TYPE_CHECKING:  # the core imports torch; keep `repvgg --help` fast
    from .pipeline.report import ConversionResult
    from .inspection import CheckpointSummary
    from .verify import BlockCheck, ModelCheck, VerifyReport

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


def _text(value: object) -> Text:
    """A table cell or tree label from data: never markup, always one line."""
    return Text(printable(value))


def _num(value: float) -> float | None:
    """JSON has no Inf/NaN: they become null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _err(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.1e}"


def _status(ok: bool) -> Text:
    return Text("ok", style="green") if ok else Text("FAIL", style="bold red")


def _pair(p: tuple[int, int] | list[int]) -> str:
    return f"{p[0]}x{p[1]}"


def _known(value: object) -> str:
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
        table = Table(title=_text(self.title) if self.title else None, title_justify="left", box=box.SIMPLE_HEAD,
                      show_edge=False, pad_edge=False, collapse_padding=True,
                      caption=_text(self.caption) if self.caption else None, caption_justify="left")
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


# -- convert -----------------------------------------------------------------------------------


def model_check_json(check: "ModelCheck | None") -> dict | None:
    if check is None:
        return None
    return {
        "input_shape": list(check.input_shape), "dtype": check.dtype, "outputs": check.outputs,
        "max_abs_err": _num(check.max_abs_err), "rel_err": _num(check.rel_err),
        "rtol": check.rtol, "atol": check.atol, "ok": check.ok, "problem": check.problem,
    }


def _blocks(result: "ConversionResult") -> list:
    return natural_sorted(result.blocks, lambda r: r.block.name)


def _block_eps(r) -> list[float]:
    """The eps of every BN of a block's train form (as fused), unique and sorted."""
    b = r.block.branches
    bns = [getattr(c, "bn", None) for c in getattr(b, "convs", ())]
    identity = getattr(b, "identity", None)
    bns += [getattr(identity, "bn", None), getattr(b, "post_bn", None)]
    return sorted({float(bn.eps) for bn in bns if bn is not None and getattr(bn, "eps", None) is not None})


def eps_summary(result: "ConversionResult") -> dict[str, Any]:
    """The BN eps the blocks were fused with: the values, and where each came from."""
    values = sorted({e for r in result.blocks for e in _block_eps(r)})
    sources = sorted({r.block.eps_note for r in result.blocks if _block_eps(r)})
    option = getattr(result.options, "bn_eps", None)
    kinds = sorted({getattr(r.block, "eps_source", "module") for r in result.blocks if _block_eps(r)})
    sensitive = [{"block": name, "rel_change_with_1e-3": _num(rel)} for name, rel in result.eps_sensitive]
    return {"values": values, "sources": sources, "source": kinds, "option": option, "sensitive": sensitive}


def tolerance_summary(result: "ConversionResult") -> dict[str, Any]:
    """The tolerance every check passed against: as asked (``rtol`` None: by dtype) and as used."""
    tolerance = result.options.tolerance
    used = sorted({r.check.rtol for r in result.blocks})
    if result.model_check is not None:
        used = sorted({*used, result.model_check.rtol})
    return {"rtol": tolerance.rtol, "rtol_from": "--rtol" if tolerance.rtol is not None else "by dtype",
            "atol": tolerance.atol, "rtol_used": used}


def _eps_text(eps: dict[str, Any]) -> str:
    if not eps["values"]:
        return "BatchNorm eps: none (no block has a BN)"
    return f"BatchNorm eps: {', '.join(f'{v:g}' for v in eps['values'])} ({eps_origin(eps)})"


def eps_origin(eps: dict[str, Any]) -> str:
    """``from <where>; source: <module|flag|family|default>``, default saying nothing decided it."""
    kinds = eps.get("source") or []
    kind = ", ".join(kinds) or UNKNOWN
    if kinds == ["default"]:
        kind += ", nothing decided it"
    return f"from {', '.join(eps['sources']) or UNKNOWN}; source: {kind}"


def _tolerance_text(tol: dict[str, Any]) -> str:
    used = ", ".join(f"{v:g}" for v in tol["rtol_used"]) or "none"
    asked = f"--rtol {tol['rtol']:g}" if tol["rtol"] is not None else "by the dtype written"
    return f"tolerance: rtol {used} ({asked}), atol {tol['atol']:g}"


def conversion_json(result: "ConversionResult", source: str | None = None, output: str | None = None,
                    written: bool = False) -> dict[str, Any]:
    """The convert report as one JSON-ready document."""
    blocks = []
    for r in _blocks(result):
        f = r.fused
        blocks.append({
            "name": r.block.name, "family": r.block.family, "branches": list(r.block.branch_labels),
            "in_channels": f.in_channels, "out_channels": f.out_channels, "kernel": list(f.kernel_size),
            "groups": f.groups if r.block.branches.groups_known else None,
            "stride": list(f.stride) if r.block.branches.geometry_known else None, "dtype": str(f.weight.dtype).replace("torch.", ""),
            "bn_eps": _block_eps(r), "eps_from": r.block.eps_note, "eps_source": getattr(r.block, "eps_source", "module"),
            "params_before": r.params_before, "params_after": r.params_after,
            "max_abs_err": _num(r.check.max_abs_err), "rel_err": _num(r.check.rel_err),
            "cast_abs_err": _num(r.check.cast_abs_err), "rtol": r.check.rtol, "atol": r.check.atol, "ok": r.check.ok,
        })
    return {
        "command": "convert", "ok": result.ok, "source": source, "output": output, "written": written,
        "mode": result.mode,
        "bn_eps": eps_summary(result),
        "tolerance": tolerance_summary(result),
        "blocks": blocks,
        "totals": {
            "blocks": len(result.blocks), "failed": len(result.failures),
            "params_before": result.params_before, "params_after": result.params_after,
            "max_rel_err": _num(max((r.check.rel_err for r in result.blocks), default=0.0)),
            "passthrough_keys": result.passthrough_keys,
        },
        "dropped_keys": list(result.dropped_keys),
        "unrecognised": [{"prefix": p, "description": d} for p, d in result.unrecognised],
        "model_check": model_check_json(result.model_check),
        "notes": list(result.notes),
        "key_diff": key_diff_json(result),
    }


def _branches(labels: tuple[str, ...]) -> str:
    return " ".join(label.replace("+bn", "") for label in labels)


def _groups(fused, block) -> str:
    return str(fused.groups) if block.branches.groups_known else "?"


def conversion_table(result: "ConversionResult", title: str = "Fused blocks") -> FittedTable:
    """Per-block table: block, family, branches, kernel, groups, params before→after, errors, status."""
    blocks = _blocks(result)
    unknown_groups = any(_groups(r.fused, r.block) == "?" for r in blocks)
    ok = [r.check.ok for r in blocks]
    columns = [
        Column("block", [printable(r.block.name or "<root>") for r in blocks], shrink="start", tiers=NAME_TIERS),
        Column("family", [printable(r.block.family) for r in blocks], shrink="middle", tiers={1: 12, 3: 8, 5: 4}),
        Column("branches", [_branches(r.block.branch_labels) for r in blocks], shrink="fold", tiers={2: 1}),
        Column("k", [_pair(r.fused.kernel_size) for r in blocks], justify="right"),
        Column("g", [_groups(r.fused, r.block) for r in blocks], justify="right"),
        Column("params", [f"{r.params_before:,} → {r.params_after:,}" for r in blocks], justify="right",
               short=[f"{count(r.params_before)} → {count(r.params_after)}" for r in blocks], short_tier=3,
               shrink="fold", tiers={4: 1}),
        Column("max abs", [_err(r.check.max_abs_err) for r in blocks], justify="right"),
        Column("rel err", [_err(r.check.rel_err) for r in blocks], justify="right"),
        Column("", ["ok" if o else "FAIL" for o in ok], styles=["green" if o else "bold red" for o in ok]),
    ]
    caption = "g ?: groups not stored in a state dict (the fused kernel does not depend on them)" if unknown_groups \
        else None
    return FittedTable(columns, title=title, caption=caption)


def conversion_totals(result: "ConversionResult") -> list[str]:
    """Lines under the table (plain text, never markup): totals, eps, tolerance, whole-model check,
    dropped keys, notes."""
    lines = [
        f"{len(result.blocks)} block(s) fused ({result.mode}), {len(result.failures)} failed; "
        f"block parameters {result.params_before:,} → {result.params_after:,}; "
        f"worst relative error {_err(max((r.check.rel_err for r in result.blocks), default=0.0))}",
    ]
    if result.mode == "key tree":
        lines.append(f"{result.passthrough_keys} other key(s) passed through unchanged")
    eps = eps_summary(result)
    if eps["values"]:
        lines.append(_eps_text(eps))
    if result.blocks or result.model_check is not None:
        lines.append(_tolerance_text(tolerance_summary(result)))
    dtypes = sorted({str(r.fused.weight.dtype).replace('torch.', '') for r in result.blocks})
    if any(d in ("float16", "bfloat16") for d in dtypes):
        worst = max(r.check.cast_abs_err / r.check.scale if r.check.scale else 0.0 for r in result.blocks)
        lines.append(f"written as {', '.join(dtypes)}: the cast from float64 adds up to {_err(worst)} relative error")
    if result.model_check is not None:
        mc = result.model_check
        lines.append(
            f"whole model ({mc.dtype}, input {tuple(mc.input_shape)}): max abs err {_err(mc.max_abs_err)}, "
            f"rel err {_err(mc.rel_err)} (rtol {mc.rtol:g}) {'ok' if mc.ok else 'FAIL'}"
        )
    if result.dropped_keys:
        dropped = natural_sorted(result.dropped_keys, str)
        shown = ", ".join(printable(k) for k in dropped[:6]) + (" …" if len(dropped) > 6 else "")
        lines.append(f"dropped {len(dropped)} training-only key(s): {shown}")
    for prefix, description in natural_sorted(result.unrecognised, lambda u: u[0]):
        lines.append(f"not recognised: {printable(prefix or '<root>')} looks like a multi-branch block "
                     f"({printable(description)}) that no family claims; left as it is")
    lines.extend(printable(note) for note in result.notes)
    return lines


def _md(text: object) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return printable(text).replace("|", "\\|")


def conversion_markdown(result: "ConversionResult", source: str | None = None, output: str | None = None) -> str:
    """The convert report as Markdown (for ``--report FILE.md``)."""
    lines = [
        "# repvgg convert report", "",
        f"- source: `{printable(source)}`" if source else "- source: (in memory)",
        f"- output: `{printable(output)}`" if output else "- output: (not written)",
        f"- result: {'equivalent' if result.ok else 'NOT equivalent'}",
        f"- {_eps_text(eps_summary(result))}",
        f"- {_tolerance_text(tolerance_summary(result))}", "",
        "| block | family | branches | kernel | groups | BN eps | params before → after | max abs err | rel err "
        "| rtol | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _blocks(result):
        f = r.fused
        groups = str(f.groups) if r.block.branches.groups_known else UNKNOWN
        eps = ", ".join(f"{e:g}" for e in _block_eps(r)) or "-"
        lines.append(
            f"| `{_md(r.block.name or '<root>')}` | {_md(r.block.family)} | {' + '.join(r.block.branch_labels)} | "
            f"{_pair(f.kernel_size)} | {groups} | {eps} ({_md(r.block.eps_note)}) | "
            f"{r.params_before:,} → {r.params_after:,} | "
            f"{_err(r.check.max_abs_err)} | {_err(r.check.rel_err)} | {r.check.rtol:g} | "
            f"{'yes' if r.check.ok else '**no**'} |"
        )
    lines.append("")
    lines.extend(f"- {line}" for line in conversion_totals(result))
    lines.extend(key_diff_markdown(key_diff_json(result)))
    return "\n".join(lines) + "\n"


# -- convert: the key diff, source -> output ----------------------------------------------------

SHORT_DTYPES = {
    "float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64",
    "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "bool",
}
PROOFS = {
    "bytes": "every kept key compared byte for byte with the source",
    "sha256": "every kept key's sha256 as written compared with the source's",
}
KEY_MARKS = {"removed": "-", "added": "+", "unchanged": "=", "cast": "~", "changed": "!", "unverified": "?",
             "dropped": "-"}
KEY_STYLES = {"removed": "red", "added": "green", "unchanged": "dim", "cast": "yellow", "changed": "bold red",
              "unverified": "yellow", "dropped": "red"}


def key_diff_json(result: "ConversionResult") -> dict[str, Any] | None:
    """The key diff of a conversion (``result.key_diff``) as a JSON-ready document, in full: per
    block every key removed and added, then outside blocks every key unchanged (proven), cast,
    changed, not compared, dropped and added, each with its shape and dtype; the totals."""
    report = getattr(result, "key_diff", None)
    if report is None:
        return None
    from .diff import comparison_json, entry_json

    diff = report.diff
    output = result.state_dict

    def entry(key: str) -> dict[str, Any]:
        tensor = output[key]
        return {"key": key, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}

    return {
        "proof": report.proof,
        "totals": dict(report.totals),
        "blocks": [{"name": b.name, "family": b.family, "removed": [entry_json(e) for e in b.removed],
                    "added": [entry_json(e) for e in b.added]} for b in diff.blocks],
        "unchanged": [entry(k) for k in diff.unchanged],
        "cast": [comparison_json(c) for c in report.cast],
        "changed": [comparison_json(c) for c in diff.changed],
        "unverified": [entry(k) for k in diff.unverified],
        "unverified_reason": report.unverified_reason,
        "dropped": [entry_json(e) for e in diff.dropped],
        "added": [entry_json(e) for e in diff.added],
    }


def _shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


def _local(key: str, block: str) -> str:
    return key[len(block) + 1:] if block and key.startswith(block + ".") else key


def grouped_keys(entries: Sequence[dict], block: str = "") -> list[tuple[str, str]]:
    """Keys of one side of a block, siblings with the same shape and dtype written once:
    ``("rbr_dense.bn.{weight,bias,running_mean,running_var}", "[64] f32")``. Names are local to
    ``block``; order is kept, each group at its first member."""
    groups: dict[tuple, list[str]] = {}
    for e in entries:
        parent, _, leaf = _local(e["key"], block).rpartition(".")
        groups.setdefault((parent, tuple(e["shape"]), e["dtype"]), []).append(leaf)
    lines = []
    for (parent, shape, dtype), leaves in groups.items():
        dot = parent + "." if parent else ""
        name = dot + leaves[0] if len(leaves) == 1 else dot + "{" + ",".join(leaves) + "}"
        short = "→".join(SHORT_DTYPES.get(d, d) for d in dtype.split("→"))
        lines.append((name, f"{_shape(shape)} {short}"))
    return lines


def _cast_entry(c: dict) -> dict:
    return {"key": c["key"], "shape": c["shape_b"], "dtype": f"{c['dtype_a']}→{c['dtype_b']}"}


def _changed_entry(c: dict) -> dict:
    dtype = c["dtype_a"] if c["dtype_a"] == c["dtype_b"] else f"{c['dtype_a']}→{c['dtype_b']}"
    return {"key": c["key"], "shape": c["shape_b"], "dtype": dtype}


def _outside(document: dict) -> list[tuple[str, list[dict]]]:
    """The keys outside blocks, by kind, in the order they are shown (empty kinds left out)."""
    kinds = [("changed", [_changed_entry(c) for c in document["changed"]]),
             ("unverified", document["unverified"]), ("unchanged", document["unchanged"]),
             ("cast", [_cast_entry(c) for c in document["cast"]]), ("dropped", document["dropped"]),
             ("added", document["added"])]
    return [(kind, entries) for kind, entries in kinds if entries]


def key_diff_counts(document: dict) -> str:
    """``94 removed, 14 added, 2 unchanged (bit-identical), 0 dropped`` (cast, changed and not
    compared only when there are some)."""
    t = document["totals"]
    parts = [f"{t['removed']} removed", f"{t['added']} added", f"{t['unchanged']} unchanged (bit-identical)"]
    parts += [f"{t['cast']} cast"] if t["cast"] else []
    parts += [f"{t['changed']} CHANGED"] if t["changed"] else []
    parts += [f"{t['unverified']} not compared"] if t["unverified"] else []
    parts.append(f"{t['dropped']} dropped")
    return ", ".join(parts)


def _sizes(t: dict) -> str:
    return f"keys {t['source_keys']:,} → {t['output_keys']:,}, {human_size(t['bytes_before'])} → {human_size(t['bytes_after'])}"


def _key_diff_headline(document: dict) -> Text:
    """The counts, each coloured as its keys are (when there are some)."""
    t = document["totals"]
    text = Text("key diff: ")
    counts = [("removed", f"{t['removed']} removed"), ("added", f"{t['added']} added"),
              ("unchanged", f"{t['unchanged']} unchanged (bit-identical)")]
    counts += [("cast", f"{t['cast']} cast")] if t["cast"] else []
    counts += [("changed", f"{t['changed']} CHANGED")] if t["changed"] else []
    counts += [("unverified", f"{t['unverified']} not compared")] if t["unverified"] else []
    counts.append(("dropped", f"{t['dropped']} dropped"))
    for i, (kind, words) in enumerate(counts):
        text.append(", " if i else "")
        text.append(words, style=KEY_STYLES[kind] if kind != "unchanged" and t[kind] else "")
    return text


def _key_line(kind: str, name: str, detail: str) -> Text:
    return Text(f"{KEY_MARKS[kind]} {printable(name)} {detail}", style=KEY_STYLES[kind])


def _outside_lines(document: dict) -> list[Text]:
    """What needs saying even when the diff is collapsed: changes, casts, keys not compared."""
    lines = []

    def names(items: list[dict]) -> str:
        return ", ".join(printable(c["key"]) for c in items[:6]) + (" …" if len(items) > 6 else "")

    if document["changed"]:
        lines.append(Text(f"{len(document['changed'])} key(s) outside blocks CHANGED (not bit-identical to the "
                          f"source): {names(document['changed'])}", style="bold red"))
    if document["cast"]:
        dtypes = sorted({c["dtype_b"] for c in document["cast"]})
        lines.append(Text(f"{len(document['cast'])} key(s) outside blocks cast to {', '.join(dtypes)} by --dtype "
                          f"(each exactly the source tensor's cast): {names(document['cast'])}", style="yellow"))
    if document["unverified"]:
        lines.append(Text(f"{len(document['unverified'])} key(s) outside blocks not compared: "
                          f"{document['unverified_reason'] or 'no data'}", style="yellow"))
    return lines


def key_diff_renderables(result: "ConversionResult", expanded: bool = False) -> list[Any]:
    """The key diff for the terminal: collapsed, the totals (and what changed outside blocks);
    expanded (``--diff``), a tree with every key by block, then the totals.

    Removed keys are red (``-``), added green (``+``), unchanged dim (``=``), cast yellow (``~``),
    changed bold red (``!``); siblings with the same shape and dtype are written once
    (:func:`grouped_keys`), names local to their block."""
    document = key_diff_json(result)
    if document is None:
        return []
    sizes = _sizes(document["totals"])
    if not expanded:
        return [_key_diff_headline(document), Text(f"  {sizes}; --diff lists every key by block", style="dim"),
                *_outside_lines(document)]
    tree = Tree(Text("key diff, source → output", style="bold"))
    for block in document["blocks"]:
        node = tree.add(Text(f"{printable(block['name'] or '<root>')} ({printable(block['family'])}): "
                             f"{len(block['removed'])} removed, {len(block['added'])} added"))
        for kind in ("removed", "added"):
            for name, detail in grouped_keys(block[kind], block["name"]):
                node.add(_key_line(kind, name, detail))
    outside = _outside(document)
    if outside:
        node = tree.add(Text("outside blocks: " + ", ".join(f"{len(e)} {k}" for k, e in outside)))
        for kind, entries in outside:
            for name, detail in grouped_keys(entries):
                node.add(_key_line(kind, name, detail + (" (training-only)" if kind == "dropped" else "")))
    proof = f"  outside blocks: {PROOFS.get(document['proof'], document['proof'])}"
    return [tree, _key_diff_headline(document), Text(f"  {sizes}", style="dim"), Text(proof, style="dim"),
            *_outside_lines(document)]


def key_diff_markdown(document: dict | None) -> list[str]:
    """The key diff as Markdown lines, in full: the totals, then per block (and outside blocks) a
    collapsible ``<details>`` holding a ``diff`` code block with one line per key."""
    if document is None:
        return []
    import html

    t = document["totals"]
    lines = ["", "## Key diff (source → output)", "",
             f"- {key_diff_counts(document)}; {_sizes(t)}",
             f"- outside blocks: {PROOFS.get(document['proof'], document['proof'])}"]
    if document["unverified"]:
        lines.append(f"- not compared: {document['unverified_reason'] or 'no data'}")

    def details(summary: str, rows: list[str]) -> list[str]:
        return ["", f"<details><summary>{summary}</summary>", "", "```diff", *rows, "```", "", "</details>"]

    def row(kind: str, e: dict, note: str = "") -> str:
        mark = " " if kind == "unchanged" else KEY_MARKS[kind]
        return f"{mark} {printable(e['key'])} {_shape(e['shape'])} {printable(e['dtype'])}{note}"

    for block in document["blocks"]:
        summary = (f"<code>{html.escape(printable(block['name'] or '<root>'))}</code> "
                   f"({html.escape(printable(block['family']))}): {len(block['removed'])} removed, "
                   f"{len(block['added'])} added")
        lines += details(summary, [row("removed", e) for e in block["removed"]] + [row("added", e) for e in block["added"]])
    outside = _outside(document)
    if outside:
        notes = {"unchanged": "", "cast": " (cast)", "changed": " (CHANGED)", "unverified": " (not compared)",
                 "dropped": " (dropped: training-only)", "added": ""}
        rows = [row(kind, e, notes[kind]) for kind, entries in outside for e in entries]
        lines += details("outside blocks: " + ", ".join(f"{len(e)} {k}" for k, e in outside), rows)
    return lines


# -- verify ------------------------------------------------------------------------------------


def _check_json(c: "BlockCheck") -> dict:
    return {"name": c.name, "max_abs_err": _num(c.max_abs_err), "rel_err": _num(c.rel_err), "rtol": c.rtol,
            "atol": c.atol, "ok": c.ok, "problem": c.problem}


def verify_json(report: "VerifyReport", path: str, against: str | None) -> dict[str, Any]:
    blocks = natural_sorted(report.blocks, lambda c: c.name)
    return {
        "command": "verify", "ok": report.ok, "path": path, "against": against,
        "blocks": [_check_json(c) for c in blocks],
        "failed_blocks": [c.name for c in natural_sorted(report.failures, lambda c: c.name)],
        "problems": list(report.problems), "notes": list(report.notes),
        "model_check": model_check_json(report.model_check),
    }


def verify_table(report: "VerifyReport", title: str | None = None) -> FittedTable:
    blocks = natural_sorted(report.blocks, lambda c: c.name)
    ok = [c.ok for c in blocks]
    columns = [
        Column("block", [printable(c.name or "<root>") for c in blocks], shrink="start", tiers=NAME_TIERS),
        Column("max abs err", [_err(c.max_abs_err) for c in blocks], justify="right"),
        Column("rel err", [_err(c.rel_err) for c in blocks], justify="right"),
        Column("rtol", [f"{c.rtol:g}" for c in blocks], justify="right"),
        Column("", ["ok" if o else "FAIL" for o in ok], styles=["green" if o else "bold red" for o in ok]),
        Column("problem", [printable(c.problem or "") for c in blocks], shrink="fold", tiers={2: 12}),
    ]
    return FittedTable(columns, title=title)


# -- inspect -----------------------------------------------------------------------------------


def summary_json(summary: "CheckpointSummary") -> dict[str, Any]:
    blocks = natural_sorted(summary.blocks, lambda b: b.name)
    return {
        "command": "inspect", "path": summary.path, "format": summary.format, "file_size": summary.file_size,
        "sha256": summary.sha256, "container_keys": list(summary.container_keys), "entry": summary.entry,
        "notes": list(summary.notes), "pickled_model": summary.pickled_model,
        "tensors": summary.num_tensors, "parameters": summary.num_params, "dtypes": summary.dtypes,
        "form": summary.form,
        "blocks": [
            {"name": b.name, "family": b.family, "form": b.form, "in_channels": b.in_channels,
             "out_channels": b.out_channels, "kernel": list(b.kernel), "groups": b.groups,
             "identity": b.identity, "branches": list(b.branches)}
            for b in blocks
        ],
        "unfused_blocks": [b.name for b in natural_sorted(summary.train_blocks, lambda b: b.name)],
        "unrecognised": [{"prefix": p, "description": d} for p, d in summary.unrecognised],
        "other_keys": summary.other_keys, "other_prefixes": summary.other_prefixes,
        "metadata": _metadata_summary(summary.metadata),
        "problems": list(summary.problems),
    }


def _metadata_summary(metadata: dict | None) -> dict | None:
    if not metadata:
        return None
    return {
        "tool": metadata.get("tool"), "version": metadata.get("version"), "mode": metadata.get("mode"),
        "source": metadata.get("source"), "options": metadata.get("options"),
        "blocks": len(metadata.get("blocks", [])), "dropped_keys": metadata.get("dropped_keys", []),
        "worst_rel_err": _num(max((b.get("rel_err") or 0.0 for b in metadata.get("blocks", [])), default=0.0)),
        "model_check": metadata.get("model_check"),
    }


def plain_value(value: Any) -> str:
    """A recorded value in words, never a Python repr: None "default", lists joined or "none",
    booleans "yes"/"no", dicts as ``key value`` pairs."""
    if value is None:
        return "default"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(plain_value(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return "; ".join(f"{printable(k)} {plain_value(v)}" for k, v in value.items()) if value else "none"
    return printable(value)


def _entry_lines(summary: "CheckpointSummary") -> tuple[list[str], list[str]]:
    """The one line about the entry used (the loader's note when it says more), and the other notes."""
    if not summary.entry:
        return [], [printable(n) for n in summary.notes]
    about_entry = [n for n in summary.notes if n.startswith("used ") and repr(summary.entry) in n]
    others = [printable(n) for n in summary.notes if n not in about_entry]
    plain = {f"used entry {summary.entry!r}"}
    if about_entry and about_entry[0] not in plain:
        return [f"entry used: {printable(summary.entry)} ({printable(about_entry[0])})"], others
    return [f"entry used: {printable(summary.entry)}"], others


def summary_tree(summary: "CheckpointSummary") -> Tree:
    """The inspect report: file facts, blocks by family, keys outside blocks, metadata."""
    tree = Tree(Text(printable(summary.path), style="bold"))
    facts = tree.add("file")
    facts.add(_text(f"format: {summary.format}, {human_size(summary.file_size)}, sha256 {summary.sha256[:16]}…"))
    if summary.container_keys:
        facts.add(_text(f"container keys: {', '.join(map(str, summary.container_keys))}"))
    entry, notes = _entry_lines(summary)
    for line in entry:
        facts.add(_text(line))
    if summary.pickled_model:
        facts.add(_text(f"pickled model: {summary.pickled_model}"))
    for note in notes:
        facts.add(_text(note))
    facts.add(_text(f"{summary.num_tensors} tensors, {summary.num_params:,} parameters; dtypes: "
                    + ", ".join(f"{k} ×{v}" for k, v in summary.dtypes.items())))
    tree.add(Text.assemble("form: ", (summary.form, "bold")))
    by_family: dict[tuple[str, str], list] = {}
    for b in natural_sorted(summary.blocks, lambda b: b.name):
        by_family.setdefault((b.family, b.form), []).append(b)
    any_unknown = False
    for (family, form), blocks in by_family.items():
        node = tree.add(_text(f"{family} blocks ({form} form): {len(blocks)}"))
        columns = [
            Column("block", [printable(b.name or "<root>") for b in blocks], shrink="start", tiers=NAME_TIERS),
            Column("in", [_known(b.in_channels) for b in blocks], justify="right"),
            Column("out", [str(b.out_channels) for b in blocks], justify="right"),
            Column("kernel", [_pair(b.kernel) for b in blocks]),
            Column("groups", [_known(b.groups) for b in blocks], justify="right"),
        ]
        if form == "train":
            columns.append(Column("identity", ["yes" if b.identity else "no" if b.identity is not None else UNKNOWN
                                               for b in blocks]))
        any_unknown = any_unknown or any(b.in_channels is None or b.groups is None for b in blocks)
        node.add(FittedTable(columns))
    if any_unknown:
        tree.add("unknown: a state dict does not store groups, so a block without an identity branch does not "
                 "tell its input channels (in = weight.shape[1] × groups); the fused kernel does not depend on them")
    if summary.form in ("mixed", "deploy") and summary.train_blocks:
        tree.add(Text(f"unfused blocks left: {len(summary.train_blocks)}", style="yellow"))
    others = tree.add(f"keys outside blocks: {summary.other_keys}")
    if summary.other_prefixes:
        others.add(_text(", ".join(f"{k} ({v})" for k, v in list(summary.other_prefixes.items())[:20])))
    meta = _metadata_summary(summary.metadata)
    if meta:
        node = tree.add("recorded by repvgg convert")
        node.add(_text(f"version {meta['version']}, {meta['mode']}, {meta['blocks']} block(s), worst rel err "
                       f"{_err(meta['worst_rel_err'] or 0.0)}"))
        src = meta.get("source") or {}
        digest = src.get("sha256")
        node.add(_text(f"source {src.get('name') or UNKNOWN} (sha256 {str(digest)[:16] + '…' if digest else UNKNOWN})"))
        options = meta.get("options")
        if isinstance(options, dict):
            node.add(_text("options: " + plain_value(options)))
        elif options is not None:
            node.add(_text(f"options: {plain_value(options)}"))
    for prefix, description in natural_sorted(summary.unrecognised, lambda u: u[0]):
        tree.add(Text(f"not recognised: {printable(prefix or '<root>')} ({printable(description)})", style="yellow"))
    for problem in summary.problems:
        tree.add(Text(f"problem: {printable(problem)}", style="red"))
    return tree


# -- families ----------------------------------------------------------------------------------


def families_rows() -> list[dict[str, str]]:
    from .families import FAMILIES

    return [
        {"name": f.name, "title": f.title, "train_keys": f.train_keys, "deploy_keys": f.deploy_keys,
         "after_sum": f.after_sum, "default_eps": f"{f.default_eps:g}", "source": f.source}
        for f in FAMILIES
    ]


def families_table() -> Table:
    table = Table(title="Supported block families", title_justify="left")
    for column in ("name", "what", "train keys (per block)", "deploy keys", "after the sum", "eps"):
        table.add_column(column, overflow="fold")
    for row in families_rows():
        table.add_row(*(_text(row[k]) for k in ("name", "title", "train_keys", "deploy_keys", "after_sum",
                                                "default_eps")))
    return table


def families_markdown() -> str:
    """The README's family table, generated from the registry."""
    lines = ["| family | what | train keys (per block) | deploy keys | after the sum | default eps |",
             "|---|---|---|---|---|---|"]
    for row in families_rows():
        lines.append(f"| `{row['name']}` | {row['title']} | `{row['train_keys']}` | `{row['deploy_keys']}` | "
                     f"{row['after_sum']} | {row['default_eps']} |")
    return "\n".join(lines)

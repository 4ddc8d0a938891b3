"""What ``repvgg inspect`` shows (a checkpoint's summary as JSON or a tree) and the families
table (``repvgg families``, the README's table)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from ..families import FAMILIES
from .text import (
    NAME_TIERS,
    UNKNOWN,
    Column,
    FittedTable,
    err_text,
    finite_or_none,
    human_size,
    known_text,
    natural_sorted,
    pair_text,
    plain_text,
    printable,
)

if TYPE_CHECKING:  # the core imports torch; keep `repvgg --help` fast
    from ..inspection import CheckpointSummary

def summary_json(summary: CheckpointSummary) -> dict[str, Any]:
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
        "worst_rel_err": finite_or_none(max((b.get("rel_err") or 0.0 for b in metadata.get("blocks", [])), default=0.0)),
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


def _entry_lines(summary: CheckpointSummary) -> tuple[list[str], list[str]]:
    """The one line about the entry used (the loader's note when it says more), and the other notes."""
    if not summary.entry:
        return [], [printable(n) for n in summary.notes]
    about_entry = [n for n in summary.notes if n.startswith("used ") and repr(summary.entry) in n]
    others = [printable(n) for n in summary.notes if n not in about_entry]
    plain = {f"used entry {summary.entry!r}"}
    if about_entry and about_entry[0] not in plain:
        return [f"entry used: {printable(summary.entry)} ({printable(about_entry[0])})"], others
    return [f"entry used: {printable(summary.entry)}"], others


def summary_tree(summary: CheckpointSummary) -> Tree:
    """The inspect report: file facts, blocks by family, keys outside blocks, metadata."""
    tree = Tree(Text(printable(summary.path), style="bold"))
    facts = tree.add("file")
    facts.add(plain_text(f"format: {summary.format}, {human_size(summary.file_size)}, sha256 {summary.sha256[:16]}…"))
    if summary.container_keys:
        facts.add(plain_text(f"container keys: {', '.join(map(str, summary.container_keys))}"))
    entry, notes = _entry_lines(summary)
    for line in entry:
        facts.add(plain_text(line))
    if summary.pickled_model:
        facts.add(plain_text(f"pickled model: {summary.pickled_model}"))
    for note in notes:
        facts.add(plain_text(note))
    facts.add(plain_text(f"{summary.num_tensors} tensors, {summary.num_params:,} parameters; dtypes: "
                    + ", ".join(f"{k} ×{v}" for k, v in summary.dtypes.items())))
    tree.add(Text.assemble("form: ", (summary.form, "bold")))
    by_family: dict[tuple[str, str], list] = {}
    for b in natural_sorted(summary.blocks, lambda b: b.name):
        by_family.setdefault((b.family, b.form), []).append(b)
    any_unknown = False
    for (family, form), blocks in by_family.items():
        node = tree.add(plain_text(f"{family} blocks ({form} form): {len(blocks)}"))
        columns = [
            Column("block", [printable(b.name or "<root>") for b in blocks], shrink="start", tiers=NAME_TIERS),
            Column("in", [known_text(b.in_channels) for b in blocks], justify="right"),
            Column("out", [str(b.out_channels) for b in blocks], justify="right"),
            Column("kernel", [pair_text(b.kernel) for b in blocks]),
            Column("groups", [known_text(b.groups) for b in blocks], justify="right"),
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
        others.add(plain_text(", ".join(f"{k} ({v})" for k, v in list(summary.other_prefixes.items())[:20])))
    meta = _metadata_summary(summary.metadata)
    if meta:
        node = tree.add("recorded by repvgg convert")
        node.add(plain_text(f"version {meta['version']}, {meta['mode']}, {meta['blocks']} block(s), worst rel err "
                       f"{err_text(meta['worst_rel_err'] or 0.0)}"))
        src = meta.get("source") or {}
        digest = src.get("sha256")
        node.add(plain_text(f"source {src.get('name') or UNKNOWN} (sha256 {str(digest)[:16] + '…' if digest else UNKNOWN})"))
        options = meta.get("options")
        if isinstance(options, dict):
            node.add(plain_text("options: " + plain_value(options)))
        elif options is not None:
            node.add(plain_text(f"options: {plain_value(options)}"))
    for prefix, description in natural_sorted(summary.unrecognised, lambda u: u[0]):
        tree.add(Text(f"not recognised: {printable(prefix or '<root>')} ({printable(description)})", style="yellow"))
    for problem in summary.problems:
        tree.add(Text(f"problem: {printable(problem)}", style="red"))
    return tree


# -- families ----------------------------------------------------------------------------------


def families_rows() -> list[dict[str, str]]:
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
        table.add_row(*(plain_text(row[k]) for k in ("name", "title", "train_keys", "deploy_keys", "after_sum",
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

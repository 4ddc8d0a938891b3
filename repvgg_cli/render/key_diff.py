"""A conversion's key diff, source -> output: JSON (every key), the terminal's totals or tree
(``--diff``), Markdown (a collapsible block per block)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.text import Text
from rich.tree import Tree

from ..diff.compare import comparison_json, entry_json
from .text import human_size, printable

if TYPE_CHECKING:  # the core imports torch; keep `repvgg --help` fast
    from ..pipeline.report import ConversionResult

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


def key_diff_json(result: ConversionResult) -> dict[str, Any] | None:
    """The key diff of a conversion (``result.key_diff``) as a JSON-ready document, in full: per
    block every key removed and added, then outside blocks every key unchanged (proven), cast,
    changed, not compared, dropped and added, each with its shape and dtype; the totals."""
    report = getattr(result, "key_diff", None)
    if report is None:
        return None
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


def key_diff_renderables(result: ConversionResult, expanded: bool = False) -> list[Any]:
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

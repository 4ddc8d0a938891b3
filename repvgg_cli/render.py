"""Results to Rich tables and trees, JSON documents and Markdown. Decides nothing."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table
from rich.tree import Tree

if TYPE_CHECKING:  # the core imports torch; keep `repvgg --help` fast
    from .convert import ConversionResult
    from .inspection import CheckpointSummary
    from .verify import BlockCheck, ModelCheck, VerifyReport


def printable(text: object) -> str:
    """``text`` on one line, safe for a terminal: every character that is not printable (newline,
    tab, escape, other control and format characters) is written as Python writes it in a ``repr``
    (``\\n``, ``\\t``, ``\\x1b``, ``\\u200b``); everything else is kept as it is."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _num(value: float) -> float | None:
    """JSON has no Inf/NaN: they become null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _err(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.1e}"


def _status(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[bold red]FAIL[/]"


def _pair(p: tuple[int, int] | list[int]) -> str:
    return f"{p[0]}x{p[1]}"


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


# -- convert -----------------------------------------------------------------------------------


def model_check_json(check: "ModelCheck | None") -> dict | None:
    if check is None:
        return None
    return {
        "input_shape": list(check.input_shape), "dtype": check.dtype, "outputs": check.outputs,
        "max_abs_err": _num(check.max_abs_err), "rel_err": _num(check.rel_err),
        "rtol": check.rtol, "atol": check.atol, "ok": check.ok, "problem": check.problem,
    }


def conversion_json(result: "ConversionResult", source: str | None = None, output: str | None = None,
                    written: bool = False) -> dict[str, Any]:
    """The convert report as one JSON-ready document."""
    blocks = []
    for r in result.blocks:
        f = r.fused
        blocks.append({
            "name": r.block.name, "family": r.block.family, "branches": list(r.block.branch_labels),
            "in_channels": f.in_channels, "out_channels": f.out_channels, "kernel": list(f.kernel_size),
            "groups": f.groups if r.block.branches.groups_known else None,
            "stride": list(f.stride) if r.block.branches.geometry_known else None, "dtype": str(f.weight.dtype).replace("torch.", ""),
            "eps_from": r.block.eps_note,
            "params_before": r.params_before, "params_after": r.params_after,
            "max_abs_err": _num(r.check.max_abs_err), "rel_err": _num(r.check.rel_err),
            "cast_abs_err": _num(r.check.cast_abs_err), "rtol": r.check.rtol, "ok": r.check.ok,
        })
    return {
        "command": "convert", "ok": result.ok, "source": source, "output": output, "written": written,
        "mode": result.mode,
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
    }


def _branches(labels: tuple[str, ...]) -> str:
    return " ".join(label.replace("+bn", "") for label in labels)


def _groups(fused, block) -> str:
    return str(fused.groups) if block.branches.groups_known else "?"


def conversion_table(result: "ConversionResult", title: str = "Fused blocks") -> Table:
    """Per-block table: block, family, branches, kernel, groups, params before→after, errors, status."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, caption="g ?: groups not stored in a state dict "
                  "(the fused kernel does not depend on them)" if any(
                      _groups(r.fused, r.block) == "?" for r in result.blocks) else None, caption_justify="left")
    table.add_column("block", overflow="fold", min_width=min(12, max((len(r.block.name) for r in result.blocks), default=5)))
    table.add_column("family", no_wrap=True)
    table.add_column("branches", overflow="fold")
    table.add_column("k", justify="right", no_wrap=True)
    table.add_column("g", justify="right", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("max abs", justify="right", no_wrap=True)
    table.add_column("rel err", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, min_width=4)
    for r in result.blocks:
        f = r.fused
        table.add_row(
            r.block.name or "<root>", r.block.family, _branches(r.block.branch_labels), _pair(f.kernel_size),
            _groups(f, r.block), f"{r.params_before:,}→{r.params_after:,}", _err(r.check.max_abs_err),
            _err(r.check.rel_err), _status(r.check.ok),
        )
    return table


def conversion_totals(result: "ConversionResult") -> list[str]:
    """Lines under the table: totals, whole-model check, dropped keys."""
    lines = [
        f"{len(result.blocks)} block(s) fused ({result.mode}), {len(result.failures)} failed; "
        f"block parameters {result.params_before:,} → {result.params_after:,}; "
        f"worst relative error {_err(max((r.check.rel_err for r in result.blocks), default=0.0))}",
    ]
    if result.mode == "key tree":
        lines.append(f"{result.passthrough_keys} other key(s) passed through unchanged")
    eps = sorted({r.block.eps_note for r in result.blocks if _block_eps(r)})
    values = sorted({e for r in result.blocks for e in _block_eps(r)})
    if values:
        lines.append(f"BatchNorm eps: {', '.join(f'{v:g}' for v in values)} (from {', '.join(eps)})")
    dtypes = sorted({str(r.fused.weight.dtype).replace('torch.', '') for r in result.blocks})
    if any(d in ("float16", "bfloat16") for d in dtypes):
        worst = max(r.check.cast_abs_err / r.check.scale if r.check.scale else 0.0 for r in result.blocks)
        lines.append(f"written as {', '.join(dtypes)}: the cast from float64 adds up to {_err(worst)} relative error")
    if result.model_check is not None:
        mc = result.model_check
        lines.append(
            f"whole model ({mc.dtype}, input {tuple(mc.input_shape)}): max abs err {_err(mc.max_abs_err)}, "
            f"rel err {_err(mc.rel_err)} (rtol {mc.rtol:g}) {_status(mc.ok)}"
        )
    if result.dropped_keys:
        shown = ", ".join(result.dropped_keys[:6]) + (" …" if len(result.dropped_keys) > 6 else "")
        lines.append(f"dropped {len(result.dropped_keys)} training-only key(s): {shown}")
    for prefix, description in result.unrecognised:
        lines.append(f"not recognised: {prefix or '<root>'} looks like a multi-branch block ({description}) "
                     "that no family claims; left as it is")
    lines.extend(result.notes)
    return lines


def _block_eps(r) -> list[float]:
    b = r.block.branches
    bns = [c.bn for c in b.convs if c.bn is not None]
    if b.identity is not None and b.identity.bn is not None:
        bns.append(b.identity.bn)
    if b.post_bn is not None:
        bns.append(b.post_bn)
    return [bn.eps for bn in bns]


def conversion_markdown(result: "ConversionResult", source: str | None = None, output: str | None = None) -> str:
    """The convert report as Markdown (for ``--report FILE.md``)."""
    lines = [
        "# repvgg convert report", "",
        f"- source: `{source}`" if source else "- source: (in memory)",
        f"- output: `{output}`" if output else "- output: (not written)",
        f"- result: {'equivalent' if result.ok else 'NOT equivalent'}", "",
        "| block | family | branches | kernel | groups | params before → after | max abs err | rel err | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.blocks:
        f = r.fused
        lines.append(
            f"| `{r.block.name or '<root>'}` | {r.block.family} | {' + '.join(r.block.branch_labels)} | "
            f"{_pair(f.kernel_size)} | {f.groups} | {r.params_before:,} → {r.params_after:,} | "
            f"{_err(r.check.max_abs_err)} | {_err(r.check.rel_err)} | {'yes' if r.check.ok else '**no**'} |"
        )
    lines.append("")
    lines.extend(f"- {line}".replace("[green]", "").replace("[bold red]", "").replace("[/]", "")
                 for line in conversion_totals(result))
    return "\n".join(lines) + "\n"


# -- verify ------------------------------------------------------------------------------------


def _check_json(c: "BlockCheck") -> dict:
    return {"name": c.name, "max_abs_err": _num(c.max_abs_err), "rel_err": _num(c.rel_err), "rtol": c.rtol,
            "ok": c.ok, "problem": c.problem}


def verify_json(report: "VerifyReport", path: str, against: str | None) -> dict[str, Any]:
    return {
        "command": "verify", "ok": report.ok, "path": path, "against": against,
        "blocks": [_check_json(c) for c in report.blocks],
        "failed_blocks": [c.name for c in report.failures],
        "problems": list(report.problems), "notes": list(report.notes),
        "model_check": model_check_json(report.model_check),
    }


def verify_table(report: "VerifyReport", title: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("block", "max abs err", "rel err", "rtol", "", "problem"):
        table.add_column(column, justify="right" if "err" in column or column == "rtol" else "left",
                         no_wrap=column == "block")
    for c in report.blocks:
        table.add_row(c.name or "<root>", _err(c.max_abs_err), _err(c.rel_err), f"{c.rtol:g}", _status(c.ok),
                      c.problem or "")
    return table


# -- inspect -----------------------------------------------------------------------------------


def summary_json(summary: "CheckpointSummary") -> dict[str, Any]:
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
            for b in summary.blocks
        ],
        "unfused_blocks": [b.name for b in summary.train_blocks],
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


def summary_tree(summary: "CheckpointSummary") -> Tree:
    """The inspect report: file facts, blocks by family, keys outside blocks, metadata."""
    tree = Tree(f"[bold]{summary.path}[/]")
    facts = tree.add("file")
    facts.add(f"format: {summary.format}, {human_size(summary.file_size)}, sha256 {summary.sha256[:16]}…")
    if summary.container_keys:
        facts.add(f"container keys: {', '.join(summary.container_keys)}")
    if summary.entry:
        facts.add(f"entry used: {summary.entry}")
    if summary.pickled_model:
        facts.add(f"pickled model: {summary.pickled_model}")
    for note in summary.notes:
        facts.add(note)
    facts.add(f"{summary.num_tensors} tensors, {summary.num_params:,} parameters; dtypes: "
              + ", ".join(f"{k} ×{v}" for k, v in summary.dtypes.items()))
    tree.add(f"form: [bold]{summary.form}[/]")
    by_family: dict[tuple[str, str], list] = {}
    for b in summary.blocks:
        by_family.setdefault((b.family, b.form), []).append(b)
    for (family, form), blocks in by_family.items():
        node = tree.add(f"{family} blocks ({form} form): {len(blocks)}")
        table = Table(show_header=True, box=None, pad_edge=False)
        for column in ("block", "in → out", "kernel", "groups", "identity"):
            table.add_column(column)
        for b in blocks:
            table.add_row(
                b.name or "<root>", f"{b.in_channels if b.in_channels is not None else '?'} → {b.out_channels}",
                _pair(b.kernel), "?" if b.groups is None else str(b.groups),
                "" if b.identity is None else ("yes" if b.identity else "no"),
            )
        node.add(table)
    if summary.form in ("mixed", "deploy") and summary.train_blocks:
        tree.add(f"[yellow]unfused blocks left: {len(summary.train_blocks)}[/]")
    others = tree.add(f"keys outside blocks: {summary.other_keys}")
    if summary.other_prefixes:
        others.add(", ".join(f"{k} ({v})" for k, v in list(summary.other_prefixes.items())[:20]))
    meta = _metadata_summary(summary.metadata)
    if meta:
        node = tree.add("recorded by repvgg convert")
        node.add(f"version {meta['version']}, {meta['mode']}, {meta['blocks']} block(s), worst rel err "
                 f"{_err(meta['worst_rel_err'] or 0.0)}")
        src = meta.get("source") or {}
        node.add(f"source {src.get('name')} (sha256 {str(src.get('sha256'))[:16]}…)")
        node.add(f"options {meta.get('options')}")
    for prefix, description in summary.unrecognised:
        tree.add(f"[yellow]not recognised: {prefix or '<root>'} ({description})[/]")
    for problem in summary.problems:
        tree.add(f"[red]problem: {problem}[/]")
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
        table.add_column(column)
    for row in families_rows():
        table.add_row(row["name"], row["title"], row["train_keys"], row["deploy_keys"], row["after_sum"],
                      row["default_eps"])
    return table


def families_markdown() -> str:
    """The README's family table, generated from the registry."""
    lines = ["| family | what | train keys (per block) | deploy keys | after the sum | default eps |",
             "|---|---|---|---|---|---|"]
    for row in families_rows():
        lines.append(f"| `{row['name']}` | {row['title']} | `{row['train_keys']}` | `{row['deploy_keys']}` | "
                     f"{row['after_sum']} | {row['default_eps']} |")
    return "\n".join(lines)

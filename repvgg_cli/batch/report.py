"""Batch conversion, the report: JSON, the summary table and its totals line (rich imported lazily)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .run import BatchOutcome


def _num(value: float | None) -> float | None:
    return value if value is not None and value == value and abs(value) != float("inf") else None


def batch_json(outcome: BatchOutcome) -> dict[str, Any]:
    """The batch as one JSON document: per source its summary and full convert report."""
    return {
        "command": "convert", "batch": True, "ok": outcome.ok, "exit_code": outcome.exit_code,
        "output_dir": str(outcome.output_dir), "jobs": outcome.jobs,
        "items": [
            {"source": i.source, "output": i.output, "ok": i.ok, "written": i.written, "exit_code": i.exit_code,
             "blocks": i.blocks, "failed_blocks": i.failed_blocks, "worst_rel_err": _num(i.worst_rel_err),
             "error": i.error, "hint": i.hint, "report": i.document}
            for i in outcome.items
        ],
        "totals": {
            "sources": len(outcome.items), "converted": len(outcome.items) - len(outcome.failures),
            "failed": len(outcome.failures), "blocks": sum(i.blocks for i in outcome.items),
        },
    }


def _err(value: float | None) -> str:
    if value is None:
        return ""
    return "inf" if value != value or abs(value) == float("inf") else f"{value:.1e}"


def batch_table(outcome: BatchOutcome):
    """Summary table: source, output, blocks, worst relative error, status or error."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Batch conversion", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("source", overflow="fold")
    table.add_column("output", overflow="fold")
    table.add_column("blocks", justify="right", no_wrap=True)
    table.add_column("worst rel err", justify="right", no_wrap=True)
    table.add_column("status", overflow="fold")
    for i in outcome.items:
        hint = f" (hint: {i.hint})" if i.hint else ""
        status = Text("ok", style="green") if i.ok else Text(f"FAIL (exit {i.exit_code}): {i.error}{hint}", style="red")
        table.add_row(Text(i.source), Text(i.output if i.written else "-"), str(i.blocks) if i.document else "",
                      _err(i.worst_rel_err), status)
    return table


def batch_totals(outcome: BatchOutcome) -> str:
    """One line under the table."""
    converted = len(outcome.items) - len(outcome.failures)
    return (f"{converted} of {len(outcome.items)} source(s) converted into {outcome.output_dir}, "
            f"{len(outcome.failures)} failed ({outcome.jobs} job(s))")


def failed_sources(outcome: BatchOutcome) -> Iterable[str]:
    return (f"{i.source} (exit {i.exit_code})" for i in outcome.failures)

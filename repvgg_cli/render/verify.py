"""A re-check's report (``repvgg verify``): JSON and the per-block table; and the whole-model
check's JSON every report carries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .text import (
    NAME_TIERS,
    Column,
    FittedTable,
    err_text,
    finite_or_none,
    natural_sorted,
    printable,
)

if TYPE_CHECKING:  # the core imports torch; keep `repvgg --help` fast
    from ..checks.tolerance import BlockCheck, ModelCheck
    from ..verify import VerifyReport

def model_check_json(check: ModelCheck | None) -> dict | None:
    if check is None:
        return None
    return {
        "input_shape": list(check.input_shape), "dtype": check.dtype, "outputs": check.outputs,
        "max_abs_err": finite_or_none(check.max_abs_err), "rel_err": finite_or_none(check.rel_err),
        "rtol": check.rtol, "atol": check.atol, "ok": check.ok, "problem": check.problem,
    }


def _check_json(c: BlockCheck) -> dict:
    return {"name": c.name, "max_abs_err": finite_or_none(c.max_abs_err), "rel_err": finite_or_none(c.rel_err), "rtol": c.rtol,
            "atol": c.atol, "ok": c.ok, "problem": c.problem}


def verify_json(report: VerifyReport, path: str, against: str | None) -> dict[str, Any]:
    blocks = natural_sorted(report.blocks, lambda c: c.name)
    return {
        "command": "verify", "ok": report.ok, "path": path, "against": against,
        "blocks": [_check_json(c) for c in blocks],
        "failed_blocks": [c.name for c in natural_sorted(report.failures, lambda c: c.name)],
        "problems": list(report.problems), "notes": list(report.notes),
        "model_check": model_check_json(report.model_check),
    }


def verify_table(report: VerifyReport, title: str | None = None) -> FittedTable:
    blocks = natural_sorted(report.blocks, lambda c: c.name)
    ok = [c.ok for c in blocks]
    columns = [
        Column("block", [printable(c.name or "<root>") for c in blocks], shrink="start", tiers=NAME_TIERS),
        Column("max abs err", [err_text(c.max_abs_err) for c in blocks], justify="right"),
        Column("rel err", [err_text(c.rel_err) for c in blocks], justify="right"),
        Column("rtol", [f"{c.rtol:g}" for c in blocks], justify="right"),
        Column("", ["ok" if o else "FAIL" for o in ok], styles=["green" if o else "bold red" for o in ok]),
        Column("problem", [printable(c.problem or "") for c in blocks], shrink="fold", tiers={2: 12}),
    ]
    return FittedTable(columns, title=title)

"""The convert report: JSON, the per-block table, the lines under it, Markdown (see
:mod:`repvgg_cli.render` for the rules every rendering follows)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .key_diff import key_diff_json, key_diff_markdown
from .text import (
    NAME_TIERS,
    UNKNOWN,
    Column,
    FittedTable,
    count,
    err_text,
    finite_or_none,
    natural_sorted,
    pair_text,
    printable,
)
from .verify import model_check_json

if TYPE_CHECKING:  # the core imports torch; keep `repvgg --help` fast
    from ..pipeline.report import ConversionResult

def _blocks(result: ConversionResult) -> list:
    return natural_sorted(result.blocks, lambda r: r.block.name)


def _block_eps(r) -> list[float]:
    """The eps of every BN of a block's train form (as fused), unique and sorted."""
    b = r.block.branches
    bns = [getattr(c, "bn", None) for c in getattr(b, "convs", ())]
    identity = getattr(b, "identity", None)
    bns += [getattr(identity, "bn", None), getattr(b, "post_bn", None)]
    return sorted({float(bn.eps) for bn in bns if bn is not None and getattr(bn, "eps", None) is not None})


def eps_summary(result: ConversionResult) -> dict[str, Any]:
    """The BN eps the blocks were fused with: the values, and where each came from."""
    values = sorted({e for r in result.blocks for e in _block_eps(r)})
    sources = sorted({r.block.eps_note for r in result.blocks if _block_eps(r)})
    option = getattr(result.options, "bn_eps", None)
    kinds = sorted({getattr(r.block, "eps_source", "module") for r in result.blocks if _block_eps(r)})
    sensitive = [{"block": name, "rel_change_with_1e-3": finite_or_none(rel)} for name, rel in result.eps_sensitive]
    return {"values": values, "sources": sources, "source": kinds, "option": option, "sensitive": sensitive}


def tolerance_summary(result: ConversionResult) -> dict[str, Any]:
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


def conversion_json(result: ConversionResult, source: str | None = None, output: str | None = None,
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
            "max_abs_err": finite_or_none(r.check.max_abs_err), "rel_err": finite_or_none(r.check.rel_err),
            "cast_abs_err": finite_or_none(r.check.cast_abs_err), "rtol": r.check.rtol, "atol": r.check.atol, "ok": r.check.ok,
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
            "max_rel_err": finite_or_none(max((r.check.rel_err for r in result.blocks), default=0.0)),
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


def conversion_table(result: ConversionResult, title: str = "Fused blocks") -> FittedTable:
    """Per-block table: block, family, branches, kernel, groups, params before→after, errors, status."""
    blocks = _blocks(result)
    unknown_groups = any(_groups(r.fused, r.block) == "?" for r in blocks)
    ok = [r.check.ok for r in blocks]
    columns = [
        Column("block", [printable(r.block.name or "<root>") for r in blocks], shrink="start", tiers=NAME_TIERS),
        Column("family", [printable(r.block.family) for r in blocks], shrink="middle", tiers={1: 12, 3: 8, 5: 4}),
        Column("branches", [_branches(r.block.branch_labels) for r in blocks], shrink="fold", tiers={2: 1}),
        Column("k", [pair_text(r.fused.kernel_size) for r in blocks], justify="right"),
        Column("g", [_groups(r.fused, r.block) for r in blocks], justify="right"),
        Column("params", [f"{r.params_before:,} → {r.params_after:,}" for r in blocks], justify="right",
               short=[f"{count(r.params_before)} → {count(r.params_after)}" for r in blocks], short_tier=3,
               shrink="fold", tiers={4: 1}),
        Column("max abs", [err_text(r.check.max_abs_err) for r in blocks], justify="right"),
        Column("rel err", [err_text(r.check.rel_err) for r in blocks], justify="right"),
        Column("", ["ok" if o else "FAIL" for o in ok], styles=["green" if o else "bold red" for o in ok]),
    ]
    caption = "g ?: groups not stored in a state dict (the fused kernel does not depend on them)" if unknown_groups \
        else None
    return FittedTable(columns, title=title, caption=caption)


def conversion_totals(result: ConversionResult) -> list[str]:
    """Lines under the table (plain text, never markup): totals, eps, tolerance, whole-model check,
    dropped keys, notes."""
    lines = [
        f"{len(result.blocks)} block(s) fused ({result.mode}), {len(result.failures)} failed; "
        f"block parameters {result.params_before:,} → {result.params_after:,}; "
        f"worst relative error {err_text(max((r.check.rel_err for r in result.blocks), default=0.0))}",
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
        lines.append(f"written as {', '.join(dtypes)}: the cast from float64 adds up to {err_text(worst)} relative error")
    if result.model_check is not None:
        mc = result.model_check
        lines.append(
            f"whole model ({mc.dtype}, input {tuple(mc.input_shape)}): max abs err {err_text(mc.max_abs_err)}, "
            f"rel err {err_text(mc.rel_err)} (rtol {mc.rtol:g}) {'ok' if mc.ok else 'FAIL'}"
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


def conversion_markdown(result: ConversionResult, source: str | None = None, output: str | None = None) -> str:
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
            f"{pair_text(f.kernel_size)} | {groups} | {eps} ({_md(r.block.eps_note)}) | "
            f"{r.params_before:,} → {r.params_after:,} | "
            f"{err_text(r.check.max_abs_err)} | {err_text(r.check.rel_err)} | {r.check.rtol:g} | "
            f"{'yes' if r.check.ok else '**no**'} |"
        )
    lines.append("")
    lines.extend(f"- {line}" for line in conversion_totals(result))
    lines.extend(key_diff_markdown(key_diff_json(result)))
    return "\n".join(lines) + "\n"

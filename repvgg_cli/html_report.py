"""Convert reports as one self-contained HTML page (``repvgg convert --report FILE.html``).

The page is rendered from the JSON documents the CLI already prints (:func:`repvgg_cli.render.
conversion_json` for one conversion, :func:`repvgg_cli.batch.batch_json` for a batch), so it
shows exactly what ``--json`` says. It needs nothing from the network: inline CSS, inline SVG
charts drawn here (no scripts, no fonts, no external references). Every piece of text from the
checkpoint - block names, paths, messages - is escaped. Same document, same bytes.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from typing import Any

from . import __version__

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { padding: 2px 10px; border-bottom: 1px solid #d0d7de; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, td.name { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.92em; }
.ok { color: #1a7f37; font-weight: 600; } .fail { color: #cf222e; font-weight: 600; }
.error { border-left: 4px solid #cf222e; background: #fff5f5; padding: 0.5em 1em; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 2px 1.5em; }
dl.summary dt { font-weight: 600; } dl.summary dd { margin: 0; }
svg text { font: 11px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; fill: #1f2328; }
svg .grid { stroke: #d0d7de; stroke-width: 1; } svg .tol { stroke: #cf222e; stroke-dasharray: 4 3; }
svg .bar-ok { fill: #2da44e; } svg .bar-fail { fill: #cf222e; }
svg .before { fill: #afb8c1; } svg .after { fill: #0969da; }
footer { margin-top: 3em; color: #656d76; font-size: 0.9em; }
details.keys { margin: 2px 0; } details.keys summary { cursor: pointer; }
ul.keys { list-style: none; margin: 0.2em 0 0.6em; padding-left: 1.5em; font-family: ui-monospace, SFMono-Regular,
          Menlo, Consolas, monospace; font-size: 0.92em; }
li.removed, li.dropped, li.changed { color: #cf222e; } li.added { color: #1a7f37; } li.unchanged { color: #656d76; }
li.cast, li.unverified { color: #9a6700; } li.changed { font-weight: 600; }
.removed-count { color: #cf222e; } .added-count { color: #1a7f37; }
""".strip()

ROW = 18
LABEL_CHARS = 40
CHAR_WIDTH = 6.8
PLOT_WIDTH = 520
VALUE_WIDTH = 200


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _err(value: float | None) -> str:
    """JSON null stands for inf/nan (JSON has neither)."""
    return "inf/nan" if value is None else f"{value:.1e}"


def _kernel(kernel: Sequence[int] | None) -> str:
    return "x".join(str(k) for k in kernel) if kernel else "?"


def _block_name(block: dict) -> str:
    return block["name"] or "<root>"


def _natural(blocks: Sequence[dict]) -> list[dict]:
    """Blocks in natural order of their names (``stages.2.9`` before ``stages.2.10``)."""
    def key(block: dict) -> tuple:
        parts = re.split(r"(\d+)", block.get("name") or "")
        return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))

    return sorted(blocks, key=key)


def _eps(values: Sequence[float] | None) -> str:
    return ", ".join(f"{v:g}" for v in values) if values else "-"


def _short(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "\u2026"


def _label_width(blocks: Sequence[dict]) -> int:
    longest = max((len(_short(_block_name(b))) for b in blocks), default=5)
    return int(min(LABEL_CHARS, max(5, longest)) * CHAR_WIDTH) + 12


def _status(ok: bool, yes: str = "ok", no: str = "FAIL") -> str:
    return f'<span class="ok">{yes}</span>' if ok else f'<span class="fail">{no}</span>'


# -- charts ------------------------------------------------------------------------------------


def _decades(values: Sequence[float]) -> tuple[int, int]:
    positive = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not positive:
        return -16, 0
    low = max(-20, math.floor(math.log10(min(positive))))
    high = min(10, math.ceil(math.log10(max(positive))))
    return low, max(high, low + 1)


def rel_err_chart(blocks: Sequence[dict]) -> str:
    """Inline SVG: each block's relative error as a bar on a log scale, with the tolerance marked.

    Args:
        blocks: the ``blocks`` of a :func:`repvgg_cli.render.conversion_json` document.
    Returns:
        An ``<svg>`` element (empty string when there are no blocks).
    """
    if not blocks:
        return ""
    errors = [b.get("rel_err") for b in blocks]
    tolerances = sorted({b["rtol"] for b in blocks if b.get("rtol")})
    low, high = _decades([*errors, *tolerances])
    left, top = _label_width(blocks), 22
    width, height = left + PLOT_WIDTH + VALUE_WIDTH, top + ROW * len(blocks) + 8

    def x_of(value: float) -> float:
        fraction = (math.log10(value) - low) / (high - low)
        return left + PLOT_WIDTH * min(1.0, max(0.0, fraction))

    parts = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             "<title>relative error per block (log scale)</title>"]
    step = max(1, math.ceil((high - low) / 10))
    for decade in range(low, high + 1, step):
        x = x_of(10.0 ** decade)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 6}"/>')
        parts.append(f'<text x="{x:.1f}" y="{top - 8}" text-anchor="middle">1e{decade}</text>')
    for rtol in tolerances:
        x = x_of(rtol)
        parts.append(f'<line class="tol" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 6}">'
                     f"<title>rtol {_e(f'{rtol:g}')}</title></line>")
    for row, block in enumerate(blocks):
        name, y = _block_name(block), top + ROW * row
        value = block.get("rel_err")
        css = "bar-ok" if block.get("ok") else "bar-fail"
        parts.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end"><title>{_e(name)}</title>'
                     f"{_e(_short(name))}</text>")
        if value is None:
            end = left + PLOT_WIDTH
        elif value <= 0:
            end = left
        else:
            end = x_of(value)
        shown = "0" if value is not None and value <= 0 else _err(value)
        parts.append(f'<rect class="{css}" x="{left}" y="{y + 3}" width="{end - left:.1f}" height="{ROW - 6}">'
                     f"<title>{_e(name)}: rel err {_e(shown)}</title></rect>")
        parts.append(f'<text x="{end + 4:.1f}" y="{y + 13}">{_e(shown)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def params_chart(blocks: Sequence[dict]) -> str:
    """Inline SVG: each block's parameter count before (train form) and after (fused), linear scale.

    Args:
        blocks: the ``blocks`` of a :func:`repvgg_cli.render.conversion_json` document.
    Returns:
        An ``<svg>`` element (empty string when there are no blocks).
    """
    if not blocks:
        return ""
    row = ROW + 6
    left, top = _label_width(blocks), 24
    width, height = left + PLOT_WIDTH + VALUE_WIDTH, top + row * len(blocks) + 8
    scale = max((max(b["params_before"], b["params_after"]) for b in blocks), default=0) or 1
    parts = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             "<title>parameters per block: before (train form) and after (fused)</title>",
             f'<rect class="before" x="{left}" y="4" width="12" height="10"/>'
             f'<text x="{left + 16}" y="13">before</text>',
             f'<rect class="after" x="{left + 80}" y="4" width="12" height="10"/>'
             f'<text x="{left + 96}" y="13">after</text>']
    for index, block in enumerate(blocks):
        name, y = _block_name(block), top + row * index
        before, after = block["params_before"], block["params_after"]
        w_before, w_after = PLOT_WIDTH * before / scale, PLOT_WIDTH * after / scale
        change = f" ({(after - before) / before:+.0%})" if before else ""
        label = f"{before:,} \u2192 {after:,}{change}"
        parts.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end"><title>{_e(name)}</title>'
                     f"{_e(_short(name))}</text>")
        parts.append(f'<rect class="before" x="{left}" y="{y + 2}" width="{w_before:.1f}" height="9">'
                     f"<title>{_e(name)}: {before:,} before</title></rect>")
        parts.append(f'<rect class="after" x="{left}" y="{y + 12}" width="{w_after:.1f}" height="9">'
                     f"<title>{_e(name)}: {after:,} after</title></rect>")
        parts.append(f'<text x="{left + max(w_before, w_after) + 4:.1f}" y="{y + 15}">{_e(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# -- sections ----------------------------------------------------------------------------------


def _block_table(blocks: Sequence[dict]) -> str:
    head = ("block", "family", "branches", "kernel", "groups", "BN eps", "params before \u2192 after", "max abs err",
            "rel err", "rtol", "status")
    rows = ["<table class=\"blocks\">", "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>",
            "<tbody>"]
    for b in blocks:
        groups = "unknown" if b.get("groups") is None else b["groups"]
        eps = _eps(b.get("bn_eps")) + (f" ({b['eps_from']})" if b.get("eps_from") and b.get("bn_eps") else "")
        rtol = "" if b.get("rtol") is None else f"{b['rtol']:g}"
        rows.append(
            "<tr>"
            f'<td class="name">{_e(_block_name(b))}</td><td>{_e(b["family"])}</td>'
            f'<td>{_e(" + ".join(b.get("branches") or ()))}</td><td class="num">{_e(_kernel(b.get("kernel")))}</td>'
            f'<td class="num">{_e(groups)}</td><td>{_e(eps)}</td>'
            f'<td class="num">{b["params_before"]:,} \u2192 {b["params_after"]:,}</td>'
            f'<td class="num">{_e(_err(b.get("max_abs_err")))}</td><td class="num">{_e(_err(b.get("rel_err")))}</td>'
            f'<td class="num">{_e(rtol)}</td>'
            f"<td>{_status(bool(b.get('ok')))}</td>"
            "</tr>"
        )
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _model_check(check: dict | None) -> str:
    if check is None:
        return "none (key tree: there is no model to run; every block is checked on its own)"
    text = (f"input {tuple(check.get('input_shape') or ())}, {check.get('dtype')}: max abs err "
            f"{_err(check.get('max_abs_err'))}, rel err {_err(check.get('rel_err'))} (rtol {check.get('rtol'):g})")
    if check.get("problem"):
        text += f"; {check['problem']}"
    return f"{_e(text)} {_status(bool(check.get('ok')))}"


def _summary(document: dict) -> str:
    totals = document.get("totals") or {}
    before, after = totals.get("params_before", 0), totals.get("params_after", 0)
    reduction = f" ({(after - before) / before:+.1%})" if before else ""
    result = _status(bool(document.get("ok")), "equivalent", "NOT equivalent")
    items = [
        ("source", f"<code>{_e(document.get('source') or '(in memory)')}</code>"),
        ("output", f"<code>{_e(document.get('output') or '-')}</code> "
                   + ("(written)" if document.get("written") else "(not written)")),
        ("result", result),
        ("mode", _e(document.get("mode", ""))),
        ("blocks", f"{totals.get('blocks', 0)} fused, {totals.get('failed', 0)} failed"),
        ("block parameters", f"{before:,} \u2192 {after:,}{_e(reduction)}"),
        ("worst relative error", _e(_err(totals.get("max_rel_err")))),
    ]
    if document.get("mode") == "key tree":
        items.append(("other keys", f"{totals.get('passthrough_keys', 0)} passed through unchanged"))
    eps = document.get("bn_eps")
    if eps is not None:
        from .render.conversion import eps_origin

        items.append(("BatchNorm eps", _e(f"{_eps(eps.get('values'))} ({eps_origin(eps)})" if eps.get("values")
                                          else "none (no block has a BN)")))
        if eps.get("sensitive"):
            worst = max(s["rel_change_with_1e-3"] or 0.0 for s in eps["sensitive"])
            items.append(("eps not decided", _e(f"with eps 1e-3 {len(eps['sensitive'])} block(s) compute differently "
                                                f"beyond the tolerance (up to {worst:.1e} relative); if the model was "
                                                "trained with another eps, pass --bn-eps")))
    tolerance = document.get("tolerance")
    if tolerance is not None:
        used = ", ".join(f"{v:g}" for v in tolerance.get("rtol_used") or ()) or "none"
        asked = f"--rtol {tolerance['rtol']:g}" if tolerance.get("rtol") is not None else "by the dtype written"
        items.append(("tolerance", _e(f"rtol {used} ({asked}), atol {tolerance.get('atol', 0):g}")))
    items.append(("whole-model check", _model_check(document.get("model_check"))))
    dropped = document.get("dropped_keys") or []
    if dropped:
        items.append((f"dropped keys ({len(dropped)})", ", ".join(f"<code>{_e(k)}</code>" for k in dropped)))
    notes = document.get("notes") or []
    if notes:
        items.append(("notes", "<br>".join(_e(n) for n in notes)))
    return '<dl class="summary">\n' + "\n".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items) + "\n</dl>"


def conversion_section(document: dict, heading: str = "h2") -> str:
    """One conversion: summary, per-block table and the two charts (HTML fragment)."""
    sub = "h3" if heading == "h2" else "h4"
    blocks = _natural(document.get("blocks") or [])
    parts = [f"<{heading}>Summary</{heading}>", _summary(document),
             f"<{heading}>Blocks</{heading}>", _block_table(blocks) if blocks else "<p>No block was fused.</p>"]
    if blocks:
        parts += [f"<{sub}>Relative error per block (log scale; dashed: tolerance)</{sub}>", rel_err_chart(blocks),
                  f"<{sub}>Parameters per block, before and after fusion</{sub}>", params_chart(blocks)]
    if document.get("key_diff"):
        parts += [f"<{heading}>Key diff, source \u2192 output</{heading}>", key_diff_section(document["key_diff"])]
    return "\n".join(parts)


KEY_MARKS = {"removed": "-", "added": "+", "unchanged": "=", "cast": "~", "changed": "!", "unverified": "?",
             "dropped": "-"}
KEY_NOTES = {"cast": " (cast)", "changed": " (CHANGED)", "unverified": " (not compared)",
             "dropped": " (dropped: training-only)"}
KEY_PROOFS = {
    "bytes": "every kept key compared byte for byte with the source",
    "sha256": "every kept key's sha256 as written compared with the source's",
}


def _key_item(kind: str, key: str, shape: Sequence[int], dtype: str) -> str:
    shape_text = "[" + ",".join(str(d) for d in shape) + "]"
    return (f'<li class="{kind}">{KEY_MARKS[kind]} <code>{_e(key)}</code> {_e(shape_text)} {_e(dtype)}'
            f"{_e(KEY_NOTES.get(kind, ''))}</li>")


def _key_details(summary: str, items: list[str]) -> str:
    return f'<details class="keys"><summary>{summary}</summary>\n<ul class="keys">\n' + "\n".join(items) + \
        "\n</ul></details>"


def key_diff_section(diff: dict) -> str:
    """The key diff of a conversion: the totals, then one collapsible ``<details>`` per block (every
    key removed and added, with shape and dtype) and one for the keys outside blocks (unchanged,
    cast, changed, not compared, dropped, added). No script: the browser folds them.

    Args:
        diff: the ``key_diff`` of a :func:`repvgg_cli.render.conversion_json` document.
    Returns:
        An HTML fragment.
    """
    t = diff.get("totals") or {}
    counts = [f'<span class="removed-count">{t.get("removed", 0)} removed</span>',
              f'<span class="added-count">{t.get("added", 0)} added</span>',
              f'{t.get("unchanged", 0)} unchanged (bit-identical)']
    counts += [f'{t["cast"]} cast'] if t.get("cast") else []
    counts += [f'<span class="fail">{t["changed"]} CHANGED</span>'] if t.get("changed") else []
    counts += [f'{t["unverified"]} not compared'] if t.get("unverified") else []
    counts.append(f'{t.get("dropped", 0)} dropped')
    proof = KEY_PROOFS.get(diff.get("proof"), diff.get("proof") or "")
    parts = [f"<p>{', '.join(counts)}; keys {t.get('source_keys', 0):,} \u2192 {t.get('output_keys', 0):,}, "
             f"bytes {t.get('bytes_before', 0):,} \u2192 {t.get('bytes_after', 0):,}.<br>"
             f"Outside blocks: {_e(proof)}.</p>"]
    if diff.get("unverified"):
        parts.append(f"<p>Not compared: {_e(diff.get('unverified_reason') or 'no data')}.</p>")
    for block in _natural(diff.get("blocks") or []):
        removed, added = block.get("removed") or [], block.get("added") or []
        summary = (f"<code>{_e(_block_name(block))}</code> ({_e(block.get('family', ''))}): "
                   f'<span class="removed-count">{len(removed)} removed</span>, '
                   f'<span class="added-count">{len(added)} added</span>')
        items = [_key_item("removed", e["key"], e["shape"], e["dtype"]) for e in removed]
        items += [_key_item("added", e["key"], e["shape"], e["dtype"]) for e in added]
        parts.append(_key_details(summary, items))
    outside = [
        ("changed", [(c["key"], c["shape_b"], c["dtype_a"] if c["dtype_a"] == c["dtype_b"]
                      else f"{c['dtype_a']} \u2192 {c['dtype_b']}") for c in diff.get("changed") or []]),
        ("unverified", [(e["key"], e["shape"], e["dtype"]) for e in diff.get("unverified") or []]),
        ("unchanged", [(e["key"], e["shape"], e["dtype"]) for e in diff.get("unchanged") or []]),
        ("cast", [(c["key"], c["shape_b"], f"{c['dtype_a']} \u2192 {c['dtype_b']}") for c in diff.get("cast") or []]),
        ("dropped", [(e["key"], e["shape"], e["dtype"]) for e in diff.get("dropped") or []]),
        ("added", [(e["key"], e["shape"], e["dtype"]) for e in diff.get("added") or []]),
    ]
    outside = [(kind, rows) for kind, rows in outside if rows]
    if outside:
        summary = "outside blocks: " + ", ".join(f"{len(rows)} {kind}" for kind, rows in outside)
        parts.append(_key_details(_e(summary), [_key_item(kind, *row) for kind, rows in outside for row in rows]))
    return "\n".join(parts)


def _page(title: str, body: str) -> str:
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>\n{CSS}\n</style>",
        "</head>",
        "<body>",
        body,
        f"<footer>written by repvgg_cli {_e(__version__)}; self-contained: no scripts, no network.</footer>",
        "</body>",
        "</html>",
        "",
    ])


def conversion_html(document: dict) -> str:
    """A whole page for one conversion.

    Args:
        document: :func:`repvgg_cli.render.conversion_json` of the conversion.
    Returns:
        The HTML text.
    """
    title = f"repvgg convert: {document.get('source') or 'report'}"
    body = f"<h1>{_e(title)}</h1>\n" + conversion_section(document)
    return _page(title, body)


def batch_html(document: dict) -> str:
    """A whole page for a batch: the summary of every source, then one section per source.

    Args:
        document: :func:`repvgg_cli.batch.batch_json` of the batch.
    Returns:
        The HTML text.
    """
    items = document.get("items") or []
    totals = document.get("totals") or {}
    title = f"repvgg convert: batch into {document.get('output_dir')}"
    rows = ["<table class=\"batch\">",
            "<thead><tr><th>source</th><th>output</th><th>blocks</th><th>worst rel err</th><th>status</th></tr></thead>",
            "<tbody>"]
    for index, item in enumerate(items):
        failed = _status(False, no=_e(f"FAIL (exit {item['exit_code']})"))
        status = _status(True) if item["ok"] else f'{failed} {_e(item.get("error") or "")}'
        rows.append(
            f'<tr><td class="name"><a href="#item-{index}">{_e(item["source"])}</a></td>'
            f'<td class="name">{_e(item["output"] if item.get("written") else "-")}</td>'
            f'<td class="num">{item.get("blocks", 0) if item.get("report") else ""}</td>'
            f'<td class="num">{_e(_err(item.get("worst_rel_err")) if item.get("report") else "")}</td>'
            f"<td>{status}</td></tr>"
        )
    rows.append("</tbody></table>")
    body = [f"<h1>{_e(title)}</h1>",
            f"<p>{totals.get('converted', 0)} of {totals.get('sources', 0)} source(s) converted, "
            f"{totals.get('failed', 0)} failed; {totals.get('blocks', 0)} block(s) in all. "
            f"{_status(bool(document.get('ok')), 'all equivalent and written', 'exit ' + str(document.get('exit_code')))}"
            "</p>",
            "\n".join(rows)]
    for index, item in enumerate(items):
        body.append(f'<section id="item-{index}">')
        body.append(f"<h2><code>{_e(item['source'])}</code></h2>")
        if not item["ok"]:
            hint = f"<br>Hint: {_e(item['hint'])}" if item.get("hint") else ""
            body.append(f'<p class="error">Error (exit {item["exit_code"]}): {_e(item.get("error") or "")}{hint}</p>')
        if item.get("report"):
            body.append(conversion_section(item["report"], heading="h3"))
        body.append("</section>")
    return _page(title, "\n".join(body))

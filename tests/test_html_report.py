"""``repvgg convert --report FILE.html``: a self-contained page, well-formed, every text escaped."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from html.parser import HTMLParser
from pathlib import Path

import torch

from tests import zoo
from repvgg_cli.html_report import batch_html, conversion_html, params_chart, rel_err_chart
from tests.helpers import invoke, SAMPLES

TINY_BLOCKS = ["stage0", "stage1.0", "stage2.0", "stage2.1", "stage3.0", "stage3.1", "stage4.0"]
VOID = {"meta", "br", "hr", "img", "input", "link"}
EVIL = 'evil<script>alert("x")</script>&amp'


class StrictParser(HTMLParser):
    """Collects tags and text, and every nesting mistake (a close tag that does not match the open one)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.problems == [] and parser.stack == [], (parser.problems, parser.stack)
    return parser


def assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert not re.search(r"\b(src|href)=\"(?!#)", page), "only in-page links"
    assert "@import" not in page and "url(" not in page


def test_single_conversion_report(tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    output = tmp_path / "deploy.safetensors"
    result = invoke("convert", SAMPLES / "repvgg_tiny_train.pt", output, "--report", report)
    assert result.exit_code == 0, result.stderr
    page = report.read_text(encoding="utf-8")
    parsed = parse(page)
    assert_self_contained(page)
    assert page.startswith("<!DOCTYPE html>\n")
    assert page.count("<svg") == 2
    cells = [t.strip() for t in parsed.text if t.strip()]
    for name in TINY_BLOCKS:
        assert name in cells, name
    rows = [tag for tag, _ in parsed.tags].count("tr")
    assert rows == 1 + len(TINY_BLOCKS)
    bars = [a for tag, a in parsed.tags if tag == "rect" and a.get("class") == "bar-ok"]
    assert len(bars) == len(TINY_BLOCKS)
    for text in ("equivalent", str(output), "used entry &#x27;model&#x27;", "stripped key prefix &#x27;module.&#x27;",
                 "7 fused, 0 failed", "2 passed through unchanged"):
        assert text in page, text
    same = tmp_path / "again.html"
    assert invoke("convert", SAMPLES / "repvgg_tiny_train.pt", tmp_path / "d2.safetensors", "--report", same).exit_code == 0
    assert same.read_text(encoding="utf-8") == page.replace(str(output), str(tmp_path / "d2.safetensors"))


def test_block_names_are_escaped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    block = zoo.randomize_bn(zoo.PlainBlock(4, 4), seed=1)
    state = OrderedDict((f"{EVIL}.{key}", value) for key, value in block.state_dict().items())
    source = tmp_path / "evil.pt"
    torch.save(state, source)
    report = tmp_path / "evil.html"
    result = invoke("convert", source, tmp_path / "out.safetensors", "--report", report, "--json")
    assert result.exit_code == 0, result.stderr
    assert [b["name"] for b in json.loads(result.stdout)["blocks"]] == [EVIL]
    page = report.read_text(encoding="utf-8")
    parsed = parse(page)
    assert_self_contained(page)
    escaped = "evil&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;amp"
    blocks_part, _, key_diff_part = page.partition("<h2>Key diff")
    assert blocks_part.count(escaped) == 8  # table cell; per chart a label and its tooltip; three bar tooltips
    assert key_diff_part.count(escaped) == 1 + 17 + 2  # the block's summary, its 17 keys removed and 2 added
    assert EVIL in [t.strip() for t in parsed.text]  # and it reads back as the name


def document(blocks: list[dict], **extra) -> dict:
    return {
        "command": "convert", "ok": all(b["ok"] for b in blocks), "source": "a<b>.pt", "output": "c&d.pt",
        "written": False, "mode": "module tree", "blocks": blocks,
        "totals": {"blocks": len(blocks), "failed": sum(not b["ok"] for b in blocks),
                   "params_before": sum(b["params_before"] for b in blocks),
                   "params_after": sum(b["params_after"] for b in blocks), "max_rel_err": None, "passthrough_keys": 0},
        "dropped_keys": ["head.aux<1>"], "notes": ["note <i>1</i>"],
        "model_check": {"input_shape": [2, 3, 8, 8], "dtype": "float32", "outputs": 1, "max_abs_err": 0.5,
                        "rel_err": 0.25, "rtol": 1e-5, "atol": 0.0, "ok": False, "problem": None},
        **extra,
    }


def block(name: str, rel_err: float | None, ok: bool = True, before: int = 100, after: int = 80) -> dict:
    return {"name": name, "family": "plain", "branches": ["3x3+bn", "1x1+bn"], "kernel": [3, 3], "groups": None,
            "params_before": before, "params_after": after, "max_abs_err": rel_err, "rel_err": rel_err,
            "rtol": 1e-5, "ok": ok}


def test_charts_use_a_log_scale_and_mark_failures() -> None:
    blocks = [block("a", 1e-9), block("b", 1e-6), block("c", 0.0), block("d", None, ok=False), block("e", 1e-3, ok=False)]
    svg = rel_err_chart(blocks)
    parsed = parse(svg)
    bars = [(a["class"], float(a["width"])) for tag, a in parsed.tags if tag == "rect"]
    # decades 1e-9 .. 1e-3 over 520 px: 1e-9 at 0, 1e-6 at half, 0 drawn empty, inf/nan and 1e-3 full
    assert bars == [("bar-ok", 0.0), ("bar-ok", 260.0), ("bar-ok", 0.0), ("bar-fail", 520.0), ("bar-fail", 520.0)]
    tolerance = [a for tag, a in parsed.tags if tag == "line" and a.get("class") == "tol"]
    left = float(next(a["x"] for tag, a in parsed.tags if tag == "rect"))
    assert [round(float(a["x1"]) - left, 1) for a in tolerance] == [round(520.0 * 4 / 6, 1)]  # rtol 1e-5
    labels = [t for t in parsed.text if t in ("1.0e-09", "1.0e-06", "0", "inf/nan", "1.0e-03")]
    assert labels == ["1.0e-09", "1.0e-06", "0", "inf/nan", "1.0e-03"]
    svg = params_chart([block("a", 1e-9, before=200, after=150), block("b", 1e-9, before=100, after=100)])
    widths = [(a["class"], float(a["width"])) for tag, a in parse(svg).tags if tag == "rect" and "width" in a][2:]
    assert widths == [("before", 520.0), ("after", 390.0), ("before", 260.0), ("after", 260.0)]
    assert "200 → 150 (-25%)" in svg and "100 → 100 (+0%)" in svg
    assert rel_err_chart([]) == "" and params_chart([]) == ""


def test_rendered_page_escapes_every_text() -> None:
    page = conversion_html(document([block("x<y>", 2e-6), block("z", None, ok=False)]))
    parse(page)
    assert_self_contained(page)
    for raw in ("a<b>.pt", "c&d.pt", "head.aux<1>", "note <i>1</i>", "x<y>"):
        assert raw not in page, raw
    for escaped in ("a&lt;b&gt;.pt", "c&amp;d.pt", "head.aux&lt;1&gt;", "note &lt;i&gt;1&lt;/i&gt;", "x&lt;y&gt;"):
        assert escaped in page, escaped
    assert "NOT equivalent" in page and "(not written)" in page and "inf/nan" in page
    assert "rel err 2.5e-01 (rtol 1e-05)" in page  # the whole-model check


def test_batch_page_escapes_errors_and_links_each_source() -> None:
    ok = document([block("s1", 1e-8)], ok=True, written=True)
    batch = {
        "command": "convert", "batch": True, "ok": False, "exit_code": 2, "output_dir": "out", "jobs": 2,
        "items": [
            {"source": "good.pt", "output": "out/good.deploy.pt", "ok": True, "written": True, "exit_code": 0,
             "blocks": 1, "failed_blocks": 0, "worst_rel_err": 1e-8, "error": None, "hint": None, "report": ok},
            {"source": "<bad>.pt", "output": "out/<bad>.deploy.pt", "ok": False, "written": False, "exit_code": 2,
             "blocks": 0, "failed_blocks": 0, "worst_rel_err": None, "error": "<bad>.pt is empty",
             "hint": "use <x>", "report": None},
        ],
        "totals": {"sources": 2, "converted": 1, "failed": 1, "blocks": 1},
    }
    page = batch_html(batch)
    parsed = parse(page)
    assert_self_contained(page)
    assert "<bad>" not in page and "&lt;bad&gt;.pt is empty" in page and "Hint: use &lt;x&gt;" in page
    assert [a["href"] for tag, a in parsed.tags if tag == "a"] == ["#item-0", "#item-1"]
    assert [a["id"] for tag, a in parsed.tags if tag == "section"] == ["item-0", "item-1"]
    assert page.count("<svg") == 2 and "1 of 2 source(s) converted, 1 failed" in page
    assert batch_html(batch) == page

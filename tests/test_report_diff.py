"""Issue 14, "In every convert report": the key-level diff of source -> output.

Every report format (JSON, Markdown, HTML, the terminal with and without --diff) lists every key
each block removed and added with its shape and dtype; keys outside blocks are compared, not
assumed: a value flipped between the source and the written file (a write-stage hook, in memory
and in the streamed safetensors path) is reported as changed; a --dtype cast is "cast", never
"unchanged"; the totals add up.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests import zoo
from repvgg_cli.api import ConvertOptions, convert_state_dict, reparameterize
from repvgg_cli.io.safetensors_file import SafetensorsStream
from repvgg_cli.pipeline import write as write_stage
from tests.helpers import SAMPLES, invoke

TINY = SAMPLES / "repvgg_tiny.pt"
TINY_BLOCKS = ["stage0", "stage1.0", "stage2.0", "stage2.1", "stage3.0", "stage3.1", "stage4.0"]
PASSTHROUGH = ["linear.weight", "linear.bias"]
FLIPPED = "linear.bias"

STAGE0_LINES = [  # the sample's first block, as `--diff` shows it
    "- rbr_dense.conv.weight [16,3,3,3] f32",
    "- rbr_dense.bn.{weight,bias,running_mean,running_var} [16] f32",
    "- rbr_dense.bn.num_batches_tracked [] i64",
    "- rbr_1x1.conv.weight [16,3,1,1] f32",
    "- rbr_1x1.bn.{weight,bias,running_mean,running_var} [16] f32",
    "- rbr_1x1.bn.num_batches_tracked [] i64",
    "+ rbr_reparam.weight [16,3,3,3] f32",
    "+ rbr_reparam.bias [16] f32",
]


def source_state() -> OrderedDict[str, torch.Tensor]:
    return torch.load(TINY, map_location="cpu", weights_only=True)


def triples(entries: list[dict]) -> list[tuple[str, list[int], str]]:
    return [(e["key"], e["shape"], e["dtype"]) for e in entries]


def described(state, keys) -> list[tuple[str, list[int], str]]:
    return [(k, list(state[k].shape), str(state[k].dtype).removeprefix("torch.")) for k in keys]


def assert_totals_add_up(document: dict, source_keys: int, output_keys: int) -> None:
    t = document["totals"]
    kept = t["unchanged"] + t["cast"] + t["changed"] + t["unverified"]
    assert t["source_keys"] == source_keys and t["output_keys"] == output_keys
    assert t["removed"] + kept + t["dropped"] == source_keys
    assert t["added"] + kept == output_keys
    assert t["removed"] == sum(len(b["removed"]) for b in document["blocks"])
    assert t["added"] == sum(len(b["added"]) for b in document["blocks"]) + len(document["added"])
    for kind in ("unchanged", "cast", "changed", "unverified", "dropped"):
        assert t[kind] == len(document[kind]), kind


def tree_lines(stdout: str, block: str) -> list[str]:
    """The lines under ``block``'s node of the --diff tree, without the tree's guides."""
    lines = [re.sub(r"^[\s│├└─]+", "", line) for line in stdout.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith((f"{block} (", f"{block}:")))
    end = next((i for i in range(start + 1, len(lines)) if not re.match(r"^[-+=~!?] ", lines[i])), len(lines))
    return lines[start + 1:end]


# -- every report lists every removed and added key ------------------------------------------------


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """One conversion of the sample per report format (JSON on stdout, Markdown, HTML + --diff)."""
    tmp = tmp_path_factory.mktemp("reports")
    as_json = invoke("convert", TINY, tmp / "a.safetensors", "--json")
    markdown = invoke("convert", TINY, tmp / "b.safetensors", "--report", tmp / "r.md")
    html = invoke("convert", TINY, tmp / "c.safetensors", "--report", tmp / "r.html", "--diff")
    for result in (as_json, markdown, html):
        assert result.exit_code == 0, result.stderr
    return {"json": json.loads(as_json.stdout), "md": (tmp / "r.md").read_text(encoding="utf-8"),
            "html": (tmp / "r.html").read_text(encoding="utf-8"), "collapsed": markdown.stdout,
            "expanded": html.stdout, "output": load_file(tmp / "a.safetensors")}


def test_json_lists_every_removed_and_added_key_with_shape_and_dtype(reports) -> None:
    document, state, output = reports["json"]["key_diff"], source_state(), reports["output"]
    assert [b["name"] for b in document["blocks"]] == TINY_BLOCKS
    for block in document["blocks"]:
        removed = [k for k in state if k.startswith(block["name"] + ".")]
        assert triples(block["removed"]) == described(state, removed), block["name"]  # every key, source order
        assert triples(block["added"]) == described(output, [f"{block['name']}.rbr_reparam.weight",
                                                             f"{block['name']}.rbr_reparam.bias"])
    stage0 = document["blocks"][0]
    assert triples(stage0["removed"])[:2] == [("stage0.rbr_dense.conv.weight", [16, 3, 3, 3], "float32"),
                                              ("stage0.rbr_dense.bn.weight", [16], "float32")]
    assert triples(stage0["added"]) == [("stage0.rbr_reparam.weight", [16, 3, 3, 3], "float32"),
                                        ("stage0.rbr_reparam.bias", [16], "float32")]
    assert triples(document["unchanged"]) == described(state, PASSTHROUGH)
    assert document["changed"] == document["cast"] == document["dropped"] == document["unverified"] == []
    assert document["proof"] == "sha256"  # streamed: the writer's digests against the source's
    assert_totals_add_up(document, len(state), len(output))
    t = document["totals"]
    assert (t["removed"], t["added"], t["unchanged"], t["dropped"]) == (94, 14, 2, 0)
    assert t["bytes_before"] == sum(v.numel() * v.element_size() for v in state.values())
    assert t["bytes_after"] == sum(v.numel() * v.element_size() for v in output.values())


def test_markdown_lists_every_key_in_a_collapsible_diff_per_block(reports) -> None:
    text, document = reports["md"], reports["json"]["key_diff"]
    assert "## Key diff (source → output)" in text
    assert "- 94 removed, 14 added, 2 unchanged (bit-identical), 0 dropped; keys 96 → 16" in text
    for block in document["blocks"]:
        assert (f"<details><summary><code>{block['name']}</code> (official): {len(block['removed'])} removed, "
                f"{len(block['added'])} added</summary>") in text
        for e in block["removed"]:
            assert f"\n- {e['key']} [{','.join(map(str, e['shape']))}] {e['dtype']}\n" in text, e["key"]
        for e in block["added"]:
            assert f"\n+ {e['key']} [{','.join(map(str, e['shape']))}] {e['dtype']}\n" in text, e["key"]
    assert "\n- stage0.rbr_dense.bn.num_batches_tracked [] int64\n" in text
    assert "\n+ stage0.rbr_reparam.weight [16,3,3,3] float32\n" in text
    assert "\n  linear.weight [10,128] float32\n" in text
    assert text.count("```diff") == text.count("</details>") == len(TINY_BLOCKS) + 1  # and one for the keys outside


class Items(HTMLParser):
    """``(class, text)`` of every ``<li>``, and the ``<details>``/``<script>`` counts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.items: list[tuple[str, str]] = []
        self.details = self.scripts = 0
        self._li: list[str] | None = None
        self._class = ""

    def handle_starttag(self, tag, attrs):
        self.details += tag == "details"
        self.scripts += tag == "script"
        if tag == "li":
            self._li, self._class = [], dict(attrs).get("class", "")

    def handle_endtag(self, tag):
        if tag == "li" and self._li is not None:
            self.items.append((self._class, "".join(self._li)))
            self._li = None

    def handle_data(self, data):
        if self._li is not None:
            self._li.append(data)


def test_html_folds_every_key_into_a_details_per_block(reports) -> None:
    parser = Items()
    parser.feed(reports["html"])
    document = reports["json"]["key_diff"]
    assert parser.scripts == 0 and parser.details == len(TINY_BLOCKS) + 1
    want = []
    for block in document["blocks"]:
        want += [("removed", f"- {k} [{','.join(map(str, s))}] {d}") for k, s, d in triples(block["removed"])]
        want += [("added", f"+ {k} [{','.join(map(str, s))}] {d}") for k, s, d in triples(block["added"])]
    want += [("unchanged", "= linear.weight [10,128] float32"), ("unchanged", "= linear.bias [10] float32")]
    assert parser.items == want
    assert ("removed", "- stage0.rbr_dense.conv.weight [16,3,3,3] float32") in parser.items
    assert "94 removed</span>, <span class=\"added-count\">14 added</span>, 2 unchanged (bit-identical)" in reports["html"]


def test_terminal_shows_totals_and_expands_every_key_with_diff(reports) -> None:
    collapsed, expanded = reports["collapsed"], reports["expanded"]
    headline = "key diff: 94 removed, 14 added, 2 unchanged (bit-identical), 0 dropped\n  keys 96 → 16, 599.5 KiB → 530.1 KiB"
    assert headline + "; --diff lists every key by block\n" in collapsed
    assert "rbr_dense" not in collapsed  # collapsed: no key lines
    assert tree_lines(expanded, "stage0") == STAGE0_LINES
    for block in TINY_BLOCKS:
        lines = tree_lines(expanded, block)
        assert lines[-2:] == [f"+ rbr_reparam.weight [{','.join(map(str, reports['output'][block + '.rbr_reparam.weight'].shape))}] f32",
                              f"+ rbr_reparam.bias [{reports['output'][block + '.rbr_reparam.bias'].shape[0]}] f32"]
    assert tree_lines(expanded, "outside blocks") == ["= linear.weight [10,128] f32", "= linear.bias [10] f32"]
    assert headline + "\n  outside blocks: every kept key's sha256 as written compared with the source's\n" in expanded
    assert "--diff" not in expanded


def test_terminal_key_diff_is_red_and_green() -> None:
    from rich.console import Console

    from repvgg_cli.render.key_diff import key_diff_renderables

    state = source_state()
    console = Console(record=True, width=80, color_system="truecolor", force_terminal=True)
    for renderable in key_diff_renderables(convert_state_dict(state), expanded=True):
        console.print(renderable)
    text = console.export_text(styles=True, clear=False)
    assert "\x1b[31m- rbr_dense.conv.weight [16,3,3,3] f32" in text  # red
    assert "\x1b[32m+ rbr_reparam.weight [16,3,3,3] f32" in text  # green
    assert "\x1b[31m94 removed\x1b[0m, \x1b[32m14 added\x1b[0m" in text
    assert max(len(line) for line in console.export_text().splitlines()) <= 80


def test_diff_is_for_one_conversion(tmp_path: Path) -> None:
    result = invoke("convert", TINY, SAMPLES / "plain_net.pt", tmp_path / "out/", "--diff")
    assert result.exit_code == 2 and "--diff lists the keys of one conversion" in result.stderr


# -- unchanged keys are compared, not assumed ------------------------------------------------------


def flip(tensor: torch.Tensor) -> torch.Tensor:
    changed = tensor.clone()
    changed.view(-1)[3] += 0.25
    return changed


def test_a_value_flipped_by_the_streamed_writer_is_reported_changed(tmp_path: Path, monkeypatch) -> None:
    real_put = SafetensorsStream.put

    def put(self, key, tensor):
        return real_put(self, key, flip(tensor) if key == FLIPPED else tensor)

    monkeypatch.setattr(SafetensorsStream, "put", put)
    output = tmp_path / "d.safetensors"
    result = invoke("convert", TINY, output, "--json")
    assert result.exit_code == 0, result.stderr
    state, written = source_state(), load_file(output)
    assert not torch.equal(written[FLIPPED], state[FLIPPED])  # the crafted case is real: the file differs
    document = json.loads(result.stdout)["key_diff"]
    assert [c["key"] for c in document["changed"]] == [FLIPPED]
    assert document["changed"][0]["bit_identical"] is False and "sha256" in document["changed"][0]["problem"]
    assert triples(document["unchanged"]) == described(state, ["linear.weight"])
    assert_totals_add_up(document, len(state), len(written))
    shown = invoke("convert", TINY, tmp_path / "e.safetensors").stdout
    assert f"1 key(s) outside blocks CHANGED (not bit-identical to the source): {FLIPPED}" in shown
    assert "key diff: 94 removed, 14 added, 1 unchanged (bit-identical), 1 CHANGED, 0 dropped" in shown


def test_a_value_flipped_in_memory_is_reported_changed_with_its_size(tmp_path: Path, monkeypatch) -> None:
    real_assemble = write_stage._assemble

    def assemble(plan, results, streamed):
        deploy, count = real_assemble(plan, results, streamed)
        deploy[FLIPPED] = flip(deploy[FLIPPED])
        return deploy, count

    monkeypatch.setattr(write_stage, "_assemble", assemble)
    output = tmp_path / "d.pt"
    report = tmp_path / "r.json"
    result = invoke("convert", TINY, output, "--report", report, "--diff")
    assert result.exit_code == 0, result.stderr
    state = source_state()
    assert not torch.equal(torch.load(output, weights_only=True)[FLIPPED], state[FLIPPED])
    document = json.loads(report.read_text())["key_diff"]
    assert document["proof"] == "bytes"
    (changed,) = document["changed"]
    assert changed["key"] == FLIPPED and changed["bit_identical"] is False
    assert changed["max_abs"] == pytest.approx(0.25, rel=1e-6)
    assert [e["key"] for e in document["unchanged"]] == ["linear.weight"]
    assert "! linear.bias [10] f32" in tree_lines(result.stdout, "outside blocks")
    hooked = convert_state_dict(state).key_diff.diff  # the library's result says the same
    assert [c.key for c in hooked.changed] == [FLIPPED] and hooked.unchanged == ("linear.weight",)
    monkeypatch.undo()
    library = convert_state_dict(state).key_diff.diff
    assert library.unchanged == tuple(PASSTHROUGH) and not library.changed


@pytest.mark.parametrize("suffix, proof", [(".safetensors", "sha256"), (".pt", "bytes")])
def test_a_dtype_cast_is_reported_as_cast_not_unchanged(tmp_path: Path, suffix: str, proof: str) -> None:
    result = invoke("convert", TINY, tmp_path / f"d{suffix}", "--dtype", "float16", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)["key_diff"]
    state = source_state()
    assert document["unchanged"] == [] and document["changed"] == [] and document["proof"] == proof
    assert [(c["key"], c["dtype_a"], c["dtype_b"]) for c in document["cast"]] == [
        (k, "float32", "float16") for k in PASSTHROUGH]
    for c in document["cast"]:  # what the cast changed, measured
        want = (state[c["key"]].half().double() - state[c["key"]].double()).abs().max().item()
        assert c["max_abs"] == pytest.approx(want, rel=1e-12) and c["max_abs"] > 0
    assert all(e["dtype"] == "float16" for b in document["blocks"] for e in b["added"])
    assert_totals_add_up(document, len(state), 16)


def test_a_wrong_cast_is_changed_not_cast(tmp_path: Path, monkeypatch) -> None:
    real_put = SafetensorsStream.put
    monkeypatch.setattr(SafetensorsStream, "put",
                        lambda self, key, tensor: real_put(self, key, flip(tensor) if key == FLIPPED else tensor))
    result = invoke("convert", TINY, tmp_path / "d.safetensors", "--dtype", "float16", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)["key_diff"]
    assert [c["key"] for c in document["cast"]] == ["linear.weight"]
    assert [(c["key"], c["dtype_a"], c["dtype_b"]) for c in document["changed"]] == [(FLIPPED, "float32", "float16")]


def test_a_failed_conversion_claims_nothing_unchanged(tmp_path: Path) -> None:
    result = invoke("convert", TINY, tmp_path / "d.safetensors", "--rtol", "0", "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)["key_diff"]
    assert document["unchanged"] == [] and [e["key"] for e in document["unverified"]] == PASSTHROUGH
    assert "not written" in document["unverified_reason"]
    assert_totals_add_up(document, 96, 16)


# -- dropped keys, the module tree -----------------------------------------------------------------


def test_training_only_keys_are_dropped_and_listed(tmp_path: Path) -> None:
    state = source_state()
    torch.manual_seed(0)
    state["stage1_aux.0.weight"] = torch.randn(10, 16)
    state["stage1_aux.0.bias"] = torch.randn(10)
    source = tmp_path / "plus.pt"
    torch.save(state, source)
    result = invoke("convert", source, tmp_path / "d.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)["key_diff"]
    assert triples(document["dropped"]) == described(state, ["stage1_aux.0.weight", "stage1_aux.0.bias"])
    assert [e["key"] for e in document["unchanged"]] == PASSTHROUGH
    assert_totals_add_up(document, 98, 16)


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = zoo.PlainBlock(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_module_tree_counts_a_folded_bn_as_removed_and_compares_the_rest() -> None:
    torch.manual_seed(0)
    model = zoo.randomize_bn(PairNet(), seed=3).double()
    for parameter in model.parameters():
        nn.init.normal_(parameter)
    source = model.state_dict()
    result = reparameterize(model, ConvertOptions(fuse_conv_bn=True))
    report = result.key_diff
    t = report.totals
    blocks = {b.name: b for b in report.diff.blocks}
    assert [e.key for e in blocks["stem.0"].removed] == ["stem.0.weight", "stem.0.bias", "stem.1.weight",
                                                         "stem.1.bias", "stem.1.running_mean", "stem.1.running_var",
                                                         "stem.1.num_batches_tracked"]
    assert [e.key for e in blocks["stem.0"].added] == ["stem.0.weight", "stem.0.bias"]
    assert [e.key for e in blocks["block"].added] == ["block.weight", "block.bias"]
    assert report.diff.unchanged == ("head.weight", "head.bias") and not report.diff.dropped
    assert t["removed"] + t["unchanged"] == len(source) and t["added"] + t["unchanged"] == len(result.state_dict)
    assert report.balanced and report.proof == "bytes"

"""What the tool prints tells the truth: names shown exactly as they are (never read as markup,
one line), natural block order, readable tables at 80 columns, eps and tolerance in every report
format, no Python reprs or "?" in inspect, and a "wrote PATH (size)" line for every file written."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from repvgg_cli.render.conversion import conversion_table
from repvgg_cli.render.text import human_size, natural_key, printable, shorten_middle, shorten_start
from tests.helpers import SAMPLES, cli_runner, error_lines, invoke

PLAIN = SAMPLES / "plain_net.pt"
TINY_TRAIN = SAMPLES / "repvgg_tiny_train.pt"


def renamed_plain(tmp_path: Path, names: dict[str, str], name: str = "renamed.pt") -> Path:
    """plain_net.pt with its blocks ``features.N`` renamed (keys keep their suffixes)."""
    state = torch.load(PLAIN, weights_only=True)
    renamed = {}
    for key, value in state.items():
        for old, new in names.items():
            if key.startswith(old + "."):
                key = new + key[len(old):]
        renamed[key] = value
    path = tmp_path / name
    torch.save(renamed, path)
    return path


# -- markup and control characters ---------------------------------------------------------------

MARKUP_NAMES = {"features.2": "features.[/x]2", "features.4": "features.[bold]4", "features.6": "features.a\nb"}


def test_markup_and_newlines_in_block_names_are_shown_as_they_are(tmp_path: Path) -> None:
    source = renamed_plain(tmp_path, MARKUP_NAMES)
    output = tmp_path / "deploy.safetensors"
    result = invoke("convert", source, output)
    assert result.exit_code == 0, result.stderr  # was exit 4 (MarkupError) after writing the output
    rows = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("features.")]
    assert rows == ["features.0", "features.[/x]2", "features.[bold]4", "features.a\\nb"]
    assert output.is_file()
    for ext in ("json", "md", "html"):
        report = tmp_path / f"report.{ext}"
        assert invoke("convert", source, tmp_path / f"d_{ext}.safetensors", "--report", report).exit_code == 0
        text = report.read_text(encoding="utf-8")
        if ext == "json":
            assert [b["name"] for b in json.loads(text)["blocks"]][1:] == ["features.[/x]2", "features.[bold]4",
                                                                         "features.a\nb"]
        elif ext == "md":
            assert "`features.[/x]2`" in text and "`features.a\\nb`" in text
        else:
            assert "features.[/x]2" in text and "features.[bold]4" in text


def test_paths_with_brackets_are_shown_whole(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt[best].pt"
    shutil.copy(TINY_TRAIN, checkpoint)
    inspected = invoke("inspect", checkpoint)
    assert inspected.exit_code == 0
    assert inspected.stdout.splitlines()[0] == str(checkpoint)  # was shown as ckpt.pt
    deploy = tmp_path / "deploy[v2].safetensors"
    converted = invoke("convert", checkpoint, deploy)
    assert converted.exit_code == 0 and f"wrote {deploy} (" in converted.stdout
    verified = invoke("verify", deploy)
    assert verified.exit_code == 0 and verified.stdout.startswith(f"verify {deploy} (recorded probes)")


def test_families_table_keeps_bracketed_key_patterns() -> None:
    result = invoke("families", runner=cli_runner(columns=400))
    assert result.exit_code == 0
    assert "[rbr_identity (BN)]" in result.stdout and "[identity (BN)]" in result.stdout


def test_control_characters_in_error_messages_are_escaped(tmp_path: Path) -> None:
    result = invoke("convert", tmp_path / "a\nb\x1b[31m.pt", tmp_path / "out.safetensors")
    assert result.exit_code == 2
    assert error_lines(result) == [f"Error: {tmp_path}/a\\nb\\x1b[31m.pt: no such file"]
    assert "\x1b" not in result.stderr


def test_printable_escapes_only_what_is_not_printable() -> None:
    assert printable("stages.2.10 [x] ü →") == "stages.2.10 [x] ü →"
    assert printable("a\nb\tc\x1b\x00\u200bd") == "a\\nb\\tc\\x1b\\x00\\u200bd"


# -- natural order -------------------------------------------------------------------------------


def test_natural_key_orders_numbers_as_numbers() -> None:
    names = ["stages.2.10", "stages.2.9", "stages.10.0", "stages.2.1", "head", "stages.2.1.x", ""]
    assert sorted(names, key=natural_key) == ["", "head", "stages.2.1", "stages.2.1.x", "stages.2.9", "stages.2.10",
                                              "stages.10.0"]


def test_blocks_are_in_natural_order_in_every_table_and_report(tmp_path: Path) -> None:
    names = {"features.0": "stages.2.10", "features.2": "stages.2.9", "features.4": "stages.10.0",
             "features.6": "stages.2.1"}
    source = renamed_plain(tmp_path, names)
    want = ["stages.2.1", "stages.2.9", "stages.2.10", "stages.10.0"]
    report = tmp_path / "r.json"
    result = invoke("convert", source, tmp_path / "d.safetensors", "--report", report)
    assert result.exit_code == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines() if line.startswith("stages.")] == want
    assert [b["name"] for b in json.loads(report.read_text())["blocks"]] == want
    assert invoke("convert", source, tmp_path / "e.safetensors", "--report", tmp_path / "r.md").exit_code == 0
    md = re.findall(r"^\| `([^`]+)`", (tmp_path / "r.md").read_text(), re.M)
    assert md == want
    assert invoke("convert", source, tmp_path / "f.safetensors", "--report", tmp_path / "r.html").exit_code == 0
    html_rows = re.findall(r'<td class="name">([^<]+)</td>', (tmp_path / "r.html").read_text())
    assert html_rows == want
    verified = invoke("verify", tmp_path / "d.safetensors")
    assert [line.split()[0] for line in verified.stdout.splitlines() if line.startswith("stages.")] == want
    inspected = invoke("inspect", source)
    assert [line.split()[1] for line in inspected.stdout.splitlines() if re.match(r"^\W+stages\.", line)] == want
    assert [b["name"] for b in json.loads(invoke("inspect", source, "--json").stdout)["blocks"]] == want


# -- 80 columns ----------------------------------------------------------------------------------


def test_shortening_keeps_the_end_of_block_names_and_both_ends_of_families() -> None:
    assert shorten_start("model.backbone.stages.2.10", 12) == "…stages.2.10"
    assert shorten_start("short", 12) == "short"
    assert shorten_middle("ultralytics_repconv", 9) == "ultr…conv"
    assert len(shorten_middle("ultralytics_repconv", 10)) == 10


def _stub_result(names: list[str]) -> SimpleNamespace:
    """What conversion_table reads from a ConversionResult, with pinned numbers (a golden needs them)."""
    blocks = []
    for i, name in enumerate(names):
        identity = i % 2 == 1
        blocks.append(SimpleNamespace(
            block=SimpleNamespace(name=name, family="ultralytics_repconv" if i % 3 == 0 else "official",
                                  branch_labels=("3x3+bn", "1x1+bn") + (("id+bn",) if identity else ()),
                                  branches=SimpleNamespace(groups_known=identity)),
            fused=SimpleNamespace(kernel_size=(3, 3), groups=1),
            params_before=2_363_392 + i, params_after=2_360_320 + i,
            check=SimpleNamespace(max_abs_err=1.25e-7 * (i + 1), rel_err=2.5e-8 * (i + 1), ok=i != 2),
        ))
    return SimpleNamespace(blocks=blocks)


def render_at(renderable, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def test_conversion_table_at_80_columns_golden() -> None:
    names = [f"model.backbone.encoder.stages.2.{i}" for i in (10, 9, 1)] + ["model.backbone.encoder.stages.10.0"]
    text = render_at(conversion_table(_stub_result(names)), 80)
    assert text == (Path(__file__).parent / "golden" / "conversion_table_80.txt").read_text(encoding="utf-8").rstrip("\n")
    assert max(len(line) for line in text.splitlines()) <= 80


def test_a_real_conversion_table_fits_80_columns(tmp_path: Path) -> None:
    names = {f"features.{i}": f"model.backbone.encoder.stages.2.{j}.block" for i, j in zip((0, 2, 4, 6), (10, 9, 1, 0))}
    source = renamed_plain(tmp_path, names)
    result = invoke("convert", source, tmp_path / "d.safetensors", runner=cli_runner(columns=80))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    table = lines[: next(i for i, line in enumerate(lines) if line.startswith("g ?"))]
    assert all(len(line.rstrip()) <= 80 for line in table), "\n".join(table)
    rows = [line.split() for line in table if line.startswith("…")]
    assert len(rows) == 4 and all(row[0].endswith(".block") for row in rows), table
    assert [row[0].split(".")[-2] for row in rows] == ["0", "1", "9", "10"]  # the end of each name is kept


# -- inspect: plain words ------------------------------------------------------------------------


def test_inspect_says_unknown_and_names_the_entry_once(tmp_path: Path) -> None:
    result = invoke("inspect", TINY_TRAIN)
    assert result.exit_code == 0
    out = result.stdout
    assert out.count("entry") == 1 and "entry used: model" in out
    assert "?" not in out and "{" not in out and "'atol'" not in out
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines() if re.match(r"^\W+stage\d", line)}
    assert rows["stage0"] == ["unknown", "16", "3x3", "unknown", "no"]
    assert rows["stage2.1"] == ["32", "32", "3x3", "1", "yes"]
    assert "unknown: a state dict does not store groups" in out
    deploy = tmp_path / "d.safetensors"
    assert invoke("convert", TINY_TRAIN, deploy).exit_code == 0
    recorded = invoke("inspect", deploy).stdout
    assert "{" not in recorded and "None" not in recorded and "?" not in recorded
    assert "options: atol 0; avg_branch none; bn_eps default;" in recorded


def test_markdown_report_says_unknown_groups_and_carries_eps_and_tolerance(tmp_path: Path) -> None:
    report = tmp_path / "r.md"
    assert invoke("convert", TINY_TRAIN, tmp_path / "d.safetensors", "--report", report).exit_code == 0
    text = report.read_text(encoding="utf-8")
    rows = {m.group(1): m.group(0).split("|") for m in re.finditer(r"^\| `([^`]+)` .*$", text, re.M)}
    assert rows["stage0"][5].strip() == "unknown"  # groups: was "1"
    assert rows["stage2.1"][5].strip() == "1"
    assert rows["stage0"][6].strip() == "1e-05 (family default)"
    assert rows["stage0"][10].strip() == "1e-05"  # rtol of the block's check
    assert "- BatchNorm eps: 1e-05 (from family default; source: default, nothing decided it)" in text
    assert "- tolerance: rtol 1e-05 (by the dtype written), atol 0" in text


@pytest.mark.parametrize("args, eps, source, kind, rtol, rtol_from", [
    ([], 1e-5, "family default", "default, nothing decided it", 1e-5, "by dtype"),
    (["--bn-eps", "0.001", "--rtol", "0.0001", "--atol", "1e-9"], 1e-3, "--bn-eps", "flag", 1e-4, "--rtol"),
])
def test_eps_and_tolerance_are_in_every_report_format(tmp_path: Path, args, eps, source, kind, rtol, rtol_from) -> None:
    reports = {ext: tmp_path / f"r.{ext}" for ext in ("json", "md", "html")}
    for ext, report in reports.items():
        result = invoke("convert", TINY_TRAIN, tmp_path / f"d_{ext}.safetensors", "--report", report, *args)
        assert result.exit_code == 0, result.stderr
    document = json.loads(reports["json"].read_text())
    assert document["bn_eps"]["values"] == [eps] and document["bn_eps"]["sources"] == [source]
    assert document["tolerance"]["rtol_from"] == rtol_from and document["tolerance"]["rtol_used"] == [rtol]
    assert all(b["bn_eps"] == [eps] and b["eps_from"] == source and b["rtol"] == rtol for b in document["blocks"])
    atol = 1e-9 if args else 0.0
    assert document["tolerance"]["atol"] == atol
    asked = "by the dtype written" if not args else f"--rtol {rtol:g}"
    line = f"tolerance: rtol {rtol:g} ({asked}), atol {atol:g}"
    assert f"BatchNorm eps: {eps:g} (from {source}; source: {kind})" in reports["md"].read_text()
    assert document["bn_eps"]["source"] == [kind.split(",")[0]]
    assert all(b["eps_source"] == kind.split(",")[0] for b in document["blocks"])
    assert line in reports["md"].read_text()
    html = reports["html"].read_text()
    assert f"<dt>BatchNorm eps</dt><dd>{eps:g} (from {source}; source: {kind})</dd>" in html
    assert f"<dt>tolerance</dt><dd>{line.removeprefix('tolerance: ')}</dd>" in html
    assert f"<td>{eps:g} ({source})</td>" in html


# -- wrote PATH (size) ---------------------------------------------------------------------------


def test_every_file_written_is_named_last_with_its_size(tmp_path: Path) -> None:
    output, report = tmp_path / "d.safetensors", tmp_path / "r.html"
    result = invoke("convert", TINY_TRAIN, output, "--report", report)
    assert result.exit_code == 0
    assert result.stdout.splitlines()[-2:] == [f"wrote {output} ({human_size(output.stat().st_size)})",
                                               f"wrote {report} ({human_size(report.stat().st_size)})"]
    # with --json stdout is the document alone; the wrote lines go to stderr
    output2, report2 = tmp_path / "e.safetensors", tmp_path / "r.json"
    result = invoke("convert", TINY_TRAIN, output2, "--report", report2, "--json")
    assert json.loads(result.stdout)["written"] is True
    assert result.stderr.splitlines()[-2:] == [f"wrote {output2} ({human_size(output2.stat().st_size)})",
                                               f"wrote {report2} ({human_size(report2.stat().st_size)})"]


def test_a_failed_conversion_names_only_its_report(tmp_path: Path) -> None:
    output, report = tmp_path / "d.safetensors", tmp_path / "r.json"
    result = invoke("convert", TINY_TRAIN, output, "--report", report, "--rtol", "0")
    assert result.exit_code == 1 and not output.exists()
    assert result.stdout.splitlines()[-1] == f"wrote {report} ({human_size(report.stat().st_size)})"

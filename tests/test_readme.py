"""The README is the contract: its quickstart drives CI and its family table matches the registry."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from repvgg_cli.cli import app
from repvgg_cli.render import families_markdown

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def between(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", README, re.S)
    assert match, f"README has no {marker} markers"
    return match.group(1)


def test_quickstart_is_three_lines_install_convert_test():
    lines = [l for l in between("quickstart").splitlines() if l and not l.startswith("```")]
    assert len(lines) == 3
    assert lines[0].startswith("pip install -e")
    assert lines[1].startswith("repvgg convert sample_checkpoints/")
    assert "pytest" in lines[2]


def test_families_table_matches_registry():
    assert between("families").strip() == families_markdown().strip(), (
        "README's family table is stale: regenerate it with `repvgg families --markdown`"
    )


def test_every_documented_command_exists():
    documented = set(re.findall(r"^repvgg (\w+)", README, re.M)) - {"convert"} | {"convert"}
    assert {"convert", "verify", "inspect", "families"} <= documented
    runner = CliRunner()
    for command in sorted(documented):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)


def test_every_convert_option_in_readme_exists():
    result = CliRunner().invoke(app, ["convert", "--help"], env={"COLUMNS": "200"})
    # bench and export document their own options (tests/test_bench_export.py checks those)
    text = re.sub(r"### `repvgg (bench|export) .*?(?=\n## |\n### )", "", README, flags=re.S)
    options = set(re.findall(r"`(--[a-z-]+)", text))
    for option in options - {"--version", "--json", "--debug", "--markdown", "--against"}:
        assert option in result.output, option

"""The README is the contract: its quickstart drives CI and its family table matches the registry."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from repvgg_cli.cli import app
from repvgg_cli.render.inspect import families_markdown

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


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


def _help(*command: str) -> str:
    return CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output


def test_every_convert_option_in_readme_exists():
    section = README.split("### `repvgg convert SOURCE OUTPUT`", 1)[1].split("\n### ", 1)[0]
    options = set(re.findall(r"`(--[a-z-]+)", section))
    assert {"--bn-eps", "--report", "--force", "--jobs"} <= options
    help_text = _help("convert")
    for option in options:
        assert option in help_text, option


def test_every_option_in_the_readme_exists_somewhere():
    commands = set(re.findall(r"^repvgg (\w+)", README, re.M))
    help_text = _help() + "".join(_help(command) for command in sorted(commands))
    for option in set(re.findall(r"`(?:repvgg [^`]*?)?(--[a-z-]+)", README)):
        assert option in help_text, option


def test_quickstart_starts_from_a_clone_in_a_venv_and_tells_cpu_users_about_torch():
    before = README.split("<!-- quickstart -->", 1)[0].split("## Quickstart", 1)[1]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", before, re.S) for line in block.splitlines()]
    assert commands[0].startswith("git clone ") and "&& cd repvgg_cli" in commands[0]
    assert commands[1] == "python3 -m venv .venv && . .venv/bin/activate"
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in commands
    assert "CPU build of torch" in before


def test_every_install_line_works_from_a_clone():
    """No `pip install repvgg-cli` (the package is not on the index): the clone, editable, with
    extras that exist; torch's CPU build is the one other install named."""
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installs = re.findall(r"pip install ([^`\n]+)", README)
    assert installs
    for args in installs:
        args = args.strip()
        if args.startswith("torch "):
            continue
        match = re.fullmatch(r'-e (?:\.|"\.\[(\w+)\]")', args)
        assert match, f"pip install {args}: install from the clone (pip install -e .)"
        assert match.group(1) is None or match.group(1) in extras, args


def test_the_command_line_basics_are_documented():
    for text in ("python -m repvgg_cli", "`-h` is `--help`", "repvgg --install-completion", "repvgg --show-completion",
                 "exits 130", "SIGTERM 143", "--quiet", "repvgg env", "wrote PATH (SIZE)"):
        assert text in README, text

"""Packaging a user can trust: one version, a license, a changelog, the typing marker shipped."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import repvgg_cli
from tests.helpers import ROOT, invoke

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_version_comes_from_one_place() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "repvgg_cli.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", repvgg_cli.__version__)


def test_cli_version_is_the_installed_metadata_version() -> None:
    installed = importlib.metadata.version("repvgg-cli")
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"repvgg {installed}"
    assert installed == repvgg_cli.__version__


def test_the_entry_point_and_python_m_agree() -> None:
    out = subprocess.run([sys.executable, "-m", "repvgg_cli", "--version"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip() == f"repvgg {repvgg_cli.__version__}"


def test_license_and_changelog_exist() -> None:
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in license_text
    assert PYPROJECT["project"]["license"] == "MIT" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {repvgg_cli.__version__}" in changelog and "## Unreleased" in changelog


def test_py_typed_is_package_data() -> None:
    assert (Path(repvgg_cli.__file__).parent / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["repvgg_cli"]

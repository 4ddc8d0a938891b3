"""convert --dry-run: read, find, fuse and check, print the report, write nothing (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

from repvgg_cli.api import convert_file
from tests.helpers import SAMPLES, error_lines, invoke

TINY = SAMPLES / "repvgg_tiny.pt"


def test_dry_run_reports_and_writes_nothing(tmp_path: Path) -> None:
    output = tmp_path / "d.safetensors"
    result = invoke("convert", TINY, output, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is True and document["written"] is False and len(document["blocks"]) == 7
    assert "--dry-run: nothing was written" in result.stderr
    assert list(tmp_path.iterdir()) == []
    # the same verdicts as a real run: a failing check is exit 1, still nothing written
    failing = invoke("convert", TINY, output, "--dry-run", "--rtol", "1e-12")
    assert failing.exit_code == 1 and error_lines(failing)[0].startswith("Error: not equivalent")
    assert list(tmp_path.iterdir()) == []


def test_dry_run_does_not_touch_an_existing_output(tmp_path: Path) -> None:
    output = tmp_path / "d.safetensors"
    output.write_bytes(b"keep me")
    assert invoke("convert", TINY, output, "--dry-run").exit_code == 0  # no --force needed: nothing is written
    assert output.read_bytes() == b"keep me"
    outcome = convert_file(TINY, output, dry_run=True)
    assert outcome.result.ok and not outcome.written and output.read_bytes() == b"keep me"


def test_dry_run_is_for_one_source_without_a_report(tmp_path: Path) -> None:
    refused = invoke("convert", TINY, tmp_path / "d.safetensors", "--dry-run", "--report", tmp_path / "r.json")
    assert refused.exit_code == 2 and "--dry-run writes nothing" in error_lines(refused)[0]
    batch = invoke("convert", TINY, SAMPLES / "plain_net.pt", tmp_path / "out/", "--dry-run")
    assert batch.exit_code == 2

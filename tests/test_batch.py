"""Batch conversion through the CLI: several sources or a folder into an output folder, in parallel."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from repvgg_cli.batch import BatchItem, output_name, plan_batch
from repvgg_cli.errors import InputError
from tests.helpers import cli_runner, error_lines, invoke as helpers_invoke, SAMPLES

SAMPLE_FILES = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".pt", ".safetensors"))
DEPLOY_NAMES = sorted(f"{Path(n).stem}.deploy{Path(n).suffix}" for n in SAMPLE_FILES)
BLOCKS = {"plain_net": 4, "repvgg_tiny": 7}

RUNNER = cli_runner(250)


def invoke(*args: object):
    return helpers_invoke(*args, runner=RUNNER)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir())}


def copy_samples(folder: Path, names: list[str] = SAMPLE_FILES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(SAMPLES / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def batch_of_samples(tmp_path_factory) -> tuple[Path, Path, dict[str, str], object]:
    """The 6 samples converted once with two worker processes: (sources, outputs, source digests, result)."""
    root = tmp_path_factory.mktemp("batch")
    sources = copy_samples(root / "ckpts")
    before = digests(sources)
    result = invoke("convert", sources, root / "out", "--jobs", "2")
    return sources, root / "out", before, result


def test_folder_batch_writes_one_verified_output_per_source(batch_of_samples) -> None:
    sources, out, before, result = batch_of_samples
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert error_lines(result) == []
    assert sorted(os.listdir(out)) == DEPLOY_NAMES
    for name in DEPLOY_NAMES:
        verified = invoke("verify", out / name)
        assert verified.exit_code == 0, (name, verified.stdout, verified.stderr)
        family = name.split(".")[0].removesuffix("_train")
        assert f"{BLOCKS[family]} block(s) verified: equivalent" in verified.stdout
    assert digests(sources) == before
    assert sorted(os.listdir(sources)) == SAMPLE_FILES


def test_folder_batch_summary_table(batch_of_samples) -> None:
    sources, out, _, result = batch_of_samples
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith(str(sources))]
    assert [row[0] for row in rows] == [str(sources / n) for n in SAMPLE_FILES]
    for row, name in zip(rows, SAMPLE_FILES, strict=True):
        family = name.split(".")[0].removesuffix("_train")
        assert row[1] == str(out / f"{Path(name).stem}.deploy{Path(name).suffix}")
        assert int(row[2]) == BLOCKS[family]
        assert 0 < float(row[3]) < 1e-6
        assert row[4] == "ok"
    lines = result.stdout.splitlines()
    assert lines[-7] == f"6 of 6 source(s) converted into {out}, 0 failed (2 job(s))"
    assert sorted(line.split()[1] for line in lines[-6:]) == sorted(str(p) for p in out.iterdir())  # wrote PATH (SIZE)


def test_jobs_1_and_jobs_2_give_byte_identical_outputs(batch_of_samples, tmp_path: Path) -> None:
    sources, out, _, _ = batch_of_samples
    result = invoke("convert", sources, tmp_path / "serial", "--jobs", "1")
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "serial")) == DEPLOY_NAMES
    for name in DEPLOY_NAMES:
        assert (tmp_path / "serial" / name).read_bytes() == (out / name).read_bytes(), name


def test_a_broken_source_fails_alone(tmp_path: Path) -> None:
    sources = copy_samples(tmp_path / "ckpts", ["plain_net.pt", "repvgg_tiny.safetensors"])
    (sources / "empty.pt").write_bytes(b"")
    before = digests(sources)
    out = tmp_path / "out"
    result = invoke("convert", sources / "plain_net.pt", sources / "empty.pt", sources / "repvgg_tiny.safetensors",
                    out, "--jobs", "2", "--json")
    assert result.exit_code == 2, result.stderr
    assert error_lines(result) == [
        f"Error: 1 of 3 source(s) failed: {sources / 'empty.pt'} (exit 2); nothing was written for them"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert sorted(os.listdir(out)) == ["plain_net.deploy.pt", "repvgg_tiny.deploy.safetensors"]
    assert digests(sources) == before
    document = json.loads(result.stdout)
    assert document["batch"] is True and document["ok"] is False and document["exit_code"] == 2
    assert document["totals"] == {"sources": 3, "converted": 2, "failed": 1, "blocks": 11}
    items = {Path(i["source"]).name: i for i in document["items"]}
    broken = items["empty.pt"]
    assert broken["ok"] is False and broken["written"] is False and broken["exit_code"] == 2
    assert broken["error"] == f"{sources / 'empty.pt'} is empty" and broken["report"] is None
    good = items["repvgg_tiny.safetensors"]
    assert good["ok"] is True and good["exit_code"] == 0 and good["blocks"] == 7 and good["error"] is None
    assert [b["name"] for b in good["report"]["blocks"]][:2] == ["stage0", "stage1.0"]
    assert good["output"] == str(out / "repvgg_tiny.deploy.safetensors")


def test_summary_table_names_the_error(tmp_path: Path, monkeypatch) -> None:
    copy_samples(tmp_path / "ckpts", ["plain_net.pt"])
    (tmp_path / "ckpts" / "empty.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # short relative paths: one table row per source
    result = invoke("convert", "ckpts", "out", "--jobs", "1")
    assert result.exit_code == 2
    rows = [line.strip().split(maxsplit=2) for line in result.stdout.splitlines() if line.strip().startswith("ckpts")]
    empty = os.path.join("ckpts", "empty.pt")
    assert rows == [[empty, "-", f"FAIL (exit 2): {empty} is empty"],
                    [os.path.join("ckpts", "plain_net.pt"), os.path.join("out", "plain_net.deploy.pt"), rows[1][2]]]
    assert rows[1][2].split()[0] == "4" and rows[1][2].split()[2] == "ok"
    assert sorted(os.listdir(tmp_path / "out")) == ["plain_net.deploy.pt"]
    assert result.stdout.splitlines()[-2] == "1 of 2 source(s) converted into out, 1 failed (1 job(s))"
    assert result.stdout.splitlines()[-1].startswith("wrote out/plain_net.deploy.pt (")


def test_exit_code_is_the_highest_among_failures(tmp_path: Path) -> None:
    sources = copy_samples(tmp_path / "ckpts", ["plain_net.pt"])
    (sources / "empty.pt").write_bytes(b"")
    result = invoke("convert", sources, tmp_path / "out", "--rtol", "1e-30", "--json", "--jobs", "1")
    document = json.loads(result.stdout)
    assert [(Path(i["source"]).name, i["exit_code"]) for i in document["items"]] == [("empty.pt", 2), ("plain_net.pt", 1)]
    assert result.exit_code == 2 and document["exit_code"] == 2
    plain = document["items"][1]
    assert plain["error"] == ("not equivalent: block(s) features.0, features.2, features.4, features.6 exceed the "
                              "tolerance; nothing was written")
    assert plain["failed_blocks"] == 4 and plain["report"]["ok"] is False
    assert not (tmp_path / "out").exists()  # created for the batch, removed again: nothing was written


def test_an_internal_error_in_one_source_is_exit_4_and_the_others_are_written(tmp_path: Path, monkeypatch) -> None:
    import repvgg_cli.api

    real = repvgg_cli.api.convert_file

    def broken_for_tiny(source, output, *args, **kwargs):
        if "repvgg_tiny" in str(source):
            raise ZeroDivisionError("float division by zero")
        return real(source, output, *args, **kwargs)

    monkeypatch.setattr(repvgg_cli.api, "convert_file", broken_for_tiny)
    sources = copy_samples(tmp_path / "ckpts", ["plain_net.pt", "repvgg_tiny.pt"])
    (tmp_path / "out").mkdir()
    result = invoke("convert", sources, tmp_path / "out", "--jobs", "1", "--json")  # in this process: patched
    assert result.exit_code == 4
    assert len(error_lines(result)) == 1 and "Traceback" not in result.stderr
    document = json.loads(result.stdout)
    tiny = document["items"][1]
    assert tiny["exit_code"] == 4
    assert tiny["error"].startswith("internal error ZeroDivisionError: float division by zero (a bug in repvgg_cli")
    assert os.listdir(tmp_path / "out") == ["plain_net.deploy.pt"]


def test_existing_outputs_need_force_and_the_output_folder_may_be_the_source_folder(tmp_path: Path) -> None:
    sources = copy_samples(tmp_path / "ckpts", ["plain_net.pt", "plain_net.safetensors"])
    before = digests(sources)
    assert invoke("convert", sources, sources, "--jobs", "1").exit_code == 0
    names = ["plain_net.deploy.pt", "plain_net.deploy.safetensors", "plain_net.pt", "plain_net.safetensors"]
    assert sorted(os.listdir(sources)) == names
    written = digests(sources)
    again = invoke("convert", sources, sources, "--jobs", "1", "--json")  # the *.deploy.* files are not sources
    assert again.exit_code == 2
    document = json.loads(again.stdout)
    assert [i["error"] for i in document["items"]] == [f"{sources / 'plain_net.deploy.pt'} exists",
                                                       f"{sources / 'plain_net.deploy.safetensors'} exists"]
    assert [i["hint"] for i in document["items"]] == ["pass --force to replace it"] * 2
    assert digests(sources) == written
    assert invoke("convert", sources, sources, "--jobs", "1", "--force").exit_code == 0
    assert digests(sources) == written
    assert {k: v for k, v in digests(sources).items() if k in before} == before


def test_format_picks_the_output_format(tmp_path: Path) -> None:
    sources = copy_samples(tmp_path / "ckpts", ["plain_net.pt", "repvgg_tiny_train.pt"])
    result = invoke("convert", sources, tmp_path / "out", "--format", "safetensors", "--jobs", "1")
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["plain_net.deploy.safetensors", "repvgg_tiny_train.deploy.safetensors"]
    assert all((tmp_path / "out" / n).read_bytes()[8:9] == b"{" for n in os.listdir(tmp_path / "out"))


def test_one_file_into_a_folder(tmp_path: Path) -> None:
    source = copy_samples(tmp_path / "ckpts", ["plain_net.pt"]) / "plain_net.pt"
    result = invoke("convert", source, f"{tmp_path / 'new'}{os.sep}")  # a trailing slash: a folder, created
    assert result.exit_code == 0, result.stderr
    assert os.listdir(tmp_path / "new") == ["plain_net.deploy.pt"]
    result = invoke("convert", source, tmp_path / "new", "--format", "safetensors")  # an existing folder
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "new")) == ["plain_net.deploy.pt", "plain_net.deploy.safetensors"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("collision", "Error: {ckpts}/plain_net.pt and {ckpts}/plain_net.safetensors would both be written to "
                      "{out}/plain_net.deploy.safetensors"),
        ("output-is-a-file", "Error: {tmp}/file.txt is a file; with several sources or a folder, OUTPUT must be a folder"),
        ("output-named-like-a-file", "Error: {tmp}/deploy.pt is named like a checkpoint file, but several sources "
                                     "need an output folder"),
        ("empty-folder", "Error: {tmp}/empty holds no checkpoint (*.pt, *.pth, *.safetensors)"),
        ("missing-parent", "Error: {tmp}/no/such does not exist"),
        ("markdown-report", "Error: --report {tmp}/r.md: a batch report is .json or .html"),
        ("format-for-one-file", "Error: --format is for batch conversion into a folder"),
        ("no-output", "Error: convert needs SOURCE... OUTPUT: the output is missing"),
    ],
)
def test_usage_errors_are_refused_before_any_work(tmp_path: Path, case: str, message: str) -> None:
    ckpts = copy_samples(tmp_path / "ckpts", ["plain_net.pt", "plain_net.safetensors"])
    out = tmp_path / "out"
    (tmp_path / "file.txt").write_text("x", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    args = {
        "collision": [ckpts, out, "--format", "safetensors"],
        "output-is-a-file": [ckpts, tmp_path / "file.txt"],
        "output-named-like-a-file": [ckpts / "plain_net.pt", ckpts / "plain_net.safetensors", tmp_path / "deploy.pt"],
        "empty-folder": [tmp_path / "empty", out],
        "missing-parent": [ckpts, tmp_path / "no" / "such" / "out"],
        "markdown-report": [ckpts, out, "--report", tmp_path / "r.md"],
        "format-for-one-file": [ckpts / "plain_net.pt", tmp_path / "d.pt", "--format", "pt"],
        "no-output": [ckpts / "plain_net.pt"],
    }[case]
    before = sorted(os.listdir(tmp_path))
    result = invoke("convert", *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert error_lines(result) == [message.format(ckpts=ckpts, out=out, tmp=tmp_path)]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == before
    assert sorted(os.listdir(ckpts)) == ["plain_net.pt", "plain_net.safetensors"]


def test_plan_names_outputs_deterministically(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for name in ("b.pth", "a.safetensors", "a.deploy.pt", "notes.txt", "c.pt"):
        (folder / name).write_bytes(b"x")
    (folder / "sub.pt").mkdir()
    items = plan_batch([folder / "c.pt", folder], tmp_path / "out")
    assert items == [
        BatchItem(folder / "c.pt", tmp_path / "out" / "c.deploy.pt"),
        BatchItem(folder / "a.safetensors", tmp_path / "out" / "a.deploy.safetensors"),
        BatchItem(folder / "b.pth", tmp_path / "out" / "b.deploy.pth"),
    ]
    assert output_name(Path("x/model.ckpt.pt"), "safetensors") == "model.ckpt.deploy.safetensors"
    with pytest.raises(InputError, match="would both be written"):
        plan_batch([folder / "c.pt", tmp_path / "other" / "c.pt"], tmp_path / "out")


def test_batch_report_html_covers_every_source(tmp_path: Path) -> None:
    sources = copy_samples(tmp_path / "ckpts", ["plain_net.pt", "repvgg_tiny.safetensors"])
    (sources / "empty.pt").write_bytes(b"")
    report = tmp_path / "batch.html"
    result = invoke("convert", sources, tmp_path / "out", "--jobs", "1", "--report", report)
    assert result.exit_code == 2
    page = report.read_text(encoding="utf-8")
    assert page.count("<svg") == 4  # two charts for each converted source
    for name in ("features.0", "features.6", "stage0", "stage4.0", "empty.pt is empty", "Error (exit 2)"):
        assert name in page, name
    assert "http://" not in page and "https://" not in page and "<script" not in page

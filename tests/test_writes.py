"""Nothing lost, nothing overwritten (issue 10, section 3): every path the tool writes goes through
one writer that is atomic, creates without replacing unless --force, never writes a source, the
output or through a symbolic link, and cleans up on SIGINT, SIGTERM and SIGHUP."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repvgg_cli.batch import plan_batch
from repvgg_cli.errors import InputError, OutputExistsError
from tests.helpers import ROOT, SAMPLES, error_lines, invoke

PLAIN = SAMPLES / "plain_net.pt"
TINY = SAMPLES / "repvgg_tiny.pt"
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.repvgg-(?P<pid>\d+)-[^/]+\.tmp$")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> dict[str, str]:
    """Every entry of ``folder`` (hidden ones too) with its content's digest ('link' for a link)."""
    return {p.name: ("link" if p.is_symlink() else sha256(p)) for p in sorted(folder.iterdir())}


def copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


# -- --report follows OUTPUT's rules ----------------------------------------------------------


def test_an_existing_report_needs_force_and_is_refused_before_any_work(tmp_path: Path) -> None:
    report, output = tmp_path / "report.json", tmp_path / "deploy.safetensors"
    report.write_bytes(b"an earlier report")
    refused = invoke("convert", PLAIN, output, "--report", report)
    assert refused.exit_code == 2
    assert error_lines(refused) == [f"Error: --report {report} exists"]
    assert "Hint: pass --force to replace it" in refused.stderr
    assert report.read_bytes() == b"an earlier report" and not output.exists()  # refused before the conversion
    replaced = invoke("convert", PLAIN, output, "--report", report, "--force")
    assert replaced.exit_code == 0, replaced.stderr
    assert json.loads(report.read_text())["ok"] is True and output.is_file()
    assert sorted(os.listdir(tmp_path)) == ["deploy.safetensors", "report.json"]  # no temporary file left


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_the_report_is_never_the_source_even_with_force(tmp_path: Path, link: str) -> None:
    source = copy(PLAIN, tmp_path / "train.pt")
    report = tmp_path / "report.json"
    if link == "hard":
        os.link(source, report)
    else:
        report.symlink_to(source)
    before = sha256(source)
    result = invoke("convert", source, tmp_path / "deploy.pt", "--report", report, "--force")
    assert result.exit_code == 2
    assert error_lines(result) == [f"Error: --report {report} is the source checkpoint; it is never overwritten"]
    assert sha256(source) == before and not (tmp_path / "deploy.pt").exists()


def test_the_report_is_never_the_output(tmp_path: Path) -> None:
    output = copy(PLAIN, tmp_path / "deploy.pt")  # an earlier output, replaced with --force
    report = tmp_path / "report.md"
    os.link(output, report)  # the report's name is a second name of the output file
    before = listing(tmp_path)
    result = invoke("convert", PLAIN, output, "--report", report, "--force")
    assert result.exit_code == 2
    assert error_lines(result) == [f"Error: --report {report} is also {output}, which this command writes"]
    assert listing(tmp_path) == before


@pytest.mark.parametrize("target", ["elsewhere", "dangling"])
def test_a_symbolic_link_at_the_report_path_is_refused_not_followed(tmp_path: Path, target: str) -> None:
    pointed = tmp_path / "notes" / "mine.json"
    if target == "elsewhere":
        copy(PLAIN, pointed)
    else:
        pointed.parent.mkdir()
    before = pointed.read_bytes() if pointed.exists() else None
    report = tmp_path / "report.json"
    report.symlink_to(pointed)
    result = invoke("convert", PLAIN, tmp_path / "deploy.safetensors", "--report", report, "--force")
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"Error: --report {report} is a symbolic link; files are never written through or over one"]
    assert report.is_symlink() and (pointed.read_bytes() if pointed.exists() else None) == before


def test_a_report_that_fails_half_written_leaves_the_old_one_whole(tmp_path: Path, monkeypatch) -> None:
    report, output = tmp_path / "report.json", tmp_path / "deploy.safetensors"
    report.write_text('{"earlier": true}\n')
    real = Path.write_text

    def disk_full_half_way(self: Path, text: str, *args, **kwargs) -> int:
        if self.suffix in (".json", ".tmp") and "report.json" in self.name:
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full_half_way)
    result = invoke("convert", PLAIN, output, "--report", report, "--force")
    assert result.exit_code == 2
    assert error_lines(result)[0].startswith("Error: cannot read or write")
    assert report.read_text() == '{"earlier": true}\n'
    assert sorted(os.listdir(tmp_path)) == ["deploy.safetensors", "report.json"]


def test_the_output_and_the_report_go_through_the_one_writer(tmp_path: Path, monkeypatch) -> None:
    from repvgg_cli.io import atomic

    moved: list[tuple[str, bool]] = []
    real = atomic.move_into_place

    def spy(tmp: Path, output: Path, replace: bool) -> None:
        assert TEMP_NAME.match(tmp.name).group("name") == output.name and tmp.parent == output.parent
        moved.append((output.name, replace))
        real(tmp, output, replace)

    monkeypatch.setattr(atomic, "move_into_place", spy)
    for suffix in (".json", ".md", ".html"):
        assert invoke("convert", PLAIN, tmp_path / f"d{suffix}.pt", "--report", tmp_path / f"r{suffix}").exit_code == 0
    assert invoke("convert", PLAIN, tmp_path / "d.json.pt", "--report", tmp_path / "r.json", "--force").exit_code == 0
    batch = copy(PLAIN, tmp_path / "ckpts" / "a.pt").parent
    assert invoke("convert", batch, tmp_path / "out", "--jobs", "1", "--report", tmp_path / "b.html").exit_code == 0
    assert moved == [("d.json.pt", False), ("r.json", False), ("d.md.pt", False), ("r.md", False),
                     ("d.html.pt", False), ("r.html", False), ("d.json.pt", True), ("r.json", True),
                     ("a.deploy.pt", False), ("b.html", False)]


# -- batch: an output is never a source; a dangling link at OUTPUT exists ----------------------


@pytest.mark.parametrize("how", ["named", "hard link"])
def test_a_batch_refuses_an_output_that_is_one_of_its_sources(tmp_path: Path, how: str) -> None:
    ckpts = tmp_path / "ckpts"
    copy(PLAIN, ckpts / "plain_net.pt")
    if how == "named":  # plain_net.pt's output is plain_net.deploy.pt, given as a source too
        sources = [ckpts / "plain_net.pt", copy(TINY, ckpts / "plain_net.deploy.pt")]
    else:  # the output folder holds a second name of another source
        other = copy(TINY, tmp_path / "other.pt")
        (tmp_path / "out").mkdir()
        os.link(other, tmp_path / "out" / "plain_net.deploy.pt")
        sources = [ckpts / "plain_net.pt", other]
    out = ckpts if how == "named" else tmp_path / "out"
    before = {p: sha256(p) for p in sources}
    folder_before = listing(out)
    result = invoke("convert", *sources, out, "--force", "--jobs", "1")
    assert result.exit_code == 2
    output = out / "plain_net.deploy.pt"
    assert error_lines(result) == [f"Error: {output} is the output of {sources[0]} and also a source of this batch; "
                                   "it is never overwritten"]
    assert {p: sha256(p) for p in sources} == before and listing(out) == folder_before
    with pytest.raises(InputError, match="also a source of this batch"):
        plan_batch(sources, out)


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_a_dangling_symbolic_link_at_the_output_counts_as_existing(tmp_path: Path, force: bool) -> None:
    output = tmp_path / "deploy.safetensors"
    output.symlink_to(tmp_path / "gone" / "deploy.safetensors")
    result = invoke("convert", PLAIN, output, *(["--force"] if force else []))
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"Error: {output} is a symbolic link; files are never written through or over one"]
    assert output.is_symlink() and os.listdir(tmp_path) == ["deploy.safetensors"]


def test_a_dangling_link_among_batch_outputs_fails_that_source_alone(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    copy(PLAIN, ckpts / "a.pt")
    copy(PLAIN, ckpts / "b.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.deploy.pt").symlink_to(tmp_path / "nowhere.pt")
    result = invoke("convert", ckpts, out, "--jobs", "1", "--json")
    assert result.exit_code == 2
    items = json.loads(result.stdout)["items"]
    assert [(Path(i["output"]).name, i["exit_code"]) for i in items] == [("a.deploy.pt", 2), ("b.deploy.pt", 0)]
    assert (out / "a.deploy.pt").is_symlink() and not (tmp_path / "nowhere.pt").exists()


# -- create without replace ----------------------------------------------------------------------


@pytest.mark.parametrize("way", ["renameat2", "hard link", "exclusive create"])
def test_a_new_file_is_created_without_replacing_one_that_appeared(tmp_path: Path, monkeypatch, way: str) -> None:
    from repvgg_cli.io import atomic

    if way != "renameat2":
        monkeypatch.setattr(atomic, "_rename_no_replace", lambda tmp, output: False)
    if way == "exclusive create":
        def no_hard_links(src, dst, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(atomic.os, "link", no_hard_links)
    output = tmp_path / "x.bin"
    atomic.atomic_write(output, lambda tmp: tmp.write_bytes(b"first"), replace=False)
    assert output.read_bytes() == b"first" and os.listdir(tmp_path) == ["x.bin"]

    def while_writing_another_process_wins(tmp: Path) -> None:
        tmp.write_bytes(b"second")
        output.unlink()
        output.write_bytes(b"theirs")

    with pytest.raises(OutputExistsError, match="appeared while this command ran"):
        atomic.atomic_write(output, while_writing_another_process_wins, replace=False)
    assert output.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["x.bin"]
    atomic.atomic_write(output, lambda tmp: tmp.write_bytes(b"forced"), replace=True)
    assert output.read_bytes() == b"forced" and os.listdir(tmp_path) == ["x.bin"]


def test_nothing_is_moved_into_place_once_a_stop_was_received(tmp_path: Path, monkeypatch) -> None:
    """A handler's exception raised inside a finalizer is dropped by Python; the signal it
    recorded still stops every later rename."""
    from repvgg_cli import signals
    from repvgg_cli.io import atomic

    monkeypatch.setattr(signals, "_received", [signal.SIGTERM])
    with pytest.raises(signals.Terminated) as stopped:
        atomic.atomic_write(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"data"), replace=False)
    assert stopped.value.signum == signal.SIGTERM and signals.exit_status(stopped.value) == 143
    assert os.listdir(tmp_path) == []


def test_a_worker_sees_its_parent_exit(tmp_path: Path) -> None:
    from repvgg_cli.batch import workers

    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone, wait = workers.parent_watch(parent.pid)
        assert not gone()
    finally:
        parent.kill()
        parent.wait()
    wait()  # returns once the process has exited
    assert gone()
    gone_before, wait_before = workers.parent_watch(parent.pid)  # reaped before the watch began
    assert gone_before()


def _race(barrier, rounds: int, folder: str, results) -> None:
    """One of two processes: convert the same source to the same new output, round after round."""
    from repvgg_cli.api import convert_file

    outcomes = []
    for index in range(rounds):
        barrier.wait(timeout=60)
        try:
            convert_file(PLAIN, Path(folder) / f"round{index}.safetensors")
            outcomes.append("wrote")
        except OutputExistsError:
            outcomes.append("exists")
    results.put(outcomes)


def test_two_processes_writing_one_new_output_never_both_succeed(tmp_path: Path) -> None:
    from repvgg_cli.api import convert_file

    reference = tmp_path / "reference.safetensors"
    convert_file(PLAIN, reference)
    folder = tmp_path / "race"
    folder.mkdir()
    rounds = 20
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["repvgg_cli.api"])
    barrier, results = context.Barrier(2), context.Queue()
    racers = [context.Process(target=_race, args=(barrier, rounds, str(folder), results)) for _ in range(2)]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=240) for _ in racers]
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    winners = [sorted(pair) for pair in zip(*outcomes)]
    assert winners == [["exists", "wrote"]] * rounds  # exactly one per round: never both, never neither
    expected = reference.read_bytes()
    assert sorted(os.listdir(folder)) == sorted(f"round{i}.safetensors" for i in range(rounds))
    assert all((folder / f"round{i}.safetensors").read_bytes() == expected for i in range(rounds))


# -- signals: SIGINT, SIGTERM and SIGHUP clean up ---------------------------------------------

PAUSE_BEFORE_RENAME = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started in the background
from repvgg_cli.io import atomic
def paused(tmp, output, replace):  # the whole file is written, not yet moved into place
    print("READY", tmp, file=sys.stderr, flush=True)
    time.sleep(120)
atomic.move_into_place = paused
"""


def _repvgg(*args: object, code: str = "", cwd: Path, log: Path | None = None) -> subprocess.Popen:
    """``repvgg ARGS`` through the console entry point (``repvgg_cli.cli.main``), ``code`` run first;
    stdout and stderr piped, or into ``log`` (a batch's workers would hold pipes open)."""
    script = (f"import sys\n{code}\nfrom repvgg_cli.cli import main\n"
              f"sys.argv = ['repvgg', *{[str(a) for a in args]!r}]\nmain()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    if log is not None:
        with open(log, "w") as handle:
            return subprocess.Popen([sys.executable, "-c", script], cwd=cwd, stdout=subprocess.DEVNULL,
                                    stderr=handle, text=True, env=env)
    return subprocess.Popen([sys.executable, "-c", script], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


SIGNALS = [(signal.SIGTERM, 143, "Terminated (SIGTERM)"), (signal.SIGHUP, 129, "Hung up (SIGHUP)"),
           (signal.SIGINT, 130, "Interrupted")]


def test_a_signal_removes_the_temporary_file_and_exits_128_plus_its_number(tmp_path: Path) -> None:
    """SIGTERM, SIGHUP and Ctrl-C, each to its own ``repvgg convert`` (run side by side), paused
    once its output is written in full to the temporary file, before the rename."""
    folders = [tmp_path / signal.Signals(signum).name for signum, _, _ in SIGNALS]
    processes = []
    for folder in folders:
        folder.mkdir()
        processes.append(_repvgg("convert", TINY, folder / "deploy.safetensors", code=PAUSE_BEFORE_RENAME, cwd=folder))
    try:
        for (signum, status, said), folder, process in zip(SIGNALS, folders, processes):
            ready = process.stderr.readline()
            assert ready.startswith("READY "), ready + process.stderr.read()
            tmp = Path(ready.split(" ", 1)[1].strip())
            named = TEMP_NAME.match(tmp.name)
            assert named and named.group("name") == "deploy.safetensors" and int(named.group("pid")) == process.pid
            assert tmp.parent == folder and tmp.stat().st_size > 100_000  # the whole file, not yet in place
            process.send_signal(signum)
        for (signum, status, said), folder, process in zip(SIGNALS, folders, processes):
            stdout, stderr = process.communicate(timeout=60)
            assert process.returncode == status, stderr
            assert stderr.splitlines() == [f"{said}; nothing was written."]
            assert os.listdir(folder) == []
    finally:
        for process in processes:
            process.kill()


STOP_AS_ANOTHER_ERROR = """
import os, signal
from repvgg_cli.io import atomic
def stopped_inside_a_library(tmp, output, replace):  # as torch.save does with a KeyboardInterrupt in a write
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))
    except KeyboardInterrupt as stop:
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from stop
atomic.move_into_place = stopped_inside_a_library
"""


def test_a_signal_that_a_library_turns_into_another_error_still_ends_as_the_signal(tmp_path: Path) -> None:
    process = _repvgg("convert", TINY, tmp_path / "deploy.pt", code=STOP_AS_ANOTHER_ERROR, cwd=tmp_path)
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert stderr.splitlines() == ["Terminated (SIGTERM); nothing was written."]
    assert os.listdir(tmp_path) == []


def _slow_batch(tmp_path: Path, copies: int) -> tuple[Path, Path]:
    """``copies`` sources (the tiny RepVGG, a few tenths of a second each) and the output folder."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for index in range(copies):
        shutil.copyfile(TINY, ckpts / f"c{index:03d}.pt")
    return ckpts, tmp_path / "out"


def _outputs_appear(out: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while not (out.is_dir() and any(p.name.endswith(".deploy.pt") for p in out.iterdir())):
        assert process.poll() is None, process.returncode
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _complete(path: Path) -> bool:
    import torch

    return bool(torch.load(path, weights_only=True, map_location="cpu"))


def test_sigterm_stops_a_batch_its_workers_and_every_write(tmp_path: Path) -> None:
    copies = 60
    ckpts, out = _slow_batch(tmp_path, copies)
    log = tmp_path / "stderr.txt"
    process = _repvgg("convert", ckpts, out, "--jobs", "2", cwd=tmp_path, log=log)
    try:
        _outputs_appear(out, process)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    stderr = log.read_text()
    assert process.returncode == 143, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "Terminated (SIGTERM); the outputs finished before are complete, no other was written."]
    at_exit = listing(out)
    assert not [name for name in at_exit if name.startswith(".")]  # no temporary file
    assert 0 < len(at_exit) < copies
    time.sleep(1)
    assert listing(out) == at_exit  # the workers wrote nothing after the parent exited
    assert all(_complete(out / name) for name in at_exit)


def test_workers_write_nothing_once_the_batch_parent_is_killed(tmp_path: Path) -> None:
    copies = 60
    ckpts, out = _slow_batch(tmp_path, copies)
    process = _repvgg("convert", ckpts, out, "--jobs", "2", cwd=tmp_path, log=tmp_path / "stderr.txt")
    try:
        _outputs_appear(out, process)
        process.kill()  # SIGKILL: the parent cannot stop its workers; they must notice by themselves
        process.wait(timeout=60)
    finally:
        process.kill()
    def outputs() -> dict[str, str]:  # temporary files may vanish while the folder is read: not listed
        return {p.name: sha256(p) for p in sorted(out.iterdir()) if not p.name.startswith(".")}

    settled = outputs()  # the parent is gone: a rename past its check before that has landed by now
    deadline = time.monotonic() + 120
    while atomic_temp_files(out):  # the workers notice, remove their temporary files and exit
        assert time.monotonic() < deadline, atomic_temp_files(out)
        time.sleep(0.05)
    time.sleep(1)
    assert outputs() == settled
    assert 0 < len(settled) < copies and all(_complete(out / name) for name in settled)


def atomic_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if TEMP_NAME.match(p.name)]

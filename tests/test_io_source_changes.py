"""A source that changes while it is read is refused, and never crashes the process (issue 10,
"The source changing during a conversion").

``load_checkpoint`` notes the file's identity (device, inode, size, mtime, ctime) before reading;
``assert_unchanged`` compares it with the file now and with what the background digest saw, so
the sha256 recorded is that of the bytes read. A memory-mapped source truncated under the
process used to kill it with SIGBUS; now the reads past the new end give zeros, the file is
flagged, and the conversion ends with exit 2 and no output. Each test failed on the code before
the change (no identity, no check, SIGBUS).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from repvgg_cli.errors import InputError
from repvgg_cli.io import mapguard
from repvgg_cli.io.digest import FileDigest
from repvgg_cli.io.read import (
    assert_unchanged,
    load_checkpoint,
    source_change,
    source_unchanged,
)
from tests.helpers import ROOT, SAMPLES

TRAIN = SAMPLES / "repvgg_tiny_train.pt"
LINUX = sys.platform.startswith("linux")


def aged_copy(folder: Path, name: str = "train.pt", source: Path = TRAIN) -> Path:
    """A copy whose mtime is an hour old, so a rewrite within the same clock tick still shows."""
    path = folder / name
    shutil.copy(source, path)
    old = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old, old))
    return path


def test_an_unchanged_source_passes_and_its_digest_is_of_its_bytes(tmp_path: Path) -> None:
    path = aged_copy(tmp_path)
    loaded = load_checkpoint(path)
    assert_unchanged(loaded)
    assert source_change(loaded) is None
    assert loaded.identity is not None and loaded.identity.size == path.stat().st_size
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("how", ["rewritten", "truncated", "replaced", "appended"])
def test_a_source_changed_after_loading_is_refused(tmp_path: Path, how: str) -> None:
    path = aged_copy(tmp_path)
    data = path.read_bytes()
    loaded = load_checkpoint(path)
    if how == "rewritten":  # same size, other bytes
        with open(path, "r+b") as handle:
            handle.seek(len(data) - 100)
            handle.write(bytes(100))
    elif how == "truncated":
        os.truncate(path, len(data) // 2)
    elif how == "replaced":
        other = tmp_path / "other.pt"
        other.write_bytes(data)
        os.replace(other, path)
    else:
        with open(path, "ab") as handle:
            handle.write(b"tail")
    with pytest.raises(InputError) as info:
        assert_unchanged(loaded)
    assert info.value.exit_code == 2
    assert info.value.message.startswith(f"{path} changed while repvgg was reading it: ")
    with pytest.raises(InputError, match="changed while repvgg was reading it"):
        _ = loaded.sha256  # the digest is never handed out for bytes that may not be the ones read


def test_source_unchanged_names_the_change_as_the_cause(tmp_path: Path) -> None:
    path = aged_copy(tmp_path)
    loaded = load_checkpoint(path)
    with source_unchanged(loaded):  # nothing changed: nothing raised
        pass
    # the work's own error, the source unchanged: that error
    with pytest.raises(ValueError, match="a failure of its own"), source_unchanged(loaded):
        raise ValueError("a failure of its own")
    # an error caused by a cut source: the cut is named
    with pytest.raises(InputError, match="its size went from"), source_unchanged(loaded):
        os.truncate(path, 4096)
        raise OSError(14, "Bad address")
    shutil.copy(TRAIN, path)
    loaded = load_checkpoint(path)
    before = path.stat()
    # the work succeeded, but on bytes that have changed
    with pytest.raises(InputError, match="it was modified"), source_unchanged(loaded):
        time.sleep(0.05)  # past the file system's coarse clock tick, so ctime moves
        with open(path, "r+b") as handle:
            handle.seek(-8, os.SEEK_END)
            handle.write(bytes(8))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with its mtime put back
    assert path.stat().st_mtime_ns == before.st_mtime_ns  # only ctime, which cannot be put back, tells


def test_a_digest_of_other_bytes_is_refused(tmp_path: Path) -> None:
    """The CLI starts hashing before torch is imported; if the file is replaced between the hash
    and the load, the hash is of other bytes than the ones converted."""
    path = aged_copy(tmp_path)
    digest = FileDigest(path)
    digest.value()
    replacement = tmp_path / "new.pt"
    shutil.copy(TRAIN, replacement)
    os.replace(replacement, path)
    loaded = load_checkpoint(path, digest=digest)
    with pytest.raises(InputError, match="it was replaced by another file"):
        _ = loaded.sha256


def test_a_file_changed_while_hashed_is_refused(tmp_path: Path, monkeypatch) -> None:
    from repvgg_cli.io import digest as digest_module

    path = aged_copy(tmp_path)
    chunks = []
    real_update = digest_module.hashlib.sha256

    class Cutting:
        def __init__(self):
            self.inner = real_update()

        def update(self, chunk):
            if not chunks:
                os.truncate(path, 1000)
            chunks.append(len(chunk))
            self.inner.update(chunk)

        def hexdigest(self):
            return self.inner.hexdigest()

    monkeypatch.setattr(digest_module.hashlib, "sha256", Cutting)
    with pytest.raises(InputError, match="changed while it was being hashed: its size went from"):
        FileDigest(path).value()


CHILD = textwrap.dedent("""
    import json, os, sys
    from repvgg_cli import api
    from repvgg_cli.errors import RepvggError
    from repvgg_cli.io import read

    def report(**fields):
        print(json.dumps(fields), flush=True)

    def read_all_after_cut(path):
        loaded = read.load_checkpoint(path)
        assert loaded.mapped
        os.truncate(path, 4096)
        total = sum(float(t.double().abs().sum()) for t in loaded.state_dict.values())
        try:
            read.assert_unchanged(loaded)
        except RepvggError as error:
            return report(case=path, code=error.exit_code, message=error.message, survived=True)
        report(case=path, code=0, survived=True)

    def convert_cut_after_load(path, output):
        real = read.check_tensors

        def check_then_cut(*args, **kwargs):  # the last step of load_checkpoint
            real(*args, **kwargs)
            os.truncate(path, 4096)

        read.check_tensors = check_then_cut
        try:
            outcome = api.convert_file(path, output)
        except RepvggError as error:
            return report(case=output, code=error.exit_code, message=error.message)
        finally:
            read.check_tensors = real
        report(case=output, code=0 if outcome.written else 1)

    for kind, *args in map(json.loads, sys.argv[1:]):
        (read_all_after_cut if kind == "read" else convert_cut_after_load)(*args)
""")


@pytest.fixture(scope="module")
def cut_runs(tmp_path_factory) -> dict[str, dict]:
    """One child process (a SIGBUS would kill this one) truncates mapped sources under four
    readers: loading then reading every tensor (torch zip, safetensors), and convert_file into
    safetensors (streamed) and .pt (in memory), cut right after the load."""
    import json

    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("cut")
    cases = []
    zip_source = aged_copy(folder, "read.pt")
    st_source = folder / "read.safetensors"
    save_file({k: v.clone() for k, v in load_checkpoint(TRAIN).state_dict.items()}, st_source)
    cases += [["read", str(zip_source)], ["read", str(st_source)]]
    for suffix in (".safetensors", ".pt"):
        sub = folder / suffix.lstrip(".")
        sub.mkdir()
        cases.append(["convert", str(aged_copy(sub)), str(sub / f"deploy{suffix}")])
    done = subprocess.run([sys.executable, "-c", CHILD, *map(json.dumps, cases)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)  # -7: killed by SIGBUS
    runs = {Path(r["case"]).suffix if "deploy" in r["case"] else r["case"]: r
            for r in map(json.loads, done.stdout.splitlines())}
    return {"folder": folder, **runs}


@pytest.mark.skipif(not LINUX, reason="the SIGBUS guard works on Linux")
@pytest.mark.parametrize("name", ["read.pt", "read.safetensors"])
def test_a_mapped_source_truncated_after_loading_reads_zeros_and_is_refused(cut_runs, name: str) -> None:
    path = cut_runs["folder"] / name
    run = cut_runs[str(path)]
    assert run["survived"] and run["code"] == 2
    assert run["message"].startswith(f"{path} changed while repvgg was reading it: it was truncated while "
                                     "memory-mapped")


@pytest.mark.skipif(not LINUX, reason="the SIGBUS guard works on Linux")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_source_truncated_during_convert_file_exits_2_and_writes_nothing(cut_runs, suffix: str) -> None:
    folder = cut_runs["folder"] / suffix.lstrip(".")
    run = cut_runs[suffix]
    assert run["code"] == 2, run
    assert run["message"].startswith(f"{folder / 'train.pt'} changed while repvgg was reading it")
    assert sorted(p.name for p in folder.iterdir()) == ["train.pt"]  # no output, no temporary file


@pytest.mark.skipif(not LINUX, reason="the SIGBUS guard works on Linux")
def test_a_sigbus_elsewhere_still_kills_the_process(tmp_path: Path) -> None:
    """The guard only covers mappings of watched sources: any other bus error is not hidden."""
    other = tmp_path / "other.bin"
    other.write_bytes(bytes(1 << 16))
    script = textwrap.dedent(f"""
        import mmap, os
        from repvgg_cli.io import mapguard
        from repvgg_cli.io.read import load_checkpoint
        loaded = load_checkpoint({str(TRAIN)!r})
        assert mapguard.guard_status() is None
        with open({str(other)!r}, "r+b") as handle:
            view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            os.truncate({str(other)!r}, 0)
            print(view[40000])
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == -7, (done.returncode, done.stderr)  # SIGBUS, as without the guard


def test_the_guard_is_installed_for_mapped_sources() -> None:
    loaded = load_checkpoint(TRAIN)
    assert loaded.mapped
    if LINUX:
        assert mapguard.guard_status() is None
        assert mapguard.mappings_of(loaded.identity.device, loaded.identity.inode, TRAIN)

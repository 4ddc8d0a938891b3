"""repvgg_cli.io.digest, to the letter (issue 15: mutation score of the io layer).

Each test pins a behaviour a one-line change to ``digest.py`` would break: which fields make a
file's identity, the words that say how it changed, the error when a file changes while it is
hashed, and what :class:`FileDigest` hands back (value, identity, errors).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from repvgg_cli.errors import InputError
from repvgg_cli.io import digest as digest_module
from repvgg_cli.io.digest import FileDigest, FileIdentity, file_identity, sha256_file


def _identity(device=1, inode=2, size=3, mtime_ns=4, ctime_ns=5) -> FileIdentity:
    return FileIdentity(device, inode, size, mtime_ns, ctime_ns)


def test_identity_takes_each_field_from_its_own_stat_field(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 123)
    status = os.stat(path)
    ident = FileIdentity.of(status)
    assert (ident.device, ident.inode, ident.size, ident.mtime_ns, ident.ctime_ns) == (
        status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    assert file_identity(path) == ident
    assert ident.size == 123


@pytest.mark.parametrize(("other", "said"), [
    (_identity(device=9), "it was replaced by another file"),
    (_identity(inode=9), "it was replaced by another file"),
    (_identity(size=30), "its size went from 3 to 30 bytes"),
    (_identity(mtime_ns=40), "it was modified"),
    (_identity(ctime_ns=50), "it was modified"),
    (_identity(), None),
])
def test_difference_says_how_a_file_changed(other: FileIdentity, said: str | None) -> None:
    assert _identity().difference(other) == said


def test_replacement_is_said_before_size_and_size_before_times() -> None:
    assert _identity().difference(FileIdentity(9, 9, 30, 40, 50)) == "it was replaced by another file"
    assert _identity().difference(FileIdentity(1, 2, 30, 40, 50)) == "its size went from 3 to 30 bytes"


def test_sha256_of_a_file_larger_than_one_chunk(tmp_path: Path) -> None:
    data = os.urandom(1000) * (digest_module.CHUNK // 1000 + 3)  # more than one chunk, not a multiple
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")
    assert sha256_file(small) == hashlib.sha256(b"abc").hexdigest()


def test_a_file_that_changes_while_it_is_hashed_is_refused(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    real = os.fstat
    calls = []

    def growing(fd):  # the second look (after reading) sees a longer file
        status = real(fd)
        calls.append(status)
        if len(calls) == 1:
            return status
        values = list(status)
        values[6] += 10  # st_size
        grown = os.stat_result(values, {"st_mtime_ns": status.st_mtime_ns, "st_ctime_ns": status.st_ctime_ns})
        return grown

    monkeypatch.setattr(digest_module.os, "fstat", growing)
    with pytest.raises(InputError) as info:
        sha256_file(path)
    assert info.value.message == f"{path} changed while it was being hashed: its size went from 3 to 13 bytes"


def test_file_digest_value_and_identity(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    before = file_identity(path)
    result = FileDigest(path)
    assert result.path == path
    assert result.value() == hashlib.sha256(b"hello").hexdigest()
    assert result.identity() == before
    assert result.value() == hashlib.sha256(b"hello").hexdigest()  # asked again, same answer


def test_file_digest_runs_on_a_named_daemon_thread(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    result = FileDigest(str(path))  # a str is taken as a path
    assert isinstance(result.path, Path)
    assert result._thread.daemon is True and result._thread.name == "repvgg-sha256"
    result.value()


def test_file_digest_of_a_missing_file_says_it_could_not_be_read(tmp_path: Path) -> None:
    missing = tmp_path / "missing.bin"
    result = FileDigest(missing)
    with pytest.raises(InputError) as info:
        result.value()
    assert info.value.message.startswith(f"{missing} could not be read: ")
    assert "No such file or directory" in info.value.message
    with pytest.raises(InputError):
        result.identity()


def test_file_digest_passes_an_input_error_on_with_its_message_and_hint(tmp_path: Path, monkeypatch) -> None:
    def refuse(path):
        raise InputError("the message", hint="the hint")

    monkeypatch.setattr(digest_module, "_sha256_with_identity", refuse)
    result = FileDigest(tmp_path / "f.bin")
    with pytest.raises(InputError) as info:
        result.value()
    assert info.value.message == "the message" and info.value.hint == "the hint"


def test_a_file_is_read_in_chunks(tmp_path: Path, monkeypatch) -> None:
    """Hashing never holds more than one chunk of the file (a multi-GB checkpoint is not read whole)."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"0123456789")
    sizes = []
    real_open = open

    class Reader:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *args):
            self.handle.close()

        def fileno(self):
            return self.handle.fileno()

        def read(self, size=-1):
            sizes.append(size)
            return self.handle.read(size)

    monkeypatch.setattr(digest_module, "open", lambda p, mode: Reader(real_open(p, mode)), raising=False)
    monkeypatch.setattr(digest_module, "CHUNK", 4)
    assert sha256_file(path) == hashlib.sha256(b"0123456789").hexdigest()
    assert sizes == [4, 4, 4, 4]  # 4 + 4 + 2, then the empty read that ends the loop


def test_the_chunk_is_4_mib() -> None:
    assert digest_module.CHUNK == 4 * 1024 * 1024

"""repvgg_cli.io.atomic, to the letter (issue 15: mutation score of the io layer).

Unit tests of the one writer: the temporary file's name, which paths :func:`check_write_path`
refuses and in what words, what :func:`atomic_write` leaves behind (content, mode, nothing else),
and each way :func:`move_into_place` creates a new file without replacing one.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from repvgg_cli.errors import InputError, OutputExistsError
from repvgg_cli.io import atomic
from repvgg_cli.io.atomic import (
    add_commit_guard,
    atomic_write,
    check_write_path,
    move_into_place,
    same_file,
    temp_files,
    temp_prefix,
    write_text,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# -- names ---------------------------------------------------------------------------------------


def test_temp_prefix_names_the_file_and_the_process() -> None:
    assert temp_prefix(Path("/x/out.pt"), pid=42) == ".out.pt.repvgg-42-"
    assert temp_prefix(Path("out.pt")) == f".out.pt.repvgg-{os.getpid()}-"
    assert atomic.TEMP_MARK == ".repvgg-" and atomic.TEMP_SUFFIX == ".tmp"


def test_temp_files_finds_this_tools_files_sorted_and_per_process(tmp_path: Path) -> None:
    names = [".b.pt.repvgg-7-ff.tmp", ".a.pt.repvgg-7-00.tmp", ".a.pt.repvgg-8-00.tmp",
             "a.pt", ".a.pt.repvgg-7-00.part", "a.pt.repvgg-7-00.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in temp_files(tmp_path)] == [".a.pt.repvgg-7-00.tmp", ".a.pt.repvgg-8-00.tmp",
                                                      ".b.pt.repvgg-7-ff.tmp"]
    assert [p.name for p in temp_files(tmp_path, pid=7)] == [".a.pt.repvgg-7-00.tmp", ".b.pt.repvgg-7-ff.tmp"]
    assert temp_files(tmp_path, pid=9) == []


# -- same_file -------------------------------------------------------------------------------------


def test_same_file(tmp_path: Path, monkeypatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert same_file(a, a) is True  # neither exists: the same path
    monkeypatch.chdir(tmp_path)
    assert same_file(Path("a"), a) is True  # relative and absolute
    assert same_file(a, b) is False  # neither exists
    a.write_bytes(b"1")
    assert same_file(a, b) is False  # one exists
    b.write_bytes(b"1")
    assert same_file(a, b) is False  # two files, same bytes
    os.link(a, tmp_path / "hard")
    os.symlink(a, tmp_path / "soft")
    assert same_file(tmp_path / "hard", a) is True and same_file(tmp_path / "soft", a) is True
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    assert same_file(tmp_path / "dangling", a) is False


# -- check_write_path -------------------------------------------------------------------------------


def test_a_source_is_refused_even_with_force(tmp_path: Path) -> None:
    source = tmp_path / "src.pt"
    source.write_bytes(b"x")
    with pytest.raises(OutputExistsError) as info:
        check_write_path(source, [tmp_path / "other.pt", source], force=True, label="--report ")
    assert info.value.message == f"--report {source} is the source checkpoint; it is never overwritten"


def test_another_output_of_the_command_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    with pytest.raises(OutputExistsError) as info:
        check_write_path(out, [], force=True, others=[tmp_path / "x", out])
    assert info.value.message == f"{out} is also {out}, which this command writes"
    assert info.value.hint == "give each file its own path"


def test_a_symbolic_link_is_refused_even_with_force(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"x")
    link = tmp_path / "link"
    os.symlink(tmp_path / "target", link)
    with pytest.raises(OutputExistsError) as info:
        check_write_path(link, [], force=True)
    assert info.value.message == f"{link} is a symbolic link; files are never written through or over one"
    assert info.value.hint == "remove the link or choose another path"


def test_an_existing_file_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    out.write_bytes(b"x")
    with pytest.raises(OutputExistsError) as info:
        check_write_path(out, [], force=False, label="L ")
    assert info.value.message == f"L {out} exists" and info.value.hint == "pass --force to replace it"
    check_write_path(out, [], force=True)  # allowed


def test_a_folder_and_a_missing_parent_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        check_write_path(tmp_path, [], force=True, label="L ")
    assert type(info.value) is InputError and info.value.message == f"L {tmp_path} is a directory"
    missing = tmp_path / "no" / "out.pt"
    with pytest.raises(InputError) as info:
        check_write_path(missing, [], force=False)
    assert type(info.value) is InputError and info.value.message == f"{missing.parent} does not exist"


def test_a_relative_path_in_the_current_folder_is_allowed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_write_path(Path("out.pt"), [], force=False)


def test_check_write_path_records_whether_atomic_write_may_replace(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    check_write_path(out, [], force=False)
    assert atomic._replace_permits.get()[os.path.abspath(out)] is False
    out.write_bytes(b"theirs")  # appears after the check
    with pytest.raises(OutputExistsError):
        atomic_write(out, lambda tmp: tmp.write_bytes(b"mine"))
    assert out.read_bytes() == b"theirs"
    check_write_path(out, [], force=True)
    assert atomic._replace_permits.get()[os.path.abspath(out)] is True
    atomic_write(out, lambda tmp: tmp.write_bytes(b"mine"))
    assert out.read_bytes() == b"mine"
    # a path never checked is replaced (None means "as allowed, else True")
    other = tmp_path / "other.bin"
    other.write_bytes(b"old")
    atomic_write(other, lambda tmp: tmp.write_bytes(b"new"))
    assert other.read_bytes() == b"new"


# -- atomic_write ------------------------------------------------------------------------------------


def test_atomic_write_writes_through_an_empty_private_temporary_file(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    seen = {}

    def write(tmp: Path) -> None:
        seen["name"], seen["size"], seen["mode"] = tmp.name, tmp.stat().st_size, _mode(tmp)
        seen["folder"] = tmp.parent
        tmp.write_bytes(b"data")

    atomic_write(out, write, replace=False)
    assert out.read_bytes() == b"data" and os.listdir(tmp_path) == ["out.bin"]
    assert seen["size"] == 0 and seen["mode"] == 0o600 and seen["folder"] == tmp_path
    assert seen["name"].startswith(f".out.bin.repvgg-{os.getpid()}-") and seen["name"].endswith(".tmp")
    assert len(seen["name"]) == len(f".out.bin.repvgg-{os.getpid()}-") + 16 + 4


def test_a_new_file_gets_the_mode_open_would_give_it(tmp_path: Path) -> None:
    out = tmp_path / "new.bin"
    atomic_write(out, lambda tmp: tmp.write_bytes(b"x"))
    assert _mode(out) == 0o666 & ~_umask()
    previous = os.umask(0o027)
    try:
        other = tmp_path / "other.bin"
        atomic_write(other, lambda tmp: tmp.write_bytes(b"x"))
        assert _mode(other) == 0o640
        assert os.umask(0o027) == 0o027  # the umask was put back
    finally:
        os.umask(previous)


def test_a_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    os.chmod(out, 0o751)
    atomic_write(out, lambda tmp: tmp.write_bytes(b"new"), replace=True)
    assert out.read_bytes() == b"new" and _mode(out) == 0o751


def test_fsync_flushes_the_temporary_file_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    synced = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    out = tmp_path / "out.bin"
    atomic_write(out, lambda tmp: tmp.write_bytes(b"x"))
    assert synced == []
    atomic_write(out, lambda tmp: tmp.write_bytes(b"y"), fsync=True)
    assert len(synced) == 1 and Path(synced[0]).name.endswith(".tmp") and out.read_bytes() == b"y"
    write_text(tmp_path / "t.txt", "z", fsync=True)
    assert len(synced) == 2


def test_a_failed_write_removes_the_temporary_file_and_keeps_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")

    def half(tmp: Path) -> None:
        tmp.write_bytes(b"ha")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(out, half, replace=True)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_commit_guards_see_the_output_and_can_stop_the_write(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    seen = []

    def guard(output: Path) -> None:
        seen.append((output, sorted(os.listdir(tmp_path))))
        raise RuntimeError("parent gone")

    remove = add_commit_guard(guard)
    try:
        with pytest.raises(RuntimeError, match="parent gone"):
            atomic_write(out, lambda tmp: tmp.write_bytes(b"x"))
    finally:
        remove()
    assert len(seen) == 1 and seen[0][0] == out and len(seen[0][1]) == 1 and seen[0][1][0].endswith(".tmp")
    assert os.listdir(tmp_path) == []
    atomic_write(out, lambda tmp: tmp.write_bytes(b"x"))  # removed: no longer called
    assert len(seen) == 1 and out.read_bytes() == b"x"


def test_write_text_is_utf8_and_replaces_only_with_force(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    write_text(path, "ünï")
    assert path.read_bytes() == "ünï".encode("utf-8")
    with pytest.raises(OutputExistsError):
        write_text(path, "other")
    assert path.read_text(encoding="utf-8") == "ünï"
    write_text(path, "other", force=True)
    assert path.read_text(encoding="utf-8") == "other"


# -- move_into_place -----------------------------------------------------------------------------------


def _tmp(folder: Path, data: bytes = b"new") -> Path:
    tmp = folder / ".out.repvgg-1-00.tmp"
    tmp.write_bytes(data)
    return tmp


def test_move_with_replace_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"old")
    move_into_place(_tmp(tmp_path), out, replace=True)
    assert out.read_bytes() == b"new" and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("way", ["renameat2", "hard link", "exclusive create"])
def test_move_without_replace(tmp_path: Path, monkeypatch, way: str) -> None:
    if way != "renameat2":
        monkeypatch.setattr(atomic, "_rename_no_replace", lambda tmp, output: False)
    if way == "exclusive create":
        def no_hard_links(src, dst, **kwargs):
            raise OSError(errno.EOPNOTSUPP, "not supported")

        monkeypatch.setattr(atomic.os, "link", no_hard_links)
    out = tmp_path / "out"
    move_into_place(_tmp(tmp_path), out, replace=False)
    assert out.read_bytes() == b"new" and os.listdir(tmp_path) == ["out"]
    tmp = _tmp(tmp_path, b"second")
    with pytest.raises(OutputExistsError) as info:
        move_into_place(tmp, out, replace=False)
    assert info.value.message == (f"{out} appeared while this command ran (another process wrote it); "
                                  "it was left as it was")
    assert info.value.hint == "pass --force to replace it" and info.value.__suppress_context__
    assert out.read_bytes() == b"new" and tmp.exists()  # the caller removes tmp


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS])
def test_each_no_hard_links_error_falls_back_to_an_exclusive_create(tmp_path: Path, monkeypatch, code: int) -> None:
    monkeypatch.setattr(atomic, "_rename_no_replace", lambda tmp, output: False)

    def no_hard_links(src, dst, **kwargs):
        raise OSError(code, "no")

    monkeypatch.setattr(atomic.os, "link", no_hard_links)
    out = tmp_path / "out"
    move_into_place(_tmp(tmp_path), out, replace=False)
    assert out.read_bytes() == b"new" and os.listdir(tmp_path) == ["out"]


def test_another_hard_link_error_is_raised(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(atomic, "_rename_no_replace", lambda tmp, output: False)

    def broken(src, dst, **kwargs):
        raise OSError(errno.EIO, "io error")

    monkeypatch.setattr(atomic.os, "link", broken)
    with pytest.raises(OSError) as info:
        move_into_place(_tmp(tmp_path), tmp_path / "out", replace=False)
    assert info.value.errno == errno.EIO and not (tmp_path / "out").exists()


def test_the_hard_link_way_removes_the_temporary_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(atomic, "_rename_no_replace", lambda tmp, output: False)
    tmp = _tmp(tmp_path)
    move_into_place(tmp, tmp_path / "out", replace=False)
    assert not tmp.exists() and (tmp_path / "out").stat().st_nlink == 1


def test_reserve_then_replace_removes_its_reservation_when_the_rename_fails(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"

    def failing(a, b):
        assert out.exists() and out.stat().st_size == 0 and _mode(out) == 0o600 & ~_umask()
        raise OSError(errno.EIO, "io error")

    monkeypatch.setattr(atomic.os, "replace", failing)
    tmp = _tmp(tmp_path)
    with pytest.raises(OSError):
        atomic._reserve_then_replace(tmp, out)
    assert not out.exists() and tmp.exists()
    monkeypatch.undo()
    out.write_bytes(b"taken")
    with pytest.raises(FileExistsError):
        atomic._reserve_then_replace(tmp, out)
    assert out.read_bytes() == b"taken"


# -- renameat2 ------------------------------------------------------------------------------------------


class _FakeRenameat2:
    def __init__(self, result: int, code: int = 0) -> None:
        self.result, self.code, self.calls = result, code, []

    def __call__(self, *args):
        self.calls.append(args)
        return self.result


def _with_fake(monkeypatch, fake, code: int = 0) -> None:
    monkeypatch.setattr(atomic, "_renameat2", [fake])
    monkeypatch.setattr(atomic.ctypes, "get_errno", lambda: code)


def test_renameat2_is_called_with_noreplace_on_both_paths(tmp_path: Path, monkeypatch) -> None:
    fake = _FakeRenameat2(0)
    _with_fake(monkeypatch, fake)
    assert atomic._rename_no_replace(tmp_path / "a", tmp_path / "b") is True
    assert fake.calls == [(-100, os.fsencode(tmp_path / "a"), -100, os.fsencode(tmp_path / "b"), 1)]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP])
def test_renameat2_unsupported_says_so(tmp_path: Path, monkeypatch, code: int) -> None:
    _with_fake(monkeypatch, _FakeRenameat2(-1), code)
    assert atomic._rename_no_replace(tmp_path / "a", tmp_path / "b") is False


def test_renameat2_errors(tmp_path: Path, monkeypatch) -> None:
    _with_fake(monkeypatch, _FakeRenameat2(-1), errno.EEXIST)
    with pytest.raises(FileExistsError) as info:
        atomic._rename_no_replace(tmp_path / "a", tmp_path / "b")
    assert info.value.errno == errno.EEXIST and info.value.filename == str(tmp_path / "b")
    assert info.value.strerror == os.strerror(errno.EEXIST)
    _with_fake(monkeypatch, _FakeRenameat2(-1), errno.EACCES)
    with pytest.raises(OSError) as info:
        atomic._rename_no_replace(tmp_path / "a", tmp_path / "b")
    assert type(info.value) is PermissionError and info.value.errno == errno.EACCES
    assert info.value.filename == str(tmp_path / "b") and info.value.strerror == os.strerror(errno.EACCES)


def test_no_renameat2_means_not_done(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(atomic, "_renameat2", [None])
    assert atomic._rename_no_replace(tmp_path / "a", tmp_path / "b") is False


def test_renameat2_is_looked_up_once_from_libc(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(atomic, "_renameat2", [])
    (tmp_path / "a").write_bytes(b"x")
    assert atomic._rename_no_replace(tmp_path / "a", tmp_path / "b") is True  # Linux has it
    assert len(atomic._renameat2) == 1 and atomic._renameat2[0] is not None
    assert (tmp_path / "b").read_bytes() == b"x"
    (tmp_path / "a").write_bytes(b"y")
    with pytest.raises(FileExistsError):
        atomic._rename_no_replace(tmp_path / "a", tmp_path / "b")
    assert len(atomic._renameat2) == 1


def test_write_text_does_not_fsync_unless_asked(tmp_path: Path, monkeypatch) -> None:
    synced = []
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(fd))
    write_text(tmp_path / "t.txt", "z")
    assert synced == [] and (tmp_path / "t.txt").read_text() == "z"


def test_write_text_is_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """Reports are UTF-8 even where the locale's encoding is ASCII (LC_ALL=C without UTF-8 mode)."""
    import subprocess
    import sys

    write_text(tmp_path / "here.txt", "ü")  # in this process too
    assert (tmp_path / "here.txt").read_bytes() == "ü".encode("utf-8")
    out = tmp_path / "c.txt"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    script = ("import sys, locale; from pathlib import Path; from repvgg_cli.io.atomic import write_text; "
              "print(locale.getpreferredencoding(False)); write_text(Path(sys.argv[1]), '\\u00fc')")
    done = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().lower() in ("ansi_x3.4-1968", "ascii", "us-ascii")  # the locale really is ASCII
    assert out.read_bytes() == "ü".encode("utf-8")


def test_without_linux_there_is_no_renameat2(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(atomic, "_renameat2", [])
    monkeypatch.setattr(atomic.sys, "platform", "darwin")
    assert atomic._rename_no_replace(tmp_path / "a", tmp_path / "b") is False
    assert atomic._renameat2 == [None]


def test_a_libc_without_renameat2(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(atomic, "_renameat2", [])
    monkeypatch.setattr(atomic.ctypes, "CDLL", lambda *args, **kwargs: object())
    assert atomic._rename_no_replace(tmp_path / "a", tmp_path / "b") is False
    assert atomic._renameat2 == [None]


def test_reserve_then_replace_keeps_the_first_error_when_the_reservation_is_gone(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"

    def failing(a, b):
        out.unlink()  # another process removed the reservation meanwhile
        raise OSError(errno.EIO, "io error")

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError) as info:
        atomic._reserve_then_replace(_tmp(tmp_path), out)
    assert info.value.errno == errno.EIO and not out.exists()


def test_a_failed_write_that_removed_its_temporary_file_raises_its_own_error(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        tmp.unlink()
        raise ValueError("the writer's error")

    with pytest.raises(ValueError, match="the writer's error"):
        atomic_write(tmp_path / "out.bin", write)
    assert os.listdir(tmp_path) == []

"""repvgg_cli.io.mapguard, to the letter (issue 15: mutation score of the io layer).

The parts that run without a SIGBUS (those are in tests/test_io_source_changes.py, in
subprocesses): reading ``/proc/self/maps``, finding one file's mappings, the handler's
installation and the reasons it is left off, and which faults are the guard's.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
from pathlib import Path

import pytest

from repvgg_cli.io import mapguard as mg
from repvgg_cli.io.mapguard import FileMapping, file_mappings, guard_status, mappings_of, was_cut, watch



def _fake_proc_maps(monkeypatch, text: bytes) -> None:
    """``open("/proc/self/maps")`` reads ``text``; every other path opens as usual."""
    real_open = open

    class Maps:
        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def read(self):
            return text

    monkeypatch.setattr("builtins.open", lambda p, *a, **k: Maps() if p == "/proc/self/maps" else real_open(p, *a, **k))

def test_constants() -> None:
    assert (mg._SA_SIGINFO, mg._MAP_FIXED, mg._SI_ADDR_OFFSET, mg._SA_FLAGS_OFFSET) == (4, 0x10, 16, 136)
    assert mg._SIGACTION_BUFFER == 512 and mg._PAGE == mmap.PAGESIZE


def test_base_is_start_minus_offset() -> None:
    assert FileMapping(10_000, 20_000, 4096, 1, 2, "p").base == 10_000 - 4096


def _mapped(tmp_path: Path, size: int = 3 * mmap.PAGESIZE):
    path = tmp_path / "mapped.bin"
    path.write_bytes(b"\1" * size)
    handle = open(path, "rb")
    view = mmap.mmap(handle.fileno(), size - mmap.PAGESIZE, prot=mmap.PROT_READ, offset=mmap.PAGESIZE)
    return path, handle, view


def test_file_mappings_and_mappings_of_a_mapped_file(tmp_path: Path) -> None:
    path, handle, view = _mapped(tmp_path)
    try:
        status = os.stat(path)
        mine = [m for m in file_mappings() if m.inode == status.st_ino and m.path == str(path)]
        assert len(mine) == 1
        mapping = mine[0]
        assert mapping.offset == mmap.PAGESIZE and mapping.end - mapping.start == 2 * mmap.PAGESIZE
        address = ctypes.addressof(ctypes.c_char.from_buffer_copy(b"x"))  # not in the mapping
        assert not mapping.start <= address < mapping.end
        assert mappings_of(status.st_dev, status.st_ino, path) == [mapping]
        # another device, same inode and path (an overlay file system): found by path
        assert mappings_of(status.st_dev + 12345, status.st_ino, path) == [mapping]
        # another device and another path: not this file
        assert mappings_of(status.st_dev + 12345, status.st_ino, tmp_path / "other") == []
        assert mappings_of(status.st_dev, status.st_ino + 1, path) == []
        # a deleted file's mapping is still found by path
        os.unlink(path)
        assert mappings_of(status.st_dev + 12345, status.st_ino, path) != []
    finally:
        view.close()
        handle.close()


def test_file_mappings_parses_each_field(monkeypatch) -> None:
    text = (b"7f0000000000-7f0000002000 r--p 00003000 08:11 1234 /a/b c\n"
            b"7f0000003000-7f0000004000 rw-p 00000000 00:00 0 \n"
            b"7f0000005000-7f0000006000 r--p 00000000 fd:01 99\n"
            b"zz-7f0000008000 r--p 00000000 08:11 5 /bad/start\n"
            b"7f0000009000-7f000000a000 r--p 00000000 08:11 77 /ok\n")
    _fake_proc_maps(monkeypatch, text)
    assert file_mappings() == [FileMapping(0x7f0000000000, 0x7f0000002000, 0x3000, os.makedev(8, 0x11), 1234, "/a/b c"),
                               FileMapping(0x7f0000009000, 0x7f000000a000, 0, os.makedev(8, 0x11), 77, "/ok")]


def test_file_mappings_without_proc(monkeypatch) -> None:
    def failing(*args, **kwargs):
        raise OSError(2, "No such file")

    monkeypatch.setattr("builtins.open", failing)
    assert file_mappings() == []


def test_watched_mapping_at(tmp_path: Path, monkeypatch) -> None:
    path, handle, view = _mapped(tmp_path)
    try:
        status = os.stat(path)
        mapping = mappings_of(status.st_dev, status.st_ino, path)[0]
        monkeypatch.setattr(mg, "_WATCHED", {})
        assert mg._watched_mapping_at(mapping.start) is None  # not watched
        monkeypatch.setattr(mg, "_WATCHED", {status.st_ino: (status.st_dev, os.path.realpath(path))})
        assert mg._watched_mapping_at(mapping.start) == mapping
        assert mg._watched_mapping_at(mapping.end - 1) == mapping
        assert mg._watched_mapping_at(mapping.end) != mapping
        assert mg._watched_mapping_at(0) is None
        monkeypatch.setattr(mg, "_WATCHED", {status.st_ino: (status.st_dev + 1, os.path.realpath(path))})
        assert mg._watched_mapping_at(mapping.start) == mapping  # by path
        monkeypatch.setattr(mg, "_WATCHED", {status.st_ino: (status.st_dev + 1, "/elsewhere")})
        assert mg._watched_mapping_at(mapping.start) is None
    finally:
        view.close()
        handle.close()


def test_watch_registers_the_file_and_forgets_an_earlier_cut(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mg, "_WATCHED", {})
    monkeypatch.setattr(mg, "_CUT", {(7, 9), (7, 10)})
    monkeypatch.setattr(mg._Handler, "unavailable", None)
    (tmp_path / "f").write_bytes(b"x")
    assert was_cut(7, 9) and was_cut(7, 10) and not was_cut(8, 9)
    assert watch(tmp_path / "f", 7, 9) is True
    assert mg._WATCHED == {9: (7, os.path.realpath(tmp_path / "f"))}
    assert not was_cut(7, 9) and was_cut(7, 10)
    assert mg._Handler.installed is True and guard_status() is None


def test_the_installed_action_is_this_modules(monkeypatch) -> None:
    monkeypatch.setattr(mg._Handler, "unavailable", None)
    assert mg._install() is None and mg._Handler.installed
    current = ctypes.create_string_buffer(mg._SIGACTION_BUFFER)
    mg._LIBC.sigaction(signal.SIGBUS, None, current)
    pointer = ctypes.cast(mg._Handler.callback, ctypes.c_void_p).value
    assert ctypes.c_void_p.from_buffer(current, 0).value == pointer
    assert ctypes.c_int.from_buffer(current, mg._SA_FLAGS_OFFSET).value & mg._SA_SIGINFO
    assert mg._install() is None  # once


def test_a_guard_left_off_says_why_and_watches_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mg, "_WATCHED", {})
    monkeypatch.setattr(mg._Handler, "unavailable", None)
    monkeypatch.setattr(mg, "_install", lambda: "only on 64-bit Linux")
    assert watch(tmp_path / "f", 1, 2) is False
    assert guard_status() == "only on 64-bit Linux" and mg._WATCHED == {}
    monkeypatch.setattr(mg, "_install", lambda: pytest.fail("not tried again"))
    assert watch(tmp_path / "f", 1, 2) is False


def _fresh_install(monkeypatch) -> None:
    monkeypatch.setattr(mg._Handler, "installed", False)
    monkeypatch.setattr(mg._Handler, "callback", None)
    monkeypatch.setattr(mg._Handler, "previous", None)


def test_install_reasons(monkeypatch) -> None:
    _fresh_install(monkeypatch)
    monkeypatch.setattr(mg.sys, "platform", "darwin")
    assert mg._install() == "only on 64-bit Linux"
    monkeypatch.setattr(mg.sys, "platform", "linux")
    monkeypatch.setattr(mg.sys, "maxsize", 2**32)
    assert mg._install() == "only on 64-bit Linux"
    monkeypatch.setattr(mg.sys, "maxsize", 2**63 - 1)
    monkeypatch.setattr(mg.platform, "machine", lambda: "sparc64")
    assert mg._install() == "not on sparc64"
    for machine in ("x86_64", "aarch64", "arm64", "ppc64le", "s390x", "riscv64"):
        monkeypatch.setattr(mg.platform, "machine", lambda: machine)
        monkeypatch.setattr(mg, "_LIBC", None)
        monkeypatch.setattr(mg, "_libc", lambda: (_ for _ in ()).throw(OSError("no libc")))
        assert mg._install() == "libc not usable: no libc", machine


def test_install_when_sigaction_fails_or_is_laid_out_otherwise(monkeypatch) -> None:
    _fresh_install(monkeypatch)

    class Libc:
        def __init__(self, result, flags):
            self.result, self.flags, self.restored = result, flags, []

        def sigaction(self, signum, action, previous):
            if action is None:  # read back: a handler at offset 0, the flags at 136
                ctypes.c_void_p.from_buffer(previous, 0).value = self.pointer
                ctypes.c_int.from_buffer(previous, mg._SA_FLAGS_OFFSET).value = self.flags
                return 0
            if previous is None:
                self.restored.append(action)
                return 0
            self.pointer = ctypes.c_void_p.from_buffer(action, 0).value
            return self.result

    failing = Libc(-1, 0)
    monkeypatch.setattr(mg, "_LIBC", failing)
    monkeypatch.setattr(mg.ctypes, "get_errno", lambda: 1)
    assert mg._install() == f"sigaction failed: {os.strerror(1)}"
    odd = Libc(0, 0)
    monkeypatch.setattr(mg, "_LIBC", odd)
    assert mg._install() == "struct sigaction is not laid out as expected"
    assert len(odd.restored) == 1 and mg._Handler.installed is False
    good = Libc(0, mg._SA_SIGINFO)
    monkeypatch.setattr(mg, "_LIBC", good)
    assert mg._install() is None and mg._Handler.installed is True and good.restored == []
    assert mg._Handler.previous is not None and mg._Handler.callback is not None


def test_libc_signatures() -> None:
    libc = mg._libc()
    assert libc.mmap.restype is ctypes.c_void_p and libc.sigaction.restype is ctypes.c_int
    assert libc.mmap.argtypes == [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_long]
    assert libc.sigaction.argtypes == [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


# -- the handler itself, called directly with a fake siginfo and a fake libc -------------------------------


class _FakeLibc:
    def __init__(self, mmap_result=None) -> None:
        self.mmap_result, self.mmaps, self.sigactions = mmap_result, [], []

    def mmap(self, address, length, prot, flags, fd, offset):
        self.mmaps.append((address, length, prot, flags, fd, offset))
        return address if self.mmap_result is None else self.mmap_result

    def sigaction(self, signum, action, previous):
        self.sigactions.append((signum, action, previous))
        return 0


def _siginfo(address: int):
    info = ctypes.create_string_buffer(128)
    ctypes.c_void_p.from_buffer(info, mg._SI_ADDR_OFFSET).value = address
    return info, ctypes.addressof(info)


def test_a_fault_in_a_watched_mapping_maps_zeros_over_the_rest(tmp_path: Path, monkeypatch) -> None:
    path, handle, view = _mapped(tmp_path, 4 * mmap.PAGESIZE)
    try:
        status = os.stat(path)
        mapping = mappings_of(status.st_dev, status.st_ino, path)[0]
        libc = _FakeLibc()
        monkeypatch.setattr(mg, "_LIBC", libc)
        monkeypatch.setattr(mg, "_WATCHED", {status.st_ino: (status.st_dev, os.path.realpath(path))})
        monkeypatch.setattr(mg, "_CUT", set())
        monkeypatch.setattr(mg._Handler, "installed", True)
        fault = mapping.start + mmap.PAGESIZE + 123  # inside the second page
        info, pointer = _siginfo(fault)
        import gc

        assert gc.isenabled()
        mg._on_sigbus(signal.SIGBUS, pointer, 0)
        first = mapping.start + mmap.PAGESIZE
        assert libc.mmaps == [(first, mapping.end - first, mmap.PROT_READ | mmap.PROT_WRITE,
                               mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10, -1, 0)]
        assert mg._CUT == {(status.st_dev, status.st_ino)} and was_cut(status.st_dev, status.st_ino)
        assert libc.sigactions == [] and mg._Handler.installed is True and gc.isenabled()
    finally:
        view.close()
        handle.close()


def test_a_fault_the_zero_pages_cannot_cover_goes_to_the_previous_action(tmp_path: Path, monkeypatch) -> None:
    path, handle, view = _mapped(tmp_path)
    try:
        status = os.stat(path)
        mapping = mappings_of(status.st_dev, status.st_ino, path)[0]
        libc = _FakeLibc(mmap_result=2**64 - 1)  # MAP_FAILED
        previous = object()
        monkeypatch.setattr(mg, "_LIBC", libc)
        monkeypatch.setattr(mg, "_WATCHED", {status.st_ino: (status.st_dev, os.path.realpath(path))})
        monkeypatch.setattr(mg, "_CUT", set())
        monkeypatch.setattr(mg._Handler, "installed", True)
        monkeypatch.setattr(mg._Handler, "previous", previous)
        info, pointer = _siginfo(mapping.start)
        mg._on_sigbus(signal.SIGBUS, pointer, 0)
        assert len(libc.mmaps) == 1 and libc.mmaps[0][0] == mapping.start  # a page's first byte: itself
        assert mg._CUT == set() and libc.sigactions == [(signal.SIGBUS, previous, None)]
        assert mg._Handler.installed is False
    finally:
        view.close()
        handle.close()


def test_a_fault_elsewhere_goes_to_the_previous_action_with_gc_left_as_it_was(monkeypatch) -> None:
    import gc

    libc = _FakeLibc()
    previous = object()
    monkeypatch.setattr(mg, "_LIBC", libc)
    monkeypatch.setattr(mg, "_WATCHED", {})
    monkeypatch.setattr(mg._Handler, "installed", True)
    monkeypatch.setattr(mg._Handler, "previous", previous)
    info, pointer = _siginfo(8)  # no mapping there
    gc.disable()
    try:
        mg._on_sigbus(signal.SIGBUS, pointer, 0)
        assert not gc.isenabled()  # left disabled, as it was
    finally:
        gc.enable()
    assert libc.mmaps == [] and libc.sigactions == [(signal.SIGBUS, previous, None)]
    assert mg._Handler.installed is False
    monkeypatch.setattr(mg._Handler, "installed", True)
    info, pointer = _siginfo(0)  # a null address
    mg._on_sigbus(signal.SIGBUS, pointer, 0)
    assert gc.isenabled() and mg._Handler.installed is False


def test_the_handler_disables_gc_while_it_runs(tmp_path: Path, monkeypatch) -> None:
    import gc

    seen = []
    monkeypatch.setattr(mg, "_watched_mapping_at", lambda address: seen.append((address, gc.isenabled())))
    monkeypatch.setattr(mg, "_LIBC", _FakeLibc())
    monkeypatch.setattr(mg._Handler, "installed", True)
    info, pointer = _siginfo(4096 * 7 + 5)
    mg._on_sigbus(signal.SIGBUS, pointer, 0)
    assert seen == [(4096 * 7 + 5, False)] and gc.isenabled()


# -- details the tests above leave open -------------------------------------------------------------------


def test_maps_lines_are_kept_by_their_inode_field_and_paths_need_not_be_utf8(monkeypatch) -> None:
    # an anonymous named mapping ([heap]: inode 0) is no file; a file whose name is "0" is one;
    # a non-UTF-8 file name is read as os.fsdecode gives it (surrogate escapes), not an error
    text = (b"7f0000000000-7f0000001000 rw-p 00000000 00:00 0 [heap]\n"
            b"7f0000001000-7f0000002000 r--p 00000000 08:11 42 0\n"
            b"7f0000002000-7f0000003000 r--p 00001000 08:11 43 /m/\xff\xfe.pt\n")
    _fake_proc_maps(monkeypatch, text)
    assert file_mappings() == [
        FileMapping(0x7f0000001000, 0x7f0000002000, 0, os.makedev(8, 0x11), 42, "0"),
        FileMapping(0x7f0000002000, 0x7f0000003000, 0x1000, os.makedev(8, 0x11), 43, os.fsdecode(b"/m/\xff\xfe.pt")),
    ]


def test_a_mapped_file_with_a_non_utf8_name_is_found_by_path(tmp_path: Path) -> None:
    path = tmp_path / os.fsdecode(b"w\xff.bin")
    try:
        path.write_bytes(b"\2" * 2 * mmap.PAGESIZE)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as view:
        status = os.stat(path)
        found = mappings_of(status.st_dev + 12345, status.st_ino, path)  # another device: by path
        assert len(found) == 1 and found[0].path == os.path.realpath(path) and found[0].end - found[0].start == len(view)


def test_a_watched_file_is_known_by_its_device_whatever_its_path_or_by_its_deleted_path(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    path, handle, view = _mapped(tmp_path)
    try:
        status = os.stat(path)
        mapping = mappings_of(status.st_dev, status.st_ino, path)[0]
        # the same device and inode under another name (a hard link, a bind mount): watched
        monkeypatch.setattr(mg, "_WATCHED", {status.st_ino: (status.st_dev, "/elsewhere")})
        assert mg._watched_mapping_at(mapping.start + 1) == mapping
        # deleted after it was watched, and maps shows another device (an overlay): by "<path> (deleted)"
        real = os.path.realpath(path)
        os.unlink(path)
        deleted = [m for m in file_mappings() if m.inode == status.st_ino]
        assert [m.path for m in deleted] == [real + " (deleted)"]
        monkeypatch.setattr(mg, "_WATCHED", {status.st_ino: (status.st_dev + 1, real)})
        assert mg._watched_mapping_at(mapping.start) == deleted[0]
        monkeypatch.setattr(mg, "_WATCHED", {status.st_ino: (status.st_dev + 1, real + "x")})
        assert mg._watched_mapping_at(mapping.start) is None
    finally:
        view.close()
        handle.close()


def test_a_null_fault_address_is_looked_up_as_address_0(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(mg, "_watched_mapping_at", lambda address: seen.append(address))
    monkeypatch.setattr(mg, "_LIBC", _FakeLibc())
    monkeypatch.setattr(mg._Handler, "installed", True)
    info, pointer = _siginfo(0)
    assert ctypes.c_void_p.from_address(pointer + mg._SI_ADDR_OFFSET).value is None  # how ctypes reads NULL
    mg._on_sigbus(signal.SIGBUS, pointer, 0)
    assert seen == [0] and type(seen[0]) is int and mg._Handler.installed is False


def test_64_bit_means_maxsize_above_2_to_the_32(monkeypatch) -> None:
    _fresh_install(monkeypatch)
    monkeypatch.setattr(mg.sys, "platform", "linux")
    monkeypatch.setattr(mg.platform, "machine", lambda: "sparc64")  # stops right after the 64-bit test
    for maxsize in (2**32 + 1, 2**33, 2**40):
        monkeypatch.setattr(mg.sys, "maxsize", maxsize)
        assert mg._install() == "not on sparc64", maxsize
    monkeypatch.setattr(mg.sys, "maxsize", 2**32)
    assert mg._install() == "only on 64-bit Linux"


def test_a_failed_sigaction_is_named_by_libc_errno(monkeypatch) -> None:
    # the real libc (loaded afresh, so its errno is ctypes'), asked for an invalid signal number
    _fresh_install(monkeypatch)
    monkeypatch.setattr(mg, "_LIBC", None)
    monkeypatch.setattr(mg.signal, "SIGBUS", -1)
    ctypes.set_errno(0)
    assert mg._install() == f"sigaction failed: {os.strerror(errno.EINVAL)}"
    assert mg._Handler.installed is False and mg._LIBC is not None


def test_an_action_laid_out_otherwise_puts_the_previous_sigbus_action_back(monkeypatch) -> None:
    _fresh_install(monkeypatch)
    calls = []

    class Libc:
        def sigaction(self, signum, action, previous):
            calls.append((signum, action, previous))
            if action is None:  # the read back: a null handler, no flags
                ctypes.memset(previous, 0, mg._SIGACTION_BUFFER)
            return 0

    monkeypatch.setattr(mg, "_LIBC", Libc())
    assert mg._install() == "struct sigaction is not laid out as expected"
    assert [c[0] for c in calls] == [signal.SIGBUS] * 3
    installed_previous = calls[0][2]
    assert calls[2] == (signal.SIGBUS, installed_previous, None)  # what the install replaced

"""A memory-mapped source that is truncated while it is read gives zeros and a flag, not SIGBUS.

safetensors and torch zip sources are memory-mapped (their tensors are the file's pages). If
another process truncates the file, the kernel removes the pages past the new end from every
mapping, and the next read of one raises SIGBUS (mmap(2)): the process dies, whatever Python
code was running, leaving temporary files behind. :func:`watch` registers a source and installs
(once, Linux only) a SIGBUS handler that, for a fault inside a mapping of a watched file, maps
anonymous zero pages over the rest of that mapping and records the file as cut
(:func:`was_cut`); the read that faulted then sees zeros and carries on. The caller must then
refuse the result: :func:`repvgg_cli.io.read.assert_unchanged` does (the file's size changed too).
A fault anywhere else puts the previous handler back and returns, so the fault repeats and is
handled as it would have been without this module (the default: the process dies).

The handler is a ctypes callback (Python, run on the faulting thread with the GIL taken), and
reads ``/proc/self/maps`` to find the mapping; the fault address comes from ``siginfo_t``
(``si_addr``, at byte 16 on every 64-bit Linux ABI). ``struct sigaction`` is filled as glibc and
musl lay it out on 64-bit Linux (handler first, 128-byte mask, then the flags at byte 136); the
installed action is read back and compared, and anything unexpected leaves the guard off.

References: mmap(2) and sigaction(2) (Linux man-pages), ``/proc/[pid]/maps`` in proc(5).
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import platform
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

_SA_SIGINFO = 4
_MAP_FIXED = 0x10
_SI_ADDR_OFFSET = 16
_SA_FLAGS_OFFSET = 136
_SIGACTION_BUFFER = 512  # more than glibc's and musl's struct sigaction (152 bytes)
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class FileMapping:
    """One line of ``/proc/self/maps`` that maps a file."""

    start: int
    end: int
    offset: int
    device: int
    inode: int
    path: str

    @property
    def base(self) -> int:
        """The address file offset 0 has (or would have) in this mapping."""
        return self.start - self.offset


def file_mappings() -> list[FileMapping]:
    """The file mappings of this process (empty where ``/proc/self/maps`` cannot be read)."""
    try:
        with open("/proc/self/maps", "rb") as handle:
            lines = handle.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return []
    mappings = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[4] == "0":
            continue
        try:
            start, end = (int(v, 16) for v in fields[0].split("-"))
            major, minor = (int(v, 16) for v in fields[3].split(":"))
            mappings.append(FileMapping(start, end, int(fields[2], 16), os.makedev(major, minor),
                                        int(fields[4]), fields[5]))
        except ValueError:
            continue
    return mappings


def mappings_of(device: int, inode: int, path: Path) -> list[FileMapping]:
    """The mappings of one file, by device and inode (or by inode and path: on overlay file
    systems ``/proc/self/maps`` shows the device of the layer below)."""
    real = os.path.realpath(path)
    return [m for m in file_mappings()
            if m.inode == inode and (m.device == device or m.path in (real, real + " (deleted)"))]


_WATCHED: dict[int, tuple[int, str]] = {}  # inode -> (device, real path)
_CUT: set[tuple[int, int]] = set()
_LOCK = threading.Lock()


class _Handler:
    """The installed SIGBUS action and the one it replaced (None until installed)."""

    callback: object = None
    previous: ctypes.Array | None = None
    installed = False
    unavailable: str | None = None


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    libc.sigaction.restype = ctypes.c_int
    return libc


def _watched_mapping_at(address: int) -> FileMapping | None:
    for mapping in file_mappings():
        if mapping.start <= address < mapping.end:
            known = _WATCHED.get(mapping.inode)
            if known is not None and (known[0] == mapping.device or mapping.path in (known[1], known[1] + " (deleted)")):
                return mapping
            return None
    return None


def _on_sigbus(signum: int, info: int, context: int) -> None:
    enabled = gc.isenabled()
    gc.disable()  # no finalizers (which could unmap or allocate tensors) inside a signal handler
    try:
        address = ctypes.c_void_p.from_address(info + _SI_ADDR_OFFSET).value or 0
        mapping = _watched_mapping_at(address)
        if mapping is not None:
            first = address - address % _PAGE
            done = _LIBC.mmap(first, mapping.end - first, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
            if done == first:
                _CUT.add((_WATCHED[mapping.inode][0], mapping.inode))
                return
        # not ours (or the zero pages could not be mapped): the previous action takes the fault
        _LIBC.sigaction(signal.SIGBUS, _Handler.previous, None)
        _Handler.installed = False
    finally:
        if enabled:
            gc.enable()


_LIBC: ctypes.CDLL | None = None
_CALLBACK_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _install() -> str | None:
    """Install the handler; the reason it cannot be, else None."""
    global _LIBC
    if _Handler.installed:
        return None
    if not sys.platform.startswith("linux") or sys.maxsize <= 2**32 or not hasattr(signal, "SIGBUS"):
        return "only on 64-bit Linux"
    if platform.machine() not in ("x86_64", "aarch64", "arm64", "ppc64le", "s390x", "riscv64"):
        return f"not on {platform.machine()}"
    try:
        _LIBC = _LIBC or _libc()
        callback = _Handler.callback or _CALLBACK_TYPE(_on_sigbus)
        pointer = ctypes.cast(callback, ctypes.c_void_p).value
        action = ctypes.create_string_buffer(_SIGACTION_BUFFER)
        ctypes.c_void_p.from_buffer(action, 0).value = pointer
        ctypes.c_int.from_buffer(action, _SA_FLAGS_OFFSET).value = _SA_SIGINFO
        previous = ctypes.create_string_buffer(_SIGACTION_BUFFER)
        if _LIBC.sigaction(signal.SIGBUS, action, previous) != 0:
            return f"sigaction failed: {os.strerror(ctypes.get_errno())}"
        current = ctypes.create_string_buffer(_SIGACTION_BUFFER)
        _LIBC.sigaction(signal.SIGBUS, None, current)
        if (ctypes.c_void_p.from_buffer(current, 0).value != pointer
                or not ctypes.c_int.from_buffer(current, _SA_FLAGS_OFFSET).value & _SA_SIGINFO):
            _LIBC.sigaction(signal.SIGBUS, previous, None)
            return "struct sigaction is not laid out as expected"
    except (OSError, AttributeError, TypeError, ValueError) as error:
        return f"libc not usable: {error}"
    _Handler.callback, _Handler.previous, _Handler.installed = callback, previous, True
    return None


def watch(path: Path, device: int, inode: int) -> bool:
    """Guard the mappings of this file against SIGBUS from now on.

    Args:
        path: the file (its mappings are found by device and inode, or inode and path).
        device, inode: its identity when it was opened.
    Returns:
        Whether the guard is active (64-bit Linux with a usable libc); else the old behaviour.
    """
    with _LOCK:
        if _Handler.unavailable is not None:
            return False
        problem = _install()
        if problem is not None:
            _Handler.unavailable = problem
            return False
        _WATCHED[inode] = (device, os.path.realpath(path))
        _CUT.discard((device, inode))  # a new read of the file: an earlier cut is that read's business
        return True


def was_cut(device: int, inode: int) -> bool:
    """Whether a read of this file's mapping ran past its end and was given zeros."""
    return (device, inode) in _CUT


def guard_status() -> str | None:
    """Why the guard is off in this process (None: it works, or has not been needed yet)."""
    return _Handler.unavailable

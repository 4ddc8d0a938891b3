"""Atomic file writes and the checks before them: the one writer of every path the tool writes.

Outputs, reports, batch outputs and exported ONNX files all go through :func:`atomic_write`
(:mod:`.write` adds the checkpoint formats on top). No torch here: a batch's parent process,
which writes the report, stays free of it.

A file is written to a temporary file in its folder, named ``.<name>.repvgg-<pid>-<random>.tmp``,
and moved into place only once complete: a failure or a signal leaves no partial file and an
existing file intact. A new file is created without replacing anything (``renameat2`` with
``RENAME_NOREPLACE``, else a hard link): when two processes write the same new path, one succeeds
and the other fails, instead of both reporting success. Only ``force`` replaces (``os.replace``).
:func:`check_write_path` refuses, before any work, a path that is a source, another path the same
command writes, a symbolic link (never written through or over), or an existing file without
``force``.
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import os
import secrets
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .. import signals
from ..errors import InputError, OutputExistsError

TEMP_MARK = ".repvgg-"
TEMP_SUFFIX = ".tmp"


def temp_prefix(path: Path, pid: int | None = None) -> str:
    """The start of a temporary file's name for ``path``: ``.<name>.repvgg-<pid>-`` (then random, ``.tmp``)."""
    return f".{path.name}{TEMP_MARK}{os.getpid() if pid is None else pid}-"


def temp_files(folder: Path, pid: int | None = None) -> list[Path]:
    """The temporary files of this tool in ``folder`` (of process ``pid`` only, when given), sorted."""
    pattern = f".*{TEMP_MARK}{'*' if pid is None else pid}-*{TEMP_SUFFIX}"
    return sorted(folder.glob(pattern))


def same_file(a: Path, b: Path) -> bool:
    """Same path (absolute, without resolving links), or the same existing file (hard or symbolic link)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (or is a dangling link)
        return False


def check_write_path(path: Path, sources: Iterable[Path], force: bool, others: Iterable[Path] = (),
                     label: str = "") -> None:
    """Refuse a path this command must not write, before any work.

    Args:
        path: the file to be written.
        sources: files the command reads: never written, even with ``force`` (same path, hard
            link or symbolic link to them).
        force: allow replacing an existing regular file.
        others: other files the same command writes (the output, for a report).
        label: put before the path in messages (e.g. ``"--report "``).
    Raises:
        OutputExistsError: a source, one of ``others``, a symbolic link, or an existing file
            without ``force``.
        InputError: a folder, or a missing parent folder.
    """
    named = f"{label}{path}"
    for source in sources:
        if same_file(path, source):
            raise OutputExistsError(f"{named} is the source checkpoint; it is never overwritten")
    for other in others:
        if same_file(path, other):
            raise OutputExistsError(f"{named} is also {other}, which this command writes",
                                    hint="give each file its own path")
    if os.path.islink(path):
        raise OutputExistsError(f"{named} is a symbolic link; files are never written through or over one",
                                hint="remove the link or choose another path")
    if os.path.lexists(path) and not force:
        raise OutputExistsError(f"{named} exists", hint="pass --force to replace it")
    if path.is_dir():
        raise InputError(f"{named} is a directory")
    if not path.absolute().parent.is_dir():
        raise InputError(f"{path.parent} does not exist")
    _replace_permits.set({**_replace_permits.get(), os.path.abspath(path): force})


# What check_write_path allowed, per absolute path, for an atomic_write not told ``replace``.
_replace_permits: contextvars.ContextVar[dict[str, bool]] = contextvars.ContextVar("replace_permits", default={})

# Called with the output just before a finished temporary file is moved into place; one that raises
# stops the write (the temporary file is removed). A batch worker checks that its parent is alive.
_commit_guards: list[Callable[[Path], None]] = []


def add_commit_guard(guard: Callable[[Path], None]) -> Callable[[], None]:
    """Run ``guard(output)`` before every file is moved into place; returns a function removing it."""
    _commit_guards.append(guard)
    return lambda: _commit_guards.remove(guard)


def atomic_write(output: Path, write: Callable[[Path], None], fsync: bool = False,
                 replace: bool | None = None) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``output``, then move it into place.

    Any failure, or a signal (SIGINT, and SIGTERM/SIGHUP under the ``repvgg`` command), removes
    the temporary file and leaves ``output`` as it was. With ``fsync`` the file is flushed to disk
    before the rename, so it survives a power loss too (as torch.save and safetensors, the default
    leaves that to the operating system: it costs waiting for the disk).

    Args:
        output: the file to write.
        write: fills the temporary file it is given (an empty file).
        fsync: flush to disk before the rename.
        replace: True replaces an existing ``output``; False creates it or fails if it exists
            (even if it appeared while ``write`` ran). None: as :func:`check_write_path` allowed
            for this path in this thread, else True.
    Raises:
        OutputExistsError: ``output`` exists and ``replace`` is False.
    """
    if replace is None:
        replace = _replace_permits.get().get(os.path.abspath(output), True)
    # Named before it exists, so a signal at any point finds the name to remove: the pid and 64
    # random bits make it this call's own (mkstemp would name it only once created).
    tmp = output.parent / f"{temp_prefix(output)}{secrets.token_hex(8)}{TEMP_SUFFIX}"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        write(tmp)
        if fsync:
            with open(tmp, "rb") as check:
                os.fsync(check.fileno())
        os.chmod(tmp, _new_file_mode(output))
        signals.check()  # stopping: nothing is moved into place (its KeyboardInterrupt may have been dropped)
        for guard in tuple(_commit_guards):
            guard(output)
        move_into_place(tmp, output, replace)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, force: bool = False, fsync: bool = False) -> None:
    """Write a text file (UTF-8) with :func:`atomic_write`; ``force`` replaces an existing one."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync, replace=force)


def move_into_place(tmp: Path, output: Path, replace: bool) -> None:
    """Give the finished ``tmp`` the name ``output``; without ``replace``, only if ``output`` is free.

    Raises:
        OutputExistsError: ``output`` exists (or a link there) and ``replace`` is False; ``tmp``
            is left for the caller to remove.
    """
    if replace:
        os.replace(tmp, output)
        return
    try:
        if _rename_no_replace(tmp, output):
            return
        try:
            os.link(tmp, output)
        except FileExistsError:
            raise
        except OSError as error:  # a file system without hard links (FAT, some network mounts)
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                raise
            _reserve_then_replace(tmp, output)
            return
        tmp.unlink()
    except FileExistsError:
        raise OutputExistsError(f"{output} appeared while this command ran (another process wrote it); "
                                "it was left as it was", hint="pass --force to replace it") from None


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2: list[Any] = []


def _rename_no_replace(tmp: Path, output: Path) -> bool:
    """Linux ``renameat2(..., RENAME_NOREPLACE)``: True when done; False where the system or the
    file system has no such call. Raises FileExistsError when ``output`` exists."""
    if not _renameat2:
        libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
        _renameat2.append(getattr(libc, "renameat2", None))
    function = _renameat2[0]
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(output), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    if code == errno.EEXIST:
        raise FileExistsError(code, os.strerror(code), str(output))
    raise OSError(code, os.strerror(code), str(output))


def _reserve_then_replace(tmp: Path, output: Path) -> None:
    """Create ``output`` empty and exclusively (FileExistsError if taken), then replace it with ``tmp``.
    The empty file is visible for as long as one rename takes; it is removed if the rename fails."""
    os.close(os.open(output, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        os.replace(tmp, output)
    except BaseException:
        output.unlink(missing_ok=True)
        raise


def _new_file_mode(output: Path) -> int:
    """The mode ``open()`` would give a new file (mkstemp's is 0600); a replaced output keeps its own."""
    try:
        return output.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask

"""sha256 of files, computed on a background thread, and the identity of the file that was hashed.

No torch import here: the CLI starts hashing a source before it imports torch, so the hash is
ready by the time the file is read. A digest is only worth recording if it is the digest of the
bytes the conversion read, so :class:`FileDigest` notes the file's :class:`FileIdentity` before and
after hashing, and :mod:`.read` compares it with what it saw while loading and at the end.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, one_line

CHUNK = 4 << 20


@dataclass(frozen=True)
class FileIdentity:
    """What changes when a file is replaced, rewritten or truncated: device and inode (replaced),
    size (truncated or grown), modification and change times in nanoseconds (rewritten in place;
    ``ctime`` cannot be set back by the writer, ``mtime`` can)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)

    def difference(self, other: FileIdentity) -> str | None:
        """How ``other`` differs from this identity, in words; None when it does not."""
        if (self.device, self.inode) != (other.device, other.inode):
            return "it was replaced by another file"
        if self.size != other.size:
            return f"its size went from {self.size} to {other.size} bytes"
        if (self.mtime_ns, self.ctime_ns) != (other.mtime_ns, other.ctime_ns):
            return "it was modified"
        return None


def file_identity(path: Path) -> FileIdentity:
    """The identity of the file at ``path`` now (raises OSError when it cannot be read)."""
    return FileIdentity.of(os.stat(path))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    return _sha256_with_identity(path)[0]


def _sha256_with_identity(path: Path) -> tuple[str, FileIdentity]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        before = FileIdentity.of(os.fstat(handle.fileno()))
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
        after = FileIdentity.of(os.fstat(handle.fileno()))
    change = before.difference(after)
    if change is not None:
        raise InputError(f"{path} changed while it was being hashed: {change}")
    return digest.hexdigest(), before


class FileDigest:
    """The sha256 of a file, computed on a background thread from the moment it is created.

    Importing torch and loading a checkpoint keep one core busy at a time, so the hash costs no
    wall time on a second core (the CLI starts it before importing torch). The thread is a
    daemon, so an error exit never waits for a large file to be hashed. :meth:`identity` is the
    file's identity while it was hashed (the same before and after, or :meth:`value` raises).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._value: str | None = None
        self._identity: FileIdentity | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="repvgg-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value, self._identity = _sha256_with_identity(self.path)
        except BaseException as error:  # noqa: BLE001 - re-raised by value()
            self._error = error

    def value(self) -> str:
        """The hex digest (waits for the thread if it is still reading)."""
        self._thread.join()
        if isinstance(self._error, InputError):
            raise InputError(self._error.message, self._error.hint)
        if self._error is not None:
            raise InputError(f"{self.path} could not be read: {one_line(self._error)}")
        assert self._value is not None
        return self._value

    def identity(self) -> FileIdentity:
        """The file's identity while it was hashed (waits for the thread, like :meth:`value`)."""
        self.value()
        assert self._identity is not None
        return self._identity

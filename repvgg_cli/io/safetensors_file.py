"""The safetensors format, written by this tool: whole, or streamed tensor by tensor."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .metadata import tensor_bytes

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.complex64: "C64",
}

INLINE_BYTES = 1 << 16
"""A whole tensor up to this size is written and hashed by :meth:`SafetensorsStream.put`'s caller
when the writer thread has nothing queued:
handing each of 100 k tiny tensors to the writer and hasher threads cost more than the writing
(on a loaded 2-core machine 27 s of a 52 s conversion; benchmarks/bench_many_tensors.py)."""


def write_safetensors(path: Path, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file, streaming each tensor's bytes (no copy of the whole model).

    The format (8-byte little-endian header length, a JSON header of dtype/shape/offsets per
    tensor plus ``__metadata__``, then the raw bytes) is written here rather than through
    ``safetensors.torch.save_file`` for two reasons: that function first copies every tensor
    into a Python ``bytes`` object (doubling peak memory), and it stores ``__metadata__`` in a
    hash map whose order changes from run to run. Tensors keep the state dict's order; the
    metadata keys are sorted; the files read back with ``safetensors.safe_open``.
    """
    for key, tensor in state.items():
        if not isinstance(tensor, Tensor):
            raise InputError(f"cannot write {key}: a {type(tensor).__name__}, not a tensor")
    tensors = [tensor.detach().cpu().contiguous() for tensor in state.values()]
    entries, _ = _tensor_table({key: (t.dtype, tuple(t.shape)) for key, t in zip(state, tensors)})
    header = {"__metadata__": dict(sorted(metadata.items())), **entries}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for tensor in tensors:
            if tensor.numel():
                handle.write(tensor_bytes(tensor))


Layout = Mapping[str, "tuple[torch.dtype, tuple[int, ...]]"]
"""Every tensor of a file to be written, in file order: ``{key: (dtype, shape)}``."""


def _tensor_table(layout: Layout) -> tuple[dict[str, dict[str, Any]], int]:
    """The safetensors header entries of ``layout`` (dtype code, shape, offsets into the data
    section, in layout order) and the data section's size."""
    entries: dict[str, dict[str, Any]] = {}
    offset = 0
    for key, (dtype, shape) in layout.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise InputError(f"cannot write {key} as safetensors: dtype {dtype} has no safetensors code")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        entries[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    return entries, offset


class SafetensorsStream:
    """Write a safetensors file tensor by tensor, in any order, as the tensors are produced.

    ``repvgg convert`` writes each fused block as soon as it is checked and reuses its memory
    for the next one, so no copy of the deploy model is ever held (nor written in one go).
    The layout (every key's dtype and shape) is fixed first; the data section starts after room
    reserved for the header, whose ``__metadata__`` is known only at the end: :meth:`finish`
    pads the header with spaces (the format allows it) or, if the room was too small, moves the
    data. Tensors are written on a writer thread (while the caller computes the next block),
    each hashed on another thread while its bytes are written; with ``flush`` a flusher thread
    starts putting them on disk, so a final fsync has little left to wait for.

    Args:
        path: an existing, empty file (the temporary file of :func:`atomic_write`).
        layout: ``{key: (dtype, shape)}`` in file order.
        reserve: bytes to reserve for ``__metadata__``.
        flush: start writing each tensor to disk as soon as it is written (for a durable file:
            the final fsync then has little left to wait for).
    """

    def __init__(self, path: Path, layout: Layout, reserve: int, flush: bool = False) -> None:
        self.path = Path(path)
        self._layout = {key: (dtype, tuple(int(d) for d in shape)) for key, (dtype, shape) in layout.items()}
        self._entries, self._data_size = _tensor_table(self._layout)
        table = len(json.dumps(self._entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        self._room = _round_up(table + max(0, reserve) + 64, 8)
        self.digests: dict[str, str] = {}
        self._queued: set[str] = set()
        self._partial: dict[str, tuple[Any, int]] = {}  # put in rows: key -> (sha256 so far, next row)
        self._failed: BaseException | None = None
        self._futures: list[Future] = []
        self._fd = os.open(self.path, os.O_RDWR)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repvgg-write")
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repvgg-hash")
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repvgg-flush")
        self._flushing: Any = None
        self._flush = flush

    def put(self, key: str, tensor: Tensor) -> Future:
        """Queue one tensor of the layout (each exactly once) for writing on the writer thread.

        Returns:
            A future that is done once the tensor's bytes are written and hashed: only then may
            the caller reuse its memory (its result raises what the write raised, e.g. disk full).
        """
        dtype, shape = self._expect(key, None)
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{key} is {tensor.dtype} {tuple(tensor.shape)}; the layout says {dtype} {shape}")
        data = tensor_bytes(tensor)
        if data.nbytes > INLINE_BYTES or (self._futures and not self._futures[-1].done()):
            return self._queue(key, data, hashlib.sha256(), 0, True)
        # small, and the writer thread is idle: written and hashed here (a hand-off costs more).
        # Only when idle, so writes still happen in the order they were put (after a failed
        # write, nothing later is tried) and never beside the writer thread's.
        self._queued.add(key)
        future: Future = Future()
        try:
            self._write_now(key, data)
            future.set_result(None)
        except BaseException as error:  # noqa: BLE001 - handed over like the writer thread's
            future.set_exception(error)
            self._futures.append(future)
        return future

    def put_rows(self, key: str, rows: Tensor, start: int) -> Future:
        """Queue the leading-dimension slice ``start:start + len(rows)`` of one tensor of the
        layout: its slices in order, from the first, so each is written and hashed while the
        caller computes the next (a large weight need not be finished before it is written).

        Returns:
            A future as :meth:`put`'s, for this slice's memory.
        """
        dtype, shape = self._expect(key, start)
        stop = start + int(rows.shape[0]) if rows.dim() else -1
        if rows.dtype != dtype or not shape or tuple(rows.shape[1:]) != shape[1:] or stop > shape[0]:
            raise RuntimeError(f"rows {start}:{stop} of {key} are {rows.dtype} {tuple(rows.shape)}; "
                               f"the layout says {dtype} {shape}")
        digest = self._partial.pop(key, (hashlib.sha256(), 0))[0]
        last = stop == shape[0]
        if not last:
            self._partial[key] = (digest, stop)
        offset = start * math.prod(shape[1:]) * rows.element_size()
        return self._queue(key, tensor_bytes(rows), digest, offset, last)

    def _expect(self, key: str, start: int | None) -> tuple[torch.dtype, tuple[int, ...]]:
        """The layout of ``key``, if writing it (from row ``start``; None: whole) is what comes next."""
        if key not in self._layout or key in self._queued or (start is None and key in self._partial):
            raise RuntimeError(f"{key} is not in the layout, or was written twice")
        expected = self._partial.get(key, (None, 0))[1]
        if start is not None and start != expected:
            raise RuntimeError(f"rows of {key} must come in order: row {start}, expected {expected}")
        return self._layout[key]

    def _queue(self, key: str, data: memoryview, digest: Any, offset: int, last: bool) -> Future:
        if last:
            self._queued.add(key)
        future = self._writer.submit(self._write_rows, key, data, digest, offset, last)
        self._futures.append(future)
        return future

    def _write_now(self, key: str, data: memoryview) -> None:
        """The caller's thread: one whole small tensor (its key's only write)."""
        if self._failed is not None:
            raise self._failed
        try:
            digest = hashlib.sha256(data)
            _pwrite_all(self._fd, data, 8 + self._room + self._entries[key]["data_offsets"][0])
            self.digests[key] = digest.hexdigest()
        except BaseException as error:
            self._failed = error
            raise

    def _write_rows(self, key: str, data: memoryview, digest: Any, offset: int, last: bool) -> None:
        """Writer thread: ``data`` at ``offset`` into ``key``'s bytes, hashed on the hasher thread
        meanwhile (hashlib and pwrite both release the GIL); after a failed write (disk full...)
        the rest is not tried."""
        if self._failed is not None:
            raise self._failed
        try:
            hashed = self._hasher.submit(digest.update, data)  # the hasher runs one task at a time, in order
            _pwrite_all(self._fd, data, 8 + self._room + self._entries[key]["data_offsets"][0] + offset)
            hashed.result()
            if last:
                self.digests[key] = digest.hexdigest()
        except BaseException as error:
            self._failed = error
            raise
        if self._flush and (self._flushing is None or self._flushing.done()):
            self._flushing = self._flusher.submit(os.fdatasync, self._fd)

    def wait(self) -> dict[str, str]:
        """Wait until every queued tensor is written (raising what a write raised); its digests."""
        for future in self._futures:
            future.result()
        return dict(self.digests)

    def finish(self, metadata: Mapping[str, str]) -> None:
        """Write the header (with ``metadata`` as ``__metadata__``) once every tensor is in."""
        self.wait()
        missing = [key for key in self._layout if key not in self.digests]
        if missing:
            raise RuntimeError(f"{len(missing)} tensor(s) of the layout were not written, e.g. {missing[0]}")
        header = {"__metadata__": dict(sorted(metadata.items())), **self._entries}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > self._room:  # the metadata outgrew its room: move the data up
            self._wait_flush()
            room = _round_up(len(text), 8)
            _shift(self._fd, 8 + self._room, self._data_size, room - self._room)
            self._room = room
        text += b" " * (self._room - len(text))
        _pwrite_all(self._fd, memoryview(len(text).to_bytes(8, "little") + text), 0)
        os.ftruncate(self._fd, 8 + self._room + self._data_size)
        self._wait_flush()

    def _wait_flush(self) -> None:
        if self._flushing is not None:
            self._flushing.result()

    def close(self) -> None:
        """Stop the threads and close the file (also after an error)."""
        self._writer.shutdown(wait=True)
        self._hasher.shutdown(wait=True)
        self._flusher.shutdown(wait=True)
        os.close(self._fd)

    def __enter__(self) -> SafetensorsStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = memoryview(data).cast("B")
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _shift(fd: int, start: int, size: int, delta: int, chunk: int = 16 << 20) -> None:
    """Move ``size`` bytes at ``start`` up by ``delta`` bytes, last chunk first."""
    end = size
    while end > 0:
        n = min(chunk, end)
        _pwrite_all(fd, memoryview(os.pread(fd, n, start + end - n)), start + delta + end - n)
        end -= n

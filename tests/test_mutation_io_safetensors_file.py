"""repvgg_cli.io.safetensors_file, to the letter (issue 15: mutation score of the io layer).

The bytes of the files both writers produce (header length, padding, offsets, dtype codes, the
room reserved for metadata), every refusal in its words, when a streamed tensor is written on
the caller's thread and when on the writer's, flushing, and the helpers' edge cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from repvgg_cli.errors import InputError
from repvgg_cli.io import safetensors_file as sf
from repvgg_cli.io.safetensors_file import INLINE_BYTES, SAFETENSORS_DTYPES, SafetensorsStream, write_safetensors


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _header(path: Path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8:8 + length]), data


def _layout(state) -> dict:
    return {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}


def test_dtype_codes_are_the_formats() -> None:
    """The codes of safetensors' ``Dtype`` (safetensors/src/tensor.rs)."""
    assert SAFETENSORS_DTYPES == {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
        torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.complex64: "C64",
    }
    assert INLINE_BYTES == 65536


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_each_dtype_reads_back_with_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    value = (torch.arange(6, dtype=torch.float32).reshape(2, 3) - 2).to(dtype)
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"v": value}, {"format": "pt"})
    with safe_open(str(path), framework="pt") as handle:
        back = handle.get_tensor("v")
    assert back.dtype == dtype and _bytes(back) == _bytes(value)


def test_write_safetensors_layout_byte_by_byte(tmp_path: Path) -> None:
    a = torch.arange(6, dtype=torch.float64).reshape(2, 3).t()  # not contiguous
    b = torch.arange(3, dtype=torch.int16, requires_grad=False)
    empty = torch.zeros(0, 2)
    state = OrderedDict([("zeta", a), ("empty", empty), ("alpha", b)])
    path = tmp_path / "x.safetensors"
    write_safetensors(path, state, {"z": "2", "a": "1"})
    length, header, data = _header(path)
    text = json.dumps({"__metadata__": {"a": "1", "z": "2"},
                       "zeta": {"dtype": "F64", "shape": [3, 2], "data_offsets": [0, 48]},
                       "empty": {"dtype": "F32", "shape": [0, 2], "data_offsets": [48, 48]},
                       "alpha": {"dtype": "I16", "shape": [3], "data_offsets": [48, 54]}},
                      separators=(",", ":")).encode()
    padded = text + b" " * (-len(text) % 8)
    assert length == len(padded) and data[8:8 + length] == padded
    assert list(header["__metadata__"]) == ["a", "z"]
    assert data[8 + length:] == _bytes(a) + _bytes(b)
    assert len(data) == 8 + length + 54


def test_write_safetensors_keeps_non_ascii_as_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"ü": torch.zeros(1)}, {"é": "ß"})
    raw = path.read_bytes()
    assert "ü".encode() in raw and "ß".encode() in raw and b"\\u" not in raw


def test_write_safetensors_detaches_tensors_that_need_grad(tmp_path: Path) -> None:
    w = torch.ones(2, requires_grad=True) * 3
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"w": w}, {})
    with safe_open(str(path), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("w"), torch.full((2,), 3.0))


def test_write_safetensors_refuses_a_value_that_is_not_a_tensor(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(InputError) as info:
        write_safetensors(path, {"ok": torch.zeros(1), "bad": [1, 2]}, {})
    assert info.value.message == "cannot write bad: a list, not a tensor"
    assert not path.exists()


def test_tensor_table_offsets_and_refusal() -> None:
    entries, size = sf._tensor_table({"a": (torch.float16, (2, 2)), "b": (torch.int64, ()), "c": (torch.bool, (3,))})
    assert entries == {"a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]},
                       "b": {"dtype": "I64", "shape": [], "data_offsets": [8, 16]},
                       "c": {"dtype": "BOOL", "shape": [3], "data_offsets": [16, 19]}}
    assert size == 19
    with pytest.raises(InputError) as info:
        sf._tensor_table({"a": (torch.float32, (1,)), "z": (torch.complex128, (1,))})
    assert info.value.message == "cannot write z as safetensors: dtype torch.complex128 has no safetensors code"


# -- the stream -------------------------------------------------------------------------------------


def _state() -> OrderedDict:
    g = torch.Generator().manual_seed(1)
    return OrderedDict([("w", torch.randn(5, 3, generator=g, dtype=torch.float64)),
                        ("b", torch.randn(5, generator=g)), ("e", torch.zeros(0, 2))])


@pytest.mark.parametrize("reserve", [0, 5, 100, -50])
def test_the_room_reserved_for_the_header(tmp_path: Path, reserve: int) -> None:
    state = _state()
    path = tmp_path / "s.safetensors"
    path.touch()
    with SafetensorsStream(path, _layout(state), reserve) as stream:
        table = len(json.dumps(stream._entries, separators=(",", ":")).encode())
        assert stream._room == sf._round_up(table + max(0, reserve) + 64, 8)
        for key, value in state.items():
            stream.put(key, value)
        stream.finish({})  # a small metadata fits the room: the header is padded to it
        room = stream._room
    length, header, data = _header(path)
    assert length == room and header["__metadata__"] == {}
    assert data[8 + length:] == b"".join(_bytes(v) for v in state.values())


def test_the_layout_is_taken_as_ints_and_the_path_as_a_path(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    path.touch()
    with SafetensorsStream(str(path), {"w": (torch.float32, (torch.tensor(2), 3))}, 0) as stream:
        assert stream.path == path and stream._layout == {"w": (torch.float32, (2, 3))}
        assert all(type(d) is int for d in stream._layout["w"][1])
        stream.put("w", torch.zeros(2, 3))
        stream.finish({})


def test_a_header_that_outgrows_its_room_moves_the_data(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "s.safetensors"
    path.touch()
    metadata = {"m": "x" * 1000, "a": "é"}
    with SafetensorsStream(path, _layout(state), 0) as stream:
        for key, value in state.items():
            stream.put(key, value)
        stream.finish(metadata)
    length, header, data = _header(path)
    text = json.dumps({"__metadata__": dict(sorted(metadata.items())), **stream._entries},
                      separators=(",", ":"), ensure_ascii=False).encode()
    assert length == sf._round_up(len(text), 8) and data[8:8 + len(text)] == text
    assert data[8 + len(text):8 + length] == b" " * (length - len(text))
    assert data[8 + length:] == b"".join(_bytes(v) for v in state.values())
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == metadata


def test_finish_cuts_the_file_to_its_size(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"\xff" * 10000)  # longer than the result
    with SafetensorsStream(path, _layout(state), 16) as stream:
        for key, value in state.items():
            stream.put(key, value)
        stream.finish({"format": "pt"})
        room = stream._room
    assert path.stat().st_size == 8 + room + 5 * 3 * 8 + 5 * 4


def _blocked(stream: SafetensorsStream) -> threading.Event:
    """Hold the writer thread until the returned event is set."""
    go = threading.Event()
    stream._writer.submit(go.wait)
    return go


def test_a_small_tensor_is_written_on_the_callers_thread_a_large_one_on_the_writers(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    state = OrderedDict([("edge", torch.randint(0, 255, (INLINE_BYTES,), generator=g, dtype=torch.uint8)),
                         ("over", torch.randint(0, 255, (INLINE_BYTES + 1,), generator=g, dtype=torch.uint8))])
    path = tmp_path / "s.safetensors"
    path.touch()
    with SafetensorsStream(path, _layout(state), 0) as stream:
        go = _blocked(stream)
        done = stream.put("edge", state["edge"])  # exactly INLINE_BYTES: here, now
        assert done.done() and done.result() is None
        assert stream.digests == {"edge": hashlib.sha256(_bytes(state["edge"])).hexdigest()}
        queued = stream.put("over", state["over"])  # one byte more: the writer thread, held
        assert not queued.done() and "over" not in stream.digests
        with pytest.raises(RuntimeError, match="written twice"):
            stream.put("over", state["over"])  # queued counts as written
        go.set()
        digests = stream.wait()
        assert queued.done() and digests == {k: hashlib.sha256(_bytes(v)).hexdigest() for k, v in state.items()}
        digests["edge"] = "changed"
        assert stream.digests["edge"] != "changed"  # wait() hands out a copy
        stream.finish({})
    with safe_open(str(path), framework="pt") as handle:
        assert all(torch.equal(handle.get_tensor(k), v) for k, v in state.items())


def test_put_refuses_a_wrong_dtype_or_shape_in_words(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    path.touch()
    with SafetensorsStream(path, {"w": (torch.float32, (2, 3))}, 0) as stream:
        with pytest.raises(RuntimeError) as info:
            stream.put("w", torch.zeros(2, 3, dtype=torch.float64))
        assert str(info.value) == "w is torch.float64 (2, 3); the layout says torch.float32 (2, 3)"
        with pytest.raises(RuntimeError) as info:
            stream.put("w", torch.zeros(3, 2))
        assert str(info.value) == "w is torch.float32 (3, 2); the layout says torch.float32 (2, 3)"
        with pytest.raises(RuntimeError) as info:
            stream.put("x", torch.zeros(1))
        assert str(info.value) == "x is not in the layout, or was written twice"
        stream.put("w", torch.zeros(2, 3))


def test_put_rows_refusals_in_words(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    path.touch()
    layout = {"w": (torch.float32, (4, 2)), "s": (torch.float32, ())}
    with SafetensorsStream(path, layout, 0) as stream:
        with pytest.raises(RuntimeError) as info:
            stream.put_rows("w", torch.zeros(2, 3), 0)
        assert str(info.value) == "rows 0:2 of w are torch.float32 (2, 3); the layout says torch.float32 (4, 2)"
        with pytest.raises(RuntimeError) as info:
            stream.put_rows("w", torch.zeros(2, 2, dtype=torch.float64), 0)
        assert "the layout says" in str(info.value)
        with pytest.raises(RuntimeError) as info:
            stream.put_rows("w", torch.zeros(5, 2), 0)  # past the end
        assert str(info.value) == "rows 0:5 of w are torch.float32 (5, 2); the layout says torch.float32 (4, 2)"
        with pytest.raises(RuntimeError) as info:
            stream.put_rows("s", torch.zeros(()), 0)  # a scalar has no rows
        assert str(info.value) == "rows 0:-1 of s are torch.float32 (); the layout says torch.float32 ()"
        with pytest.raises(RuntimeError) as info:
            stream.put_rows("w", torch.zeros(1, 2), 1)
        assert str(info.value) == "rows of w must come in order: row 1, expected 0"
        stream.put_rows("w", torch.zeros(4, 2), 0)  # exactly to the end: accepted
        stream.put("s", torch.zeros(()))
        stream.finish({})


def test_put_rows_writes_each_slice_at_its_offset_and_hashes_the_whole(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g)
    path = tmp_path / "s.safetensors"
    path.touch()
    with SafetensorsStream(path, _layout({"b": b, "w": w}), 0) as stream:
        stream.put_rows("w", w[:1], 0)
        assert stream._partial["w"][1] == 1 and "w" not in stream._queued
        stream.put_rows("w", w[1:4], 1)
        assert stream._partial["w"][1] == 4
        with pytest.raises(RuntimeError, match="written twice"):
            stream.put("w", w)  # a whole put while rows are under way
        stream.put_rows("w", w[4:], 4)
        assert "w" not in stream._partial and "w" in stream._queued
        stream.put("b", b)
        digests = stream.wait()
        assert digests == {"w": hashlib.sha256(_bytes(w)).hexdigest(), "b": hashlib.sha256(_bytes(b)).hexdigest()}
        stream.finish({})
    with safe_open(str(path), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("w"), w) and torch.equal(handle.get_tensor("b"), b)


def test_finish_names_how_many_tensors_are_missing(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    path.touch()
    layout = {"a": (torch.float32, (1,)), "b": (torch.float32, (1,)), "c": (torch.float32, (1,))}
    with SafetensorsStream(path, layout, 0) as stream:
        stream.put("b", torch.zeros(1))
        with pytest.raises(RuntimeError) as info:
            stream.finish({})
        assert str(info.value) == "2 tensor(s) of the layout were not written, e.g. a"


def _failing_pwrite(monkeypatch, after: int) -> list:
    calls = []
    real = os.pwrite

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > after:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(sf.os, "pwrite", pwrite)
    return calls


def test_a_failed_small_write_is_handed_over_and_stops_the_rest(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s.safetensors"
    path.touch()
    layout = {k: (torch.float32, (2,)) for k in "abc"}
    calls = _failing_pwrite(monkeypatch, 0)
    with SafetensorsStream(path, layout, 0) as stream:
        failed = stream.put("a", torch.zeros(2))
        assert failed.done() and isinstance(failed.exception(), OSError)
        again = stream.put("b", torch.zeros(2))  # the first failure, handed over again, not tried
        assert again.exception() is failed.exception() and len(calls) == 1
        with pytest.raises(OSError, match="No space left"):
            stream.wait()
        assert "a" not in stream.digests


def test_a_failed_large_write_stops_the_rest(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s.safetensors"
    path.touch()
    big = INLINE_BYTES // 4 + 1
    layout = {k: (torch.float32, (big,)) for k in "abc"}
    calls = _failing_pwrite(monkeypatch, 0)
    with SafetensorsStream(path, layout, 0) as stream:
        futures = [stream.put(k, torch.zeros(big)) for k in "abc"]
        for future in futures:
            assert isinstance(future.exception(timeout=60), OSError)
        assert len(calls) == 1 and stream.digests == {}
        with pytest.raises(OSError, match="No space left"):
            stream.wait()


@pytest.mark.parametrize("flush", [False, True])
def test_flush_syncs_data_while_writing_and_waits_for_it(tmp_path: Path, monkeypatch, flush: bool) -> None:
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(sf.os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    path = tmp_path / "s.safetensors"
    path.touch()
    big = INLINE_BYTES // 4 + 1
    with SafetensorsStream(path, {"a": (torch.float32, (big,)), "b": (torch.float32, (big,))}, 0,
                           flush=flush) as stream:
        stream.put("a", torch.ones(big))
        stream.wait()
        stream.put("b", torch.ones(big))
        stream.finish({"m": "x" * 500})  # outgrows its room: waits for the flush, then moves the data
        assert stream._flushing is (None if not flush else stream._flushing)
        if flush:
            assert stream._flushing.done()
    assert (len(synced) >= 1) == flush
    with safe_open(str(path), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("b"), torch.ones(big))


def test_close_stops_the_threads_and_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    path.touch()
    stream = SafetensorsStream(path, {"a": (torch.float32, (1,))}, 0)
    fd = stream._fd
    names = (stream._writer._thread_name_prefix, stream._hasher._thread_name_prefix,
             stream._flusher._thread_name_prefix)
    assert names == ("repvgg-write", "repvgg-hash", "repvgg-flush")
    assert stream.__enter__() is stream
    stream.__exit__(None, None, None)
    with pytest.raises(OSError):
        os.fstat(fd)
    for pool in (stream._writer, stream._hasher, stream._flusher):
        with pytest.raises(RuntimeError):
            pool.submit(print)


# -- helpers -------------------------------------------------------------------------------------------


def test_round_up() -> None:
    assert [sf._round_up(v, 8) for v in (0, 1, 7, 8, 9, 16)] == [0, 8, 8, 8, 16, 16]


def test_pwrite_all_writes_everything_when_the_system_writes_a_little_at_a_time(tmp_path: Path, monkeypatch) -> None:
    real = os.pwrite
    monkeypatch.setattr(sf.os, "pwrite", lambda fd, data, offset: real(fd, data[:3], offset))
    path = tmp_path / "f"
    path.write_bytes(b"." * 4)
    fd = os.open(path, os.O_RDWR)
    try:
        sf._pwrite_all(fd, memoryview(torch.arange(5, dtype=torch.int16).numpy()), 2)
    finally:
        os.close(fd)
    assert path.read_bytes() == b".." + torch.arange(5, dtype=torch.int16).numpy().tobytes()


@pytest.mark.parametrize("chunk", [1, 3, 4, 16 << 20])
def test_shift_moves_overlapping_bytes_up(tmp_path: Path, chunk: int) -> None:
    data = bytes(range(10))
    path = tmp_path / "f"
    path.write_bytes(b"HH" + data)
    fd = os.open(path, os.O_RDWR)
    try:
        sf._shift(fd, 2, len(data), 3, chunk=chunk)
    finally:
        os.close(fd)
    assert path.read_bytes()[5:] == data


def test_shift_default_chunk_is_16_mib(tmp_path: Path, monkeypatch) -> None:
    reads = []
    real = os.pread
    monkeypatch.setattr(sf.os, "pread", lambda fd, n, offset: (reads.append(n), real(fd, n, offset))[1])
    path = tmp_path / "f"
    size = (16 << 20) + 5
    with open(path, "wb") as handle:
        handle.truncate(size + 8)
    fd = os.open(path, os.O_RDWR)
    try:
        sf._shift(fd, 0, size, 8)
    finally:
        os.close(fd)
    assert reads == [16 << 20, 5]


def test_the_header_is_padded_to_8_bytes_for_every_length(tmp_path: Path) -> None:
    state = {"w": torch.zeros(2)}
    for extra in range(16):
        path = tmp_path / f"x{extra}.safetensors"
        write_safetensors(path, state, {"n": "x" * extra})
        length, header, data = _header(path)
        text = json.dumps({"__metadata__": {"n": "x" * extra}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                          separators=(",", ":")).encode()
        assert length == len(text) + (-len(text) % 8) and length % 8 == 0, extra
        assert data[8:8 + length] == text + b" " * (length - len(text))


def test_a_small_tensor_put_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    path.touch()
    with SafetensorsStream(path, {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))}, 0) as stream:
        stream.put("a", torch.zeros(2))
        with pytest.raises(RuntimeError) as info:
            stream.put("a", torch.ones(2))
        assert str(info.value) == "a is not in the layout, or was written twice"
        with pytest.raises(RuntimeError, match="written twice"):
            stream.put_rows("a", torch.ones(2), 0)
        stream.put("b", torch.zeros(2))
        stream.finish({})


def test_no_flushing_unless_asked(tmp_path: Path, monkeypatch) -> None:
    synced = []
    monkeypatch.setattr(sf.os, "fdatasync", lambda fd: synced.append(fd))
    path = tmp_path / "s.safetensors"
    path.touch()
    big = INLINE_BYTES // 4 + 1
    with SafetensorsStream(path, {"a": (torch.float32, (big,))}, 0) as stream:
        stream.put("a", torch.ones(big))
        stream.finish({})
    assert synced == []


@pytest.mark.parametrize("name_length", range(1, 9))
def test_the_room_for_every_table_length(tmp_path: Path, name_length: int) -> None:
    """The room is the table, the reserve (never below 0) and 64 bytes, rounded up to 8: checked for
    eight table lengths, so that one of them lands on a multiple of 8."""
    layout = {"k" * name_length: (torch.float32, (1,))}
    path = tmp_path / "s.safetensors"
    path.touch()
    for reserve in (0, -3, 8):
        with SafetensorsStream(path, layout, reserve) as stream:
            table = len(json.dumps(stream._entries, separators=(",", ":")).encode())
            expected = table + max(reserve, 0) + 64
            assert stream._room == expected + (-expected % 8)


def test_each_thread_pool_runs_one_task_at_a_time(tmp_path: Path) -> None:
    """Rows of one tensor are hashed in order, and written and flushed one at a time."""
    path = tmp_path / "s.safetensors"
    path.touch()
    with SafetensorsStream(path, {"a": (torch.float32, (1,))}, 0) as stream:
        assert stream._writer._max_workers == 1 and stream._hasher._max_workers == 1
        assert stream._flusher._max_workers == 1


@pytest.mark.parametrize("pool", ["_writer", "_hasher", "_flusher"])
def test_close_waits_for_every_thread(tmp_path: Path, pool: str) -> None:
    path = tmp_path / "s.safetensors"
    path.touch()
    stream = SafetensorsStream(path, {"a": (torch.float32, (1,))}, 0)
    go = threading.Event()
    getattr(stream, pool).submit(go.wait)
    closer = threading.Thread(target=stream.close)
    closer.start()
    closer.join(0.5)
    try:
        assert closer.is_alive()  # still waiting for the held task
    finally:
        go.set()
        closer.join()
    with pytest.raises(OSError):
        os.fstat(stream._fd)


def test_a_small_tensor_waits_behind_a_queued_write_and_is_written_here_once_the_queue_is_idle(
        tmp_path: Path) -> None:
    """Writes keep the order they were put in: while a queued write is pending, a small tensor is
    queued behind it (not written beside it on the caller's thread); once the queue is idle, the
    next small tensor is written on the caller's thread again."""
    g = torch.Generator().manual_seed(5)
    state = OrderedDict([("over", torch.randint(0, 255, (INLINE_BYTES + 1,), generator=g, dtype=torch.uint8)),
                         ("small", torch.randint(0, 255, (16,), generator=g, dtype=torch.uint8)),
                         ("later", torch.randint(0, 255, (16,), generator=g, dtype=torch.uint8))])
    path = tmp_path / "s.safetensors"
    path.touch()
    with SafetensorsStream(path, _layout(state), 0) as stream:
        go = _blocked(stream)
        try:
            queued = stream.put("over", state["over"])
            behind = stream.put("small", state["small"])
            pending = (queued.done(), behind.done(), dict(stream.digests))
        finally:
            go.set()  # whatever happened, the writer thread is let go (or closing the stream would wait forever)
        assert pending == (False, False, {})
        stream.wait()
        assert behind.done() and set(stream.digests) == {"over", "small"}
        now = stream.put("later", state["later"])
        assert now.done() and "later" in stream.digests
        stream.finish({})
    with safe_open(str(path), framework="pt") as handle:
        assert all(torch.equal(handle.get_tensor(k), v) for k, v in state.items())

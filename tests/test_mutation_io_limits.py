"""repvgg_cli.io.limits, to the letter (issue 15: mutation score of the io layer).

Exact numbers and exact words: which keys share a storage, what an output costs with and
without kept aliasing, the refusal's message and hint, the safetensors header size for every
kind of key, and each refusal of :func:`check_safetensors_limits`.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from repvgg_cli.errors import InputError
from repvgg_cli.io import limits
from repvgg_cli.io.limits import (
    OUTPUT_BUDGET_RATIO,
    SAFETENSORS_MAX_HEADER,
    SAFETENSORS_RESERVED_KEY,
    check_output_size,
    check_safetensors_limits,
    describe,
    layout_of,
    output_size,
    safetensors_header_size,
    shared_storages,
    written_bytes,
)
from repvgg_cli.io.metadata import METADATA_KEY
from repvgg_cli.io.safetensors_file import write_safetensors


def test_constants() -> None:
    assert OUTPUT_BUDGET_RATIO == 4 and SAFETENSORS_MAX_HEADER == 100_000_000
    assert SAFETENSORS_RESERVED_KEY == "__metadata__"


def test_written_bytes_is_elements_times_element_size() -> None:
    assert written_bytes(torch.zeros(3, 5, dtype=torch.float64)) == 120
    assert written_bytes(torch.zeros(1).expand(7, 9)) == 7 * 9 * 4
    assert written_bytes(torch.zeros(0, 3)) == 0


def test_storage_of_dense_empty_and_meta_tensors() -> None:
    t = torch.zeros(6, dtype=torch.float64)
    assert limits._storage(t) == (t.untyped_storage().data_ptr(), 48)
    assert limits._storage(t[2:]) == (t.untyped_storage().data_ptr(), 48)  # the whole storage
    assert limits._storage(torch.zeros(0)) is None
    assert limits._storage(torch.zeros(3, device="meta")) is None


def test_storage_of_a_tensor_without_a_storage_is_none() -> None:
    sparse = torch.zeros(3, 3).to_sparse()
    assert limits._storage(sparse) is None


def test_shared_storages_groups_by_storage_not_by_size() -> None:
    a = torch.zeros(4)
    b = torch.zeros(4)  # same size, another storage
    c = torch.zeros(4)
    state = OrderedDict([("a", a), ("b", b), ("a2", a[1:]), ("c", c), ("empty", torch.zeros(0)),
                         ("c2", c.view(2, 2)), ("c3", c[:1])])
    assert shared_storages(state) == (("a", "a2"), ("c", "c2", "c3"))
    assert shared_storages({"a": a, "b": b}) == ()


def test_output_size_without_and_with_kept_aliasing() -> None:
    base = torch.zeros(10, dtype=torch.float64)  # 80 bytes of storage
    state = OrderedDict([("small", torch.zeros(2)), ("view", base[:3]), ("whole", base),
                         ("expanded", torch.zeros(1, dtype=torch.float64).expand(50)),
                         ("meta", torch.zeros(5, device="meta"))])
    size = output_size(state, source_bytes=100)
    assert size.total_bytes == 8 + 24 + 80 + 400 + 20
    assert size.budget == 400 and size.largest_key == "expanded" and size.largest_bytes == 400
    assert size.shared == (("view", "whole"),) and size.expanded == ("expanded",)
    kept = output_size(state, source_bytes=100, keep_aliasing=True)
    assert kept.total_bytes == 8 + 80 + 8 + 20  # each storage once, whole; meta counts its elements
    assert kept.shared == size.shared and kept.expanded == size.expanded
    assert output_size(state, 100, max_output_bytes=7).budget == 7
    assert output_size(state, 100, max_output_bytes=0).budget == 0


def test_the_first_of_equally_large_tensors_is_the_largest() -> None:
    state = OrderedDict([("a", torch.zeros(2)), ("b", torch.zeros(4)), ("c", torch.zeros(4)), ("d", torch.zeros(1))])
    size = output_size(state, 0)
    assert size.largest_key == "b" and size.largest_bytes == 16


def test_an_empty_state_and_empty_tensors() -> None:
    empty = output_size({}, 10)
    assert (empty.total_bytes, empty.largest_key, empty.largest_bytes, empty.shared, empty.expanded) == (0, None, 0, (), ())
    zero = output_size({"z": torch.zeros(0)}, 10)
    assert zero.largest_key == "z" and zero.largest_bytes == 0 and zero.total_bytes == 0


def test_a_view_exactly_its_storage_is_not_expanded() -> None:
    t = torch.zeros(4)
    assert output_size({"t": t}, 0).expanded == ()
    assert output_size({"t": t.expand(2, 4)}, 0).expanded == ("t",)


def test_exactly_the_budget_passes_one_byte_more_is_refused() -> None:
    state = {"w": torch.zeros(3, 2, dtype=torch.float64)}  # 48 bytes
    assert check_output_size(state, source_bytes=12).total_bytes == 48  # 4 x 12
    with pytest.raises(InputError) as info:
        check_output_size(state, source_bytes=11)
    assert info.value.message == ("the output would hold 48 bytes of tensors, more than the 44 allowed "
                                  "(4x the source's 11 bytes); the largest tensor is w (3x2 float64, 48 bytes)")
    assert info.value.hint == ("if that is intended, pass --max-output-bytes with a larger limit, "
                               "or write a .pt output, which keeps shared storage shared")


def test_the_refusal_names_an_expanded_view_shared_storages_and_the_explicit_limit() -> None:
    base = torch.zeros(1000, dtype=torch.int16)
    state = OrderedDict([("a", base), ("b", base[:10]), ("scalar", torch.tensor(1.5)),
                         ("big", torch.zeros(2, dtype=torch.int64).expand(3000, 2))])
    kept = check_output_size(state, source_bytes=10**9, max_output_bytes=5_000, keep_aliasing=True)
    assert kept.total_bytes == 2000 + 4 + 16  # each storage once: under the limit
    with pytest.raises(InputError) as info:
        check_output_size(state, source_bytes=10**9, max_output_bytes=5_000)
    total = 2000 + 20 + 4 + 48_000
    assert info.value.message == (
        f"the output would hold {total:,} bytes of tensors, more than the 5,000 allowed (--max-output-bytes); "
        "the largest tensor is big (3000x2 int64, 48,000 bytes, a view of 16 bytes of storage); "
        "2 tensors share 1 storages")
    assert info.value.hint.endswith(", or write a .pt output, which keeps shared storage shared")


def test_the_hint_for_a_pt_output_does_not_suggest_a_pt_output() -> None:
    state = {"s": torch.tensor(2.0)}
    with pytest.raises(InputError) as info:
        check_output_size(state, source_bytes=0, keep_aliasing=True)
    assert info.value.message == ("the output would hold 4 bytes of tensors, more than the 0 allowed "
                                  "(4x the source's 0 bytes); the largest tensor is s (scalar float32, 4 bytes)")
    assert info.value.hint == "if that is intended, pass --max-output-bytes with a larger limit"


def test_an_over_budget_empty_state_names_no_tensor() -> None:
    with pytest.raises(InputError) as info:
        check_output_size({}, source_bytes=0, max_output_bytes=-1)
    assert info.value.message == ("the output would hold 0 bytes of tensors, more than the -1 allowed "
                                  "(--max-output-bytes)")


def test_check_output_size_returns_the_size() -> None:
    state = {"w": torch.zeros(2)}
    size = check_output_size(state, 100, max_output_bytes=8, keep_aliasing=True)
    assert size == output_size(state, 100, max_output_bytes=8, keep_aliasing=True)


def test_layout_of() -> None:
    state = OrderedDict([("b", torch.zeros(2, 3, dtype=torch.float16)), ("a", torch.tensor(1))])
    assert layout_of(state) == {"b": (torch.float16, (2, 3)), "a": (torch.int64, ())}
    assert list(layout_of(state)) == ["b", "a"]


@pytest.mark.parametrize("text", ["plain", "", "ünï", 'q"uote', "back\\slash", "tab\there", "ctl\x01"])
def test_json_string_bytes(text: str) -> None:
    assert limits._json_string_bytes(text) == len(json.dumps(text, ensure_ascii=False).encode("utf-8"))


@pytest.mark.parametrize("key", ["plain.weight", "", "ünï", 'q"uote', "back\\slash", "ctl\x01", "sp ace"])
def test_digest_entry_bytes(key: str) -> None:
    """What one more tensor's sha256 adds to the header: measured as the difference it makes."""
    def header(entries: dict[str, str]) -> int:
        inner = json.dumps(entries, separators=(",", ":"))
        return len(json.dumps({METADATA_KEY: inner}, ensure_ascii=False).encode("utf-8"))

    assert limits._digest_entry_bytes(key) == header({"x": "0" * 64, key: "0" * 64}) - header({"x": "0" * 64})


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"z": "1", "a": "ü", "format": "pt"}])
def test_the_header_size_matches_the_writer_for_each_metadata(tmp_path: Path, metadata) -> None:
    state = OrderedDict([("a", torch.zeros(2, 3)), ("bb", torch.zeros(0, dtype=torch.int8)),
                         ("c", torch.zeros((), dtype=torch.float64)), ("d", torch.zeros(12345, dtype=torch.uint8))])
    path = tmp_path / "x.safetensors"
    write_safetensors(path, state, metadata or {"format": "pt"})
    assert safetensors_header_size(layout_of(state), metadata, tensor_digests=False) == _header_length(path)
    assert safetensors_header_size(layout_of(state), metadata, tensor_digests=False) % 8 == 0


def test_the_header_size_of_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {}, {"format": "pt"})
    assert safetensors_header_size({}) == _header_length(path) == safetensors_header_size({}, tensor_digests=False)


def test_the_header_size_with_digests_adds_each_keys_entry() -> None:
    layout = {"a.w": (torch.float32, (2,)), 'q"': (torch.float32, (2,))}
    header = {"__metadata__": {"format": "pt"},
              "a.w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              'q"': {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    raw = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    for extra in (0, 1, 2, 3, 4, 5, 6, 7):  # every padding remainder
        meta = {"format": "pt", "n": "x" * extra}
        header["__metadata__"] = meta
        raw = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        plain = safetensors_header_size(layout, meta, tensor_digests=False)
        assert plain == raw + (-raw % 8)
        full = raw + limits._digest_entry_bytes("a.w") + limits._digest_entry_bytes('q"')
        assert safetensors_header_size(layout, meta) == full + (-full % 8)
    assert safetensors_header_size(layout) == safetensors_header_size(layout, {"format": "pt"})


def test_the_header_size_for_an_unknown_dtype_counts_a_four_letter_code() -> None:
    known = safetensors_header_size({"k": (torch.float64, (1,))}, {"x": "y" * 3}, tensor_digests=False)
    unknown = safetensors_header_size({"k": (torch.complex128, (1,))}, {"x": "y" * 4}, tensor_digests=False)
    # F64 -> XXXX is one more byte; the metadata's extra byte keeps the unpadded sizes 1 apart
    assert unknown - known in (0, 8)
    size = (2 + len(json.dumps("__metadata__")) + 1 + len('{"x":"yyyy"}')
            + len('{"dtype":"","shape":[],"data_offsets":[,]}') + 2 + 3 + 4 + 1 + 1 + 2)
    assert unknown == size + (-size % 8)


def test_check_safetensors_limits_returns_the_header_size() -> None:
    layout = {"a": (torch.float32, (3,))}
    meta = {"format": "pt", "note": "x" * 100}
    assert check_safetensors_limits(layout, meta, tensor_digests=False) == safetensors_header_size(layout, meta, False)
    assert check_safetensors_limits(layout, meta) == safetensors_header_size(layout, meta, True)
    assert check_safetensors_limits(layout, meta) != check_safetensors_limits(layout, meta, tensor_digests=False)
    assert check_safetensors_limits(layout, meta) != check_safetensors_limits(layout)


def test_a_header_of_exactly_the_limit_is_allowed(monkeypatch) -> None:
    layout = {"a": (torch.float32, (3,))}
    size = safetensors_header_size(layout)
    monkeypatch.setattr(limits, "SAFETENSORS_MAX_HEADER", size)
    assert check_safetensors_limits(layout) == size
    monkeypatch.setattr(limits, "SAFETENSORS_MAX_HEADER", size - 1)
    with pytest.raises(InputError) as info:
        check_safetensors_limits(layout)
    assert info.value.message == (f"a safetensors output of these 1 tensors needs a {size:,}-byte header, over the "
                                  f"format's limit of {size - 1:,} bytes (safetensors' MAX_HEADER_SIZE): no reader "
                                  "would open it")
    assert info.value.hint == "write a .pt output instead, or save fewer, larger tensors"


def test_the_reserved_name_and_an_unknown_dtype_are_refused_in_words() -> None:
    with pytest.raises(InputError) as info:
        check_safetensors_limits({"a": (torch.float32, ()), "__metadata__": (torch.float32, (2,))})
    assert info.value.message == ("a tensor named __metadata__ cannot be written as safetensors: "
                                  "the format reserves that name for its metadata")
    assert info.value.hint == "write a .pt output instead"
    with pytest.raises(InputError) as info:
        check_safetensors_limits({"a": (torch.float32, ()), "c": (torch.complex128, (2,))})
    assert info.value.message == "cannot write c as safetensors: dtype torch.complex128 has no safetensors code"
    assert info.value.hint is None


def test_describe() -> None:
    base = torch.zeros(2)
    size = output_size(OrderedDict([("a", base), ("b", base), ("e", torch.zeros(1).expand(3))]), 10)
    assert describe(size) == {"total_bytes": 8 + 8 + 12, "budget": 40, "largest_key": "e", "largest_bytes": 12,
                              "shared": [["a", "b"]], "expanded": ["e"]}
    assert json.dumps(describe(size))  # JSON-ready: lists, not tuples
    assert isinstance(describe(size)["shared"][0], list) and isinstance(describe(size)["expanded"], list)


def test_the_offsets_start_at_zero(tmp_path: Path) -> None:
    """An end offset of 9 bytes is one digit, 10 is two: the header counts the real digits."""
    state = OrderedDict([("k", torch.zeros(9, dtype=torch.uint8)), ("j", torch.zeros(90, dtype=torch.uint8))])
    for extra in range(8):  # every padding remainder, so a one-byte difference shows
        meta = {"format": "pt", "n": "x" * extra}
        path = tmp_path / f"x{extra}.safetensors"
        write_safetensors(path, state, meta)
        assert safetensors_header_size(layout_of(state), meta, tensor_digests=False) == _header_length(path)

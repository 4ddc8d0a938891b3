"""What an output would cost, known before any work (issue 10, "Bounded on hostile input").

``zeros(1).expand(40000, 40000)`` saves as a tiny file and was written as 6.4 GB of safetensors
(85 s); 200 views of one storage became 200 copies; 1.4 M tiny tensors made a safetensors header
over the format's 100,000,000-byte limit, which no reader opens. ``repvgg_cli.io.limits`` measures
an output from dtypes and shapes alone and refuses it before allocating; these functions did not
exist before the change (the tests fail there on import).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from repvgg_cli.errors import InputError
from repvgg_cli.io import limits
from repvgg_cli.io.limits import (
    SAFETENSORS_MAX_HEADER,
    check_output_size,
    check_safetensors_limits,
    layout_of,
    output_size,
    safetensors_header_size,
    shared_storages,
)
from repvgg_cli.io.metadata import METADATA_KEY, metadata_json, tensor_digests
from repvgg_cli.io.read import load_checkpoint
from repvgg_cli.io.safetensors_file import write_safetensors


@pytest.fixture(scope="module")
def expanded(tmp_path_factory) -> Path:
    """The issue's file: one float expanded to 40000x40000, next to an ordinary weight."""
    path = tmp_path_factory.mktemp("expanded") / "expanded.pt"
    torch.save({"conv.weight": torch.randn(8, 3, 3, 3, dtype=torch.float64),
                "big": torch.zeros(1).expand(40000, 40000)}, path)
    return path


def test_a_stride_0_tensor_is_refused_before_allocating(expanded: Path) -> None:
    loaded = load_checkpoint(expanded)
    assert loaded.file_size < 10_000
    with pytest.raises(InputError) as info:
        check_output_size(loaded.state_dict, loaded.file_size)
    message = info.value.message
    assert info.value.exit_code == 2
    assert message.startswith(f"the output would hold {40000 * 40000 * 4 + 8 * 27 * 8:,} bytes of tensors, "
                              f"more than the {4 * loaded.file_size:,} allowed (4x the source's ")
    assert "the largest tensor is big (40000x40000 float32, 6,400,000,000 bytes, a view of 4 bytes of storage)" in message
    assert "--max-output-bytes" in info.value.hint


def test_an_explicit_budget_or_kept_aliasing_lets_it_through(expanded: Path) -> None:
    loaded = load_checkpoint(expanded)
    size = check_output_size(loaded.state_dict, loaded.file_size, max_output_bytes=7_000_000_000)
    assert size.total_bytes == 40000 * 40000 * 4 + 8 * 27 * 8 and size.expanded == ("big",)
    kept = check_output_size(loaded.state_dict, loaded.file_size, keep_aliasing=True)  # .pt writes the storage
    assert kept.total_bytes == 4 + 8 * 27 * 8
    with pytest.raises(InputError, match=r"more than the 1,000 allowed \(--max-output-bytes\)"):
        check_output_size(loaded.state_dict, loaded.file_size, max_output_bytes=1_000)


def test_views_of_one_storage_are_reported_and_counted_per_view(tmp_path: Path) -> None:
    base = torch.randn(100, 100, dtype=torch.float64)
    state = OrderedDict((f"view{i}", base) for i in range(200))
    state["other"] = torch.randn(3)
    state["row"] = base[7]
    path = tmp_path / "views.pt"
    torch.save(state, path)
    loaded = load_checkpoint(path)
    groups = shared_storages(loaded.state_dict)
    assert groups == (tuple(f"view{i}" for i in range(200)) + ("row",),)
    size = output_size(loaded.state_dict, loaded.file_size)
    assert size.total_bytes == 200 * 80_000 + 12 + 800
    assert size.shared == groups and size.expanded == ()
    assert output_size(loaded.state_dict, loaded.file_size, keep_aliasing=True).total_bytes == 80_000 + 12
    with pytest.raises(InputError, match="201 tensors share 1 storages"):
        check_output_size(loaded.state_dict, loaded.file_size)


def test_an_ordinary_checkpoint_is_well_within_budget(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({f"w{i}": torch.randn(16, 16) for i in range(10)}, path)
    loaded = load_checkpoint(path)
    size = check_output_size(loaded.state_dict, loaded.data_bytes)
    assert size.total_bytes == 10 * 16 * 16 * 4 and size.shared == () and size.largest_key == "w0"


# -- the safetensors header --------------------------------------------------------------------


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_the_header_size_is_what_the_writer_writes(tmp_path: Path) -> None:
    state = OrderedDict([("a.weight", torch.zeros(3, 4)), ('we"ird\\key', torch.zeros(2, dtype=torch.float16)),
                         ("ünï.b", torch.zeros(())), ("empty", torch.zeros(0, 5, dtype=torch.int64)),
                         ("ctl\x01", torch.ones(7, dtype=torch.bool))])
    state.update((f"layer{i}.weight", torch.zeros(i + 1, 3, dtype=torch.bfloat16)) for i in range(50))
    metadata = {"format": "pt", "note": 'é "quoted"'}
    plain = tmp_path / "plain.safetensors"
    write_safetensors(plain, state, metadata)
    assert safetensors_header_size(layout_of(state), metadata, tensor_digests=False) == _header_length(plain)
    # with repvgg's per-tensor sha256 in the metadata, estimated from the keys alone
    recorded = {"format": "pt", METADATA_KEY: metadata_json({"tensors": tensor_digests(state)})}
    full = tmp_path / "full.safetensors"
    write_safetensors(full, state, recorded)
    empty = {"format": "pt", METADATA_KEY: metadata_json({"tensors": {}})}
    assert safetensors_header_size(layout_of(state), empty) == _header_length(full)
    with safe_open(str(full), "pt") as handle:
        assert list(handle.keys()) == sorted(state)


def test_a_header_over_the_format_limit_is_refused(tmp_path: Path) -> None:
    layout = {f"{'k' * 60_000}.{i}": (torch.float32, (1,)) for i in range(1_700)}
    size = safetensors_header_size(layout)
    assert size > SAFETENSORS_MAX_HEADER
    with pytest.raises(InputError) as info:
        check_safetensors_limits(layout)
    assert info.value.message == (f"a safetensors output of these 1,700 tensors needs a {size:,}-byte header, over the "
                                  "format's limit of 100,000,000 bytes (safetensors' MAX_HEADER_SIZE): no reader "
                                  "would open it")
    assert check_safetensors_limits(dict(list(layout.items())[:100])) < SAFETENSORS_MAX_HEADER


def test_the_limit_is_the_one_safetensors_enforces(tmp_path: Path) -> None:
    """The reader's own limit: a header of exactly 100,000,000 bytes opens, 8 more do not."""
    for length, opens in ((SAFETENSORS_MAX_HEADER, True), (SAFETENSORS_MAX_HEADER + 8, False)):
        path = tmp_path / f"h{length}.safetensors"
        skeleton = b'{"__metadata__":{"x":""}}'
        header = b'{"__metadata__":{"x":"' + b" " * (length - len(skeleton)) + b'"}}'
        assert len(header) == length
        path.write_bytes(struct.pack("<Q", length) + header)
        try:
            with safe_open(str(path), "pt"):
                opened = True
        except Exception:  # noqa: BLE001 - safetensors' own error type
            opened = False
        assert opened == opens, length


def test_reserved_names_and_unknown_dtypes_are_refused() -> None:
    with pytest.raises(InputError, match="a tensor named __metadata__ cannot be written as safetensors"):
        check_safetensors_limits({"__metadata__": (torch.float32, (2,))})
    with pytest.raises(InputError, match="dtype torch.complex128 has no safetensors code"):
        check_safetensors_limits({"c": (torch.complex128, (2,))})
    assert limits.describe(output_size({"a": torch.zeros(2)}, 100))["total_bytes"] == 8

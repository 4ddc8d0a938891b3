"""repvgg_cli.io.metadata, to the letter (issue 15: mutation score of the io layer).

Every field check of :func:`metadata_problem` at its boundary and in its exact words (the CLI
prints them as the one-line reason an edited deploy file is refused), the geometry limits, the
probe checks, and the helpers that read, hash and write the metadata.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from repvgg_cli.errors import InputError
from repvgg_cli.io import metadata as md
from repvgg_cli.io.metadata import (
    MAX_KERNEL_EXTENT,
    MAX_PROBE_BYTES,
    METADATA_KEY,
    PADDING_MODES,
    TENSOR_DIGESTS,
    check_metadata,
    metadata_from_module,
    metadata_from_state,
    metadata_json,
    metadata_problem,
    parse_metadata,
    tensor_bytes,
    tensor_digests,
    tensor_sha256,
)


def test_constants() -> None:
    assert TENSOR_DIGESTS == "tensors" and METADATA_KEY == "repvgg_cli"
    assert PADDING_MODES == ("zeros", "reflect", "replicate", "circular")
    assert MAX_KERNEL_EXTENT == 4096 and MAX_PROBE_BYTES == 1 << 30


# -- bytes and digests ------------------------------------------------------------------------------


def test_tensor_bytes_of_any_dtype_and_layout() -> None:
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3).t()  # not contiguous
    assert bytes(tensor_bytes(t)) == t.contiguous().numpy().tobytes()
    b = torch.tensor([True, False])
    assert bytes(tensor_bytes(b)) == b"\x01\x00"
    g = torch.ones(2, requires_grad=True) * 2
    assert bytes(tensor_bytes(g)) == torch.full((2,), 2.0).numpy().tobytes()
    assert bytes(tensor_bytes(torch.tensor(1.5, dtype=torch.bfloat16))) == torch.tensor(
        1.5, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()


def test_tensor_sha256_and_digests_in_order() -> None:
    a, b = torch.arange(3, dtype=torch.int32), torch.zeros(2)
    assert tensor_sha256(a) == hashlib.sha256(a.numpy().tobytes()).hexdigest()
    digests = tensor_digests(OrderedDict([("z", a), ("a", b)]))
    assert list(digests) == ["z", "a"] and digests["a"] == hashlib.sha256(b.numpy().tobytes()).hexdigest()


# -- reading the metadata --------------------------------------------------------------------------


def _with_metadata(meta) -> OrderedDict:
    state = OrderedDict()
    state._metadata = meta
    return state


def test_metadata_from_state() -> None:
    assert metadata_from_state(_with_metadata({METADATA_KEY: {"json": '{"a": 1}'}})) == {"a": 1}
    assert metadata_from_state(_with_metadata(OrderedDict([(METADATA_KEY, {"json": '{"a": 1}'})]))) == {"a": 1}
    assert metadata_from_state(_with_metadata({METADATA_KEY: {"json": "[1]"}})) is None
    assert metadata_from_state(_with_metadata({METADATA_KEY: {"json": 5}})) is None
    assert metadata_from_state(_with_metadata({METADATA_KEY: '{"a": 1}'})) is None
    assert metadata_from_state(_with_metadata({"other": {"json": '{"a": 1}'}})) is None
    assert metadata_from_state(_with_metadata([METADATA_KEY])) is None
    assert metadata_from_state(OrderedDict()) is None
    assert metadata_from_state({"x": 1}) is None


def test_parse_metadata() -> None:
    assert parse_metadata('{"a": [1, 2]}') == {"a": [1, 2]}
    assert parse_metadata("{") is None and parse_metadata("[]") is None and parse_metadata('"x"') is None
    assert parse_metadata("NaN") is None


def test_metadata_from_module() -> None:
    model = nn.Linear(1, 1)
    assert metadata_from_module(model) is None
    model._repvgg_cli_metadata = '{"b": 2}'
    assert metadata_from_module(model) == {"b": 2}
    model._repvgg_cli_metadata = {"b": 2}
    assert metadata_from_module(model) is None


def test_metadata_json_is_canonical() -> None:
    assert metadata_json({"b": 1, "a": {"d": [1, 2.5], "c": float("nan")}}) == '{"a":{"c":NaN,"d":[1,2.5]},"b":1}'


def test_check_metadata(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"
    check_metadata(path, None)
    check_metadata(path, {})
    with pytest.raises(InputError) as info:
        check_metadata(path, {"blocks": 1})
    assert info.value.message == f"{path}: its repvgg_cli metadata is malformed: blocks is a int 1, not a list"
    assert info.value.hint == "the file was changed after repvgg convert wrote it; convert the train-form source again"


# -- top-level fields ---------------------------------------------------------------------------------


def test_shown_cuts_long_values() -> None:
    assert md._shown("x" * 38) == "a str '" + "x" * 38 + "'"  # 40 characters: shown whole
    assert md._shown("x" * 39) == "a str '" + "x" * 36 + "..."  # 41: cut to 37 and ...
    assert md._shown(None) == "None None"


def test_the_helpers_at_their_edges() -> None:
    assert md._is_int(0) and md._is_int(-3) and not md._is_int(True) and not md._is_int(1.0)
    assert md._is_int(2, 2) and not md._is_int(1, 2) and md._is_int(0, 0)
    assert md._is_pair([1, 1], 1) and not md._is_pair([1, 0], 1) and not md._is_pair([1, 1, 1], 1)
    assert not md._is_pair((1, 1), 1) and not md._is_pair([1], 1)
    assert md._is_number(1) and md._is_number(1.5) and not md._is_number(False) and not md._is_number("1")
    assert md._is_str_list([]) and md._is_str_list(["a"]) and not md._is_str_list(["a", 1]) and not md._is_str_list("a")


@pytest.mark.parametrize(("metadata", "said"), [
    (None, "it is None, not an object"),
    ([1], "it is a list, not an object"),
    ({"blocks": {}}, "blocks is a dict {}, not a list"),
    ({"tensors": []}, "tensors is a list [], not an object of sha256 strings"),
    ({"tensors": {"a": 1}}, "tensors is a dict {'a': 1}, not an object of sha256 strings"),
    ({"source": "x"}, "source is a str 'x', not an object"),
    ({"options": 1}, "options is a int 1, not an object"),
    ({"dropped_keys": ["a", 1]}, "dropped_keys is a list ['a', 1], not a list of strings"),
    ({"dropped_keys": None}, "dropped_keys is None None, not a list of strings"),
    ({"model_check": []}, "model_check is a list [], not an object"),
    ({"source": {"entry": 1}}, "source.entry is a int 1, not a string"),
    ({"options": {"bn_eps": "1e-5"}}, "options.bn_eps is a str '1e-5', not a number"),
    ({"options": {"bn_eps": True}}, "options.bn_eps is a bool True, not a number"),
    ({"options": {"no_identity": "a"}}, "options.no_identity is a str 'a', not a list of strings"),
    ({"options": {"avg_branch": [1]}}, "options.avg_branch is a list [1], not a list of strings"),
    ({"blocks": [5]}, "blocks[0] is a int, not an object"),
    ({"blocks": [{}, {"name": 1}]}, "blocks[1] name is a int 1, not a string"),
])
def test_each_top_level_field_in_words(metadata, said: str) -> None:
    assert metadata_problem(metadata) == said


def test_well_formed_top_level_fields_pass() -> None:
    assert metadata_problem({}) is None
    assert metadata_problem({"blocks": [], "tensors": {"a": "00"}, "source": None, "options": None,
                             "dropped_keys": ["x"], "model_check": None}) is None
    assert metadata_problem({"source": {"entry": None}, "options": {"bn_eps": 1e-5, "no_identity": [],
                                                                     "avg_branch": ["a"]}}) is None
    assert metadata_problem({"source": {"entry": "ema"}, "options": {"bn_eps": None}, "model_check": {}}) is None
    assert metadata_problem({"options": {"bn_eps": 1}}) is None


def test_the_first_bad_field_is_named() -> None:
    assert metadata_problem({"model_check": 1, "blocks": 1}) == "blocks is a int 1, not a list"
    assert metadata_problem({"options": {"avg_branch": 1, "bn_eps": "x"}}).startswith("options.bn_eps")


# -- block records ----------------------------------------------------------------------------------


def _reference(out: int) -> str:
    return base64.b64encode(torch.arange(out, dtype=torch.float64).numpy().tobytes()).decode("ascii")


def _record(**changes) -> dict:
    record = {"name": "stage.0", "family": "repvgg", "deploy_prefix": "stage.0.reparam", "out_channels": 4,
              "in_per_group": 2, "kernel": [3, 3], "padding": [1, 1], "dilation": [1, 1],
              "probe": {"seed": 0, "shape": [1, 4], "reference": _reference(4)}}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not _DROP}


_DROP = object()


def _problem(complete: bool = True, **changes) -> str | None:
    return metadata_problem({"blocks": [_record(**changes)]}, complete=complete)


def test_a_complete_record_passes() -> None:
    assert _problem() is None
    assert _problem(groups=2, in_channels=4, stride=[2, 1], padding_mode="reflect", branches=["a"], rel_err=1e-9,
                    weight_shape=[4, 2]) is None
    assert _problem(groups=None, in_channels=None, stride=None, rel_err=None, rel_err2=1) is None
    assert _problem(out_channels=1, in_per_group=1, kernel=[1, 1], padding=[0, 0],
                    probe={"seed": 5, "shape": [1, 1], "reference": _reference(1)}) is None


@pytest.mark.parametrize("field", ["name", "family", "deploy_prefix", "out_channels", "in_per_group", "kernel",
                                   "padding", "dilation", "probe"])
def test_a_missing_required_field_only_matters_when_complete(field: str) -> None:
    where = "" if field == "name" else " (block stage.0)"
    assert _problem(**{field: _DROP}) == f"blocks[0] {field} is missing{where}"
    if field == "out_channels":
        assert _problem(complete=False, out_channels=_DROP) == "blocks[0] out_channels is missing (block stage.0)"
    else:
        assert _problem(complete=False, **{field: _DROP}) is None


def test_missing_optional_fields_are_fine_when_complete() -> None:
    assert _problem() is None  # no groups, in_channels, stride, padding_mode, branches, rel_err, weight_shape


@pytest.mark.parametrize(("changes", "said"), [
    ({"name": 3}, "name is a int 3, not a string"),
    ({"family": None}, "family is None None, not a string (block stage.0)"),
    ({"deploy_prefix": 1}, "deploy_prefix is a int 1, not a string (block stage.0)"),
    ({"out_channels": 0}, "out_channels is a int 0, not a positive integer (block stage.0)"),
    ({"out_channels": True}, "out_channels is a bool True, not a positive integer (block stage.0)"),
    ({"in_per_group": 0}, "in_per_group is a int 0, not a positive integer (block stage.0)"),
    ({"kernel": [3, 0]}, "kernel is a list [3, 0], not two positive integers (block stage.0)"),
    ({"padding": [1, -1]}, "padding is a list [1, -1], not two non-negative integers (block stage.0)"),
    ({"dilation": [0, 1]}, "dilation is a list [0, 1], not two positive integers (block stage.0)"),
    ({"probe": [1]}, "probe is a list [1], not an object (block stage.0)"),
    ({"groups": 0}, "groups is a int 0, not a positive integer (block stage.0)"),
    ({"in_channels": 0}, "in_channels is a int 0, not a positive integer (block stage.0)"),
    ({"stride": [1, 0]}, "stride is a list [1, 0], not two positive integers (block stage.0)"),
    ({"padding_mode": "wrap"}, "padding_mode is a str 'wrap', not one of zeros, reflect, replicate, circular "
                               "(block stage.0)"),
    ({"branches": [1]}, "branches is a list [1], not a list of strings (block stage.0)"),
    ({"rel_err": "0"}, "rel_err is a str '0', not a number (block stage.0)"),
    ({"weight_shape": [4]}, "weight_shape is a list [4], not two positive integers (a linear layer's out, in) "
                            "(block stage.0)"),
    ({"weight_shape": [4, 0]}, "weight_shape is a list [4, 0], not two positive integers (a linear layer's out, "
                               "in) (block stage.0)"),
    ({"weight_shape": (4, 2)}, "weight_shape is a tuple (4, 2), not two positive integers (a linear layer's out, "
                               "in) (block stage.0)"),
])
def test_each_record_field_in_words(changes: dict, said: str) -> None:
    assert _problem(**changes) == f"blocks[0] {said}"
    assert _problem(complete=False, **changes) == f"blocks[0] {said}"


@pytest.mark.parametrize("mode", PADDING_MODES)
def test_every_padding_mode_is_accepted(mode: str) -> None:
    assert _problem(padding_mode=mode) is None


def test_groups_must_divide_out_channels() -> None:
    assert _problem(groups=3) == "blocks[0] groups 3 does not divide out_channels 4 (block stage.0)"
    assert _problem(groups=4) is None and _problem(groups=1) is None
    assert _problem(complete=False, out_channels=_DROP, probe=_DROP, groups=3) is None


# -- geometry ---------------------------------------------------------------------------------------


def test_the_kernel_extent_limit() -> None:
    assert _problem(kernel=[4096, 1], padding=[0, 0]) is None  # extent 4096: allowed
    assert _problem(kernel=[1, 2], dilation=[1, 4095], padding=[0, 0]) is None  # 4095 * 1 + 1
    assert _problem(kernel=[1, 4097], padding=[0, 0]) == (
        "blocks[0] kernel [1, 4097] with dilation [1, 1] spans 4097 pixels, over 4096 (block stage.0)")
    assert _problem(kernel=[2, 1], dilation=[4096, 1], padding=[0, 0]) == (
        "blocks[0] kernel [2, 1] with dilation [4096, 1] spans 4097 pixels, over 4096 (block stage.0)")


def test_padding_no_wider_than_the_extent() -> None:
    assert _problem(kernel=[3, 1], padding=[3, 1]) is None  # equal: allowed
    assert _problem(kernel=[3, 1], padding=[4, 0]) == (
        "blocks[0] padding [4, 0] is wider than the kernel's extent [3, 1] (block stage.0)")
    assert _problem(kernel=[1, 3], dilation=[1, 2], padding=[0, 6]) == (
        "blocks[0] padding [0, 6] is wider than the kernel's extent [1, 5] (block stage.0)")
    assert _problem(kernel=[1, 3], dilation=[1, 2], padding=[0, 5]) is None


def test_the_stride_limit() -> None:
    assert _problem(stride=[4096, 1]) is None
    assert _problem(stride=[1, 4097]) == "blocks[0] stride [1, 4097] is over 4096 (block stage.0)"


def test_the_probe_size_limit() -> None:
    # 16 bytes x channels x side^2: side = max(extent, padding + 1)
    side = 1024
    fits = MAX_PROBE_BYTES // (16 * side * side)  # 64 channels of 1024x1024: exactly 1 GiB
    assert _problem(kernel=[side, side], padding=[0, 0], in_per_group=fits) is None
    assert _problem(kernel=[side, side], padding=[0, 0], in_per_group=fits + 1) == (
        f"blocks[0] a probe of {fits + 1} channels of {side}x{side} would take over 1 GiB (block stage.0)")
    # groups multiply the channels
    assert _problem(kernel=[side, side], padding=[0, 0], in_per_group=fits // 2, groups=2) is None
    assert _problem(kernel=[side, side], padding=[0, 0], in_per_group=fits // 2, groups=4) == (
        f"blocks[0] a probe of {fits * 2} channels of {side}x{side} would take over 1 GiB (block stage.0)")


def test_the_probe_side_is_the_padding_plus_one_when_larger() -> None:
    # 16 bytes x 4 channels x 4096 x 4096 is exactly 1 GiB; a padding equal to the extent adds a row
    assert _problem(kernel=[4096, 4096], padding=[4095, 0], in_per_group=4) is None
    assert _problem(kernel=[4096, 4096], padding=[4096, 0], in_per_group=4) == (
        "blocks[0] a probe of 4 channels of 4097x4096 would take over 1 GiB (block stage.0)")
    assert _problem(kernel=[4096, 4096], padding=[0, 4096], in_per_group=4) == (
        "blocks[0] a probe of 4 channels of 4096x4097 would take over 1 GiB (block stage.0)")


def test_the_probe_size_counts_one_channel_per_group_without_in_per_group() -> None:
    record = {"kernel": [4096, 4096], "dilation": [1, 1], "padding": [0, 0], "groups": 4}
    assert md._geometry_problem(record, "") is None  # 4 channels: exactly 1 GiB
    record["groups"] = 5
    assert md._geometry_problem(record, "") == "a probe of 5 channels of 4096x4096 would take over 1 GiB"
    record["groups"] = None  # no groups: one group
    record["in_per_group"] = 4
    assert md._geometry_problem(record, "") is None
    record["in_per_group"] = 5
    assert md._geometry_problem(record, "") == "a probe of 5 channels of 4096x4096 would take over 1 GiB"


# -- the probe --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("probe", "said"), [
    ({"seed": -1, "shape": [1, 4], "reference": _reference(4)}, "probe.seed is a int -1, not a non-negative integer"),
    ({"seed": True, "shape": [1, 4], "reference": _reference(4)}, "probe.seed is a bool True, not a non-negative integer"),
    ({"shape": [1, 4], "reference": _reference(4)}, "probe.seed is None None, not a non-negative integer"),
    ({"seed": 0, "shape": [1, 3], "reference": _reference(4)}, "probe.shape is a list [1, 3], not [1, 4]"),
    ({"seed": 0, "shape": (1, 4), "reference": _reference(4)}, "probe.shape is a tuple (1, 4), not [1, 4]"),
    ({"seed": 0, "shape": [1, 4], "reference": _reference(3)}, "probe.reference is not 4 base64-encoded float64 values"),
    ({"seed": 0, "shape": [1, 4], "reference": _reference(4)[:-4] + "!!!!"},
     "probe.reference is not 4 base64-encoded float64 values"),
    ({"seed": 0, "shape": [1, 4], "reference": "é" + _reference(4)[1:]},
     "probe.reference is not 4 base64-encoded float64 values"),
    ({"seed": 0, "shape": [1, 4], "reference": 5}, "probe.reference is not 4 base64-encoded float64 values"),
    ({"seed": 0, "shape": [1, 4]}, "probe.reference is not 4 base64-encoded float64 values"),
])
def test_each_probe_field_in_words(probe: dict, said: str) -> None:
    assert _problem(probe=probe) == f"blocks[0] {said} (block stage.0)"


def test_a_probe_of_seed_zero_and_of_a_large_seed_passes() -> None:
    assert _problem(probe={"seed": 0, "shape": [1, 4], "reference": _reference(4)}) is None
    assert _problem(probe={"seed": 2**40, "shape": [1, 4], "reference": _reference(4)}) is None


def test_base64_must_be_strict() -> None:
    loose = _reference(4)[:8] + "\n" + _reference(4)[8:]  # decodes without validate=True
    assert len(base64.b64decode(loose)) == 32
    assert _problem(probe={"seed": 0, "shape": [1, 4], "reference": loose}) == (
        "blocks[0] probe.reference is not 4 base64-encoded float64 values (block stage.0)")


def test_a_record_without_a_name_says_no_block() -> None:
    assert _problem(complete=False, name=_DROP, out_channels=0) == (
        "blocks[0] out_channels is a int 0, not a positive integer")
    assert json.dumps(_record())  # the fixture is JSON


def test_geometry_leaves_each_out_of_range_field_to_the_field_checks() -> None:
    """Each pair must be in its own range (kernel, dilation, stride >= 1, padding >= 0) before the
    geometry is measured: out of range, the field checks name it, the geometry says nothing."""
    base = {"kernel": [3, 3], "dilation": [1, 1], "padding": [1, 1]}
    assert md._geometry_problem(dict(base, kernel=[0, 5000]), "") is None
    assert md._geometry_problem(dict(base, kernel=[1, 2049], dilation=[0, 2]), "") is None
    assert md._geometry_problem(dict(base, kernel=[5000, 1], padding=[-1, 0]), "") is None
    assert md._geometry_problem(dict(base, stride=[0, 5000]), "") is None
    # in range, the same values are measured
    assert md._geometry_problem(dict(base, kernel=[1, 5000], padding=[0, 0]), "") is not None
    assert md._geometry_problem(dict(base, stride=[1, 5000]), "") == "stride [1, 5000] is over 4096"


def test_the_options_checks_come_in_addition_to_the_others() -> None:
    assert metadata_problem({"blocks": 1, "options": {}}) == "blocks is a int 1, not a list"
    assert metadata_problem({"source": {"entry": 5}, "options": {"bn_eps": None}}) == (
        "source.entry is a int 5, not a string")

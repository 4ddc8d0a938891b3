"""What convert records in a deploy file, and the checks readers run on it before trusting it.

The metadata is canonical JSON (sorted keys) under :data:`METADATA_KEY`: the tool version, the
source's name and sha256, the options, one record per fused block (geometry, errors, its seeded
probe and the train-form output there) and the sha256 of every tensor written
(:data:`TENSOR_DIGESTS`). :func:`metadata_problem` names the first malformed field, so an edited
file is refused with a reason instead of crashing a reader.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from .containers import type_name

TENSOR_DIGESTS = "tensors"
"""The metadata field with ``{key: sha256}`` of every tensor as written (``verify`` checks them)."""


METADATA_KEY = "repvgg_cli"
"""Where convert records its metadata: a safetensors header entry, or a ``_metadata`` entry of a
``.pt`` state dict (a name no module prefix can take, so ``load_state_dict`` never reads it)."""


def tensor_bytes(tensor: Tensor) -> memoryview:
    """A tensor's raw bytes (any dtype), without a copy when it is already contiguous on the CPU."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def tensor_sha256(tensor: Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype)."""
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


def tensor_digests(state: Mapping[str, Tensor]) -> dict[str, str]:
    """``{key: sha256}`` of every tensor, in the state dict's order."""
    return {key: tensor_sha256(value) for key, value in state.items()}


def metadata_from_state(state: Any) -> dict | None:
    meta = getattr(state, "_metadata", None)
    if isinstance(meta, Mapping) and METADATA_KEY in meta:
        entry = meta[METADATA_KEY]
        text = entry.get("json") if isinstance(entry, Mapping) else None
        if isinstance(text, str):
            return parse_metadata(text)
    return None


def parse_metadata(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def check_metadata(path: Path, metadata: dict | None) -> None:
    """Refuse metadata whose structure ``verify``/``inspect`` cannot trust (an edited deploy file)."""
    problem = metadata_problem(metadata) if metadata is not None else None
    if problem is not None:
        raise InputError(
            f"{path}: its repvgg_cli metadata is malformed: {problem}",
            hint="the file was changed after repvgg convert wrote it; convert the train-form source again",
        )


def _is_int(value: Any, least: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (least is None or value >= least)


def _is_pair(value: Any, least: int) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(v, least) for v in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type_name(value)} {text if len(text) <= 40 else text[:37] + '...'}"


def metadata_problem(metadata: Any, complete: bool = False) -> str | None:
    """What is wrong with the structure of repvgg's deploy metadata (the fields readers use).

    Args:
        metadata: the parsed ``repvgg_cli`` metadata of a deploy file.
        complete: also require every field ``verify`` re-checks a block from (name, deploy_prefix,
            shapes, geometry, probe); otherwise only the fields present are checked.
    Returns:
        One line naming the first malformed field, or None when every field readers use is well-formed.
    """
    if not isinstance(metadata, Mapping):
        return f"it is {type_name(metadata)}, not an object"
    source = metadata.get("source")
    options = metadata.get("options")
    checks: list[tuple[str, Any, Callable[[Any], bool], str]] = [
        ("blocks", metadata.get("blocks", []), lambda v: isinstance(v, list), "a list"),
        (TENSOR_DIGESTS, metadata.get(TENSOR_DIGESTS, {}),
         lambda v: isinstance(v, Mapping) and all(isinstance(h, str) for h in v.values()),
         "an object of sha256 strings"),
        ("source", source, lambda v: v is None or isinstance(v, Mapping), "an object"),
        ("options", options, lambda v: v is None or isinstance(v, Mapping), "an object"),
        ("dropped_keys", metadata.get("dropped_keys", []), _is_str_list, "a list of strings"),
        ("model_check", metadata.get("model_check"), lambda v: v is None or isinstance(v, Mapping), "an object"),
    ]
    if isinstance(source, Mapping):
        checks.append(("source.entry", source.get("entry"), lambda v: v is None or isinstance(v, str), "a string"))
    if isinstance(options, Mapping):
        checks += [
            ("options.bn_eps", options.get("bn_eps"), lambda v: v is None or _is_number(v), "a number"),
            ("options.no_identity", options.get("no_identity", []), _is_str_list, "a list of strings"),
            ("options.avg_branch", options.get("avg_branch", []), _is_str_list, "a list of strings"),
        ]
    for field_name, value, valid, expected in checks:
        if not valid(value):
            return f"{field_name} is {_shown(value)}, not {expected}"
    for index, record in enumerate(metadata.get("blocks", [])):
        problem = _block_record_problem(record, complete)
        if problem is not None:
            return f"blocks[{index}] {problem}"
    return None


_RECORD_FIELDS: tuple[tuple[str, bool, Callable[[Any], bool], str], ...] = (
    # (field, required, valid, what it should be)
    ("name", True, lambda v: isinstance(v, str), "a string"),
    ("family", True, lambda v: isinstance(v, str), "a string"),
    ("deploy_prefix", True, lambda v: isinstance(v, str), "a string"),
    ("out_channels", True, lambda v: _is_int(v, 1), "a positive integer"),
    ("in_per_group", True, lambda v: _is_int(v, 1), "a positive integer"),
    ("kernel", True, lambda v: _is_pair(v, 1), "two positive integers"),
    ("padding", True, lambda v: _is_pair(v, 0), "two non-negative integers"),
    ("dilation", True, lambda v: _is_pair(v, 1), "two positive integers"),
    ("probe", True, lambda v: isinstance(v, Mapping), "an object"),
    ("groups", False, lambda v: v is None or _is_int(v, 1), "a positive integer"),
    ("in_channels", False, lambda v: v is None or _is_int(v, 1), "a positive integer"),
    ("stride", False, lambda v: v is None or _is_pair(v, 1), "two positive integers"),
    ("padding_mode", False, lambda v: v in PADDING_MODES, f"one of {', '.join(PADDING_MODES)}"),
    ("branches", False, _is_str_list, "a list of strings"),
    ("rel_err", False, lambda v: v is None or _is_number(v), "a number"),
    ("weight_shape", False, lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(d, 1) for d in v),
     "two positive integers (a linear layer's out, in)"),
)

MAX_KERNEL_EXTENT = 4096
"""Largest ``dilation * (kernel - 1) + 1`` a record may claim (RepLKNet's 31x31 is far below)."""
MAX_PROBE_BYTES = 1 << 30
"""Largest probe input (float64) verify allocates for one block: a header claiming more is refused
before anything is allocated (a claimed dilation of 8000 once made verify take 18 GB)."""


def _geometry_problem(record: Mapping, where: str) -> str | None:
    """The recorded geometry against sane ranges and what a probe of it would allocate."""
    kernel, dilation, padding = record.get("kernel"), record.get("dilation"), record.get("padding")
    if not (_is_pair(kernel, 1) and _is_pair(dilation, 1) and _is_pair(padding, 0)):
        return None  # reported by the field checks
    extents = [dilation[d] * (kernel[d] - 1) + 1 for d in range(2)]
    if max(extents) > MAX_KERNEL_EXTENT:
        return f"kernel {kernel} with dilation {dilation} spans {max(extents)} pixels, over {MAX_KERNEL_EXTENT}{where}"
    if any(padding[d] > extents[d] for d in range(2)):
        return f"padding {padding} is wider than the kernel's extent {extents}{where}"
    stride = record.get("stride")
    if _is_pair(stride, 1) and max(stride) > MAX_KERNEL_EXTENT:
        return f"stride {stride} is over {MAX_KERNEL_EXTENT}{where}"
    in_channels = record.get("in_per_group", 1) * (record.get("groups") or 1)
    side = [max(extents[d], padding[d] + 1) for d in range(2)]
    if isinstance(in_channels, int) and 16 * in_channels * side[0] * side[1] > MAX_PROBE_BYTES:
        return f"a probe of {in_channels} channels of {side[0]}x{side[1]} would take over 1 GiB{where}"
    return None


def _block_record_problem(record: Any, complete: bool) -> str | None:
    if not isinstance(record, Mapping):
        return f"is {type_name(record)}, not an object"
    name = record.get("name")
    where = f" (block {name})" if isinstance(name, str) else ""
    for field_name, required, valid, expected in _RECORD_FIELDS:
        if field_name not in record:
            if required and complete:
                return f"{field_name} is missing{where}"
        elif not valid(record[field_name]):
            return f"{field_name} is {_shown(record[field_name])}, not {expected}{where}"
    out = record.get("out_channels")
    groups = record.get("groups") or 1
    if out is not None and out % groups:
        return f"groups {groups} does not divide out_channels {out}{where}"
    geometry = _geometry_problem(record, where)
    if geometry is not None:
        return geometry
    if "probe" not in record or out is None:
        return f"out_channels is missing{where}" if "probe" in record else None
    probe = record["probe"]
    if not _is_int(probe.get("seed"), 0):
        return f"probe.seed is {_shown(probe.get('seed'))}, not a non-negative integer{where}"
    if probe.get("shape") != [1, out]:
        return f"probe.shape is {_shown(probe.get('shape'))}, not [1, {out}]{where}"
    reference = probe.get("reference")
    try:
        size = len(base64.b64decode(reference.encode("ascii"), validate=True)) if isinstance(reference, str) else -1
    except ValueError:  # binascii.Error and UnicodeEncodeError are ValueErrors
        size = -1
    if size != 8 * out:
        return f"probe.reference is not {out} base64-encoded float64 values{where}"
    return None


def metadata_from_module(model: nn.Module) -> dict | None:
    text = getattr(model, "_repvgg_cli_metadata", None)
    return parse_metadata(text) if isinstance(text, str) else None


def metadata_json(metadata: Mapping) -> str:
    """Canonical JSON (sorted keys, no spaces) so equal metadata gives equal bytes."""
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), allow_nan=True)

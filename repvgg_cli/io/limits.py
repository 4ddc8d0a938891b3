"""What an output will cost, known before any work: its bytes, its aliasing, its safetensors header.

A small file can describe a huge output: ``torch.zeros(1).expand(40000, 40000)`` saves one float
(its storage) but writes 6.4 GB as safetensors, which stores every element; 200 views of one
storage save once and write 200 times. :func:`check_output_size` adds ``numel * element_size``
per tensor (what safetensors writes; for a ``.pt`` output that keeps aliasing, each storage once,
as ``torch.save`` writes it) and refuses, naming the largest tensor, when the total exceeds a
budget: 4 times the source's bytes unless the caller passes ``max_output_bytes``
(``--max-output-bytes``). :func:`shared_storages` says which keys share a storage, so a ``.pt``
writer can keep them shared.

The safetensors format caps its JSON header at 100,000,000 bytes (``MAX_HEADER_SIZE``: every
reader refuses a longer one), and reserves the key ``__metadata__``. :func:`safetensors_header_size`
computes the header this tool's writer would produce for a layout (plus the per-tensor sha256
repvgg records in its metadata), and :func:`check_safetensors_limits` refuses before any work.

References: huggingface/safetensors ``safetensors/src/tensor.rs`` (``MAX_HEADER_SIZE``, the
header padded to 8 bytes, ``__metadata__``); :mod:`.safetensors_file` (this tool's writer).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .safetensors_file import SAFETENSORS_DTYPES

OUTPUT_BUDGET_RATIO = 4
"""Default budget of an output: this many times the source's bytes."""

SAFETENSORS_MAX_HEADER = 100_000_000
"""The longest safetensors header any reader accepts (bytes, after padding to 8)."""

SAFETENSORS_RESERVED_KEY = "__metadata__"

_SHA256_HEX = 64


@dataclass(frozen=True)
class OutputSize:
    """The bytes an output's tensors take, against the budget.

    Attributes:
        total_bytes: what the writer would write for the tensors.
        budget: the most allowed.
        largest_key: the tensor that takes the most (None for an empty state dict).
        largest_bytes: its bytes.
        shared: groups of keys (two or more) whose tensors share one storage.
        expanded: keys whose tensors have more elements than their storage holds (stride-0 or
            overlapping views, e.g. ``expand``): each one writes more than the file stored.
    """

    total_bytes: int
    budget: int
    largest_key: str | None
    largest_bytes: int
    shared: tuple[tuple[str, ...], ...]
    expanded: tuple[str, ...]


def written_bytes(tensor: Tensor) -> int:
    """The bytes a format that stores every element (safetensors) writes for ``tensor``."""
    return tensor.numel() * tensor.element_size()


def _storage(tensor: Tensor) -> tuple[int, int] | None:
    """``(address, bytes)`` of the storage behind a dense tensor with data (None for sparse,
    nested or meta tensors, and empty storages)."""
    try:
        storage = tensor.untyped_storage()
        pointer, nbytes = storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None
    return (pointer, nbytes) if pointer and nbytes else None


def shared_storages(state: Mapping[str, Tensor]) -> tuple[tuple[str, ...], ...]:
    """Groups of keys (two or more, in state dict order) whose tensors share one storage."""
    groups: dict[int, list[str]] = {}
    for key, tensor in state.items():
        storage = _storage(tensor)
        if storage is not None:
            groups.setdefault(storage[0], []).append(key)
    return tuple(tuple(keys) for keys in groups.values() if len(keys) > 1)


def output_size(state: Mapping[str, Tensor], source_bytes: int, max_output_bytes: int | None = None,
                keep_aliasing: bool = False) -> OutputSize:
    """What writing ``state`` would cost, without touching its data.

    Args:
        state: the tensors to write (on the CPU: storages are told apart by address).
        source_bytes: the source's bytes (its size, or what its compressed records unpack to).
        max_output_bytes: the budget; None: :data:`OUTPUT_BUDGET_RATIO` times ``source_bytes``.
        keep_aliasing: the writer keeps shared storages shared (``torch.save``): each storage
            counts once, whole; otherwise every tensor counts ``numel * element_size``.
    """
    total, largest_key, largest = 0, None, -1
    groups: dict[int, list[str]] = {}
    expanded = []
    for key, tensor in state.items():
        size = written_bytes(tensor)
        storage = _storage(tensor)
        if storage is None:
            total += size
        else:
            pointer, stored = storage
            if size > stored:
                expanded.append(key)
            keys = groups.setdefault(pointer, [])
            total += (0 if keys else stored) if keep_aliasing else size
            keys.append(key)
        if size > largest:
            largest_key, largest = key, size
    budget = OUTPUT_BUDGET_RATIO * source_bytes if max_output_bytes is None else max_output_bytes
    shared = tuple(tuple(keys) for keys in groups.values() if len(keys) > 1)
    return OutputSize(total, budget, largest_key, max(largest, 0), shared, tuple(expanded))


def check_output_size(state: Mapping[str, Tensor], source_bytes: int, max_output_bytes: int | None = None,
                      keep_aliasing: bool = False) -> OutputSize:
    """:func:`output_size`, refusing an output over its budget before anything is allocated.

    Raises:
        InputError: the output would exceed the budget; the message names the largest tensor
            (and whether it is a view that writes more than its storage holds) and
            ``--max-output-bytes``.
    """
    size = output_size(state, source_bytes, max_output_bytes, keep_aliasing)
    if size.total_bytes <= size.budget:
        return size
    key = size.largest_key
    tensor = state[key] if key is not None else None
    what = ""
    if tensor is not None:
        shape = "x".join(map(str, tensor.shape)) or "scalar"
        what = f"; the largest tensor is {key} ({shape} {str(tensor.dtype).removeprefix('torch.')}, {size.largest_bytes:,} bytes"
        if key in size.expanded:
            what += f", a view of {(_storage(tensor) or (0, 0))[1]:,} bytes of storage"
        what += ")"
    shared = f"; {sum(len(g) for g in size.shared)} tensors share {len(size.shared)} storages" if size.shared else ""
    origin = (f"{OUTPUT_BUDGET_RATIO}x the source's {source_bytes:,} bytes" if max_output_bytes is None
              else "--max-output-bytes")
    raise InputError(
        f"the output would hold {size.total_bytes:,} bytes of tensors, more than the {size.budget:,} allowed "
        f"({origin}){what}{shared}",
        hint="if that is intended, pass --max-output-bytes with a larger limit"
             + ("" if keep_aliasing else ", or write a .pt output, which keeps shared storage shared"),
    )


Layout = Mapping[str, "tuple[torch.dtype, tuple[int, ...]]"]
"""An output's tensors in file order: ``{key: (dtype, shape)}`` (as :mod:`.safetensors_file`)."""


def layout_of(state: Mapping[str, Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The layout of a state dict (dtype and shape of each tensor)."""
    return {key: (tensor.dtype, tuple(tensor.shape)) for key, tensor in state.items()}


def _json_string_bytes(text: str) -> int:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return len(text) + 2
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8"))


def _digest_entry_bytes(key: str) -> int:
    """Bytes one ``"key":"<sha256>",`` entry of repvgg's metadata JSON takes once that JSON is
    itself a string value in the header (quotes and backslashes escaped)."""
    if key.isascii() and key.isprintable() and '"' not in key and "\\" not in key:
        return len(key) + 2 + 1 + _SHA256_HEX + 2 + 1 + 4  # the four quotes are escaped
    inner = json.dumps({key: "0" * _SHA256_HEX}, separators=(",", ":"))[1:-1] + ","
    return len(json.dumps(inner, ensure_ascii=False).encode("utf-8")) - 2


def safetensors_header_size(layout: Layout, metadata: Mapping[str, str] | None = None,
                            tensor_digests: bool = True) -> int:
    """The bytes of the JSON header :mod:`.safetensors_file` writes for ``layout`` (padded to 8).

    Args:
        layout: ``{key: (dtype, shape)}`` in file order.
        metadata: the ``__metadata__`` strings, if known; otherwise only ``format``.
        tensor_digests: add what repvgg's metadata spends on each tensor's sha256 (when
            ``metadata`` does not hold it yet).
    Returns:
        The header's length as the file's first 8 bytes will state it.
    """
    meta = dict(sorted((metadata or {"format": "pt"}).items()))
    size = 2 + len(json.dumps(SAFETENSORS_RESERVED_KEY)) + 1
    size += len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    offset = 0
    fixed = len('{"dtype":"","shape":[],"data_offsets":[,]}') + 2  # and the comma before, the colon after the key
    element_sizes: dict[torch.dtype, int] = {}
    for key, (dtype, shape) in layout.items():
        if dtype not in element_sizes:
            element_sizes[dtype] = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * element_sizes[dtype]
        # ,"key":{"dtype":"F32","shape":[..],"data_offsets":[a,b]}
        size += fixed + _json_string_bytes(key) + len(SAFETENSORS_DTYPES.get(dtype, "XXXX"))
        size += len(",".join(map(str, shape))) + len(str(offset)) + len(str(offset + nbytes))
        offset += nbytes
        if tensor_digests:
            size += _digest_entry_bytes(key)
    return size + (-size % 8)


def check_safetensors_limits(layout: Layout, metadata: Mapping[str, str] | None = None,
                             tensor_digests: bool = True) -> int:
    """Refuse, before any work, a safetensors output the format cannot hold.

    Returns:
        The header's size in bytes.
    Raises:
        InputError: a tensor named ``__metadata__``, a dtype safetensors has no code for, or a
            header over :data:`SAFETENSORS_MAX_HEADER` (naming the limit and the tensor count).
    """
    if SAFETENSORS_RESERVED_KEY in layout:
        raise InputError(f"a tensor named {SAFETENSORS_RESERVED_KEY} cannot be written as safetensors: "
                         "the format reserves that name for its metadata",
                         hint="write a .pt output instead")
    for key, (dtype, _) in layout.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise InputError(f"cannot write {key} as safetensors: dtype {dtype} has no safetensors code")
    size = safetensors_header_size(layout, metadata, tensor_digests)
    if size > SAFETENSORS_MAX_HEADER:
        raise InputError(
            f"a safetensors output of these {len(layout):,} tensors needs a {size:,}-byte header, over the "
            f"format's limit of {SAFETENSORS_MAX_HEADER:,} bytes (safetensors' MAX_HEADER_SIZE): no reader "
            "would open it",
            hint="write a .pt output instead, or save fewer, larger tensors",
        )
    return size


def describe(size: OutputSize) -> dict[str, Any]:
    """A JSON-ready summary of :class:`OutputSize` (for reports)."""
    return {"total_bytes": size.total_bytes, "budget": size.budget, "largest_key": size.largest_key,
            "largest_bytes": size.largest_bytes, "shared": [list(g) for g in size.shared],
            "expanded": list(size.expanded)}

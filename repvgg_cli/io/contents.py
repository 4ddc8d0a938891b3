"""What a loaded checkpoint may hold: the tensors repvgg can read, containers it can walk.

A weights-only load accepts more than fusion and the writers can take: meta tensors (a shape,
no data), sparse (COO, CSR, CSC, BSR, BSC) and nested tensors, complex, float8 and quantized
dtypes, and containers nested thousands deep (re-saving such a container as a ``.pt`` output
recurses once per level). They are refused here, with the key, before any work: a state dict's
tensors must be dense, on the CPU, of a real floating-point, integer or bool dtype, and a
container at most :data:`MAX_NESTING` deep. :func:`walk` goes through a container without
recursion (cycles included) and returns the tensors it holds for the mapped-storage check.

References: pytorch ``torch/_weights_only_unpickler.py`` (what a weights-only load can build:
sparse and nested rebuilds, meta storages, quantized tensors); safetensors' dtype codes
(huggingface/safetensors ``safetensors/src/tensor.rs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError

MAX_NESTING = 100
"""The deepest container (dicts, lists, tuples, sets inside each other) a checkpoint may hold."""

READABLE_DTYPES = frozenset({
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool,
})
"""The dtypes a state dict's tensors may have: real floating point, integer and bool."""


def tensor_problem(tensor: Tensor) -> str | None:
    """Why repvgg cannot read this tensor (what it is, in words), or None."""
    if tensor.is_nested:
        return "a nested tensor"
    if tensor.layout != torch.strided:
        return f"a sparse tensor (layout {str(tensor.layout).removeprefix('torch.')})"
    if tensor.device.type == "meta":
        return "a meta tensor (a shape without data)"
    if tensor.device.type != "cpu":
        return f"a tensor on {tensor.device}"
    if tensor.is_quantized:
        return f"a quantized tensor ({str(tensor.dtype).removeprefix('torch.')})"
    if tensor.dtype not in READABLE_DTYPES:
        return f"a {str(tensor.dtype).removeprefix('torch.')} tensor"
    return None


def check_tensors(path: Path, state: Mapping[str, Tensor], where: str = "") -> None:
    """Refuse a state dict holding a tensor :func:`tensor_problem` rejects, naming its key.

    Raises:
        InputError: the first such key, what it holds, and what repvgg reads.
    """
    for key, tensor in state.items():
        problem = tensor_problem(tensor)
        if problem is not None:
            raise InputError(
                f"{path}: {where}key {key} holds {problem}; repvgg reads dense CPU tensors of real "
                "floating-point, integer or bool dtypes",
                hint="convert or drop that tensor before saving the checkpoint",
            )


@dataclass
class Walk:
    """What :func:`walk` found: every tensor (modules' parameters and buffers included), the
    deepest nesting and the top-level entry it is under."""

    tensors: list[Tensor] = field(default_factory=list)
    depth: int = 0
    deepest_entry: Any = None


def _children(value: Any) -> list[tuple[Any, Any]] | None:
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    if isinstance(value, (set, frozenset)):
        return [(None, item) for item in value]
    return None


def walk(raw: Any) -> Walk:
    """Go through a loaded object without recursion: tensors, nesting depth.

    Containers are dicts (any mapping), lists, tuples and sets; a module contributes its
    ``state_dict`` tensors and is not walked into. An object met twice (shared, or a cycle) is
    walked once.
    """
    found = Walk()
    seen: set[int] = set()
    stack: list[tuple[Any, int, Any]] = [(raw, 1, None)]
    while stack:
        value, depth, entry = stack.pop()
        if isinstance(value, Tensor):
            found.tensors.append(value)
            continue
        if isinstance(value, nn.Module):
            found.tensors.extend(value.state_dict(keep_vars=True).values())
            continue
        children = _children(value)
        if children is None or id(value) in seen:
            continue
        seen.add(id(value))
        if depth > found.depth:
            found.depth, found.deepest_entry = depth, entry
        for key, child in children:
            if isinstance(child, Tensor):  # most of a checkpoint: no trip through the stack
                found.tensors.append(child)
            else:
                stack.append((child, depth + 1, key if depth == 1 else entry))
    return found


def check_nesting(path: Path, found: Walk) -> None:
    """Refuse containers nested deeper than :data:`MAX_NESTING` (naming the top-level entry)."""
    if found.depth > MAX_NESTING:
        where = "the file" if found.deepest_entry is None else f"entry {found.deepest_entry!r}"
        raise InputError(
            f"{path}: {where} holds containers nested {found.depth} deep, more than the {MAX_NESTING} "
            "repvgg reads",
            hint="save the weights on their own: torch.save(model.state_dict(), path)",
        )

"""Checkpoints compared key by key: names in natural order, one pair of tensors (shape, dtype,
bit identity, max abs / max rel difference), two state dicts (:func:`diff_states`), and the JSON
of each. Nothing here prints; tolerances follow the tool's rule (see :mod:`repvgg_cli.diff`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError

# -- names -------------------------------------------------------------------------------------

_DIGITS = re.compile(r"(\d+)")

SHORT_DTYPES = {
    "float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64",
    "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "bool",
}


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``stages.2.9`` before ``stages.2.10``."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(_DIGITS.split(name)))


def natural_sorted(names: Iterable[str]) -> list[str]:
    """``names`` in natural order (see :func:`natural_key`)."""
    return sorted(names, key=natural_key)


def dtype_name(tensor: Tensor) -> str:
    """``float32``, ``int64``, …: the dtype without its ``torch.`` prefix."""
    return str(tensor.dtype).removeprefix("torch.")


def short_dtype(name: str) -> str:
    """``f32`` for ``float32`` and so on; unknown names unchanged."""
    return SHORT_DTYPES.get(name, name)


def shape_text(shape: Sequence[int]) -> str:
    """``[64,64,3,3]``; a scalar is ``[]``."""
    return "[" + ",".join(str(s) for s in shape) + "]"


def brace_keys(keys: Sequence[str]) -> list[str]:
    """Keys with a common parent written once: ``a.bn.{weight,bias}``; order kept, groups at
    their first member.

    Args:
        keys: full or local key names.
    Returns:
        One string per parent (a key alone under its parent stays as it is).
    """
    groups: dict[str, list[str]] = {}
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        groups.setdefault(parent, []).append(leaf)
    lines = []
    for parent, leaves in groups.items():
        dot = parent + "." if parent else ""
        lines.append(dot + leaves[0] if len(leaves) == 1 else dot + "{" + ",".join(leaves) + "}")
    return lines


def nbytes(tensor: Tensor) -> int:
    return int(tensor.numel()) * tensor.element_size()


# -- one key, one pair of tensors --------------------------------------------------------------


@dataclass(frozen=True)
class KeyEntry:
    """A key on one side only (or removed / added by a conversion)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @classmethod
    def of(cls, key: str, tensor: Tensor) -> KeyEntry:
        return cls(key, tuple(tensor.shape), dtype_name(tensor), nbytes(tensor))


@dataclass(frozen=True)
class KeyComparison:
    """A key present in both checkpoints.

    Attributes:
        key: the key name.
        shape_a, shape_b, dtype_a, dtype_b: of each side.
        bit_identical: same dtype, same shape, same bytes.
        max_abs: ``max|a - b|`` in float64 (None: different shapes, or a side holds no data).
        max_rel: ``max_abs / scale``, scale the largest finite ``|value|`` of either side (None as max_abs).
        within: agrees within the tolerance it was compared with (see the module docstring).
        problem: why it cannot agree, if that is not just its values ("shape differs", …).
    """

    key: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    bit_identical: bool
    max_abs: float | None
    max_rel: float | None
    within: bool
    problem: str | None = None


def bit_identical(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and bytes (NaNs with the same bits are identical; -0.0 is not 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.is_meta or b.is_meta:
        return False
    if a.numel() == 0:
        return True
    try:
        return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    except RuntimeError:  # a dtype that has no byte view (quantized, …): compare values
        return bool(torch.equal(a, b))


def _abs_difference(a: Tensor, b: Tensor) -> tuple[float, float]:
    """``(max|a - b|, scale)`` in float64; equal values (inf, NaN with NaN) differ by 0, a NaN
    against a number by inf."""
    if a.numel() == 0:
        return 0.0, 0.0
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
    difference = torch.where(same, torch.zeros((), dtype=torch.float64), (a64 - b64).abs())
    max_abs = float(torch.nan_to_num(difference, nan=math.inf).max())
    magnitudes = torch.cat([a64.reshape(-1).abs(), b64.reshape(-1).abs()])
    finite = magnitudes[torch.isfinite(magnitudes)]
    return max_abs, float(finite.max()) if finite.numel() else 0.0


def compare_tensors(key: str, a: Tensor, b: Tensor, rtol: float = 0.0, atol: float = 0.0) -> KeyComparison:
    """Compare one pair of tensors.

    Args:
        key: the name to report.
        a, b: the tensors.
        rtol: relative to the larger max ``|value|`` of the two; with ``atol`` 0 too, agreement
            means bit identity.
        atol: absolute tolerance added to ``rtol * scale``.
    Returns:
        A :class:`KeyComparison`.
    """
    identical = bit_identical(a, b)
    problem = None
    max_abs = max_rel = None
    scale = 0.0
    if a.is_meta or b.is_meta:
        problem = "holds no data (meta tensor): not compared"
    elif a.shape != b.shape:
        problem = "shape differs"
    elif a.is_complex() or b.is_complex():
        problem = None if identical else "complex values differ"
    else:
        max_abs, scale = _abs_difference(a, b)
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        if a.dtype != b.dtype:
            problem = "dtype differs"
    if problem is not None or max_abs is None or (rtol == 0 and atol == 0):
        within = identical
    else:
        within = max_abs <= atol + rtol * scale
    return KeyComparison(key, tuple(a.shape), tuple(b.shape), dtype_name(a), dtype_name(b), identical,
                         max_abs, max_rel, within, problem)


# -- two state dicts, key by key ---------------------------------------------------------------


@dataclass(frozen=True)
class StateDiff:
    """Two state dicts compared key by key (every list in natural key order).

    Attributes:
        only_a: keys only in A.
        only_b: keys only in B.
        shared: every key in both, compared.
        rtol, atol: the tolerance the shared keys were compared with.
    """

    only_a: tuple[KeyEntry, ...]
    only_b: tuple[KeyEntry, ...]
    shared: tuple[KeyComparison, ...]
    rtol: float = 0.0
    atol: float = 0.0

    @property
    def different(self) -> tuple[KeyComparison, ...]:
        """Shared keys that do not agree within the tolerance."""
        return tuple(c for c in self.shared if not c.within)

    @property
    def identical_count(self) -> int:
        """Shared keys that are bit-identical."""
        return sum(c.bit_identical for c in self.shared)

    @property
    def same(self) -> bool:
        """Same keys, every one within the tolerance."""
        return not self.only_a and not self.only_b and not self.different


def diff_states(a: Mapping[str, Tensor], b: Mapping[str, Tensor], rtol: float = 0.0, atol: float = 0.0) -> StateDiff:
    """Compare two state dicts key by key.

    Args:
        a, b: the state dicts (prefixes already stripped).
        rtol, atol: tolerance of each shared key (see :func:`compare_tensors`); 0 and 0: bit identity.
    Returns:
        A :class:`StateDiff`.
    """
    if rtol < 0 or atol < 0 or math.isnan(rtol) or math.isnan(atol):
        raise InputError(f"--rtol {rtol:g} / --atol {atol:g}: tolerances must be non-negative numbers")
    only_a = tuple(KeyEntry.of(k, a[k]) for k in natural_sorted(k for k in a if k not in b))
    only_b = tuple(KeyEntry.of(k, b[k]) for k in natural_sorted(k for k in b if k not in a))
    shared = tuple(compare_tensors(k, a[k], b[k], rtol, atol) for k in natural_sorted(k for k in a if k in b))
    return StateDiff(only_a, only_b, shared, rtol, atol)


# -- JSON --------------------------------------------------------------------------------------


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def entry_json(entry: KeyEntry) -> dict[str, Any]:
    return {"key": entry.key, "shape": list(entry.shape), "dtype": entry.dtype}


def comparison_json(c: KeyComparison) -> dict[str, Any]:
    return {"key": c.key, "shape_a": list(c.shape_a), "shape_b": list(c.shape_b), "dtype_a": c.dtype_a,
            "dtype_b": c.dtype_b, "bit_identical": c.bit_identical, "max_abs": finite_or_none(c.max_abs),
            "max_rel": finite_or_none(c.max_rel), "within": c.within, "problem": c.problem}

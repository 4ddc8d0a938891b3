"""Tolerances and the numbers every check returns (callers decide pass/fail from ``.ok``)."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

FLOAT64 = torch.float64


DEFAULT_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
"""Default relative tolerance by the dtype the fused tensors are shipped in."""


def default_rtol(dtype: torch.dtype) -> float:
    """The default ``--rtol`` for fused tensors stored as ``dtype``."""
    return DEFAULT_RTOL.get(dtype, 1e-5)


@dataclass(frozen=True)
class Tolerance:
    """Pass iff ``max_abs_err <= atol + rtol * max(|reference|)``. ``rtol=None``: by dtype."""

    rtol: float | None = None
    atol: float = 0.0

    def rtol_for(self, dtype: torch.dtype) -> float:
        return self.rtol if self.rtol is not None else default_rtol(dtype)


@dataclass(frozen=True)
class BlockCheck:
    """The comparison of one block's fused conv against its train-form branches."""

    name: str
    max_abs_err: float
    scale: float
    rtol: float
    atol: float
    cast_abs_err: float = 0.0
    problem: str | None = None
    reference: Tensor | None = field(default=None, compare=False, repr=False)
    """The train-form output at the probe's centre pixel, ``(1, C_out)``: what convert records."""

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / self.scale if self.scale > 0 else self.max_abs_err

    @property
    def ok(self) -> bool:
        return self.problem is None and self.max_abs_err <= self.atol + self.rtol * self.scale


@dataclass(frozen=True)
class ModelCheck:
    """Whole-model comparison: train-form eval output vs deploy-form eval output."""

    input_shape: tuple[int, ...]
    dtype: str
    max_abs_err: float
    scale: float
    rtol: float
    atol: float
    outputs: int = 1
    problem: str | None = None

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / self.scale if self.scale > 0 else self.max_abs_err

    @property
    def ok(self) -> bool:
        return self.problem is None and self.max_abs_err <= self.atol + self.rtol * self.scale


def compare(reference: Tensor, candidate: Tensor) -> tuple[float, float]:
    """``(max_abs_err, scale)`` where scale is ``max(|reference|)``."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    diff = (reference.to(FLOAT64) - candidate.to(FLOAT64)).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    if not torch.isfinite(candidate).all():
        err = float("inf")
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return err, scale


def encode_tensor(t: Tensor) -> str:
    """float64 little-endian bytes, base64: compact and exact for metadata."""
    data = t.detach().to(FLOAT64).contiguous().numpy().astype("<f8").tobytes()
    return base64.b64encode(data).decode("ascii")


def decode_tensor(text: str, shape: Iterable[int]) -> Tensor:
    import numpy as np

    data = np.frombuffer(base64.b64decode(text.encode("ascii")), dtype="<f8").copy()
    return torch.from_numpy(data).reshape(tuple(shape))

"""Whole-model checks: the train form and the deploy form run on the same seeded input."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .tolerance import FLOAT64, compare


def flatten_outputs(value: object) -> list[Tensor]:
    """Every tensor in a model output (tensor, tuple/list, dict), in a stable order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_outputs(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in flatten_outputs(value[k])]
    return []


def infer_input_shape(model: nn.Module, spatial: int = 64, batch: int = 2) -> tuple[int, ...]:
    """``(batch, C, spatial, spatial)`` with C the first Conv2d's input channels."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return (batch, int(module.in_channels), spatial, spatial)
    raise ValueError("the model has no Conv2d to infer an input shape from; pass --input-shape")


def model_outputs(model: nn.Module, x: Tensor) -> tuple[list[Tensor], str]:
    """Eval-mode outputs of a float64 copy of ``model`` (float32 if float64 is not supported).

    The model itself is left as it was: the copy is cast, run and dropped.
    """
    last_error: Exception | None = None
    for dtype in (FLOAT64, torch.float32):
        probe = copy.deepcopy(model).to(dtype).eval()
        try:
            with torch.no_grad():
                out = flatten_outputs(probe(x.to(dtype)))
            return [t.detach().to(FLOAT64) for t in out], str(dtype).replace("torch.", "")
        except Exception as error:  # noqa: BLE001 - a model's forward may fail in float64; try float32
            last_error = error
        finally:
            del probe
    raise RuntimeError(f"the model's forward failed: {last_error}")


def compare_outputs(reference: list[Tensor], candidate: list[Tensor]) -> tuple[float, float]:
    if len(reference) != len(candidate):
        raise ValueError(f"the models return {len(reference)} vs {len(candidate)} tensors")
    err, scale = 0.0, 0.0
    for r, c in zip(reference, candidate):
        e, s = compare(r, c)
        err, scale = max(err, e), max(scale, s)
    return err, scale

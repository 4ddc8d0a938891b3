"""Whole-model checks: the train form and the deploy form run on the same seeded input.

Each form runs as a throwaway copy made by :func:`copy_model`: one pass over the module tree that
copies it and casts its floating parameters and buffers to float64 (instead of a deep copy and then
a cast, two passes). The model itself never runs: a forward may leave state behind (timm's LeViT
caches its attention biases in the dtype it last ran in), and the model is what the caller keeps.
The forwards run on one torch thread fewer than the process has (:func:`leave_a_core`), as the key
tree's streamed write does: on a busy 2-core machine float64 convolutions on two threads took 4 to
90 times as long as on one (fastvit_t8, mobileone_s0, repvgg_a0; 12 paired runs each).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .tolerance import FLOAT64, compare

_COPY_HOOKS = ("__deepcopy__", "__copy__", "__reduce__", "__reduce_ex__", "__getstate__", "__setstate__",
               "__getnewargs__", "__getnewargs_ex__", "__slots__")
_PLAIN_COPY: dict[type, bool] = {}
_EMPTY_CONTAINERS = (dict, OrderedDict, set, list)
_threads_left: list[int] = []


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
    raise ValueError("the model has no Conv2d to infer an input shape from; pass --input-shape N,C,H,W")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextmanager
def leave_a_core() -> Iterator[int]:
    """Run torch on one thread fewer than the process has (at least one), and give the threads
    back afterwards; nested uses keep the outer setting. Yields the threads torch runs on."""
    if _threads_left:
        yield torch.get_num_threads()
        return
    threads = torch.get_num_threads()
    _threads_left.append(threads)
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
        _threads_left.pop()


def _copies_as_a_module(cls: type) -> bool:
    """The class is copied the way ``nn.Module`` is: nothing of its own in how it is copied or
    pickled, no ``__slots__``. Other classes are left to :func:`copy.deepcopy`."""
    plain = _PLAIN_COPY.get(cls)
    if plain is None:
        plain = False
        for klass in cls.__mro__:
            if klass is nn.Module:
                plain = True
                break
            if any(name in vars(klass) for name in _COPY_HOOKS):
                break
        _PLAIN_COPY[cls] = plain
    return plain


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor | None:
    """What ``Module.to(dtype)`` makes of a parameter or buffer, as a new tensor (None for a
    tensor subclass other than ``nn.Parameter``: deep-copied, then cast by :func:`copy_model`)."""
    data = tensor.detach()
    data = data.to(dtype) if data.is_floating_point() else data.clone()
    if type(tensor) is nn.Parameter:
        return nn.Parameter(data, requires_grad=tensor.requires_grad)
    if type(tensor) is Tensor:
        return data
    return None


def _copy_module(module: nn.Module, memo: dict) -> nn.Module:
    done = memo.get(id(module))
    if done is not None:
        return done
    cls = type(module)
    if not _copies_as_a_module(cls):
        return copy.deepcopy(module, memo)
    clone = cls.__new__(cls)
    memo[id(module)] = clone
    state = {}
    for name, value in module.__dict__.items():
        if name == "_compiled_call_impl":  # as nn.Module.__getstate__ leaves it out
            continue
        if name == "_modules":
            state[name] = type(value)((k, None if m is None else _copy_module(m, memo)) for k, m in value.items())
        elif type(value) in _EMPTY_CONTAINERS and not value:
            state[name] = type(value)()  # the hook tables, mostly: deepcopy takes the long way for these
        else:  # parameters and buffers are in the memo already, cast
            state[name] = copy.deepcopy(value, memo)
    clone.__dict__.update(state)
    return clone


def _cast_tensors(model: nn.Module, dtype: torch.dtype) -> dict:
    """A deepcopy memo holding every parameter and buffer of ``model`` already cast."""
    memo: dict = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in memo:
            cast = _cast(tensor, dtype)
            if cast is not None:
                memo[id(tensor)] = cast
    return memo


def copy_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """``copy.deepcopy(model)``, about twice as fast, and with ``dtype`` its floating parameters and
    buffers cast in the same pass: ``copy.deepcopy(model).to(dtype)`` without copying every tensor
    first and casting it then (tied parameters stay tied).

    Modules are copied as ``nn.Module`` defines it (the instance dictionary, deep-copied), except
    that the empty hook tables are made new instead of going through ``copy.deepcopy``; a module
    class that defines its own copying or pickling is deep-copied as it defines it (in the same
    memo), and anything the short way cannot copy makes the whole copy ``copy.deepcopy``'s.
    """
    try:
        clone = _copy_module(model, _cast_tensors(model, dtype) if dtype is not None else {})
    except Exception:  # noqa: BLE001 - an object the short way cannot copy: take deepcopy's whole way
        clone = copy.deepcopy(model, _cast_tensors(model, dtype) if dtype is not None else {})
    # a tensor subclass, or a module whose own __deepcopy__ did not use the memo: cast as .to() would
    if dtype is not None and any(t.is_floating_point() and t.dtype != dtype
                                 for t in [*clone.parameters(), *clone.buffers()]):
        clone = clone.to(dtype)
    return clone


def model_outputs(model: nn.Module, x: Tensor) -> tuple[list[Tensor], str]:
    """Eval-mode outputs of a float64 copy of ``model`` (a float32 copy if float64 fails), on one
    torch thread fewer than the process has (see the module docstring).

    The model itself is left as it was: the copy is made, run and dropped.

    Returns:
        ``(outputs as float64 tensors, the dtype the copy ran in)``.
    Raises:
        RuntimeError: the forward failed in float64 and in float32.
    """
    last_error: Exception | None = None
    with leave_a_core():
        for dtype in (FLOAT64, torch.float32):
            probe = copy_model(model, dtype).eval()
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
    """``(max abs error, max abs reference value)`` over every output tensor.

    Raises:
        ValueError: the two lists differ in length (or a pair in shape).
    """
    if len(reference) != len(candidate):
        raise ValueError(f"the models return {len(reference)} vs {len(candidate)} tensors")
    err, scale = 0.0, 0.0
    for r, c in zip(reference, candidate):
        e, s = compare(r, c)
        err, scale = max(err, e), max(scale, s)
    return err, scale

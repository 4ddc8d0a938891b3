"""Stage 1, read: a checkpoint file, a state dict or a live model becomes a :class:`Source`."""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from ..errors import InputError
from ..io.containers import strip_prefixes
from ..io.digest import FileDigest
from ..io.read import LoadedCheckpoint, load_checkpoint


@dataclass
class Source:
    """What a conversion works on.

    Attributes:
        state: the train-form state dict (key tree), prefixes stripped; None for a model.
        model: the train-form model (module tree); None for a state dict.
        loaded: the file it came from, when it came from a file.
        owned: the pipeline may drop each block's source tensors once fused (frees memory;
            only for state dicts the pipeline read itself).
        notes: what reading it involved (entry used, prefixes stripped, ...).
    """

    state: OrderedDict[str, Tensor] | None = None
    model: nn.Module | None = None
    loaded: LoadedCheckpoint | None = None
    owned: bool = False
    notes: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        return "module tree" if self.model is not None else "key tree"


def read_file(path: str | Path, *, allow_pickle: bool = False, entry: str | None = None,
              model_spec: str | None = None, digest: FileDigest | None = None) -> Source:
    """Read a checkpoint file (safely unless ``allow_pickle``) into a :class:`Source`.

    Args:
        path: the train-form checkpoint (never modified).
        allow_pickle: permit full unpickling (trusted files only).
        entry: the container entry to use (default: EMA weights if present).
        model_spec: ``MODULE:CALLABLE`` building the train-form model the state dict loads into.
        digest: the file's sha256 already being computed.
    """
    loaded = load_checkpoint(path, allow_pickle=allow_pickle, entry=entry, digest=digest)
    if loaded.model is not None:
        return Source(model=loaded.model.eval(), loaded=loaded, notes=loaded.notes)
    if model_spec is not None:
        return Source(model=build_model(model_spec, loaded.state_dict).eval(), loaded=loaded, notes=loaded.notes)
    _forget_raw_weights(loaded)
    return Source(state=loaded.state_dict, loaded=loaded, owned=True, notes=loaded.notes)


def read_state(state: Mapping[str, Tensor]) -> Source:
    """A state dict given by the caller (never changed): ``module.``/``_orig_mod.`` stripped as the
    CLI strips them."""
    stripped, prefixes = strip_prefixes(state)
    return Source(state=stripped, notes=tuple(f"stripped key prefix {p!r}" for p in prefixes))


def read_model(model: nn.Module) -> Source:
    """A live model given by the caller, put in eval mode (its BN running statistics are what is
    fused, and what its deploy form computes)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"a model must be an nn.Module, not a {type(model).__name__}")
    return Source(model=model.eval())


def _forget_raw_weights(loaded: LoadedCheckpoint) -> None:
    """Drop the loaded object's own references to the weights (``state_dict`` keeps them), so a
    block's source tensors are freed as soon as it is fused. Other container entries stay."""
    inner = loaded.raw.get(loaded.entry) if loaded.entry is not None and isinstance(loaded.raw, dict) else loaded.raw
    if isinstance(inner, dict) and inner is not loaded.state_dict:
        inner.clear()


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Resolve ``MODULE:CALLABLE`` (e.g. ``mypkg.models:build_repvgg``) to the callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"--model {spec!r}: expected MODULE:CALLABLE, e.g. mypkg.models:build_model")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure is the user's input
        raise InputError(f"--model {spec!r}: cannot import {module_name}: {error}") from None
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"--model {spec!r}: {module_name} has no attribute {attr}")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"--model {spec!r}: {attr} is not callable")
    return target  # type: ignore[return-value]


def build_model(spec: str, state: Mapping[str, Tensor]) -> nn.Module:
    """Build the train-form model with ``spec`` and load ``state`` into it strictly."""
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as error:  # noqa: BLE001
        raise InputError(f"--model {spec!r}: calling it failed: {error}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {spec!r} returned a {type(model).__name__}, not an nn.Module")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise InputError(f"the checkpoint does not load into --model {spec}: {detail[:300]}") from None
    return model

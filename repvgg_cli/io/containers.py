"""Checkpoint containers: which entry holds the weights, and the prefixes to strip.

Training loops save ``{"model": ..., "optimizer": ..., "epoch": ...}`` and variants; EMA weights
(``ema``, ``model_ema``, ``state_dict_ema``) are preferred unless ``--entry`` says otherwise.
``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) are stripped only when every key
starts with them, and only as prefixes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import InputError

EMA_ENTRIES = ("ema", "model_ema", "state_dict_ema")


PLAIN_ENTRIES = ("state_dict", "model")


CONTAINER_ENTRIES = EMA_ENTRIES + PLAIN_ENTRIES


STRIPPABLE_PREFIXES = ("module.", "_orig_mod.")


def is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()
    )


def type_name(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def why_not_state_dict(value: Any) -> str | None:
    """Why a mapping that holds some tensors is no state dict (its first bad entry), else None."""
    if not isinstance(value, Mapping) or not any(isinstance(v, Tensor) for v in value.values()):
        return None
    for key, item in value.items():
        if not isinstance(key, str):
            return f"its key {key!r} is {type_name(key)}, not a string"
        if not isinstance(item, Tensor):
            return f"key {key} holds {type_name(item)}, not a tensor"
    return None


def pick_entry(raw: Mapping, entry: str | None, path: Path) -> tuple[str, Any, tuple[str, ...]]:
    """Choose the container entry holding the weights; EMA first unless told otherwise."""
    usable = [k for k in CONTAINER_ENTRIES if k in raw and (is_state_dict(raw[k]) or isinstance(raw[k], nn.Module))]
    if entry is not None:
        if entry not in raw:
            raise InputError(
                f"{path} has no entry {entry!r}; it has: {', '.join(map(str, raw.keys()))}"
            )
        if raw[entry] is None:
            raise InputError(f"{path}: entry {entry!r} is None")
        return entry, raw[entry], (f"used entry {entry!r} (--entry)",)
    if not usable:
        for where, value in [("the file", raw)] + [(f"entry {k!r}", raw[k]) for k in CONTAINER_ENTRIES if k in raw]:
            why = why_not_state_dict(value)
            if why is not None:
                raise InputError(f"{path}: {where} is not a state dict: {why}")
        if not raw:
            raise InputError(f"{path} holds an empty dict: no weights")
        keys = ", ".join(map(str, list(raw.keys())[:12]))
        raise InputError(
            f"{path} holds no state dict: top-level keys are {keys}",
            hint="pass --entry NAME to pick the entry that holds the weights",
        )
    chosen = usable[0]
    notes = [f"used entry {chosen!r}"]
    others = [k for k in usable[1:]]
    if chosen in EMA_ENTRIES and any(k in PLAIN_ENTRIES for k in others):
        plain = next(k for k in others if k in PLAIN_ENTRIES)
        notes = [f"used EMA weights from {chosen!r} (also present: {plain!r}; pick it with --entry {plain})"]
    return chosen, raw[chosen], tuple(notes)


def strip_prefixes(state: Mapping[str, Tensor]) -> tuple[OrderedDict[str, Tensor], tuple[str, ...]]:
    """Remove ``module.`` / ``_orig_mod.`` when every key starts with it (repeatedly, as prefixes only)."""
    keys = list(state.keys())
    stripped: list[str] = []
    changed = True
    while changed and keys:
        changed = False
        for prefix in STRIPPABLE_PREFIXES:
            if all(k.startswith(prefix) and len(k) > len(prefix) for k in keys):
                keys = [k[len(prefix):] for k in keys]
                stripped.append(prefix)
                changed = True
    if not stripped:
        return OrderedDict(state), ()
    return OrderedDict(zip(keys, state.values())), tuple(stripped)


def prefix_notes(stripped: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"stripped key prefix {p!r}" for p in stripped)

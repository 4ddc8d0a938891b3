"""Keys no family claimed that look like re-parameterization branches.

A converter that copies such keys through "successfully" writes a train-form model under a deploy
name: the worst answer it can give. So convert refuses them (exit 2) unless the user says they are
meant to stay (``--passthrough GLOB``), and inspect shows them. Two signs, either is enough:

* **structure**: two or more conv→BN units under one parent, with the same input and output
  channels and different kernels, and no other conv there (parallel branches to be summed; a
  ResNet bottleneck has other convs, so it is not one);
* **names** re-parameterization projects give their branches: a module ``*_origin``, ``*_avg``,
  ``*_1x1_kxk*``, ``lkb_*``, ``small_conv``, ``dilated*``/``dil_*``, ``rbr_*``, ``branch_*``,
  ``conv_scale``/``rbr_scale``/``branch_scale``, ``*_rpr_conv``/``*_rpr_scale``/``*_rpr_skip``,
  ``fusion_bn``
  that holds a conv weight or BatchNorm statistics, or a bare weight-space kernel
  ``weight_rbr_*``/``weight_orepa_*``/``weight_or1x1_*``.

Sequentially numbered units (``conv1``, ``conv2``; ``cv1``, ``cv2``: a bottleneck) are not taken
for parallel branches; list items (``0``, ``1``, ...) and branch names are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fnmatch import fnmatchcase

from torch import Tensor

from .keys import join

BRANCH_COMPONENT = re.compile(
    r"(_origin$|_avg$|_1x1_kxk|^lkb_|^small_conv$|^dilated|^dil_(conv|bn)|^rbr_|^branch_|"
    r"^(conv|rbr|branch)_scale$|_rpr_(conv|scale|skip)$|^fusion_(bn|conv)$)"
)
"""Module names that re-parameterization projects give their branches (matched per key component)."""

WEIGHT_SPACE_KERNEL = re.compile(r"^weight_(rbr|orepa|or1x1)_")
"""Bare parameters of weight-space re-parameterization (OREPA)."""

SEQUENTIAL_NAME = re.compile(r"^[A-Za-z_]+\d+$")
"""``conv1``, ``cv2``: layers that run one after the other, not branches."""


def _conv_bn_units(state: Mapping[str, Tensor], keys: list[str]) -> dict[str, dict[str, tuple[str, Tensor]]]:
    """Conv→BN units by parent prefix: ``{parent: {unit: (conv weight key, weight)}}``.

    A unit is ``C.conv``+``C.bn``, ``C.0``+``C.1`` (a Sequential), or sibling ``<a>conv<b>`` +
    ``<a>bn<b>`` modules, where the BN has running statistics and the conv weight is 4-D.
    """
    present = set(keys)
    units: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key in keys:
        if not key.endswith(".weight"):
            continue
        weight = state[key]
        if not isinstance(weight, Tensor) or weight.dim() != 4:
            continue
        module = key[: -len(".weight")]
        parent, _, leaf = module.rpartition(".")
        grand, _, unit = parent.rpartition(".")
        if leaf in ("conv", "0") and f"{parent}.{'bn' if leaf == 'conv' else '1'}.running_var" in present:
            units.setdefault(grand, {})[unit] = (key, weight)
        elif "conv" in leaf and join(parent, leaf.replace("conv", "bn", 1)) + ".running_var" in present:
            units.setdefault(parent, {})[leaf] = (key, weight)
    return units


def _parallel_units(state: Mapping[str, Tensor], keys: list[str]) -> list[tuple[str, str]]:
    found = []
    for parent, units in _conv_bn_units(state, keys).items():
        if len(units) < 2 or all(SEQUENTIAL_NAME.match(u) for u in units):
            continue
        shapes = {tuple(w.shape[:2]) for _, w in units.values()}
        kernels = {tuple(w.shape[2:]) for _, w in units.values()}
        unit_keys = {k for k, _ in units.values()}
        start = parent + "." if parent else ""
        other_convs = [k for k in keys if k.startswith(start) and k not in unit_keys and k.endswith(".weight")
                       and isinstance(state[k], Tensor) and state[k].dim() == 4]
        if len(shapes) == 1 and len(kernels) >= 2 and not other_convs:
            description = ", ".join(f"{u} ({w.shape[2]}x{w.shape[3]})" for u, (_, w) in sorted(units.items()))
            found.append((parent, f"parallel conv+BN branches {description}"))
    return found


def _is_branch_tensor(key: str, value: object) -> bool:
    """A conv weight (4-D) or BN statistic, the things a branch is made of."""
    if not isinstance(value, Tensor):
        return False
    leaf = key.rpartition(".")[2]
    return (leaf == "weight" and value.dim() == 4) or leaf in ("running_mean", "running_var")


def _named_branches(state: Mapping[str, Tensor], keys: list[str]) -> list[tuple[str, str]]:
    found: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        if WEIGHT_SPACE_KERNEL.match(parts[-1]) and isinstance(state[key], Tensor) and state[key].dim() >= 2:
            found.setdefault(".".join(parts[:-1]), []).append(parts[-1])
            continue
        if not _is_branch_tensor(key, state[key]):
            continue
        for index, part in enumerate(parts[:-1]):
            if "reparam" in part:  # a deploy conv (rbr_reparam, lkb_reparam, branch_reparam, ...)
                break
            if BRANCH_COMPONENT.search(part):
                found.setdefault(".".join(parts[:index]), []).append(part)
                break
    return [(prefix, "branch-like keys " + ", ".join(sorted(set(names))))
            for prefix, names in found.items()]


def unclaimed_branches(state: Mapping[str, Tensor], claimed: set[str],
                       passthrough: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Groups of keys no family claimed that look like re-parameterization branches.

    Args:
        state: the state dict.
        claimed: keys that families (or the dropped-keys rules) account for.
        passthrough: globs of block prefixes or keys the user says are meant to stay (``--passthrough``).
    Returns:
        ``[(prefix, description)]`` in key order, one entry per parent module.
    """
    keys = [k for k in state if k not in claimed and not any(fnmatchcase(k, g) for g in passthrough)]
    found: dict[str, str] = {}
    for prefix, description in _parallel_units(state, keys) + _named_branches(state, keys):
        if any(fnmatchcase(prefix, g) for g in passthrough):
            continue
        if prefix in found and description not in found[prefix]:
            found[prefix] += "; " + description
        else:
            found.setdefault(prefix, description)
    position: dict[str, int] = {}
    for index, key in enumerate(state):  # each group sits where its first key does
        parts = key.split(".")
        for depth in range(len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix in found and prefix not in position:
                position[prefix] = index
    return sorted(found.items(), key=lambda item: position.get(item[0], -1))

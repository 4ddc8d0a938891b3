"""Generic fusion, part 4: the family, the expression of a read block over the algebra and the
labels the report shows.

Sources: the algebra follows DESIGN.md (after DingXiaoH/DiverseBranchBlock ``dbb_transforms.py``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, fx, nn

from ...algebra import maps
from ...algebra.maps import Map, plus, then
from ...errors import RepvggError, UnsupportedError
from ...fusion.sum import fuse_branches
from ...fusion.values import FusedConv
from ..base import Block, Family, FamilyOptions
from ..keys import join
from ..modules import ModuleView, conv_from_fused
from .deploy import GenericDeploy
from .read import SUMMING, Reading, Step, fetch, post_module, read_block

# -- the expression and its labels ----------------------------------------------------------------


def block_expression(reading: Reading, v: ModuleView) -> Map:
    """The block's branches over the algebra, read off the traced graph (geometry and eps from the
    modules through ``v``)."""
    values: dict[fx.Node, Map] = {}
    channels: dict[fx.Node, int] = {}
    for node, step in reading.steps.items():
        given = [values[i] for i in step.inputs]
        width = reading.channels if step.kind == "source" else channels[step.inputs[0]]
        if step.kind == "source":
            value = maps.identity(reading.channels)
        elif step.kind == "conv":
            value = then(given[0], v.conv(step.target))
            width = int(v.get(step.target).out_channels)
        elif step.kind == "bn":
            value = then(given[0], v.bn(step.target))
        elif step.kind == "pool":
            pool = v.get(step.target)
            value = then(given[0], replace(maps.avg_pool(width, pool.kernel_size, pool.stride, pool.padding),
                                           geometry_known=True))
        elif step.kind == "identity":
            value = given[0]
        elif step.kind == "sum":
            value = plus(given[0], given[1])
        elif step.kind == "diff":
            value = plus(given[0], then(given[1], _factor(-1.0, width)))
        elif step.kind == "neg":
            value = then(given[0], _factor(-1.0, width))
        elif step.kind == "scale":
            value = then(given[0], maps.scale(_widened(step.constant, width)))
        elif step.kind == "shift":
            value = then(given[0], maps.shift(_widened(step.constant, width)))
        else:  # rshift: c - x
            value = then(given[0], _factor(-1.0, width), maps.shift(_widened(step.constant, width)))
        values[node], channels[node] = value, width
    return values[reading.head]


def _factor(number: float, width: int) -> Map:
    return maps.scale(torch.full((width,), number, dtype=torch.float64))


def _widened(vector: Tensor, width: int) -> Tensor:
    return vector.expand(width) if vector.numel() == 1 else vector


def _leaf_label(step: Step, root: nn.Module) -> str:
    module = fetch(root, step.target)
    if step.kind == "conv":
        kh, kw = module.kernel_size
        label = f"{kh}x{kw}"
        if tuple(module.stride) != (1, 1):
            label += f"/s{module.stride[0]}" if module.stride[0] == module.stride[1] else f"/s{module.stride}"
        if tuple(module.dilation) != (1, 1):
            label += f"/d{module.dilation[0]}" if module.dilation[0] == module.dilation[1] else f"/d{module.dilation}"
        if module.groups > 1:
            label += "/dw" if module.groups == module.in_channels == module.out_channels else f"/g{module.groups}"
        return label
    kernel = module.kernel_size if isinstance(module.kernel_size, int) else "x".join(map(str, module.kernel_size))
    return f"avgpool{kernel}"


def branch_labels(reading: Reading, root: nn.Module) -> list[str]:
    """The summed branches as the report lists them: ``3x3+bn``, ``1x1->3x3+bn``, ``id+bn``, ..."""
    labels: dict[fx.Node, str] = {}
    terms: dict[fx.Node, list[str]] = {}
    for node, step in reading.steps.items():
        before = [labels[i] for i in step.inputs]
        if step.kind == "source":
            label = "id"
        elif step.kind in ("conv", "pool"):
            own = _leaf_label(step, root)
            label = own if before[0] == "id" else f"{before[0]}->{own}"
        elif step.kind == "identity":
            label = before[0]
        elif step.kind in SUMMING:
            second = terms[step.inputs[1]]
            if step.kind == "diff":
                second = [f"-{t}" for t in second]
            terms[node] = terms[step.inputs[0]] + second
            label = "(" + " + ".join(terms[node]) + ")"
        else:
            label = before[0] + {"bn": "+bn", "neg": "+neg", "scale": "+scale", "shift": "+shift",
                                 "rshift": "+neg+shift"}[step.kind]
        labels[node] = label
        terms.setdefault(node, [label])
    return terms[reading.head]


def after_sum_label(reading: Reading, root: nn.Module) -> str:
    """What the forward does after the sum, in a few words (``ReLU``, ``SE, ReLU``, ...)."""
    names: list[str] = []
    for node in reading.post:
        stack = node.meta.get("nn_module_stack")
        if stack:  # computed inside a child module (an SE, ...): named after that child
            name = getattr(next(iter(stack.values()))[1], "__name__", "module")
        elif node.op == "call_module":
            name = type(fetch(root, node.target)).__name__
        elif node.op == "call_function" and node.target not in (operator.getitem, getattr):
            name = getattr(node.target, "__name__", str(node.target))
        elif node.op == "call_method":
            name = str(node.target)
        else:
            continue
        if not names or names[-1] != name:
            names.append(name)
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


class GenericBlock(Family):
    """Any block whose traced forward sums linear branches, when no family claims it (module tree)."""

    name = "generic"
    title = "any block whose traced forward sums linear branches (module tree only)"
    source = ("torch.fx trace of the block's forward (pytorch torch/fx/_symbolic_trace.py); "
              "branches read with the algebra of DESIGN.md")
    anchor = ""
    deploy = "conv"
    train_keys = "(module tree only) Conv2d / BN / AvgPool2d / Identity / per-channel scale branches, summed"
    deploy_keys = "<block>.conv.{weight,bias}, <block>.post.* (GenericDeploy)"
    after_sum = "whatever forward does after the sum (traced, kept as post)"

    def __init__(self, others: Sequence[Family] = ()) -> None:
        """Args:
            others: the registered families, tried first: what one of them claims (the module or
                a module inside it) is never a generic block (the registry passes itself).
        """
        self.others = tuple(others)

    def find_prefixes(self, keys: list[str]) -> list[str]:
        return []  # a state dict does not say what a block's forward computes

    def find_deploy_prefixes(self, keys: list[str]) -> list[str]:
        return []

    def matches_module(self, module: nn.Module) -> bool:
        if _claimed_by_a_family(module, self, inside=False):  # cheap: before any tracing
            return False
        reading = read_block(module)
        if reading is None or _claimed_by_a_family(module, self, inside=True):
            return False
        try:
            fuse_branches(block_expression(reading, ModuleView(module, "")))
            post_module(module, reading)
        except RepvggError:
            return False
        return True

    def expression(self, v) -> Map | None:
        if v.tree != "module":
            return None
        reading = read_block(v.module)
        if reading is None:
            return None
        value = block_expression(reading, v)
        after = after_sum_label(reading, v.module)
        v.note(f"generic block: {', '.join(branch_labels(reading, v.module))}"
               + (f"; after the sum: {after}" if after else ""))
        return value

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        view = ModuleView(module, name, options)
        reading = read_block(module)
        if reading is None:
            raise UnsupportedError(f"{name or '<root>'} no longer reads as a sum of linear branches")
        value = self.expression(view)
        keys: list[str] = []
        for step in reading.steps.values():
            if step.target:
                keys.extend(join(name, step.target, k) for k in fetch(module, step.target).state_dict())
            if step.attribute:
                keys.append(join(name, step.attribute))
        return Block(
            name=name, family=self.name, branches=value, source_keys=tuple(dict.fromkeys(keys)),
            deploy_prefix=join(name, self.deploy), dtype=view.dtype or torch.float32, notes=tuple(view.notes),
            eps_note=view.eps_note,
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        reading = read_block(module)
        if reading is None:
            raise UnsupportedError("the block no longer reads as a sum of linear branches")
        return GenericDeploy(conv_from_fused(fused, like=self.deploy_like(module)), post_module(module, reading))


def _claimed_by_a_family(module: nn.Module, generic: GenericBlock, inside: bool) -> bool:
    """A registered family claims the module (``inside``: or a module inside it, walked outermost
    first as the find stage walks): their blocks are theirs."""
    others = [f for f in generic.others if f is not generic and f.name != generic.name]
    modules = module.modules() if inside else (module,)
    return any(f.matches_module(m) for m in modules for f in others)

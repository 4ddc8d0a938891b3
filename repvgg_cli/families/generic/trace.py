"""Generic fusion, part 1: tracing a block's forward with torch.fx, and the cheap looks before it
(the forward's bytecode, a shallow trace of the module's own forward).

A trace runs the forward with proxies; whatever it stores on the modules is put back. See
:mod:`repvgg_cli.families.generic` for what a generic block is.

Sources: pytorch/pytorch ``torch/fx/_symbolic_trace.py`` (``Tracer``: ``is_leaf_module``,
``call_module`` and the ``nn_module_stack`` it records per node).
"""

from __future__ import annotations

import dis
import operator
import types
import warnings
from collections import OrderedDict

import torch
from torch import fx, nn

_BatchNorm = nn.modules.batchnorm._BatchNorm

ARITHMETIC = {
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.neg: "neg", torch.neg: "neg",
}
"""``call_function`` targets a linear branch may use (``call_method`` names: the values)."""


def leaf_kind(module: nn.Module) -> str | None:
    """'conv', 'bn', 'pool' or 'identity' for the linear layers a branch is made of (their own
    torch forward, not a subclass that computes something else), else None."""
    forward = type(module).forward
    if isinstance(module, nn.Conv2d) and forward is nn.Conv2d.forward and not isinstance(module.padding, str):
        return "conv"
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and forward in (_BatchNorm.forward,
                                                                           nn.SyncBatchNorm.forward):
        return "bn"
    if (isinstance(module, nn.AvgPool2d) and forward is nn.AvgPool2d.forward and module.count_include_pad
            and not module.ceil_mode and module.divisor_override is None):
        return "pool"
    if isinstance(module, nn.Identity) and forward is nn.Identity.forward:
        return "identity"
    return None


class LeafTracer(fx.Tracer):
    """torch.fx's tracer; subclasses of the linear layers that keep their forward are leaves too."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return leaf_kind(m) is not None or super().is_leaf_module(m, module_qualified_name)


class _ShallowTracer(fx.Tracer):
    """Every child is a leaf: the module's own forward only (cheap, whatever the children hold)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_graph(module: nn.Module, tracer: fx.Tracer) -> fx.Graph | None:
    """The module's forward as a graph, or None when torch.fx cannot trace it, or when tracing
    changed the modules (a forward that fills a cache or sets an attribute: it ran with proxies,
    what it stored is put back as it was, and such a forward is not read as a block)."""
    saved = [_Saved(sub) for sub in module.modules()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(module)
    except Exception:  # noqa: BLE001 - whatever fx cannot trace is not a block read from a trace
        graph = None
    finally:
        changed = [state.restore() for state in saved]
    return None if any(changed) else graph


_CONTAINERS = (dict, OrderedDict, list, set)


class _Saved:
    """A module's attributes and the contents of its plain containers (parameter, buffer, module
    and hook tables, caches), to be put back after a trace; compared by identity only."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.attributes = dict(module.__dict__)
        self.contents = {k: _entries(v) for k, v in self.attributes.items() if type(v) in _CONTAINERS}

    def restore(self) -> bool:
        """Put everything back; whether anything had changed."""
        current = self.module.__dict__
        changed = set(current) != set(self.attributes)
        for key in [k for k in current if k not in self.attributes]:
            del current[key]
        for key, value in self.attributes.items():
            if current.get(key, _Saved) is not value:
                changed = True
                current[key] = value
        for key, entries in self.contents.items():
            container = self.attributes[key]
            now = _entries(container)
            if len(now) == len(entries) and all(a is b for a, b in zip(now, entries)):
                continue
            changed = True
            container.clear()
            if isinstance(container, list):
                container.extend(entries)
            elif isinstance(container, dict):
                container.update(zip(entries[::2], entries[1::2]))
            else:
                container.update(entries)
        return changed


def _entries(container: object) -> list:
    """A dict's keys and values in turn, or the elements of a list or set."""
    if isinstance(container, dict):
        return [x for item in container.items() for x in item]
    return list(container)


SUM_NAMES = frozenset({"add", "add_", "sub", "sub_", "sum", "iadd", "isub", "__add__", "__radd__", "__iadd__",
                       "__sub__", "__rsub__", "__isub__"})
SUM_OPCODES = frozenset({"BINARY_ADD", "INPLACE_ADD", "BINARY_SUBTRACT", "INPLACE_SUBTRACT"})


def _code_may_sum(code: types.CodeType, namespace: dict, owner: type, seen: set, depth: int) -> bool:
    """Whether ``code`` (or a function or method of ``owner`` it names) could add or subtract."""
    if code in seen:
        return False
    seen.add(code)
    if SUM_NAMES & set(code.co_names):
        return True
    for instruction in dis.get_instructions(code):
        if instruction.opname in SUM_OPCODES or (instruction.opname == "BINARY_OP"
                                                 and instruction.argrepr in ("+", "+=", "-", "-=")):
            return True
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and _code_may_sum(const, namespace, owner, seen, depth):
            return True
    if depth >= 4:
        return False
    for name in code.co_names:
        # every definition along the class's MRO (``super().forward``), else the module's global
        targets = [vars(cls)[name] for cls in owner.__mro__ if name in vars(cls)] or [namespace.get(name)]
        for target in targets:
            if isinstance(target, (staticmethod, classmethod)):
                target = target.__func__
            if isinstance(target, types.FunctionType) and _code_may_sum(target.__code__, target.__globals__, owner,
                                                                        seen, depth + 1):
                return True
    return False


def may_sum(module: nn.Module) -> bool:
    """A cheap look at the forward's bytecode: False only when neither it nor a method (along the
    class's MRO) or module-level function it names adds or subtracts (then it is not traced at all).
    A sum reached only through another object's method is missed: such a block is not claimed."""
    forward = getattr(type(module), "forward", None)
    if not isinstance(forward, types.FunctionType):
        return True
    return _code_may_sum(forward.__code__, forward.__globals__, type(module), set(), 0)


def sums_its_input(module: nn.Module) -> bool:
    """The module's own forward (children not entered) adds or subtracts two values computed from
    its one input: the first sign of a block, and cheap to see (a whole network's forward has none,
    and is not traced through every block it holds)."""
    graph = trace_graph(module, _ShallowTracer())
    source = the_input(graph) if graph is not None else None
    if source is None:
        return False
    depends = depending(graph, source)
    return any(arithmetic_of(n) in ("add", "sub") and len(n.args) == 2 and all(a in depends for a in n.args)
               for n in graph.nodes)


def arithmetic_of(node: fx.Node) -> str | None:
    if node.op == "call_function":
        return ARITHMETIC.get(node.target)
    if node.op == "call_method" and node.target in ("add", "sub", "mul", "neg"):
        return str(node.target)
    return None


def the_input(graph: fx.Graph) -> fx.Node | None:
    """The graph's one placeholder, or None when the forward takes more (or fewer) inputs."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return placeholders[0] if len(placeholders) == 1 else None


def depending(graph: fx.Graph, source: fx.Node) -> set[fx.Node]:
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node is source or any(i in found for i in node.all_input_nodes):
            found.add(node)
    return found



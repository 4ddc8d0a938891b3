"""Generic fusion, part 3: a traced forward read as ``post(sum of linear branches over the input)``.

:func:`read_block` returns the linear part (one :class:`Step` per node, up to the sum) and the
part after it, or None when the module is not such a block (every condition is listed in
:mod:`repvgg_cli.families.generic`); :func:`post_module` makes that part a module of its own (a
``torch.fx.GraphModule``, pickled as generated code, pytorch/pytorch ``torch/fx/graph_module.py``).

Sources: pytorch/pytorch ``torch/fx/_symbolic_trace.py`` and ``torch/fx/node.py`` (the graph read
here); the algebra follows DESIGN.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from ...errors import UnsupportedError
from .deploy import GenericDeploy
from .trace import (
    LeafTracer,
    arithmetic_of,
    depending,
    leaf_kind,
    may_sum,
    sums_its_input,
    the_input,
    trace_graph,
)

CONSTANT_METHODS = ("view", "reshape", "unsqueeze", "squeeze", "flatten")
"""Tensor methods evaluated on constants (``self.gamma.view(1, -1, 1, 1)``)."""

POST_FUNCTION_MODULES = ("torch", "operator", "_operator", "math", "builtins")
"""Where the functions called after the sum may come from (importable wherever torch is)."""

SUMMING = ("sum", "diff")


class _NotConstant(Exception):
    """A value that is not a constant this module can evaluate."""


def fetch(root: nn.Module, target: str) -> object:
    value: object = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _constant(arg: object, root: nn.Module, depends: set[fx.Node]) -> object:
    """The value of a node argument that does not depend on the input: a number or a tensor."""
    if isinstance(arg, bool) or not isinstance(arg, (int, float, fx.Node)):
        raise _NotConstant
    if not isinstance(arg, fx.Node):
        return float(arg)
    if arg in depends:
        raise _NotConstant
    if arg.op == "get_attr":
        value = fetch(root, arg.target)
        if isinstance(value, Tensor):
            return value.detach()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _NotConstant
    if arg.op == "call_method" and arg.target in CONSTANT_METHODS and not arg.kwargs:
        base = _constant(arg.args[0], root, depends)
        if not isinstance(base, Tensor) or not all(_is_shape_arg(a) for a in arg.args[1:]):
            raise _NotConstant
        return getattr(base, arg.target)(*arg.args[1:])
    raise _NotConstant


def _is_shape_arg(value: object) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_shape_arg(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _per_channel(value: object) -> Tensor | None:
    """A constant as the per-channel vector it multiplies or shifts an ``(N, C, H, W)`` map by
    (length 1: the same for every channel), or None when it broadcasts any other way."""
    if isinstance(value, float):
        return torch.tensor([value], dtype=torch.float64)
    if not isinstance(value, Tensor) or not value.is_floating_point():
        return None
    if value.dim() == 0 or (value.numel() == 1 and value.dim() <= 4):
        return value.reshape(1)
    if value.dim() in (3, 4) and tuple(value.shape[-2:]) == (1, 1) and (value.dim() == 3 or value.shape[0] == 1):
        return value.reshape(-1)
    return None


@dataclass(frozen=True)
class Step:
    """One linear node: its kind and what it reads.

    Attributes:
        kind: 'source', a leaf kind ('conv', 'bn', 'pool', 'identity'), 'sum', 'diff' (``a - b``),
            'neg', 'scale', 'shift' (``x + c``) or 'rshift' (``c - x``).
        inputs: the linear nodes it reads.
        constant: the per-channel vector of 'scale', 'shift', 'rshift'.
        target: the module path of a leaf.
        attribute: the parameter or buffer a constant comes from (its key is the block's).
    """

    kind: str
    inputs: tuple[fx.Node, ...] = ()
    constant: Tensor | None = None
    target: str = ""
    attribute: str = ""


def _linear_step(node: fx.Node, root: nn.Module, linear: dict[fx.Node, Step], depends: set[fx.Node]) -> Step | None:
    """The node as a linear map of the linear nodes before it, or None."""
    if node.op == "call_module":
        if node.kwargs or len(node.args) != 1 or node.args[0] not in linear:
            return None
        kind = leaf_kind(fetch(root, node.target))
        return None if kind is None else Step(kind, (node.args[0],), target=str(node.target))
    operation = arithmetic_of(node)
    if operation is None or node.kwargs:
        return None
    args = node.args
    if operation == "neg":
        return Step("neg", (args[0],)) if len(args) == 1 and args[0] in linear else None
    if len(args) != 2:
        return None
    a, b = args
    a_in, b_in = a in depends, b in depends
    if a_in and b_in:
        if operation == "mul" or a not in linear or b not in linear:
            return None
        return Step("sum" if operation == "add" else "diff", (a, b))
    variable, other = (a, b) if a_in else (b, a)
    if variable not in linear:
        return None
    try:
        value = _constant(other, root, depends)
    except _NotConstant:
        return None
    if isinstance(value, float) and value == 0.0 and operation in ("add", "sub"):
        # x + 0, 0 + x, x - 0 (``sum([...])`` starts from 0): the value itself; 0 - x: its negation
        return Step("neg" if operation == "sub" and b_in else "identity", (variable,))
    vector = _per_channel(value)
    if vector is None:
        return None
    attribute = _attribute_of(other)
    if operation == "mul":
        return Step("scale", (variable,), constant=vector, attribute=attribute)
    if operation == "add":
        return Step("shift", (variable,), constant=vector, attribute=attribute)
    if a_in:
        return Step("shift", (variable,), constant=-vector, attribute=attribute)
    return Step("rshift", (variable,), constant=vector, attribute=attribute)


def _attribute_of(arg: object) -> str:
    """The parameter or buffer a constant node was computed from ("" for a number)."""
    while isinstance(arg, fx.Node):
        if arg.op == "get_attr":
            return str(arg.target)
        arg = arg.args[0] if arg.args else None
    return ""


def _linear_region(graph: fx.Graph, root: nn.Module, source: fx.Node, depends: set[fx.Node]) -> dict[fx.Node, Step]:
    """Every node that is a linear map of ``source`` (in graph order)."""
    linear: dict[fx.Node, Step] = {source: Step("source")}
    for node in graph.nodes:
        if node in depends and node is not source:
            step = _linear_step(node, root, linear, depends)
            if step is not None:
                linear[node] = step
    return linear


def _ancestors(head: fx.Node, linear: dict[fx.Node, Step]) -> list[fx.Node]:
    """The linear nodes ``head`` is computed from (itself included), in graph order."""
    seen: set[fx.Node] = set()
    stack = [head]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(linear[node].inputs)
    return [n for n in linear if n in seen]


@dataclass(frozen=True)
class Reading:
    """A block read from its trace: the linear part up to ``head`` (the sum) and the rest."""

    graph: fx.Graph
    source: fx.Node
    head: fx.Node
    steps: dict[fx.Node, Step]
    """The linear nodes ``head`` is computed from, in graph order."""
    depends: set[fx.Node]
    post: tuple[fx.Node, ...]
    """The nodes after the sum (the output node last), in graph order."""
    channels: int


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _holds_another_block(graph: fx.Graph, root: nn.Module, post: tuple[fx.Node, ...], head: fx.Node) -> bool:
    """A sum of linear branches after the sum: the module is a network of blocks, not one."""
    forks = [head, *(n for n in post if len(n.users) > 1)]
    for fork in forks:
        region = _linear_region(graph, root, fork, depending(graph, fork))
        if any(step.kind in SUMMING for step in region.values()):
            return True
    return False


def _channels(steps: dict[fx.Node, Step], root: nn.Module) -> int | None:
    """The block's input channels, checking every step's channels agree (None: unknown)."""
    known: list[int | None] = [None]  # the input's channels, once some step tells

    def same(a: int | None, b: int | None) -> int | None:
        a = known[0] if a is None else a
        b = known[0] if b is None else b
        if a is None or b is None:
            if a is None and b is None:
                return None
            value = a if b is None else b
            known[0] = value
            return value
        if a != b:
            raise UnsupportedError(f"summed or chained maps with {a} and {b} channels")
        return a

    channels: dict[fx.Node, int | None] = {}
    for node, step in steps.items():
        given = [channels[i] for i in step.inputs]
        if step.kind == "source":
            channels[node] = None
        elif step.kind == "conv":
            conv = fetch(root, step.target)
            same(given[0], int(conv.in_channels))
            channels[node] = int(conv.out_channels)
        elif step.kind == "bn":
            channels[node] = same(given[0], int(fetch(root, step.target).num_features))
        elif step.kind in SUMMING:
            channels[node] = same(given[0], given[1])
        elif step.constant is not None and step.constant.numel() > 1:
            channels[node] = same(given[0], int(step.constant.numel()))
        else:
            channels[node] = given[0]
    return known[0]


def read_block(module: nn.Module) -> Reading | None:
    """``module`` as ``post(sum of linear branches over its input)``, or None when it is not one
    (see the module docstring for every condition)."""
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict, GenericDeploy, fx.GraphModule)):
        return None
    if type(module).__module__.startswith("torch.") or _has_hooks(module):
        return None
    if not any(isinstance(m, nn.Conv2d) for m in module.modules()) or not may_sum(module):
        return None
    if not sums_its_input(module):
        return None
    graph = trace_graph(module, LeafTracer())
    source = the_input(graph) if graph is not None else None
    if source is None:
        return None
    depends = depending(graph, source)
    linear = _linear_region(graph, module, source, depends)
    exits = [n for n in linear if any(user not in linear for user in n.users)]
    if len(exits) != 1 or exits[0] is source:
        return None
    head = exits[0]
    steps = {n: linear[n] for n in _ancestors(head, linear)}
    sums = [n for n, s in steps.items() if s.kind in SUMMING]
    if not any(not n.meta.get("nn_module_stack") for n in sums):
        return None  # no sum, or every sum is computed inside a child (the child is the block)
    if not any(s.kind == "conv" for s in steps.values()):
        return None
    if any(_has_hooks(fetch(module, s.target)) for s in steps.values() if s.target):
        return None
    post = tuple(n for n in graph.nodes if n in depends and n not in linear)
    if not post or post[-1].op != "output":
        return None
    allowed = set(post) | {head}
    for node in post:
        if any(i in depends and i not in allowed for i in node.all_input_nodes):
            return None  # the part after the sum reads the input or a branch itself
        if node.op == "call_function" and not _importable_function(node.target):
            return None
    if _holds_another_block(graph, module, post, head):
        return None
    try:
        channels = _channels(steps, module)
    except UnsupportedError:
        return None
    if channels is None:
        return None
    return Reading(graph, source, head, steps, depends, post, channels)


def _importable_function(target: object) -> bool:
    owner = getattr(target, "__module__", None) or ""
    return owner in POST_FUNCTION_MODULES or owner.startswith("torch.")


def post_module(module: nn.Module, reading: Reading) -> nn.Module:
    """The traced remainder after the sum as a module of its own (``nn.Identity`` when the forward
    returns the sum itself): a GraphModule over the block's modules and constants it uses."""
    output = reading.post[-1]
    if len(reading.post) == 1 and output.args == (reading.head,) and not output.kwargs:
        return nn.Identity()
    needed: set[fx.Node] = set(reading.post)
    stack = [i for n in reading.post for i in n.all_input_nodes if i not in reading.depends]
    while stack:  # the constants the remainder reads (parameters and what is computed from them)
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(i for i in node.all_input_nodes if i not in reading.depends)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {reading.head: graph.placeholder("y")}
    for node in reading.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.lint()
    return fx.GraphModule(module, graph, class_name="GenericPost")

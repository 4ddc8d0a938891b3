"""Generic fusion: a block no family knows, read from its own forward traced with torch.fx
(module tree only).

A module whose ``forward`` computes ``post(b_1(x) + b_2(x) + ...)``, where every branch ``b_i`` is a
chain of linear maps over the module's own input ``x``, is one affine conv followed by ``post``.
The linear maps read here are the leaves of :mod:`repvgg_cli.algebra`:

* ``nn.Conv2d`` (any kernel that fits in the largest, stride, groups, dilation; numeric padding),
* eval-mode ``nn.BatchNorm2d`` / ``nn.SyncBatchNorm`` (with running statistics),
* ``nn.Identity`` and the input itself (the skip branch),
* ``nn.AvgPool2d`` counting its zero padding (``count_include_pad=True``, no ``ceil_mode``, no
  ``divisor_override``),
* a product with a per-channel constant (a layer scale ``(C, 1, 1)`` / ``(1, C, 1, 1)`` or a
  number), an added per-channel constant, negation,
* sequences of these (a 1x1 conv before a kxk conv) and sums and differences of them.

Whatever follows the sum (an activation, an SE, ...) is kept as it was traced: the deploy form is
:class:`GenericDeploy`, ``post(conv(x))``, with ``post`` a ``torch.fx.GraphModule`` holding the
traced remainder and the block's own modules it calls (``nn.Identity`` when nothing follows).

A module is claimed only when all of this holds (anything else is left as it is):

* no registered family claims it or any module inside it (families are tried first);
* it is a block, not a layer or a network: not a ``torch.nn`` layer or container, its forward
  takes one input, at least one sum of two branches that depend on the input is written in this
  module's own ``forward`` (not only inside a child: then the child is the block), at least one branch
  holds a Conv2d, and the part after the sum holds no further sum of linear branches (a network
  of blocks is not one block);
* exactly one linear value leaves the linear part (a branch with a ReLU inside, a ResNet basic
  block: two values leave, not claimed), and the part after the sum depends on nothing but the
  sum (not on ``x``: a residual added after the nonlinearity is not captured);
* the part after the sum calls only modules, tensor methods and functions of ``torch``,
  ``operator``, ``math`` and ``builtins`` (so the deploy model pickles and reloads), and the
  trace succeeds at all (data-dependent control flow does not trace: not claimed);
* no forward hook or pre-hook sits on the block or on a module of its branches;
* the branches fuse into one conv exactly (the algebra's checks: strides agree, paddings line up,
  a BN shift is not padded into a conv, ...).

What a trace cannot see is not checked here: Python side effects and in-place updates of the
input in ``forward``, branches taken on ``self.training`` (the eval path is traced). The
module tree's whole-model check compares the deploy model with the train model end to end.

Sources: pytorch/pytorch ``torch/fx/_symbolic_trace.py`` (``Tracer``: ``is_leaf_module``,
``call_module`` and the ``nn_module_stack`` it records per node) and ``torch/fx/graph_module.py``
(``GraphModule``: the remainder, pickled as generated code); the algebra follows DESIGN.md (after
DingXiaoH/DiverseBranchBlock ``dbb_transforms.py``).
"""

from __future__ import annotations

import dis
import operator
import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
from torch import Tensor, fx, nn

from .. import algebra
from ..algebra import Map, plus, then
from ..errors import RepvggError, UnsupportedError
from ..fusion import FusedConv, fuse_branches
from .base import Block, Family, FamilyOptions, ModuleView, conv_from_fused, join

_BatchNorm = nn.modules.batchnorm._BatchNorm

ARITHMETIC = {
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.neg: "neg", torch.neg: "neg",
}
"""``call_function`` targets a linear branch may use (``call_method`` names: the values)."""

CONSTANT_METHODS = ("view", "reshape", "unsqueeze", "squeeze", "flatten")
"""Tensor methods evaluated on constants (``self.gamma.view(1, -1, 1, 1)``)."""

POST_FUNCTION_MODULES = ("torch", "operator", "_operator", "math", "builtins")
"""Where the functions called after the sum may come from (importable wherever torch is)."""

SUMMING = ("sum", "diff")


class GenericDeploy(nn.Module):
    """The deploy form of a generic block: the fused conv, then what followed the sum.

    Args:
        conv: the fused ``nn.Conv2d``.
        post: the traced remainder after the sum (``nn.Identity`` when nothing followed it).
    """

    def __init__(self, conv: nn.Conv2d, post: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.post = post if post is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.conv(x))


# -- reading the traced forward -------------------------------------------------------------------


def _leaf_kind(module: nn.Module) -> str | None:
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


class _Tracer(fx.Tracer):
    """torch.fx's tracer; subclasses of the linear layers that keep their forward are leaves too."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _leaf_kind(m) is not None or super().is_leaf_module(m, module_qualified_name)


class _ShallowTracer(fx.Tracer):
    """Every child is a leaf: the module's own forward only (cheap, whatever the children hold)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _trace(module: nn.Module, tracer: fx.Tracer) -> fx.Graph | None:
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


def _may_sum(module: nn.Module) -> bool:
    """A cheap look at the forward's bytecode: False only when neither it nor a method (along the
    class's MRO) or module-level function it names adds or subtracts (then it is not traced at all).
    A sum reached only through another object's method is missed: such a block is not claimed."""
    forward = getattr(type(module), "forward", None)
    if not isinstance(forward, types.FunctionType):
        return True
    return _code_may_sum(forward.__code__, forward.__globals__, type(module), set(), 0)


def _sums_its_input(module: nn.Module) -> bool:
    """The module's own forward (children not entered) adds or subtracts two values computed from
    its one input: the first sign of a block, and cheap to see (a whole network's forward has none,
    and is not traced through every block it holds)."""
    graph = _trace(module, _ShallowTracer())
    if graph is None:
        return False
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return False
    depends = _depending(graph, placeholders[0])
    return any(_operation(n) in ("add", "sub") and len(n.args) == 2 and all(a in depends for a in n.args)
               for n in graph.nodes)


class _NotConstant(Exception):
    """A value that is not a constant this module can evaluate."""


def _fetch(root: nn.Module, target: str) -> object:
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
        value = _fetch(root, arg.target)
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


def _operation(node: fx.Node) -> str | None:
    if node.op == "call_function":
        return ARITHMETIC.get(node.target)
    if node.op == "call_method" and node.target in ("add", "sub", "mul", "neg"):
        return str(node.target)
    return None


@dataclass(frozen=True)
class _Step:
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


def _depending(graph: fx.Graph, source: fx.Node) -> set[fx.Node]:
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node is source or any(i in found for i in node.all_input_nodes):
            found.add(node)
    return found


def _linear_step(node: fx.Node, root: nn.Module, linear: dict[fx.Node, _Step], depends: set[fx.Node]) -> _Step | None:
    """The node as a linear map of the linear nodes before it, or None."""
    if node.op == "call_module":
        if node.kwargs or len(node.args) != 1 or node.args[0] not in linear:
            return None
        kind = _leaf_kind(_fetch(root, node.target))
        return None if kind is None else _Step(kind, (node.args[0],), target=str(node.target))
    operation = _operation(node)
    if operation is None or node.kwargs:
        return None
    args = node.args
    if operation == "neg":
        return _Step("neg", (args[0],)) if len(args) == 1 and args[0] in linear else None
    if len(args) != 2:
        return None
    a, b = args
    a_in, b_in = a in depends, b in depends
    if a_in and b_in:
        if operation == "mul" or a not in linear or b not in linear:
            return None
        return _Step("sum" if operation == "add" else "diff", (a, b))
    variable, other = (a, b) if a_in else (b, a)
    if variable not in linear:
        return None
    try:
        value = _constant(other, root, depends)
    except _NotConstant:
        return None
    if isinstance(value, float) and value == 0.0 and operation in ("add", "sub"):
        # x + 0, 0 + x, x - 0 (``sum([...])`` starts from 0): the value itself; 0 - x: its negation
        return _Step("neg" if operation == "sub" and b_in else "identity", (variable,))
    vector = _per_channel(value)
    if vector is None:
        return None
    attribute = _attribute_of(other)
    if operation == "mul":
        return _Step("scale", (variable,), constant=vector, attribute=attribute)
    if operation == "add":
        return _Step("shift", (variable,), constant=vector, attribute=attribute)
    if a_in:
        return _Step("shift", (variable,), constant=-vector, attribute=attribute)
    return _Step("rshift", (variable,), constant=vector, attribute=attribute)


def _attribute_of(arg: object) -> str:
    """The parameter or buffer a constant node was computed from ("" for a number)."""
    while isinstance(arg, fx.Node):
        if arg.op == "get_attr":
            return str(arg.target)
        arg = arg.args[0] if arg.args else None
    return ""


def _linear_region(graph: fx.Graph, root: nn.Module, source: fx.Node, depends: set[fx.Node]) -> dict[fx.Node, _Step]:
    """Every node that is a linear map of ``source`` (in graph order)."""
    linear: dict[fx.Node, _Step] = {source: _Step("source")}
    for node in graph.nodes:
        if node in depends and node is not source:
            step = _linear_step(node, root, linear, depends)
            if step is not None:
                linear[node] = step
    return linear


def _ancestors(head: fx.Node, linear: dict[fx.Node, _Step]) -> list[fx.Node]:
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
class _Reading:
    """A block read from its trace: the linear part up to ``head`` (the sum) and the rest."""

    graph: fx.Graph
    source: fx.Node
    head: fx.Node
    steps: dict[fx.Node, _Step]
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
        region = _linear_region(graph, root, fork, _depending(graph, fork))
        if any(step.kind in SUMMING for step in region.values()):
            return True
    return False


def _channels(steps: dict[fx.Node, _Step], root: nn.Module) -> int | None:
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
            conv = _fetch(root, step.target)
            same(given[0], int(conv.in_channels))
            channels[node] = int(conv.out_channels)
        elif step.kind == "bn":
            channels[node] = same(given[0], int(_fetch(root, step.target).num_features))
        elif step.kind in SUMMING:
            channels[node] = same(given[0], given[1])
        elif step.constant is not None and step.constant.numel() > 1:
            channels[node] = same(given[0], int(step.constant.numel()))
        else:
            channels[node] = given[0]
    return known[0]


def read_block(module: nn.Module) -> _Reading | None:
    """``module`` as ``post(sum of linear branches over its input)``, or None when it is not one
    (see the module docstring for every condition)."""
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict, GenericDeploy, fx.GraphModule)):
        return None
    if type(module).__module__.startswith("torch.") or _has_hooks(module):
        return None
    if not any(isinstance(m, nn.Conv2d) for m in module.modules()) or not _may_sum(module):
        return None
    if not _sums_its_input(module):
        return None
    graph = _trace(module, _Tracer())
    if graph is None:
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    source = placeholders[0]
    depends = _depending(graph, source)
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
    if any(_has_hooks(_fetch(module, s.target)) for s in steps.values() if s.target):
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
    return _Reading(graph, source, head, steps, depends, post, channels)


def _importable_function(target: object) -> bool:
    owner = getattr(target, "__module__", None) or ""
    return owner in POST_FUNCTION_MODULES or owner.startswith("torch.")


# -- the expression and its labels ----------------------------------------------------------------


def block_expression(reading: _Reading, v: ModuleView) -> Map:
    """The block's branches over the algebra, read off the traced graph (geometry and eps from the
    modules through ``v``)."""
    values: dict[fx.Node, Map] = {}
    channels: dict[fx.Node, int] = {}
    for node, step in reading.steps.items():
        given = [values[i] for i in step.inputs]
        width = reading.channels if step.kind == "source" else channels[step.inputs[0]]
        if step.kind == "source":
            value = algebra.identity(reading.channels)
        elif step.kind == "conv":
            value = then(given[0], v.conv(step.target))
            width = int(v.get(step.target).out_channels)
        elif step.kind == "bn":
            value = then(given[0], v.bn(step.target))
        elif step.kind == "pool":
            pool = v.get(step.target)
            value = then(given[0], replace(algebra.avg_pool(width, pool.kernel_size, pool.stride, pool.padding),
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
            value = then(given[0], algebra.scale(_widened(step.constant, width)))
        elif step.kind == "shift":
            value = then(given[0], algebra.shift(_widened(step.constant, width)))
        else:  # rshift: c - x
            value = then(given[0], _factor(-1.0, width), algebra.shift(_widened(step.constant, width)))
        values[node], channels[node] = value, width
    return values[reading.head]


def _factor(number: float, width: int) -> Map:
    return algebra.scale(torch.full((width,), number, dtype=torch.float64))


def _widened(vector: Tensor, width: int) -> Tensor:
    return vector.expand(width) if vector.numel() == 1 else vector


def _leaf_label(step: _Step, root: nn.Module) -> str:
    module = _fetch(root, step.target)
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


def branch_labels(reading: _Reading, root: nn.Module) -> list[str]:
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


def after_sum_label(reading: _Reading, root: nn.Module) -> str:
    """What the forward does after the sum, in a few words (``ReLU``, ``SE, ReLU``, ...)."""
    names: list[str] = []
    for node in reading.post:
        stack = node.meta.get("nn_module_stack")
        if stack:  # computed inside a child module (an SE, ...): named after that child
            name = getattr(next(iter(stack.values()))[1], "__name__", "module")
        elif node.op == "call_module":
            name = type(_fetch(root, node.target)).__name__
        elif node.op == "call_function" and node.target not in (operator.getitem, getattr):
            name = getattr(node.target, "__name__", str(node.target))
        elif node.op == "call_method":
            name = str(node.target)
        else:
            continue
        if not names or names[-1] != name:
            names.append(name)
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


# -- the deploy form --------------------------------------------------------------------------------


def post_module(module: nn.Module, reading: _Reading) -> nn.Module:
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
                keys.extend(join(name, step.target, k) for k in _fetch(module, step.target).state_dict())
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


def _claimed_by_a_family(module: nn.Module, generic: Family, inside: bool) -> bool:
    """A registered family claims the module (``inside``: or a module inside it, walked outermost
    first as the find stage walks): their blocks are theirs."""
    from . import FAMILIES  # the registry imports this module

    others = [f for f in FAMILIES if f is not generic and f.name != generic.name]
    modules = module.modules() if inside else (module,)
    return any(f.matches_module(m) for m in modules for f in others)


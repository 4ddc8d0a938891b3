"""Generic fusion, part 3: the deploy form of a generic block, the fused conv then the traced
remainder after the sum.

Sources: pytorch/pytorch ``torch/fx/graph_module.py`` (``GraphModule``: the remainder, pickled as
generated code).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, fx, nn

if TYPE_CHECKING:  # read.py builds the reading and checks for this module's GenericDeploy
    from .read import Reading


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



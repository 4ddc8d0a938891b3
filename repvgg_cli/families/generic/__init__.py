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

The package, from the bottom up: :mod:`.trace` (torch.fx tracing and the cheap looks before
it), :mod:`.deploy` (:class:`~.deploy.GenericDeploy`), :mod:`.read` (:func:`~.read.read_block`,
:func:`~.read.post_module`), :mod:`.family` (:class:`~.family.GenericBlock`, the expression and
the labels).
"""

"""Pure tensor math of structural re-parameterization.

A RepVGG-style block is a sum of parallel branches (k×k conv+BN, smaller convs+BN, an
identity, optionally scaled), maybe followed by a BatchNorm. Because every branch is linear
in eval mode, the sum equals one k×k convolution with bias. This package computes that conv.

Tensors in, tensors out: no ``nn.Module`` walking, no IO. Everything is computed in float64,
a few output channels at a time, and rounded once into the dtype asked for.

The package, from the bottom up: :mod:`.values` (what every family, the algebra and the checks
share: a block's branches, :class:`~.values.Branches`, and the one conv they equal,
:class:`~.values.FusedConv`); the math in :mod:`.bn` (eval BatchNorm as a per-channel affine map, folded into a conv), :mod:`.kernels`
(kernels placed in a larger one, the identity as a kernel, the alignment a sum needs) and
:mod:`.sum` (:func:`~.sum.fuse_branches`: the sum, chunk by chunk).
"""

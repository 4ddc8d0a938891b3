"""The algebra of structural re-parameterization: one value type, two operations.

Every branch of every re-parameterizable block is a composition of linear maps on feature maps:
a convolution (any kernel, stride, padding, dilation, groups, bias), an eval-mode BatchNorm, the
identity, an average pool, a per-channel scale, a linear layer. Each of them, and every sum and
composition of them, is an affine convolution: ``y = conv2d(x, W, stride, padding, dilation,
groups) + b``. This package builds that value (a :class:`~repvgg_cli.fusion.values.Branches`, the
"normal form") with two operations:

* :func:`then` ``(a, b)``: ``b`` applied to the output of ``a``;
* :func:`plus` ``(a, b)``: ``a(x) + b(x)`` (smaller and dilated kernels placed in the larger one,
  the identity and average pools as convolutions).

A family declares its block as an expression, e.g. RepVGG
``plus(then(conv3, bn3), then(conv1, bn1), then(identity(), bn_id))``, and
:func:`repvgg_cli.fusion.sum.fuse_branches` computes the one conv it equals, in float64, a few output
channels at a time. Cheap steps stay symbolic (a BN after a conv is a per-row factor, a sum is a
list of terms); a step that needs new weights (a 1×1 conv before a k×k one, a BN before a conv)
is computed here in float64 and enters the sum as a new conv term. Every such step checks that it
is exact (padding, stride, groups) and refuses with the reason otherwise
(:class:`~repvgg_cli.errors.UnsupportedError`).

A value built with such steps is marked ``composite`` and keeps the expression it came from
(``ops``): its check then runs that expression with torch's own ops, not the computed weights.

Tensors in, tensors out: no modules, no IO.

The package: :mod:`.maps` holds the leaves and the two operations (what a family's expression is
written in: ``maps.conv``, ``maps.bn``, ``maps.then``, ``maps.plus``, ...); :mod:`.expression` holds the expression tree a composite value keeps for its check,
:mod:`.compose` the weight-space steps ``then`` and ``plus`` compute (a conv before a conv, an
affine map before a conv, a kernel spread out of its dilation or written with fewer groups).
"""

"""The algebra's laws, stated against torch's own ops (issue 11).

Random expressions over the leaves (conv of any kernel, stride, dilation, groups and bias; eval
BatchNorm; per-channel scale; identity; average pool) and the two operations are built twice: as
an algebra value (:mod:`repvgg_cli.algebra`) and as a plain torch forward written here with
``F.conv2d``, ``F.batch_norm``, ``F.avg_pool2d`` (the unfused train form). Every value the algebra
accepts must be the conv it claims, in float64; every value it refuses must be refused with one of
the documented reasons; and the laws hold: ``plus`` is associative, ``then`` is associative, the
identity is neutral for ``then``.
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from repvgg_cli.algebra import maps
from repvgg_cli.algebra.maps import Map
from repvgg_cli.errors import UnsupportedError
from repvgg_cli.fusion.values import BatchNorm, FusedConv
from repvgg_cli.fusion.sum import fuse_branches

F64 = torch.float64
# scripts/mutate.py runs these laws against every fusion mutant with fewer examples (the variable)
EXAMPLES = int(os.environ.get("REPVGG_ALGEBRA_EXAMPLES", "1000"))

REFUSALS = (
    "is not one conv",
    "is one conv only when",
    "not one conv",
    "different strides",
    "different groups",
    "cannot be centred",
    "does not line up",
    "has dilation",
    "cannot be written with",
    "inputs",
    "outputs",
    "of unknown width",
    "identity branch",
    "only zero-padded",
)
"""What a refusal may say (each names why the composition is not one conv)."""


@dataclass
class Expr:
    """An expression twice over: the algebra's value and the unfused forward it stands for."""

    value: Map
    forward: Callable[[Tensor], Tensor]
    cin: int
    cout: int


def _vec(draw, n: int, low: float, high: float) -> Tensor:
    return torch.tensor(draw(st.lists(st.floats(low, high), min_size=n, max_size=n)), dtype=F64)


@st.composite
def conv_leaf(draw, cin: int, cout: int | None = None, pointwise: bool = False) -> Expr:
    divisors = [g for g in (1, 2, 4) if cin % g == 0 and (cout is None or cout % g == 0)]
    groups = draw(st.sampled_from(divisors))
    if cout is None:
        cout = groups * draw(st.integers(1, 3))
    k = 1 if pointwise else draw(st.sampled_from([1, 3, 5]))
    kw = k if pointwise else draw(st.sampled_from([k, 1, 3]))
    dilation = 1 if pointwise else draw(st.sampled_from([1, 1, 2]))
    stride = 1 if pointwise else draw(st.sampled_from([1, 1, 2]))
    centred = (dilation * (k // 2), dilation * (kw // 2))
    padding = (0, 0) if pointwise else draw(st.sampled_from([centred, centred, (0, 0), (centred[0], 0)]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 10**6)))
    weight = torch.randn(cout, cin // groups, k, kw, generator=gen, dtype=F64)
    bias = torch.randn(cout, generator=gen, dtype=F64) if draw(st.booleans()) else None
    value = maps.conv(weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                         in_channels=cin, known=True)

    def forward(x: Tensor) -> Tensor:
        return F.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)

    return Expr(value, forward, cin, cout)


@st.composite
def affine_leaf(draw, channels: int) -> Expr:
    kind = draw(st.sampled_from(["bn", "bn_plain", "scale", "identity"]))
    if kind == "identity":
        return Expr(maps.identity(channels), lambda x: x, channels, channels)
    if kind == "scale":
        factor = _vec(draw, channels, -2.0, 2.0)
        return Expr(maps.scale(factor), lambda x: x * factor.reshape(1, -1, 1, 1), channels, channels)
    mean, var = _vec(draw, channels, -1.0, 1.0), _vec(draw, channels, 0.1, 3.0)
    weight = _vec(draw, channels, 0.5, 1.5) if kind == "bn" else None
    bias = _vec(draw, channels, -0.5, 0.5) if kind == "bn" else None
    norm = BatchNorm(running_mean=mean, running_var=var, eps=1e-5, weight=weight, bias=bias)

    def forward(x: Tensor) -> Tensor:
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=1e-5)

    return Expr(maps.bn(norm), forward, channels, channels)


@st.composite
def pool_leaf(draw, channels: int) -> Expr:
    k = draw(st.sampled_from([1, 3]))
    value = maps.avg_pool(channels, k, 1, k // 2)
    return Expr(value, lambda x: F.avg_pool2d(x, k, 1, k // 2, count_include_pad=True), channels, channels)


def then_expr(a: Expr, b: Expr, pad_first: bool = False) -> Expr:
    return Expr(maps.then(a.value, b.value, pad_first=pad_first), lambda x: b.forward(a.forward(x)), a.cin, b.cout)


def plus_expr(*terms: Expr) -> Expr:
    def forward(x: Tensor) -> Tensor:
        total = terms[0].forward(x)
        for t in terms[1:]:
            total = total + t.forward(x)
        return total

    return Expr(maps.plus(*(t.value for t in terms)), forward, terms[0].cin, terms[0].cout)


def _fused_forward(fused: FusedConv, x: Tensor) -> Tensor:
    return F.conv2d(x, fused.weight, fused.bias, stride=fused.stride, padding=fused.padding,
                    dilation=fused.dilation, groups=fused.groups)


def assert_exact(expr: Expr, seed: int = 0) -> FusedConv:
    """The algebra's conv computes the unfused forward, every channel at every position."""
    fused = fuse_branches(expr.value)
    x = torch.randn(2, expr.cin, 11, 11, generator=torch.Generator().manual_seed(seed), dtype=F64)
    want = expr.forward(x)
    got = _fused_forward(fused, x)
    assert got.shape == want.shape
    scale = float(want.abs().max()) or 1.0
    assert float((got - want).abs().max()) <= 1e-10 * scale
    return fused


def assert_refusal(error: UnsupportedError) -> None:
    assert any(reason in error.message for reason in REFUSALS), error.message


@st.composite
def expression(draw, depth: int = 2, channels: int | None = None) -> Expr:
    """A random expression whose input has ``channels`` (None: drawn) channels."""
    cin = channels if channels is not None else draw(st.sampled_from([2, 4, 8]))
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        kind = draw(st.sampled_from(["conv", "conv", "affine", "pool"]))
        if kind == "conv":
            return draw(conv_leaf(cin))
        return draw(affine_leaf(cin) if kind == "affine" else pool_leaf(cin))
    op = draw(st.sampled_from(["then", "plus"]))
    first = draw(expression(depth - 1, cin))
    if op == "then":
        second = draw(st.one_of(affine_leaf(first.cout), pool_leaf(first.cout),
                                conv_leaf(first.cout, pointwise=draw(st.booleans()))))
        return then_expr(first, second, pad_first=draw(st.booleans()) and False)
    terms = [first]
    for _ in range(draw(st.integers(1, 2))):
        if first.cout == first.cin and draw(st.booleans()):
            terms.append(draw(st.one_of(affine_leaf(cin), pool_leaf(cin), conv_leaf(cin, first.cout))))
        else:
            terms.append(draw(conv_leaf(cin, first.cout)))
    return plus_expr(*terms)


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(data=st.data())
def test_every_value_the_algebra_accepts_is_the_conv_it_claims_and_refusals_say_why(data) -> None:
    try:
        expr = data.draw(expression())
    except UnsupportedError as error:  # refused while building
        assert_refusal(error)
        return
    try:
        assert_exact(expr)
    except UnsupportedError as error:  # refused when fused (misaligned padding, ...)
        assert_refusal(error)


@SETTINGS
@given(data=st.data())
def test_plus_is_associative(data) -> None:
    cin = data.draw(st.sampled_from([2, 4]))
    cout = cin
    a, b, c = (data.draw(conv_leaf(cin, cout)) for _ in range(3))
    try:
        left = plus_expr(plus_expr(a, b), c)
        right = plus_expr(a, plus_expr(b, c))
        flat = plus_expr(a, b, c)
        fused = [assert_exact(e) for e in (left, right, flat)]
    except UnsupportedError as error:
        assert_refusal(error)
        return
    x = torch.randn(1, cin, 9, 9, dtype=F64)
    outs = [_fused_forward(f, x) for f in fused]
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    assert torch.allclose(outs[0], outs[2], rtol=1e-12, atol=1e-12)


@SETTINGS
@given(data=st.data())
def test_then_is_associative_and_the_identity_is_neutral(data) -> None:
    cin = data.draw(st.sampled_from([2, 4]))
    a = data.draw(st.one_of(conv_leaf(cin), affine_leaf(cin)))
    b = data.draw(st.one_of(affine_leaf(a.cout), conv_leaf(a.cout, pointwise=True)))
    c = data.draw(st.one_of(affine_leaf(b.cout), conv_leaf(b.cout, pointwise=True)))
    try:
        left = then_expr(then_expr(a, b), c)
        right = then_expr(a, then_expr(b, c))
        fused_left, fused_right = assert_exact(left), assert_exact(right)
    except UnsupportedError as error:
        assert_refusal(error)
        return
    x = torch.randn(1, cin, 9, 9, dtype=F64)
    assert torch.allclose(_fused_forward(fused_left, x), _fused_forward(fused_right, x), rtol=1e-12, atol=1e-12)
    ident = Expr(maps.identity(a.cin), lambda t: t, a.cin, a.cin)
    assert_exact(then_expr(ident, a))
    assert_exact(then_expr(a, Expr(maps.identity(a.cout), lambda t: t, a.cout, a.cout)))


# -- the refusals, one by one -------------------------------------------------------------------


def _bn(channels: int, shift: float) -> Map:
    return maps.bn(BatchNorm(running_mean=torch.full((channels,), -shift, dtype=F64),
                                running_var=torch.ones(channels, dtype=F64), eps=0.0))


def test_a_shifted_bn_before_a_padded_conv_is_refused_unless_the_block_pads_first() -> None:
    weight = torch.randn(4, 4, 3, 3, dtype=F64)
    with pytest.raises(UnsupportedError, match="the padded border sees 0"):
        maps.then(_bn(4, 0.5), maps.conv(weight, padding=1, groups=1))
    maps.then(_bn(4, 0.0), maps.conv(weight, padding=1, groups=1))  # no shift: exact
    maps.then(_bn(4, 0.5), maps.conv(weight, padding=0, groups=1))  # no padding: exact
    maps.then(_bn(4, 0.5), maps.conv(weight, padding=1, groups=1), pad_first=True)


def test_a_biased_1x1_before_a_padded_kxk_is_refused_unless_the_block_pads_first() -> None:
    point = maps.conv(torch.randn(4, 4, 1, 1, dtype=F64), torch.ones(4, dtype=F64), padding=0, groups=1)
    wide = maps.conv(torch.randn(4, 4, 3, 3, dtype=F64), padding=1, groups=1)
    with pytest.raises(UnsupportedError, match="gives 0 for a zero input"):
        maps.then(point, wide)
    value = maps.then(point, wide, pad_first=True)  # the border holds the 1x1's output of 0
    x = torch.randn(1, 4, 7, 7, dtype=F64)
    expected = F.conv2d(F.conv2d(F.pad(x, (1, 1, 1, 1)), point.convs[0].weight, point.convs[0].bias),
                        wide.convs[0].weight)
    fused = fuse_branches(value)
    assert torch.allclose(_fused_forward(fused, x), expected, rtol=1e-12, atol=1e-12)


def test_a_strided_conv_before_a_spatial_conv_is_refused() -> None:
    first = maps.conv(torch.randn(4, 4, 3, 3, dtype=F64), stride=2, padding=1, groups=1)
    second = maps.conv(torch.randn(4, 4, 3, 3, dtype=F64), padding=0, groups=1)
    with pytest.raises(UnsupportedError, match="is not one conv"):
        maps.then(first, second)


def test_summed_branches_with_different_strides_are_refused() -> None:
    with pytest.raises(UnsupportedError, match="different strides"):
        maps.plus(maps.conv(torch.randn(4, 4, 3, 3, dtype=F64), stride=2, groups=1),
                     maps.conv(torch.randn(4, 4, 1, 1, dtype=F64), stride=1, groups=1))


def test_misaligned_paddings_are_refused_when_fused() -> None:
    value = maps.plus(maps.conv(torch.randn(4, 4, 3, 3, dtype=F64), padding=1, groups=1),
                         maps.conv(torch.randn(4, 4, 1, 1, dtype=F64), padding=1, groups=1))
    with pytest.raises(UnsupportedError, match="does not line up"):
        fuse_branches(value)


@pytest.mark.parametrize("groups", [(2, 1), (4, 2), (4, 1), (1, 4)])
def test_summed_terms_with_different_groups_are_regrouped_not_refused(groups) -> None:
    """A grouped conv beside a denser one (a depthwise avg pool beside a grouped conv, ...): the
    finer-grouped term is written with the common groups, exactly."""
    gen = torch.Generator().manual_seed(3)
    terms = [Expr(maps.conv(w := torch.randn(8, 8 // g, 3, 3, generator=gen, dtype=F64), groups=g, padding=1),
                  (lambda w, g: lambda x: F.conv2d(x, w, padding=1, groups=g))(w, g), 8, 8) for g in groups]
    fused = assert_exact(plus_expr(*terms, Expr(maps.avg_pool(8, 3, 1, 1),
                                                lambda x: F.avg_pool2d(x, 3, 1, 1), 8, 8)))
    assert fused.groups == min(groups)

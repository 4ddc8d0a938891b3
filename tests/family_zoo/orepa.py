"""Toy models for the `orepa` family: Online Convolutional Re-parameterization (Hu et al., CVPR 2022).

Rewritten for these tests (our own code) from JUGGHM/OREPA_CVPR2022:

- ``blocks.py``: ``OREPA`` (k×k, six branches built in weight space, one post BN), ``OREPA_1x1``,
  ``OREPA_LargeConv`` (k >= 5 from (k-1)/2 stacked weight-only 3×3 ``OREPA``s),
  ``OREPA_LargeConvBase`` (the same from plain 3×3 parameters ``weight0``.. ``weightN``) and their
  ``weight_gen``/``switch_to_deploy``;
- ``blocks_repvgg.py``: ``RepVGGBlock_OREPA`` (``rbr_dense`` an ``OREPA_3x3_RepVGG``, ``rbr_1x1`` a
  ``ConvBN``, ``rbr_identity`` a BN) with deploy attribute ``rbr_reparam``;
- ``basic.py``: ``ConvBN`` (deploy: ``conv`` with a bias);
- ``convnet_utils.py``/``convert.py``: kernel 1 → ``OREPA_1x1``, kernel >= 7 → ``OREPA_LargeConv``,
  else ``OREPA``; every module with ``switch_to_deploy`` is switched, parents first;
- ``dbb_transforms.py``: transI (fold BN) and transVI (centre a 1×1 kernel).

Names, which tensors are parameters and which are buffers, branch conditions and eps (1e-5) follow
upstream. Faithful quirks: ``id_tensor``, ``weight_orepa_avg_avg`` and ``weight_orepa_prior`` are
registered buffers (in the state dict); ``OREPA`` always names its first 1×1 ``..._idconv1``, also
when the internal width is ``2 * in_channels`` (groups > 4); the prior is written only for
``h, w < 3``, so for k > 3 the rest of it is whatever memory held (here: seeded random values, set
by :func:`train_model`); ``OREPA_3x3_RepVGG.vector`` has a sixth, unused row when the block has an
identity branch; ``OREPA_LargeConv`` only works with ``groups == 1`` (its inner OREPAs after the
first are built without groups) and composes its 3×3 kernels by cross-correlating them.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from tests import zoo

EPS = 1e-5
FAMILIES = {"orepa", "orepa_1x1", "orepa_large", "orepa_large_base", "orepa_repvgg", "dbb_convbn"}
"""The families whose blocks this model holds (tests/test_family_contract.py)."""
INPUT_SHAPE = (2, 3, 24, 24)
EXPAND_RATIO = 8  # the depthwise-separable branch's channel multiplier


# -- shared pieces --------------------------------------------------------------------------------


def fold_bn(kernel: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """transI: ``conv(kernel)`` then eval ``bn`` as one conv with bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def center_kernel(kernel: Tensor, kernel_size: int) -> Tensor:
    """transVI: zero-pad a smaller odd kernel to ``kernel_size``, centred."""
    dh = (kernel_size - kernel.shape[2]) // 2
    dw = (kernel_size - kernel.shape[3]) // 2
    return F.pad(kernel, [dw, dw, dh, dh])


def per_out_channel(kernel: Tensor, scale: Tensor) -> Tensor:
    """``einsum('oihw,o->oihw')``: scale each output channel's kernel."""
    return kernel * scale.view(-1, 1, 1, 1)


def grouped_identity(rows: int, in_per_group: int, kernel_size: int = 1) -> Tensor:
    """``K[r, r % in_per_group, centre] = 1`` (float32, as upstream builds it)."""
    kernel = torch.zeros(rows, in_per_group, kernel_size, kernel_size)
    index = torch.arange(rows)
    kernel[index, index % in_per_group, kernel_size // 2, kernel_size // 2] = 1.0
    return kernel


def frequency_prior(out_channels: int, kernel_size: int) -> Tensor:
    """``fre_init``: DCT-like 3×3 patterns, rows by ``h`` for the first half of the channels, by ``w``
    for the rest. Upstream fills only ``h, w < 3`` of its uninitialised tensor; the rest is left at
    zero here (:func:`train_model` overwrites it with seeded random values when k > 3)."""
    prior = torch.zeros(out_channels, kernel_size, kernel_size)
    half = out_channels / 2
    for i in range(out_channels):
        for h in range(3):
            for w in range(3):
                if i < half:
                    prior[i, h, w] = math.cos(math.pi * (h + 0.5) * (i + 1) / 3)
                else:
                    prior[i, h, w] = math.cos(math.pi * (w + 0.5) * (i + 1 - half) / 3)
    return prior


def depthwise_separable_kernel(dw: Tensor, pw: Tensor, in_channels: int, groups: int = 1) -> Tensor:
    """``dwsc2full``: a depthwise k×k conv (``EXPAND_RATIO`` outputs per input channel) then a
    grouped 1×1 conv, as one grouped k×k kernel of shape ``(out, in/groups, k, k)``.

    Upstream reads the 1×1 weight through ``view(out/groups, groups, in/groups, ratio)``, so the
    pointwise row ``a * groups + c`` lands on output channel ``c * (out/groups) + a``: a fixed row
    permutation when ``groups > 1`` (none when ``groups == 1``).
    """
    ratio, kh, kw = dw.shape[0] // in_channels, dw.shape[2], dw.shape[3]
    out = pw.shape[0]
    in_per_group = in_channels // groups
    taps = dw.reshape(groups, in_per_group, ratio, kh, kw)
    mix = pw.reshape(out // groups, groups, in_per_group, ratio)
    kernel = torch.einsum("cjthw,acjt->cajhw", taps, mix)
    return kernel.reshape(out, in_per_group, kh, kw)


def one_by_one_then_kxk(first: Tensor, second: Tensor, groups: int) -> Tensor:
    """A grouped 1×1 kernel ``(t, i/g, 1, 1)`` then a grouped k×k kernel ``(o, t/g, k, k)``, as one
    kernel ``(o, i/g, k, k)`` (no bias and no padding constant in between: exact in weight space)."""
    mid, in_per_group = first.shape[:2]
    out, mid_per_group, kh, kw = second.shape
    a = first.reshape(groups, mid // groups, in_per_group)
    b = second.reshape(groups, out // groups, mid_per_group, kh, kw)
    return torch.einsum("gti,gothw->goihw", a, b).reshape(out, in_per_group, kh, kw)


def _deploy_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 dilation: int, groups: int, kernel: Tensor, bias: Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=True,
                     device=kernel.device, dtype=kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
    return conv


def _drop(module: nn.Module, names) -> None:
    for name in names:
        if hasattr(module, name):
            delattr(module, name)


class ConvBN(nn.Module):
    """``basic.ConvBN``: ``conv`` (no bias) + ``bn``; deploy: ``conv`` with a bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, deploy: bool = False,
                 nonlinear: nn.Module | None = None) -> None:
        super().__init__()
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              bias=deploy)
        if not deploy:
            self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "bn"):
            return self.nonlinear(self.bn(self.conv(x)))
        return self.nonlinear(self.conv(x))

    def switch_to_deploy(self) -> None:
        if not hasattr(self, "bn"):
            return
        with torch.no_grad():
            kernel, bias = fold_bn(self.conv.weight, self.bn)
        c = self.conv
        fused = _deploy_conv(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                             c.groups, kernel, bias)
        del self.conv, self.bn
        self.conv = fused


# -- OREPA_1x1 ------------------------------------------------------------------------------------


class OREPA_1x1(nn.Module):
    """``blocks.OREPA_1x1`` (groups 1, kernel 1): ``origin * v0 + (conv1 then conv2) * v1``, then ``bn``.

    ``out > in``: ``l2i_conv1`` is ``(in, in)`` initialised to the identity, ``l2i_conv2`` ``(out, in)``;
    otherwise ``l2i_conv1`` is ``(out, in)`` and ``l2i_conv2`` ``(out, out)`` the identity. Both are
    parameters. ``vector`` is ``(2, out)`` (init 1.0 and 0.5). Deploy: ``or1x1_reparam``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, deploy: bool = False,
                 nonlinear: nn.Module | None = None) -> None:
        super().__init__()
        assert groups == 1 and kernel_size == 1 and padding == kernel_size // 2
        self.deploy = deploy
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        if deploy:
            self.or1x1_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                           groups, bias=True)
            return
        self.weight_or1x1_origin = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        init.kaiming_uniform_(self.weight_or1x1_origin, a=1.0)
        if out_channels > in_channels:
            self.weight_or1x1_l2i_conv1 = nn.Parameter(torch.eye(in_channels).view(in_channels, in_channels, 1, 1))
            self.weight_or1x1_l2i_conv2 = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
            init.kaiming_uniform_(self.weight_or1x1_l2i_conv2, a=1.0)
        else:
            self.weight_or1x1_l2i_conv1 = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
            init.kaiming_uniform_(self.weight_or1x1_l2i_conv1, a=1.0)
            self.weight_or1x1_l2i_conv2 = nn.Parameter(torch.eye(out_channels).view(out_channels, out_channels, 1, 1))
        self.vector = nn.Parameter(torch.empty(2, out_channels))
        self.bn = nn.BatchNorm2d(out_channels)
        with torch.no_grad():
            self.vector[0].fill_(1.0)
            self.vector[1].fill_(0.5)

    def weight_gen(self) -> Tensor:
        origin = per_out_channel(self.weight_or1x1_origin, self.vector[0])
        l2i = torch.einsum("ti,ot->oi", self.weight_or1x1_l2i_conv1[:, :, 0, 0],
                           self.weight_or1x1_l2i_conv2[:, :, 0, 0])[:, :, None, None]
        return origin + per_out_channel(l2i, self.vector[1])

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "or1x1_reparam"):
            return self.nonlinear(self.or1x1_reparam(x))
        out = F.conv2d(x, self.weight_gen(), None, self.stride, self.padding, self.dilation, self.groups)
        return self.nonlinear(self.bn(out))

    def switch_to_deploy(self) -> None:
        if hasattr(self, "or1x1_reparam"):
            return
        with torch.no_grad():
            kernel, bias = fold_bn(self.weight_gen(), self.bn)
        self.or1x1_reparam = _deploy_conv(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                          self.padding, self.dilation, self.groups, kernel, bias)
        _drop(self, ("weight_or1x1_origin", "weight_or1x1_l2i_conv1", "weight_or1x1_l2i_conv2", "vector", "bn"))
        self.deploy = True


# -- OREPA ----------------------------------------------------------------------------------------


class OREPA(nn.Module):
    """``blocks.OREPA``: one conv with a generated kernel, then ``bn`` (absent if ``weight_only``).

    Kernel = origin*v0 + avg*v1 + pfir*v2 + 1x1_kxk*v3 + 1x1*v4 + gconv*v5 (``vector`` is
    ``(6, out)``, init 0.25, 0.25, 0, 0.5, 1, 0.5). Internal width of the 1×1→k×k branch:
    ``in_channels`` if groups <= 4 else ``2 * in_channels``; its first 1×1 is always the parameter
    ``weight_orepa_1x1_kxk_idconv1`` (zeros) plus the buffer ``id_tensor``. Deploy: ``orepa_reparam``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1,
                 internal_channels_1x1_3x3: int | None = None, deploy: bool = False,
                 nonlinear: nn.Module | None = None, weight_only: bool = False) -> None:
        super().__init__()
        assert padding == kernel_size // 2
        self.deploy = deploy
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.weight_only = weight_only
        self.kernel_size, self.groups = kernel_size, groups
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding, self.dilation = stride, padding, dilation
        if deploy:
            self.orepa_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                           groups, bias=True)
            return
        k, ig = kernel_size, in_channels // groups

        def param(*shape, a: float) -> nn.Parameter:
            p = nn.Parameter(torch.empty(*shape))
            init.kaiming_uniform_(p, a=a)
            return p

        self.weight_orepa_origin = param(out_channels, ig, k, k, a=0.0)
        self.weight_orepa_avg_conv = param(out_channels, ig, 1, 1, a=0.0)
        self.weight_orepa_pfir_conv = param(out_channels, ig, 1, 1, a=0.0)
        self.register_buffer("weight_orepa_avg_avg", torch.full((k, k), 1.0 / k / k))
        self.weight_orepa_1x1 = param(out_channels, ig, 1, 1, a=0.0)
        internal = internal_channels_1x1_3x3
        if internal is None:
            internal = in_channels if groups <= 4 else 2 * in_channels
        self.weight_orepa_1x1_kxk_idconv1 = nn.Parameter(torch.zeros(internal, ig, 1, 1))
        self.register_buffer("id_tensor", grouped_identity(internal, ig))
        self.weight_orepa_1x1_kxk_conv2 = param(out_channels, internal // groups, k, k, a=0.0)
        self.weight_orepa_gconv_dw = param(in_channels * EXPAND_RATIO, 1, k, k, a=0.0)
        self.weight_orepa_gconv_pw = param(out_channels, in_channels * EXPAND_RATIO // groups, 1, 1, a=0.0)
        self.vector = nn.Parameter(torch.empty(6, out_channels))
        if not weight_only:
            self.bn = nn.BatchNorm2d(out_channels)
        self.register_buffer("weight_orepa_prior", frequency_prior(out_channels, k))
        with torch.no_grad():
            for row, value in enumerate((0.25, 0.25, 0.0, 0.5, 1.0, 0.5)):
                self.vector[row].fill_(value)

    def weight_gen(self) -> Tensor:
        v = self.vector
        origin = per_out_channel(self.weight_orepa_origin, v[0])
        avg = per_out_channel(self.weight_orepa_avg_conv * self.weight_orepa_avg_avg, v[1])
        pfir = per_out_channel(self.weight_orepa_pfir_conv * self.weight_orepa_prior[:, None], v[2])
        first = self.weight_orepa_1x1_kxk_idconv1 + self.id_tensor
        chain = per_out_channel(one_by_one_then_kxk(first, self.weight_orepa_1x1_kxk_conv2, self.groups), v[3])
        one = per_out_channel(center_kernel(self.weight_orepa_1x1, self.kernel_size), v[4])
        gconv = per_out_channel(depthwise_separable_kernel(self.weight_orepa_gconv_dw, self.weight_orepa_gconv_pw,
                                                           self.in_channels, self.groups), v[5])
        return origin + avg + one + chain + pfir + gconv

    def forward(self, x: Tensor | None = None) -> Tensor:
        if hasattr(self, "orepa_reparam"):
            return self.nonlinear(self.orepa_reparam(x))
        weight = self.weight_gen()
        if self.weight_only:
            return weight
        out = F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
        return self.nonlinear(self.bn(out))

    def switch_to_deploy(self) -> None:
        if hasattr(self, "orepa_reparam"):
            return
        with torch.no_grad():
            kernel, bias = fold_bn(self.weight_gen(), self.bn)
        self.orepa_reparam = _deploy_conv(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                          self.padding, self.dilation, self.groups, kernel, bias)
        _drop(self, ("weight_orepa_origin", "weight_orepa_1x1", "weight_orepa_1x1_kxk_conv2", "id_tensor",
                     "weight_orepa_1x1_kxk_idconv1", "weight_orepa_avg_avg", "weight_orepa_avg_conv",
                     "weight_orepa_pfir_conv", "weight_orepa_prior", "weight_orepa_gconv_dw",
                     "weight_orepa_gconv_pw", "bn", "vector"))
        self.deploy = True


# -- large kernels --------------------------------------------------------------------------------


def stack_3x3_kernels(kernels: list[Tensor], groups: int) -> Tensor:
    """Upstream's large-kernel ``weight_gen``: transpose the first 3×3 kernel, cross-correlate it
    (``F.conv2d``, padding 2) with each next one, transpose back: 3 → 5 → 7 ... taps."""
    weight = kernels[0].transpose(0, 1)
    for nxt in kernels[1:]:
        weight = F.conv2d(weight, nxt, groups=groups, padding=2)
    return weight.transpose(0, 1)


class _LargeConv(nn.Module):
    """What ``OREPA_LargeConv`` and ``OREPA_LargeConvBase`` share: geometry, forward, deploy."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 dilation: int, groups: int, nonlinear: nn.Module | None) -> None:
        super().__init__()
        assert kernel_size % 2 == 1 and kernel_size > 3
        self.stride, self.padding, self.groups, self.dilation = stride, padding, groups, dilation
        self.layers = (kernel_size - 1) // 2
        self.kernel_size, self.in_channels, self.out_channels = kernel_size, in_channels, out_channels
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear

    def _deploy_layer(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=True)

    def weight_gen(self) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "or_large_reparam"):
            return self.nonlinear(self.or_large_reparam(x))
        out = F.conv2d(x, self.weight_gen(), None, self.stride, self.padding, self.dilation, self.groups)
        return self.nonlinear(self.bn(out))

    def switch_to_deploy(self) -> None:
        if hasattr(self, "or_large_reparam"):
            return
        with torch.no_grad():
            kernel, bias = fold_bn(self.weight_gen(), self.bn)
        self.or_large_reparam = _deploy_conv(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                             self.padding, self.dilation, self.groups, kernel, bias)
        _drop(self, [f"weight{i}" for i in range(self.layers)] + ["bn"])


class OREPA_LargeConv(_LargeConv):
    """``blocks.OREPA_LargeConv``: ``weight0``..``weight{n-1}`` are weight-only 3×3 ``OREPA`` modules
    (in→out, out→out, ..., out→out; only ``weight0`` gets ``groups``), then ``bn``.
    Deploy: ``or_large_reparam``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 dilation: int = 1, groups: int = 1, deploy: bool = False,
                 nonlinear: nn.Module | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, nonlinear)
        if deploy:
            self.or_large_reparam = self._deploy_layer()
            return
        internal = out_channels
        for i in range(self.layers):
            if i == 0:
                layer = OREPA(in_channels, internal, 3, stride=1, padding=1, groups=groups, weight_only=True)
            elif i == self.layers - 1:
                layer = OREPA(internal, out_channels, 3, stride=stride, padding=1, weight_only=True)
            else:
                layer = OREPA(internal, internal, 3, stride=1, padding=1, weight_only=True)
            setattr(self, f"weight{i}", layer)
        self.bn = nn.BatchNorm2d(out_channels)

    def weight_gen(self) -> Tensor:
        return stack_3x3_kernels([getattr(self, f"weight{i}").weight_gen() for i in range(self.layers)], self.groups)


class OREPA_LargeConvBase(_LargeConv):
    """``blocks.OREPA_LargeConvBase``: plain 3×3 parameters ``weight0``..``weight{n-1}``, then ``bn``.
    Not chosen by upstream's ``choose_blk``; built directly. Deploy: ``or_large_reparam``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 dilation: int = 1, groups: int = 1, deploy: bool = False,
                 nonlinear: nn.Module | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, nonlinear)
        if deploy:
            self.or_large_reparam = self._deploy_layer()
            return
        internal = out_channels
        for i in range(self.layers):
            rows = out_channels if i == self.layers - 1 else internal
            cols = (in_channels if i == 0 else internal) // groups
            weight = nn.Parameter(torch.empty(rows, cols, 3, 3))
            init.kaiming_uniform_(weight, a=math.sqrt(5))
            setattr(self, f"weight{i}", weight)
        self.bn = nn.BatchNorm2d(out_channels)

    def weight_gen(self) -> Tensor:
        return stack_3x3_kernels([getattr(self, f"weight{i}") for i in range(self.layers)], self.groups)


# -- RepVGG-style OREPA ---------------------------------------------------------------------------


class OREPA_3x3_RepVGG(nn.Module):
    """``blocks_repvgg.OREPA_3x3_RepVGG`` (no deploy form of its own; groups 1 in practice).

    Kernel = origin*v0 + avg*v1 + 1x1_kxk*v3 + pfir*v2 + gconv*v4, then ``bn``. No 1×1 branch (the
    enclosing block has ``rbr_1x1``). ``vector`` has 5 rows, 6 when ``in == out and stride == 1``
    (the sixth is never used). ``weight_rbr_gconv_pw`` is ``(out, 8 * in, 1, 1)`` whatever the groups.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1,
                 internal_channels_1x1_3x3: int | None = None, nonlinear: nn.Module | None = None) -> None:
        super().__init__()
        assert padding == kernel_size // 2
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.kernel_size, self.groups = kernel_size, groups
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding, self.dilation = stride, padding, dilation
        k, ig = kernel_size, in_channels // groups

        def param(*shape) -> nn.Parameter:
            p = nn.Parameter(torch.empty(*shape))
            init.kaiming_uniform_(p, a=1.0)
            return p

        if groups >= out_channels:
            raise NotImplementedError("OREPA_3x3_RepVGG needs groups < out_channels")
        self.weight_rbr_origin = param(out_channels, ig, k, k)
        self.weight_rbr_avg_conv = param(out_channels, ig, 1, 1)
        self.weight_rbr_pfir_conv = param(out_channels, ig, 1, 1)
        self.register_buffer("weight_rbr_avg_avg", torch.full((k, k), 1.0 / k / k))
        internal = in_channels if internal_channels_1x1_3x3 is None else internal_channels_1x1_3x3
        if internal == in_channels:
            self.weight_rbr_1x1_kxk_idconv1 = nn.Parameter(torch.zeros(in_channels, ig, 1, 1))
            self.register_buffer("id_tensor", grouped_identity(in_channels, ig))
        else:
            self.weight_rbr_1x1_kxk_conv1 = param(internal, ig, 1, 1)
        self.weight_rbr_1x1_kxk_conv2 = param(out_channels, internal // groups, k, k)
        self.weight_rbr_gconv_dw = param(in_channels * EXPAND_RATIO, 1, k, k)
        self.weight_rbr_gconv_pw = param(out_channels, in_channels * EXPAND_RATIO, 1, 1)
        rows = 6 if (out_channels == in_channels and stride == 1) else 5
        self.vector = nn.Parameter(torch.empty(rows, out_channels))
        self.bn = nn.BatchNorm2d(out_channels)
        self.register_buffer("weight_rbr_prior", frequency_prior(out_channels, k))
        with torch.no_grad():
            self.vector.zero_()
            for row, value in enumerate((0.25, 0.25, 0.0, 0.5, 0.5)):
                self.vector[row].fill_(value)

    def weight_gen(self) -> Tensor:
        v = self.vector
        origin = per_out_channel(self.weight_rbr_origin, v[0])
        avg = per_out_channel(self.weight_rbr_avg_conv * self.weight_rbr_avg_avg, v[1])
        pfir = per_out_channel(self.weight_rbr_pfir_conv * self.weight_rbr_prior[:, None], v[2])
        if hasattr(self, "weight_rbr_1x1_kxk_idconv1"):
            first = self.weight_rbr_1x1_kxk_idconv1 + self.id_tensor
        else:
            first = self.weight_rbr_1x1_kxk_conv1
        chain = per_out_channel(one_by_one_then_kxk(first, self.weight_rbr_1x1_kxk_conv2, self.groups), v[3])
        gconv = per_out_channel(depthwise_separable_kernel(self.weight_rbr_gconv_dw, self.weight_rbr_gconv_pw,
                                                           self.in_channels), v[4])
        return origin + avg + chain + pfir + gconv

    def forward(self, x: Tensor) -> Tensor:
        out = F.conv2d(x, self.weight_gen(), None, self.stride, self.padding, self.dilation, self.groups)
        return self.nonlinear(self.bn(out))


class RepVGGBlock_OREPA(nn.Module):
    """``blocks_repvgg.RepVGGBlock_OREPA``: ``rbr_dense`` (OREPA_3x3_RepVGG) + ``rbr_1x1`` (ConvBN)
    + ``rbr_identity`` (BN, when in == out and stride 1), then ``se`` (Identity), then
    ``nonlinearity`` (ReLU). Deploy: ``rbr_reparam``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, deploy: bool = False,
                 nonlinear: nn.Module | None = None) -> None:
        super().__init__()
        assert kernel_size == 3 and padding == 1
        self.deploy = deploy
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.padding, self.dilation = padding, dilation
        self.nonlinearity = nn.ReLU() if nonlinear is None else nonlinear
        self.se = nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                         bias=True)
            return
        has_identity = out_channels == in_channels and stride == 1
        self.rbr_identity = nn.BatchNorm2d(in_channels) if has_identity else None
        self.rbr_dense = OREPA_3x3_RepVGG(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
        self.rbr_1x1 = ConvBN(in_channels, out_channels, 1, stride, padding - kernel_size // 2, groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(x)))
        identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + identity))

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = fold_bn(self.rbr_dense.weight_gen(), self.rbr_dense.bn)
        k1, b1 = fold_bn(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        kernel, bias = kernel + center_kernel(k1, 3), bias + b1
        if self.rbr_identity is not None:
            ident = grouped_identity(self.in_channels, self.in_channels // self.groups, 3).to(kernel)
            ki, bi = fold_bn(ident, self.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        return kernel, bias

    def switch_to_deploy(self) -> None:
        if hasattr(self, "rbr_reparam"):
            return
        with torch.no_grad():
            kernel, bias = self.get_equivalent_kernel_bias()
        d = self.rbr_dense
        self.rbr_reparam = _deploy_conv(d.in_channels, d.out_channels, d.kernel_size, d.stride, d.padding,
                                        d.dilation, d.groups, kernel, bias)
        _drop(self, ("rbr_dense", "rbr_1x1", "rbr_identity"))
        self.deploy = True


# -- the toy model --------------------------------------------------------------------------------


class OREPANet(nn.Module):
    """Every OREPA block layout on a 24×24 input (ResNet stem, RepVGG stage, MobileNet-style dw).

    ``stem``: OREPA_LargeConv 7×7, 3→8, stride 2; ``orepa``: 3×3 dense; ``expand``: OREPA_1x1 8→16
    (out > in); ``grouped_s2``: 3×3, groups 2, stride 2; ``depthwise``: 3×3, groups 16 (> 4, so
    internal 32); ``k5``: 5×5, 16→12 (prior beyond 3×3 arbitrary); ``reduce``: OREPA_1x1 12→8,
    stride 2 (out <= in); ``large_base``: OREPA_LargeConvBase 5×5; ``repvgg_id``: RepVGGBlock_OREPA
    with identity; ``repvgg_s2``: without (stride 2, 8→16); ``shortcut``: 1×1 ConvBN.
    """

    def __init__(self, deploy: bool = False, num_classes: int = 10) -> None:
        super().__init__()
        d = deploy
        self.body = nn.Sequential(OrderedDict([
            ("stem", OREPA_LargeConv(3, 8, 7, stride=2, padding=3, deploy=d, nonlinear=nn.ReLU())),   # 24 -> 12
            ("orepa", OREPA(8, 8, 3, 1, 1, deploy=d, nonlinear=nn.ReLU())),
            ("expand", OREPA_1x1(8, 16, deploy=d, nonlinear=nn.ReLU())),
            ("grouped_s2", OREPA(16, 16, 3, 2, 1, groups=2, deploy=d, nonlinear=nn.ReLU())),        # 12 -> 6
            ("depthwise", OREPA(16, 16, 3, 1, 1, groups=16, deploy=d, nonlinear=nn.ReLU())),
            ("k5", OREPA(16, 12, 5, 1, 2, deploy=d)),
            ("reduce", OREPA_1x1(12, 8, stride=2, deploy=d, nonlinear=nn.ReLU())),                 # 6 -> 3
            ("large_base", OREPA_LargeConvBase(8, 8, 5, 1, 2, deploy=d)),
            ("repvgg_id", RepVGGBlock_OREPA(8, 8, 3, 1, 1, deploy=d)),
            ("repvgg_s2", RepVGGBlock_OREPA(8, 16, 3, 2, 1, deploy=d)),                            # 3 -> 2
            ("shortcut", ConvBN(16, 16, 1, deploy=d)),
        ]))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean((2, 3)))


def randomize_constants(model: nn.Module, seed: int) -> nn.Module:
    """Give every constant-initialised OREPA tensor random values (in place): ``vector``, the
    zero ``..._idconv1`` parameters, the identity ``l2i`` parameters of ``OREPA_1x1`` and the
    prior entries upstream leaves uninitialised (k > 3). Buffers upstream fills (``id_tensor``,
    ``..._avg_avg``, the 3×3 part of the prior) keep upstream's values."""
    generator = torch.Generator().manual_seed(seed)

    def noise(t: Tensor, scale: float) -> Tensor:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype) * scale

    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if name == "vector":
                    param.copy_(noise(param, 0.4) + 0.5)
                elif name.endswith("_idconv1"):
                    param.copy_(noise(param, 0.2))
                elif name in ("weight_or1x1_l2i_conv1", "weight_or1x1_l2i_conv2") and param.shape[0] == param.shape[1]:
                    param.add_(noise(param, 0.2))
            for name, buf in module.named_buffers(recurse=False):
                if name.endswith("_prior") and buf.shape[-1] > 3:
                    unset = torch.ones_like(buf, dtype=torch.bool)
                    unset[:, :3, :3] = False
                    buf[unset] = noise(buf, 0.5)[unset]
    return model


def train_model() -> nn.Module:
    """The train form, seeded: random weights, BN statistics and affine, and constants (see above)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2022)
        model = OREPANet()
    zoo.randomize_bn(model, seed=23)
    randomize_constants(model, seed=24)
    return model.eval()


def deploy_model() -> nn.Module:
    return OREPANet(deploy=True).eval()


def upstream_deploy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every block switched as upstream's ``convert.py`` does (a
    parent first; the children it replaces are never visited)."""
    converted = copy.deepcopy(model)

    def switch(module: nn.Module) -> None:
        if hasattr(module, "switch_to_deploy"):
            module.switch_to_deploy()
        for child in list(module.children()):
            switch(child)

    switch(converted)
    return converted.eval()

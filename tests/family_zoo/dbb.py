"""Toy models for the `dbb` family: Diverse Branch Block (Ding et al., CVPR 2021).

Rewritten for these tests (our own code) from DingXiaoH/DiverseBranchBlock:

- ``diversebranchblock.py``: ``DiverseBranchBlock``, ``IdentityBasedConv1x1``, ``BNAndPadLayer``
  and the plain ``conv_bn`` Sequential (``conv``/``bn``) used for ``dbb_origin`` and ``dbb_1x1``;
- ``dbb_transforms.py``: the deploy math (transI fold BN, transII add branches, transIII 1×1 then
  k×k per group, transIV concat groups, transV avg-pool as a kernel, transVI centre a small kernel);
- ``convnet_utils.py``: ``ConvBN`` (deploy form: ``conv`` with a bias, ``bn`` gone) and
  ``conv_bn``/``conv_bn_relu`` (kernel 1 or >= 7 always stays a ``ConvBN``);
- ``convert.py``: every module that has ``switch_to_deploy`` is switched, parents first;
- ``mobilenet.py``: depthwise DBB (``groups == in == out``), pointwise ``ConvBN``.

Attribute names, branch conditions, defaults and eps (1e-5 everywhere) follow upstream.

Faithful quirks: ``IdentityBasedConv1x1.id_tensor`` is a plain attribute, so it is not in the
state dict; ``BNAndPadLayer`` keeps its BN as ``.bn`` (keys ``...bn.bn.weight`` and
``...bn1.bn.weight``); the depthwise form (``groups >= out_channels``) has no ``dbb_1x1`` and no
``dbb_avg.conv``/``dbb_avg.bn``, and its 1×1→k×k branch uses ``conv1`` with ``2 * in_channels``
internal channels. One deliberate difference: upstream's transV builds the 1/k² kernel in float32
whatever the model's dtype; here it is built in the kernel's dtype so float64 checks stay exact.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests import zoo

EPS = 1e-5
FAMILIES = {"dbb", "dbb_convbn"}
"""The families whose blocks this model holds (tests/test_family_contract.py)."""
INPUT_SHAPE = (2, 3, 16, 16)


# -- upstream's building blocks ------------------------------------------------------------------


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
            dilation: int = 1, groups: int = 1) -> nn.Sequential:
    """``diversebranchblock.conv_bn``: a Sequential of ``conv`` (no bias) and ``bn``."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                     groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(out_channels))
    return seq


def grouped_identity(channels: int, groups: int, kernel_size: int = 1, dtype=torch.float32) -> Tensor:
    """The kernel of the identity map for a conv with ``groups``: ``K[c, c % (C/g), centre] = 1``."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=dtype)
    rows = torch.arange(channels)
    kernel[rows, rows % per_group, kernel_size // 2, kernel_size // 2] = 1.0
    return kernel


class IdentityBasedConv1x1(nn.Conv2d):
    """A 1×1 conv whose effective kernel is ``weight + identity``; ``weight`` starts at zero.

    ``id_tensor`` is a plain attribute as upstream has it: not a buffer, not in the state dict,
    not cast by ``.double()`` (adding it to a float64 weight promotes exactly: it holds 0 and 1).
    """

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        assert channels % groups == 0
        self.id_tensor = grouped_identity(channels, groups, dtype=self.weight.dtype)
        nn.init.zeros_(self.weight)

    def get_actual_kernel(self) -> Tensor:
        return self.weight + self.id_tensor.to(self.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.get_actual_kernel(), None, stride=1, padding=0, dilation=self.dilation,
                        groups=self.groups)


class BNAndPadLayer(nn.Module):
    """BN, then ``pad_pixels`` of border filled per channel with what the eval BN makes of a zero.

    The fill always uses the running statistics (also in train mode, as upstream does), so in
    eval mode the layer equals ``BN(zero-pad(x))``: that is what lets the following k×k conv
    (padding 0) fold into a single conv with padding ``pad_pixels``.
    """

    def __init__(self, pad_pixels: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def border_value(self) -> Tensor:
        bn = self.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.affine:
            return bn.bias.detach() - bn.running_mean * bn.weight.detach() * scale
        return -bn.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(x)
        p = self.pad_pixels
        if p <= 0:
            return out
        n, c, h, w = out.shape
        framed = self.border_value().to(out.dtype).view(1, c, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
        framed[:, :, p:p + h, p:p + w] = out
        return framed

    @property
    def weight(self) -> Tensor:
        return self.bn.weight

    @property
    def bias(self) -> Tensor:
        return self.bn.bias

    @property
    def running_mean(self) -> Tensor:
        return self.bn.running_mean

    @property
    def running_var(self) -> Tensor:
        return self.bn.running_var

    @property
    def eps(self) -> float:
        return self.bn.eps


# -- upstream's deploy math (dbb_transforms.py), our own code -------------------------------------


def fold_bn(kernel: Tensor, bn) -> tuple[Tensor, Tensor]:
    """transI: ``conv(kernel)`` then eval ``bn`` as one conv with bias (``bn`` needs ``affine``)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def merge_1x1_kxk(k1: Tensor, b1: Tensor, k2: Tensor, b2: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """transIII/IV: a grouped 1×1 conv (k1, b1) then a grouped k×k conv (k2, b2), as one conv.

    Exact only because the k×k conv sees the 1×1 output padded with ``b1`` (BNAndPadLayer), so the
    bias of the first conv reaches every tap: ``b = b2 + sum_{t,h,w} k2[o,t,h,w] * b1[t]``.
    """
    mid, in_per_group = k1.shape[:2]
    out, mid_per_group, kh, kw = k2.shape
    first = k1.reshape(groups, mid // groups, in_per_group)
    second = k2.reshape(groups, out // groups, mid_per_group, kh, kw)
    kernel = torch.einsum("gti,gothw->goihw", first, second).reshape(out, in_per_group, kh, kw)
    bias = torch.einsum("gothw,gt->go", second, b1.reshape(groups, mid // groups)).reshape(out)
    return kernel, bias + b2


def avg_kernel(channels: int, kernel_size: int, groups: int, like: Tensor) -> Tensor:
    """transV: a k×k average pool on each channel as a conv kernel with ``groups``."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=like.dtype, device=like.device)
    rows = torch.arange(channels)
    kernel[rows, rows % per_group] = 1.0 / kernel_size ** 2
    return kernel


def center_kernel(kernel: Tensor, kernel_size: int) -> Tensor:
    """transVI: zero-pad a smaller odd kernel to ``kernel_size``, centred."""
    dh = (kernel_size - kernel.shape[2]) // 2
    dw = (kernel_size - kernel.shape[3]) // 2
    return F.pad(kernel, [dw, dw, dh, dh])


def _deploy_conv_like(conv: nn.Conv2d, kernel: Tensor, bias: Tensor) -> nn.Conv2d:
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, device=kernel.device, dtype=kernel.dtype)
    with torch.no_grad():
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
    return fused


# -- the blocks ---------------------------------------------------------------------------------


class DiverseBranchBlock(nn.Module):
    """``diversebranchblock.DiverseBranchBlock``: four branches summed, then ``nonlinear``.

    ``groups < out_channels`` (dense/grouped): ``dbb_origin``, ``dbb_1x1``, ``dbb_avg`` =
    ``conv`` 1×1 → ``bn`` (BNAndPadLayer, pad k//2) → ``avg`` (k, stride, pad 0) → ``avgbn``, and
    ``dbb_1x1_kxk``. Otherwise (depthwise): no ``dbb_1x1``; ``dbb_avg`` = ``avg`` (k, stride, pad
    k//2, zeros counted) → ``avgbn``. ``internal_channels_1x1_3x3`` defaults to ``in_channels``
    (dense) or ``2 * in_channels`` (depthwise); equal to ``in_channels`` gives ``idconv1``, else a
    plain ``conv1``. Deploy form: ``dbb_reparam`` (conv with bias).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1,
                 internal_channels_1x1_3x3: int | None = None, deploy: bool = False,
                 nonlinear: nn.Module | None = None) -> None:
        super().__init__()
        self.deploy = deploy
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.kernel_size = kernel_size
        self.out_channels = out_channels
        self.groups = groups
        assert padding == kernel_size // 2
        if deploy:
            self.dbb_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                         groups, bias=True)
            return
        self.dbb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        dense = groups < out_channels
        self.dbb_avg = nn.Sequential()
        if dense:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups,
                                                      bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(padding, out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, 0))
            self.dbb_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups=groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))

        internal = internal_channels_1x1_3x3
        if internal is None:
            internal = in_channels if dense else 2 * in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal, 1, 1, 0, groups=groups,
                                                           bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(padding, internal))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, out_channels, kernel_size, stride, 0,
                                                       groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """Upstream's sum, in its order: origin + 1×1 + 1×1→k×k + avg."""
        k, g = self.kernel_size, self.groups
        terms = [fold_bn(self.dbb_origin.conv.weight, self.dbb_origin.bn)]
        if hasattr(self, "dbb_1x1"):
            kernel, bias = fold_bn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            terms.append((center_kernel(kernel, k), bias))
        seq = self.dbb_1x1_kxk
        first = seq.idconv1.get_actual_kernel() if hasattr(seq, "idconv1") else seq.conv1.weight
        terms.append(merge_1x1_kxk(*fold_bn(first, seq.bn1), *fold_bn(seq.conv2.weight, seq.bn2), groups=g))
        avgbn = self.dbb_avg.avgbn
        pooled = fold_bn(avg_kernel(self.out_channels, k, g, like=avgbn.running_mean), avgbn)
        if hasattr(self.dbb_avg, "conv"):
            terms.append(merge_1x1_kxk(*fold_bn(self.dbb_avg.conv.weight, self.dbb_avg.bn), *pooled, groups=g))
        else:
            terms.append(pooled)
        return sum(t[0] for t in terms), sum(t[1] for t in terms)

    def switch_to_deploy(self) -> None:
        if hasattr(self, "dbb_reparam"):
            return
        with torch.no_grad():
            kernel, bias = self.get_equivalent_kernel_bias()
        self.dbb_reparam = _deploy_conv_like(self.dbb_origin.conv, kernel, bias)
        for name in ("dbb_origin", "dbb_avg", "dbb_1x1", "dbb_1x1_kxk"):
            if hasattr(self, name):
                delattr(self, name)
        self.deploy = True

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "dbb_reparam"):
            return self.nonlinear(self.dbb_reparam(x))
        out = self.dbb_origin(x)
        if hasattr(self, "dbb_1x1"):
            out = out + self.dbb_1x1(x)
        out = out + self.dbb_avg(x)
        out = out + self.dbb_1x1_kxk(x)
        return self.nonlinear(out)


class ConvBN(nn.Module):
    """``convnet_utils.ConvBN``: ``conv`` (no bias) + ``bn``; deploy: ``conv`` with a bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 dilation: int, groups: int, deploy: bool = False, nonlinear: nn.Module | None = None) -> None:
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
        fused = _deploy_conv_like(self.conv, kernel, bias)
        del self.conv, self.bn
        self.conv = fused


# -- the toy model --------------------------------------------------------------------------------


class DBBNet(nn.Module):
    """Every DBB layout upstream can build, plus ConvBN layers, on a 16×16 input.

    ``stem``: dense 3→8, stride 2, idconv1 (internal = in = 3); ``depthwise``: MobileNet's
    depthwise (groups = 8 = channels, avg-only, conv1 with 16 internal); ``pointwise``: 1×1
    ConvBN; ``grouped5``: 5×5, groups 2, grouped idconv1; ``depthwise_s2``: strided depthwise;
    ``wide_internal``: dense with an explicit internal width (conv1 in the dense layout);
    ``kernel1``: a 1×1 DBB (only by direct construction upstream); ``conv3``: 3×3 ConvBN;
    ``grouped_s2``: groups 4, 8→16, stride 2.
    """

    def __init__(self, deploy: bool = False, num_classes: int = 10) -> None:
        super().__init__()
        d = deploy
        self.body = nn.Sequential(OrderedDict([
            ("stem", DiverseBranchBlock(3, 8, 3, stride=2, padding=1, deploy=d, nonlinear=nn.ReLU())),     # 16 -> 8
            ("depthwise", DiverseBranchBlock(8, 8, 3, 1, 1, groups=8, deploy=d, nonlinear=nn.ReLU())),
            ("pointwise", ConvBN(8, 16, 1, 1, 0, 1, 1, deploy=d, nonlinear=nn.ReLU())),
            ("grouped5", DiverseBranchBlock(16, 16, 5, 1, 2, groups=2, deploy=d)),
            ("depthwise_s2", DiverseBranchBlock(16, 16, 3, 2, 1, groups=16, deploy=d, nonlinear=nn.ReLU())),  # 8 -> 4
            ("wide_internal", DiverseBranchBlock(16, 8, 3, 1, 1, internal_channels_1x1_3x3=24, deploy=d,
                                                 nonlinear=nn.ReLU())),
            ("kernel1", DiverseBranchBlock(8, 8, 1, 1, 0, deploy=d)),
            ("conv3", ConvBN(8, 8, 3, 1, 1, 1, 1, deploy=d, nonlinear=nn.ReLU())),
            ("grouped_s2", DiverseBranchBlock(8, 16, 3, 2, 1, groups=4, deploy=d)),                          # 4 -> 2
        ]))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean((2, 3)))


def train_model() -> nn.Module:
    """The train form, seeded: random weights, random BN statistics and affine, random idconv1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2021)
        model = DBBNet()
    zoo.randomize_bn(model, seed=21)
    generator = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, IdentityBasedConv1x1):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.3)
    return model.eval()


def deploy_model() -> nn.Module:
    return DBBNet(deploy=True).eval()


def upstream_deploy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every block switched as upstream's ``convert.py`` does."""
    converted = copy.deepcopy(model)

    def switch(module: nn.Module) -> None:
        if hasattr(module, "switch_to_deploy"):
            module.switch_to_deploy()
        for child in list(module.children()):
            switch(child)

    switch(converted)
    return converted.eval()

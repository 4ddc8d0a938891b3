"""A tiny YOLOv6 detector in meituan/YOLOv6's own module tree, train and deploy form.

Written for these tests from the attribute names, forward order and deploy math of meituan/YOLOv6
(commit e86a483, 2024-03): ``yolov6/layers/common.py`` (ConvModule, ConvBNReLU/ConvBNSiLU/ConvBN,
Transpose, SPPFModule/SimSPPF/SPPF, CSPSPPFModule/SimCSPSPPF, RepVGGBlock, QARepVGGBlock,
QARepVGGBlockV2, RepBlock, BottleRep, BepC3, get_block), ``yolov6/models/efficientrep.py``
(EfficientRep, CSPBepBackbone), ``yolov6/models/reppan.py`` (RepPANNeck, CSPRepPANNeck),
``yolov6/models/effidehead.py`` (Detect, build_effidehead_layer), ``yolov6/models/yolo.py`` (Model),
``yolov6/utils/torch_utils.py`` (initialize_weights, fuse_conv_and_bn, fuse_model),
``yolov6/utils/checkpoint.py`` (load_checkpoint, strip_optimizer), ``yolov6/core/engine.py``
(the training checkpoint) and the deploy scripts (``deploy/ONNX/export_onnx.py``,
``yolov6/core/evaler.py``, ``yolov6/core/inferer.py``). No upstream code is copied.

State-dict keys therefore read as in YOLOv6: ``backbone.stem.rbr_dense.conv.weight``,
``backbone.ERBlock_2.1.conv1.rbr_identity.running_var``, ``neck.reduce_layer0.block.conv.weight``,
``neck.upsample0.upsample_transpose.weight``, ``neck.Rep_p4.conv1.rbr_1x1.conv.weight``,
``detect.stems.0.block.bn.running_mean``, ``detect.cls_preds.0.weight``, ``detect.proj`` ...

YOLOv6's deploy path (every exporter, the evaluator and the inferer) is: ``load_checkpoint`` takes
``ckpt['ema']`` if truthy else ``ckpt['model']``, calls ``.float()``, then ``fuse_model`` (every
``ConvModule`` that still has ``bn``: conv+BN folded into a new biased conv, ``bn`` deleted,
``forward = forward_fuse``), ``.eval()``, and only then ``switch_to_deploy()`` on every module that
``isinstance(m, RepVGGBlock)`` (QARepVGGBlock and QARepVGGBlockV2 are subclasses). The order is
required: ``RepVGGBlock``'s kernel/bias code takes ``rbr_dense`` and ``rbr_1x1`` (both
``ConvModule``) as ``(conv.weight, conv.bias)``, i.e. it expects their BN already folded; without
``fuse_model`` first it fails (``None + None``). Only the identity BN is folded by the block itself.

Deviations from upstream, all for the tests' sake and named here:
- ``deploy=True`` / ``fused=True`` constructor flags build the deploy form directly (upstream only
  reaches it by converting a trained model; its ``QARepVGGBlock(deploy=True)`` has no ``bn``).
- The fused conv (``fuse_conv_and_bn``), the identity kernel and V2's average-pool kernel are made
  in the source weight's dtype; upstream makes them in torch's default dtype (float32; exact for
  the 0/1 identity kernel, not for 1/9 or the fused conv) -- harmless there because
  ``load_checkpoint`` runs ``.float()`` first, but it would break float64 checks here.
- Activations are fresh module instances (upstream shares one instance per type from a table).
- ``Detect.forward`` returns the per-level regression distances and class scores, concatenated,
  without anchor decoding (upstream decodes boxes with ``generate_anchors``/``dist2bbox``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests import zoo

EPS = 1e-3
MOMENTUM = 0.03
INPUT_SHAPE = (2, 3, 64, 64)
NUM_CLASSES = 3
REG_MAX = 4
# YOLOv6's ``channels_list``: 5 backbone widths then 6 neck widths (after width_multiple and
# make_divisible in upstream). Backbone widths strictly increase as in every YOLOv6 config, so each
# strided block changes width and "in == out" marks exactly the stride-1 square blocks.
CHANNELS = (8, 16, 24, 32, 40, 16, 8, 8, 16, 16, 32)
# YOLOv6's ``num_repeats`` after depth_multiple: index 0 is the stem, 1-4 backbone, 5-8 neck.
REPEATS = (1, 2, 1, 2, 1, 2, 1, 1, 2)

# Tiny builds: YOLOv6-n/s style (RepVGGBlock, EfficientRep + RepPANNeck), the same with the v3
# ``cspsppf`` merge layer, the QARepVGG configs (``configs/qarepvgg``: training_mode
# 'qarepvggv2'; 'qarepvgg' also exists), and YOLOv6-m style CSP builds (CSPBepBackbone +
# CSPRepPANNeck with BepC3 / BottleRep stages).
VARIANTS: dict[str, dict] = {
    "repvgg": dict(block="repvgg"),
    "repvgg_cspsppf": dict(block="repvgg", cspsppf=True),
    "qarepvgg": dict(block="qarepvgg"),
    "qarepvggv2": dict(block="qarepvggv2", cspsppf=True),
    "csp_repvgg": dict(block="repvgg", csp=True),
    "csp_qarepvggv2": dict(block="qarepvggv2", csp=True, cspsppf=True),
}


def _activation(kind: str | None) -> nn.Module | None:
    table = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish}
    return None if kind is None else table[kind]()


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return scale, bn.bias - bn.running_mean * scale


def _identity_kernel(channels: int, groups: int, k: int, like: Tensor) -> Tensor:
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, k, k, dtype=like.dtype, device=like.device)
    kernel[torch.arange(channels), torch.arange(channels) % per_group, k // 2, k // 2] = 1.0
    return kernel


# -- layers ---------------------------------------------------------------------------------------


class ConvModule(nn.Module):
    """Conv2d + BN (+ activation): ``conv``, ``bn``, ``act`` (absent when activation_type is None)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 activation_type: str | None, padding: int | None = None, groups: int = 1,
                 bias: bool = False, fused: bool = False) -> None:
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                              bias=bias or fused)
        if not fused:
            self.bn = nn.BatchNorm2d(out_channels)
        if activation_type is not None:
            self.act = _activation(activation_type)
        self.activation_type = activation_type
        if fused:
            self.forward = self.forward_fuse

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return y if self.activation_type is None else self.act(y)

    def forward_fuse(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y if self.activation_type is None else self.act(y)


class _Wrapped(nn.Module):
    """YOLOv6's ConvBN* classes hold their ConvModule as ``block`` (keys ``X.block.conv.weight``)."""

    activation_type: str | None = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1, bias: bool = False, fused: bool = False) -> None:
        super().__init__()
        self.block = ConvModule(in_channels, out_channels, kernel_size, stride, self.activation_type,
                                padding, groups, bias, fused)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class ConvBNReLU(_Wrapped):
    activation_type = "relu"


class ConvBNSiLU(_Wrapped):
    activation_type = "silu"


class ConvBN(_Wrapped):
    activation_type = None


class Transpose(nn.Module):
    """The neck's learned 2x upsampling: ``upsample_transpose`` (ConvTranspose2d k2 s2, biased)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2) -> None:
        super().__init__()
        self.upsample_transpose = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.upsample_transpose(x)


class SPPFModule(nn.Module):
    """``cv1`` (1x1, half width), three chained max-pools ``m``, ``cv2`` on the 4-way concat."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, block: type = ConvBNReLU,
                 fused: bool = False) -> None:
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = block(in_channels, hidden, 1, 1, fused=fused)
        self.cv2 = block(hidden * 4, out_channels, 1, 1, fused=fused)
        self.m = nn.MaxPool2d(kernel_size, 1, kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        p1 = self.m(x)
        p2 = self.m(p1)
        return self.cv2(torch.cat([x, p1, p2, self.m(p2)], 1))


class SimSPPF(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, fused: bool = False) -> None:
        super().__init__()
        self.sppf = SPPFModule(in_channels, out_channels, kernel_size, ConvBNReLU, fused)

    def forward(self, x: Tensor) -> Tensor:
        return self.sppf(x)


class SPPF(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, fused: bool = False) -> None:
        super().__init__()
        self.sppf = SPPFModule(in_channels, out_channels, kernel_size, ConvBNSiLU, fused)

    def forward(self, x: Tensor) -> Tensor:
        return self.sppf(x)


class CSPSPPFModule(nn.Module):
    """``cv1``..``cv7`` around the pooled branch, as YOLOv6 v3's ``cspsppf`` merge layer."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, e: float = 0.5,
                 block: type = ConvBNReLU, fused: bool = False) -> None:
        super().__init__()
        hidden = int(out_channels * e)
        self.cv1 = block(in_channels, hidden, 1, 1, fused=fused)
        self.cv2 = block(in_channels, hidden, 1, 1, fused=fused)
        self.cv3 = block(hidden, hidden, 3, 1, fused=fused)
        self.cv4 = block(hidden, hidden, 1, 1, fused=fused)
        self.m = nn.MaxPool2d(kernel_size, 1, kernel_size // 2)
        self.cv5 = block(4 * hidden, hidden, 1, 1, fused=fused)
        self.cv6 = block(hidden, hidden, 3, 1, fused=fused)
        self.cv7 = block(2 * hidden, out_channels, 1, 1, fused=fused)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.cv4(self.cv3(self.cv1(x)))
        p1 = self.m(x1)
        p2 = self.m(p1)
        pooled = self.cv6(self.cv5(torch.cat([x1, p1, p2, self.m(p2)], 1)))
        return self.cv7(torch.cat([self.cv2(x), pooled], 1))


class SimCSPSPPF(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, e: float = 0.5,
                 fused: bool = False) -> None:
        super().__init__()
        self.cspsppf = CSPSPPFModule(in_channels, out_channels, kernel_size, e, ConvBNReLU, fused)

    def forward(self, x: Tensor) -> Tensor:
        return self.cspsppf(x)


# -- re-parameterizable blocks --------------------------------------------------------------------


class RepVGGBlock(nn.Module):
    """``rbr_dense`` / ``rbr_1x1`` (ConvModule, no act), ``rbr_identity`` (BN or None), ``se``, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1, deploy: bool = False) -> None:
        super().__init__()
        if kernel_size != 3 or padding != 1:
            raise ValueError("YOLOv6's RepVGGBlock is 3x3 with padding 1")
        self.deploy = deploy
        self.groups = groups
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                         groups, bias=True)
        else:
            square = in_channels == out_channels and stride == 1
            self.rbr_identity = nn.BatchNorm2d(in_channels) if square else None
            self.rbr_dense = ConvModule(in_channels, out_channels, kernel_size, stride, None, padding, groups)
            self.rbr_1x1 = ConvModule(in_channels, out_channels, 1, stride, None, padding - kernel_size // 2,
                                      groups)

    def _branch_sum(self, x: Tensor) -> Tensor:
        total = self.rbr_dense(x) + self.rbr_1x1(x)
        return total if self.rbr_identity is None else total + self.rbr_identity(x)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(x)))
        return self.nonlinearity(self.se(self._branch_sum(x)))

    def _kernel_bias_of(self, branch):
        """YOLOv6's per-branch rule: a ConvModule gives its conv's (weight, bias) as they stand."""
        if branch is None:
            return 0, 0
        if isinstance(branch, ConvModule):
            return branch.conv.weight, branch.conv.bias
        scale, shift = _bn_scale_shift(branch)
        kernel = _identity_kernel(self.in_channels, self.groups, 3, branch.weight)
        return kernel * scale.reshape(-1, 1, 1, 1), shift

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        k3, b3 = self._kernel_bias_of(self.rbr_dense)
        k1, b1 = self._kernel_bias_of(self.rbr_1x1)
        kid, bid = self._kernel_bias_of(self.rbr_identity)
        return k3 + F.pad(k1, [1, 1, 1, 1]) + kid, b3 + b1 + bid

    def _install_reparam(self, kernel: Tensor, bias: Tensor) -> None:
        conv = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                     conv.padding, conv.dilation, conv.groups, bias=True)
        self.rbr_reparam.weight.data = kernel
        self.rbr_reparam.bias.data = bias  # a TypeError here (bias None) means fuse_model was not run
        for p in self.parameters():
            p.detach_()
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity", "rbr_avg", "id_tensor"):
            if hasattr(self, name):
                delattr(self, name)
        self.deploy = True

    def switch_to_deploy(self) -> None:
        if hasattr(self, "rbr_reparam"):
            return
        self._install_reparam(*self.get_equivalent_kernel_bias())


class QARepVGGBlock(RepVGGBlock):
    """QARepVGG: ``rbr_dense`` (ConvModule), plain 1x1 conv ``rbr_1x1``, ``nn.Identity`` identity,
    summed, then ``se``, the post-sum ``bn`` and ReLU. ``switch_to_deploy`` keeps ``bn``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1, deploy: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deploy)
        square = in_channels == out_channels and stride == 1
        if deploy:
            self.bn = nn.BatchNorm2d(out_channels)
        else:
            self.bn = nn.BatchNorm2d(out_channels)
            self.rbr_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, groups=groups, bias=False)
            self.rbr_identity = nn.Identity() if square else None
        self._id_tensor = None

    def _branch_sum(self, x: Tensor) -> Tensor:
        total = self.rbr_dense(x) + self.rbr_1x1(x)
        return total if self.rbr_identity is None else total + self.rbr_identity(x)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(x))))
        return self.nonlinearity(self.bn(self.se(self._branch_sum(x))))

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        k3, b3 = self._kernel_bias_of(self.rbr_dense)
        kernel = k3 + F.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        if self.rbr_identity is not None:
            kernel = kernel + _identity_kernel(self.in_channels, self.groups, 3, kernel)
        return kernel, b3


class QARepVGGBlockV2(QARepVGGBlock):
    """QARepVGGBlock plus ``rbr_avg`` (AvgPool2d(3, stride, 1)) where the identity is."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1, deploy: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deploy)
        if not deploy:
            square = in_channels == out_channels and stride == 1
            self.rbr_avg = nn.AvgPool2d(kernel_size, stride, padding) if square else None

    def _branch_sum(self, x: Tensor) -> Tensor:
        total = super()._branch_sum(x)
        return total if self.rbr_avg is None else total + self.rbr_avg(x)

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = super().get_equivalent_kernel_bias()
        if self.rbr_avg is not None:
            k = self.rbr_avg.kernel_size
            per_group = self.in_channels // self.groups
            avg = torch.zeros_like(kernel)
            avg[torch.arange(self.in_channels), torch.arange(self.in_channels) % per_group] = 1.0 / (k * k)
            kernel = kernel + avg
        return kernel, bias


def get_block(mode: str) -> type:
    """YOLOv6's ``training_mode`` -> block class (the rep modes only)."""
    return {"repvgg": RepVGGBlock, "qarepvgg": QARepVGGBlock, "qarepvggv2": QARepVGGBlockV2}[mode]


class BottleRep(nn.Module):
    """Two basic blocks ``conv1``, ``conv2``; a shortcut scaled by the learned ``alpha`` when in == out."""

    def __init__(self, in_channels: int, out_channels: int, basic_block: type = RepVGGBlock,
                 weight: bool = False, deploy: bool = False) -> None:
        super().__init__()
        self.conv1 = basic_block(in_channels, out_channels, deploy=deploy)
        self.conv2 = basic_block(out_channels, out_channels, deploy=deploy)
        self.shortcut = in_channels == out_channels
        self.alpha = nn.Parameter(torch.ones(1)) if weight else 1.0

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.conv1(x))
        return y + self.alpha * x if self.shortcut else y


class RepBlock(nn.Module):
    """``conv1`` then ``block`` (nn.Sequential of n-1 more, or None); with BottleRep n halves."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 1, block: type = RepVGGBlock,
                 basic_block: type = RepVGGBlock, deploy: bool = False) -> None:
        super().__init__()
        if block is BottleRep:
            self.conv1 = BottleRep(in_channels, out_channels, basic_block, weight=True, deploy=deploy)
            n = n // 2
            rest = [BottleRep(out_channels, out_channels, basic_block, weight=True, deploy=deploy)
                    for _ in range(n - 1)]
        else:
            self.conv1 = block(in_channels, out_channels, deploy=deploy)
            rest = [block(out_channels, out_channels, deploy=deploy) for _ in range(n - 1)]
        self.block = nn.Sequential(*rest) if n > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return x if self.block is None else self.block(x)


class BepC3(nn.Module):
    """CSPStackRep: ``cv1``/``cv2``/``cv3`` (ConvBNReLU 1x1) around ``m`` = RepBlock of BottleReps."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 1, e: float = 0.5,
                 block: type = RepVGGBlock, deploy: bool = False) -> None:
        super().__init__()
        hidden = int(out_channels * e)
        self.cv1 = ConvBNReLU(in_channels, hidden, 1, 1, fused=deploy)
        self.cv2 = ConvBNReLU(in_channels, hidden, 1, 1, fused=deploy)
        self.cv3 = ConvBNReLU(2 * hidden, out_channels, 1, 1, fused=deploy)
        self.m = RepBlock(hidden, hidden, n, BottleRep, block, deploy)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


# -- backbone, neck, head, model ------------------------------------------------------------------


def _stage(stage: str, cin: int, cout: int, n: int, block: type, e: float, deploy: bool) -> nn.Module:
    if stage == "BepC3":
        return BepC3(cin, cout, n, e, block, deploy)
    return RepBlock(cin, cout, n, block, deploy=deploy)


class EfficientRep(nn.Module):
    """``stem`` then ``ERBlock_2`` .. ``ERBlock_5`` (strided block + stage; ERBlock_5 adds the SPPF)."""

    stage = "RepBlock"

    def __init__(self, in_channels: int, channels_list: tuple[int, ...], num_repeats: tuple[int, ...],
                 block: type = RepVGGBlock, cspsppf: bool = False, csp_e: float = 0.5,
                 deploy: bool = False) -> None:
        super().__init__()
        c, n = channels_list, num_repeats
        self.fuse_P2 = False
        self.stem = block(in_channels, c[0], 3, 2, deploy=deploy)
        for i in range(1, 5):
            layers = [block(c[i - 1], c[i], 3, 2, deploy=deploy),
                      _stage(self.stage, c[i], c[i], n[i], block, csp_e, deploy)]
            if i == 4:
                merge = SimCSPSPPF if cspsppf else SimSPPF
                layers.append(merge(c[4], c[4], 5, fused=deploy))
            setattr(self, f"ERBlock_{i + 1}", nn.Sequential(*layers))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        x = self.ERBlock_2(self.stem(x))
        p3 = self.ERBlock_3(x)
        p4 = self.ERBlock_4(p3)
        return p3, p4, self.ERBlock_5(p4)


class CSPBepBackbone(EfficientRep):
    stage = "BepC3"


class RepPANNeck(nn.Module):
    """Top-down (``reduce_layer*``, ``upsample*``, ``Rep_p4``, ``Rep_p3``) then bottom-up
    (``downsample2``, ``Rep_n3``, ``downsample1``, ``Rep_n4``)."""

    stage = "RepBlock"

    def __init__(self, channels_list: tuple[int, ...], num_repeats: tuple[int, ...], block: type = RepVGGBlock,
                 csp_e: float = 0.5, deploy: bool = False) -> None:
        super().__init__()
        c, n = channels_list, num_repeats
        self.Rep_p4 = _stage(self.stage, c[3] + c[5], c[5], n[5], block, csp_e, deploy)
        self.Rep_p3 = _stage(self.stage, c[2] + c[6], c[6], n[6], block, csp_e, deploy)
        self.Rep_n3 = _stage(self.stage, c[6] + c[7], c[8], n[7], block, csp_e, deploy)
        self.Rep_n4 = _stage(self.stage, c[5] + c[9], c[10], n[8], block, csp_e, deploy)
        self.reduce_layer0 = ConvBNReLU(c[4], c[5], 1, 1, fused=deploy)
        self.upsample0 = Transpose(c[5], c[5])
        self.reduce_layer1 = ConvBNReLU(c[5], c[6], 1, 1, fused=deploy)
        self.upsample1 = Transpose(c[6], c[6])
        self.downsample2 = ConvBNReLU(c[6], c[7], 3, 2, fused=deploy)
        self.downsample1 = ConvBNReLU(c[8], c[9], 3, 2, fused=deploy)

    def forward(self, features: tuple[Tensor, ...]) -> list[Tensor]:
        x2, x1, x0 = features
        fpn_out0 = self.reduce_layer0(x0)
        f_out0 = self.Rep_p4(torch.cat([self.upsample0(fpn_out0), x1], 1))
        fpn_out1 = self.reduce_layer1(f_out0)
        pan_out2 = self.Rep_p3(torch.cat([self.upsample1(fpn_out1), x2], 1))
        pan_out1 = self.Rep_n3(torch.cat([self.downsample2(pan_out2), fpn_out1], 1))
        pan_out0 = self.Rep_n4(torch.cat([self.downsample1(pan_out1), fpn_out0], 1))
        return [pan_out2, pan_out1, pan_out0]


class CSPRepPANNeck(RepPANNeck):
    stage = "BepC3"


def build_effidehead_layer(channels_list: tuple[int, ...], num_anchors: int, num_classes: int,
                           reg_max: int = 16, num_layers: int = 3, deploy: bool = False) -> nn.Sequential:
    """Per level: stem (1x1), cls_conv, reg_conv (3x3 ConvBNSiLU), cls_pred, reg_pred (1x1 conv)."""
    layers = []
    for index in (6, 8, 10)[:num_layers]:
        ch = channels_list[index]
        layers += [
            ConvBNSiLU(ch, ch, 1, 1, fused=deploy),
            ConvBNSiLU(ch, ch, 3, 1, fused=deploy),
            ConvBNSiLU(ch, ch, 3, 1, fused=deploy),
            nn.Conv2d(ch, num_classes * num_anchors, 1),
            nn.Conv2d(ch, 4 * (reg_max + num_anchors), 1),
        ]
    return nn.Sequential(*layers)


class Detect(nn.Module):
    """Efficient decoupled head: ``stems``, ``cls_convs``, ``reg_convs``, ``cls_preds``, ``reg_preds``
    (ModuleLists), ``proj_conv`` and, after ``initialize_biases``, the parameter ``proj``."""

    def __init__(self, num_classes: int, num_layers: int, head_layers: nn.Sequential, use_dfl: bool = True,
                 reg_max: int = 16) -> None:
        super().__init__()
        self.nc = num_classes
        self.no = num_classes + 5
        self.nl = num_layers
        self.grid = [torch.zeros(1)] * num_layers
        self.prior_prob = 1e-2
        self.stride = torch.tensor([8, 16, 32])
        self.use_dfl = use_dfl
        self.reg_max = reg_max
        self.proj_conv = nn.Conv2d(reg_max + 1, 1, 1, bias=False)
        self.stems, self.cls_convs, self.reg_convs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.cls_preds, self.reg_preds = nn.ModuleList(), nn.ModuleList()
        for i in range(num_layers):
            for j, target in enumerate((self.stems, self.cls_convs, self.reg_convs, self.cls_preds, self.reg_preds)):
                target.append(head_layers[5 * i + j])

    @torch.no_grad()
    def initialize_biases(self) -> None:
        """Zero pred weights, prior-probability class bias, bias 1 for regression; ``proj`` = 0..reg_max."""
        for conv in self.cls_preds:
            conv.weight.zero_()
            conv.bias.fill_(-math.log((1 - self.prior_prob) / self.prior_prob))
        for conv in self.reg_preds:
            conv.weight.zero_()
            conv.bias.fill_(1.0)
        self.proj = nn.Parameter(torch.linspace(0, self.reg_max, self.reg_max + 1), requires_grad=False)
        self.proj_conv.weight = nn.Parameter(self.proj.view(1, self.reg_max + 1, 1, 1).clone(), requires_grad=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        outputs = []
        for i, x in enumerate(features):
            b, _, h, w = x.shape
            x = self.stems[i](x)
            cls = torch.sigmoid(self.cls_preds[i](self.cls_convs[i](x)))
            reg = self.reg_preds[i](self.reg_convs[i](x))
            if self.use_dfl:
                reg = reg.reshape(b, 4, self.reg_max + 1, h * w).permute(0, 2, 1, 3)
                reg = self.proj_conv(F.softmax(reg, dim=1))
            outputs.append(torch.cat([reg.reshape(b, 4, h * w), cls.reshape(b, self.nc, h * w)], 1))
        return torch.cat(outputs, -1)


def initialize_weights(model: nn.Module) -> None:
    """YOLOv6's ``initialize_weights``: every BN gets eps 1e-3, momentum 0.03; activations in place."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.eps = EPS
            m.momentum = MOMENTUM
        elif type(m) in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU):
            m.inplace = True


def _unfuse_conv_modules(model: nn.Module) -> None:
    """Give every fused ConvModule back a bias-free conv and its BN (the train-form ConvModule)."""
    for m in model.modules():
        if type(m) is ConvModule and not hasattr(m, "bn"):
            c = m.conv
            m.conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups,
                               bias=False)
            m.bn = nn.BatchNorm2d(c.out_channels)
            del m.__dict__["forward"]


class Model(nn.Module):
    """YOLOv6's ``Model``: ``backbone``, ``neck``, ``detect``; biases and BN eps set as upstream."""

    def __init__(self, block: str = "repvgg", csp: bool = False, cspsppf: bool = False,
                 channels_list: tuple[int, ...] = CHANNELS, num_repeats: tuple[int, ...] = REPEATS,
                 num_classes: int = NUM_CLASSES, reg_max: int = REG_MAX, deploy: bool = False,
                 rep_only: bool = False) -> None:
        super().__init__()
        block_type = get_block(block)
        backbone, neck = (CSPBepBackbone, CSPRepPANNeck) if csp else (EfficientRep, RepPANNeck)
        csp_e = 0.5
        self.backbone = backbone(3, channels_list, num_repeats, block_type, cspsppf, csp_e, deploy)
        self.neck = neck(channels_list, num_repeats, block_type, csp_e, deploy)
        head_layers = build_effidehead_layer(channels_list, 1, num_classes, reg_max, 3, deploy)
        self.detect = Detect(num_classes, 3, head_layers, use_dfl=True, reg_max=reg_max)
        self.stride = self.detect.stride
        self.detect.initialize_biases()
        if rep_only:
            _unfuse_conv_modules(self)
        initialize_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.detect(self.neck(self.backbone(x)))


# -- YOLOv6's deploy path (rewritten) ---------------------------------------------------------------


@torch.no_grad()
def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new biased conv equal to ``bn(conv(x))`` in eval mode (stride, padding, groups carried over;
    like upstream, not dilation)."""
    scale, shift = _bn_scale_shift(bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      groups=conv.groups, bias=True, dtype=conv.weight.dtype, device=conv.weight.device)
    fused.requires_grad_(False)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    conv_bias = torch.zeros_like(shift) if conv.bias is None else conv.bias
    fused.bias.copy_(conv_bias * scale + shift)
    return fused


def fuse_model(model: nn.Module) -> nn.Module:
    """YOLOv6's ``fuse_model``: fold BN into every ``ConvModule`` that has one, switch to forward_fuse."""
    for m in list(model.modules()):
        if type(m) is ConvModule and hasattr(m, "bn"):
            m.conv = fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


@torch.no_grad()
def switch_to_deploy(model: nn.Module) -> nn.Module:
    """The deploy scripts' loop: ``switch_to_deploy()`` on every RepVGGBlock (QA blocks included)."""
    for m in list(model.modules()):
        if isinstance(m, RepVGGBlock):
            m.switch_to_deploy()
    return model


def upstream_deploy(model: nn.Module) -> nn.Module:
    """A deep copy taken through YOLOv6's deploy path: fuse_model, eval, switch_to_deploy."""
    deployed = fuse_model(deepcopy(model)).eval()
    return switch_to_deploy(deployed)


# -- fixtures -------------------------------------------------------------------------------------


@torch.no_grad()
def _randomise_constant_parameters(model: nn.Module, seed: int) -> None:
    """Head preds start at zero weights / constant biases and BottleRep's ``alpha`` at 1."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".cls_preds." in name or ".reg_preds." in name:
            p.copy_(torch.randn(p.shape, generator=generator) * (0.3 if name.endswith("weight") else 0.5))
        elif name.endswith(".alpha"):
            p.copy_(torch.rand(p.shape, generator=generator) + 0.5)


def _build(variant: str, deploy: bool, seed: int, rep_only: bool = False) -> Model:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Model(deploy=deploy, rep_only=rep_only, **VARIANTS[variant])


def train_model(variant: str = "repvgg", seed: int = 66) -> Model:
    """The train form with random BN statistics and no constant-initialised parameter, eval mode."""
    model = zoo.randomize_bn(_build(variant, False, seed), seed=seed)
    _randomise_constant_parameters(model, seed + 1)
    return model.eval()


def deploy_model(variant: str = "repvgg", rep_only: bool = False) -> Model:
    """The structure YOLOv6's deploy path leaves (fuse_model + switch_to_deploy), eval mode.

    ``rep_only=True``: only the RepVGG-style blocks in deploy form (``rbr_reparam``, QARepVGG's
    ``bn`` kept); every ConvModule keeps its ``conv`` + ``bn`` -- what a converter that fuses
    re-parameterizable blocks and passes everything else through writes.
    """
    return _build(variant, True, 0, rep_only).eval()


def optimizer_state(model: nn.Module, lr: float = 0.01) -> dict:
    """An SGD ``state_dict()`` as YOLOv6's ``build_optimizer`` groups parameters (BN weights, other
    weights with decay, biases), built by hand: creating a torch optimizer costs seconds here."""
    groups: dict[str, list[int]] = {"bn_weight": [], "weight": [], "bias": []}
    for index, (name, p) in enumerate(model.named_parameters()):
        module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if name.endswith(".bias"):
            groups["bias"].append(index)
        elif isinstance(module, nn.BatchNorm2d):
            groups["bn_weight"].append(index)
        else:
            groups["weight"].append(index)
    base = dict(lr=lr, momentum=0.937, dampening=0, nesterov=True, maximize=False, foreach=None,
                differentiable=False, fused=None, initial_lr=lr)
    decay = {"bn_weight": 0.0, "weight": 0.0005, "bias": 0.0}
    return {"state": {}, "param_groups": [dict(base, weight_decay=decay[k], params=v) for k, v in groups.items()]}


def save_like_yolov6(model: nn.Module, path: str | Path, state_dict: bool = False, stripped: bool = False) -> dict:
    """Write the checkpoint YOLOv6's trainer saves (``engine.py``): 'model' and 'ema' as fp16 deep
    copies, 'updates', 'optimizer', 'scheduler', 'epoch', 'results'. ``stripped`` mimics
    ``strip_optimizer`` (model = ema, optimizer/ema/updates None, no grads). ``state_dict`` stores
    fp16 state dicts instead of pickled modules. Returns the dict saved."""
    ckpt = {
        "model": deepcopy(model).half(),
        "ema": deepcopy(model).half().requires_grad_(False),
        "updates": 1234,
        "optimizer": optimizer_state(model),
        "scheduler": {"base_lrs": [0.01] * 3, "last_epoch": 10, "_step_count": 11, "_last_lr": [0.0099] * 3,
                      "lr_lambdas": [None]},
        "epoch": 9,
        "results": (0.25, 0.125),
    }
    if stripped:
        ckpt["model"] = ckpt["ema"]
        ckpt.update(optimizer=None, ema=None, updates=None)
        ckpt["model"].requires_grad_(False)
    if state_dict:
        ckpt = {k: (OrderedDict(v.state_dict()) if isinstance(v, nn.Module) else v) for k, v in ckpt.items()}
    torch.save(ckpt, path)
    return ckpt

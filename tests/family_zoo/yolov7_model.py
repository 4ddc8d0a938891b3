"""A tiny YOLOv7 detector in WongKinYiu/yolov7's own module tree, train and fused form.

Written for these tests from the attribute names, forward order and fusion math of
WongKinYiu/yolov7 (commit a207844, 2023-11): ``models/common.py`` (Conv with ``fuseforward``,
MP, Concat, SPPCSPC, ImplicitA, ImplicitM, RepConv with ``fuse_repvgg_block``,
``get_equivalent_kernel_bias`` and ``repvgg_convert``), ``models/yolo.py`` (IDetect with ``fuse``
and ``fuseforward``, Model with ``forward_once`` and ``fuse``, parse_model's ``i``/``f``/``type``/
``np`` layer attributes), ``models/experimental.py`` (attempt_load), ``utils/torch_utils.py``
(initialize_weights, fuse_conv_and_bn), ``train.py`` and ``utils/general.py`` (the checkpoint and
strip_optimizer). No upstream code is copied.

``Model.model`` is an ``nn.Sequential`` of numbered layers, so keys read ``model.0.conv.weight``,
``model.0.bn.running_var``, ``model.8.cv1.conv.weight`` (SPPCSPC), ``model.9.rbr_dense.0.weight``,
``model.9.rbr_dense.1.running_mean``, ``model.9.rbr_1x1.0.weight``, ``model.9.rbr_identity.weight``
(RepConv), ``model.12.anchors``, ``model.12.anchor_grid``, ``model.12.m.0.weight``,
``model.12.ia.0.implicit``, ``model.12.im.0.implicit`` (IDetect).

YOLOv7's deploy path is ``attempt_load``: ``ckpt['ema' if ckpt.get('ema') else 'model'].float()
.fuse().eval()``. ``Model.fuse()`` walks ``self.model.modules()`` once: RepConv ->
``fuse_repvgg_block`` (each branch conv+BN folded, summed into ``rbr_dense``, which becomes
``rbr_reparam``; ``rbr_dense``/``rbr_1x1``/``rbr_identity`` set to None), ``type(m) is Conv`` with
``bn`` -> conv+BN folded, ``bn`` deleted, ``forward = fuseforward``; IDetect -> ImplicitA/M folded
into ``m`` in place (``ia``/``im`` stay in the module and the state dict, unused), ``forward =
fuseforward``.

Deviations from upstream, named here:
- ``fused=True`` / ``deploy=True`` constructor flags build the fused form directly (upstream's
  RepConv has ``deploy``; its Conv and IDetect only reach it through ``fuse()``).
- ``fuse_conv_and_bn`` makes the fused conv in the source weight's dtype (upstream: torch's default
  dtype, float32 -- fine there because ``attempt_load`` runs ``.float()`` first).
- Both fusions run under ``torch.no_grad()`` (upstream's IDetect.fuse adds in place to
  parameters, which fails on parameters that require grad; its checkpoints' ``ema`` and stripped
  ``model`` have ``requires_grad`` off).
- IDetect's forward returns the raw per-level outputs flattened and concatenated (upstream also
  decodes boxes with grid, stride and anchor_grid in eval mode).
"""

from __future__ import annotations

from collections import OrderedDict
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests import zoo

EPS = 1e-3
MOMENTUM = 0.03
INPUT_SHAPE = (2, 3, 64, 64)
NUM_CLASSES = 2
ANCHORS = ((12, 16, 19, 36, 40, 28), (36, 75, 76, 55, 72, 146))


def autopad(k: int, p: int | None = None) -> int:
    return k // 2 if p is None else p


class Conv(nn.Module):
    """Conv2d (no bias) + BN + act (SiLU by default): ``conv``, ``bn``, ``act``."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: bool | nn.Module = True, fused: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=fused)
        if not fused:
            self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        if fused:
            self.forward = self.fuseforward

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuseforward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class MP(nn.Module):
    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.m = nn.MaxPool2d(k, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.m(x)


class Concat(nn.Module):
    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, xs: list[Tensor]) -> Tensor:
        return torch.cat(xs, self.d)


class SPPCSPC(nn.Module):
    """``cv1``..``cv7`` Convs around three parallel max-pools ``m`` (kernels 5, 9, 13)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5,
                 k: tuple[int, ...] = (5, 9, 13), fused: bool = False) -> None:
        super().__init__()
        hidden = int(2 * c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1, fused=fused)
        self.cv2 = Conv(c1, hidden, 1, 1, fused=fused)
        self.cv3 = Conv(hidden, hidden, 3, 1, fused=fused)
        self.cv4 = Conv(hidden, hidden, 1, 1, fused=fused)
        self.m = nn.ModuleList(nn.MaxPool2d(size, 1, size // 2) for size in k)
        self.cv5 = Conv(4 * hidden, hidden, 1, 1, fused=fused)
        self.cv6 = Conv(hidden, hidden, 3, 1, fused=fused)
        self.cv7 = Conv(2 * hidden, c2, 1, 1, fused=fused)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([x1] + [pool(x1) for pool in self.m], 1)))
        return self.cv7(torch.cat((y1, self.cv2(x)), 1))


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return scale, bn.bias - bn.running_mean * scale


class RepConv(nn.Module):
    """YOLOv7's RepConv: ``rbr_dense`` = Sequential(conv3x3, BN), ``rbr_1x1`` = Sequential(conv1x1,
    BN), ``rbr_identity`` = BN when c1 == c2 and s == 1 (else None), summed, then ``act``."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, p: int | None = None, g: int = 1,
                 act: bool | nn.Module = True, deploy: bool = False) -> None:
        super().__init__()
        if k != 3 or autopad(k, p) != 1:
            raise ValueError("YOLOv7's RepConv is 3x3 with padding 1")
        self.deploy = deploy
        self.groups = g
        self.in_channels = c1
        self.out_channels = c2
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        if deploy:
            self.rbr_reparam = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(c1) if c1 == c2 and s == 1 else None
            self.rbr_dense = nn.Sequential(nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False),
                                           nn.BatchNorm2d(c2))
            self.rbr_1x1 = nn.Sequential(nn.Conv2d(c1, c2, 1, s, autopad(k, p) - k // 2, groups=g, bias=False),
                                         nn.BatchNorm2d(c2))

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(x))
        total = self.rbr_dense(x) + self.rbr_1x1(x)
        return self.act(total if self.rbr_identity is None else total + self.rbr_identity(x))

    # The older export path (``repvgg_convert``): per-branch kernel/bias, identity as K[i, i % (c1/g)].
    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel = bias = 0
        for branch, pad in ((self.rbr_dense, 0), (self.rbr_1x1, 1), (self.rbr_identity, None)):
            if branch is None:
                continue
            if isinstance(branch, nn.Sequential):
                scale, shift = _bn_scale_shift(branch[1])
                k = F.pad(branch[0].weight, [pad] * 4) * scale.reshape(-1, 1, 1, 1)
            else:
                scale, shift = _bn_scale_shift(branch)
                per_group = self.in_channels // self.groups
                k = torch.zeros(self.in_channels, per_group, 3, 3, dtype=scale.dtype)
                k[torch.arange(self.in_channels), torch.arange(self.in_channels) % per_group, 1, 1] = 1.0
                k = k * scale.reshape(-1, 1, 1, 1)
            kernel, bias = kernel + k, bias + shift
        return kernel, bias

    @staticmethod
    def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
        """A biased conv (same geometry) equal to ``bn(conv(x))`` in eval mode."""
        scale, shift = _bn_scale_shift(bn)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
        fused.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
        fused.bias = nn.Parameter(shift)
        return fused

    def _upstream_identity_1x1(self) -> nn.Conv2d:
        """YOLOv7's identity conv: zeros, then ``fill_diagonal_(1)`` on the squeezed (c2, c1/g) matrix.

        With groups > 1 that matrix is not the grouped identity (only rows i < c1/g get a one), so
        upstream's ``fuse_repvgg_block`` is wrong for grouped RepConv with an identity branch.
        """
        conv = nn.Conv2d(self.in_channels, self.out_channels, 1, 1, 0, groups=self.groups, bias=False)
        matrix = torch.zeros(self.out_channels, self.in_channels // self.groups)
        matrix.fill_diagonal_(1.0)
        conv.weight.data = matrix.reshape(self.out_channels, -1, 1, 1)
        return conv

    @torch.no_grad()
    def fuse_repvgg_block(self) -> None:
        """YOLOv7's ``fuse_repvgg_block``: fold each branch, sum into ``rbr_dense`` -> ``rbr_reparam``."""
        if self.deploy:
            return
        self.rbr_dense = self.fuse_conv_bn(self.rbr_dense[0], self.rbr_dense[1])
        self.rbr_1x1 = self.fuse_conv_bn(self.rbr_1x1[0], self.rbr_1x1[1])
        weight_1x1 = F.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        if isinstance(self.rbr_identity, nn.BatchNorm2d):
            identity = self.fuse_conv_bn(self._upstream_identity_1x1(), self.rbr_identity)
            weight_id, bias_id = F.pad(identity.weight, [1, 1, 1, 1]), identity.bias
        else:
            weight_id, bias_id = torch.zeros_like(weight_1x1), torch.zeros_like(self.rbr_1x1.bias)
        self.rbr_dense.weight = nn.Parameter(self.rbr_dense.weight + weight_1x1 + weight_id)
        self.rbr_dense.bias = nn.Parameter(self.rbr_dense.bias + self.rbr_1x1.bias + bias_id)
        self.rbr_reparam = self.rbr_dense
        self.deploy = True
        for name in ("rbr_identity", "rbr_1x1", "rbr_dense"):
            if getattr(self, name) is not None:
                delattr(self, name)
                setattr(self, name, None)


class ImplicitA(nn.Module):
    """A learned per-channel offset added to the input: ``implicit`` (1, C, 1, 1), init N(0, 0.02)."""

    def __init__(self, channel: int, mean: float = 0.0, std: float = 0.02) -> None:
        super().__init__()
        self.channel, self.mean, self.std = channel, mean, std
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=mean, std=std)

    def forward(self, x: Tensor) -> Tensor:
        return self.implicit + x


class ImplicitM(nn.Module):
    """A learned per-channel scale: ``implicit`` (1, C, 1, 1), init N(1, 0.02)."""

    def __init__(self, channel: int, mean: float = 1.0, std: float = 0.02) -> None:
        super().__init__()
        self.channel, self.mean, self.std = channel, mean, std
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=mean, std=std)

    def forward(self, x: Tensor) -> Tensor:
        return self.implicit * x


class IDetect(nn.Module):
    """YOLOv7's training head: buffers ``anchors``, ``anchor_grid``; per level ``m`` (1x1 conv),
    ``ia`` (ImplicitA on its input), ``im`` (ImplicitM on its output)."""

    stride = None

    def __init__(self, nc: int, anchors: tuple[tuple[int, ...], ...], ch: tuple[int, ...]) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer("anchors", a)
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.ia = nn.ModuleList(ImplicitA(c) for c in ch)
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in ch)

    def _flat(self, outputs: list[Tensor]) -> Tensor:
        return torch.cat([y.flatten(2) for y in outputs], -1)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return self._flat([self.im[i](self.m[i](self.ia[i](x))) for i, x in enumerate(xs)])

    def fuseforward(self, xs: list[Tensor]) -> Tensor:
        return self._flat([self.m[i](x) for i, x in enumerate(xs)])

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold ImplicitA into ``m``'s bias (``b += W a``), then ImplicitM into weight and bias."""
        for conv, ia in zip(self.m, self.ia):
            conv.bias += conv.weight.flatten(1) @ ia.implicit.flatten()
        for conv, im in zip(self.m, self.im):
            conv.bias *= im.implicit.flatten()
            conv.weight *= im.implicit.reshape(-1, 1, 1, 1)


def _layer(module: nn.Module, index: int, source: int | list[int]) -> nn.Module:
    """parse_model's bookkeeping on every layer: index ``i``, input ``f``, ``type``, ``np``."""
    module.i, module.f = index, source
    module.type = type(module).__module__ + "." + type(module).__name__
    module.np = sum(p.numel() for p in module.parameters())
    return module


def initialize_weights(model: nn.Module) -> None:
    """YOLOv7's ``initialize_weights``: every BN gets eps 1e-3, momentum 0.03."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.eps = EPS
            m.momentum = MOMENTUM
        elif type(m) in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6):
            m.inplace = True


class Model(nn.Module):
    """``model``: 0 stem Conv, 1 strided Conv, 2-6 an ELAN-like Conv/Concat group (one LeakyReLU,
    one grouped Conv), 7 MP, 8 SPPCSPC, 9 RepConv with identity, 10 grouped RepConv without
    identity, 11 strided RepConv, 12 IDetect on (10, 11)."""

    def __init__(self, deploy: bool = False, rep_only: bool = False) -> None:
        super().__init__()
        fused = deploy and not rep_only
        layers = [
            (Conv(3, 8, 3, 1, fused=fused), -1),                                   # 0  64x64
            (Conv(8, 16, 3, 2, fused=fused), -1),                                  # 1  32x32
            (Conv(16, 8, 1, 1, act=nn.LeakyReLU(0.1), fused=fused), -1),           # 2
            (Conv(16, 8, 1, 1, fused=fused), -2),                                  # 3  from 1
            (Conv(8, 8, 3, 1, g=2, fused=fused), -1),                              # 4
            (Concat(1), [-1, -2, -3]),                                             # 5  24 ch
            (Conv(24, 16, 1, 1, fused=fused), -1),                                 # 6
            (MP(), -1),                                                            # 7  16x16
            (SPPCSPC(16, 16, fused=fused), -1),                                    # 8
            (RepConv(16, 16, 3, 1, deploy=deploy), -1),                            # 9  identity
            (RepConv(16, 24, 3, 1, g=2, deploy=deploy), 6),                        # 10 32x32, no identity
            (RepConv(16, 16, 3, 2, deploy=deploy), 9),                             # 11 8x8, no identity
            (IDetect(NUM_CLASSES, ANCHORS, (24, 16)), [10, 11]),                   # 12
        ]
        self.model = nn.Sequential(*(_layer(m, i, f) for i, (m, f) in enumerate(layers)))
        self.save = sorted({j % i for i, (_, f) in enumerate(layers)
                            for j in ([f] if isinstance(f, int) else f) if j != -1})
        head = self.model[-1]
        head.stride = torch.tensor([2.0, 8.0])
        head.anchors /= head.stride.view(-1, 1, 1)
        self.stride = head.stride
        if fused:
            head.forward = head.fuseforward
        initialize_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        outputs: list[Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

    @torch.no_grad()
    def fuse(self) -> "Model":
        """YOLOv7's ``Model.fuse``: RepConv, then Conv+BN, then IDetect, in one walk of the layers."""
        for m in list(self.model.modules()):
            if isinstance(m, RepConv):
                m.fuse_repvgg_block()
            elif type(m) is Conv and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.fuseforward
            elif isinstance(m, IDetect):
                m.fuse()
                m.forward = m.fuseforward
        return self


@torch.no_grad()
def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new biased conv equal to ``bn(conv(x))`` (stride, padding, groups carried; not dilation)."""
    scale, shift = _bn_scale_shift(bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      groups=conv.groups, bias=True, dtype=conv.weight.dtype, device=conv.weight.device)
    fused.requires_grad_(False)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_((torch.zeros_like(shift) if conv.bias is None else conv.bias) * scale + shift)
    return fused


def upstream_deploy(model: Model) -> Model:
    """A deep copy taken through YOLOv7's deploy path (``attempt_load``: fuse, eval)."""
    return deepcopy(model).fuse().eval()


# -- fixtures -------------------------------------------------------------------------------------


@torch.no_grad()
def _randomise_implicits(model: nn.Module, seed: int) -> None:
    """ImplicitA/M start near 0 / 1 (std 0.02): spread them so a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, ImplicitA):
            m.implicit.copy_(torch.randn(m.implicit.shape, generator=generator) * 0.5)
        elif isinstance(m, ImplicitM):
            m.implicit.copy_(torch.randn(m.implicit.shape, generator=generator) * 0.3 + 1.0)


def _build(deploy: bool, seed: int, rep_only: bool = False) -> Model:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Model(deploy=deploy, rep_only=rep_only)


def train_model(seed: int = 77) -> Model:
    """The train form with random BN statistics and spread implicits, eval mode."""
    model = zoo.randomize_bn(_build(False, seed), seed=seed)
    _randomise_implicits(model, seed + 1)
    return model.eval()


def deploy_model(rep_only: bool = False) -> Model:
    """The structure ``Model.fuse()`` leaves (RepConv -> rbr_reparam, Conv without bn, IDetect
    with ``ia``/``im`` still present but folded), eval mode.

    ``rep_only=True``: only RepConv in deploy form (``RepConv(deploy=True)``, as YOLOv7 itself can
    build); every Conv keeps ``conv`` + ``bn`` and IDetect its unfolded implicits -- what a
    converter that fuses re-parameterizable blocks and passes everything else through writes.
    """
    return _build(True, 0, rep_only).eval()


def save_like_yolov7(model: nn.Module, path: str | Path, state_dict: bool = False, stripped: bool = False) -> dict:
    """Write the checkpoint YOLOv7's ``train.py`` saves: 'epoch', 'best_fitness', 'training_results',
    'model' and 'ema' (fp16 deep copies), 'updates', 'optimizer', 'wandb_id'. ``stripped`` mimics
    ``strip_optimizer`` (model = ema, epoch -1, the rest None, no grads); ``state_dict`` stores fp16
    state dicts instead of pickled modules. Upstream's 'best_fitness' is a numpy array (shape (1,),
    from ``utils/metrics.py`` fitness) once an epoch has been evaluated: kept in the pickled-module
    variant, a float in the state-dict variant so that it loads with ``weights_only=True``.
    Returns the dict saved."""
    params = list(range(len(list(model.parameters()))))
    optimizer = {"state": {}, "param_groups": [dict(lr=0.01, momentum=0.937, dampening=0, weight_decay=0.0,
                                                    nesterov=True, initial_lr=0.01, params=params)]}
    ckpt = {
        "epoch": 4,
        "best_fitness": 0.5 if state_dict else np.array([0.5]),
        "training_results": "   4/299  0.05  0.01\n",
        "model": deepcopy(model).half(),
        "ema": deepcopy(model).half().requires_grad_(False),
        "updates": 321,
        "optimizer": optimizer,
        "wandb_id": None,
    }
    if stripped:
        ckpt["model"] = ckpt["ema"]
        ckpt.update(optimizer=None, training_results=None, wandb_id=None, ema=None, updates=None, epoch=-1)
        ckpt["model"].requires_grad_(False)
    if state_dict:
        ckpt = {k: (OrderedDict(v.state_dict()) if isinstance(v, nn.Module) else v) for k, v in ckpt.items()}
    torch.save(ckpt, path)
    return ckpt

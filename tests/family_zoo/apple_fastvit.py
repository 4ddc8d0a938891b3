"""Toy models for apple's FastViT (Vasu et al., ICCV 2023), in apple/ml-fastvit's own names.

Written for these tests from the layout and conversion math of apple/ml-fastvit
``models/fastvit.py``, ``models/modules/mobileone.py`` and ``models/modules/replknet.py`` (no code
copied). timm's port (tests/family_zoo/fastvit_*.py) names the same blocks differently. Upstream's
names, forward order and ``reparameterize`` methods:

- ``MobileOneBlock``: ``activation(se(rbr_skip(x) + rbr_scale(x) + sum(rbr_conv[i](x))))``;
  ``rbr_skip`` a BN (in == out and stride 1), ``rbr_scale`` a 1×1 ``Sequential(conv, bn)`` (only
  when k > 1 and ``use_scale_branch``), ``rbr_conv`` a ModuleList of k×k ``Sequential(conv, bn)``
  (None when ``num_conv_branches`` is 0); ``se`` an ``SEBlock`` (``reduce``/``expand``, ratio
  0.0625) or Identity, ``activation`` GELU or Identity (``use_act``). Deploy: ``reparam_conv``.
- ``ReparamLargeKernelConv`` (PatchEmbed): ``lkb_origin`` + ``small_conv`` (3×3), both
  ``Sequential(conv, bn)`` with the block's stride and groups; deploy ``lkb_reparam``. Upstream's
  forward calls its GELU and throws the result away, so no activation is applied in either form.
- ``RepMixer``: ``x + layer_scale * (mixer(x) - norm(x))`` with ``layer_scale`` a Parameter of
  shape (dim, 1, 1) on the RepMixer itself, ``norm`` a depthwise MobileOneBlock holding only
  ``rbr_skip`` and ``mixer`` a depthwise MobileOneBlock (skip, scale and one conv branch), neither
  with an activation. Deploy: depthwise ``reparam_conv`` = identity + layer_scale·(mixer - norm).
- ``RepCPE``: ``pe(x) + x`` with ``pe`` a depthwise 7×7 conv with bias; deploy ``reparam_conv``.
- Not converted by upstream and kept in deploy form: ``RepMixerBlock.layer_scale`` (on the
  ConvFFN branch), ``ConvFFN`` (``conv.conv``/``conv.bn``, ``fc1``, ``fc2``), SE, the head.
- BN eps is PyTorch's default 1e-5 everywhere.

The toy FastViT has upstream's convolutional stem (its first block with two conv branches instead
of one), a RepMixer stage at 12×12 (kernel 3), a PatchEmbed (7×7 stride 2, groups = in channels,
8 -> 16 channels), a RepCPE, a RepMixer stage at 6×6 (kernel 5 with layer scale, kernel 3 without),
the ``conv_exp`` head block with SE, and the classifier.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .seeded import train_form

EPS = 1e-5
FAMILIES = {"apple_mobileone", "replknet", "apple_repmixer", "apple_repcpe"}
"""The families whose blocks this model holds (tests/test_family_contract.py)."""
INPUT_SHAPE = (2, 3, 48, 48)


def conv_bn(cin: int, cout: int, k: int, stride: int, padding: int, groups: int) -> nn.Sequential:
    layers = nn.Sequential()
    layers.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    layers.add_module("bn", nn.BatchNorm2d(cout, eps=EPS))
    return layers


def fold_bn(kernel: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Kernel and bias of eval ``bn`` after a bias-free conv with ``kernel``."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def identity_kernel(channels: int, groups: int, k: int, like: Tensor) -> Tensor:
    """The k×k grouped kernel of the identity map: ``K[i, i % (C/g), k//2, k//2] = 1``."""
    per_group = channels // groups
    kernel = like.new_zeros(channels, per_group, k, k)
    index = torch.arange(channels)
    kernel[index, index % per_group, k // 2, k // 2] = 1
    return kernel


def new_conv(weight: Tensor, bias: Tensor, **geometry) -> nn.Conv2d:
    conv = nn.Conv2d(bias=True, dtype=weight.dtype, device=weight.device, **geometry)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


class SEBlock(nn.Module):
    def __init__(self, in_channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        hidden = int(in_channels * rd_ratio)
        self.reduce = nn.Conv2d(in_channels, hidden, 1, bias=True)
        self.expand = nn.Conv2d(hidden, in_channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.sigmoid(self.expand(F.relu(self.reduce(F.avg_pool2d(x, x.shape[2:])))))
        return x * weights


class MobileOneBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, inference_mode: bool = False, use_se: bool = False,
                 use_act: bool = True, use_scale_branch: bool = True, num_conv_branches: int = 1) -> None:
        super().__init__()
        self.inference_mode = inference_mode
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        self.num_conv_branches = num_conv_branches
        self.se = SEBlock(out_channels) if use_se else nn.Identity()
        self.activation = nn.GELU() if use_act else nn.Identity()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                          groups=groups, bias=True)
            return
        self.rbr_skip = nn.BatchNorm2d(in_channels, eps=EPS) if in_channels == out_channels and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups) for _ in range(num_conv_branches)
        ) if num_conv_branches > 0 else None
        self.rbr_scale = (conv_bn(in_channels, out_channels, 1, stride, 0, groups)
                          if kernel_size > 1 and use_scale_branch else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        out: Tensor | int = 0
        if self.rbr_skip is not None:
            out = out + self.rbr_skip(x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        for branch in self.rbr_conv or ():
            out = out + branch(x)
        return self.activation(self.se(out))

    def _get_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel: Tensor | int = 0
        bias: Tensor | int = 0
        if self.rbr_scale is not None:
            k, b = fold_bn(self.rbr_scale.conv.weight, self.rbr_scale.bn)
            pad = self.kernel_size // 2
            kernel, bias = kernel + F.pad(k, (pad, pad, pad, pad)), bias + b
        if self.rbr_skip is not None:
            # Upstream caches this kernel as the plain attribute ``id_tensor`` (RepMixer reads it).
            self.id_tensor = identity_kernel(self.in_channels, self.groups, self.kernel_size,
                                             self.rbr_skip.weight)
            k, b = fold_bn(self.id_tensor, self.rbr_skip)
            kernel, bias = kernel + k, bias + b
        for branch in self.rbr_conv or ():
            k, b = fold_bn(branch.conv.weight, branch.bn)
            kernel, bias = kernel + k, bias + b
        return kernel, bias

    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        with torch.no_grad():
            kernel, bias = self._get_kernel_bias()
        self.reparam_conv = new_conv(kernel, bias, in_channels=self.in_channels, out_channels=self.out_channels,
                                     kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                     groups=self.groups)
        del self.rbr_conv, self.rbr_scale, self.rbr_skip
        self.inference_mode = True


class ReparamLargeKernelConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int,
                 small_kernel: int | None, inference_mode: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.small_kernel = kernel_size, small_kernel
        self.stride, self.groups, self.padding = stride, groups, kernel_size // 2
        self.activation = nn.GELU()
        if inference_mode:
            self.lkb_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, self.padding,
                                         groups=groups, bias=True)
            return
        self.lkb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, self.padding, groups)
        if small_kernel is not None:
            if small_kernel > kernel_size:
                raise ValueError("the small kernel cannot be larger than the large one")
            self.small_conv = conv_bn(in_channels, out_channels, small_kernel, stride, small_kernel // 2, groups)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "lkb_reparam"):
            out = self.lkb_reparam(x)
        else:
            out = self.lkb_origin(x)
            if hasattr(self, "small_conv"):
                out = out + self.small_conv(x)
        self.activation(out)  # upstream discards this result: the block has no activation
        return out

    def get_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = fold_bn(self.lkb_origin.conv.weight, self.lkb_origin.bn)
        if hasattr(self, "small_conv"):
            k, b = fold_bn(self.small_conv.conv.weight, self.small_conv.bn)
            margin = (self.kernel_size - self.small_kernel) // 2
            kernel, bias = kernel + F.pad(k, (margin, margin, margin, margin)), bias + b
        return kernel, bias

    def reparameterize(self) -> None:
        with torch.no_grad():
            kernel, bias = self.get_kernel_bias()
        self.lkb_reparam = new_conv(kernel, bias, in_channels=self.in_channels, out_channels=self.out_channels,
                                    kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                    dilation=self.lkb_origin.conv.dilation, groups=self.groups)
        del self.lkb_origin
        if hasattr(self, "small_conv"):
            del self.small_conv


def convolutional_stem(in_channels: int, out_channels: int, inference_mode: bool = False,
                       first_conv_branches: int = 1) -> nn.Sequential:
    """Upstream's stem: dense strided 3×3, depthwise strided 3×3, then 1×1 MobileOne blocks."""
    return nn.Sequential(
        MobileOneBlock(in_channels, out_channels, 3, 2, 1, 1, inference_mode, num_conv_branches=first_conv_branches),
        MobileOneBlock(out_channels, out_channels, 3, 2, 1, out_channels, inference_mode),
        MobileOneBlock(out_channels, out_channels, 1, 1, 0, 1, inference_mode),
    )


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, stride: int, in_channels: int, embed_dim: int,
                 inference_mode: bool = False) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_channels, embed_dim, patch_size, stride, in_channels, 3, inference_mode),
            MobileOneBlock(embed_dim, embed_dim, 1, 1, 0, 1, inference_mode),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class RepMixer(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 3, use_layer_scale: bool = True,
                 layer_scale_init_value: float = 1e-5, inference_mode: bool = False) -> None:
        super().__init__()
        self.dim, self.kernel_size, self.inference_mode = dim, kernel_size, inference_mode
        pad = kernel_size // 2
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, kernel_size, 1, pad, groups=dim, bias=True)
            return
        self.norm = MobileOneBlock(dim, dim, kernel_size, padding=pad, groups=dim, use_act=False,
                                   use_scale_branch=False, num_conv_branches=0)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, padding=pad, groups=dim, use_act=False)
        self.use_layer_scale = use_layer_scale
        if use_layer_scale:
            self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "reparam_conv"):
            return self.reparam_conv(x)
        difference = self.mixer(x) - self.norm(x)
        if self.use_layer_scale:
            return x + self.layer_scale * difference
        return x + difference

    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        self.mixer.reparameterize()
        self.norm.reparameterize()
        with torch.no_grad():
            weight = self.mixer.reparam_conv.weight - self.norm.reparam_conv.weight
            bias = self.mixer.reparam_conv.bias - self.norm.reparam_conv.bias
            if self.use_layer_scale:
                weight = self.layer_scale.unsqueeze(-1) * weight
                bias = self.layer_scale.reshape(-1) * bias
            weight = self.mixer.id_tensor + weight
        self.reparam_conv = new_conv(weight, bias, in_channels=self.dim, out_channels=self.dim,
                                     kernel_size=self.kernel_size, stride=1, padding=self.kernel_size // 2,
                                     groups=self.dim)
        del self.mixer, self.norm
        if self.use_layer_scale:
            del self.layer_scale


class ConvFFN(nn.Module):
    def __init__(self, in_channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.conv = conv_bn(in_channels, in_channels, 7, 1, 3, in_channels)
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_channels, in_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepCPE(nn.Module):
    def __init__(self, in_channels: int, embed_dim: int, spatial_shape: int = 7, inference_mode: bool = False) -> None:
        super().__init__()
        self.in_channels, self.embed_dim, self.groups = in_channels, embed_dim, embed_dim
        self.spatial_shape = (spatial_shape, spatial_shape)
        conv = nn.Conv2d(in_channels, embed_dim, self.spatial_shape, 1, spatial_shape // 2, groups=embed_dim, bias=True)
        if inference_mode:
            self.reparam_conv = conv
        else:
            self.pe = conv

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "reparam_conv"):
            return self.reparam_conv(x)
        return self.pe(x) + x

    def reparameterize(self) -> None:
        with torch.no_grad():
            weight = identity_kernel(self.in_channels, self.groups, self.spatial_shape[0], self.pe.weight)
            weight = weight + self.pe.weight
            bias = self.pe.bias.clone()
        self.reparam_conv = new_conv(weight, bias, in_channels=self.in_channels, out_channels=self.embed_dim,
                                     kernel_size=self.spatial_shape, stride=1,
                                     padding=self.spatial_shape[0] // 2, groups=self.embed_dim)
        del self.pe


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 3, mlp_ratio: float = 3.0, use_layer_scale: bool = True,
                 layer_scale_init_value: float = 1e-5, inference_mode: bool = False) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size, use_layer_scale, layer_scale_init_value, inference_mode)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.use_layer_scale = use_layer_scale
        if use_layer_scale:
            self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mixer(x)
        ffn = self.convffn(x)
        return x + (self.layer_scale * ffn if self.use_layer_scale else ffn)


class FastViT(nn.Module):
    """A tiny FastViT classifier; ``inference_mode=True`` builds upstream's deploy form."""

    def __init__(self, inference_mode: bool = False, embed_dims: tuple[int, int] = (8, 16),
                 num_classes: int = 10) -> None:
        super().__init__()
        mode = inference_mode
        self.patch_embed = convolutional_stem(3, embed_dims[0], mode, first_conv_branches=2)
        self.network = nn.ModuleList([
            nn.Sequential(RepMixerBlock(embed_dims[0], 3, inference_mode=mode)),
            PatchEmbed(7, 2, embed_dims[0], embed_dims[1], mode),
            RepCPE(embed_dims[1], embed_dims[1], 7, mode),
            nn.Sequential(RepMixerBlock(embed_dims[1], 5, inference_mode=mode),
                          RepMixerBlock(embed_dims[1], 3, use_layer_scale=False, inference_mode=mode)),
        ])
        cls_dim = 2 * embed_dims[1]
        self.conv_exp = MobileOneBlock(embed_dims[1], cls_dim, 3, 1, 1, embed_dims[1], mode, use_se=True)
        self.head = nn.Linear(cls_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for block in self.network:
            x = block(x)
        x = self.conv_exp(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Upstream's conversion: a deep copy with ``reparameterize`` called on every module that has one."""
    converted = copy.deepcopy(model)
    for module in list(converted.modules()):
        if hasattr(module, "reparameterize"):
            module.reparameterize()
    return converted


def train_model() -> nn.Module:
    return train_form(FastViT, seed=61)


def deploy_model() -> nn.Module:
    return FastViT(inference_mode=True).eval()


def upstream_deploy(model: nn.Module) -> nn.Module:
    return reparameterize_model(model).eval()

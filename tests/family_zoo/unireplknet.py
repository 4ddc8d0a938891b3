"""Toy models for UniRepLKNet (Ding et al., CVPR 2024).

Written for these tests from the layout and conversion math of AILab-CVC/UniRepLKNet
``unireplknet.py`` (no code copied). Names, forward order and conversion are upstream's:

- ``DilatedReparamBlock`` (depthwise, stride 1): ``origin_bn(lk_origin(x))`` plus, for each
  (k, r) of its kernel size's table, ``dil_bn_k{k}_{r}(dil_conv_k{k}_{r}(x))`` (depthwise k×k,
  dilation r, padding (r(k-1)+1)//2, no bias). Deploy form: ``lk_origin`` with a bias and no
  other module. ``merge_dilated_branches`` folds every BN into its conv, spreads each dilated
  kernel to its (r(k-1)+1)-wide non-dilated equivalent (taps every r-th place), pads it to the
  large kernel's centre and adds it.
- ``UniRepLKNetBlock``: ``x + gamma * pwconv2(act(pwconv1(se(norm(dwconv(x))))))`` where ``dwconv``
  is a DilatedReparamBlock (k >= 7), a bias-free depthwise conv (k in {3, 5}) or Identity (k = 0),
  ``norm`` a BN (Identity for k = 0 or in deploy form), ``se`` an ``SEBlock`` (``down``/``up``),
  ``pwconv1`` = (NCHW->NHWC, Linear), ``act`` = (GELU, GRN with ``gamma``/``beta``),
  ``pwconv2`` = (Linear without bias, NHWC->NCHW, BN). ``reparameterize`` merges the dilated
  branches, folds ``norm`` into the depthwise conv, projects the GRN ``beta`` through the
  ``pwconv2`` linear, folds ``pwconv2``'s BN and the layer scale ``gamma`` into that linear, and
  deletes ``gamma``, the GRN ``beta`` and the BN. GELU, GRN (``gamma`` stays) and SE stay.
- BN eps is PyTorch's default 1e-5; GRN divides by (mean norm + 1e-6); LayerNorms use 1e-6.

The toy network keeps upstream's block and head but shortens the stem to one stride-1 conv plus
channels-first LayerNorm, so that the 17×17 and 13×13 kernels see a 16×16 map and every tap of
every dilated branch reaches real pixels. Stage 1 (8 channels, 16×16): kernels 13, 17, 3;
stage 2 (16 channels, 8×8): kernels 7, 5 (without layer scale), 0, 9.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .seeded import train_form

EPS = 1e-5
FAMILIES = {"unireplknet", "unireplknet_ffn"}
"""The families whose blocks this model holds (tests/test_family_contract.py)."""
INPUT_SHAPE = (2, 3, 16, 16)

# Upstream's (kernel sizes, dilations) of the dilated branches, per large kernel size.
DILATED_BRANCHES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


class GRNwithNHWC(nn.Module):
    """Global response normalisation on NHWC input: ``(gamma * Nx + 1) * x (+ beta)``."""

    def __init__(self, dim: int, use_bias: bool = True) -> None:
        super().__init__()
        self.use_bias = use_bias
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        if use_bias:
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        relative = norms / (norms.mean(dim=-1, keepdim=True) + 1e-6)
        out = (self.gamma * relative + 1) * x
        return out + self.beta if self.use_bias else out


class NCHWtoNHWC(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class NHWCtoNCHW(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


class SEBlock(nn.Module):
    def __init__(self, input_channels: int, internal_neurons: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(input_channels, internal_neurons, 1, bias=True)
        self.up = nn.Conv2d(internal_neurons, input_channels, 1, bias=True)
        self.nonlinear = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.sigmoid(self.up(self.nonlinear(self.down(F.adaptive_avg_pool2d(x, 1)))))
        return x * weights


def fuse_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Kernel and bias of eval ``bn(conv(x))``, the conv's own bias included."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv_bias = 0 if conv.bias is None else conv.bias
    return conv.weight * scale.view(-1, 1, 1, 1), bn.bias + (conv_bias - bn.running_mean) * scale


def convert_dilated_to_nondilated(kernel: Tensor, dilation: int) -> Tensor:
    """The (r(k-1)+1)-wide kernel of a k×k kernel with dilation r: taps every r-th place, zeros between."""
    k = kernel.shape[-1]
    size = dilation * (k - 1) + 1
    spread = kernel.new_zeros(*kernel.shape[:2], size, size)
    spread[..., ::dilation, ::dilation] = kernel
    return spread


def merge_dilated_into_large_kernel(large_kernel: Tensor, dilated_kernel: Tensor, dilation: int) -> Tensor:
    spread = convert_dilated_to_nondilated(dilated_kernel, dilation)
    margin = large_kernel.shape[-1] // 2 - spread.shape[-1] // 2
    return large_kernel + F.pad(spread, (margin, margin, margin, margin))


def depthwise_conv(channels: int, k: int, bias: bool, dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, k, 1, k // 2, groups=channels, bias=bias, dtype=dtype, device=device)


def conv_from(weight: Tensor, bias: Tensor) -> nn.Conv2d:
    """A depthwise stride-1 'same' conv holding ``weight`` and ``bias``."""
    conv = depthwise_conv(weight.shape[0], weight.shape[-1], True, weight.dtype, weight.device)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


class DilatedReparamBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int, deploy: bool) -> None:
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(f"no dilated branches for kernel size {kernel_size}")
        self.lk_origin = depthwise_conv(channels, kernel_size, bias=deploy)
        self.kernel_sizes, self.dilates = (list(v) for v in DILATED_BRANCHES[kernel_size])
        if deploy:
            return
        self.origin_bn = nn.BatchNorm2d(channels, eps=EPS)
        for k, r in zip(self.kernel_sizes, self.dilates):
            padding = (r * (k - 1) + 1) // 2
            self.add_module(f"dil_conv_k{k}_{r}", nn.Conv2d(channels, channels, k, 1, padding, r, channels, bias=False))
            self.add_module(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels, eps=EPS))

    def branches(self):
        for k, r in zip(self.kernel_sizes, self.dilates):
            yield r, getattr(self, f"dil_conv_k{k}_{r}"), getattr(self, f"dil_bn_k{k}_{r}")

    def forward(self, x: Tensor) -> Tensor:
        if not hasattr(self, "origin_bn"):
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for _, conv, bn in self.branches():
            out = out + bn(conv(x))
        return out

    def merge_dilated_branches(self) -> None:
        if not hasattr(self, "origin_bn"):
            return
        kernel, bias = fuse_bn(self.lk_origin, self.origin_bn)
        for r, conv, bn in list(self.branches()):
            branch_kernel, branch_bias = fuse_bn(conv, bn)
            kernel = merge_dilated_into_large_kernel(kernel, branch_kernel, r)
            bias = bias + branch_bias
        self.lk_origin = conv_from(kernel, bias)
        del self.origin_bn
        for k, r in zip(self.kernel_sizes, self.dilates):
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")


class UniRepLKNetBlock(nn.Module):
    def __init__(self, dim: int, kernel_size: int, layer_scale_init_value: float | None = 1e-6,
                 deploy: bool = False, ffn_factor: int = 4) -> None:
        super().__init__()
        if kernel_size == 0:
            self.dwconv: nn.Module = nn.Identity()
        elif kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size, deploy)
        elif kernel_size in (3, 5):
            self.dwconv = depthwise_conv(dim, kernel_size, bias=deploy)
        else:
            raise ValueError(f"unsupported kernel size {kernel_size}")
        self.norm = nn.Identity() if deploy or kernel_size == 0 else nn.BatchNorm2d(dim, eps=EPS)
        self.se = SEBlock(dim, dim // 4)
        ffn_dim = ffn_factor * dim
        self.pwconv1 = nn.Sequential(NCHWtoNHWC(), nn.Linear(dim, ffn_dim))
        self.act = nn.Sequential(nn.GELU(), GRNwithNHWC(ffn_dim, use_bias=not deploy))
        if deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim), NHWCtoNCHW())
        else:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim, bias=False), NHWCtoNCHW(),
                                         nn.BatchNorm2d(dim, eps=EPS))
        use_scale = not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if use_scale else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + y

    def _fold_norm_into_dwconv(self) -> None:
        norm = self.norm
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        if hasattr(self.dwconv, "lk_origin"):
            conv = self.dwconv.lk_origin
            bias = norm.bias + (conv.bias - norm.running_mean) * scale
            self.dwconv.lk_origin = conv_from(conv.weight * scale.view(-1, 1, 1, 1), bias)
        else:
            # Upstream rebuilds the plain depthwise conv and ignores any bias it had (it has none).
            conv = self.dwconv
            self.dwconv = conv_from(conv.weight * scale.view(-1, 1, 1, 1), norm.bias - norm.running_mean * scale)
        self.norm = nn.Identity()

    def _fold_grn_bias_bn_and_scale_into_pwconv2(self, final_scale: Tensor | float) -> None:
        grn = self.act[1]
        linear, to_nchw, bn = self.pwconv2
        projected = linear.weight @ grn.beta.reshape(-1)
        del grn.beta
        grn.use_bias = False
        linear_bias = projected if linear.bias is None else linear.bias + projected
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        merged = nn.Linear(linear.in_features, linear.out_features, bias=True,
                           dtype=linear.weight.dtype, device=linear.weight.device)
        with torch.no_grad():
            merged.weight.copy_(linear.weight * (scale * final_scale).view(-1, 1))
            merged.bias.copy_((bn.bias + (linear_bias - bn.running_mean) * scale) * final_scale)
        self.pwconv2 = nn.Sequential(merged, to_nchw)

    def reparameterize(self) -> None:
        """Upstream's block conversion (one call; the order of the steps is upstream's)."""
        with torch.no_grad():
            if hasattr(self.dwconv, "merge_dilated_branches"):
                self.dwconv.merge_dilated_branches()
            if hasattr(self.norm, "running_var"):
                self._fold_norm_into_dwconv()
            final_scale: Tensor | float = 1
            if self.gamma is not None:
                final_scale = self.gamma.detach().clone()
                self.gamma = None
            # Upstream drops the layer scale even when this fold does not run (it always runs
            # on a train-form block: GRN has a bias and pwconv2 has its BN).
            if self.act[1].use_bias and len(self.pwconv2) == 3:
                self._fold_grn_bias_bn_and_scale_into_pwconv2(final_scale)


class LayerNorm(nn.Module):
    """ConvNeXt's channels-first LayerNorm (``weight``, ``bias``, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


# (kernel size, layer scale init) per block, per stage.
TOY_STAGES: tuple[tuple[tuple[int, float | None], ...], ...] = (
    ((13, 1e-6), (17, 1e-6), (3, 1e-6)),
    ((7, 1e-6), (5, None), (0, 1e-6), (9, 1e-6)),
)


class UniRepLKNet(nn.Module):
    """A tiny UniRepLKNet classifier (``output_mode='logits'``); ``deploy=True`` builds the deploy form."""

    def __init__(self, deploy: bool = False, dims: tuple[int, int] = (8, 16), num_classes: int = 10) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, dims[0], 3, 1, 1), LayerNorm(dims[0])),
            nn.Sequential(nn.Conv2d(dims[0], dims[1], 3, 2, 1), LayerNorm(dims[1])),
        ])
        self.stages = nn.ModuleList(
            nn.Sequential(*(UniRepLKNetBlock(dim, k, scale, deploy=deploy) for k, scale in spec))
            for dim, spec in zip(dims, TOY_STAGES)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.head(self.norm(x.mean((-2, -1))))

    def reparameterize_unireplknet(self) -> None:
        """Upstream's conversion: ``reparameterize`` on every module that has one."""
        for module in list(self.modules()):
            if hasattr(module, "reparameterize"):
                module.reparameterize()


def train_model() -> nn.Module:
    return train_form(UniRepLKNet, seed=51)


def deploy_model() -> nn.Module:
    return UniRepLKNet(deploy=True).eval()


def upstream_deploy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` converted the way upstream's ``reparameterize_unireplknet`` does it."""
    converted = copy.deepcopy(model)
    converted.reparameterize_unireplknet()
    return converted.eval()

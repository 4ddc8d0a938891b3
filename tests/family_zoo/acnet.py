"""Toy models for the `acnet` family: ACNet's ACBlock layouts and forward order.

Written for these tests from the layout of DingXiaoH/ACNet ``acnet/acb.py`` (``ACBlock``:
``square_conv``/``square_bn`` k×k, ``ver_conv``/``ver_bn`` k×1, ``hor_conv``/``hor_bn`` 1×k,
an int ``crop`` when padding < k//2; deploy form ``fused_conv``) and of the earlier layout still
in DingXiaoH/DiverseBranchBlock ``acb.py`` (``ver_conv_crop_layer``/``hor_conv_crop_layer``,
optional ``last_bn`` on the sum, optional ``nonlinear``).
"""

from __future__ import annotations

from torch import Tensor, nn

from tests import zoo

EPS = 1e-5
INPUT_SHAPE = (2, 3, 32, 32)


class ACBlock(nn.Module):
    """ACNet's current ACBlock (``acnet/acb.py``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, padding_mode: str = "zeros",
                 deploy: bool = False, use_affine: bool = True) -> None:
        super().__init__()
        self.deploy = deploy
        k = kernel_size
        if deploy:
            self.fused_conv = nn.Conv2d(in_channels, out_channels, (k, k), stride, padding, dilation, groups,
                                        bias=True, padding_mode=padding_mode)
            return
        self.square_conv = nn.Conv2d(in_channels, out_channels, (k, k), stride, padding, dilation, groups,
                                     bias=False, padding_mode=padding_mode)
        self.square_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        if padding >= k // 2:
            self.crop = 0
            ver_padding = (padding, padding - k // 2)
            hor_padding = (padding - k // 2, padding)
        else:
            self.crop = k // 2 - padding
            ver_padding = (padding, 0)
            hor_padding = (0, padding)
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (k, 1), stride, ver_padding, dilation, groups,
                                  bias=False, padding_mode=padding_mode)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, k), stride, hor_padding, dilation, groups,
                                  bias=False, padding_mode=padding_mode)
        self.ver_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        self.hor_bn = nn.BatchNorm2d(out_channels, affine=use_affine)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self.fused_conv(x)
        square = self.square_bn(self.square_conv(x))
        if self.crop > 0:
            ver_input = x[:, :, :, self.crop:-self.crop]
            hor_input = x[:, :, self.crop:-self.crop, :]
        else:
            ver_input = hor_input = x
        vertical = self.ver_bn(self.ver_conv(ver_input))
        horizontal = self.hor_bn(self.hor_conv(hor_input))
        return square + vertical + horizontal


class CropLayer(nn.Module):
    """Crops ``-crop_set[0]`` rows and ``-crop_set[1]`` columns from each side."""

    def __init__(self, crop_set: tuple[int, int]) -> None:
        super().__init__()
        self.rows_to_crop = -crop_set[0]
        self.cols_to_crop = -crop_set[1]
        assert self.rows_to_crop >= 0 and self.cols_to_crop >= 0

    def forward(self, x: Tensor) -> Tensor:
        r, c = self.rows_to_crop, self.cols_to_crop
        return x[:, :, r:x.shape[2] - r, c:x.shape[3] - c]


class ACBlockCropLayer(nn.Module):
    """The earlier ACBlock layout: crop layers, optional ``last_bn`` and ``nonlinear``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, padding_mode: str = "zeros",
                 deploy: bool = False, use_affine: bool = True, use_last_bn: bool = False,
                 nonlinear: nn.Module | None = None) -> None:
        super().__init__()
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.deploy = deploy
        k = kernel_size
        if deploy:
            self.fused_conv = nn.Conv2d(in_channels, out_channels, (k, k), stride, padding, dilation, groups,
                                        bias=True, padding_mode=padding_mode)
            return
        self.square_conv = nn.Conv2d(in_channels, out_channels, (k, k), stride, padding, dilation, groups,
                                     bias=False, padding_mode=padding_mode)
        self.square_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        offset = padding - k // 2
        ver_pad_or_crop, hor_pad_or_crop = (padding, offset), (offset, padding)
        if offset >= 0:
            self.ver_conv_crop_layer, self.hor_conv_crop_layer = nn.Identity(), nn.Identity()
            ver_padding, hor_padding = ver_pad_or_crop, hor_pad_or_crop
        else:
            self.ver_conv_crop_layer = CropLayer(ver_pad_or_crop)
            self.hor_conv_crop_layer = CropLayer(hor_pad_or_crop)
            ver_padding = hor_padding = (0, 0)
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (k, 1), stride, ver_padding, dilation, groups,
                                  bias=False, padding_mode=padding_mode)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, k), stride, hor_padding, dilation, groups,
                                  bias=False, padding_mode=padding_mode)
        self.ver_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        self.hor_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        if use_last_bn:
            self.last_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self.fused_conv(x)
        square = self.square_bn(self.square_conv(x))
        vertical = self.ver_bn(self.ver_conv(self.ver_conv_crop_layer(x)))
        horizontal = self.hor_bn(self.hor_conv(self.hor_conv_crop_layer(x)))
        result = square + vertical + horizontal
        if hasattr(self, "last_bn"):
            result = self.last_bn(result)
        return self.nonlinear(result)


class ACNet(nn.Module):
    """Strided, grouped, k=5, affine=False, cropping (padding < k//2) and last_bn blocks."""

    def __init__(self, deploy: bool = False, num_classes: int = 10) -> None:
        super().__init__()
        d = deploy
        self.body = nn.Sequential(
            ACBlock(3, 8, 3, stride=2, padding=1, deploy=d), nn.ReLU(),                     # 32 -> 16
            ACBlock(8, 8, 3, padding=1, groups=2, deploy=d), nn.ReLU(),                     # 16
            ACBlock(8, 16, 5, stride=2, padding=2, use_affine=False, deploy=d), nn.ReLU(),  # 16 -> 8
            ACBlock(16, 16, 3, padding=0, deploy=d), nn.ReLU(),                             # crop 1: 8 -> 6
            ACBlockCropLayer(16, 16, 3, padding=1, use_last_bn=True, deploy=d), nn.ReLU(),  # 6
            ACBlockCropLayer(16, 16, 3, padding=0, groups=4, use_last_bn=True, deploy=d),   # crop layers: 6 -> 4
            ACBlock(16, 16, 5, padding=1, deploy=d),                                        # crop 1: 4 -> 2
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean((2, 3)))


def train_model():
    return zoo.randomize_bn(ACNet(), seed=31).eval()


def deploy_model():
    return ACNet(deploy=True).eval()

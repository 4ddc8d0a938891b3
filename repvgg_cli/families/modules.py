"""Reading a block from a live model (the module tree): eps, stride, groups, padding and dilation
come from the modules themselves; and the fused conv put back as a module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..algebra import maps
from ..algebra.maps import Map
from ..errors import InputError, UnsupportedError
from ..fusion.values import BatchNorm, ConvBranch, FusedConv, IdentityBranch


def is_batch_norm(module: object) -> bool:
    """BatchNorm1d/2d/3d, SyncBatchNorm and their subclasses (e.g. timm's BatchNormAct2d)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)



def bn_from_module(bn: nn.Module, where: str) -> BatchNorm:
    """The eval-mode parameters of a live BN module, eps included."""
    if not is_batch_norm(bn):
        raise UnsupportedError(f"{where} is a {type(bn).__name__}, not a BatchNorm")
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise UnsupportedError(
            f"{where} has track_running_stats=False: it normalises with batch statistics "
            "and cannot be folded into a conv"
        )
    act = getattr(bn, "act", None)  # timm's BatchNormAct2d: BN, then an activation
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        raise UnsupportedError(
            f"{where} applies {type(act).__name__} after the BatchNorm, inside the branch; "
            "a branch with an activation before the sum cannot be fused"
        )
    return BatchNorm(
        running_mean=bn.running_mean,
        running_var=bn.running_var,
        eps=float(bn.eps),
        weight=bn.weight if bn.affine else None,
        bias=bn.bias if bn.affine else None,
    )



def identity_from_module(module: nn.Module | None, where: str) -> IdentityBranch | None:
    """A live skip branch: a BN (its eval form), ``nn.Identity`` (plain ``x``) or None (no branch)."""
    if module is None:
        return None
    if is_batch_norm(module):
        return IdentityBranch(bn=bn_from_module(module, where))
    if isinstance(module, nn.Identity):
        return IdentityBranch()
    raise UnsupportedError(f"{where} is a {type(module).__name__}; a BatchNorm, nn.Identity or None is expected")



def conv_branch_from_module(conv: nn.Module, bn: nn.Module | None, where: str) -> ConvBranch:
    """A live ``nn.Conv2d`` (+ optional BN) as a :class:`ConvBranch` with its own geometry."""
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedError(f"{where} is a {type(conv).__name__}, not a Conv2d")
    if isinstance(conv.padding, str):
        raise UnsupportedError(f"{where} uses padding={conv.padding!r}; numeric padding is needed")
    return ConvBranch(
        weight=conv.weight,
        bias=conv.bias,
        bn=bn_from_module(bn, f"{where} BN") if bn is not None else None,
        padding=tuple(conv.padding),
        dilation=tuple(conv.dilation),
        padding_mode=conv.padding_mode,
    )



def geometry_from_conv(conv: nn.Conv2d) -> dict:
    """The block geometry read off its main conv, as keyword arguments of :class:`Branches`."""
    return dict(
        groups=int(conv.groups),
        stride=tuple(conv.stride),
        padding=tuple(conv.padding),
        dilation=tuple(conv.dilation),
        padding_mode=conv.padding_mode,
        in_channels=int(conv.in_channels),
        geometry_known=True,
    )



def conv_from_fused(fused: FusedConv, like: Tensor) -> nn.Conv2d:
    """A fresh ``nn.Conv2d`` holding ``fused``, with the dtype and device of ``like``."""
    conv = nn.Conv2d(
        fused.in_channels,
        fused.out_channels,
        fused.kernel_size,
        stride=fused.stride,
        padding=fused.padding,
        dilation=fused.dilation,
        groups=fused.groups,
        bias=True,
        padding_mode=fused.padding_mode,
        device="meta",
    )
    conv.weight = nn.Parameter(fused.weight.to(device=like.device, dtype=like.dtype).clone())
    conv.bias = nn.Parameter(fused.bias.to(device=like.device, dtype=like.dtype).clone())
    return conv



class ModuleView:
    """A live block, read the way a :class:`~.keys.KeyView` reads keys (the same calls), with
    the geometry and eps each module really has.

    ``path`` arguments are attribute paths under the block (``"rbr_dense.conv"``); a missing
    child reads as absent (:meth:`has` False), a child of an unexpected type is refused with
    the reason.
    """

    tree = "module"

    def __init__(self, module: nn.Module, name: str, options: object = None) -> None:
        self.module, self.name, self.options = module, name, options
        self.notes: list[str] = []
        self.dtype = None
        self.eps_note = "module"
        self.weight_shape: tuple[int, ...] | None = None
        self.claimed: set[str] = set()

    @property
    def where(self) -> str:
        return self.name or "<root>"

    def note(self, text: str) -> None:
        self.notes.append(text)

    def get(self, path: str) -> object:
        """The child at ``path`` (None when any step is missing or None)."""
        value: object = self.module
        for part in path.split(".") if path else ():
            value = getattr(value, part, None)
            if value is None:
                return None
        return value

    def has(self, path: str) -> bool:
        return self.get(path) is not None

    def has_any(self, path: str) -> bool:
        return self.has(path)

    def tensor(self, path: str, required: bool = True):
        value = self.get(path)
        if value is None and required:
            raise UnsupportedError(f"{self.where}: {path} is missing")
        return value

    def label(self, path: str) -> str:
        """The module path of ``path`` (for messages)."""
        return f"{self.name}.{path}" if self.name else path

    _label = label

    def own(self, path: str) -> None:
        """Claim the child at ``path`` for this block (see :meth:`.keys.KeyView.own`)."""
        self.claimed.add(path)

    def kernel(self, path: str) -> Tensor:
        """A bare 4-D kernel parameter at ``path``."""
        value = self.get(path)
        if not isinstance(value, Tensor) or value.dim() != 4 or not value.is_floating_point():
            raise UnsupportedError(f"{self.label(path)} is not a 4-D floating-point kernel")
        if self.dtype is None:
            self.dtype = value.dtype
        return value

    def _conv(self, path: str, bias: bool = True) -> Map:
        """The ``nn.Conv2d`` at ``path`` with its own geometry (the module's, whatever a family
        assumes for a state dict)."""
        module = self.get(path)
        if not isinstance(module, nn.Conv2d):
            raise UnsupportedError(f"{self._label(path)} is a {type(module).__name__}, not a Conv2d")
        if isinstance(module.padding, str):
            raise UnsupportedError(f"{self._label(path)} uses padding={module.padding!r}; numeric padding is needed")
        if self.dtype is None:
            self.dtype = module.weight.dtype
        return maps.conv(
            module.weight, module.bias if bias else None, stride=tuple(module.stride), padding=tuple(module.padding),
            dilation=tuple(module.dilation), groups=int(module.groups), padding_mode=module.padding_mode,
            in_channels=int(module.in_channels), known=True,
        )

    def linear(self, path: str, bias: bool = True) -> Map:
        """The ``nn.Linear`` at ``path``."""
        module = self.get(path)
        if not isinstance(module, nn.Linear):
            raise UnsupportedError(f"{self._label(path)} is a {type(module).__name__}, not a Linear")
        if self.dtype is None:
            self.dtype = module.weight.dtype
        return maps.linear(module.weight, module.bias if bias else None)

    def bn(self, path: str, channels: int | None = None, of: str = "") -> Map:
        return maps.bn(bn_from_module(self.get(path), self._label(path)))

    def conv_bn(self, conv: str, norm: str | None) -> Map:
        value = self.conv(conv)
        return value if norm is None else maps.then(value, self.bn(norm))

    def identity_bn(self, path: str) -> Map | None:
        """The skip branch at ``path``: a BN (then the identity with it), ``nn.Identity``, or None."""
        module = self.get(path)
        if module is None:
            return None
        if is_batch_norm(module):
            return maps.then(maps.identity(), self.bn(path))
        if isinstance(module, nn.Identity):
            return maps.identity()
        raise UnsupportedError(f"{self._label(path)} is a {type(module).__name__}; a BatchNorm, nn.Identity or "
                               "None is expected")

    def scale(self, path: str, channels: int, required: bool = True) -> Map | None:
        value = self.tensor(path, required=required)
        if value is None:
            return None
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() != channels:
            raise InputError(f"{self.label(path)} is not {channels} floating-point per-channel values")
        return maps.scale(value)

    def conv(self, path: str, bias: bool = True, **ignored) -> Map:
        return self._conv(path, bias)

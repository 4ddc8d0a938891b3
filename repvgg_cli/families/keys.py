"""Reading a block from a state dict (the key tree): its keys under one prefix, each checked where
it is read (shape, dtype, finite), and the algebra's leaves built from them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..algebra import maps
from ..algebra.maps import Map
from ..errors import InputError, UnsupportedError
from ..fusion.values import BatchNorm, Branches, ConvBranch

BN_STAT_KEYS = ("running_mean", "running_var")


BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def join(prefix: str, *parts: str) -> str:
    """Join key parts with dots, skipping empty ones (a block may sit at the root)."""
    return ".".join(p for p in (prefix, *parts) if p)



@dataclass
class KeyView:
    """The keys of a state dict under one prefix, recording which ones a family read.

    A family's :meth:`~.base.Family.expression` reads its block through :meth:`conv`,
    :meth:`bn`, :meth:`conv_bn`, :meth:`identity_bn`, :meth:`scale` and :meth:`has`: the same
    calls a :class:`~.modules.ModuleView` answers from a live model. A state dict stores no
    geometry: convs are taken as centred (padding ``dilation * (k // 2)``), stride 1, groups
    unknown; no BN eps either: :attr:`eps` is the one the family was told to use.
    """

    state: Mapping[str, Tensor]
    prefix: str
    read: set[str] = field(default_factory=set)
    eps: float = 1e-5
    eps_note: str = "family default"
    eps_source: str = "default"
    options: object = None
    notes: list[str] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    _dtype_set: bool = False
    tree: str = "key"
    weight_shape: tuple[int, ...] | None = None
    """Set by a family whose deploy weight is not a conv's (a linear layer's ``(out, in)``)."""
    claimed: set[str] = field(default_factory=set)
    """Keys a family claimed beyond its declared parts (see :meth:`own`)."""

    def key(self, local: str) -> str:
        return join(self.prefix, local)

    def has(self, local: str) -> bool:
        return self.key(local) in self.state

    def has_any(self, local_prefix: str) -> bool:
        start = self.key(local_prefix) + "."
        return any(k.startswith(start) for k in self.state)

    def tensor(self, local: str, required: bool = True) -> Tensor | None:
        full = self.key(local)
        if full not in self.state:
            if required:
                raise InputError(f"block {self.prefix or '<root>'}: key {full} is missing")
            return None
        value = self.state[full]
        if not isinstance(value, Tensor):
            raise InputError(
                f"block {self.prefix or '<root>'}: key {full} holds a {type(value).__name__}, not a tensor"
            )
        self.read.add(full)
        return value

    def mark(self, local: str) -> None:
        """Mark a key as owned by the block without reading it (e.g. num_batches_tracked)."""
        if self.has(local):
            self.read.add(self.key(local))

    @property
    def where(self) -> str:
        return f"block {self.prefix or '<root>'}"

    def label(self, local: str) -> str:
        """The full key of ``local`` (for messages)."""
        return self.key(local)

    def own(self, local: str) -> None:
        """Claim every key under ``local`` for this block (an option-dependent part, e.g. a post-sum
        BN that is folded): they are then the block's, and one left unread is refused."""
        self.claimed |= self.owned_under(local)

    def note(self, text: str) -> None:
        """Something worth reporting about this block (shown once per note with its blocks)."""
        self.notes.append(text)

    def _first_weight(self, weight: Tensor) -> None:
        if not self._dtype_set:  # the fused conv is written in the dtype of the first conv read
            self.dtype, self._dtype_set = weight.dtype, True

    # -- the algebra's leaves, read from keys ----------------------------------------------------

    def linear(self, local: str, bias: bool = True) -> Map:
        """``<local>.weight`` (2-D, a linear layer) and, when present and ``bias``, ``<local>.bias``."""
        weight = self.tensor(join(local, "weight"))
        if weight.dim() != 2 or not weight.is_floating_point():
            raise InputError(f"{self.where}: {self.key(join(local, 'weight'))} has shape {tuple(weight.shape)} and "
                             f"dtype {weight.dtype}; a linear weight is 2-D floating point")
        if not _finite(weight):
            raise InputError(f"{self.where}: {self.key(join(local, 'weight'))} holds NaN or Inf")
        self._first_weight(weight)
        of = f"{self.key(join(local, 'weight'))} (output features)"
        vector = channel_vector(self, join(local, "bias"), int(weight.shape[0]), of, required=False) if bias else None
        return maps.linear(weight, vector)

    def conv(self, local: str, bias: bool = True, *, groups: int | None = None, padding=None,
             dilation=1, stride=1) -> Map:
        """``<local>.weight`` (4-D) and, when present and ``bias``, ``<local>.bias``.

        A state dict stores no geometry: ``groups``, ``padding`` (default: centred), ``dilation``
        and ``stride`` are what the family knows of its project (the key name, a class invariant).
        """
        weight = conv_weight(self, join(local, "weight"))
        self._first_weight(weight)
        of = f"{self.key(join(local, 'weight'))} (output channels)"
        vector = channel_vector(self, join(local, "bias"), int(weight.shape[0]), of, required=False) if bias else None
        return maps.conv(weight, vector, groups=groups, padding=padding, dilation=dilation, stride=stride,
                            in_channels=None if groups is None else int(weight.shape[1]) * groups)

    def kernel(self, local: str) -> Tensor:
        """A bare 4-D kernel stored at ``local`` (a weight-space parameter, not a module's
        ``.weight``), checked like a conv weight."""
        weight = conv_weight(self, local)
        self._first_weight(weight)
        return weight

    def bn(self, local: str, channels: int | None = None, of: str = "") -> Map:
        """The BatchNorm at ``local`` (eps: the view's)."""
        return maps.bn(bn_from_keys(self, local, self.eps, channels, of))

    def conv_bn(self, conv: str, norm: str | None) -> Map:
        """A conv at ``conv`` followed by the BN at ``norm`` (None: no BN)."""
        value = self.conv(conv)
        if norm is None:
            return value
        weight = value.convs[0].weight
        return maps.then(value, self.bn(norm, int(weight.shape[0]),
                                           f"{self.key(join(conv, 'weight'))} (output channels)"))

    def identity_bn(self, local: str) -> Map | None:
        """The identity branch with its BN at ``local``, or None when the state dict has none."""
        if not self.has_any(local):
            return None
        return maps.then(maps.identity(), self.bn(local))

    def scale(self, local: str, channels: int, required: bool = True) -> Map | None:
        """A per-channel factor stored at ``local`` (any shape with ``channels`` values)."""
        value = self.tensor(local, required=required)
        if value is None:
            return None
        if not value.is_floating_point() or value.numel() != channels:
            raise InputError(f"{self.where}: {self.key(local)} has shape {tuple(value.shape)} and dtype "
                             f"{value.dtype}; {channels} floating-point values are expected")
        if not _finite(value):
            raise InputError(f"{self.where}: {self.key(local)} holds NaN or Inf")
        return maps.scale(value)

    def owned_under(self, *local_prefixes: str) -> set[str]:
        """Every key under the given sub-prefixes (the block's branch modules)."""
        starts = tuple(self.key(p) + "." if self.key(p) else "" for p in local_prefixes)
        return {k for k in self.state if k.startswith(starts)}



def _finite(tensor: Tensor) -> bool:
    """No NaN or Inf anywhere. Fast path: NaN/Inf propagate into a plain sum (no mask is built);
    only when that sum is not finite (which huge finite values can also cause) look element-wise."""
    tensor = tensor.detach()
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())



def conv_weight(view: KeyView, local: str) -> Tensor:
    weight = view.tensor(local)
    assert weight is not None
    if weight.dim() != 4:
        raise InputError(
            f"block {view.prefix or '<root>'}: {view.key(local)} has shape {tuple(weight.shape)}; "
            "a conv weight has 4 dimensions"
        )
    if not weight.is_floating_point():
        raise InputError(f"block {view.prefix or '<root>'}: {view.key(local)} has dtype {weight.dtype}; "
                         "a conv weight is floating point")
    if not _finite(weight):
        raise InputError(f"block {view.prefix or '<root>'}: {view.key(local)} holds NaN or Inf")
    return weight



def channel_vector(view: KeyView, local: str, channels: int, of: str, required: bool = True) -> Tensor | None:
    """A per-channel vector (conv bias, BN statistic or affine parameter), checked where it is read.

    Args:
        view: the block's keys.
        local: the vector's key under the block.
        channels: the length it must have.
        of: what fixes that length, for the message (e.g. the conv weight's key).
        required: raise when the key is absent (else return None).
    """
    vector = view.tensor(local, required=required)
    if vector is None:
        return None
    where, key = f"block {view.prefix or '<root>'}", view.key(local)
    if vector.dim() != 1:
        raise InputError(f"{where}: {key} has shape {tuple(vector.shape)}; a per-channel vector has 1 dimension")
    if not vector.is_floating_point():
        raise InputError(f"{where}: {key} has dtype {vector.dtype}; a floating-point tensor is needed")
    if vector.shape[0] != channels:
        raise InputError(f"{where}: {key} has {vector.shape[0]} channels but {of} has {channels}")
    if not _finite(vector):
        raise InputError(f"{where}: {key} holds NaN or Inf")
    return vector



def conv_branch_from_keys(view: KeyView, conv: str, bn: str | None, eps: float) -> ConvBranch:
    """A conv (``<conv>.weight``, optional ``<conv>.bias``) followed by an optional BN at ``bn``."""
    weight = conv_weight(view, join(conv, "weight"))
    of = f"{view.key(join(conv, 'weight'))} (output channels)"
    bias = channel_vector(view, join(conv, "bias"), int(weight.shape[0]), of, required=False)
    norm = bn_from_keys(view, bn, eps, int(weight.shape[0]), of) if bn else None
    return ConvBranch(weight=weight, bias=bias, bn=norm)



def bn_from_keys(view: KeyView, local: str, eps: float, channels: int | None = None, of: str = "") -> BatchNorm:
    """Read a BatchNorm's tensors from ``<local>.{weight,bias,running_mean,running_var}``.

    Args:
        view, local: the block's keys and the BN's prefix under it.
        eps: the BN eps (a state dict does not store it).
        channels, of: the number of channels the BN must have and what fixes it (e.g. its conv);
            None: as many as its ``running_mean``.
    """
    where = f"block {view.prefix or '<root>'}"
    present = [part for part in BN_KEYS[:4] if view.has(join(local, part))]
    stats = [part for part in BN_STAT_KEYS if part in present]
    if len(stats) == 1:
        missing = next(part for part in BN_STAT_KEYS if part not in stats)
        raise InputError(f"{where}: key {view.key(join(local, missing))} is missing "
                         f"(BatchNorm {view.key(local)} has {stats[0]})")
    if not stats:
        if present:
            raise UnsupportedError(
                f"{where}: BatchNorm {view.key(local)} has no running "
                "statistics (track_running_stats=False?); it normalises with batch statistics "
                "and cannot be folded into a conv",
            )
        raise InputError(f"{where}: BatchNorm {view.key(local)} is missing")
    affine = [part for part in ("weight", "bias") if part in present]
    if len(affine) == 1:
        missing = "bias" if affine == ["weight"] else "weight"
        raise InputError(f"{where}: key {view.key(join(local, missing))} is missing "
                         f"(BatchNorm {view.key(local)} has {affine[0]}; an affine BatchNorm has both)")
    if channels is None:
        mean = view.tensor(join(local, "running_mean"))
        assert mean is not None
        channels = int(mean.shape[0]) if mean.dim() == 1 else -1
        of = view.key(join(local, "running_mean"))
    vectors = {part: channel_vector(view, join(local, part), channels, of, required=part in BN_STAT_KEYS)
               for part in ("running_mean", "running_var", "weight", "bias")}
    if bool((vectors["running_var"].detach().to(torch.float64) < 0).any()):
        raise InputError(f"{where}: {view.key(join(local, 'running_var'))} has negative values; a variance cannot be")
    view.mark(join(local, "num_batches_tracked"))
    return BatchNorm(
        running_mean=vectors["running_mean"],
        running_var=vectors["running_var"],
        eps=eps,
        weight=vectors["weight"],
        bias=vectors["bias"],
    )



def check_branches_agree(view: KeyView, branches: Branches) -> None:
    """Summed branches must agree on channels: name the keys that do not (before any fusing)."""
    convs = [c for c in branches.convs if isinstance(c.weight, Tensor) and c.weight.dim() == 4]
    if not convs:
        return
    key_of = {id(view.state[k]): k for k in view.read}

    def name(tensor: Tensor, fallback: str) -> str:
        return key_of.get(id(tensor), fallback)

    first = name(convs[0].weight, "the first branch's weight")
    out, per_group = int(convs[0].weight.shape[0]), int(convs[0].weight.shape[1])
    where = f"block {view.prefix or '<root>'}"
    for index, conv in enumerate(convs[1:], start=1):
        if int(conv.weight.shape[0]) != out:
            raise UnsupportedError(f"{where}: {name(conv.weight, f'branch {index} weight')} has "
                                   f"{int(conv.weight.shape[0])} output channels but {first} has {out}; "
                                   "summed branches must agree")
        if int(conv.weight.shape[1]) != per_group:
            raise UnsupportedError(f"{where}: {name(conv.weight, f'branch {index} weight')} has "
                                   f"{int(conv.weight.shape[1])} input channels per group but {first} has "
                                   f"{per_group}; summed branches must agree")
    identity_bn = branches.identity.bn if branches.identity is not None else None
    if identity_bn is not None and isinstance(identity_bn.running_mean, Tensor):
        channels = int(identity_bn.running_mean.shape[0]) if identity_bn.running_mean.dim() == 1 else -1
        if channels != out:
            raise UnsupportedError(f"{where}: {name(identity_bn.running_mean, 'the identity BatchNorm')} has "
                                   f"{channels} channels but {first} has {out} output channels; "
                                   "an identity branch needs in == out")


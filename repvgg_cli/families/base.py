"""What every block family declares, and the one place that turns a declaration into blocks.

A family knows one naming convention (the "zoo" in DESIGN.md): the key that anchors its blocks,
the children a block owns, the expression of its branches over :mod:`repvgg_cli.algebra`
(written once, read from a state dict through a :class:`~.keys.KeyView` or from a live model
through a :class:`~.modules.ModuleView`), its deploy name, its eps default and where it comes
from. :meth:`Family.parse_keys`, :meth:`Family.parse_module` and :meth:`Family.to_deploy_module`
are the same for every family; a family overrides them only where its project does something
the declaration cannot say.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..algebra.maps import Map
from ..errors import UnsupportedError
from ..fusion.values import Branches, FusedConv, IdentityBranch
from .architectures import Architecture
from .keys import (
    KeyView,
    bn_from_keys,
    check_branches_agree,
    conv_branch_from_keys,
    join,
)
from .modules import ModuleView, conv_from_fused


@dataclass(frozen=True)
class FamilyOptions:
    """What a family may need beyond the tensors themselves.

    Attributes:
        bn_eps: BN eps for the key tree (state dicts do not store it); None: the family default.
        fold_post_bn: fold a post-sum BN (QARepVGG) into the conv where that is valid.
        no_identity: glob patterns of block names that have no parameter-free identity branch
            (the key tree cannot see an ``nn.Identity``; see the QARepVGG family's rule).
        avg_branch: glob patterns of block names that have a parameter-free avg-pool branch
            (YOLOv6 QARepVGGBlockV2; invisible in a state dict).
    """

    bn_eps: float | None = None
    fold_post_bn: bool = False
    no_identity: tuple[str, ...] = ()
    avg_branch: tuple[str, ...] = ()
    qa_variant: str | None = None
    """``"v1"``/``"v2"``: the QARepVGG block a state dict holds (None: the user has not said)."""
    architecture: Architecture | None = None
    """The whole-model architecture recognised from the key layout (see :mod:`.architectures`)."""


@dataclass(frozen=True)
class Block:
    """One re-parameterizable block found in a checkpoint or model.

    Attributes:
        name: the block's key prefix / module path ("" for a root block).
        family: the family's registry name.
        branches: the neutral description fed to the fusion.
        source_keys: state-dict keys the block replaces (key tree; module tree: its parameters).
        deploy_prefix: where the fused conv's ``weight``/``bias`` live in the deploy form.
        dtype: the dtype of the source tensors (the fused conv is written in it).
        eps_note: where BN eps came from ("module", "family default", "--bn-eps").
        notes: anything else worth reporting about this block.
    """

    name: str
    family: str
    branches: Branches
    source_keys: tuple[str, ...]
    deploy_prefix: str
    dtype: torch.dtype = torch.float32
    eps_note: str = "module"
    notes: tuple[str, ...] = ()
    weight_shape: tuple[int, ...] | None = None
    eps_source: str = "module"
    """Where BN eps came from: ``module`` (read from each BN), ``flag`` (``--bn-eps``), ``family``
    (the family's or the recognised architecture's own), ``default`` (PyTorch's 1e-5, nothing decided)."""
    """The deploy weight's shape when it is not the conv's (a linear layer's 2-D weight)."""

    @property
    def branch_labels(self) -> tuple[str, ...]:
        labels = [
            f"{c.kernel_size[0]}x{c.kernel_size[1]}" + ("+bn" if c.bn is not None else "")
            for c in self.branches.convs
        ]
        if self.branches.identity is not None:
            labels.append("id" + ("+bn" if self.branches.identity.bn is not None else ""))
        return tuple(labels)

    def deploy_state(self, fused: FusedConv) -> dict[str, Tensor]:
        """The deploy-form state-dict entries for this block's fused conv."""
        weight = fused.weight if self.weight_shape is None else fused.weight.reshape(self.weight_shape)
        return {
            join(self.deploy_prefix, "weight"): weight,
            join(self.deploy_prefix, "bias"): fused.bias,
        }



def source_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype the fused conv is written in: the main weight's."""
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32





class Family:
    """A block family: a declaration, read the same way from a state dict and from a live model.

    Class attributes (the declaration):
        name, title, source: registry name, what it is, the paper or upstream file it follows.
        anchor: a key (suffix) every block of the family has; its prefix is the block's name.
        parts: the block's train-form children: their keys are the block's (key tree) and they
            are deleted when a live block is switched (module tree). ``("",)``: everything under
            the block.
        deploy: the fused conv's name under the block ("" when the block itself becomes the conv).
        deploy_flags: attributes set on a live block once switched (e.g. ``deploy = True``).
        train_keys, deploy_keys, after_sum: for ``repvgg families`` and the README.
        default_eps: BN eps of the project (a state dict does not store it).
        encloses: families whose blocks sit inside this family's and are fused with them.
    Methods a family writes:
        :meth:`expression` (the branches, from either view), :meth:`matches_module`.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    source: ClassVar[str]
    anchor: ClassVar[str]
    train_keys: ClassVar[str]
    deploy_keys: ClassVar[str]
    after_sum: ClassVar[str] = "nothing"
    default_eps: ClassVar[float] = 1e-5
    deploy_anchor: ClassVar[str | None] = None
    parts: ClassVar[tuple[str, ...]] = ()
    deploy: ClassVar[str] = ""
    deploy_flags: ClassVar[dict[str, object]] = {}
    deploy_flags_if_present: ClassVar[dict[str, object]] = {}
    """Set on a switched live block only where it already has the attribute (e.g. timm's
    ``inference_mode``, which some versions of a block lack)."""
    kept: ClassVar[tuple[str, ...]] = ()
    """Children under the block that are not its (they stay in the deploy form), subtracted from
    :attr:`parts` (useful with ``parts = ("",)``)."""
    encloses: ClassVar[tuple[str, ...]] = ()
    """Families whose blocks may sit inside this family's blocks and are fused as part of them."""
    eps_known: ClassVar[bool] = True
    """The key layout implies the project, so its eps (:attr:`default_eps`) is known; False for
    layouts many projects share (the official RepVGG block is also YOLOv6's, whose eps differs)."""
    only_in: ClassVar[tuple[str, ...]] = ()
    """Architectures this family is switched on in (empty: everywhere), see :mod:`.architectures`."""

    # -- the declaration ------------------------------------------------------------------------

    def expression(self, v: KeyView | ModuleView) -> Map | None:
        """The block's branches over the algebra, or None when the keys/modules at ``v`` are not
        this family's (a look-alike)."""
        raise NotImplementedError  # pragma: no cover - every declarative family writes it

    def matches_module(self, module: nn.Module) -> bool:  # pragma: no cover
        raise NotImplementedError

    # -- key tree -------------------------------------------------------------------------------

    def find_prefixes(self, keys: list[str]) -> list[str]:
        suffix = "." + self.anchor
        found = []
        for key in keys:
            if key == self.anchor:
                found.append("")
            elif key.endswith(suffix):
                found.append(key[: -len(suffix)])
        return found

    def find_deploy_prefixes(self, keys: list[str]) -> list[str]:
        """Prefixes of blocks already in this family's deploy form (for inspect/verify)."""
        if self.deploy_anchor is None:
            return []
        suffix = "." + self.deploy_anchor
        return [k[: -len(suffix)] for k in keys if k.endswith(suffix)] + (
            [""] if self.deploy_anchor in keys else []
        )

    def eps_source(self, options: FamilyOptions) -> str:
        """``flag``, ``family`` or ``default``: what decided the key tree's eps (see :attr:`eps_known`)."""
        if options.bn_eps is not None:
            return "flag"
        if options.architecture is not None and options.architecture.eps is not None:
            return "family"
        return "family" if self.eps_known else "default"

    def eps(self, options: FamilyOptions) -> tuple[float, str]:
        """The BN eps for the key tree and where it came from: the flag, else the architecture
        recognised from the whole key layout, else the family's own default."""
        if options.bn_eps is not None:
            return options.bn_eps, "--bn-eps"
        if options.architecture is not None and options.architecture.eps is not None:
            return options.architecture.eps, f"{options.architecture.name} default"
        return self.default_eps, "family default"

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        """The block at ``view.prefix``, or None when the keys there are not this family's."""
        view.eps, view.eps_note = self.eps(options)
        view.eps_source = self.eps_source(options)
        view.options = options
        value = self.expression(view)
        if value is None:
            return None
        owned = (view.owned_under(*self.parts) - view.owned_under(*self.kept)) | view.claimed
        block = self.finish_key_block(
            view, owned=owned, branches=value,
            deploy_prefix=join(view.prefix, self.deploy), eps_note=view.eps_note,
            dtype=view.dtype, notes=tuple(view.notes),
        )
        return block if view.weight_shape is None else replace(block, weight_shape=view.weight_shape)

    # -- module tree ----------------------------------------------------------------------------

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        view = ModuleView(module, name, options)
        value = self.expression(view)
        if value is None:
            raise UnsupportedError(f"{name or '<root>'} looks like a {self.title} but its branches do not read as one")
        return Block(
            name=name, family=self.name, branches=value,
            source_keys=self.module_keys(name, module, *self.parts, *view.claimed),
            deploy_prefix=join(name, self.deploy), dtype=view.dtype or torch.float32, notes=tuple(view.notes),
            weight_shape=view.weight_shape, eps_note=view.eps_note,
        )

    def deploy_like(self, module: nn.Module) -> Tensor:
        """The tensor whose dtype and device the fused conv takes: the block's first conv weight,
        else its first floating parameter or buffer."""
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d):
                return sub.weight
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                return tensor
        return torch.empty(0)

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        """Switch a live block to its deploy form; return the module to put in its parent.

        The train-form :attr:`parts` are deleted (keeping :attr:`kept`), the fused conv is set as
        :attr:`deploy` (the block itself is replaced when that is ""), then the flags are set."""
        conv = conv_from_fused(fused, like=self.deploy_like(module))
        if not self.deploy:
            return conv
        for part in self.parts:
            if part and part not in self.kept and hasattr(module, part):
                delattr(module, part)
        setattr(module, self.deploy, conv)
        for attribute, value in self.deploy_flags.items():
            setattr(module, attribute, value)
        for attribute, value in self.deploy_flags_if_present.items():
            if hasattr(module, attribute):
                setattr(module, attribute, value)
        return module

    # -- helpers for subclasses -------------------------------------------------------------

    def finish_key_block(
        self,
        view: KeyView,
        owned: set[str],
        branches: Branches,
        deploy_prefix: str,
        eps_note: str,
        dtype: torch.dtype,
        notes: tuple[str, ...] = (),
    ) -> Block:
        """Check the family read every key it owns (no stray keys), then build the Block."""
        stray = sorted(owned - view.read)
        if stray:
            raise UnsupportedError(
                f"block {view.prefix or '<root>'} ({self.name}): unexpected key {stray[0]}"
                + (f" and {len(stray) - 1} more" if len(stray) > 1 else "")
            )
        check_branches_agree(view, branches)
        ordered = tuple(k for k in view.state if k in view.read)
        return Block(
            name=view.prefix,
            family=self.name,
            branches=branches,
            source_keys=ordered,
            deploy_prefix=deploy_prefix,
            dtype=dtype,
            eps_note=eps_note,
            eps_source=getattr(view, "eps_source", "default"),
            notes=notes,
        )

    def parse_dense_point_identity(
        self,
        view: KeyView,
        options: FamilyOptions,
        dense: tuple[str, str],
        point: tuple[str, str],
        identity: str,
        deploy_leaf: str,
        owned: tuple[str, ...],
        notes: tuple[str, ...] = (),
    ) -> Block:
        """The most common key-tree block: a k×k conv+BN, a 1×1 conv+BN and an optional identity BN.

        Args:
            dense, point: ``(conv, bn)`` local names of the two conv branches.
            identity: local name of the identity BN (a branch only when its keys exist).
            deploy_leaf: the deploy conv's local name ("" when the block itself becomes the conv).
            owned: local sub-prefixes whose every key belongs to the block ("" for all keys).
        """
        eps, eps_note = self.eps(options)
        convs = (conv_branch_from_keys(view, *dense, eps), conv_branch_from_keys(view, *point, eps))
        skip = IdentityBranch(bn=bn_from_keys(view, identity, eps)) if view.has_any(identity) else None
        return self.finish_key_block(
            view,
            owned=view.owned_under(*owned),
            branches=Branches(convs=convs, identity=skip),
            deploy_prefix=join(view.prefix, deploy_leaf),
            eps_note=eps_note,
            dtype=source_dtype(convs[0].weight),
            notes=notes,
        )

    def module_keys(self, name: str, module: nn.Module, *children: str) -> tuple[str, ...]:
        """The state-dict keys of the given child modules (the block's branches)."""
        keys = []
        for child in children:
            sub = module if child == "" else getattr(module, child, None)
            if isinstance(sub, nn.Module):
                keys.extend(join(name, child, k) for k in sub.state_dict().keys())
        return tuple(keys)


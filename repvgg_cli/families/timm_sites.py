"""Fusion sites that sit in a child of a block and read the block's other children.

Several timm ``reparameterize``/``fuse`` methods write one module from tensors held by a block's
other children, or write several modules in one call (huggingface/pytorch-image-models
``timm/models/ghostnet.py`` GhostModuleV3 and GhostBottleneckV3, ``timm/models/efficientvim.py``
EfficientViMBlock and PatchMerging, ``timm/models/nextvit.py`` NextConvBlock and
NextTransformerBlock). Each written module is one *site*, fused into one conv (or linear):

- key tree: a site is named after the child it writes from (``<block>.<path>``, e.g.
  ``blocks.0.0.ghost1.primary_rpr_conv``), and read from its block's keys (a :class:`KeyView`
  rooted at the block). Keys two sites read (NextViT's ``norm1`` feeds q, k and v) belong to
  one of them: the others read them with :func:`borrowed`.
- module tree: a family matches a module and sees only what is under it, and a matched block's
  insides are not searched. A block that holds other sites (a GhostBottleneckV3 holds two
  GhostModuleV3s) cannot be matched whole, so a site is matched at its child and read from its
  block: the walk meets a block before its children, and a family seeing a block records the
  block of each site child in :data:`SITES` (weak references, nothing kept alive). A child whose
  block was not seen is not matched.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..algebra.maps import Map
from ..errors import UnsupportedError
from ..fusion.values import FusedConv
from .base import Block, Family, FamilyOptions
from .keys import KeyView, join
from .modules import ModuleView


class BlockSites:
    """Site child -> (its block, the child's path there, the family fusing it); and per block,
    the paths already switched to their deploy form."""

    def __init__(self) -> None:
        self._sites: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, str, str]] = weakref.WeakKeyDictionary()
        self._done: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()

    def note(self, block: nn.Module, family: str, paths: tuple[str, ...]) -> None:
        for path in paths:
            child = _child(block, path)
            if child is not None:
                self._sites[child] = (weakref.ref(block), path, family)

    def lookup(self, child: nn.Module, family: str | None = None) -> tuple[nn.Module, str] | None:
        """The block and path of a site child (of ``family``, if given), while the child still is there."""
        try:
            entry = self._sites.get(child)
        except TypeError:  # not weak-referenceable: not a site
            return None
        if entry is None or (family is not None and entry[2] != family):
            return None
        block = entry[0]()
        if block is None or _child(block, entry[1]) is not child:
            return None
        return block, entry[1]

    def done(self, block: nn.Module, path: str) -> set[str]:
        """Record ``path`` of ``block`` as switched; the paths switched so far."""
        switched = self._done.setdefault(block, set())
        switched.add(path)
        return switched


SITES = BlockSites()


def _child(block: nn.Module, path: str) -> nn.Module | None:
    value: object = block
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, nn.Module) else None


def borrowed(v, build):
    """``build()`` reads tensors another site of the block owns (a BN shared by q, k and v): in
    the key tree the keys it reads are not this site's (they are dropped once, with their owner)."""
    if v.tree != "key":
        return build()
    before = set(v.read)
    value = build()
    v.read.intersection_update(before)
    return value


def linear_from_fused(fused: FusedConv, like: Tensor) -> nn.Linear:
    """A fresh ``nn.Linear`` holding a fused 1×1 conv, with the dtype and device of ``like``."""
    out_features, in_features = int(fused.weight.shape[0]), int(fused.weight.shape[1])
    linear = nn.Linear(in_features, out_features, bias=True, device="meta")
    linear.weight = nn.Parameter(fused.weight.reshape(out_features, in_features).to(device=like.device, dtype=like.dtype).clone())
    linear.bias = nn.Parameter(fused.bias.to(device=like.device, dtype=like.dtype).clone())
    return linear


class ChildSite(Family):
    """A family whose sites are children of a block (see the module docstring).

    A subclass declares:
        site_paths: every path under a block that this family may fuse (e.g. ``("e_mhsa.q",)``).
        :meth:`key_sites`: the ``(block prefix, path)`` of every site in a key list.
        :meth:`block_sites`: the site paths of a live block still in train form (() otherwise).
        :meth:`expression`: the site's branches, read from a view rooted at the block; the path
            is ``v.site``. Keys/children the site owns are claimed with ``v.own``.
        :meth:`deploy_path`: the module the fused conv becomes, under the block.
        :meth:`switch`: puts the fused conv into the live block.
    """

    site_paths: ClassVar[tuple[str, ...]]
    anchor = "weight"  # unused: find_prefixes is the family's own

    def key_sites(self, keys: list[str]) -> list[tuple[str, str]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def block_sites(self, module: nn.Module) -> tuple[str, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def deploy_path(self, path: str) -> str:
        return path

    def switch(self, block: nn.Module, path: str, child: nn.Module, fused: FusedConv) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    # -- key tree -------------------------------------------------------------------------------

    def find_prefixes(self, keys: list[str]) -> list[str]:
        return [join(block, path) for block, path in self.key_sites(keys)]

    def split(self, prefix: str) -> tuple[str, str]:
        """``(block prefix, path)`` of a site prefix."""
        for path in sorted(self.site_paths, key=len, reverse=True):
            if prefix == path:
                return "", path
            if prefix.endswith("." + path):
                return prefix[: -len(path) - 1], path
        raise UnsupportedError(f"{prefix} is not a {self.title} site")  # pragma: no cover - find_prefixes gave it

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        block_prefix, path = self.split(view.prefix)
        block_view = KeyView(view.state, block_prefix)
        block_view.eps, block_view.eps_note = self.eps(options)
        block_view.options = options
        block_view.site = path
        value = self.expression(block_view)
        if value is None:
            return None
        block = self.finish_key_block(
            block_view, owned=set(block_view.claimed), branches=value,
            deploy_prefix=join(block_prefix, self.deploy_path(path)), eps_note=block_view.eps_note,
            dtype=block_view.dtype, notes=tuple(block_view.notes),
        )
        return replace(block, name=view.prefix, weight_shape=block_view.weight_shape)

    # -- module tree ----------------------------------------------------------------------------

    def matches_module(self, module: nn.Module) -> bool:
        SITES.note(module, self.name, self.block_sites(module))  # a block is met before its children
        return SITES.lookup(module, self.name) is not None

    def _site_of(self, name: str, module: nn.Module) -> tuple[nn.Module, str, str]:
        found = SITES.lookup(module, self.name)
        if found is None:
            raise UnsupportedError(f"{name or '<root>'} is no longer a {self.title} site of its block")
        block, path = found
        return block, path, name[: -len(path)].rstrip(".")

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        block, path, parent = self._site_of(name, module)
        view = ModuleView(block, parent, options)
        view.site = path
        value: Map | None = self.expression(view)
        if value is None:
            raise UnsupportedError(f"{name or '<root>'} does not read as a {self.title}")
        keys = []
        for owned in view.claimed:
            child = _child(block, owned)
            if child is not None:
                keys.extend(join(parent, owned, k) for k in child.state_dict())
        return Block(name=name, family=self.name, branches=value, source_keys=tuple(keys),
                     deploy_prefix=join(parent, self.deploy_path(path)), dtype=view.dtype or torch.float32,
                     notes=tuple(view.notes), weight_shape=view.weight_shape, eps_note=view.eps_note)

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        found = SITES.lookup(module, self.name)
        if found is None:  # pragma: no cover - parse_module checked it just before
            raise UnsupportedError(f"the {self.title} site is no longer in its block")
        block, path = found
        return self.switch(block, path, module, fused)

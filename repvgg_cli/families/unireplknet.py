"""UniRepLKNet's ``UniRepLKNetBlock``: its two fusions, as upstream's ``reparameterize`` does them.

Follows AILab-CVC/UniRepLKNet ``unireplknet.py`` (Ding et al., "UniRepLKNet: A Universal
Perception Large-Kernel ConvNet for Audio, Video, Point Cloud, Time-Series and Image
Recognition", CVPR 2024), classes ``DilatedReparamBlock``, ``UniRepLKNetBlock`` and
``GRNwithNHWC``. A block computes ``x + gamma * pwconv2(act(pwconv1(se(norm(dwconv(x))))))``.
Its ``reparameterize`` folds two separate linear chains, so the block holds two fusion sites,
each its own family (and its own entry in a report, named after the module it writes):

``unireplknet`` (site ``<block>.dwconv``): ``norm`` (a BN) after ``dwconv``, which is

- a ``DilatedReparamBlock``: ``origin_bn(lk_origin(x)) + sum(dil_bn_k{k}_{r}(dil_conv_k{k}_{r}(x)))``,
  depthwise, stride 1, ``lk_origin`` K×K (padding K//2), each ``dil_conv_k{k}_{r}`` k×k with
  dilation ``r`` (padding ``(r(k-1)+1)//2``). The dilation is in the key name only; the algebra's
  :func:`~repvgg_cli.algebra.maps.plus` sums the dilated kernels as the undilated kernels they equal.
  Deploy: ``dwconv.lk_origin`` (K×K with bias; ``origin_bn`` and every ``dil_*`` deleted);
- or a plain bias-free depthwise conv (K in {3, 5}). Deploy: ``dwconv`` with a bias.

Either way ``norm`` becomes ``nn.Identity`` (no keys).

``unireplknet_ffn`` (site ``<block>.pwconv2``): the GRN's ``beta`` (a constant added after its
multiplicative part, ``act.1.beta``), then ``pwconv2`` = (Linear without bias, NHWC->NCHW, BN),
then the layer scale ``gamma``: one affine map, written back as ``pwconv2.0`` (a Linear with
bias; the BN at ``pwconv2.2`` gone). ``gamma`` and ``act.1.beta`` are deleted, the GRN's
``use_bias`` becomes False. Its ``gamma`` (``act.1.gamma``), GELU, SE and ``pwconv1`` stay.

BN eps is PyTorch's 1e-5 throughout. Both sites are recognised only inside a UniRepLKNetBlock
(its ``pwconv1.1``, ``pwconv2.0`` and GRN ``act.1.gamma`` next to them), so a ``norm`` BN or a
``pwconv2`` elsewhere is not claimed. A ``DilatedReparamBlock`` outside a UniRepLKNetBlock (which
upstream never builds nor converts) is not claimed either.

Module tree: a family matches a module and sees only what is under it, but each site spans
siblings (``dwconv`` + ``norm``; ``act.1.beta`` + ``pwconv2`` + ``gamma``) and one module holds
both. So the sites are matched at the children they write (``dwconv``, ``pwconv2``), and read
from their block: seeing the block itself (the walk meets a parent before its children), a
family records the block of each site child in :data:`_SITES` (weak references, nothing kept
alive). A child whose block was not seen is not matched.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import replace

import torch
from torch import nn

from ..algebra import maps
from ..algebra.maps import Map, plus, then
from ..errors import InputError, UnsupportedError
from ..fusion.values import BatchNorm, FusedConv
from .base import Block, Family, FamilyOptions
from .keys import KeyView, join
from .modules import ModuleView, conv_from_fused, is_batch_norm

DILATED = re.compile(r"dil_conv_k(\d+)_(\d+)")
SIGNATURE = ("pwconv1.1.weight", "pwconv2.0.weight", "act.1.gamma")
"""Keys every UniRepLKNetBlock has, in both forms."""

_SITES: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, str]] = weakref.WeakKeyDictionary()
"""Site child -> (its UniRepLKNetBlock, the child's name there), filled as blocks are met."""


def _in_block(v) -> bool:
    return all(v.has(local) for local in SIGNATURE)


def _dilated_branches(v) -> list[tuple[str, int, int]]:
    """``(local, k, r)`` of every ``dwconv.dil_conv_k{k}_{r}``, in the order the block holds them."""
    if v.tree == "module":
        names = [n for n, _ in v.get("dwconv").named_children()]
    else:
        start = v.key("dwconv") + "."
        names = list(dict.fromkeys(k[len(start):].split(".")[0] for k in v.owned_under("dwconv")))
    found = [(n, DILATED.fullmatch(n)) for n in names]
    return [(join("dwconv", n), int(m.group(1)), int(m.group(2))) for n, m in found if m]


def _dilated_conv(v, local: str, k: int, r: int) -> Map:
    """``<local>`` as a k×k conv with dilation r (from the key name; a live conv must agree)."""
    value = v.conv(local)
    (term,) = value.convs
    if term.kernel_size != (k, k):
        raise UnsupportedError(f"{v.where}: {local} is named for a {k}x{k} kernel but holds "
                               f"{term.kernel_size[0]}x{term.kernel_size[1]}")
    if v.tree == "module":
        if term.dilation != (r, r):
            raise UnsupportedError(f"{v.where}: {local} is named for dilation {r} but has dilation {term.dilation}")
        return value
    return maps.conv(term.weight, term.bias, dilation=r)


def _grn_shift(v, features: int) -> Map:
    """The GRN's ``beta``: ``y = x + beta`` per channel, as an exact affine leaf (a BN with mean
    0, variance 1, eps 0 and no weight)."""
    beta = v.tensor("act.1.beta")
    if not isinstance(beta, torch.Tensor) or not beta.is_floating_point() or beta.numel() != features:
        raise InputError(f"{v.where}: act.1.beta is not {features} floating-point values "
                         f"(the linear pwconv2.0 it folds into has {features} inputs)")
    if not bool(torch.isfinite(beta.detach()).all()):
        raise InputError(f"{v.where}: act.1.beta holds NaN or Inf")
    flat = beta.detach().reshape(-1)
    return maps.bn(BatchNorm(running_mean=torch.zeros_like(flat), running_var=torch.ones_like(flat), eps=0.0,
                                bias=flat))


# -- the module tree: the block of each site ----------------------------------------------------


def _is_train_block(module: nn.Module) -> bool:
    """A UniRepLKNetBlock (by its structure), with at least one site still in train form."""
    act, pwconv1, pwconv2 = (getattr(module, a, None) for a in ("act", "pwconv1", "pwconv2"))
    return (isinstance(pwconv1, nn.Sequential) and len(pwconv1) == 2 and isinstance(pwconv1[1], nn.Linear)
            and isinstance(act, nn.Sequential) and len(act) == 2 and hasattr(act[1], "gamma")
            and isinstance(pwconv2, nn.Sequential) and isinstance(pwconv2[0], nn.Linear)
            and hasattr(module, "dwconv") and hasattr(module, "norm") and hasattr(module, "gamma"))


def _dw_site(block: nn.Module) -> bool:
    dwconv = block.dwconv
    return is_batch_norm(block.norm) and (
        isinstance(dwconv, nn.Conv2d) or isinstance(getattr(dwconv, "lk_origin", None), nn.Conv2d))


def _ffn_site(block: nn.Module) -> bool:
    pwconv2, grn = block.pwconv2, block.act[1]
    return (len(pwconv2) == 3 and is_batch_norm(pwconv2[2]) and not any(True for _ in pwconv2[1].parameters())
            and bool(getattr(grn, "use_bias", False)) and isinstance(getattr(grn, "beta", None), torch.Tensor))


def _note_block(module: nn.Module) -> None:
    if not _is_train_block(module):
        return
    ref = weakref.ref(module)
    if _dw_site(module):
        _SITES[module.dwconv] = (ref, "dwconv")
    if _ffn_site(module):
        _SITES[module.pwconv2] = (ref, "pwconv2")


def _block_of(child: nn.Module, site: str) -> nn.Module | None:
    try:
        entry = _SITES.get(child)
    except TypeError:  # not weak-referenceable: not a site
        return None
    if entry is None or entry[1] != site:
        return None
    block = entry[0]()
    return block if block is not None and getattr(block, site, None) is child else None


class _UniRepLKNetSite(Family):
    """What both sites share: read from the block, named and matched at the child they write."""

    site: str

    def block_name(self, prefix: str) -> str:
        return join(prefix, self.site)

    def deploy_prefix(self, v) -> str:
        return join(v.prefix if v.tree == "key" else v.name, self.deploy)

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        block = super().parse_keys(view, options)
        if block is None:
            return None
        return replace(block, name=self.block_name(view.prefix), deploy_prefix=self.deploy_prefix(view))

    def matches_module(self, module: nn.Module) -> bool:
        _note_block(module)  # a block is met before its children
        return _block_of(module, self.site) is not None

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        block = _block_of(module, self.site)
        if block is None:
            raise UnsupportedError(f"{name or '<root>'} is no longer the {self.site} of a UniRepLKNetBlock")
        parent = name.rpartition(".")[0]
        view = ModuleView(block, parent, options)
        value = self.expression(view)
        if value is None:
            raise UnsupportedError(f"{parent or '<root>'}: its {self.site} does not read as a {self.title}")
        return Block(name=name, family=self.name, branches=value, source_keys=self.site_keys(parent, block),
                     deploy_prefix=self.deploy_prefix(view), dtype=view.dtype or torch.float32,
                     notes=tuple(view.notes), weight_shape=view.weight_shape)

    def site_keys(self, parent: str, block: nn.Module) -> tuple[str, ...]:
        return self.module_keys(parent, block, *self.parts)


class UniRepLKNetDwconv(_UniRepLKNetSite):
    name = "unireplknet"
    title = "UniRepLKNet dwconv + norm (DilatedReparamBlock or depthwise conv, then BN)"
    source = "AILab-CVC/UniRepLKNet unireplknet.py DilatedReparamBlock, UniRepLKNetBlock.reparameterize (CVPR 2024)"
    anchor = "norm.running_var"
    deploy_anchor = "lk_origin.weight"
    parts = ("dwconv", "norm")
    deploy = "dwconv.lk_origin"  # "dwconv" for a plain 3x3/5x5 dwconv (see deploy_prefix)
    site = "dwconv"
    train_keys = ("dwconv.{lk_origin, origin_bn, dil_conv_k{k}_{r}, dil_bn_k{k}_{r}} or dwconv (3x3/5x5), "
                  "then norm (BN)")
    deploy_keys = "dwconv.lk_origin.{weight,bias} (dwconv.{weight,bias} for 3x3/5x5); norm gone"
    after_sum = "se, pwconv1, act (GELU, GRN), pwconv2 - kept (see unireplknet_ffn)"

    def _dilated(self, v) -> bool:
        return v.has("dwconv.lk_origin.weight")

    def deploy_prefix(self, v) -> str:
        return join(v.prefix if v.tree == "key" else v.name, "dwconv.lk_origin" if self._dilated(v) else "dwconv")

    def expression(self, v) -> Map | None:
        if not _in_block(v) or not (v.has("dwconv.weight") or self._dilated(v)):
            return None
        if self._dilated(v):
            origin = v.conv("dwconv.lk_origin")
            if v.has_any("dwconv.origin_bn"):
                origin = then(origin, v.bn("dwconv.origin_bn"))
            dilated = [then(_dilated_conv(v, local, k, r), v.bn(local.replace("dil_conv_", "dil_bn_", 1)))
                       for local, k, r in _dilated_branches(v)]
            if dilated:
                v.note("dilated branches (dil_conv_k{k}_{r}) summed as the undilated kernels they equal")
            dw = plus(origin, *dilated)
        else:
            dw = v.conv("dwconv")
        return then(dw, v.bn("norm"))

    def find_deploy_prefixes(self, keys: list[str]) -> list[str]:
        """Deploy-form DilatedReparamBlocks (``lk_origin`` with a bias, no ``origin_bn``) in a block."""
        present = set(keys)
        suffix = ".dwconv.lk_origin.bias"
        found = []
        for key in keys:
            if key.endswith(suffix):
                block = key[: -len(suffix)]
                if (join(block, "dwconv.origin_bn.running_var") not in present
                        and all(join(block, s) in present for s in SIGNATURE)):
                    found.append(join(block, "dwconv"))
        return found

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        block = _block_of(module, self.site)
        if block is None:  # pragma: no cover - parse_module checked it just before
            raise UnsupportedError("the dwconv is no longer in its UniRepLKNetBlock")
        if isinstance(getattr(module, "lk_origin", None), nn.Conv2d):
            module.lk_origin = conv_from_fused(fused, like=module.lk_origin.weight)
            for name in [n for n, _ in module.named_children() if n == "origin_bn" or n.startswith("dil_")]:
                delattr(module, name)
            replacement = module
        else:
            replacement = conv_from_fused(fused, like=module.weight)
        block.norm = nn.Identity()
        return replacement


class UniRepLKNetFfn(_UniRepLKNetSite):
    name = "unireplknet_ffn"
    title = "UniRepLKNet GRN beta + pwconv2 (Linear, BN) + layer scale"
    source = "AILab-CVC/UniRepLKNet unireplknet.py UniRepLKNetBlock.reparameterize, GRNwithNHWC (CVPR 2024)"
    anchor = "pwconv2.2.running_var"
    parts = ("pwconv2",)
    deploy = "pwconv2.0"
    site = "pwconv2"
    train_keys = "act.1.beta (GRN), pwconv2.0 (Linear), pwconv2.2 (BN), [gamma]"
    deploy_keys = "pwconv2.0.{weight,bias} (a Linear); act.1.beta, pwconv2.2, gamma gone"
    after_sum = "the residual - kept"

    def expression(self, v) -> Map | None:
        if not _in_block(v):
            return None
        linear = v.linear("pwconv2.0")
        out_features, in_features = (int(n) for n in linear.convs[0].weight.shape[:2])
        value = then(_grn_shift(v, in_features), linear, v.bn("pwconv2.2"))
        gamma = v.scale("gamma", out_features, required=False)
        if gamma is not None:
            value = then(value, gamma)
        v.weight_shape = (out_features, in_features)
        return value

    def site_keys(self, parent: str, block: nn.Module) -> tuple[str, ...]:
        extra = [join(parent, "act.1.beta")] + ([join(parent, "gamma")] if block.gamma is not None else [])
        return (*extra, *self.module_keys(parent, block, "pwconv2"))

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        block = _block_of(module, self.site)
        if block is None:  # pragma: no cover - parse_module checked it just before
            raise UnsupportedError("the pwconv2 is no longer in its UniRepLKNetBlock")
        like = module[0].weight
        out_features, in_features = fused.weight.shape[:2]
        linear = nn.Linear(in_features, out_features, bias=True, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            linear.weight.copy_(fused.weight.reshape(out_features, in_features))
            linear.bias.copy_(fused.bias)
        grn = block.act[1]
        del grn.beta
        grn.use_bias = False
        block.gamma = None
        return nn.Sequential(linear, module[1])

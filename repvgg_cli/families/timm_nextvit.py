"""timm's NextViT: each pre-BN merged into the layer it feeds.

Follows huggingface/pytorch-image-models ``timm/models/nextvit.py`` (Li et al., "Next-ViT: Next
Generation Vision Transformer for Efficient Deployment in Realistic Industrial Scenarios", 2022),
``merge_pre_bn`` as called by ``NextConvBlock.reparameterize`` and
``NextTransformerBlock.reparameterize``. A BN before a linear map ``W x + b`` folds into it:
``W' = W diag(s)``, ``b' = b + W t`` (``s``, ``t`` the BN's per-channel affine), i.e.
``then(bn, linear)``. The merged layer keeps its name and gets new values; the BN becomes
``nn.Identity`` (its keys go) and the block's ``is_fused`` flag is set. Sites, one per merged
layer (each named after it, read from its block; see :mod:`.timm_sites`):

- NextConvBlock: ``norm`` (BN2d) → ``mlp.fc1`` (1×1 conv with bias);
- NextTransformerBlock: ``norm1`` → ``e_mhsa.q`` (Linear); ``norm1`` then ``e_mhsa.norm`` (BN1d,
  only when ``sr_ratio > 1``) → ``e_mhsa.k`` and ``e_mhsa.v``: between the two BNs timm's forward
  average-pools the tokens (``e_mhsa.sr``), which commutes with a per-channel affine, so the two
  BNs are one affine ``then(norm1, e_mhsa.norm)``; ``norm2`` → ``mlp.fc1``. ``norm1`` is owned by
  the q site and ``e_mhsa.norm`` by the k site (their keys go once); the others read them.

Every other conv+BN pair of NextViT (stem, ``patch_embed``, ``projection``, ``mhca``) is kept by
timm: this family fuses only into the layers above and is switched on only inside the
``nextvit`` architecture (those names are generic). The deploy state dict loads into a
reparameterized model only (its ``norm*`` are Identity, as in every timm ``fuse``).
"""

from __future__ import annotations

from torch import nn

from ..algebra.maps import Map, then
from ..errors import UnsupportedError
from ..fusion.values import FusedConv
from .keys import join
from .modules import conv_from_fused, is_batch_norm
from .timm_sites import SITES, ChildSite, borrowed, linear_from_fused

ATTENTION = ("e_mhsa.q", "e_mhsa.k", "e_mhsa.v")
MLP = "mlp.fc1"


def _block_of(key: str, suffix: str) -> str | None:
    """The prefix before ``suffix`` when ``key`` is ``<prefix>.<suffix>`` (or ``suffix``)."""
    if key == suffix:
        return ""
    return key[: -len(suffix) - 1] if key.endswith("." + suffix) else None


def _is_bn(module: object) -> bool:
    return is_batch_norm(module) and not isinstance(module, nn.Identity)


def _conv_block(module: nn.Module) -> bool:
    return (type(module).__name__ == "NextConvBlock" and getattr(module, "is_fused", None) is False
            and _is_bn(getattr(module, "norm", None)))


def _transformer_block(module: nn.Module) -> bool:
    return (type(module).__name__ == "NextTransformerBlock" and getattr(module, "is_fused", None) is False
            and _is_bn(getattr(module, "norm1", None)) and _is_bn(getattr(module, "norm2", None)))


class TimmNextVitPreBn(ChildSite):
    name = "timm_nextvit"
    title = "timm NextViT pre-BN merged into the next layer (merge_pre_bn)"
    source = ("huggingface/pytorch-image-models timm/models/nextvit.py merge_pre_bn, NextConvBlock and "
              "NextTransformerBlock.reparameterize (Next-ViT, 2022)")
    site_paths = (*ATTENTION, MLP)
    only_in = ("nextvit",)
    train_keys = "norm -> mlp.fc1 (NCB); norm1 [-> e_mhsa.norm] -> e_mhsa.{q,k,v}, norm2 -> mlp.fc1 (NTB)"
    deploy_keys = "the same layers' {weight,bias} with new values; the BNs go (nn.Identity)"
    after_sum = "everything else - kept (stem, patch_embed, projection, mhca conv+BN pairs too)"

    def key_sites(self, keys: list[str]) -> list[tuple[str, str]]:
        present = set(keys)
        sites = []
        for key in keys:
            block = _block_of(key, "e_mhsa.q.weight")
            if block is not None and join(block, "norm1.running_var") in present:
                sites.extend((block, path) for path in ATTENTION)
            block = _block_of(key, "mlp.fc1.weight")
            if block is not None and (join(block, "norm.running_var") in present
                                      or join(block, "norm2.running_var") in present):
                sites.append((block, MLP))
        return sites

    def block_sites(self, module: nn.Module) -> tuple[str, ...]:
        if _transformer_block(module):
            return self.site_paths
        return (MLP,) if _conv_block(module) else ()

    def expression(self, v) -> Map | None:
        path = v.site
        v.own(path)
        if path == MLP:
            layer = v.conv(MLP, groups=1, padding=0)
            if layer.convs[0].kernel_size != (1, 1) or (v.tree == "module" and tuple(v.get(MLP).padding) != (0, 0)):
                raise UnsupportedError(f"{v.label(MLP)} is not a 1x1 conv without padding: a BN before it does not merge")
        else:
            layer = v.linear(path)
            v.weight_shape = tuple(int(n) for n in layer.convs[0].weight.shape[:2])
        width = int(layer.convs[0].weight.shape[1])
        of = f"{v.label(join(path, 'weight'))} (input channels)"

        def bn(local: str) -> Map:
            return v.bn(local, width, of)

        if path == MLP:
            norm = "norm2" if v.has_any("norm2") else "norm"
            v.own(norm)
            return then(bn(norm), layer)
        if path == "e_mhsa.q":
            v.own("norm1")
            return then(bn("norm1"), layer)
        first = borrowed(v, lambda: bn("norm1"))
        if not v.has_any("e_mhsa.norm"):
            return then(first, layer)
        if path == "e_mhsa.k":
            v.own("e_mhsa.norm")
            second = bn("e_mhsa.norm")
        else:
            second = borrowed(v, lambda: bn("e_mhsa.norm"))
        v.note("e_mhsa.sr (a token average pool) between norm1 and e_mhsa.norm commutes with both; merged as one affine")
        return then(first, then(second, layer))

    def switch(self, block: nn.Module, path: str, child: nn.Module, fused: FusedConv) -> nn.Module:
        merged = (linear_from_fused(fused, like=child.weight) if isinstance(child, nn.Linear)
                  else conv_from_fused(fused, like=child.weight))
        done = SITES.done(block, path)
        if path in ATTENTION and set(ATTENTION) <= done:  # the BNs k and v read stay until both are merged
            block.norm1 = nn.Identity()
            if block.e_mhsa.norm is not None:
                block.e_mhsa.norm = nn.Identity()
        if path == MLP:
            setattr(block, "norm2" if hasattr(block, "norm2") else "norm", nn.Identity())
        if set(self.block_sites_of(block)) <= done:
            block.is_fused = True
        return merged

    @staticmethod
    def block_sites_of(block: nn.Module) -> tuple[str, ...]:
        return (*ATTENTION, MLP) if hasattr(block, "e_mhsa") else (MLP,)

"""Stage 2, find: every re-parameterizable block of a :class:`~.read.Source`, as a :class:`Plan`.

Key tree (a state dict): each family recognises its blocks by their keys; every other key passes
through, the families' training-only keys (RepVGGplus aux heads) are dropped. Module tree (a live
model): each family recognises its blocks by structure, outermost first; with ``fuse_conv_bn`` the
conv→BN pairs outside blocks that run in sequence are planned too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from ..errors import InputError, UnsupportedError
from ..families import FAMILIES, Block, Family, find_blocks, unrecognised_blocks
from ..families.keys import join
from ..families.modules import is_batch_norm
from ..families.unclaimed import unclaimed_branches
from .options import ConvertOptions
from .read import Source


@dataclass(frozen=True)
class ConvBnPair:
    """A conv whose output goes straight into a BN: in a Sequential, or a ``conv``/``bn`` module
    with a forward that skips the BN (see :data:`FUSED_FORWARDS`)."""

    name: str
    owner: nn.Module
    conv_attr: str
    bn_attr: str
    switch_forward: bool


FUSED_FORWARDS = ("forward_fuse", "fuseforward")
"""Names of a conv/bn module's forward without the BN: ultralytics' and YOLOv6's ``forward_fuse``,
YOLOv7's (and older YOLOv5's) ``fuseforward``."""


def fused_forward(module: nn.Module) -> str | None:
    """The name of ``module``'s BN-less forward (:data:`FUSED_FORWARDS`), or None."""
    return next((name for name in FUSED_FORWARDS if callable(getattr(module, name, None))), None)


@dataclass
class Plan:
    """What will be fused, and what passes through.

    Attributes:
        source: the source.
        options: the conversion's options.
        blocks: key tree: the blocks found, in key order (the fuse stage empties the list as it
            goes, so each block's source tensors can be freed).
        modules: module tree: ``(name, module, family)`` of every block, outermost first.
        pairs: module tree with ``fuse_conv_bn``: the conv→BN pairs outside blocks.
        keys: the source's keys in order (key tree).
        dropped: training-only keys left out of the output.
        passthrough: keys copied as they are (key tree).
        unrecognised: groups of keys that look like branches no family claims.
    """

    source: Source
    options: ConvertOptions
    blocks: list[Block] = field(default_factory=list)
    modules: list[tuple[str, nn.Module, Family]] = field(default_factory=list)
    pairs: list[ConvBnPair] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    dropped: tuple[str, ...] = ()
    passthrough: list[str] = field(default_factory=list)
    unrecognised: tuple[tuple[str, str], ...] = ()

    @property
    def mode(self) -> str:
        return self.source.mode


def find(source: Source, options: ConvertOptions) -> Plan:
    """The plan of a conversion: every block of ``source``, and what happens to every other key."""
    if source.model is not None:
        modules = find_module_blocks(source.model)
        pairs = find_conv_bn_pairs(source.model, [name for name, _, _ in modules]) if options.fuse_conv_bn else []
        if not modules and not pairs:
            raise InputError(
                f"the model ({type(source.model).__name__}) has no block any family knows: nothing to fuse",
                hint="`repvgg families` lists the blocks that can be fused; with --fuse-conv-bn, conv→BN pairs "
                     "are folded too",
            )
        return Plan(source=source, options=options, modules=modules, pairs=pairs)
    state = source.state
    assert state is not None
    keys = list(state.keys())
    blocks = find_blocks(state, options.family_options)
    dropped = dropped_keys_for(state, blocks)
    dropped_set = set(dropped)
    consumed = {k for b in blocks for k in b.source_keys}
    for block in blocks:
        for name in (join(block.deploy_prefix, "weight"), join(block.deploy_prefix, "bias")):
            if name in state and name not in consumed:
                raise UnsupportedError(
                    f"block {block.name or '<root>'}: the file already has the deploy key {name} next to "
                    "the train-form branches (a half-converted checkpoint?)"
                )
    unclaimed = unclaimed_branches(state, consumed | dropped_set, options.passthrough)
    if unclaimed:
        shown = "; ".join(f"{prefix or '<root>'} ({what})" for prefix, what in unclaimed[:3])
        more = f" and {len(unclaimed) - 3} more" if len(unclaimed) > 3 else ""
        raise InputError(
            f"{len(unclaimed)} group(s) of keys look like re-parameterization branches that no family claims: "
            f"{shown}{more}; they would pass through unfused",
            hint=f"if they are meant to stay as they are, pass --passthrough '{unclaimed[0][0] or '*'}*' "
                 "(repeatable); `repvgg families` lists what can be fused",
        )
    if not blocks:
        metadata = source.loaded.metadata if source.loaded is not None else None
        if isinstance(metadata, dict) and metadata.get("blocks") is not None:
            raise InputError("no train-form block found: the file carries repvgg_cli deploy metadata, it is a deploy "
                             "checkpoint repvgg convert wrote; there is nothing to fuse",
                             hint="check it with `repvgg verify`")
        raise InputError(_nothing_found(keys), hint="`repvgg families` lists the blocks that can be fused")
    target = options.target_dtype
    if target is not None:  # fused in float64 either way; written in the dtype asked for
        blocks = [replace(b, dtype=target) for b in blocks]
    return Plan(
        source=source, options=options, blocks=blocks, keys=keys, dropped=tuple(dropped),
        passthrough=[k for k in keys if k not in consumed and k not in dropped_set],
        unrecognised=tuple(unrecognised_blocks(state, consumed | dropped_set)),
    )


def _nothing_found(keys: list[str]) -> str:
    """Why a state dict has no block: already in deploy form, or no known block at all."""
    deployed = [(f, p) for f in FAMILIES for p in f.find_deploy_prefixes(keys)]
    if deployed:
        names = sorted({f.name for f, _ in deployed})
        example = deployed[0][1] or "<root>"
        return (f"no train-form block found: the checkpoint is already in deploy form ({len(deployed)} deploy-form "
                f"block(s) of {', '.join(names)}, e.g. {example}); there is nothing to fuse")
    return f"no re-parameterizable block found among its {len(keys)} keys: no family knows these layers"


def dropped_keys_for(state, blocks: list[Block]) -> list[str]:
    """Training-only keys of the families present (e.g. RepVGGplus aux heads)."""
    present = {b.family for b in blocks}
    keys = list(state.keys())
    dropped: set[str] = set()
    for family in FAMILIES:
        if family.name in present and hasattr(family, "dropped_keys"):
            dropped.update(family.dropped_keys(keys))
    return [k for k in keys if k in dropped]


def find_module_blocks(model: nn.Module, families: tuple[Family, ...] = FAMILIES) -> list[tuple[str, nn.Module, Family]]:
    """Every train-form block of a live model, outermost first; a block's insides are not searched."""
    found: list[tuple[str, nn.Module, Family]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if _within(name, inside):
            continue
        matching = [f for f in families if f.matches_module(module)]
        if len(matching) > 1:
            raise UnsupportedError(
                f"module {name or '<root>'} is claimed by two families: {matching[0].name} and {matching[1].name}"
            )
        if matching:
            found.append((name, module, matching[0]))
            inside.append(name)
    return found


def _within(name: str, prefixes: list[str]) -> bool:
    return any(p == "" or name.startswith(p + ".") for p in prefixes)


def find_conv_bn_pairs(model: nn.Module, blocks: list[str] = ()) -> list[ConvBnPair]:
    """Conv→BN pairs that run in sequence, outside the blocks named (their families own them)."""
    pairs = []
    for name, module in model.named_modules():
        if _within(name, list(blocks)) or name in blocks:
            continue
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and is_batch_norm(bn):
                    pairs.append(ConvBnPair(join(name, conv_name), module, conv_name, bn_name, False))
        elif (isinstance(getattr(module, "conv", None), nn.Conv2d) and is_batch_norm(getattr(module, "bn", None))
              and fused_forward(module) is not None):
            pairs.append(ConvBnPair(join(name, "conv"), module, "conv", "bn", True))
    return pairs

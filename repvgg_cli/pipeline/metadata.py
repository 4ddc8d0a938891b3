"""What a deploy file records about its conversion, so ``verify`` can re-check it on its own."""

from __future__ import annotations

from collections.abc import Sequence

from .. import __version__
from ..checks.probe import block_seed
from ..checks.tolerance import ModelCheck, encode_tensor
from ..families import Block
from .check import BlockResult
from .options import ConvertOptions


def block_record(result: BlockResult, seed: int) -> dict:
    """One block's record: geometry, errors, its seeded probe and the train-form output there."""
    block, fused, check = result.block, result.fused, result.check
    return {
        "name": block.name,
        "family": block.family,
        "deploy_prefix": block.deploy_prefix,
        "branches": list(block.branch_labels),
        "in_channels": fused.in_channels if block.branches.groups_known else None,
        "in_per_group": int(fused.weight.shape[1]),
        "out_channels": fused.out_channels,
        "kernel": list(fused.kernel_size),
        "groups": fused.groups if block.branches.groups_known else None,
        "stride": list(fused.stride) if block.branches.geometry_known else None,
        "padding": list(fused.padding),
        "dilation": list(fused.dilation),
        "padding_mode": fused.padding_mode,
        "dtype": str(fused.weight.dtype).replace("torch.", ""),
        "eps": sorted({bn.eps for bn in block_bns(block)}),
        "eps_from": block.eps_note,
        "eps_source": block.eps_source,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "max_abs_err": check.max_abs_err,
        "rel_err": check.rel_err,
        "cast_abs_err": check.cast_abs_err,
        **({"weight_shape": list(block.weight_shape)} if block.weight_shape is not None else {}),
        "probe": {
            "seed": block_seed(seed, block.name),
            "shape": list(result.reference.shape),
            "reference": encode_tensor(result.reference),
        },
    }


def block_bns(block: Block) -> list:
    """The BatchNorms a block's branches fold."""
    b = block.branches
    bns = [c.bn for c in b.convs if c.bn is not None]
    if b.identity is not None and b.identity.bn is not None:
        bns.append(b.identity.bn)
    if b.post_bn is not None:
        bns.append(b.post_bn)
    return bns


def build_metadata(*, mode: str, options: ConvertOptions, blocks: Sequence[BlockResult], dropped: Sequence[str],
                   model_check: ModelCheck | None, source_name: str, source_sha256: str, entry: str | None,
                   stripped: Sequence[str]) -> dict:
    """The metadata recorded in a deploy file (deterministic: no time, no absolute paths).

    The sha256 of every tensor (``io.metadata.TENSOR_DIGESTS``) is added by the writer."""
    metadata = {
        "tool": "repvgg_cli",
        "version": __version__,
        "mode": mode,
        "source": {"name": source_name, "sha256": source_sha256, "entry": entry, "stripped_prefixes": list(stripped)},
        "options": {
            "bn_eps": options.bn_eps,
            "fold_post_bn": options.fold_post_bn,
            "no_identity": list(options.no_identity),
            "avg_branch": list(options.avg_branch),
            "fuse_conv_bn": options.fuse_conv_bn,
            "rtol": options.tolerance.rtol,
            "atol": options.tolerance.atol,
            "seed": options.seed,
        },
        "blocks": [block_record(r, options.seed) for r in blocks],
        "dropped_keys": list(dropped),
    }
    if model_check is not None:
        metadata["model_check"] = {
            "input_shape": list(model_check.input_shape), "dtype": model_check.dtype,
            "max_abs_err": model_check.max_abs_err, "rel_err": model_check.rel_err,
        }
    return metadata


def metadata_reserve(blocks: Sequence[Block], keys: Sequence[str], dropped: Sequence[str]) -> int:
    """A generous estimate of the bytes :func:`build_metadata` takes in a safetensors header
    (each block's record with its base64 probe, a sha256 per key), so a streamed file can
    leave room for it before the data."""
    per_block = sum(4 * ((8 * b.branches.out_channels + 2) // 3) + 1536 + 4 * len(b.name) for b in blocks)
    per_key = sum(2 * len(k) + 96 for k in keys)
    return int(1.25 * (per_block + per_key + sum(len(k) + 4 for k in dropped))) + 8192

"""Walk a checkpoint (key tree) or a live model (module tree), fuse every block, check each.

Key tree: a plain state dict, no model code. Each family finds its blocks by their keys; the
deploy state dict has every block's keys replaced by its fused conv's, every other key passed
through as the very same tensor, and the family's training-only keys (e.g. RepVGGplus aux
heads) dropped and reported.

Module tree: a live model. Each family recognises its blocks by structure, reads eps, stride,
groups, padding and dilation from the modules, and switches the block to its deploy form so
that the model's own ``forward`` takes the fused path. The whole model is then compared with
its train form on seeded random inputs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from concurrent.futures import Future
from typing import Protocol

import torch
from torch import Tensor, nn

from . import __version__
from .errors import InputError, RepvggError, UnsupportedError
from .families import FAMILIES, Block, Family, FamilyOptions, find_blocks, unrecognised_blocks
from .families.base import join
from .fusion import FusedConv, as_meta, fuse_branches, fused_weight_shape, map_branch_tensors
from .verify import (
    BlockCheck,
    CentreProbe,
    ModelCheck,
    Tolerance,
    block_seed,
    check_block,
    compare_outputs,
    encode_tensor,
    infer_input_shape,
    model_outputs,
)

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class ConvertOptions:
    """Options of a conversion.

    Attributes:
        bn_eps: BN eps for the key tree (a state dict does not store it); None: the family default.
        tolerance: pass/fail tolerance of the checks.
        seed: seeds every probe input.
        input_shape: whole-model probe shape (module tree); None: inferred from the first conv.
    """

    bn_eps: float | None = None
    tolerance: Tolerance = field(default_factory=Tolerance)
    seed: int = 0
    input_shape: tuple[int, ...] | None = None
    fold_post_bn: bool = False
    no_identity: tuple[str, ...] = ()
    avg_branch: tuple[str, ...] = ()
    fuse_conv_bn: bool = False
    fsync: bool = False
    """Flush the written file to disk before renaming it into place (survives a power loss)."""

    @property
    def family_options(self) -> FamilyOptions:
        return FamilyOptions(bn_eps=self.bn_eps, fold_post_bn=self.fold_post_bn, no_identity=self.no_identity,
                             avg_branch=self.avg_branch)


@dataclass(frozen=True)
class BlockResult:
    """One fused block: what it was, the conv it became (in the shipped dtype) and its check."""

    block: Block
    fused: FusedConv
    check: BlockCheck
    reference: Tensor
    params_before: int
    params_after: int


@dataclass(frozen=True)
class ConversionResult:
    """The outcome of a conversion. Nothing has been written yet."""

    mode: str
    state_dict: "OrderedDict[str, Tensor]"
    blocks: tuple[BlockResult, ...]
    model: nn.Module | None = None
    dropped_keys: tuple[str, ...] = ()
    passthrough_keys: int = 0
    model_check: ModelCheck | None = None
    notes: tuple[str, ...] = ()
    options: ConvertOptions = field(default_factory=ConvertOptions)
    unrecognised: tuple[tuple[str, str], ...] = ()

    @property
    def failures(self) -> tuple[BlockResult, ...]:
        return tuple(r for r in self.blocks if not r.check.ok)

    @property
    def ok(self) -> bool:
        return not self.failures and (self.model_check is None or self.model_check.ok)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.blocks)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.blocks)


def _count_params(tensors: list[Tensor | None]) -> int:
    return sum(int(t.numel()) for t in tensors if isinstance(t, Tensor))


def _block_params(block: Block, state: Mapping[str, Tensor] | None) -> int:
    if state is not None:
        return _count_params([state[k] for k in block.source_keys if not k.endswith(BUFFER_SUFFIXES)])
    b = block.branches
    tensors: list[Tensor | None] = []
    for conv in b.convs:
        tensors += [conv.weight, conv.bias]
        if conv.bn is not None:
            tensors += [conv.bn.weight, conv.bn.bias]
    if b.identity is not None and b.identity.bn is not None:
        tensors += [b.identity.bn.weight, b.identity.bn.bias]
    if b.post_bn is not None:
        tensors += [b.post_bn.weight, b.post_bn.bias]
    return _count_params(tensors)


def _in_block(message: str, block: str) -> str:
    return message if message.startswith("block ") else f"block {block or '<root>'}: {message}"


class _ProbeThenStream:
    """Shows fusion's chunks to the check's probe, then hands each fused chunk on (to be written)."""

    def __init__(self, probe: CentreProbe, on_rows: Callable[[int, int, Tensor], None]) -> None:
        self.probe, self.on_rows = probe, on_rows

    def source(self, index: int, start: int, stop: int, rows: Tensor) -> None:
        self.probe.source(index, start, stop, rows)

    def fused(self, start: int, stop: int, rows: Tensor, scratch: Tensor) -> None:
        self.probe.fused(start, stop, rows, scratch)
        self.on_rows(start, stop, rows)


def fuse_block(block: Block, options: ConvertOptions, state: Mapping[str, Tensor] | None = None,
               out: Tensor | None = None, on_rows: Callable[[int, int, Tensor], None] | None = None) -> BlockResult:
    """Fuse one block, cast to its source dtype and check it against its train form.

    Args:
        block: a block found by a family.
        options: tolerance and seed.
        state: the source state dict (key tree), to count parameters exactly.
        out: where to write a float32/float64 fused weight (see :func:`fuse_branches`).
        on_rows: called with ``(start, stop, rows)`` as each chunk of a float32/float64 fused
            weight is written (e.g. to stream it), before the block is checked.
    Returns:
        A :class:`BlockResult`.
    """
    try:
        fused64: FusedConv | None = None
        probe: CentreProbe | None = None
        if block.dtype in (torch.float32, torch.float64):
            # float64 arithmetic a chunk of rows at a time, written straight into the shipped
            # dtype; the check's centre products are taken from the same chunks while in cache
            probe = CentreProbe(block.name, block.branches, options.seed)
            observer = probe if on_rows is None else _ProbeThenStream(probe, on_rows)
            shipped = fuse_branches(block.branches, dtype=block.dtype, out=out, observer=observer, check_finite=False)
        else:  # float16/bfloat16: keep the float64 result to report the error the cast adds
            fused64 = fuse_branches(block.branches)
            shipped = fused64.to(block.dtype)
        check = check_block(block.name, block.branches, fused64, shipped, options.seed, options.tolerance, probe)
    except RepvggError as error:
        raise type(error)(_in_block(error.message, block.name), error.hint) from None
    params_before = _block_params(block, state)
    # Keep shapes, dtypes and eps for the report, not the source tensors: they can be freed.
    light = replace(block, branches=map_branch_tensors(block.branches, as_meta))
    return BlockResult(
        block=light,
        fused=shipped,
        check=check,
        reference=check.reference,
        params_before=params_before,
        params_after=int(shipped.weight.numel() + shipped.bias.numel()),
    )


# -- key tree ----------------------------------------------------------------------------------


def dropped_keys_for(state: Mapping[str, Tensor], blocks: list[Block]) -> list[str]:
    """Training-only keys of the families present (e.g. RepVGGplus aux heads)."""
    present = {b.family for b in blocks}
    keys = list(state.keys())
    dropped: set[str] = set()
    for family in FAMILIES:
        if family.name in present and hasattr(family, "dropped_keys"):
            dropped.update(family.dropped_keys(keys))
    return [k for k in keys if k in dropped]


class TensorSink(Protocol):
    """Where :func:`convert_state_dict` streams the deploy tensors (e.g. a file being written)."""

    def put(self, key: str, tensor: Tensor) -> Future | None:
        """Take one tensor; its memory may be reused once the returned future is done (None: at once)."""

    def put_rows(self, key: str, rows: Tensor, start: int) -> Future | None:
        """Take rows ``start:start + len(rows)`` of one tensor, the rows of each tensor in order."""


OpenSink = Callable[["OrderedDict[str, tuple[torch.dtype, tuple[int, ...]]]", int], TensorSink]
"""``(layout, metadata_reserve) -> sink``: called once the deploy layout is known, before any
block is fused."""


def planned_weight_shape(block: Block) -> tuple[int, int, int, int]:
    """The shape the block's fused weight will have (errors name the block, as fusion's do)."""
    try:
        return fused_weight_shape(block.branches)
    except RepvggError as error:
        raise type(error)(_in_block(error.message, block.name), error.hint) from None


def planned_deploy_state(block: Block, shape: tuple[int, int, int, int]) -> tuple[dict[str, Tensor], str | None]:
    """The block's deploy keys with data-free tensors of the shape and dtype they will have, and
    the key that holds the fused weight itself (not reshaped or split by the family), whose rows
    can be streamed as they are fused (None if no key does)."""
    planned = FusedConv(weight=torch.empty(shape, dtype=block.dtype, device="meta"),
                        bias=torch.empty(shape[0], dtype=block.dtype, device="meta"))
    state = block.deploy_state(planned)
    return state, next((key for key, tensor in state.items() if tensor is planned.weight), None)


def metadata_reserve(blocks: list[Block], keys: list[str], dropped: list[str]) -> int:
    """A generous estimate of the bytes :func:`build_metadata` takes in a safetensors header
    (each block's record with its base64 probe, a sha256 per key), so a streamed file can
    leave room for it before the data."""
    per_block = sum(4 * ((8 * b.branches.out_channels + 2) // 3) + 1536 + 4 * len(b.name) for b in blocks)
    per_key = sum(2 * len(k) + 96 for k in keys)
    return int(1.25 * (per_block + per_key + sum(len(k) + 4 for k in dropped))) + 8192


Progress = Callable[[int], tuple[object, Callable[[str], None]]]
"""``total -> (context manager or None, advance(block_name))``: how callers show progress."""


def _fuse_all(items: list, fuse: Callable, progress: Progress | None) -> list:
    """``[fuse(item) for item in items]``, emptying ``items`` as it goes (so each block's source
    tensors can be freed once it is fused), advancing the progress bar if there is one."""
    context, advance = progress(len(items)) if progress is not None else (None, None)
    results = []
    with context if context is not None else _nothing():
        while items:
            item = items.pop(0)
            results.append(fuse(item))
            if advance is not None:
                advance(item[0] if isinstance(item, tuple) else item.name)
            del item
    return results


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def block_notes(results: list[BlockResult]) -> tuple[str, ...]:
    """What families noted about individual blocks, each note once with the blocks it concerns."""
    by_note: dict[str, list[str]] = {}
    for r in results:
        for note in r.block.notes:
            by_note.setdefault(note, []).append(r.block.name or "<root>")
    return tuple(
        f"{note} ({', '.join(names[:4])}{' …' if len(names) > 4 else ''})" for note, names in by_note.items()
    )


def convert_state_dict(
    state: Mapping[str, Tensor],
    options: ConvertOptions | None = None,
    progress: Progress | None = None,
    release: bool = False,
    open_sink: OpenSink | None = None,
) -> ConversionResult:
    """Fuse every block of a state dict (key tree): no model code needed.

    Args:
        state: a train-form state dict (prefixes already stripped).
        options: eps, tolerance, seed.
        progress: optional progress-bar factory.
        release: remove each block's source keys from ``state`` once it is fused, so their
            tensors can be freed (for callers that own ``state``, like the CLI).
        open_sink: stream the deploy tensors instead of keeping them: called with the deploy
            layout before any block is fused, its sink then gets every tensor (each block as
            soon as it is checked, fused into one buffer reused from block to block), and the
            result's ``state_dict`` holds data-free (meta) tensors in their place.
    Returns:
        A :class:`ConversionResult` whose ``state_dict`` loads with ``strict=True`` into the
        deploy form of each family's model.
    """
    options = options or ConvertOptions()
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
    unrecognised = tuple(unrecognised_blocks(state, consumed | dropped_set))
    passthrough_keys = [k for k in keys if k not in consumed and k not in dropped_set]
    passthrough_set = set(passthrough_keys)

    sink: TensorSink | None = None
    shapes: dict[str, tuple[int, int, int, int]] = {}
    buffers: dict[torch.dtype, list[Tensor]] = {}  # two per dtype: one is fused into, one written out
    in_flight: dict[int, list[Future]] = {}
    weight_keys: dict[str, str | None] = {}
    if open_sink is not None:
        shapes = {b.name: planned_weight_shape(b) for b in blocks}
        by_first_key = {b.source_keys[0]: b for b in blocks if b.source_keys}
        layout: OrderedDict[str, tuple[torch.dtype, tuple[int, ...]]] = OrderedDict()
        for key in keys:
            if key in by_first_key:
                block = by_first_key[key]
                planned, weight_keys[block.name] = planned_deploy_state(block, shapes[block.name])
                layout.update((k, (t.dtype, tuple(t.shape))) for k, t in planned.items())
            elif key in passthrough_set:
                layout[key] = (state[key].dtype, tuple(state[key].shape))
        sink = open_sink(layout, metadata_reserve(blocks, list(layout), dropped))
        largest: dict[torch.dtype, int] = {}
        for block in blocks:  # weight buffers per shipped dtype, as large as the largest block
            if block.dtype in (torch.float32, torch.float64):
                largest[block.dtype] = max(math.prod(shapes[block.name]), largest.get(block.dtype, 0))
        buffers = {dtype: [torch.empty(numel, dtype=dtype) for _ in range(2)] for dtype, numel in largest.items()}

    def fuse(block: Block) -> BlockResult:
        out = slot = None
        if block.dtype in buffers:
            pair = buffers[block.dtype]
            pair.reverse()  # alternate: the other buffer may still be being written
            slot = pair[0]
            for future in in_flight.pop(id(slot), []):
                future.result()
            shape = shapes[block.name]
            out = slot[: math.prod(shape)].view(shape)
        futures: list[Future | None] = []
        streamed = weight_keys.get(block.name) if slot is not None else None
        on_rows = None
        if sink is not None and streamed is not None:
            def on_rows(start: int, stop: int, rows: Tensor) -> None:  # written while the rest is fused
                futures.append(sink.put_rows(streamed, rows, start))
        result = fuse_block(block, options, state, out=out, on_rows=on_rows)
        if sink is not None:
            futures += [sink.put(key, tensor) for key, tensor in block.deploy_state(result.fused).items()
                        if key != streamed]
            if slot is not None:
                in_flight[id(slot)] = [f for f in futures if f is not None]
            light = replace(result.fused, weight=as_meta(result.fused.weight), bias=as_meta(result.fused.bias))
            result = replace(result, fused=light)
        if release:
            for key in block.source_keys:
                state.pop(key, None)  # type: ignore[attr-defined]
        return result

    if sink is not None:  # first: the writer has them to do while the first block is fused
        for key in passthrough_keys:
            sink.put(key, state[key])
    results = _fuse_all(blocks, fuse, progress)
    first_key = {r.block.source_keys[0]: r for r in results if r.block.source_keys}
    deploy: OrderedDict[str, Tensor] = OrderedDict()
    passthrough = 0
    for key in keys:
        if key in first_key:
            deploy.update(first_key[key].block.deploy_state(first_key[key].fused))
        elif key in passthrough_set:
            deploy[key] = state[key] if sink is None else as_meta(state[key])
            passthrough += 1
    return ConversionResult(
        mode="key tree",
        state_dict=deploy,
        blocks=tuple(results),
        dropped_keys=tuple(dropped),
        passthrough_keys=passthrough,
        options=options,
        notes=block_notes(results),
        unrecognised=unrecognised,
    )


# -- module tree -------------------------------------------------------------------------------


def find_module_blocks(model: nn.Module, families: tuple[Family, ...] = FAMILIES) -> list[tuple[str, nn.Module, Family]]:
    """Every train-form block of a live model, outermost first; a block's insides are not searched."""
    found: list[tuple[str, nn.Module, Family]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") or p == "" for p in inside):
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


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def reparameterize(
    model: nn.Module,
    options: ConvertOptions | None = None,
    check_model: bool = True,
    progress: Progress | None = None,
) -> ConversionResult:
    """Switch every block of a live model to its deploy form, in place, and check it.

    Args:
        model: a train-form model (put in eval mode; its BN running statistics are used).
        options: tolerance, seed, whole-model input shape.
        check_model: compare the whole model's eval output before and after on seeded inputs.
    Returns:
        A :class:`ConversionResult` with ``model`` (the same object, unless the root itself was
        a block) and its deploy ``state_dict``.
    """
    options = options or ConvertOptions()
    model.eval()
    reference: list[Tensor] | None = None
    x: Tensor | None = None
    notes: list[str] = []
    shape: tuple[int, ...] | None = None
    if check_model:
        try:
            shape = options.input_shape or infer_input_shape(model)
        except ValueError as error:
            raise InputError(str(error)) from None
        generator = torch.Generator().manual_seed(options.seed)
        x = torch.randn(*shape, generator=generator, dtype=torch.float64)
        try:
            reference, _ = model_outputs(model, x)
        except RuntimeError as error:
            raise InputError(f"the train-form model cannot run on input {shape}: {error}",
                             hint="pass --input-shape N,C,H,W") from None

    root: list[nn.Module] = [model]

    def switch(found: tuple[str, nn.Module, Family]) -> BlockResult:
        name, module, family = found
        try:
            block = family.parse_module(name, module, options.family_options)
        except RepvggError as error:
            raise type(error)(_in_block(error.message, name), error.hint) from None
        result = fuse_block(block, options)
        replacement = family.to_deploy_module(module, result.fused)
        if replacement is not module:
            if name:
                _replace_submodule(root[0], name, replacement)
            else:
                root[0] = replacement
        return result

    results = _fuse_all(find_module_blocks(model), switch, progress)
    model = root[0]
    if options.fuse_conv_bn:
        results += [fuse_pair(model, pair, options) for pair in find_conv_bn_pairs(model)]

    model_check = None
    if check_model and x is not None and reference is not None and shape is not None:
        candidate, dtype = model_outputs(model, x)
        problem = None
        try:
            err, scale = compare_outputs(reference, candidate)
        except ValueError as error:  # the deploy model returns other shapes or another number of outputs
            err, scale, problem = float("inf"), 0.0, f"the deploy model's outputs differ in shape: {error}"
        rtol = options.tolerance.rtol_for(_model_dtype(model))
        model_check = ModelCheck(
            input_shape=tuple(shape), dtype=dtype, max_abs_err=err, scale=scale,
            rtol=rtol, atol=options.tolerance.atol, outputs=len(reference), problem=problem,
        )
    state = OrderedDict((k, v.detach()) for k, v in model.state_dict().items())
    return ConversionResult(
        mode="module tree",
        state_dict=state,
        blocks=tuple(results),
        model=model,
        model_check=model_check,
        notes=tuple(notes) + block_notes(results),
        options=options,
        unrecognised=tuple(unrecognised_blocks(state, set())),
    )


# -- plain conv -> BN pairs (--fuse-conv-bn) ----------------------------------------------------

CONV_BN = "conv+bn"


@dataclass(frozen=True)
class ConvBnPair:
    """A conv whose output goes straight into a BN: in a Sequential, or a ``conv``/``bn`` module
    with a ``forward_fuse`` (ultralytics' ``Conv``) that skips the BN."""

    name: str
    owner: nn.Module
    conv_attr: str
    bn_attr: str
    switch_forward: bool


def find_conv_bn_pairs(model: nn.Module) -> list[ConvBnPair]:
    """Conv→BN pairs that run in sequence and that no block family owns (after blocks are fused)."""
    from .families.base import is_batch_norm

    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and is_batch_norm(bn):
                    pairs.append(ConvBnPair(_join(name, conv_name), module, conv_name, bn_name, False))
        elif (isinstance(getattr(module, "conv", None), nn.Conv2d) and is_batch_norm(getattr(module, "bn", None))
              and callable(getattr(module, "forward_fuse", None))):
            pairs.append(ConvBnPair(_join(name, "conv"), module, "conv", "bn", True))
    return pairs


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def fuse_pair(model: nn.Module, pair: ConvBnPair, options: ConvertOptions) -> BlockResult:
    """Fold one conv→BN pair, check it like a block, and switch the owner to the fused conv."""
    from .families.base import bn_from_module, conv_branch_from_module, conv_from_fused, geometry_from_conv
    from .fusion import Branches

    conv = getattr(pair.owner, pair.conv_attr)
    bn = getattr(pair.owner, pair.bn_attr)
    branch = conv_branch_from_module(conv, bn, pair.name)
    block = Block(
        name=pair.name, family=CONV_BN, branches=Branches(convs=(branch,), **geometry_from_conv(conv)),
        source_keys=(), deploy_prefix=pair.name, dtype=conv.weight.dtype,
    )
    result = fuse_block(block, options)
    bn_from_module(bn, pair.name)  # refuses track_running_stats=False with its reason
    setattr(pair.owner, pair.conv_attr, conv_from_fused(result.fused, like=conv.weight))
    if pair.switch_forward:
        delattr(pair.owner, pair.bn_attr)
        pair.owner.forward = pair.owner.forward_fuse
    else:
        setattr(pair.owner, pair.bn_attr, nn.Identity())
    return result


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# -- metadata ----------------------------------------------------------------------------------


def block_record(result: BlockResult, seed: int) -> dict:
    """What the deploy file records about one block, so ``verify`` can re-check it on its own."""
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
        "eps": sorted({bn.eps for bn in _bns(block)}),
        "eps_from": block.eps_note,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "max_abs_err": check.max_abs_err,
        "rel_err": check.rel_err,
        "cast_abs_err": check.cast_abs_err,
        "probe": {
            "seed": block_seed(seed, block.name),
            "shape": list(result.reference.shape),
            "reference": encode_tensor(result.reference),
        },
    }


def _bns(block: Block) -> list:
    b = block.branches
    bns = [c.bn for c in b.convs if c.bn is not None]
    if b.identity is not None and b.identity.bn is not None:
        bns.append(b.identity.bn)
    if b.post_bn is not None:
        bns.append(b.post_bn)
    return bns


def build_metadata(result: ConversionResult, source_name: str, source_sha256: str, entry: str | None,
                   stripped: tuple[str, ...]) -> dict:
    """The metadata recorded in a deploy file (deterministic: no time, no absolute paths).

    The sha256 of every tensor (``io.metadata.TENSOR_DIGESTS``) is added by the writer."""
    options = result.options
    metadata = {
        "tool": "repvgg_cli",
        "version": __version__,
        "mode": result.mode,
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
        "blocks": [block_record(r, options.seed) for r in result.blocks],
        "dropped_keys": list(result.dropped_keys),
    }
    if result.model_check is not None:
        mc = result.model_check
        metadata["model_check"] = {
            "input_shape": list(mc.input_shape), "dtype": mc.dtype, "max_abs_err": mc.max_abs_err,
            "rel_err": mc.rel_err,
        }
    return metadata


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Resolve ``MODULE:CALLABLE`` (e.g. ``mypkg.models:build_repvgg``) to the callable."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"--model {spec!r}: expected MODULE:CALLABLE, e.g. mypkg.models:build_model")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure is the user's input
        raise InputError(f"--model {spec!r}: cannot import {module_name}: {error}") from None
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"--model {spec!r}: {module_name} has no attribute {attr}")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"--model {spec!r}: {attr} is not callable")
    return target  # type: ignore[return-value]


def build_model(spec: str, state: Mapping[str, Tensor]) -> nn.Module:
    """Build the train-form model with ``spec`` and load ``state`` into it strictly."""
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as error:  # noqa: BLE001
        raise InputError(f"--model {spec!r}: calling it failed: {error}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {spec!r} returned a {type(model).__name__}, not an nn.Module")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise InputError(f"the checkpoint does not load into --model {spec}: {detail[:300]}") from None
    return model

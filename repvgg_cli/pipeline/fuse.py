"""Stage 3, fuse: every block of a :class:`~.find.Plan` becomes one conv, lazily, block by block.

:func:`fuse` returns a :class:`Fused` whose :meth:`Fused.blocks` yields one :class:`FusedBlock`
at a time, so a block's source tensors can be freed and its fused conv written before the next
one is computed. Float32/float64 blocks are fused a few output channels at a time straight into
the shipped dtype, and every chunk is shown to the check's :class:`~repvgg_cli.checks.probe.CentreProbe`
while it is in cache (and, when the caller streams the output, handed to the writer);
float16/bfloat16 blocks keep their float64 result so the check can tell the cast's error apart.
In the module tree each block is switched to its deploy form as soon as it is fused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ..checks.probe import CentreProbe
from ..errors import RepvggError
from ..families import Block
from ..families.modules import (
    bn_from_module,
    conv_branch_from_module,
    conv_from_fused,
    geometry_from_conv,
)
from ..fusion.sum import fuse_branches, fused_weight_shape
from ..fusion.values import Branches, FusedConv, as_meta, map_branch_tensors
from .find import ConvBnPair, Plan, fused_forward

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
CONV_BN = "conv+bn"
"""The family name reported for a plain conv→BN pair (``--fuse-conv-bn``)."""

RowSink = Callable[[int, int, Tensor], "Future | None"]
"""``(start, stop, rows)``: takes each chunk of a fused weight as soon as it is written."""


@dataclass
class Slot:
    """A weight buffer reused from block to block while the output is streamed: it may be
    refilled once every write queued from it (:attr:`busy`) is done."""

    tensor: Tensor
    busy: list[Future] = field(default_factory=list)

    def take(self, shape: tuple[int, ...]) -> Tensor:
        for future in self.busy:
            future.result()
        self.busy = []
        return self.tensor[: math.prod(shape)].view(shape)


@dataclass(frozen=True)
class FusedBlock:
    """One block, fused: the conv as shipped (in the source dtype) and what its check needs.

    Attributes:
        block: the block.
        shipped: the fused conv in the dtype written; its weight may live in a :attr:`slot`.
        fused64: float16/bfloat16 blocks: the float64 result, to measure what the cast adds.
        probe: the centre products taken while the block was fused (float32/float64 blocks).
        params_before: parameters of the train-form block.
        slot: the reused buffer holding ``shipped.weight`` (streamed outputs), else None.
    """

    block: Block
    shipped: FusedConv
    fused64: FusedConv | None
    probe: CentreProbe | None
    params_before: int
    slot: Slot | None = None


def in_block(error: RepvggError, name: str) -> RepvggError:
    """The same error, its message saying which block it is about."""
    message = error.message if error.message.startswith("block ") else f"block {name or '<root>'}: {error.message}"
    return type(error)(message, error.hint)


class _ProbeThenSink:
    """Shows fusion's chunks to the check's probe, then hands each fused chunk to the writer."""

    def __init__(self, probe: CentreProbe, sink: RowSink, busy: list[Future]) -> None:
        self.probe, self.sink, self.busy = probe, sink, busy

    def source(self, index: int, start: int, stop: int, rows: Tensor) -> None:
        self.probe.source(index, start, stop, rows)

    def fused(self, start: int, stop: int, rows: Tensor, scratch: Tensor) -> None:
        self.probe.fused(start, stop, rows, scratch)
        future = self.sink(start, stop, rows)
        if future is not None:
            self.busy.append(future)


def fuse_one(block: Block, seed: int, out: Tensor | None = None, sink: RowSink | None = None,
             busy: list[Future] | None = None) -> tuple[FusedConv, FusedConv | None, CentreProbe | None]:
    """Fuse one block into its source dtype: ``(shipped, float64 result or None, probe or None)``.

    A composite block (see :mod:`repvgg_cli.algebra`) gets no probe: its check runs the
    expression it was declared as instead of products of weights the algebra computed.
    """
    try:
        if block.dtype in (torch.float32, torch.float64):
            probe = None if block.branches.composite else CentreProbe(block.name, block.branches, seed)
            observer = probe
            if probe is not None and sink is not None:
                observer = _ProbeThenSink(probe, sink, busy if busy is not None else [])
            shipped = fuse_branches(block.branches, dtype=block.dtype, out=out, observer=observer,
                                    check_finite=probe is None)
            if probe is None and sink is not None:  # stream the weight rows now (no probe watched them)
                future = sink(0, shipped.out_channels, shipped.weight)
                if future is not None and busy is not None:
                    busy.append(future)
            return shipped, None, probe
        fused64 = fuse_branches(block.branches)
        shipped = fused64.to(block.dtype)
        if sink is not None:
            future = sink(0, shipped.out_channels, shipped.weight)
            if future is not None and busy is not None:
                busy.append(future)
        return shipped, fused64, None
    except RepvggError as error:
        raise in_block(error, block.name) from None


def _count(tensors: list[Tensor | None]) -> int:
    return sum(int(t.numel()) for t in tensors if isinstance(t, Tensor))


def params_of(block: Block, state: Mapping[str, Tensor] | None) -> int:
    """Parameters of the train-form block (buffers such as BN statistics not counted)."""
    if state is not None:
        return _count([state[k] for k in block.source_keys if not k.endswith(BUFFER_SUFFIXES)])
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
    return _count(tensors)


@dataclass
class Fused:
    """The fuse stage's output: the blocks, fused when iterated (see :meth:`blocks`).

    Attributes:
        plan: the plan.
        model: module tree: the model, switched to its deploy form once iterated (the root
            itself is replaced when it is a block).
    """

    plan: Plan
    model: nn.Module | None = None

    def blocks(self, sink_for: Callable[[Block], RowSink | None] | None = None,
               reuse_buffers: bool = False) -> Iterator[FusedBlock]:
        """Fuse block after block.

        Args:
            sink_for: per block, where its fused weight's chunks go as they are written (None: nowhere).
            reuse_buffers: fuse float32/float64 weights into two buffers reused from block to block
                (each refilled once the writes queued from it are done): for a streamed output,
                whose blocks are written and then forgotten.
        """
        if self.plan.source.model is not None:
            yield from self._module_blocks()
        else:
            yield from self._key_blocks(sink_for, reuse_buffers)

    # -- key tree -------------------------------------------------------------------------------

    def _key_blocks(self, sink_for, reuse_buffers: bool) -> Iterator[FusedBlock]:
        plan = self.plan
        state = plan.source.state
        slots: dict[torch.dtype, list[Slot]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        if reuse_buffers:
            largest: dict[torch.dtype, int] = {}
            for block in plan.blocks:  # weight buffers per shipped dtype, as large as the largest block
                shapes[block.name] = planned_weight_shape(block)
                if block.dtype in (torch.float32, torch.float64):
                    largest[block.dtype] = max(math.prod(shapes[block.name]), largest.get(block.dtype, 0))
            slots = {dtype: [Slot(torch.empty(n, dtype=dtype)) for _ in range(2)] for dtype, n in largest.items()}
        while plan.blocks:
            block = plan.blocks.pop(0)
            slot = out = None
            if block.dtype in slots:
                pair = slots[block.dtype]
                pair.reverse()  # alternate: the other buffer may still be being written
                slot = pair[0]
                out = slot.take(shapes[block.name])
            sink = sink_for(block) if sink_for is not None else None
            busy: list[Future] = slot.busy if slot is not None else []
            shipped, fused64, probe = fuse_one(block, plan.options.seed, out=out, sink=sink, busy=busy)
            params = params_of(block, state)
            if plan.source.owned and state is not None:
                for key in block.source_keys:
                    state.pop(key, None)  # the source tensors can be freed
            yield FusedBlock(block, shipped, fused64, probe, params, slot)

    # -- module tree ----------------------------------------------------------------------------

    def _module_blocks(self) -> Iterator[FusedBlock]:
        plan = self.plan
        self.model = plan.source.model
        options = plan.options
        target = options.target_dtype
        if target in (torch.float32, torch.float64):  # an exact upcast: fuse what will be written
            self.model.to(target)
        for name, module, family in plan.modules:
            try:
                block = family.parse_module(name, module, options.family_options)
            except RepvggError as error:
                raise in_block(error, name) from None
            shipped, fused64, probe = fuse_one(block, options.seed)
            params = params_of(block, None)
            self._put(name, module, family.to_deploy_module(module, shipped))
            yield FusedBlock(block, shipped, fused64, probe, params)
        for pair in plan.pairs:
            yield self._fuse_pair(pair)
        if target in (torch.float16, torch.bfloat16):  # rounded last: the whole-model check sees it
            self.model.to(target)

    def _put(self, name: str, module: nn.Module, replacement: nn.Module) -> None:
        if replacement is module:
            return
        if not name:
            self.model = replacement
            return
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, replacement)

    def _fuse_pair(self, pair: ConvBnPair) -> FusedBlock:
        """Fold one conv→BN pair like a block, and switch its owner to the fused conv."""
        conv = getattr(pair.owner, pair.conv_attr)
        bn = getattr(pair.owner, pair.bn_attr)
        branch = conv_branch_from_module(conv, bn, pair.name)
        block = Block(
            name=pair.name, family=CONV_BN, branches=Branches(convs=(branch,), **geometry_from_conv(conv)),
            source_keys=(), deploy_prefix=pair.name, dtype=conv.weight.dtype,
        )
        shipped, fused64, probe = fuse_one(block, self.plan.options.seed)
        bn_from_module(bn, pair.name)  # refuses track_running_stats=False with its reason
        setattr(pair.owner, pair.conv_attr, conv_from_fused(shipped, like=conv.weight))
        if pair.switch_forward:
            delattr(pair.owner, pair.bn_attr)
            pair.owner.forward = getattr(pair.owner, fused_forward(pair.owner))  # forward_fuse / fuseforward
        else:
            setattr(pair.owner, pair.bn_attr, nn.Identity())
        return FusedBlock(block, shipped, fused64, probe, params_of(block, None))


def fuse(plan: Plan) -> Fused:
    """The fuse stage: nothing is computed until :meth:`Fused.blocks` is iterated."""
    return Fused(plan)


def planned_weight_shape(block: Block) -> tuple[int, int, int, int]:
    """The shape the block's fused weight will have (errors name the block, as fusion's do)."""
    try:
        return fused_weight_shape(block.branches)
    except RepvggError as error:
        raise in_block(error, block.name) from None


def lightened(fused: FusedBlock) -> FusedBlock:
    """The same record holding data-free stand-ins for the tensors (kept for the report only)."""
    block = replace(fused.block, branches=map_branch_tensors(fused.block.branches, as_meta))
    shipped = replace(fused.shipped, weight=as_meta(fused.shipped.weight), bias=as_meta(fused.shipped.bias))
    return replace(fused, block=block, shipped=shipped, fused64=None, probe=None, slot=None)

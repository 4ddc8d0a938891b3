"""Stage 4, check: every fused block against its train form, and the whole model when there is one.

:func:`check` wraps the fuse stage's lazy blocks: :meth:`Checked.results` yields each block with
its :class:`~repvgg_cli.checks.tolerance.BlockCheck` as soon as it is fused (numbers from
:mod:`repvgg_cli.checks`, float64). In the module tree the train-form model's output on a seeded
input is taken before the first block is switched, and compared with the deploy form's once the
last one is (:attr:`Checked.model_check`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks.model import compare_outputs, infer_input_shape, model_outputs
from ..checks.probe import check_block, eps_sensitivity, has_batch_norm
from ..checks.tolerance import BlockCheck, ModelCheck
from ..errors import InputError, RepvggError
from ..families import Block
from ..fusion.values import FusedConv
from .fuse import Fused, FusedBlock, RowSink, in_block


@dataclass(frozen=True)
class BlockResult:
    """One fused block: what it was, the conv it became (in the shipped dtype) and its check."""

    block: Block
    fused: FusedConv
    check: BlockCheck
    reference: Tensor
    params_before: int
    params_after: int
    eps_sensitivity: float | None = None
    """When no one decided the block's BN eps (PyTorch's default 1e-5 was used): how far its output
    moves with eps 1e-3 (the YOLO families'), relative; None when eps was decided or there is no BN."""


@dataclass
class Checked:
    """The check stage's output: the blocks, fused and checked when iterated.

    Attributes:
        fused: the fuse stage's output.
        check_model: compare the whole model (module tree).
        model_check: the whole-model comparison, once :meth:`results` is exhausted.
    """

    fused: Fused
    check_model: bool = True
    model_check: ModelCheck | None = None

    @property
    def model(self) -> nn.Module | None:
        return self.fused.model

    def results(self, sink_for: Callable[[Block], RowSink | None] | None = None,
                reuse_buffers: bool = False) -> Iterator[tuple[FusedBlock, BlockResult]]:
        """Each block as fused (see :meth:`Fused.blocks`, whose arguments these are) with its result."""
        plan = self.fused.plan
        options = plan.options
        model = plan.source.model
        probe = self._train_outputs(model, options) if model is not None and self.check_model else None
        for item in self.fused.blocks(sink_for=sink_for, reuse_buffers=reuse_buffers):
            block, shipped = item.block, item.shipped
            try:
                check = check_block(block.name, block.branches, item.fused64, shipped, options.seed,
                                    options.tolerance, item.probe)
            except RepvggError as error:
                raise in_block(error, block.name) from None
            params_after = int(shipped.weight.numel() + shipped.bias.numel())
            sensitivity = None
            if block.eps_source == "default" and not block.branches.composite and has_batch_norm(block.branches):
                sensitivity = eps_sensitivity(block.name, block.branches, options.seed, item.probe)
            yield item, BlockResult(block, shipped, check, check.reference, item.params_before, params_after,
                                    sensitivity)
        if probe is not None:
            self.model_check = self._compare_models(self.fused.model, probe, options)

    @staticmethod
    def _train_outputs(model: nn.Module, options) -> tuple[Tensor, tuple[int, ...], list[Tensor]]:
        try:
            shape = options.input_shape or infer_input_shape(model)
        except ValueError as error:
            raise InputError(str(error)) from None
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(options.seed), dtype=torch.float64)
        try:
            reference, _ = model_outputs(model, x)
        except RuntimeError as error:
            raise InputError(f"the train-form model cannot run on input {shape}: {error}",
                             hint="pass --input-shape N,C,H,W") from None
        return x, tuple(shape), reference

    @staticmethod
    def _compare_models(model: nn.Module, train: tuple, options) -> ModelCheck:
        x, shape, reference = train
        candidate, dtype = model_outputs(model, x)
        problem = None
        try:
            err, scale = compare_outputs(reference, candidate)
        except ValueError as error:  # the deploy model returns other shapes or another number of outputs
            err, scale, problem = float("inf"), 0.0, f"the deploy model's outputs differ in shape: {error}"
        rtol = options.tolerance.rtol_for(_model_dtype(model))
        return ModelCheck(input_shape=shape, dtype=dtype, max_abs_err=err, scale=scale, rtol=rtol,
                          atol=options.tolerance.atol, outputs=len(reference), problem=problem)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check(fused: Fused, check_model: bool = True) -> Checked:
    """The check stage: nothing is computed until :meth:`Checked.results` is iterated."""
    return Checked(fused, check_model=check_model)

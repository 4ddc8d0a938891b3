"""The UniRepLKNet rewrite (tests/family_zoo/unireplknet.py) is self-consistent.

Its train model (random BN statistics, layer scales, GRN gamma/beta, LayerNorm affines) matches,
in float64, the copy converted by the rewrite of upstream's ``reparameterize_unireplknet``; that
copy's state dict loads strictly into the model built with ``deploy=True``; and the keys are
upstream's (listed literally for one block).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.family_zoo import unireplknet as z

BLOCK = "stages.0.0"  # 8 channels, 13×13 DilatedReparamBlock, layer scale


def bn(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{name}": (n,) for name in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


KEPT_BLOCK_KEYS = {
    "se.down.weight": (2, 8, 1, 1), "se.down.bias": (2,),
    "se.up.weight": (8, 2, 1, 1), "se.up.bias": (8,),
    "pwconv1.1.weight": (32, 8), "pwconv1.1.bias": (32,),
    "act.1.gamma": (1, 1, 1, 32),
}
TRAIN_BLOCK_KEYS = {
    "gamma": (8,),
    "dwconv.lk_origin.weight": (8, 1, 13, 13), **bn("dwconv.origin_bn", 8),
    "dwconv.dil_conv_k5_1.weight": (8, 1, 5, 5), **bn("dwconv.dil_bn_k5_1", 8),
    "dwconv.dil_conv_k7_2.weight": (8, 1, 7, 7), **bn("dwconv.dil_bn_k7_2", 8),
    "dwconv.dil_conv_k3_3.weight": (8, 1, 3, 3), **bn("dwconv.dil_bn_k3_3", 8),
    "dwconv.dil_conv_k3_4.weight": (8, 1, 3, 3), **bn("dwconv.dil_bn_k3_4", 8),
    "dwconv.dil_conv_k3_5.weight": (8, 1, 3, 3), **bn("dwconv.dil_bn_k3_5", 8),
    **bn("norm", 8),
    **KEPT_BLOCK_KEYS,
    "act.1.beta": (1, 1, 1, 32),
    "pwconv2.0.weight": (8, 32), **bn("pwconv2.2", 8),
}
DEPLOY_BLOCK_KEYS = {
    "dwconv.lk_origin.weight": (8, 1, 13, 13), "dwconv.lk_origin.bias": (8,),
    **KEPT_BLOCK_KEYS,
    "pwconv2.0.weight": (8, 32), "pwconv2.0.bias": (8,),
}


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def block_shapes(state: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) + 1:]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix + ".")}


def probe() -> torch.Tensor:
    return torch.randn(*z.INPUT_SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def test_train_output_equals_upstream_deploy_output():
    train = z.train_model().double()
    x = probe()
    assert relative_error(run(train, x), run(z.upstream_deploy(train), x)) <= 1e-9


def test_upstream_deploy_loads_strictly_into_deploy_model_and_gives_the_same_output():
    converted = z.upstream_deploy(z.train_model().double())
    deploy = z.deploy_model().double()
    deploy.load_state_dict(converted.state_dict(), strict=True)
    x = probe()
    assert relative_error(run(converted, x), run(deploy, x)) <= 1e-12


def test_block_keys_are_upstreams():
    train = z.train_model()
    assert block_shapes(train.state_dict(), BLOCK) == TRAIN_BLOCK_KEYS
    deploy_state = z.upstream_deploy(train).state_dict()
    assert block_shapes(deploy_state, BLOCK) == DEPLOY_BLOCK_KEYS
    assert block_shapes(z.deploy_model().state_dict(), BLOCK) == DEPLOY_BLOCK_KEYS
    # 3×3 plain depthwise conv: the BN lands in a new bias; kernel 0: no dwconv at all.
    assert block_shapes(deploy_state, "stages.0.2.dwconv") == {"weight": (8, 1, 3, 3), "bias": (8,)}
    assert not block_shapes(deploy_state, "stages.1.2.dwconv")
    assert "stages.1.2.norm.weight" not in train.state_dict()
    # The block built without layer scale has no gamma in either form.
    assert "stages.1.1.gamma" not in train.state_dict() and "stages.1.0.gamma" in train.state_dict()


def test_kept_tensors_are_unchanged():
    train = z.train_model()
    before, after = train.state_dict(), z.upstream_deploy(train).state_dict()
    for name in KEPT_BLOCK_KEYS:
        assert torch.equal(before[f"{BLOCK}.{name}"], after[f"{BLOCK}.{name}"]), name
    for key in ("downsample_layers.0.1.weight", "norm.weight", "head.bias"):
        assert torch.equal(before[key], after[key])


@pytest.mark.parametrize("kernel_size", sorted(z.DILATED_BRANCHES))
def test_dilated_branch_equals_its_merged_kernel(kernel_size):
    generator = torch.Generator().manual_seed(kernel_size)
    x = torch.randn(1, 4, 2 * kernel_size, 2 * kernel_size, generator=generator, dtype=torch.float64)
    large = torch.randn(4, 1, kernel_size, kernel_size, generator=generator, dtype=torch.float64)
    expected = F.conv2d(x, large, padding=kernel_size // 2, groups=4)
    merged = large
    for k, r in zip(*z.DILATED_BRANCHES[kernel_size]):
        small = torch.randn(4, 1, k, k, generator=generator, dtype=torch.float64)
        expected = expected + F.conv2d(x, small, padding=(r * (k - 1) + 1) // 2, dilation=r, groups=4)
        merged = z.merge_dilated_into_large_kernel(merged, small, r)
    assert relative_error(expected, F.conv2d(x, merged, padding=kernel_size // 2, groups=4)) <= 1e-12


def test_conversion_leaves_the_train_model_alone():
    train = z.train_model()
    keys = set(train.state_dict())
    z.upstream_deploy(train)
    assert set(train.state_dict()) == keys


def test_randomisation_is_not_trivial_and_wrong_eps_is_caught():
    train = z.train_model().double()
    norms = [m for m in train.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) > 30
    for m in norms:
        assert m.running_mean.abs().min() > 0 and (m.running_var - 1).abs().min() > 0
        assert m.eps == z.EPS
    state = train.state_dict()
    for key, value in state.items():
        if key.endswith(("gamma", "beta")):
            assert value.unique().numel() == value.numel() > 1, key
    # Every BN is fused: one wrong eps anywhere must be caught.
    wrong = z.train_model().double()
    for m in wrong.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.5
    x = probe()
    assert relative_error(run(train, x), run(z.upstream_deploy(wrong), x)) > 1e-4

"""The mmpretrain MobileOne rewrite (tests/family_zoo/mmpretrain_mobileone.py) is self-consistent.

Its train model (random BN statistics) matches, in float64, the copy converted by the rewrite of
upstream's ``switch_to_deploy``; that copy's state dict loads strictly into the backbone built with
``deploy=True``; and the keys are mmpretrain's (listed literally for one block).
"""

from __future__ import annotations

import torch
from torch import nn

from tests.family_zoo import mmpretrain_mobileone as z

BLOCK = "stage2.2"  # depthwise 3×3, 16 channels, stride 1, three conv branches, SE


def bn(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{name}": (n,) for name in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


SE_KEYS = {
    "se.conv1.conv.weight": (8, 16, 1, 1), "se.conv1.conv.bias": (8,),
    "se.conv2.conv.weight": (16, 8, 1, 1), "se.conv2.conv.bias": (16,),
}
TRAIN_BLOCK_KEYS = {
    **SE_KEYS,
    **bn("branch_norm", 16),
    "branch_scale.conv.weight": (16, 1, 1, 1), **bn("branch_scale.norm", 16),
    "branch_conv_list.0.conv.weight": (16, 1, 3, 3), **bn("branch_conv_list.0.norm", 16),
    "branch_conv_list.1.conv.weight": (16, 1, 3, 3), **bn("branch_conv_list.1.norm", 16),
    "branch_conv_list.2.conv.weight": (16, 1, 3, 3), **bn("branch_conv_list.2.norm", 16),
}
DEPLOY_BLOCK_KEYS = {
    **SE_KEYS,
    "branch_reparam.weight": (16, 1, 3, 3), "branch_reparam.bias": (16,),
}


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30))


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model.eval()(x)


def worst_error(reference: tuple[torch.Tensor, ...], candidate: tuple[torch.Tensor, ...]) -> float:
    assert len(reference) == len(candidate) == 2
    return max(relative_error(r, c) for r, c in zip(reference, candidate))


def block_shapes(state: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) + 1:]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix + ".")}


def probe() -> torch.Tensor:
    return torch.randn(*z.INPUT_SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def test_train_output_equals_upstream_deploy_output():
    train = z.train_model().double()
    x = probe()
    assert worst_error(run(train, x), run(z.upstream_deploy(train), x)) <= 1e-9


def test_upstream_deploy_loads_strictly_into_deploy_model_and_gives_the_same_output():
    converted = z.upstream_deploy(z.train_model().double())
    deploy = z.deploy_model().double()
    deploy.load_state_dict(converted.state_dict(), strict=True)
    x = probe()
    assert worst_error(run(converted, x), run(deploy, x)) <= 1e-12


def test_block_keys_are_mmpretrains():
    train = z.train_model()
    train_state = train.state_dict()
    deploy_state = z.upstream_deploy(train).state_dict()
    assert block_shapes(train_state, BLOCK) == TRAIN_BLOCK_KEYS
    assert block_shapes(deploy_state, BLOCK) == DEPLOY_BLOCK_KEYS
    assert block_shapes(z.deploy_model().state_dict(), BLOCK) == DEPLOY_BLOCK_KEYS
    # Strided depthwise: no branch_norm; pointwise: no branch_scale; grouped dilated: (16, 4, 3, 3).
    assert not block_shapes(train_state, "stage2.0.branch_norm")
    assert not block_shapes(train_state, "stage2.3.branch_scale")
    assert block_shapes(train_state, "stage2.3.branch_norm")
    assert block_shapes(deploy_state, "stage2.4") == {"branch_reparam.weight": (16, 4, 3, 3),
                                                      "branch_reparam.bias": (16,)}
    deploy_conv = z.deploy_model().stage2[4].branch_reparam
    assert (deploy_conv.dilation, deploy_conv.padding, deploy_conv.groups) == ((2, 2), (2, 2), 4)
    assert not [k for k in train_state if ".bn." in k]  # mmpretrain names the branch BNs "norm"


def test_se_tensors_are_kept_unchanged():
    train = z.train_model()
    before, after = train.state_dict(), z.upstream_deploy(train).state_dict()
    for name in SE_KEYS:
        assert torch.equal(before[f"{BLOCK}.{name}"], after[f"{BLOCK}.{name}"]), name


def test_conversion_leaves_the_train_model_alone():
    train = z.train_model()
    keys = set(train.state_dict())
    z.upstream_deploy(train)
    assert set(train.state_dict()) == keys


def test_randomisation_is_not_trivial_and_wrong_eps_is_caught():
    train = z.train_model().double()
    norms = [m for m in train.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) > 20
    for m in norms:
        assert m.running_mean.abs().min() > 0 and (m.running_var - 1).abs().min() > 0
        assert m.eps == z.EPS
    wrong = z.train_model().double()
    for m in wrong.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.5
    x = probe()
    assert worst_error(run(train, x), run(z.upstream_deploy(wrong), x)) > 1e-4

"""The RepLKNet rewrite (tests/family_zoo/replknet.py) is self-consistent.

Its train model (random BN statistics) matches, in float64, the copy converted by the rewrite of
upstream's ``structural_reparam``; that copy's state dict loads strictly into the model built
directly in deploy form; and the keys are upstream's (listed literally for one block).
"""

from __future__ import annotations

import torch
from torch import nn

from tests.family_zoo import replknet as z

BLOCK = "stages.0.blocks.0"  # RepLKBlock: 8 channels, 13×13 large kernel, 5×5 small kernel


def bn(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{name}": (n,) for name in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


TRAIN_BLOCK_KEYS = {
    "pw1.conv.weight": (8, 8, 1, 1), **bn("pw1.bn", 8),
    "pw2.conv.weight": (8, 8, 1, 1), **bn("pw2.bn", 8),
    "large_kernel.lkb_origin.conv.weight": (8, 1, 13, 13), **bn("large_kernel.lkb_origin.bn", 8),
    "large_kernel.small_conv.conv.weight": (8, 1, 5, 5), **bn("large_kernel.small_conv.bn", 8),
    **bn("prelkb_bn", 8),
}
DEPLOY_BLOCK_KEYS = {
    "pw1.conv.weight": (8, 8, 1, 1), **bn("pw1.bn", 8),
    "pw2.conv.weight": (8, 8, 1, 1), **bn("pw2.bn", 8),
    "large_kernel.lkb_reparam.weight": (8, 1, 13, 13),
    "large_kernel.lkb_reparam.bias": (8,),
    **bn("prelkb_bn", 8),
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
    # No small kernel (RepLKNet-XL style) and the strided grouped extra conv.
    assert block_shapes(deploy_state, "stages.1.blocks.0.large_kernel") == {
        "lkb_reparam.weight": (24, 1, 7, 7), "lkb_reparam.bias": (24,)}
    assert "stages.1.blocks.0.large_kernel.small_conv.conv.weight" not in train.state_dict()
    assert block_shapes(deploy_state, "extra") == {"lkb_reparam.weight": (32, 8, 5, 5), "lkb_reparam.bias": (32,)}


def test_structural_reparam_changes_only_the_large_kernel_convs():
    train = z.train_model()
    before = train.state_dict()
    after = z.upstream_deploy(train).state_dict()
    kept = [k for k in after if "lkb_reparam" not in k]
    assert set(kept) == {k for k in before if "lkb_origin" not in k and "small_conv" not in k}
    for key in kept:
        assert torch.equal(before[key], after[key]), key
    assert "stem.0.bn.running_mean" in kept and "stages.0.blocks.1.preffn_bn.weight" in kept


def test_conversion_leaves_the_train_model_alone():
    train = z.train_model()
    keys = set(train.state_dict())
    z.upstream_deploy(train)
    assert set(train.state_dict()) == keys
    assert any("small_conv" in k for k in keys)


def test_randomisation_is_not_trivial_and_wrong_eps_is_caught():
    train = z.train_model().double()
    norms = [m for m in train.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) > 20
    for m in norms:
        assert m.running_mean.abs().min() > 0 and (m.running_var - 1).abs().min() > 0
        assert m.eps == z.EPS
    # Fuse with a wrong eps in the fused branches only: the result must be far from the train model.
    wrong = z.train_model().double()
    for name, m in wrong.named_modules():
        if isinstance(m, nn.BatchNorm2d) and ("lkb_origin" in name or "small_conv" in name):
            m.eps = 0.5
    x = probe()
    assert relative_error(run(train, x), run(z.upstream_deploy(wrong), x)) > 1e-4

"""The apple/ml-fastvit rewrite (tests/family_zoo/apple_fastvit.py) is self-consistent.

Its train model (random BN statistics, layer scales and RepCPE convs) matches, in float64, the
copy converted by the rewrite of upstream's ``reparameterize_model``; that copy's state dict loads
strictly into the model built with ``inference_mode=True``; and the keys are apple's (listed
literally for one block of each kind).
"""

from __future__ import annotations

import torch
from torch import nn

from tests.family_zoo import apple_fastvit as z

BLOCK = "network.0.0"  # RepMixerBlock: 8 channels, 3×3 RepMixer, both layer scales


def bn(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{name}": (n,) for name in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


CONVFFN_KEYS = {
    "convffn.conv.conv.weight": (8, 1, 7, 7), **bn("convffn.conv.bn", 8),
    "convffn.fc1.weight": (24, 8, 1, 1), "convffn.fc1.bias": (24,),
    "convffn.fc2.weight": (8, 24, 1, 1), "convffn.fc2.bias": (8,),
}
TRAIN_BLOCK_KEYS = {
    "layer_scale": (8, 1, 1),
    "token_mixer.layer_scale": (8, 1, 1),
    **bn("token_mixer.norm.rbr_skip", 8),
    **bn("token_mixer.mixer.rbr_skip", 8),
    "token_mixer.mixer.rbr_conv.0.conv.weight": (8, 1, 3, 3), **bn("token_mixer.mixer.rbr_conv.0.bn", 8),
    "token_mixer.mixer.rbr_scale.conv.weight": (8, 1, 1, 1), **bn("token_mixer.mixer.rbr_scale.bn", 8),
    **CONVFFN_KEYS,
}
DEPLOY_BLOCK_KEYS = {
    "layer_scale": (8, 1, 1),
    "token_mixer.reparam_conv.weight": (8, 1, 3, 3), "token_mixer.reparam_conv.bias": (8,),
    **CONVFFN_KEYS,
}
TRAIN_PATCH_EMBED_KEYS = {
    "proj.0.lkb_origin.conv.weight": (16, 1, 7, 7), **bn("proj.0.lkb_origin.bn", 16),
    "proj.0.small_conv.conv.weight": (16, 1, 3, 3), **bn("proj.0.small_conv.bn", 16),
    **bn("proj.1.rbr_skip", 16),
    "proj.1.rbr_conv.0.conv.weight": (16, 16, 1, 1), **bn("proj.1.rbr_conv.0.bn", 16),
}
DEPLOY_PATCH_EMBED_KEYS = {
    "proj.0.lkb_reparam.weight": (16, 1, 7, 7), "proj.0.lkb_reparam.bias": (16,),
    "proj.1.reparam_conv.weight": (16, 16, 1, 1), "proj.1.reparam_conv.bias": (16,),
}
TRAIN_CONV_EXP_KEYS = {
    "se.reduce.weight": (2, 32, 1, 1), "se.reduce.bias": (2,),
    "se.expand.weight": (32, 2, 1, 1), "se.expand.bias": (32,),
    "rbr_conv.0.conv.weight": (32, 1, 3, 3), **bn("rbr_conv.0.bn", 32),
    "rbr_scale.conv.weight": (32, 1, 1, 1), **bn("rbr_scale.bn", 32),
}
DEPLOY_CONV_EXP_KEYS = {
    "se.reduce.weight": (2, 32, 1, 1), "se.reduce.bias": (2,),
    "se.expand.weight": (32, 2, 1, 1), "se.expand.bias": (32,),
    "reparam_conv.weight": (32, 1, 3, 3), "reparam_conv.bias": (32,),
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


def test_block_keys_are_apples():
    train = z.train_model()
    train_state = train.state_dict()
    deploy_state = z.upstream_deploy(train).state_dict()
    direct_state = z.deploy_model().state_dict()
    for prefix, train_keys, deploy_keys in (
        (BLOCK, TRAIN_BLOCK_KEYS, DEPLOY_BLOCK_KEYS),
        ("network.1", TRAIN_PATCH_EMBED_KEYS, DEPLOY_PATCH_EMBED_KEYS),
        ("conv_exp", TRAIN_CONV_EXP_KEYS, DEPLOY_CONV_EXP_KEYS),
    ):
        assert block_shapes(train_state, prefix) == train_keys, prefix
        assert block_shapes(deploy_state, prefix) == deploy_keys, prefix
        assert block_shapes(direct_state, prefix) == deploy_keys, prefix
    assert block_shapes(train_state, "network.2") == {"pe.weight": (16, 1, 7, 7), "pe.bias": (16,)}
    assert block_shapes(deploy_state, "network.2") == {"reparam_conv.weight": (16, 1, 7, 7),
                                                       "reparam_conv.bias": (16,)}
    # The RepMixerBlock built without layer scale has neither layer_scale parameter.
    assert not [k for k in train_state if k.startswith("network.3.1.") and "layer_scale" in k]


def test_block_layer_scale_and_convffn_are_kept_unchanged():
    train = z.train_model()
    before, after = train.state_dict(), z.upstream_deploy(train).state_dict()
    for name in ("layer_scale", *CONVFFN_KEYS):
        assert torch.equal(before[f"{BLOCK}.{name}"], after[f"{BLOCK}.{name}"]), name


def test_large_kernel_conv_applies_no_activation():
    """apple's ReparamLargeKernelConv computes its GELU and discards it, in both forms."""
    train = z.train_model().double()
    layer = train.network[1].proj[0]
    x = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(out, layer.lkb_origin(x) + layer.small_conv(x))
        assert (out < -0.1).any()
        converted = z.upstream_deploy(train).network[1].proj[0]
        assert relative_error(out, converted(x)) <= 1e-12


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
    for key, value in train.state_dict().items():
        if key.endswith("layer_scale"):
            assert value.unique().numel() == value.numel(), key
    # A wrong eps in the fused branches only (ConvFFN's BN is not fused) must be caught.
    wrong = z.train_model().double()
    for name, m in wrong.named_modules():
        if isinstance(m, nn.BatchNorm2d) and any(p in name for p in ("rbr_", "lkb_origin", "small_conv")):
            m.eps = 0.5
    x = probe()
    assert relative_error(run(train, x), run(z.upstream_deploy(wrong), x)) > 1e-4

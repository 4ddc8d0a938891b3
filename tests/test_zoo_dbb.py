"""Self-consistency of tests/family_zoo/dbb.py, our rewrite of DingXiaoH/DiverseBranchBlock.

The train form in eval mode equals the rewrite of upstream's own conversion (float64, randomised
BN statistics and idconv1 weights); that conversion loads strictly into the model built in deploy
form; train and deploy key sets are upstream's, written out literally below.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.family_zoo import dbb

F64 = torch.float64

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

#: upstream layout for groups < out_channels and internal == in_channels (idconv1)
DENSE = {
    "dbb_origin.conv.weight", *(f"dbb_origin.bn.{s}" for s in BN),
    "dbb_avg.conv.weight", *(f"dbb_avg.bn.bn.{s}" for s in BN), *(f"dbb_avg.avgbn.{s}" for s in BN),
    "dbb_1x1.conv.weight", *(f"dbb_1x1.bn.{s}" for s in BN),
    "dbb_1x1_kxk.idconv1.weight", *(f"dbb_1x1_kxk.bn1.bn.{s}" for s in BN),
    "dbb_1x1_kxk.conv2.weight", *(f"dbb_1x1_kxk.bn2.{s}" for s in BN),
}
#: groups < out_channels with an internal width other than in_channels: a plain conv1
DENSE_CONV1 = (DENSE - {"dbb_1x1_kxk.idconv1.weight"}) | {"dbb_1x1_kxk.conv1.weight"}
#: groups >= out_channels (depthwise): no dbb_1x1, dbb_avg is avg + avgbn only, conv1 (2x internal)
DEPTHWISE = {
    "dbb_origin.conv.weight", *(f"dbb_origin.bn.{s}" for s in BN),
    *(f"dbb_avg.avgbn.{s}" for s in BN),
    "dbb_1x1_kxk.conv1.weight", *(f"dbb_1x1_kxk.bn1.bn.{s}" for s in BN),
    "dbb_1x1_kxk.conv2.weight", *(f"dbb_1x1_kxk.bn2.{s}" for s in BN),
}
CONV_BN = {"conv.weight", *(f"bn.{s}" for s in BN)}

LAYOUTS = {
    "body.stem": DENSE, "body.depthwise": DEPTHWISE, "body.pointwise": CONV_BN, "body.grouped5": DENSE,
    "body.depthwise_s2": DEPTHWISE, "body.wide_internal": DENSE_CONV1, "body.kernel1": DENSE,
    "body.conv3": CONV_BN, "body.grouped_s2": DENSE,
}

#: shapes that pin each block's geometry (groups, internal width, kernel size)
SHAPES = {
    "body.stem.dbb_origin.conv.weight": (8, 3, 3, 3),
    "body.stem.dbb_avg.conv.weight": (8, 3, 1, 1),
    "body.stem.dbb_1x1_kxk.idconv1.weight": (3, 3, 1, 1),
    "body.stem.dbb_1x1_kxk.conv2.weight": (8, 3, 3, 3),
    "body.depthwise.dbb_origin.conv.weight": (8, 1, 3, 3),
    "body.depthwise.dbb_1x1_kxk.conv1.weight": (16, 1, 1, 1),
    "body.depthwise.dbb_1x1_kxk.bn1.bn.running_var": (16,),
    "body.depthwise.dbb_1x1_kxk.conv2.weight": (8, 2, 3, 3),
    "body.pointwise.conv.weight": (16, 8, 1, 1),
    "body.grouped5.dbb_origin.conv.weight": (16, 8, 5, 5),
    "body.grouped5.dbb_avg.conv.weight": (16, 8, 1, 1),
    "body.grouped5.dbb_1x1.conv.weight": (16, 8, 1, 1),
    "body.grouped5.dbb_1x1_kxk.idconv1.weight": (16, 8, 1, 1),
    "body.grouped5.dbb_1x1_kxk.conv2.weight": (16, 8, 5, 5),
    "body.depthwise_s2.dbb_1x1_kxk.conv1.weight": (32, 1, 1, 1),
    "body.depthwise_s2.dbb_1x1_kxk.conv2.weight": (16, 2, 3, 3),
    "body.wide_internal.dbb_1x1_kxk.conv1.weight": (24, 16, 1, 1),
    "body.wide_internal.dbb_1x1_kxk.conv2.weight": (8, 24, 3, 3),
    "body.kernel1.dbb_origin.conv.weight": (8, 8, 1, 1),
    "body.kernel1.dbb_1x1_kxk.conv2.weight": (8, 8, 1, 1),
    "body.conv3.conv.weight": (8, 8, 3, 3),
    "body.grouped_s2.dbb_origin.conv.weight": (16, 2, 3, 3),
    "body.grouped_s2.dbb_1x1_kxk.idconv1.weight": (8, 2, 1, 1),
    "body.grouped_s2.dbb_1x1_kxk.conv2.weight": (16, 2, 3, 3),
}

DEPLOY_KEYS = [
    "body.stem.dbb_reparam.weight", "body.stem.dbb_reparam.bias",
    "body.depthwise.dbb_reparam.weight", "body.depthwise.dbb_reparam.bias",
    "body.pointwise.conv.weight", "body.pointwise.conv.bias",
    "body.grouped5.dbb_reparam.weight", "body.grouped5.dbb_reparam.bias",
    "body.depthwise_s2.dbb_reparam.weight", "body.depthwise_s2.dbb_reparam.bias",
    "body.wide_internal.dbb_reparam.weight", "body.wide_internal.dbb_reparam.bias",
    "body.kernel1.dbb_reparam.weight", "body.kernel1.dbb_reparam.bias",
    "body.conv3.conv.weight", "body.conv3.conv.bias",
    "body.grouped_s2.dbb_reparam.weight", "body.grouped_s2.dbb_reparam.bias",
    "head.weight", "head.bias",
]

DEPLOY_SHAPES = {
    "body.stem.dbb_reparam.weight": (8, 3, 3, 3), "body.depthwise.dbb_reparam.weight": (8, 1, 3, 3),
    "body.grouped5.dbb_reparam.weight": (16, 8, 5, 5), "body.depthwise_s2.dbb_reparam.weight": (16, 1, 3, 3),
    "body.wide_internal.dbb_reparam.weight": (8, 16, 3, 3), "body.kernel1.dbb_reparam.weight": (8, 8, 1, 1),
    "body.grouped_s2.dbb_reparam.weight": (16, 2, 3, 3), "body.conv3.conv.weight": (8, 8, 3, 3),
}


def rel_err(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(*dbb.INPUT_SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)


@pytest.fixture(scope="module")
def train() -> nn.Module:
    return dbb.train_model().double()


def test_eval_train_form_equals_upstream_conversion(train, x):
    before = {k: v.clone() for k, v in train.state_dict().items()}
    converted = dbb.upstream_deploy(train)
    reference = run(train, x)
    assert reference.abs().max() > 1e-3
    assert rel_err(reference, run(converted, x)) <= 1e-9
    after = train.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_upstream_conversion_loads_strictly_into_deploy_form(train, x):
    state = dbb.upstream_deploy(train).state_dict()
    deploy = dbb.deploy_model().double()
    deploy.load_state_dict(state, strict=True)
    assert rel_err(run(train, x), run(deploy, x)) <= 1e-9


def test_deploy_keys_are_upstreams(train):
    state = dbb.upstream_deploy(train).state_dict()
    assert list(state) == DEPLOY_KEYS
    assert list(dbb.deploy_model().state_dict()) == DEPLOY_KEYS
    for key, shape in DEPLOY_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert all(state[k].dtype == F64 for k in DEPLOY_KEYS)


def test_train_keys_are_upstreams_block_by_block(train):
    state = train.state_dict()
    expected = {f"{block}.{suffix}" for block, layout in LAYOUTS.items() for suffix in layout}
    assert set(state) == expected | {"head.weight", "head.bias"}
    for key, shape in SHAPES.items():
        assert tuple(state[key].shape) == shape, key


def test_id_tensor_is_a_plain_attribute_outside_the_state_dict(train):
    idconvs = [m for m in train.modules() if isinstance(m, dbb.IdentityBasedConv1x1)]
    assert len(idconvs) == 4
    assert not any("id_tensor" in k for k in train.state_dict())
    grouped = train.body.grouped_s2.dbb_1x1_kxk.idconv1  # 8 channels, groups 4: 2 inputs per group
    expected = torch.zeros(8, 2, 1, 1)
    expected[torch.arange(8), torch.arange(8) % 2] = 1.0
    assert torch.equal(grouped.id_tensor, expected)
    assert "id_tensor" not in dict(grouped.named_buffers())


def test_fixture_statistics_and_constants_are_randomised(train):
    bns = [m for m in train.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 5 * 6 + 2 * 4 + 2 * 1  # dense DBB: 6 BNs, depthwise DBB: 4, ConvBN: 1
    for bn in bns:
        assert bn.running_mean.abs().min() > 0 and (bn.running_var - 1).abs().min() > 0
        assert (bn.weight - 1).abs().min() > 0 and bn.bias.abs().min() > 0
    for m in train.modules():
        if isinstance(m, dbb.IdentityBasedConv1x1):
            assert m.weight.abs().min() > 0


def test_a_wrong_eps_or_a_zero_border_would_be_caught(train, x):
    reference = run(train, x)
    wrong_eps = copy.deepcopy(train)
    for m in wrong_eps.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3
    assert rel_err(reference, run(dbb.upstream_deploy(wrong_eps), x)) > 1e-5

    zero_border = copy.deepcopy(train)
    for m in zero_border.modules():
        if isinstance(m, dbb.BNAndPadLayer):
            m.border_value = lambda m=m: torch.zeros_like(m.running_mean)
    assert rel_err(reference, run(zero_border, x)) > 1e-4

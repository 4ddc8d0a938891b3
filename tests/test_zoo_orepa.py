"""Self-consistency of tests/family_zoo/orepa.py, our rewrite of JUGGHM/OREPA_CVPR2022.

The train form in eval mode equals the rewrite of upstream's own conversion (float64, randomised BN
statistics, ``vector``s, idconv1 and identity-initialised weights); that conversion loads strictly
into the model built in deploy form; train keys (which are parameters, which are buffers) and deploy
keys are upstream's, written out literally below.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.family_zoo import orepa

F64 = torch.float64

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

#: ``OREPA`` parameters and buffers (``weight_only`` blocks have no ``bn``)
OREPA_PARAMS = {
    "weight_orepa_origin", "weight_orepa_avg_conv", "weight_orepa_pfir_conv", "weight_orepa_1x1",
    "weight_orepa_1x1_kxk_idconv1", "weight_orepa_1x1_kxk_conv2", "weight_orepa_gconv_dw",
    "weight_orepa_gconv_pw", "vector",
}
OREPA_BUFFERS = {"weight_orepa_avg_avg", "id_tensor", "weight_orepa_prior"}
OREPA_KEYS = OREPA_PARAMS | OREPA_BUFFERS | {f"bn.{s}" for s in BN}
OREPA_WEIGHT_ONLY_KEYS = OREPA_PARAMS | OREPA_BUFFERS
OREPA_1X1_KEYS = {"weight_or1x1_origin", "weight_or1x1_l2i_conv1", "weight_or1x1_l2i_conv2", "vector",
                  *(f"bn.{s}" for s in BN)}
RBR_DENSE_PARAMS = {
    "weight_rbr_origin", "weight_rbr_avg_conv", "weight_rbr_pfir_conv", "weight_rbr_1x1_kxk_idconv1",
    "weight_rbr_1x1_kxk_conv2", "weight_rbr_gconv_dw", "weight_rbr_gconv_pw", "vector",
}
RBR_DENSE_BUFFERS = {"weight_rbr_avg_avg", "id_tensor", "weight_rbr_prior"}
REPVGG_NO_ID_KEYS = {*(f"rbr_dense.{k}" for k in RBR_DENSE_PARAMS | RBR_DENSE_BUFFERS),
                     *(f"rbr_dense.bn.{s}" for s in BN), "rbr_1x1.conv.weight", *(f"rbr_1x1.bn.{s}" for s in BN)}
REPVGG_KEYS = REPVGG_NO_ID_KEYS | {f"rbr_identity.{s}" for s in BN}

LAYOUTS = {
    "body.stem": {*(f"weight{i}.{k}" for i in range(3) for k in OREPA_WEIGHT_ONLY_KEYS), *(f"bn.{s}" for s in BN)},
    "body.orepa": OREPA_KEYS,
    "body.expand": OREPA_1X1_KEYS,
    "body.grouped_s2": OREPA_KEYS,
    "body.depthwise": OREPA_KEYS,
    "body.k5": OREPA_KEYS,
    "body.reduce": OREPA_1X1_KEYS,
    "body.large_base": {"weight0", "weight1", *(f"bn.{s}" for s in BN)},
    "body.repvgg_id": REPVGG_KEYS,
    "body.repvgg_s2": REPVGG_NO_ID_KEYS,
    "body.shortcut": {"conv.weight", *(f"bn.{s}" for s in BN)},
}

#: shapes that pin each block's geometry (groups, internal width, expand ratio 8, vector rows)
SHAPES = {
    "body.stem.weight0.weight_orepa_origin": (8, 3, 3, 3),
    "body.stem.weight0.weight_orepa_1x1_kxk_idconv1": (3, 3, 1, 1),
    "body.stem.weight0.weight_orepa_gconv_dw": (24, 1, 3, 3),
    "body.stem.weight0.weight_orepa_gconv_pw": (8, 24, 1, 1),
    "body.stem.weight1.weight_orepa_origin": (8, 8, 3, 3),
    "body.stem.weight2.weight_orepa_origin": (8, 8, 3, 3),
    "body.stem.weight2.vector": (6, 8),
    "body.orepa.weight_orepa_origin": (8, 8, 3, 3),
    "body.orepa.weight_orepa_avg_conv": (8, 8, 1, 1),
    "body.orepa.weight_orepa_pfir_conv": (8, 8, 1, 1),
    "body.orepa.weight_orepa_avg_avg": (3, 3),
    "body.orepa.weight_orepa_1x1": (8, 8, 1, 1),
    "body.orepa.weight_orepa_1x1_kxk_idconv1": (8, 8, 1, 1),
    "body.orepa.id_tensor": (8, 8, 1, 1),
    "body.orepa.weight_orepa_1x1_kxk_conv2": (8, 8, 3, 3),
    "body.orepa.weight_orepa_gconv_dw": (64, 1, 3, 3),
    "body.orepa.weight_orepa_gconv_pw": (8, 64, 1, 1),
    "body.orepa.vector": (6, 8),
    "body.orepa.weight_orepa_prior": (8, 3, 3),
    "body.expand.weight_or1x1_origin": (16, 8, 1, 1),
    "body.expand.weight_or1x1_l2i_conv1": (8, 8, 1, 1),
    "body.expand.weight_or1x1_l2i_conv2": (16, 8, 1, 1),
    "body.expand.vector": (2, 16),
    "body.grouped_s2.weight_orepa_origin": (16, 8, 3, 3),
    "body.grouped_s2.weight_orepa_1x1_kxk_idconv1": (16, 8, 1, 1),
    "body.grouped_s2.weight_orepa_1x1_kxk_conv2": (16, 8, 3, 3),
    "body.grouped_s2.weight_orepa_gconv_dw": (128, 1, 3, 3),
    "body.grouped_s2.weight_orepa_gconv_pw": (16, 64, 1, 1),
    "body.depthwise.weight_orepa_origin": (16, 1, 3, 3),
    "body.depthwise.weight_orepa_1x1_kxk_idconv1": (32, 1, 1, 1),
    "body.depthwise.id_tensor": (32, 1, 1, 1),
    "body.depthwise.weight_orepa_1x1_kxk_conv2": (16, 2, 3, 3),
    "body.depthwise.weight_orepa_gconv_pw": (16, 8, 1, 1),
    "body.k5.weight_orepa_origin": (12, 16, 5, 5),
    "body.k5.weight_orepa_avg_avg": (5, 5),
    "body.k5.weight_orepa_prior": (12, 5, 5),
    "body.k5.weight_orepa_1x1_kxk_conv2": (12, 16, 5, 5),
    "body.k5.weight_orepa_gconv_dw": (128, 1, 5, 5),
    "body.reduce.weight_or1x1_l2i_conv1": (8, 12, 1, 1),
    "body.reduce.weight_or1x1_l2i_conv2": (8, 8, 1, 1),
    "body.large_base.weight0": (8, 8, 3, 3),
    "body.large_base.weight1": (8, 8, 3, 3),
    "body.repvgg_id.rbr_dense.vector": (6, 8),
    "body.repvgg_id.rbr_dense.weight_rbr_gconv_pw": (8, 64, 1, 1),
    "body.repvgg_id.rbr_1x1.conv.weight": (8, 8, 1, 1),
    "body.repvgg_s2.rbr_dense.vector": (5, 16),
    "body.repvgg_s2.rbr_dense.weight_rbr_origin": (16, 8, 3, 3),
    "body.shortcut.conv.weight": (16, 16, 1, 1),
}

DEPLOY_KEYS = [
    "body.stem.or_large_reparam.weight", "body.stem.or_large_reparam.bias",
    "body.orepa.orepa_reparam.weight", "body.orepa.orepa_reparam.bias",
    "body.expand.or1x1_reparam.weight", "body.expand.or1x1_reparam.bias",
    "body.grouped_s2.orepa_reparam.weight", "body.grouped_s2.orepa_reparam.bias",
    "body.depthwise.orepa_reparam.weight", "body.depthwise.orepa_reparam.bias",
    "body.k5.orepa_reparam.weight", "body.k5.orepa_reparam.bias",
    "body.reduce.or1x1_reparam.weight", "body.reduce.or1x1_reparam.bias",
    "body.large_base.or_large_reparam.weight", "body.large_base.or_large_reparam.bias",
    "body.repvgg_id.rbr_reparam.weight", "body.repvgg_id.rbr_reparam.bias",
    "body.repvgg_s2.rbr_reparam.weight", "body.repvgg_s2.rbr_reparam.bias",
    "body.shortcut.conv.weight", "body.shortcut.conv.bias",
    "head.weight", "head.bias",
]

DEPLOY_SHAPES = {
    "body.stem.or_large_reparam.weight": (8, 3, 7, 7), "body.orepa.orepa_reparam.weight": (8, 8, 3, 3),
    "body.expand.or1x1_reparam.weight": (16, 8, 1, 1), "body.grouped_s2.orepa_reparam.weight": (16, 8, 3, 3),
    "body.depthwise.orepa_reparam.weight": (16, 1, 3, 3), "body.k5.orepa_reparam.weight": (12, 16, 5, 5),
    "body.reduce.or1x1_reparam.weight": (8, 12, 1, 1), "body.large_base.or_large_reparam.weight": (8, 8, 5, 5),
    "body.repvgg_id.rbr_reparam.weight": (8, 8, 3, 3), "body.repvgg_s2.rbr_reparam.weight": (16, 8, 3, 3),
}


def rel_err(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(*orepa.INPUT_SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)


@pytest.fixture(scope="module")
def train() -> nn.Module:
    return orepa.train_model().double()


def test_eval_train_form_equals_upstream_conversion(train, x):
    before = {k: v.clone() for k, v in train.state_dict().items()}
    reference = run(train, x)
    assert reference.abs().max() > 1e-3
    assert rel_err(reference, run(orepa.upstream_deploy(train), x)) <= 1e-9
    after = train.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_upstream_conversion_loads_strictly_into_deploy_form(train, x):
    state = orepa.upstream_deploy(train).state_dict()
    deploy = orepa.deploy_model().double()
    deploy.load_state_dict(state, strict=True)
    assert rel_err(run(train, x), run(deploy, x)) <= 1e-9


def test_deploy_keys_are_upstreams(train):
    state = orepa.upstream_deploy(train).state_dict()
    assert list(state) == DEPLOY_KEYS
    assert list(orepa.deploy_model().state_dict()) == DEPLOY_KEYS
    for key, shape in DEPLOY_SHAPES.items():
        assert tuple(state[key].shape) == shape, key


def test_train_keys_are_upstreams_block_by_block(train):
    state = train.state_dict()
    expected = {f"{block}.{suffix}" for block, layout in LAYOUTS.items() for suffix in layout}
    assert set(state) == expected | {"head.weight", "head.bias"}
    for key, shape in SHAPES.items():
        assert tuple(state[key].shape) == shape, key


def test_which_tensors_are_buffers(train):
    buffers = {k for k, _ in train.named_buffers() if not k.endswith(("running_mean", "running_var",
                                                                        "num_batches_tracked"))}
    orepa_blocks = ["body.stem.weight0", "body.stem.weight1", "body.stem.weight2", "body.orepa",
                    "body.grouped_s2", "body.depthwise", "body.k5"]
    expected = {f"{b}.{n}" for b in orepa_blocks for n in OREPA_BUFFERS}
    expected |= {f"body.{b}.rbr_dense.{n}" for b in ("repvgg_id", "repvgg_s2") for n in RBR_DENSE_BUFFERS}
    assert buffers == expected
    assert all(not k.startswith(tuple(expected)) for k, _ in train.named_parameters())


def test_constant_buffers_hold_upstreams_values(train):
    state = train.state_dict()
    assert torch.equal(state["body.k5.weight_orepa_avg_avg"], torch.full((5, 5), 1 / 25, dtype=torch.float32).double())
    # groups 16 with internal 32: every row picks input 0 of its group
    assert torch.equal(state["body.depthwise.id_tensor"], torch.ones(32, 1, 1, 1, dtype=F64))
    # groups 2, internal 16, 8 inputs per group: K[r, r % 8] = 1
    grouped = torch.zeros(16, 8, 1, 1, dtype=F64)
    grouped[torch.arange(16), torch.arange(16) % 8] = 1.0
    assert torch.equal(state["body.grouped_s2.id_tensor"], grouped)
    prior = state["body.orepa.weight_orepa_prior"]  # 8 channels: rows by h for i < 4, by w after
    assert prior[0, 0, 2] == pytest.approx(math.cos(math.pi * 0.5 / 3), abs=1e-7)
    assert prior[1, 2, 0] == pytest.approx(math.cos(math.pi * 2.5 * 2 / 3), abs=1e-7)
    assert prior[5, 1, 2] == pytest.approx(math.cos(math.pi * 2.5 * 2 / 3), abs=1e-7)
    assert prior[5, 2, 1] == pytest.approx(math.cos(math.pi * 1.5 * 2 / 3), abs=1e-7)


def test_fixture_statistics_and_constants_are_randomised(train):
    bns = [m for m in train.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 9 + 3 + 2  # one per block; RepVGG blocks: rbr_dense.bn, rbr_1x1.bn (+ rbr_identity)
    for bn in bns:
        assert bn.running_mean.abs().min() > 0 and (bn.running_var - 1).abs().min() > 0
        assert (bn.weight - 1).abs().min() > 0 and bn.bias.abs().min() > 0
    vectors = [p for n, p in train.named_parameters() if n.endswith("vector")]
    assert len(vectors) == 3 + 4 + 2 + 2
    for v in vectors:
        assert v.unique().numel() == v.numel()
    for n, p in train.named_parameters():
        if n.endswith("_idconv1"):
            assert p.abs().min() > 0, n
    eye = torch.eye(8, dtype=F64)[:, :, None, None]
    assert (train.body.expand.weight_or1x1_l2i_conv1 - eye).abs().min() > 0
    assert (train.body.reduce.weight_or1x1_l2i_conv2 - eye).abs().min() > 0
    # the k = 5 prior: upstream writes only h, w < 3; the rest is arbitrary stored data
    assert train.body.k5.weight_orepa_prior[:, 3:, :].abs().min() > 0


def test_a_wrong_eps_or_an_ignored_buffer_would_be_caught(train, x):
    reference = run(train, x)
    wrong_eps = copy.deepcopy(train)
    for m in wrong_eps.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3
    assert rel_err(reference, run(orepa.upstream_deploy(wrong_eps), x)) > 1e-5
    # a converter that rebuilt the k > 3 prior from the formula instead of reading the buffer
    rebuilt = copy.deepcopy(train)
    with torch.no_grad():
        rebuilt.body.k5.weight_orepa_prior[:, 3:, :] = 0
        rebuilt.body.k5.weight_orepa_prior[:, :, 3:] = 0
    assert rel_err(reference, run(orepa.upstream_deploy(rebuilt), x)) > 1e-5


# -- the branches as feature-space maps (what /tmp notes describe), independent of weight_gen ---------


def orepa_in_feature_space(block: orepa.OREPA, x: torch.Tensor) -> torch.Tensor:
    """``OREPA``'s six branches as sequences of convs on ``x``, each scaled by its ``vector`` row."""
    g, s, p, k = block.groups, block.stride, block.padding, block.kernel_size
    o, i = block.out_channels, block.in_channels
    v = block.vector

    def scaled(y, row):
        return y * v[row].view(1, -1, 1, 1)

    origin = F.conv2d(x, block.weight_orepa_origin, None, s, p, 1, g)
    # a k x k mean per channel, zero padding counted; its taps are the buffer's float32-rounded 1/k^2
    mean = block.weight_orepa_avg_avg.expand(o, 1, k, k)
    avg = F.conv2d(F.conv2d(x, block.weight_orepa_avg_conv, None, 1, 0, 1, g), mean, None, s, p, 1, o)
    pfir = F.conv2d(F.conv2d(x, block.weight_orepa_pfir_conv, None, 1, 0, 1, g),
                    block.weight_orepa_prior[:, None], None, s, p, 1, o)
    first = block.weight_orepa_1x1_kxk_idconv1 + block.id_tensor
    chain = F.conv2d(F.conv2d(x, first, None, 1, 0, 1, g), block.weight_orepa_1x1_kxk_conv2, None, s, p, 1, g)
    one = F.conv2d(x, block.weight_orepa_1x1, None, s, 0, 1, g)
    # depthwise k x k (8 outputs per input channel), then a grouped 1x1 whose rows are permuted:
    # output c * (o/g) + a takes pointwise row a * g + c
    pw = block.weight_orepa_gconv_pw
    rows = torch.arange(o).view(o // g, g).t().reshape(-1)
    gconv = F.conv2d(F.conv2d(x, block.weight_orepa_gconv_dw, None, s, p, 1, i), pw[rows], None, 1, 0, 1, g)
    total = (scaled(origin, 0) + scaled(avg, 1) + scaled(one, 4) + scaled(chain, 3) + scaled(pfir, 2)
             + scaled(gconv, 5))
    return block.nonlinear(block.bn(total))


@pytest.mark.parametrize("name", ["orepa", "grouped_s2", "depthwise", "k5"])
def test_orepa_weight_gen_equals_its_branches_in_feature_space(train, name):
    block = getattr(train.body, name)
    x = torch.randn(2, block.in_channels, 9, 9, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert rel_err(run(block, x), run_fn(orepa_in_feature_space, block, x)) <= 1e-9


@pytest.mark.parametrize("name", ["expand", "reduce"])
def test_orepa_1x1_weight_gen_equals_its_branches_in_feature_space(train, name):
    block = getattr(train.body, name)
    x = torch.randn(2, block.in_channels, 7, 7, generator=torch.Generator().manual_seed(2), dtype=F64)

    def branches(b, x):
        v = b.vector
        origin = F.conv2d(x, b.weight_or1x1_origin, None, b.stride) * v[0].view(1, -1, 1, 1)
        chain = F.conv2d(F.conv2d(x, b.weight_or1x1_l2i_conv1, None, b.stride), b.weight_or1x1_l2i_conv2)
        return b.nonlinear(b.bn(origin + chain * v[1].view(1, -1, 1, 1)))

    assert rel_err(run(block, x), run_fn(branches, block, x)) <= 1e-9


@pytest.mark.parametrize("name", ["repvgg_id", "repvgg_s2"])
def test_repvgg_orepa_is_its_branches_in_feature_space(train, name):
    block = getattr(train.body, name)
    d = block.rbr_dense
    x = torch.randn(2, d.in_channels, 7, 7, generator=torch.Generator().manual_seed(3), dtype=F64)

    def branches(block, x):
        s, v = d.stride, d.vector

        def scaled(y, row):
            return y * v[row].view(1, -1, 1, 1)

        origin = F.conv2d(x, d.weight_rbr_origin, None, s, 1)
        mean = d.weight_rbr_avg_avg.expand(d.out_channels, 1, 3, 3)
        avg = F.conv2d(F.conv2d(x, d.weight_rbr_avg_conv), mean, None, s, 1, 1, d.out_channels)
        pfir = F.conv2d(F.conv2d(x, d.weight_rbr_pfir_conv), d.weight_rbr_prior[:, None], None, s, 1, 1,
                        d.out_channels)
        chain = F.conv2d(F.conv2d(x, d.weight_rbr_1x1_kxk_idconv1 + d.id_tensor), d.weight_rbr_1x1_kxk_conv2,
                         None, s, 1)
        gconv = F.conv2d(F.conv2d(x, d.weight_rbr_gconv_dw, None, s, 1, 1, d.in_channels), d.weight_rbr_gconv_pw)
        dense = d.bn(scaled(origin, 0) + scaled(avg, 1) + scaled(chain, 3) + scaled(pfir, 2) + scaled(gconv, 4))
        identity = 0 if block.rbr_identity is None else block.rbr_identity(x)
        return block.nonlinearity(dense + block.rbr_1x1(x) + identity)

    assert rel_err(run(block, x), run_fn(branches, block, x)) <= 1e-9


def test_large_kernels_are_stacked_valid_convs_with_later_kernels_flipped(train):
    """Upstream cross-correlates the 3x3 kernels, so on the unpadded interior the generated k x k
    kernel equals 3x3 convs in sequence with every kernel after the first flipped in h and w."""
    for block, kernels in [
        (train.body.stem, [getattr(train.body.stem, f"weight{i}").weight_gen() for i in range(3)]),
        (train.body.large_base, [train.body.large_base.weight0, train.body.large_base.weight1]),
    ]:
        x = torch.randn(2, block.in_channels, 11, 11, generator=torch.Generator().manual_seed(4), dtype=F64)
        with torch.no_grad():
            whole = F.conv2d(x, block.weight_gen())
            stacked = F.conv2d(x, kernels[0])
            for kernel in kernels[1:]:
                stacked = F.conv2d(stacked, kernel.flip(2, 3))
        assert rel_err(whole, stacked) <= 1e-9


def run_fn(fn, block, x):
    with torch.no_grad():
        return fn(block, x)

"""The `mmpretrain` (RepVGGBlock) and `acnet` (ACBlock) families beyond the shared contract.

mmpretrain: key names (``.norm``, ``branch_norm``), identity rules, grouped/dilated geometry, the
SE layer kept after the sum and upstream's deploy forward that skips it. ACNet: where the k×1
and 1×k kernels land in the fused k×k kernel (k = 3 and 5), a check that a ver/hor mix-up would
be caught, cropping blocks (padding < k//2), ``last_bn`` folding and stray keys.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests import zoo
from repvgg_cli.api import ConvertOptions, convert_state_dict, reparameterize
from repvgg_cli.errors import UnsupportedError
from repvgg_cli.families import FamilyOptions, family_by_name, find_blocks
from repvgg_cli.families.keys import KeyView
from repvgg_cli.fusion.bn import fold_batch_norm
from repvgg_cli.fusion.kernels import center_kernel
from repvgg_cli.fusion.sum import fuse_branches
from tests.family_zoo import acnet as ac
from tests.family_zoo import mmpretrain as mm

F64 = torch.float64


def rel_err(reference, candidate) -> float:
    if isinstance(reference, torch.Tensor):
        reference, candidate = [reference], [candidate]
    worst = 0.0
    for r, c in zip(reference, candidate):
        r, c = r.double(), c.double()
        worst = max(worst, float((r - c).abs().max() / r.abs().max().clamp_min(1e-30)))
    return worst


def run(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model.eval()(x)


def key_convert(train: nn.Module, deploy: nn.Module, x: torch.Tensor):
    """Key tree: convert ``train``'s state dict, load it strictly into ``deploy``; both outputs."""
    result = convert_state_dict(train.state_dict())
    assert result.ok
    deploy.load_state_dict(result.state_dict, strict=True)
    return result, run(train, x), run(deploy, x)


# -- mmpretrain ---------------------------------------------------------------------------------


def test_mmpretrain_keys_identity_rules_and_geometry():
    train = mm.train_model().double()
    state = train.state_dict()
    blocks = {b.name: b for b in find_blocks(state)}
    assert list(blocks) == ["stem", "stage_1.0", "stage_1.1", "stage_2.0", "stage_2.1", "stage_3.0", "stage_3.1"]
    assert {b.family for b in blocks.values()} == {"mmpretrain"}
    with_identity = {n for n, b in blocks.items() if b.branches.identity is not None}
    # stride 2 or in != out: no branch_norm; dilated blocks (padding == dilation) keep it
    assert with_identity == {"stage_1.1", "stage_2.1", "stage_3.0", "stage_3.1"}
    assert blocks["stage_2.1"].branches.resolved_groups == 2
    assert blocks["stage_1.1"].source_keys[0] == "stage_1.1.branch_norm.weight"
    assert all(k.split(".")[2] in {"branch_3x3", "branch_1x1", "branch_norm"}
               for k in blocks["stage_1.1"].source_keys)
    result = convert_state_dict(state)
    new_keys = set(result.state_dict) - set(state)
    assert new_keys == {f"{n}.branch_reparam.{p}" for n in blocks for p in ("weight", "bias")}
    assert not any(".branch_3x3." in k or ".branch_1x1." in k or ".branch_norm." in k for k in result.state_dict)
    family = family_by_name("mmpretrain")
    assert sorted(family.find_deploy_prefixes(list(result.state_dict))) == sorted(blocks)


def test_mmpretrain_module_tree_reads_dilation_groups_and_switches_like_upstream():
    torch.manual_seed(0)
    train = mm.train_model()
    x = torch.randn(*mm.INPUT_SHAPE)
    reference = run(train, x)
    result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=mm.INPUT_SHAPE))
    assert result.ok
    assert rel_err(reference, run(result.model, x)) <= 1e-5
    model = result.model
    dilated = model.stage_3[0]
    assert dilated.deploy is True
    assert not any(hasattr(dilated, b) for b in ("branch_3x3", "branch_1x1", "branch_norm"))
    conv = dilated.branch_reparam
    assert (conv.kernel_size, conv.padding, conv.dilation, conv.stride) == ((3, 3), (2, 2), (2, 2), (1, 1))
    assert model.stage_2[0].branch_reparam.groups == 2 and model.stage_2[0].branch_reparam.stride == (2, 2)


def se_models(block):
    train = zoo.randomize_bn(mm.RepVGG(use_se=True, block=block), seed=5).eval()
    for m in train.modules():  # non-trivial SE weights
        if isinstance(m, mm.SELayer):
            torch.nn.init.normal_(m.conv2.conv.weight, std=1.0)
    return train, mm.RepVGG(use_se=True, block=block, deploy=True).eval()


def test_mmpretrain_se_layer_is_kept_and_upstream_deploy_forward_is_reported():
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    # patched forward (SE applied in deploy): the key tree is exact
    train, deploy = se_models(mm.FixedSEBlock)
    result, before, after = key_convert(train.double(), deploy.double(), x)
    assert rel_err(before, after) <= 1e-9
    assert any(k.endswith("se_layer.conv1.conv.weight") for k in result.state_dict)
    assert all(any("se_layer" in n for n in r.block.notes) for r in result.blocks)
    # stock forward: the same (correct) weights, but mmpretrain's deploy model skips se_layer
    train, deploy = se_models(mm.RepVGGBlock)
    _, before, after = key_convert(train.double(), deploy.double(), x)
    assert rel_err(before, after) > 1e-3


def test_mmpretrain_module_tree_does_not_hide_upstream_se_skip():
    shape = (2, 3, 32, 32)
    fixed, _ = se_models(mm.FixedSEBlock)
    assert reparameterize(fixed, ConvertOptions(input_shape=shape)).ok
    stock, _ = se_models(mm.RepVGGBlock)
    result = reparameterize(stock, ConvertOptions(input_shape=shape))
    assert all(r.check.ok for r in result.blocks)  # every block is fused correctly ...
    assert not result.model_check.ok and not result.ok  # ... but the stock deploy forward drops SE


def test_mmpretrain_refuses_non_batch_norm_and_stray_keys():
    block = mm.RepVGGBlock(8, 8)
    block.branch_3x3.norm = nn.GroupNorm(2, 8)
    with pytest.raises(UnsupportedError, match="GroupNorm"):
        reparameterize(nn.Sequential(block), ConvertOptions(input_shape=(1, 8, 8, 8)))
    with pytest.raises(UnsupportedError, match="running statistics"):
        convert_state_dict(nn.Sequential(block).state_dict())
    state = dict(mm.RepVGGBlock(8, 8).state_dict())
    state["branch_1x1.conv.bias_extra"] = torch.zeros(8)
    with pytest.raises(UnsupportedError, match="unexpected key branch_1x1.conv.bias_extra"):
        convert_state_dict(state)


def test_mmpretrain_does_not_claim_the_official_layout():
    state = zoo.repvgg("tiny").state_dict()
    assert "mmpretrain" not in {b.family for b in find_blocks(state)}
    family = family_by_name("mmpretrain")
    assert not any(family.matches_module(m) for m in zoo.repvgg("tiny").modules())


# -- ACNet --------------------------------------------------------------------------------------


def randomized_acblock(k: int, seed: int, **kwargs) -> ac.ACBlock:
    torch.manual_seed(seed)
    return zoo.randomize_bn(ac.ACBlock(4, 6, k, **kwargs), seed=seed).double().eval()


@pytest.mark.parametrize("k", [3, 5])
def test_acnet_asymmetric_kernels_land_in_the_middle_row_and_column(k):
    block = randomized_acblock(k, seed=k, padding=k // 2)
    with torch.no_grad():
        block.square_conv.weight.zero_()
    state = block.state_dict()
    only_ver = {**state, "hor_conv.weight": torch.zeros_like(state["hor_conv.weight"])}
    only_hor = {**state, "ver_conv.weight": torch.zeros_like(state["ver_conv.weight"])}
    family = family_by_name("acnet")
    c = k // 2
    for which, sd in (("ver", only_ver), ("hor", only_hor)):
        fused = fuse_branches(family.parse_keys(KeyView(sd, ""), FamilyOptions()).branches)
        w = fused.weight
        assert w.shape[2:] == (k, k)
        mask = torch.zeros(k, k, dtype=torch.bool)
        if which == "ver":
            mask[:, c] = True  # the k×1 kernel fills the middle column
        else:
            mask[c, :] = True  # the 1×k kernel fills the middle row
        assert torch.count_nonzero(w[..., ~mask]) == 0
        bn = family.parse_keys(KeyView(sd, ""), FamilyOptions()).branches.convs[1 if which == "ver" else 2].bn
        folded, _ = fold_batch_norm(sd[f"{which}_conv.weight"], None, bn)
        expected = folded[:, :, :, 0] if which == "ver" else folded[:, :, 0, :]
        got = w[:, :, :, c] if which == "ver" else w[:, :, c, :]
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [3, 5])
def test_acnet_equivalence_would_catch_swapped_ver_and_hor(k):
    """The family's fusion matches on a non-square input; the transposed placement does not."""
    block = randomized_acblock(k, seed=10 + k, padding=k // 2)
    x = torch.randn(2, 4, 9, 13, dtype=F64)
    reference = run(block, x)
    branches = family_by_name("acnet").parse_keys(KeyView(block.state_dict(), ""), FamilyOptions()).branches
    fused = fuse_branches(branches)
    right = nn.functional.conv2d(x, fused.weight, fused.bias, padding=k // 2)
    assert rel_err(reference, right) <= 1e-12
    square, ver, hor = (fold_batch_norm(c.weight, c.bias, c.bn) for c in branches.convs)
    swapped = (square[0] + center_kernel(ver[0].transpose(2, 3), (k, k))
               + center_kernel(hor[0].transpose(2, 3), (k, k)))
    wrong = nn.functional.conv2d(x, swapped, fused.bias, padding=k // 2)
    assert rel_err(reference, wrong) > 1e-2


@pytest.mark.parametrize(
    "k, padding, stride, groups",
    [(3, 1, 1, 1), (3, 1, 2, 2), (5, 2, 1, 1), (5, 2, 2, 2), (3, 0, 1, 1), (5, 1, 2, 1), (5, 0, 1, 2), (5, 3, 1, 1)],
)
def test_acnet_block_geometries_key_and_module_tree(k, padding, stride, groups):
    kwargs = dict(stride=stride, padding=padding, groups=groups)
    train = randomized_acblock(k, seed=k * 100 + padding * 10 + stride + groups, **kwargs)
    x = torch.randn(2, 4, 11, 14, dtype=F64)
    _, before, after = key_convert(train, ac.ACBlock(4, 6, k, deploy=True, **kwargs).double().eval(), x)
    assert rel_err(before, after) <= 1e-9
    result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=(2, 4, 11, 14)))
    assert result.ok and rel_err(before, run(result.model, x)) <= 1e-9
    conv = result.model.fused_conv
    assert (conv.padding, conv.stride, conv.groups) == ((padding, padding), (stride, stride), groups)
    assert not any(hasattr(result.model, c) for c in ("square_conv", "ver_bn", "hor_conv"))


def test_acnet_earlier_layout_crop_layers_and_last_bn_are_folded():
    torch.manual_seed(3)
    train = nn.Sequential(
        ac.ACBlockCropLayer(4, 6, 3, padding=0, use_last_bn=True),
        ac.ACBlockCropLayer(6, 6, 5, padding=2, groups=3, use_affine=False, use_last_bn=True),
    )
    train = zoo.randomize_bn(train, seed=4).double().eval()
    deploy = nn.Sequential(ac.ACBlockCropLayer(4, 6, 3, padding=0, deploy=True),
                           ac.ACBlockCropLayer(6, 6, 5, padding=2, groups=3, deploy=True)).double()
    x = torch.randn(2, 4, 12, 10, dtype=F64)
    result, before, after = key_convert(train, deploy, x)
    assert rel_err(before, after) <= 1e-9
    assert all(r.block.branches.post_bn is not None for r in result.blocks)
    assert not any("last_bn" in k for k in result.state_dict)
    switched = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=(2, 4, 12, 10)))
    assert switched.ok and rel_err(before, run(switched.model, x)) <= 1e-9
    first = switched.model[0]
    assert first.fused_conv.padding == (0, 0)
    assert not any(hasattr(first, c) for c in ("last_bn", "ver_conv_crop_layer", "square_bn"))


def test_acnet_nonlinear_is_kept_and_upstream_deploy_skip_is_not_hidden():
    train = zoo.randomize_bn(ac.ACBlockCropLayer(4, 6, 3, padding=1, nonlinear=nn.PReLU()), seed=8).eval()
    state = train.state_dict()
    result = convert_state_dict(state)
    assert result.state_dict["nonlinear.weight"] is state["nonlinear.weight"]
    switched = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=(2, 4, 9, 9)))
    assert switched.blocks[0].check.ok and switched.blocks[0].block.notes
    assert not switched.ok  # the upstream deploy forward returns fused_conv(x) without nonlinear


def test_acnet_refuses_stray_keys_misalignment_and_leaves_other_layouts_alone():
    state = dict(ac.ACBlock(4, 6, 3, padding=1).state_dict())
    with pytest.raises(UnsupportedError, match="unexpected key lx_conv.weight"):
        convert_state_dict({**state, "lx_conv.weight": torch.zeros(6, 4, 3, 3)})
    with pytest.raises(UnsupportedError, match="half-converted"):
        convert_state_dict({**state, "fused_conv.weight": torch.zeros(6, 4, 3, 3), "fused_conv.bias": torch.zeros(6)})
    no_hor = {k: v for k, v in state.items() if not k.startswith("hor_")}
    assert family_by_name("acnet").parse_keys(KeyView(no_hor, ""), FamilyOptions()) is None
    swapped_names = {**state, "ver_conv.weight": state["hor_conv.weight"], "hor_conv.weight": state["ver_conv.weight"]}
    with pytest.raises(UnsupportedError, match="vertical branch is 3x1"):
        convert_state_dict(swapped_names)
    block = ac.ACBlock(4, 6, 3, padding=1)
    block.hor_conv.padding = (1, 1)  # a 1×3 kernel one row off the square kernel's centre
    with pytest.raises(UnsupportedError, match="hor_conv"):
        family_by_name("acnet").parse_module("b", block, FamilyOptions())

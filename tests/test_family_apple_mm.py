"""apple ml-fastvit (apple's names) and mmpretrain MobileOne through the CLI, against rewrites of
their own model code.

tests/family_zoo/apple_fastvit.py rewrites apple/ml-fastvit ``models/fastvit.py`` and its
``mobileone.py``/``replknet.py`` modules (MobileOneBlock, RepMixer, PatchEmbed's large kernel,
RepCPE); tests/family_zoo/mmpretrain_mobileone.py rewrites open-mmlab/mmpretrain
``mmpretrain/models/backbones/mobileone.py`` (with one grouped, dilated block). Their train
models have random BN statistics and layer scales. A float32 state dict converted by
``repvgg convert`` must load strictly into the project's deploy model and give its outputs
(rel <= 1e-5), hold the tensors the project's own conversion computes (rel <= 1e-6), and leave
alone what the project keeps (FastViT's ConvFFN conv+BN and RepMixerBlock layer scale,
MobileOne's SE layers).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repvgg_cli.api import convert_state_dict
from repvgg_cli.pipeline.find import find_module_blocks
from repvgg_cli.errors import UnsupportedError
from repvgg_cli.families import FamilyOptions, family_by_name, find_blocks
from tests.family_roundtrip import (
    assert_equals_upstream,
    assert_strict_load_and_match,
    convert_pickled_model,
    convert_state_dict_file,
    inspect_families,
)
from tests.family_zoo import apple_fastvit, mmpretrain_mobileone

ZOOS = {"apple_fastvit": apple_fastvit, "mmpretrain_mobileone": mmpretrain_mobileone}
BLOCKS = {
    "apple_fastvit": {
        "patch_embed.0": "apple_mobileone", "patch_embed.1": "apple_mobileone", "patch_embed.2": "apple_mobileone",
        "network.0.0.token_mixer": "apple_repmixer", "network.1.proj.0": "replknet",
        "network.1.proj.1": "apple_mobileone", "network.2": "apple_repcpe", "network.3.0.token_mixer": "apple_repmixer",
        "network.3.1.token_mixer": "apple_repmixer", "conv_exp": "apple_mobileone",
    },
    "mmpretrain_mobileone": {name: "mmpretrain_mobileone" for name in
                             ("stage0", "stage1.0", "stage1.1", "stage2.0", "stage2.1", "stage2.2", "stage2.3",
                              "stage2.4")},
}
KEPT = {  # keys the projects' own conversions keep, which look like branches
    "apple_fastvit": ("network.0.0.layer_scale", "network.0.0.convffn.conv.conv.weight",
                      "network.0.0.convffn.conv.bn.running_var", "network.3.0.convffn.conv.bn.weight",
                      "conv_exp.se.reduce.weight"),
    "mmpretrain_mobileone": ("stage2.2.se.conv1.conv.weight", "stage2.3.se.conv2.conv.bias"),
}


@pytest.fixture(scope="module", params=sorted(ZOOS))
def converted(request, tmp_path_factory):
    z = ZOOS[request.param]
    return request.param, z, convert_state_dict_file(z, tmp_path_factory.mktemp(request.param))


def test_cli_output_loads_strictly_into_the_deploy_model_and_matches(converted):
    name, z, c = converted
    assert c.families == BLOCKS[name]
    assert all(b["ok"] for b in c.document["blocks"])
    assert c.document["unrecognised"] == []
    assert_strict_load_and_match(z, c.train, c.state)


def test_cli_output_holds_the_projects_own_conversion(converted):
    _, z, c = converted
    assert_equals_upstream(z, c.train, c.state)


def test_inspect_names_the_family_of_every_block(converted):
    name, _, c = converted
    assert inspect_families(c.source) == BLOCKS[name]


def test_keys_outside_the_blocks_pass_through_bit_for_bit(converted):
    name, _, c = converted
    train = c.train.state_dict()
    kept = [k for k in c.state if k in train]  # every deploy key here has a new name
    for key in kept:
        assert torch.equal(c.state[key], train[key]), key
    assert set(KEPT[name]) <= set(kept)


@pytest.mark.parametrize("name", sorted(ZOOS))
def test_module_tree_on_the_pickled_model(name, tmp_path):
    z = ZOOS[name]
    train, deploy, document = convert_pickled_model(z, tmp_path)
    assert document["mode"] == "module tree" and document["model_check"]["ok"] is True
    assert {b["name"]: b["family"] for b in document["blocks"]} == BLOCKS[name]
    assert_strict_load_and_match(z, train, deploy.state_dict())
    if name == "apple_fastvit":
        mixers = [m for m in deploy.modules() if isinstance(m, apple_fastvit.RepMixer)]
        assert mixers and all(m.inference_mode and not hasattr(m, "mixer") for m in mixers)
    else:  # the dilated, grouped block keeps its geometry
        conv = deploy.stage2[4].branch_reparam
        assert (conv.kernel_size, conv.dilation, conv.padding, conv.groups) == ((3, 3), (2, 2), (2, 2), 4)
        assert all(m.deploy for m in deploy.modules() if isinstance(m, mmpretrain_mobileone.MobileOneBlock))


# -- look-alikes and refusals --------------------------------------------------------------------


def bn_keys(prefix: str, n: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.rand(n) + 0.5, f"{prefix}.bias": torch.randn(n),
            f"{prefix}.running_mean": torch.randn(n), f"{prefix}.running_var": torch.rand(n) + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(3)}


def families_of(state) -> dict[str, str]:
    return {b.name: b.family for b in find_blocks(state)}


def test_a_mobileone_mixer_without_repmixer_norm_is_a_mobileone_block():
    state = {"t.mixer.rbr_conv.0.conv.weight": torch.randn(4, 1, 3, 3), **bn_keys("t.mixer.rbr_conv.0.bn", 4),
             **bn_keys("t.mixer.rbr_skip", 4)}
    assert families_of(state) == {"t.mixer": "apple_mobileone"}


def test_a_pe_conv_is_a_repcpe_only_inside_apple_fastvit():
    pe = {"net.2.pe.weight": torch.randn(8, 1, 7, 7), "net.2.pe.bias": torch.randn(8)}
    assert families_of(pe) == {}
    fastvit = apple_fastvit.train_model().state_dict()
    assert families_of(fastvit)["network.2"] == "apple_repcpe"
    with_company = {**fastvit, "network.2.scale": torch.randn(8)}  # not apple's RepCPE: more than its conv
    assert "network.2" not in families_of(with_company)
    dense = {**fastvit, "network.2.pe.weight": torch.randn(16, 16, 7, 7)}  # not depthwise
    assert "network.2" not in families_of(dense)


def test_mmpretrain_repvgg_and_mobileone_are_told_apart():
    repvgg = {"b.branch_3x3.conv.weight": torch.randn(4, 4, 3, 3), **bn_keys("b.branch_3x3.norm", 4),
              "b.branch_1x1.conv.weight": torch.randn(4, 4, 1, 1), **bn_keys("b.branch_1x1.norm", 4),
              **bn_keys("b.branch_norm", 4)}
    assert families_of(repvgg) == {"b": "mmpretrain"}
    mobileone = {"b.branch_conv_list.0.conv.weight": torch.randn(4, 4, 3, 3), **bn_keys("b.branch_conv_list.0.norm", 4),
                 "b.branch_scale.conv.weight": torch.randn(4, 4, 1, 1), **bn_keys("b.branch_scale.norm", 4),
                 **bn_keys("b.branch_norm", 4)}
    assert families_of(mobileone) == {"b": "mmpretrain_mobileone"}


def test_a_stray_key_in_a_mobileone_branch_is_refused():
    state = mmpretrain_mobileone.train_model().state_dict()
    state["stage1.0.branch_conv_list.0.act.weight"] = torch.randn(8)
    with pytest.raises(UnsupportedError, match=r"block stage1\.0 \(mmpretrain_mobileone\): unexpected key "
                                               r"stage1\.0\.branch_conv_list\.0\.act\.weight"):
        convert_state_dict(state)


def test_a_repmixer_with_an_activation_inside_is_refused():
    mixer = apple_fastvit.RepMixer(8, 3).eval()
    mixer.mixer.activation = nn.GELU()
    family = family_by_name("apple_repmixer")
    assert family.matches_module(mixer)
    with pytest.raises(UnsupportedError, match=r"mixer\.activation is a GELU; a RepMixer's MobileOne blocks must be linear"):
        family.parse_module("m", mixer, FamilyOptions())


def test_a_live_mmpretrain_branch_with_a_relu_is_not_a_mobileone_block():
    block = mmpretrain_mobileone.MobileOneBlock(4, 4, 3, 1)
    block.branch_conv_list[0].add_module("act", nn.ReLU())
    assert find_module_blocks(nn.Sequential(block)) == []

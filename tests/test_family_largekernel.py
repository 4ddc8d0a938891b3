"""RepLKNet and UniRepLKNet through the CLI, against the rewrites of their own model code.

tests/family_zoo/replknet.py and unireplknet.py rewrite DingXiaoH/RepLKNet-pytorch ``replknet.py``
and AILab-CVC/UniRepLKNet ``unireplknet.py`` (names, eps, forward, conversion); their train models
have random BN statistics, layer scales and GRN gamma/beta. A float32 state dict converted by
``repvgg convert`` must load strictly into the project's deploy model and give its outputs
(rel <= 1e-5), hold the tensors the project's own conversion computes (rel <= 1e-6), and leave
what the project keeps (RepLKNet's pw1/pw2/stem conv+BN pairs, UniRepLKNet's GRN gamma) alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repvgg_cli.algebra import maps
from repvgg_cli.api import convert_state_dict
from repvgg_cli.pipeline.find import find_module_blocks
from repvgg_cli.errors import UnsupportedError
from repvgg_cli.families import family_by_name, find_blocks
from repvgg_cli.semantics import run
from tests.family_roundtrip import (
    assert_equals_upstream,
    assert_strict_load_and_match,
    convert_pickled_model,
    convert_state_dict_file,
    inspect_families,
    outputs,
    probe,
    worst,
)
from tests.family_zoo import replknet, unireplknet

ZOOS = {"replknet": replknet, "unireplknet": unireplknet}

UNIREPLKNET_SITES = {
    "stages.0.0": ("dwconv", "pwconv2"), "stages.0.1": ("dwconv", "pwconv2"), "stages.0.2": ("dwconv", "pwconv2"),
    "stages.1.0": ("dwconv", "pwconv2"), "stages.1.1": ("dwconv", "pwconv2"), "stages.1.2": ("pwconv2",),
    "stages.1.3": ("dwconv", "pwconv2"),
}
BLOCKS = {
    "replknet": {"stages.0.blocks.0.large_kernel": "replknet", "stages.1.blocks.0.large_kernel": "replknet",
                 "extra": "replknet"},
    "unireplknet": {f"{block}.{site}": {"dwconv": "unireplknet", "pwconv2": "unireplknet_ffn"}[site]
                    for block, sites in UNIREPLKNET_SITES.items() for site in sites},
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
    sites = tuple(f"{block}." for block in c.families)
    kept = [k for k in c.state if k in train and not k.startswith(sites)]
    for key in kept:
        assert torch.equal(c.state[key], train[key]), key
    if name == "replknet":  # conv+BN pairs upstream's structural_reparam keeps
        for key in ("stem.0.conv.weight", "stem.0.bn.running_var", "stages.0.blocks.0.pw1.bn.running_mean",
                    "stages.0.blocks.0.pw2.conv.weight", "stages.0.blocks.0.prelkb_bn.weight",
                    "stages.0.blocks.1.pw1.bn.bias", "transitions.0.1.bn.running_var"):
            assert key in kept, key
    else:  # the GRN keeps its gamma; its beta, pwconv2's BN and the layer scale are folded
        assert "stages.0.0.act.1.gamma" in kept and "stages.0.0.act.1.beta" not in c.state
        assert "stages.0.0.gamma" not in c.state and "stages.0.0.pwconv2.2.running_var" not in c.state
        assert c.state["stages.0.0.pwconv2.0.weight"].shape == (8, 32)


@pytest.mark.parametrize("name", sorted(ZOOS))
def test_module_tree_on_the_pickled_model(name, tmp_path):
    z = ZOOS[name]
    train, deploy, document = convert_pickled_model(z, tmp_path)
    assert document["mode"] == "module tree" and document["model_check"]["ok"] is True
    assert {b["name"]: b["family"] for b in document["blocks"]} == BLOCKS[name]
    assert_strict_load_and_match(z, train, deploy.state_dict())
    assert worst(outputs(train, probe(z)), outputs(deploy, probe(z))) <= 1e-5
    if name == "unireplknet":
        blocks = [m for m in deploy.modules() if isinstance(m, unireplknet.UniRepLKNetBlock)]
        assert all(isinstance(b.norm, nn.Identity) and b.gamma is None and not b.act[1].use_bias for b in blocks)
        assert not any(hasattr(m, "origin_bn") for m in deploy.modules())


# -- the algebra: dilated kernels summed into a larger undilated one ------------------------------


def test_plus_sums_dilated_kernels_as_the_undilated_kernels_they_equal():
    g = torch.Generator().manual_seed(3)
    weights = {(17, 1): torch.randn(4, 1, 17, 17, generator=g, dtype=torch.float64),
               (3, 7): torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64),
               (9, 2): torch.randn(4, 1, 9, 9, generator=g, dtype=torch.float64),
               (5, 1): torch.randn(4, 1, 5, 5, generator=g, dtype=torch.float64)}
    x = torch.randn(2, 4, 21, 19, generator=g, dtype=torch.float64)
    want = sum(F.conv2d(x, w, padding=r * (k // 2), dilation=r, groups=4) for (k, r), w in weights.items())
    for explicit_padding in (False, True):  # key tree (centred) and module tree (each conv's own padding)
        terms = [maps.conv(w, dilation=r, groups=4, padding=r * (k // 2) if explicit_padding else None)
                 for (k, r), w in weights.items()]
        value = maps.plus(*terms)
        fused = maps.evaluate(value)
        assert fused.kernel_size == (17, 17) and fused.dilation == (1, 1) and fused.padding == (8, 8)
        got = F.conv2d(x, fused.weight, fused.bias, padding=fused.padding, groups=fused.groups)
        assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())
        assert value.composite and torch.equal(run(value.ops, x), want)  # the check runs the dilated convs


def test_plus_keeps_a_dilation_every_kxk_term_shares():
    g = torch.Generator().manual_seed(4)
    kxk = torch.randn(8, 2, 3, 3, generator=g, dtype=torch.float64)
    point = torch.randn(8, 2, 1, 1, generator=g, dtype=torch.float64)
    value = maps.plus(maps.conv(kxk, dilation=2, padding=2, groups=4),
                         maps.conv(point, padding=0, groups=4), maps.identity(8))
    fused = maps.evaluate(value)
    assert fused.kernel_size == (3, 3) and fused.dilation == (2, 2) and not value.composite
    x = torch.randn(1, 8, 9, 9, generator=g, dtype=torch.float64)
    want = F.conv2d(x, kxk, padding=2, dilation=2, groups=4) + F.conv2d(x, point, groups=4) + x
    got = F.conv2d(x, fused.weight, fused.bias, padding=2, dilation=2, groups=4)
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())


# -- look-alikes and refusals --------------------------------------------------------------------


def bn_keys(prefix: str, n: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.rand(n) + 0.5, f"{prefix}.bias": torch.randn(n),
            f"{prefix}.running_mean": torch.randn(n), f"{prefix}.running_var": torch.rand(n) + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(3)}


def test_look_alikes_are_not_claimed():
    convnext_like = {"b.dwconv.weight": torch.randn(8, 1, 7, 7), **bn_keys("b.norm", 8),
                     "b.pwconv1.weight": torch.randn(32, 8), "b.pwconv2.weight": torch.randn(8, 32),
                     **bn_keys("b.pwconv2.2", 8)}
    bare_large_conv = {"m.lkb_origin.conv.weight": torch.randn(4, 1, 7, 7)}  # no BN: not RepLKNet's conv_bn
    lone_dilated = {"d.lk_origin.weight": torch.randn(4, 1, 7, 7), **bn_keys("d.origin_bn", 4),
                    "d.dil_conv_k5_1.weight": torch.randn(4, 1, 5, 5), **bn_keys("d.dil_bn_k5_1", 4)}
    for state in (convnext_like, bare_large_conv, lone_dilated):
        assert find_blocks(state) == []


def test_module_tree_does_not_match_a_nonlinear_or_lone_look_alike():
    relu_branch = replknet.ReparamLargeKernelConv(4, 4, 7, 1, 4, 3)
    relu_branch.lkb_origin = replknet.conv_bn_relu(4, 4, 7, 1, None, 4)  # a ReLU inside the branch
    lone = nn.Sequential(unireplknet.DilatedReparamBlock(4, 7, deploy=False))  # never converted alone upstream
    assert find_module_blocks(nn.Sequential(relu_branch)) == []
    # alone it is no UniRepLKNet family's: only the generic tracer (last in the registry) takes it
    assert [(name, family.name) for name, _, family in find_module_blocks(lone)] == [("0", "generic")]


def test_a_dilated_branch_whose_name_disagrees_with_its_kernel_is_refused():
    state = unireplknet.train_model().state_dict()
    renamed = {k.replace("stages.0.0.dwconv.dil_conv_k3_3.", "stages.0.0.dwconv.dil_conv_k5_3.")
                .replace("stages.0.0.dwconv.dil_bn_k3_3.", "stages.0.0.dwconv.dil_bn_k5_3."): v
               for k, v in state.items()}
    with pytest.raises(UnsupportedError, match=r"dil_conv_k5_3 is named for a 5x5 kernel but holds 3x3"):
        convert_state_dict(renamed)


def test_the_dilation_comes_from_the_key_name():
    """Renamed to another dilation, the same tensors fuse to another kernel: the name is read."""
    state = unireplknet.train_model().state_dict()
    renamed = {k.replace(".dil_conv_k3_5.", ".dil_conv_k3_6.").replace(".dil_bn_k3_5.", ".dil_bn_k3_6."): v
               for k, v in state.items() if k.startswith("stages.0.0.")}
    original = {k: v for k, v in state.items() if k.startswith("stages.0.0.")}
    a = convert_state_dict(original).state_dict["stages.0.0.dwconv.lk_origin.weight"]
    b = convert_state_dict(renamed).state_dict["stages.0.0.dwconv.lk_origin.weight"]
    moved = (a - b).abs().amax(dim=(0, 1)) > 0
    assert moved.nonzero().tolist() == sorted(
        [[6 + dy, 6 + dx] for dy in (-5, 0, 5) for dx in (-5, 0, 5) if (dy, dx) != (0, 0)]
        + [[6 + dy, 6 + dx] for dy in (-6, 0, 6) for dx in (-6, 0, 6) if (dy, dx) != (0, 0)])


def test_module_tree_reads_a_site_from_the_block_it_is_in_now():
    """A UniRepLKNetBlock's dwconv and pwconv2 are matched as children of a block met before; one
    taken out of its block is not matched any more."""
    block = unireplknet.UniRepLKNetBlock(8, 7)
    dw, ffn = family_by_name("unireplknet"), family_by_name("unireplknet_ffn")
    assert not dw.matches_module(block) and not ffn.matches_module(block)  # the block is no site itself
    child, pwconv2 = block.dwconv, block.pwconv2
    assert dw.matches_module(child) and ffn.matches_module(pwconv2)
    assert not ffn.matches_module(child) and not dw.matches_module(pwconv2)
    block.dwconv = copy.deepcopy(child)
    assert not dw.matches_module(child)

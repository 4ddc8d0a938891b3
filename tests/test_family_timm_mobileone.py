"""The timm RepVggBlock, timm MobileOneBlock and apple MobileOne families on timm's real models.

Real timm models are built with ``timm.create_model(name, pretrained=False)`` (no network), their
BN statistics randomised, converted through the CLI from a safetensors state dict, and the deploy
file is loaded strictly into timm's own ``reparameterize_model`` of the same model.

``repvgg_d2se`` is compared in float64: with randomised BN statistics its activations grow to
~1e8 over 47 blocks and ReLU/SE flips make even its *train-form* fp32 output differ from its fp64
output by up to O(1) (seed dependent), so no fp32 comparison of two fp32 computations can mean
anything there. The other models are compared in float32. ``repvgg_d2se`` (133M parameters)
dominates the file's run time: its conversion alone (fusion and per-block checks in float64)
takes ~30 s of CPU; its forward passes use a 32×32 input.
"""

from __future__ import annotations

import copy
import json
from functools import partial

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import get_attn
from timm.models.byobnet import LayerFn, RepVggBlock
from timm.models.byobnet import MobileOneBlock as ByobMobileOneBlock
from timm.models.fastvit import MobileOneBlock as FastVitMobileOneBlock
from torch import nn
from typer.testing import CliRunner

from tests import zoo
from repvgg_cli.cli import app
from repvgg_cli.api import ConvertOptions, convert_state_dict, reparameterize
from repvgg_cli.pipeline.find import find_module_blocks
from repvgg_cli.errors import UnsupportedError
from repvgg_cli.families import FAMILIES, find_blocks
from tests.family_zoo import apple_mobileone as apple_zoo
from tests.family_zoo import timm_mobileone as mobileone_zoo
from tests.family_zoo import timm_repvgg as repvgg_zoo

BLOCK_TYPES = (RepVggBlock, ByobMobileOneBlock, FastVitMobileOneBlock)
FAMILY_OF = {RepVggBlock: "timm_repvgg", ByobMobileOneBlock: "timm_mobileone", FastVitMobileOneBlock: "timm_mobileone"}


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30))


def timm_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    return zoo.randomize_bn(model, seed=seed + 1).eval().to(dtype)


def expected_families(model: nn.Module) -> dict[str, str]:
    return {name: FAMILY_OF[type(m)] for name, m in model.named_modules() if type(m) in BLOCK_TYPES}


def run_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize(
    "name, dtype, size",
    [("repvgg_b1g4", torch.float32, 64), ("mobileone_s0", torch.float32, 64), ("repvgg_d2se", torch.float64, 32)],
)
def test_cli_converts_real_timm_checkpoint_that_loads_into_timms_deploy_form(name, dtype, size, tmp_path):
    model = timm_model(name, dtype)
    source, target = tmp_path / "train.safetensors", tmp_path / "deploy.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(source))

    result = CliRunner().invoke(app, ["convert", str(source), str(target), "--json"])
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads(result.stdout)
    assert {b["name"]: b["family"] for b in report["blocks"]} == expected_families(model)

    deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
    deploy.load_state_dict(load_file(str(target)), strict=True)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3), dtype=dtype)
    assert relative_error(run_forward(model, x), run_forward(deploy, x)) <= 1e-5


def test_module_tree_switches_real_timm_model_like_timms_own_reparameterize():
    model = timm_model("mobileone_s0", seed=4)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    reference = run_forward(model, x)
    timms_own = timm.utils.reparameterize_model(copy.deepcopy(model))

    result = reparameterize(copy.deepcopy(model), ConvertOptions(input_shape=(1, 3, 64, 64)))
    assert result.ok and result.model_check is not None and result.model_check.ok
    assert {r.block.name: r.block.family for r in result.blocks} == expected_families(model)
    assert relative_error(reference, run_forward(result.model, x)) <= 1e-5
    assert_like_timms_own(result, timms_own, expected_families(model), rtol=1e-5)


def assert_like_timms_own(result, timms_own: nn.Module, block_names, rtol: float) -> None:
    """Same attributes as timm's reparameterize() (reparam_conv set, branches and drop_path gone), same state."""
    for block_name in block_names:
        mine, theirs = result.model.get_submodule(block_name), timms_own.get_submodule(block_name)
        assert sorted(dict(mine.named_children())) == sorted(dict(theirs.named_children()))
        assert isinstance(mine.reparam_conv, nn.Conv2d)
        for gone in ("conv_kxk", "conv_1x1", "conv_scale", "identity", "drop_path"):
            assert not hasattr(mine, gone), (block_name, gone)
    ours, own = result.state_dict, timms_own.state_dict()
    assert list(ours) == list(own)
    for key, tensor in own.items():
        assert ours[key].shape == tensor.shape, key
        assert relative_error(tensor, ours[key]) <= rtol, key


def timm_repvgg_blocks() -> nn.Sequential:
    """timm's RepVggBlock in its variants: strided, identity, grouped, grouped with SE, dilated."""
    torch.manual_seed(13)
    with_se = LayerFn(attn=partial(get_attn("se"), rd_ratio=0.25, rd_divisor=1))
    blocks = nn.Sequential(
        RepVggBlock(3, 16, stride=2),
        RepVggBlock(16, 16),
        RepVggBlock(16, 32, stride=2, group_size=8),
        RepVggBlock(32, 32, group_size=8, layers=with_se),
        RepVggBlock(32, 32, dilation=(2, 2)),
    )
    return zoo.randomize_bn(blocks, seed=14).eval()


def test_timm_repvgg_blocks_match_timm_in_both_trees():
    model = timm_repvgg_blocks().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    reference = run_forward(model, x)
    timms_own = timm.utils.reparameterize_model(copy.deepcopy(model))

    keyed = convert_state_dict(model.state_dict(), ConvertOptions())
    assert [r.block.family for r in keyed.blocks] == ["timm_repvgg"] * 5
    assert [r.block.branch_labels for r in keyed.blocks][:2] == [("3x3+bn", "1x1+bn"), ("3x3+bn", "1x1+bn", "id+bn")]
    timms_own.load_state_dict(keyed.state_dict, strict=True)
    assert relative_error(reference, run_forward(timms_own, x)) <= 1e-9

    result = reparameterize(copy.deepcopy(model), ConvertOptions(input_shape=(2, 3, 16, 16)))
    assert result.ok and len(result.blocks) == 5
    assert relative_error(reference, run_forward(result.model, x)) <= 1e-9
    assert result.model[4].reparam_conv.dilation == (2, 2) and result.model[3].reparam_conv.groups == 4
    assert_like_timms_own(result, timm.utils.reparameterize_model(copy.deepcopy(model)), [str(i) for i in range(5)], 1e-12)


def fastvit_blocks() -> nn.Sequential:
    """timm's fastvit MobileOneBlock in its variants: SE, several branches, no scale branch, identity only."""
    torch.manual_seed(6)
    blocks = nn.Sequential(
        FastVitMobileOneBlock(8, 16, 3, stride=2, use_se=True, num_conv_branches=2),
        FastVitMobileOneBlock(16, 16, 3, group_size=1, num_conv_branches=3),
        FastVitMobileOneBlock(16, 16, 3, group_size=1, use_act=False, use_scale_branch=False),
        FastVitMobileOneBlock(16, 16, 1, use_se=True),
    )
    return zoo.randomize_bn(blocks, seed=7).eval()


def test_fastvit_mobileone_blocks_match_timm_in_both_trees():
    model = fastvit_blocks()
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    train = copy.deepcopy(model).double()
    timms_own = timm.utils.reparameterize_model(copy.deepcopy(train))

    keyed = convert_state_dict(train.state_dict(), ConvertOptions())
    assert [r.block.family for r in keyed.blocks] == ["timm_mobileone"] * 4
    timms_own.load_state_dict(keyed.state_dict, strict=True)
    assert relative_error(run_forward(train, x), run_forward(timms_own, x)) <= 1e-9

    result = reparameterize(copy.deepcopy(model), ConvertOptions(input_shape=(2, 8, 16, 16)))
    assert result.ok and len(result.blocks) == 4
    assert all(block.inference_mode and block.reparam_conv is not None for block in result.model)
    assert relative_error(run_forward(model, x.float()), run_forward(result.model, x.float())) <= 1e-5


def test_fastvit_identity_only_block_becomes_timms_kxk_deploy_conv():
    """RepMixer's ``norm``: a fastvit MobileOneBlock with the identity BN alone (module tree only)."""
    torch.manual_seed(8)
    norm = zoo.randomize_bn(
        FastVitMobileOneBlock(16, 16, 3, group_size=1, use_act=False, use_scale_branch=False, num_conv_branches=0),
        seed=9,
    ).eval()
    holder = nn.Sequential(norm)
    x = torch.randn(2, 16, 8, 8)
    reference = run_forward(holder, x)
    timms_own = timm.utils.reparameterize_model(copy.deepcopy(holder))

    result = reparameterize(copy.deepcopy(holder), ConvertOptions(input_shape=(2, 16, 8, 8)))
    assert [r.block.family for r in result.blocks] == ["timm_mobileone"]
    assert result.model[0].reparam_conv.weight.shape == timms_own[0].reparam_conv.weight.shape == (16, 1, 3, 3)
    timms_own.load_state_dict(result.state_dict, strict=True)
    assert relative_error(reference, run_forward(result.model, x)) <= 1e-5
    assert relative_error(reference, run_forward(timms_own, x)) <= 1e-5
    # in a state dict, ``identity.*`` alone says nothing about the block: left to others
    assert find_blocks(holder.state_dict()) == []


def test_key_tree_keeps_the_families_apart():
    torch.manual_seed(10)
    model = nn.ModuleDict({
        "official": zoo.repvgg("tiny", num_classes=4),
        "timm_repvgg": repvgg_zoo.Net(),
        "timm_mobileone": mobileone_zoo.Net(),
        "apple": apple_zoo.Net(),
        "mobilevit": timm.create_model("mobilevit_xxs", pretrained=False),
    })
    state = model.state_dict()
    counts: dict[str, int] = {}
    for block in find_blocks(state):
        counts[block.family] = counts.get(block.family, 0) + 1
        assert block.name.split(".")[0] == {"official": "official", "timm_repvgg": "timm_repvgg",
                                            "timm_mobileone": "timm_mobileone", "apple_mobileone": "apple"}[block.family]
    expected = {
        "official": sum(type(m).__name__ == "OfficialBlock" for m in model.modules()),
        "timm_repvgg": 5,
        "timm_mobileone": 8,
        "apple_mobileone": 5,
    }
    assert counts == expected
    # timm's MobileVitBlock (conv_kxk ConvNormAct next to a plain conv_1x1) is nobody's block
    assert not any(name.startswith("mobilevit") for name in (b.name for b in find_blocks(state)))


def test_module_tree_keeps_the_families_apart():
    torch.manual_seed(11)
    model = nn.ModuleDict({
        "timm_repvgg": repvgg_zoo.Net(),
        "timm_mobileone": mobileone_zoo.Net(),
        "apple": apple_zoo.Net(),
        "mobilevit_block": timm.create_model("mobilevit_xxs", pretrained=False).stages[2][1],
    })
    found = {name: family.name for name, _, family in find_module_blocks(model)}
    assert sorted(set(found.values())) == ["apple_mobileone", "timm_mobileone", "timm_repvgg"]
    assert not any(name.startswith("mobilevit") for name in found)
    assert len(found) == 5 + 8 + 5


def test_deploy_keys_follow_each_projects_convention():
    for zoo_module, family in ((repvgg_zoo, "timm_repvgg"), (mobileone_zoo, "timm_mobileone"), (apple_zoo, "apple_mobileone")):
        train = zoo_module.train_model()
        result = convert_state_dict(train.state_dict())
        assert {r.block.family for r in result.blocks} == {family}
        assert all(r.block.deploy_prefix == f"{r.block.name}.reparam_conv" for r in result.blocks)
        assert list(result.state_dict) == list(zoo_module.deploy_model().state_dict())


def test_stray_key_in_a_branch_is_refused():
    state = dict(repvgg_zoo.train_model().state_dict())
    state["stages.1.conv_1x1.conv.bias_typo"] = torch.zeros(8)
    with pytest.raises(UnsupportedError, match="unexpected key stages.1.conv_1x1.conv.bias_typo"):
        convert_state_dict(state)
    state = dict(apple_zoo.train_model().state_dict())
    state["stage0.rbr_conv.1.extra"] = torch.zeros(8)
    with pytest.raises(UnsupportedError, match="unexpected key stage0.rbr_conv.1.extra"):
        convert_state_dict(state)


def test_activation_inside_a_branch_is_refused():
    """A ConvNormAct whose BatchNormAct2d applies its activation is not linear: not fusable."""
    block = RepVggBlock(8, 8)
    block.conv_1x1.bn.act = nn.ReLU()
    with pytest.raises(UnsupportedError, match="applies ReLU inside the branch"):
        reparameterize(nn.Sequential(block), ConvertOptions(input_shape=(1, 8, 8, 8)))


def test_wrong_eps_breaks_equivalence_on_a_real_timm_model():
    model = timm_model("mobileone_s0", seed=12)
    deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
    deploy.load_state_dict(convert_state_dict(model.state_dict(), ConvertOptions(bn_eps=1e-3)).state_dict, strict=True)
    x = torch.randn(1, 3, 32, 32)
    assert relative_error(run_forward(model, x), run_forward(deploy, x)) > 1e-3


def test_fastvit_t8_mobileone_blocks_are_recognised():
    """Each of fastvit_t8's MobileOneBlocks is a timm_mobileone block, or inside a block that encloses them."""
    torch.manual_seed(15)
    model = timm.create_model("fastvit_t8", pretrained=False).eval()
    mobileone = {n for n, m in model.named_modules() if isinstance(m, FastVitMobileOneBlock)}
    enclosing = {f.name for f in FAMILIES if "timm_mobileone" in f.encloses}

    def covered(found: dict[str, str]) -> None:
        mine = {n for n, family in found.items() if family == "timm_mobileone"}
        outer = [n for n, family in found.items() if family in enclosing]
        assert mine <= mobileone
        assert len(mine) >= 7  # the stem (3), the patch embeddings (3) and the final conv
        for name in mobileone - mine:
            assert any(name.startswith(o + ".") for o in outer), name

    covered({name: family.name for name, _, family in find_module_blocks(model)})
    covered({b.name: b.family for b in find_blocks(model.state_dict())})

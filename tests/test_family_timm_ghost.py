"""timm's RepGhostNet and GhostNetV3 re-parameterizations, on timm's own models.

The families (repvgg_cli/families/timm_ghost.py) follow huggingface/pytorch-image-models
``timm/models/repghost.py`` (RepGhostModule) and ``timm/models/ghostnet.py`` (GhostModuleV3: two
sites per module, primary and cheap; GhostBottleneckV3: the strided depthwise branches). The
reference is timm's own deploy form, ``timm.utils.reparameterize_model``: a converted state dict
holds exactly its keys, equal to its tensors, loads into it with ``strict=True`` and gives the
train model's outputs (float32 tensors, run in float64: rel <= 1e-5). Models are the smallest
registered variants (``pretrained=False``, 10 classes) or the same classes built small; every
BN's statistics and affine parameters and every parameter that starts constant are randomised.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.utils import reparameterize_model
from torch import nn

from repvgg_cli.api import reparameterize
from repvgg_cli.errors import UnsupportedError
from repvgg_cli.families import find_blocks
from repvgg_cli.pipeline.options import ConvertOptions
from tests.family_zoo import timm_ghostv3, timm_repghost
from tests.family_zoo.seeded import train_form
from tests.helpers import error_lines, invoke

MINE = {"timm_repghost", "timm_ghostv3_primary", "timm_ghostv3_cheap", "timm_ghostv3_dw"}


def model_of(name: str, seed: int = 1, **kwargs) -> nn.Module:
    return train_form(lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs), seed=seed)


def expected_families(model: nn.Module) -> dict[str, str]:
    """Every site timm's walk changes, by the name the families give it."""
    found = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "RepGhostModule" and len(module.fusion_bn) > 0:
            found[name] = "timm_repghost"
        elif kind == "GhostModuleV3":
            found[f"{name}.primary_rpr_conv"] = "timm_ghostv3_primary"
            found[f"{name}.cheap_rpr_conv"] = "timm_ghostv3_cheap"
        elif kind == "GhostBottleneckV3" and module.stride > 1:
            found[f"{name}.dw_rpr_conv"] = "timm_ghostv3_dw"
    return found


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output in float64 (a float32 run of these deep, randomised models differs from
    itself by ~1e-5 between two exact forms; float64 shows only what the stored tensors carry)."""
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(x.double())


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).norm() / reference.norm().clamp_min(1e-30))


def assert_timms_deploy_layout(model: nn.Module, converted: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """Exactly timm's deploy keys, equal to timm's own fused tensors, strict-load, same outputs."""
    timms_own = reparameterize_model(copy.deepcopy(model))
    own_state = timms_own.state_dict()
    assert sorted(converted) == sorted(own_state)
    for key, tensor in own_state.items():
        assert converted[key].shape == tensor.shape, key
        if tensor.is_floating_point():
            assert relative_error(tensor, converted[key]) <= 1e-5, key
    timms_own.load_state_dict(converted, strict=True)
    assert relative_error(forward(model, x), forward(timms_own, x)) <= 1e-5


@pytest.mark.parametrize("name", ["repghostnet_050", "ghostnetv3_050"])
def test_cli_converts_the_state_dict_into_timms_reparameterized_model(name, tmp_path):
    model = model_of(name)
    expected = expected_families(model)
    assert len(expected) == {"repghostnet_050": 32, "ghostnetv3_050": 68}[name]
    source, target = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), source)

    result = invoke("convert", source, target, "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert {b["name"]: b["family"] for b in report["blocks"]} == expected
    assert all(b["ok"] for b in report["blocks"]) and report["unrecognised"] == []
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert_timms_deploy_layout(model, load_file(str(target)), x)

    inspected = invoke("inspect", source, "--json")
    assert inspected.exit_code == 0, inspected.stderr[-2000:]
    assert {b["name"]: b["family"] for b in json.loads(inspected.stdout)["blocks"]} == expected


@pytest.mark.parametrize("zoo", [timm_repghost, timm_ghostv3], ids=["repghost", "ghostnetv3"])
def test_module_tree_switches_the_live_model_like_timm(zoo):
    model = zoo.train_model()
    x = torch.randn(*zoo.INPUT_SHAPE, generator=torch.Generator().manual_seed(3))
    result = reparameterize(copy.deepcopy(model), ConvertOptions(input_shape=zoo.INPUT_SHAPE))
    assert result.ok and result.model_check is not None and result.model_check.ok
    assert {r.block.name: r.block.family for r in result.blocks} == expected_families(model)
    assert_timms_deploy_layout(model, result.model.state_dict(), x)
    assert relative_error(forward(model, x), forward(result.model, x)) <= 1e-5
    timms_own = reparameterize_model(copy.deepcopy(model))
    ours_by_name = dict(result.model.named_modules())
    for name, theirs in timms_own.named_modules():
        ours = ours_by_name.pop(name)
        assert type(ours) is type(theirs), name  # the same module types where timm switched them
        for flag in ("infer_mode", "fusion_conv", "fusion_bn"):
            if hasattr(theirs, flag) and not isinstance(getattr(theirs, flag), nn.Module):
                assert getattr(ours, flag) == getattr(theirs, flag), (name, flag)
    assert not ours_by_name


def test_pickled_ghostnetv3_converts_through_the_cli(tmp_path):
    model = timm_ghostv3.train_model()
    source, target = tmp_path / "model.pt", tmp_path / "deploy.pt"
    torch.save(model, source)
    shape = ",".join(str(n) for n in timm_ghostv3.INPUT_SHAPE)
    result = invoke("convert", source, target, "--allow-pickle", "--input-shape", shape, "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["mode"] == "module tree" and report["model_check"]["ok"] is True
    assert {b["name"]: b["family"] for b in report["blocks"]} == expected_families(model)
    deployed = torch.load(target, weights_only=False)
    x = torch.randn(*timm_ghostv3.INPUT_SHAPE, generator=torch.Generator().manual_seed(4))
    assert_timms_deploy_layout(model, deployed.state_dict(), x)


def test_look_alikes_are_not_claimed():
    """RepGhost without re-parameterization (timm's call is a no-op there), GhostNet v1/v2 and the
    other re-parameterizable timm models: none of their keys is taken by these families."""
    from timm.models.repghost import RepGhostNet

    plain = train_form(lambda: RepGhostNet(timm_repghost.CFGS, num_classes=10, width=0.5, reparam=False), seed=3)
    models = [plain, model_of("ghostnet_050"), model_of("ghostnetv2_100")]
    models += [model_of(name) for name in ("repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9")]
    models.append(model_of("levit_128s", img_size=64))
    for model in models:
        assert not {b.family for b in find_blocks(model.state_dict())} & MINE


def test_stray_and_missing_keys_are_refused(tmp_path):
    state = timm_ghostv3.train_model().state_dict()
    stray = dict(state)
    stray["blocks.1.0.ghost1.cheap_rpr_conv.3.conv.bias"] = torch.zeros(8)  # no conv .3 to go with it
    with pytest.raises(UnsupportedError, match=r"unexpected key blocks\.1\.0\.ghost1\.cheap_rpr_conv\.3\.conv\.bias"):
        find_blocks(stray)
    broken = {k: v for k, v in state.items() if k != "blocks.1.0.dw_rpr_scale.bn1.running_var"}
    source, target = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(broken, source)
    result = invoke("convert", source, target)
    assert result.exit_code == 2
    assert "blocks.1.0.dw_rpr_scale.bn1.running_var is missing" in " ".join(error_lines(result))


def test_a_conv_in_repghosts_fusion_branch_is_refused():
    """timm's RepGhostModule only ever holds an nn.Identity in fusion_conv; a conv there is not
    the declared block (the module tree refuses it with the reason)."""
    model = timm_repghost.train_model()
    module = model.blocks[0][0].ghost1
    channels = module.fusion_bn[0].num_features
    module.fusion_conv[0] = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
    with pytest.raises(UnsupportedError, match="fusion_conv must hold one nn.Identity"):
        reparameterize(model, ConvertOptions(input_shape=timm_repghost.INPUT_SHAPE))

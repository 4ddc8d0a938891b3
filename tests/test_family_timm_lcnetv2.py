"""timm's LCNetV2 RepDepthwiseSeparable re-parameterization, on timm's own models.

The family (repvgg_cli/families/timm_lcnetv2.py) follows huggingface/pytorch-image-models
``timm/models/lcnetv2.py``: ``dw_conv_list`` (parallel depthwise conv+BN branches) becomes
``dw_conv``. The reference is timm's own ``reparameterize_model``: a converted state dict holds
exactly its keys and tensors, strict-loads into it and gives the train model's outputs (float32
tensors, run in float64: rel <= 1e-5). BN statistics, affine parameters and every parameter that
starts constant are randomised first.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from repvgg_cli.api import reparameterize
from repvgg_cli.errors import UnsupportedError
from repvgg_cli.families import find_blocks
from repvgg_cli.pipeline.options import ConvertOptions
from tests.family_zoo import timm_lcnetv2
from tests.family_zoo.seeded import train_form
from tests.helpers import error_lines, invoke
from tests.test_family_timm_ghost import assert_timms_deploy_layout, forward, relative_error


def expected_families(model: nn.Module) -> dict[str, str]:
    return {name: "timm_lcnetv2" for name, module in model.named_modules()
            if type(module).__name__ == "RepDepthwiseSeparable" and module.dw_conv_list is not None}


def test_cli_converts_the_state_dict_into_timms_reparameterized_model(tmp_path):
    model = train_form(lambda: timm.create_model("lcnetv2_small", pretrained=False, num_classes=10), seed=1)
    expected = expected_families(model)
    assert len(expected) == 6  # stages 2 and 3; the stem's and stages 0-1 blocks are not re-parameterizable
    source, target = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), source)

    result = invoke("convert", source, target, "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert {b["name"]: b["family"] for b in report["blocks"]} == expected
    assert report["unrecognised"] == []
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert_timms_deploy_layout(model, load_file(str(target)), x)

    inspected = invoke("inspect", source, "--json")
    assert inspected.exit_code == 0, inspected.stderr[-2000:]
    assert {b["name"]: b["family"] for b in json.loads(inspected.stdout)["blocks"]} == expected
    deployed = invoke("inspect", target, "--json")
    assert deployed.exit_code == 0, deployed.stderr[-2000:]
    assert {b["name"] for b in json.loads(deployed.stdout)["blocks"]} == set(expected)


def test_module_tree_switches_the_live_model_like_timm(tmp_path):
    model = timm_lcnetv2.train_model()
    x = torch.randn(*timm_lcnetv2.INPUT_SHAPE, generator=torch.Generator().manual_seed(3))
    result = reparameterize(copy.deepcopy(model), ConvertOptions(input_shape=timm_lcnetv2.INPUT_SHAPE))
    assert result.ok and result.model_check is not None and result.model_check.ok
    assert {r.block.name: r.block.family for r in result.blocks} == expected_families(model)
    assert_timms_deploy_layout(model, result.model.state_dict(), x)
    assert relative_error(forward(model, x), forward(result.model, x)) <= 1e-5
    switched = [m for m in result.model.modules() if type(m).__name__ == "RepDepthwiseSeparable"]
    assert all(m.dw_conv_list is None and isinstance(m.dw_conv, nn.Module) for m in switched)

    source, target = tmp_path / "model.pt", tmp_path / "deploy.pt"
    torch.save(model, source)
    shape = ",".join(str(n) for n in timm_lcnetv2.INPUT_SHAPE)
    pickled = invoke("convert", source, target, "--allow-pickle", "--input-shape", shape, "--json")
    assert pickled.exit_code == 0, pickled.stderr[-2000:]
    assert json.loads(pickled.stdout)["model_check"]["ok"] is True
    assert_timms_deploy_layout(model, torch.load(target, weights_only=False).state_dict(), x)


def test_a_bn_without_its_conv_and_a_branch_of_another_width_are_refused(tmp_path):
    state = timm_lcnetv2.train_model().state_dict()
    block = "stages.3.1.dw_conv_list"
    stray = dict(state)
    stray[f"{block}.3.bn.running_var"] = torch.ones(state[f"{block}.0.bn.running_var"].shape)
    with pytest.raises(UnsupportedError, match=rf"unexpected key {block.replace('.', '[.]')}\.3\.bn\.running_var"):
        find_blocks(stray)
    wide = dict(state)
    wide[f"{block}.1.conv.weight"] = torch.randn(3, 1, 3, 3)
    source, target = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(wide, source)
    result = invoke("convert", source, target)
    assert result.exit_code != 0 and not target.exists()
    assert f"{block}.1" in " ".join(error_lines(result))

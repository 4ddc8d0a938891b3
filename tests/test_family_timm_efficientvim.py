"""timm's EfficientViM re-parameterization, on timm's own models.

The families (repvgg_cli/families/timm_efficientvim.py) follow huggingface/pytorch-image-models
``timm/models/efficientvim.py``: ``ConvLayer2d.fuse`` (conv + BN → conv with bias, ``norm`` None)
and the depthwise residuals of ``EfficientViMBlock`` (gated by ``sigmoid(alpha)``, which stays in
the state dict) and ``PatchMerging``. The reference is timm's own ``reparameterize_model``: a
converted state dict holds exactly its keys and tensors, strict-loads into it and gives the train
model's outputs (float32 tensors, run in float64: rel <= 1e-5). BN statistics, affine parameters
and every parameter that starts constant (``alpha`` = 1e-4, ``bn_weight_init=0`` BNs) are
randomised first.
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
from repvgg_cli.errors import InputError, UnsupportedError
from repvgg_cli.families import find_blocks
from repvgg_cli.pipeline.options import ConvertOptions
from tests.family_zoo import timm_efficientvim
from tests.family_zoo.seeded import train_form
from tests.helpers import error_lines, invoke
from tests.test_family_timm_ghost import assert_timms_deploy_layout, forward, relative_error

MINE = {"timm_efficientvim_conv", "timm_efficientvim_dwconv"}
RESIDUALS = ("EfficientViMBlock", "PatchMerging")


def expected_families(model: nn.Module) -> dict[str, str]:
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__ in RESIDUALS:
            found[f"{name}.dwconv1"] = found[f"{name}.dwconv2"] = "timm_efficientvim_dwconv"
        elif (type(module).__name__ == "ConvLayer2d" and isinstance(module.norm, nn.BatchNorm2d)
              and name.rpartition(".")[2] not in ("dwconv1", "dwconv2")):
            found[name] = "timm_efficientvim_conv"
    return found


def test_cli_converts_the_state_dict_into_timms_reparameterized_model(tmp_path):
    model = train_form(lambda: timm.create_model("efficientvim_m1", pretrained=False, num_classes=10), seed=1)
    expected = expected_families(model)
    assert len(expected) == 22 + 2 * 8  # 22 ConvLayer2d, a dwconv pair in each of 6 blocks and 2 PatchMergings
    source, target = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), source)

    result = invoke("convert", source, target, "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert {b["name"]: b["family"] for b in report["blocks"]} == expected
    assert all(b["ok"] for b in report["blocks"]) and report["unrecognised"] == []
    converted = load_file(str(target))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert_timms_deploy_layout(model.eval(), converted, x)
    train = model.state_dict()
    for name in ("stages.0.blocks.0.alpha", "stages.2.blocks.1.alpha"):  # read for the gates, kept as it is
        assert torch.equal(converted[name], train[name])

    inspected = invoke("inspect", source, "--json")
    assert inspected.exit_code == 0, inspected.stderr[-2000:]
    assert {b["name"]: b["family"] for b in json.loads(inspected.stdout)["blocks"]} == expected


def test_module_tree_switches_the_live_model_like_timm(tmp_path):
    model = timm_efficientvim.train_model()
    x = torch.randn(*timm_efficientvim.INPUT_SHAPE, generator=torch.Generator().manual_seed(3))
    result = reparameterize(copy.deepcopy(model), ConvertOptions(input_shape=timm_efficientvim.INPUT_SHAPE))
    assert result.ok and result.model_check is not None and result.model_check.ok
    assert {r.block.name: r.block.family for r in result.blocks} == expected_families(model)
    assert_timms_deploy_layout(model, result.model.state_dict(), x)
    assert relative_error(forward(model, x), forward(result.model, x)) <= 1e-5
    residuals = [m for m in result.model.modules() if type(m).__name__ in RESIDUALS]
    assert residuals and all(m.fused is True for m in residuals)  # timm's flag: the forward skips the residual
    timms_own = dict(reparameterize_model(copy.deepcopy(model)).named_modules())
    for name, ours in result.model.named_modules():
        if type(ours).__name__ == "ConvLayer2d":  # norm None, conv with bias: as timm's fuse leaves them
            theirs = timms_own[name]
            assert (ours.norm is None, ours.conv.bias is None) == (theirs.norm is None, theirs.conv.bias is None), name

    source, target = tmp_path / "model.pt", tmp_path / "deploy.pt"
    torch.save(model, source)
    shape = ",".join(str(n) for n in timm_efficientvim.INPUT_SHAPE)
    pickled = invoke("convert", source, target, "--allow-pickle", "--input-shape", shape, "--json")
    assert pickled.exit_code == 0, pickled.stderr[-2000:]
    assert json.loads(pickled.stdout)["model_check"]["ok"] is True
    assert_timms_deploy_layout(model, torch.load(target, weights_only=False).state_dict(), x)


def test_conv_norm_pairs_are_fused_only_inside_efficientvim():
    """The stem alone (no blocks, no alpha): its conv/norm pairs are a generic layout, not claimed."""
    state = timm_efficientvim.train_model().state_dict()
    stem = {k: v for k, v in state.items() if k.startswith("patch_embed.")}
    assert not {b.family for b in find_blocks(stem)} & MINE
    assert {b.family for b in find_blocks(state)} == MINE


def test_bad_gates_and_conv1d_pairs_are_refused(tmp_path):
    state = timm_efficientvim.train_model().state_dict()
    bad = dict(state)
    bad["stages.1.blocks.0.alpha"] = torch.zeros(3, 32)
    with pytest.raises(InputError, match=r"alpha has shape \(3, 32\); \(4, 32\) floating-point gates are expected"):
        find_blocks(bad)
    conv1d = dict(state)
    conv1d["patch_embed.conv.1.conv.weight"] = torch.randn(4, 2, 3)
    source, target = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(conv1d, source)
    result = invoke("convert", source, target)
    assert result.exit_code == 3 and not target.exists()
    assert "a Conv1d with a BatchNorm (ConvLayer1d) is not supported" in " ".join(error_lines(result))
    with pytest.raises(UnsupportedError):
        find_blocks(conv1d)

"""timm's NextViT pre-BN merges, on timm's own models; and what the five timm families of
issue 12 leave alone.

The family (repvgg_cli/families/timm_nextvit.py) follows huggingface/pytorch-image-models
``timm/models/nextvit.py`` ``merge_pre_bn``: the BN before ``mlp.fc1`` (both blocks) and before
``e_mhsa.q/k/v`` (with ``e_mhsa.norm`` after the token pool for k and v) merged into those
layers, which keep their names; the BNs go. The reference is timm's own ``reparameterize_model``:
a converted state dict holds exactly its keys and tensors, strict-loads into it and gives the
train model's outputs (float32 tensors, run in float64: rel <= 1e-5). BN statistics, affine
parameters and every parameter that starts constant are randomised first.
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
from tests.family_zoo import timm_efficientvim, timm_nextvit
from tests.family_zoo.seeded import train_form
from tests.helpers import error_lines, invoke
from tests.test_family_timm_ghost import assert_timms_deploy_layout, forward, relative_error

ISSUE_12_MINE = {"timm_repghost", "timm_ghostv3_primary", "timm_ghostv3_cheap", "timm_ghostv3_dw", "timm_lcnetv2",
                 "timm_efficientvim_conv", "timm_efficientvim_dwconv", "timm_nextvit"}


def expected_families(model: nn.Module) -> dict[str, str]:
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "NextConvBlock":
            found[f"{name}.mlp.fc1"] = "timm_nextvit"
        elif type(module).__name__ == "NextTransformerBlock":
            for path in ("e_mhsa.q", "e_mhsa.k", "e_mhsa.v", "mlp.fc1"):
                found[f"{name}.{path}"] = "timm_nextvit"
    return found


def test_cli_converts_the_state_dict_into_timms_reparameterized_model(tmp_path):
    model = train_form(lambda: timm.create_model("nextvit_small", pretrained=False, num_classes=10), seed=1)
    expected = expected_families(model)
    assert len(expected) == 16 + 4 * 4
    source, target = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), source)

    result = invoke("convert", source, target, "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert {b["name"]: b["family"] for b in report["blocks"]} == expected
    assert all(b["ok"] for b in report["blocks"]) and report["unrecognised"] == []
    converted = load_file(str(target))
    assert not any(".norm1." in k or ".norm2." in k or ".e_mhsa.norm." in k for k in converted)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert_timms_deploy_layout(model, converted, x)

    inspected = invoke("inspect", source, "--json")
    assert inspected.exit_code == 0, inspected.stderr[-2000:]
    assert {b["name"]: b["family"] for b in json.loads(inspected.stdout)["blocks"]} == expected


def test_module_tree_switches_the_live_model_like_timm(tmp_path):
    model = timm_nextvit.train_model()
    x = torch.randn(*timm_nextvit.INPUT_SHAPE, generator=torch.Generator().manual_seed(3))
    result = reparameterize(copy.deepcopy(model), ConvertOptions(input_shape=timm_nextvit.INPUT_SHAPE))
    assert result.ok and result.model_check is not None and result.model_check.ok
    assert {r.block.name: r.block.family for r in result.blocks} == expected_families(model)
    assert_timms_deploy_layout(model, result.model.state_dict(), x)
    assert relative_error(forward(model, x), forward(result.model, x)) <= 1e-5
    timms_own = dict(reparameterize_model(copy.deepcopy(model)).named_modules())
    for name, ours in result.model.named_modules():  # the BNs Identity, is_fused set, as timm leaves them
        assert type(ours) is type(timms_own[name]), name
        if hasattr(ours, "is_fused"):
            assert ours.is_fused is True, name

    source, target = tmp_path / "model.pt", tmp_path / "deploy.pt"
    torch.save(model, source)
    shape = ",".join(str(n) for n in timm_nextvit.INPUT_SHAPE)
    pickled = invoke("convert", source, target, "--allow-pickle", "--input-shape", shape, "--json")
    assert pickled.exit_code == 0, pickled.stderr[-2000:]
    assert json.loads(pickled.stdout)["model_check"]["ok"] is True
    assert_timms_deploy_layout(model, torch.load(target, weights_only=False).state_dict(), x)


def test_pre_bn_merges_only_inside_nextvit():
    """``norm`` + ``mlp.fc1`` is a generic layout: without NextViT's other keys nothing is claimed,
    and NextViT's conv/norm pairs are not EfficientViM's (each architecture its own families)."""
    state = timm_nextvit.train_model().state_dict()
    assert {b.family for b in find_blocks(state)} == {"timm_nextvit"}
    without_mhca = {k: v for k, v in state.items() if ".mhca." not in k}
    assert not {b.family for b in find_blocks(without_mhca)} & ISSUE_12_MINE
    assert {b.family for b in find_blocks(timm_efficientvim.train_model().state_dict())} == {
        "timm_efficientvim_conv", "timm_efficientvim_dwconv"}


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "levit_128s",
                                  "ghostnet_050", "mobilenetv3_small_050", "convnext_atto"])
def test_other_timm_models_are_not_claimed_by_these_families(name):
    kwargs = dict(img_size=64) if name == "levit_128s" else {}
    model = train_form(lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs), seed=2)
    assert not {b.family for b in find_blocks(model.state_dict())} & ISSUE_12_MINE


def test_a_non_pointwise_fc1_and_a_bn_of_another_width_are_refused(tmp_path):
    state = timm_nextvit.train_model().state_dict()
    wide = dict(state)
    wide["stages.0.blocks.0.mlp.fc1.weight"] = torch.randn(96, 32, 3, 3)
    with pytest.raises(UnsupportedError, match=r"mlp\.fc1 is not a 1x1 conv without padding"):
        find_blocks(wide)
    narrow = dict(state)
    for part in ("weight", "bias", "running_mean", "running_var"):
        narrow[f"stages.0.blocks.1.norm1.{part}"] = narrow[f"stages.0.blocks.1.norm1.{part}"][:8]
    source, target = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(narrow, source)
    result = invoke("convert", source, target)
    assert result.exit_code != 0 and not target.exists()
    assert "stages.0.blocks.1.norm1.running_mean has 8 channels but stages.0.blocks.1.e_mhsa.q.weight (input " \
           "channels) has 96" in " ".join(error_lines(result))

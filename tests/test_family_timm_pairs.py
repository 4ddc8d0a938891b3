"""timm's LeViT, LeViT-conv, EfficientViT (MSRA) and TinyViT pair folds, on timm's own models.

The families (repvgg_cli/families/timm_pairs.py) follow huggingface/pytorch-image-models
``timm/models/levit.py`` (ConvNorm, LinearNorm, NormLinear), ``efficientvit_msra.py`` (ConvNorm,
NormLinear) and ``tiny_vit.py`` (ConvNorm). The reference is timm's own deploy form,
``timm.utils.reparameterize_model``: every converted file must hold exactly its keys, load into
it with ``strict=True`` and give the train model's outputs (float32, rel <= 1e-5).

Models are built with ``timm.create_model(..., pretrained=False)`` (no network): the smallest
registered variants at a 64×64 input (LeViT and EfficientViT size their attention biases for it),
or the same classes shrunk for the module tree and the layout cases. Every BN's statistics and
affine parameters and every parameter that starts constant (zero-initialised head biases and
attention biases, ``bn_weight_init=0`` BNs, LayerNorms) are randomised first.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.utils import reparameterize_model
from torch import nn

from repvgg_cli.api import reparameterize
from repvgg_cli.families import FAMILIES, detect_architecture, find_blocks
from repvgg_cli.pipeline.find import find_module_blocks
from repvgg_cli.pipeline.options import ConvertOptions
from tests.family_zoo import timm_efficientvit, timm_levit
from tests.family_zoo.seeded import train_form
from tests.helpers import error_lines, invoke

MINE = {"timm_levit_convnorm", "timm_levit_linearnorm", "timm_normlinear", "timm_convnorm"}
OURS = tuple(f for f in FAMILIES if f.name in MINE)
FAMILY_OF_CLASS = {
    ("timm.models.levit", "ConvNorm"): "timm_levit_convnorm",
    ("timm.models.levit", "LinearNorm"): "timm_levit_linearnorm",
    ("timm.models.levit", "NormLinear"): "timm_normlinear",
    ("timm.models.efficientvit_msra", "NormLinear"): "timm_normlinear",
    ("timm.models.efficientvit_msra", "ConvNorm"): "timm_convnorm",
    ("timm.models.tiny_vit", "ConvNorm"): "timm_convnorm",
}
SMALLEST = {
    "levit_128s": dict(img_size=64),
    "levit_conv_128s": dict(img_size=64),
    "efficientvit_m0": dict(img_size=64),
    "tiny_vit_5m_224": {},
}


def model_of(name: str, seed: int = 1, **kwargs) -> nn.Module:
    return train_form(lambda: timm.create_model(name, pretrained=False, **kwargs), seed=seed)


def expected_families(model: nn.Module) -> dict[str, str]:
    """Every module timm's walk fuses, by name, with the family that must claim it."""
    found = {}
    for name, module in model.named_modules():
        family = FAMILY_OF_CLASS.get((type(module).__module__, type(module).__name__))
        if family is not None:
            found[name] = family
    return found


def forward(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(x)
    return list(out) if isinstance(out, tuple) else [out]


def relative_error(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    assert len(reference) == len(candidate)
    return max(float((r.double() - c.double()).abs().max() / r.double().abs().max()) for r, c in zip(reference, candidate))


def tensor_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
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
            assert tensor_error(tensor, converted[key]) <= 1e-5, key
    timms_own.load_state_dict(converted, strict=True)
    assert relative_error(forward(model, x), forward(timms_own, x)) <= 1e-5


@pytest.mark.parametrize("name", list(SMALLEST))
def test_cli_converts_the_state_dict_into_timms_reparameterized_model(name, tmp_path):
    model = model_of(name, **SMALLEST[name])
    expected = expected_families(model)
    source, target = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), source)

    result = invoke("convert", source, target, "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert {b["name"]: b["family"] for b in report["blocks"]} == expected
    assert all(b["eps_from"].endswith("default") and b["ok"] for b in report["blocks"])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert_timms_deploy_layout(model, load_file(str(target)), x)

    inspected = invoke("inspect", source, "--json")
    assert inspected.exit_code == 0, inspected.stderr[-2000:]
    assert {b["name"]: b["family"] for b in json.loads(inspected.stdout)["blocks"]} == expected


def test_efficientvit_residual_drop_stays_around_its_fused_conv(tmp_path):
    """timm folds the ConvNorm inside a ResidualDrop (``dw0.m``) but keeps ``x + m(x)``."""
    model = timm_efficientvit.train_model()
    source, target = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), source)
    assert invoke("convert", source, target).exit_code == 0
    converted = load_file(str(target))
    for index in range(3):
        block = f"stages.{index}.blocks.0.dw0"
        assert {f"{block}.m.weight", f"{block}.m.bias"} <= set(converted)
        assert f"{block}.weight" not in converted and f"{block}.m.bn.running_var" not in converted
    deploy = timm_efficientvit.deploy_model()
    deploy.load_state_dict(converted, strict=True)
    x = torch.randn(*timm_efficientvit.INPUT_SHAPE)
    assert isinstance(deploy.stages[0].blocks[0].dw0.m, nn.Conv2d)
    assert relative_error(forward(model, x), forward(deploy, x)) <= 1e-5


def test_square_pairs_in_a_sorted_file_are_told_apart_by_bias(tmp_path):
    """A safetensors file lists ``bn`` before ``linear`` whatever the module order: a square
    LinearNorm (``attn.proj.ln``, ``q.ln``: 16x16, no bias) and a square NormLinear head (24
    classes on 24 features, with bias) are still each read as what they are."""
    model = train_form(lambda: timm_levit.build(num_classes=24), seed=5)
    families = expected_families(model)
    assert families["stages.0.blocks.0.attn.proj.ln"] == "timm_levit_linearnorm"
    assert model.stages[0].blocks[0].attn.proj.ln.linear.weight.shape == (16, 16)
    assert families["head"] == "timm_normlinear" and model.head.linear.weight.shape == (24, 24)
    source, target = tmp_path / "train.safetensors", tmp_path / "deploy.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(source))
    keys = list(load_file(str(source)))
    assert keys.index("head.bn.running_var") < keys.index("head.linear.weight")
    assert keys.index("stages.0.blocks.0.attn.proj.ln.bn.running_var") < keys.index(
        "stages.0.blocks.0.attn.proj.ln.linear.weight")

    result = invoke("convert", source, target, "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert {b["name"]: b["family"] for b in json.loads(result.stdout)["blocks"]} == families
    assert_timms_deploy_layout(model, load_file(str(target)), torch.randn(*timm_levit.INPUT_SHAPE))


def shrunk_models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    return {
        "levit": (timm_levit.train_model(), timm_levit.INPUT_SHAPE),
        "levit_conv": (train_form(lambda: timm_levit.build(name="levit_conv_128s"), seed=6), timm_levit.INPUT_SHAPE),
        "efficientvit_msra": (timm_efficientvit.train_model(), timm_efficientvit.INPUT_SHAPE),
        "tiny_vit": (model_of("tiny_vit_5m_224", seed=7, embed_dims=(16, 24, 32, 40), depths=(1, 1, 1, 1),
                              num_heads=(1, 2, 2, 2), window_sizes=(2, 2, 2, 2), num_classes=10), (2, 3, 64, 64)),
    }


@pytest.mark.parametrize("which", ["levit", "levit_conv", "efficientvit_msra", "tiny_vit"])
def test_module_tree_puts_timms_own_deploy_modules_in_place(which):
    model, shape = shrunk_models()[which]
    expected = expected_families(model)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(8))
    timms_own = reparameterize_model(copy.deepcopy(model))

    result = reparameterize(copy.deepcopy(model), ConvertOptions(input_shape=shape))
    assert result.ok and result.model_check is not None and result.model_check.ok
    assert {r.block.name: r.block.family for r in result.blocks} == expected
    for name in expected:
        mine, theirs = result.model.get_submodule(name), timms_own.get_submodule(name)
        assert type(mine) is type(theirs) and type(mine) in (nn.Conv2d, nn.Linear), name
        if isinstance(mine, nn.Conv2d):
            assert (mine.stride, mine.padding, mine.dilation, mine.groups) == \
                (theirs.stride, theirs.padding, theirs.dilation, theirs.groups), name
    assert list(result.state_dict) == list(timms_own.state_dict())
    assert relative_error(forward(model, x), forward(result.model, x)) <= 1e-5
    timms_own.load_state_dict(result.state_dict, strict=True)


def test_pickled_model_converts_with_allow_pickle(tmp_path):
    model = timm_levit.train_model()
    source, target = tmp_path / "model.pt", tmp_path / "deploy.safetensors"
    torch.save(model, source)
    shape = ",".join(str(n) for n in timm_levit.INPUT_SHAPE)
    result = invoke("convert", source, target, "--allow-pickle", "--input-shape", shape, "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["mode"] == "module tree" and report["model_check"]["ok"]
    assert {b["name"]: b["family"] for b in report["blocks"]} == expected_families(model)
    assert_timms_deploy_layout(model, load_file(str(target)), torch.randn(*timm_levit.INPUT_SHAPE))


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "shvit_s1", "iformer_t"])
def test_other_timm_models_are_not_claimed(name):
    assert {f.name for f in OURS} == MINE
    model = timm.create_model(name, pretrained=False)
    state = model.state_dict()
    architecture = detect_architecture(state.keys())
    assert architecture is None or architecture.name not in {"levit", "efficientvit_msra", "tiny_vit"}
    assert find_blocks(state, families=OURS) == []
    assert find_module_blocks(model, families=OURS) == []


def test_pairs_are_left_alone_outside_their_architectures():
    """The same ConvNorm keys without the rest of a TinyViT / LeViT are not claimed."""
    tiny = shrunk_models()["tiny_vit"][0].state_dict()
    assert detect_architecture(tiny.keys()).name == "tiny_vit"
    assert {b.family for b in find_blocks(tiny)} == {"timm_convnorm"}
    without = {k: v for k, v in tiny.items() if "attention_biases" not in k}
    assert detect_architecture(without.keys()) is None
    assert not {b.family for b in find_blocks(without)} & MINE

    levit = timm_levit.train_model().state_dict()
    stem_only = {k: v for k, v in levit.items() if k.startswith(("stem.", "head."))}
    assert detect_architecture(stem_only.keys()) is None
    assert not {b.family for b in find_blocks(stem_only)} & MINE


def test_bn_width_that_fits_neither_dimension_is_refused(tmp_path):
    state = timm_levit.train_model().state_dict()
    site = "stages.0.blocks.0.mlp.ln1"  # Linear 16 -> 32, BN over 32
    for part in ("weight", "bias", "running_mean", "running_var"):
        state[f"{site}.bn.{part}"] = state[f"{site}.bn.{part}"][:7].clone()
    source = tmp_path / "train.pt"
    torch.save(state, source)
    result = invoke("convert", source, tmp_path / "out.safetensors")
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"Error: {source}: block {site}: {site}.bn.running_mean has 7 channels but {site}.linear.weight is 32x16: "
        "neither a LinearNorm (BN over the 32 outputs) nor a NormLinear (BN over the 16 inputs)"
    ]
    assert not (tmp_path / "out.safetensors").exists()


def test_head_bn_that_does_not_match_the_inputs_is_refused(tmp_path):
    state = timm_efficientvit.train_model().state_dict()
    for part in ("weight", "bias", "running_mean", "running_var"):
        state[f"head.bn.{part}"] = state[f"head.bn.{part}"][:10].clone()  # 32 features, 10 classes
    source = tmp_path / "train.pt"
    torch.save(state, source)
    result = invoke("convert", source, tmp_path / "out.safetensors")
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"Error: {source}: block head: head.bn.running_mean has 10 channels but head.linear.weight (input features) "
        "has 32"
    ]


def test_conv_norm_without_running_statistics_is_refused(tmp_path):
    state = timm_levit.train_model().state_dict()
    for part in ("running_mean", "running_var", "num_batches_tracked"):
        del state[f"stem.conv1.bn.{part}"]
    source = tmp_path / "train.pt"
    torch.save(state, source)
    result = invoke("convert", source, tmp_path / "out.safetensors")
    assert result.exit_code == 3
    assert error_lines(result)[0].startswith(
        f"Error: {source}: block stem.conv1: BatchNorm stem.conv1.bn has no running statistics (track_running_stats=False?)")


def test_standalone_verify_rechecks_linear_deploy_weights(tmp_path):
    source, target = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(timm_levit.train_model().state_dict(), source)
    assert invoke("convert", source, target).exit_code == 0
    result = invoke("verify", target)
    assert result.exit_code == 0, result.stderr[-2000:]

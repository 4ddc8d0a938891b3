"""The YOLO families: yolov7 RepConv, ultralytics RepConv / RepVGGDW, YOLOv6 QARepVGG(V2).

Beyond the shared contract: BN eps 1e-3 through the CLI, pickled fp16 ultralytics models in a
training container, the ``forward_fuse`` switch surviving pickling, look-alike modules that must
not be claimed (plain ``Conv``, ``LightConv``, official RepVGG), agreement with each toy's own
fusion, QARepVGG's kept / folded post-sum BN, its key-tree identity rule and the V2 avg branch.
"""

from __future__ import annotations

import copy
import io
from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from tests.helpers import invoke

from tests import zoo
from repvgg_cli.cli import app
from repvgg_cli.api import ConvertOptions, convert_state_dict, reparameterize
from repvgg_cli.errors import InputError, UnsupportedError
from repvgg_cli.families import FamilyOptions, family_by_name, find_blocks
from tests.family_zoo import official as official_zoo
from tests.family_zoo import qarepvgg as qa_zoo
from tests.family_zoo import ultralytics_repconv as rc_zoo
from tests.family_zoo import ultralytics_repvggdw as dw_zoo
from tests.family_zoo import yolov7 as v7_zoo

FP16_RTOL = 4e-3
V1 = ConvertOptions(qa_variant="v1")
FP32_RTOL = 1e-5


def rel_err(reference: Tensor, candidate: Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).abs().max() / reference.abs().max())


def run(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model.eval()(x)


def double_outputs(train: nn.Module, deploy: nn.Module, shape: tuple[int, ...], seed: int = 0) -> float:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return rel_err(run(copy.deepcopy(train).double(), x), run(copy.deepcopy(deploy).double(), x))


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def tensors_only(state) -> OrderedDict:
    return OrderedDict((k, v) for k, v in state.items() if isinstance(v, Tensor))


# -- yolov7 ---------------------------------------------------------------------------------------


def test_yolov7_state_dict_converts_with_cli_bn_eps_and_loads_into_deploy_form(tmp_path):
    train = v7_zoo.train_model()
    torch.save(train.state_dict(), tmp_path / "train.pt")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "train.pt"), str(tmp_path / "deploy.pt"),
                                      "--bn-eps", "1e-3"])
    assert result.exit_code == 0, result.stderr
    state = torch.load(tmp_path / "deploy.pt", map_location="cpu", weights_only=True)
    assert {k.rsplit(".", 2)[0] for k in state if "rbr_reparam" in k} == {"stem", "same", "down", "grouped", "wide"}
    assert not any(part in k for k in state for part in ("rbr_dense", "rbr_1x1", "rbr_identity"))
    deploy = v7_zoo.deploy_model()
    deploy.load_state_dict(tensors_only(state), strict=True)
    assert double_outputs(train, deploy, v7_zoo.INPUT_SHAPE) <= FP32_RTOL

    # With PyTorch's default eps the same file converts "fine" but the deploy model is wrong.
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "train.pt"), str(tmp_path / "wrong.pt"),
                                      "--bn-eps", "1e-5"])
    assert result.exit_code == 0, result.stderr
    deploy.load_state_dict(tensors_only(torch.load(tmp_path / "wrong.pt", weights_only=True)), strict=True)
    assert double_outputs(train, deploy, v7_zoo.INPUT_SHAPE) > 1e-4


def test_yolov7_default_eps_is_1e3_and_official_blocks_are_not_claimed():
    family = family_by_name("yolov7")
    assert family.default_eps == 1e-3
    blocks = find_blocks(v7_zoo.train_model().state_dict())
    assert {b.family for b in blocks} == {"yolov7"} and all(b.eps_note == "family default" for b in blocks)
    assert all(bn.eps == 1e-3 for b in blocks for bn in [c.bn for c in b.branches.convs])
    official_model = official_zoo.train_model()
    assert "yolov7" not in {b.family for b in find_blocks(official_model.state_dict())}
    assert not any(family.matches_module(m) for m in official_model.modules())
    official = family_by_name("official")
    assert not any(official.matches_module(m) for m in v7_zoo.train_model().modules())


def test_yolov7_module_tree_leaves_fuse_repvgg_block_attributes():
    train = v7_zoo.train_model()
    result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=v7_zoo.INPUT_SHAPE))
    assert result.ok and len(result.blocks) == 5
    for name in ("stem", "same", "down", "grouped", "wide"):
        block = getattr(result.model, name)
        assert isinstance(block.rbr_reparam, nn.Conv2d) and block.rbr_reparam.bias is not None
        assert block.rbr_dense is None and block.rbr_1x1 is None and block.rbr_identity is None
        assert isinstance(block.act, nn.SiLU) and block.deploy is True
    assert result.model.grouped.rbr_reparam.groups == 2 and result.model.down.rbr_reparam.stride == (2, 2)
    assert {r.block.branches.identity is not None for r in result.blocks if r.block.name in ("same", "grouped")} == {True}
    assert all(bn.eps == 1e-3 for r in result.blocks for bn in [c.bn for c in r.block.branches.convs])
    assert double_outputs(train, result.model, v7_zoo.INPUT_SHAPE) <= FP32_RTOL


# -- ultralytics RepConv --------------------------------------------------------------------------


def test_ultralytics_pickled_fp16_container_converts_via_cli(tmp_path):
    train = rc_zoo.train_model().half()
    source, output = tmp_path / "ckpt.pt", tmp_path / "deploy.pt"
    torch.save({"model": None, "ema": train, "epoch": 3}, source)

    refused = CliRunner().invoke(app, ["convert", str(source), str(output)])
    assert refused.exit_code == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--allow-pickle" in refused.stderr
    assert not output.exists()

    result = CliRunner().invoke(app, ["convert", str(source), str(output), "--allow-pickle"])
    assert result.exit_code == 0, result.stderr
    saved = torch.load(output, map_location="cpu", weights_only=False)
    assert "ema" in saved and saved["epoch"] == 3
    deploy = saved["ema"]
    assert isinstance(deploy, rc_zoo.TinyRepConvNet)
    repconvs = [m for m in deploy.modules() if isinstance(m, rc_zoo.RepConv)]
    assert len(repconvs) == 7
    for block in repconvs:
        assert not has_batch_norm(block) and not hasattr(block, "conv1") and not hasattr(block, "bn")
        assert block.__dict__["forward"].__func__ is rc_zoo.RepConv.forward_fuse
        assert block.conv.weight.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in deploy.parameters())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    err = rel_err(run(copy.deepcopy(train).float(), x), run(copy.deepcopy(deploy).float(), x))
    assert err <= FP16_RTOL
    print(f"ultralytics fp16 pickled model: rel err {err:.2e}")


def test_ultralytics_forward_fuse_survives_pickling_and_deepcopy():
    train = rc_zoo.train_model()
    result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=rc_zoo.INPUT_SHAPE))
    assert result.ok and len(result.blocks) == 7
    buffer = io.BytesIO()
    torch.save(result.model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for model in (loaded, copy.deepcopy(result.model)):
        block = model.c3.m[1]
        assert block.__dict__["forward"].__self__ is block  # bound to its own (new) module
        assert double_outputs(train, model, rc_zoo.INPUT_SHAPE) <= FP32_RTOL


def test_ultralytics_plain_conv_and_lightconv_are_not_claimed():
    train = rc_zoo.train_model()
    state = train.state_dict()
    result = convert_state_dict(state)
    claimed = {k for r in result.blocks for k in r.block.source_keys}
    assert not any(k.startswith(("stem.", "light.", "c3.cv")) for k in claimed)
    for key in state:
        if key.startswith(("stem.", "light.", "c3.cv", "head.")):
            assert result.state_dict[key] is state[key]
    family = family_by_name("ultralytics_repconv")
    assert not family.matches_module(train.light) and not family.matches_module(train.stem)
    assert family.matches_module(train.rep) and not family.matches_module(rc_zoo.TinyRepConvNet().fuse().rep)
    model = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=rc_zoo.INPUT_SHAPE)).model
    assert has_batch_norm(model.light.conv1) and has_batch_norm(model.stem)


def test_ultralytics_repconv_matches_the_models_own_fuse():
    train = rc_zoo.train_model()
    own = copy.deepcopy(train).fuse().state_dict()
    converted = convert_state_dict(train.state_dict()).state_dict
    assert list(converted) == list(own)
    worst = max(rel_err(own[k], converted[k]) for k in own if ".conv." in k and k.endswith(("weight", "bias")))
    assert worst <= 1e-6


def test_ultralytics_repconv_at_the_root_and_mismatched_branches():
    block = zoo.randomize_bn(rc_zoo.RepConv(8, 8, bn=True), seed=5).eval()
    result = convert_state_dict(block.state_dict())
    assert list(result.state_dict) == ["conv.weight", "conv.bias"]
    deploy = rc_zoo.RepConv(8, 8, bn=True)
    deploy.fuse_convs()
    deploy.forward = deploy.forward_fuse
    deploy.load_state_dict(result.state_dict, strict=True)
    assert double_outputs(block, deploy, (2, 8, 9, 9)) <= FP32_RTOL
    # A 1x1 conv2 with another stride than conv1 cannot be summed: say so.
    odd = rc_zoo.RepConv(8, 8)
    odd.conv2.conv.stride = (2, 2)
    with pytest.raises(UnsupportedError, match="stride"):
        reparameterize(odd, ConvertOptions(input_shape=(1, 8, 8, 8)), check_model=False)


# -- ultralytics RepVGGDW -------------------------------------------------------------------------


def test_repvggdw_deploy_keys_and_the_models_own_fuse():
    train = dw_zoo.train_model()
    state = train.state_dict()
    result = convert_state_dict(state)
    assert [r.block.name for r in result.blocks] == ["cib.cv1.2", "lk"]
    assert {r.block.family for r in result.blocks} == {"ultralytics_repvggdw"}
    for name in ("cib.cv1.2", "lk"):
        assert [k for k in result.state_dict if k.startswith(name + ".")] == [f"{name}.conv.weight", f"{name}.conv.bias"]
    assert result.state_dict["lk.conv.weight"].shape == (12, 1, 7, 7)
    assert all(result.state_dict[k] is state[k] for k in state if k.startswith("dw7."))
    own = copy.deepcopy(train).fuse().state_dict()
    assert list(result.state_dict) == list(own)
    assert max(rel_err(own[k], result.state_dict[k]) for k in own) <= 1e-6

    module_result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=dw_zoo.INPUT_SHAPE))
    lk = module_result.model.lk
    assert isinstance(lk.conv, nn.Conv2d) and not hasattr(lk, "conv1") and lk.conv.groups == 12
    assert lk.__dict__["forward"].__func__ is dw_zoo.RepVGGDW.forward_fuse
    assert has_batch_norm(module_result.model.dw7)
    assert double_outputs(train, module_result.model, dw_zoo.INPUT_SHAPE) <= FP32_RTOL


def test_repconv_and_repvggdw_do_not_claim_each_other():
    assert {b.family for b in find_blocks(dw_zoo.train_model().state_dict())} == {"ultralytics_repvggdw"}
    assert {b.family for b in find_blocks(rc_zoo.train_model().state_dict())} == {"ultralytics_repconv"}
    repconv, repvggdw = family_by_name("ultralytics_repconv"), family_by_name("ultralytics_repvggdw")
    assert not any(repconv.matches_module(m) for m in dw_zoo.train_model().modules())
    assert not any(repvggdw.matches_module(m) for m in rc_zoo.train_model().modules())


# -- QARepVGG -------------------------------------------------------------------------------------


def test_qarepvgg_keeps_the_post_bn_by_default_like_switch_to_deploy():
    train = qa_zoo.train_model()
    state = train.state_dict()
    result = convert_state_dict(state, V1)
    assert result.ok and len(result.blocks) == 5
    for i in range(5):
        for part in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert result.state_dict[f"blocks.{i}.bn.{part}"] is state[f"blocks.{i}.bn.{part}"]
    identities = [r.block.name for r in result.blocks if r.block.branches.identity is not None]
    assert identities == ["blocks.1", "blocks.4"]
    own = copy.deepcopy(train).switch_to_deploy().state_dict()
    assert set(result.state_dict) == set(own)
    assert max(rel_err(own[k], result.state_dict[k]) for k in own if "rbr_reparam" in k) <= 1e-6
    assert family_by_name("qarepvgg").find_deploy_prefixes(list(own)) == [f"blocks.{i}" for i in range(5)]


@pytest.mark.parametrize("v2", [False, True])
def test_qarepvgg_fold_post_bn_both_trees(v2):
    block = qa_zoo.QARepVGGBlockV2 if v2 else qa_zoo.QARepVGGBlock
    train = qa_zoo.train_model(block=block)
    deploy = qa_zoo.deploy_model(block=block, fold_post_bn=True)
    if not v2:  # the key tree cannot see V2's avg pool without the avg-branch option (see below)
        result = convert_state_dict(train.state_dict(), ConvertOptions(fold_post_bn=True, qa_variant="v1"))
        assert result.ok and not any(".bn." in k for k in result.state_dict if k.startswith("blocks."))
        deploy.load_state_dict(result.state_dict, strict=True)
        assert double_outputs(train, deploy, qa_zoo.INPUT_SHAPE) <= FP32_RTOL
    module_result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=qa_zoo.INPUT_SHAPE,
                                                                        fold_post_bn=True))
    assert module_result.ok and len(module_result.blocks) == 5
    assert all(isinstance(b.bn, nn.Identity) for b in module_result.model.blocks)
    assert not has_batch_norm(module_result.model)
    deploy.load_state_dict(module_result.state_dict, strict=True)
    assert double_outputs(train, module_result.model, qa_zoo.INPUT_SHAPE) <= FP32_RTOL


def test_qarepvgg_fold_is_refused_across_a_nonlinear_se():
    train = qa_zoo.train_model()
    state = OrderedDict(train.state_dict())
    state["blocks.1.se.fc.weight"] = torch.ones(8, 8, 1, 1)
    with pytest.raises(UnsupportedError, match="se"):
        convert_state_dict(state, ConvertOptions(fold_post_bn=True, qa_variant="v1"))
    kept = convert_state_dict(state, V1)  # without folding the se and bn stay, untouched
    assert kept.ok and kept.state_dict["blocks.1.se.fc.weight"] is state["blocks.1.se.fc.weight"]

    train.blocks[1].se = nn.Sigmoid()
    with pytest.raises(UnsupportedError, match="se"):
        reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=qa_zoo.INPUT_SHAPE, fold_post_bn=True))
    result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=qa_zoo.INPUT_SHAPE))
    assert result.ok and isinstance(result.model.blocks[1].bn, nn.BatchNorm2d)
    assert double_outputs(train, result.model, qa_zoo.INPUT_SHAPE) <= FP32_RTOL


def test_qarepvgg_identity_rule_and_no_identity_globs():
    train = qa_zoo.train_model(strided_same=True)  # blocks.5: 24 -> 24 with stride 2: no identity
    state = train.state_dict()
    deploy = qa_zoo.deploy_model(strided_same=True)
    wrong = convert_state_dict(state, V1)  # the square 1x1 weight makes the key tree assume an identity
    assert [r.block.name for r in wrong.blocks if r.block.branches.identity is not None][-1] == "blocks.5"
    deploy.load_state_dict(wrong.state_dict, strict=True)
    assert double_outputs(train, deploy, qa_zoo.INPUT_SHAPE) > 1e-3
    right = convert_state_dict(state, ConvertOptions(no_identity=("blocks.[5-9]",), qa_variant="v1"))
    assert "no identity branch" in " ".join(next(r for r in right.blocks if r.block.name == "blocks.5").block.notes)
    deploy.load_state_dict(right.state_dict, strict=True)
    assert double_outputs(train, deploy, qa_zoo.INPUT_SHAPE) <= FP32_RTOL
    # The module tree sees the nn.Identity (and strided / grouped blocks) directly.
    grouped = qa_zoo.train_model(grouped_identity=True, strided_same=True)
    result = reparameterize(copy.deepcopy(grouped), ConvertOptions(input_shape=qa_zoo.INPUT_SHAPE))
    assert [r.block.branches.identity is not None for r in result.blocks] == [False, True, False, False, True, True, False]
    assert result.model.blocks[5].rbr_reparam.groups == 3
    assert double_outputs(grouped, result.model, qa_zoo.INPUT_SHAPE) <= FP32_RTOL


def test_qarepvgg_v2_avg_branch():
    train = qa_zoo.train_model(block=qa_zoo.QARepVGGBlockV2)
    deploy = qa_zoo.deploy_model(block=qa_zoo.QARepVGGBlockV2)
    own = copy.deepcopy(train).switch_to_deploy()
    result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=qa_zoo.INPUT_SHAPE))
    assert [r.block.branch_labels for r in result.blocks][1] == ("3x3+bn", "1x1", "3x3", "id")
    assert double_outputs(train, result.model, qa_zoo.INPUT_SHAPE) <= FP32_RTOL
    assert double_outputs(own, result.model, qa_zoo.INPUT_SHAPE) <= FP32_RTOL
    state = train.state_dict()
    for options in (ConvertOptions(qa_variant="v2"), ConvertOptions(avg_branch=("blocks.*",))):
        deploy.load_state_dict(convert_state_dict(state, options).state_dict, strict=True)
        assert double_outputs(train, deploy, qa_zoo.INPUT_SHAPE) <= FP32_RTOL
    # A state dict cannot show the avg pool: not told which, the key tree refuses to guess
    with pytest.raises(InputError) as refused:
        convert_state_dict(state)
    assert refused.value.exit_code == 2 and "qa_variant='v1' or qa_variant='v2'" in refused.value.hint  # API words
    assert "blocks.1 (qarepvgg): a QARepVGGBlock (v1) and a QARepVGGBlockV2" in refused.value.message
    # told v1, it is v1: the V2 model's outputs differ (the user's word decides)
    deploy.load_state_dict(convert_state_dict(state, V1).state_dict, strict=True)
    assert double_outputs(train, deploy, qa_zoo.INPUT_SHAPE) > 1e-3


def test_qarepvgg_variant_on_the_cli(tmp_path):
    state = qa_zoo.train_model(block=qa_zoo.QARepVGGBlockV2).state_dict()
    torch.save(state, tmp_path / "qa.pt")
    refused = invoke("convert", tmp_path / "qa.pt", tmp_path / "out.safetensors")
    assert refused.exit_code == 2 and not (tmp_path / "out.safetensors").exists()
    assert "--qa-variant v1 or --qa-variant v2" in refused.stderr
    done = invoke("convert", tmp_path / "qa.pt", tmp_path / "out.safetensors", "--qa-variant", "v2")
    assert done.exit_code == 0, done.stderr


def test_qarepvgg_and_official_do_not_claim_each_other():
    assert {b.family for b in find_blocks(qa_zoo.train_model().state_dict(), FamilyOptions(qa_variant="v1"))} == {"qarepvgg"}
    assert "qarepvgg" not in {b.family for b in find_blocks(official_zoo.train_model().state_dict())}
    qa, official = family_by_name("qarepvgg"), family_by_name("official")
    assert not any(qa.matches_module(m) for m in official_zoo.train_model().modules())
    assert not any(official.matches_module(m) for m in qa_zoo.train_model().modules())

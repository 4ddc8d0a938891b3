"""The YOLOv6 test model (tests/family_zoo/yolov6.py) against its rewrite of YOLOv6's deploy path.

Checks that the fixture itself is right before any family test relies on it: the train form and
what YOLOv6's fuse_model + switch_to_deploy make of it agree (float64 and float32), that deploy
state dict loads strictly into ``deploy_model()``, that the keys are YOLOv6's, that every BN has
YOLOv6's eps and momentum, that the deploy order matters, and the checkpoint YOLOv6's trainer saves.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from tests.family_zoo import yolov6 as v6

VARIANTS = list(v6.VARIANTS)


def rel_err(reference: Tensor, candidate: Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).abs().max() / reference.abs().max())


def outputs(model: nn.Module, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    x = torch.randn(*v6.INPUT_SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        return model.eval()(x.to(dtype))


def batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_upstream_deploy_matches_train_in_float64_and_float32(variant):
    train = v6.train_model(variant)
    train64 = copy.deepcopy(train).double()
    deployed64 = v6.upstream_deploy(train64)
    reference = outputs(train64)
    assert reference.shape == (2, 4 + v6.NUM_CLASSES, 8 * 8 + 4 * 4 + 2 * 2)
    assert float(reference.std()) > 0.1  # not a constant head
    assert rel_err(reference, outputs(deployed64)) <= 1e-9
    assert rel_err(outputs(train, torch.float32), outputs(v6.upstream_deploy(train), torch.float32)) <= 1e-5
    # The train model is untouched by the conversion of its copy.
    assert not hasattr(train.backbone.stem, "rbr_reparam") and hasattr(train.backbone.stem, "rbr_dense")


@pytest.mark.parametrize("variant", VARIANTS)
def test_deploy_form_and_strict_load_into_deploy_model(variant):
    train = v6.train_model(variant).double()
    deployed = v6.upstream_deploy(train)
    qa = variant.startswith(("qarepvgg", "csp_qarepvgg"))
    blocks = [m for m in deployed.modules() if isinstance(m, v6.RepVGGBlock)]
    assert blocks and all(b.deploy and isinstance(b.rbr_reparam, nn.Conv2d) for b in blocks)
    assert not any(hasattr(b, name) for b in blocks for name in ("rbr_dense", "rbr_1x1", "rbr_identity", "rbr_avg"))
    modules = [m for m in deployed.modules() if type(m) is v6.ConvModule]
    assert modules and all(not hasattr(m, "bn") and m.conv.bias is not None for m in modules)
    assert all(m.__dict__["forward"].__func__ is v6.ConvModule.forward_fuse for m in modules)
    # Only QARepVGG's post-sum bn survives deployment.
    assert len(batch_norms(deployed)) == (len(blocks) if qa else 0)

    state = deployed.state_dict()
    target = v6.deploy_model(variant).double()
    target.load_state_dict(state, strict=True)
    assert rel_err(outputs(deployed), outputs(target)) <= 1e-12
    assert rel_err(outputs(train), outputs(target)) <= 1e-9


@pytest.mark.parametrize("variant", ["repvgg", "qarepvggv2", "csp_qarepvggv2"])
def test_rep_only_deploy_model_takes_train_convs_and_deployed_blocks(variant):
    train = v6.train_model(variant).double()
    deployed = v6.upstream_deploy(train).state_dict()
    trained = train.state_dict()
    target = v6.deploy_model(variant, rep_only=True).double()
    assert all(type(m) is not v6.ConvModule or hasattr(m, "bn") for m in target.modules())
    state = {k: trained[k] if k in trained else deployed[k] for k in target.state_dict()}
    assert any("rbr_reparam" in k for k in state) and any(".block.bn." in k for k in state)
    target.load_state_dict(state, strict=True)
    assert rel_err(outputs(train), outputs(target)) <= 1e-9
    assert all(bn.eps == 1e-3 for bn in batch_norms(target))


def test_key_layout_is_yolov6s():
    train = v6.train_model("repvgg").state_dict()
    for key in (
        "backbone.stem.rbr_dense.conv.weight",
        "backbone.stem.rbr_dense.bn.running_var",
        "backbone.stem.rbr_1x1.conv.weight",
        "backbone.ERBlock_2.0.rbr_dense.conv.weight",
        "backbone.ERBlock_2.1.conv1.rbr_identity.running_mean",
        "backbone.ERBlock_2.1.block.0.rbr_identity.weight",
        "backbone.ERBlock_5.2.sppf.cv1.block.conv.weight",
        "neck.Rep_p4.conv1.rbr_dense.bn.weight",
        "neck.Rep_p3.conv1.rbr_1x1.bn.bias",
        "neck.Rep_n3.conv1.rbr_identity.running_var",
        "neck.Rep_n4.block.0.rbr_dense.conv.weight",
        "neck.reduce_layer0.block.conv.weight",
        "neck.reduce_layer1.block.bn.running_mean",
        "neck.upsample0.upsample_transpose.weight",
        "neck.upsample1.upsample_transpose.bias",
        "neck.downsample2.block.conv.weight",
        "detect.proj",
        "detect.proj_conv.weight",
        "detect.stems.0.block.conv.weight",
        "detect.cls_convs.1.block.bn.running_var",
        "detect.reg_convs.2.block.conv.weight",
        "detect.cls_preds.0.bias",
        "detect.reg_preds.2.weight",
    ):
        assert key in train, key
    assert "backbone.stem.rbr_identity.weight" not in train  # strided 3 -> 8
    assert "neck.Rep_p4.conv1.rbr_identity.weight" not in train  # concat input, in != out
    deploy = v6.upstream_deploy(v6.train_model("repvgg")).state_dict()
    for key in ("backbone.stem.rbr_reparam.weight", "backbone.ERBlock_2.1.block.0.rbr_reparam.bias",
                "neck.Rep_n4.conv1.rbr_reparam.weight", "neck.reduce_layer0.block.conv.bias",
                "detect.stems.0.block.conv.bias", "detect.cls_preds.0.weight", "neck.upsample0.upsample_transpose.weight"):
        assert key in deploy, key
    assert not any(part in k for k in deploy for part in ("rbr_dense", "rbr_1x1", "rbr_identity", ".bn."))
    assert {k for k in deploy if not k.startswith(("backbone", "neck", "detect"))} == set()

    qa = v6.train_model("qarepvggv2").state_dict()
    assert "backbone.ERBlock_2.1.conv1.rbr_1x1.weight" in qa and "backbone.ERBlock_2.1.conv1.bn.running_var" in qa
    assert not any("rbr_identity" in k or "rbr_avg" in k or "rbr_1x1.bn" in k for k in qa)
    qa_deploy = v6.upstream_deploy(v6.train_model("qarepvggv2")).state_dict()
    assert {"backbone.stem.rbr_reparam.weight", "backbone.stem.bn.running_var"} <= set(qa_deploy)

    csp = v6.train_model("csp_repvgg").state_dict()
    for key in ("backbone.ERBlock_3.1.cv1.block.conv.weight", "backbone.ERBlock_3.1.m.conv1.alpha",
                "backbone.ERBlock_3.1.m.conv1.conv2.rbr_identity.running_var", "neck.Rep_p4.cv3.block.bn.bias"):
        assert key in csp, key
    assert "backbone.ERBlock_5.2.cspsppf.cv7.block.conv.weight" in v6.train_model("repvgg_cspsppf").state_dict()


@pytest.mark.parametrize("variant", ["qarepvgg", "csp_qarepvggv2"])
def test_qarepvgg_identity_exactly_where_the_kernel_is_square(variant):
    """The key tree cannot see QARepVGG's nn.Identity; in YOLOv6's layouts in == out marks it."""
    model = v6.train_model(variant)
    blocks = [m for m in model.modules() if isinstance(m, v6.QARepVGGBlock)]
    assert len(blocks) > 5
    for block in blocks:
        weight = block.rbr_dense.conv.weight
        square = weight.shape[0] == weight.shape[1] * block.groups
        assert (block.rbr_identity is not None) == square
        assert (block.rbr_dense.conv.stride == (1, 1)) or not square
    assert any(b.rbr_identity is not None for b in blocks) and any(b.rbr_identity is None for b in blocks)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_batch_norm_has_yolov6_eps_and_momentum(variant):
    for model in (v6.train_model(variant), v6.deploy_model(variant), v6.upstream_deploy(v6.train_model(variant))):
        norms = batch_norms(model)
        assert all(bn.eps == 1e-3 and bn.momentum == 0.03 for bn in norms)
    assert len(batch_norms(v6.train_model(variant))) > 40
    # With the same weights, PyTorch's default eps gives a visibly different deploy model.
    train = v6.train_model(variant).double()
    wrong = copy.deepcopy(train)
    for bn in batch_norms(wrong):
        bn.eps = 1e-5
    assert rel_err(outputs(train), outputs(v6.upstream_deploy(wrong))) > 1e-4


def test_switch_to_deploy_needs_fuse_model_first():
    for variant in ("repvgg", "qarepvgg"):
        model = v6.train_model(variant)
        with pytest.raises(TypeError):
            v6.switch_to_deploy(copy.deepcopy(model))


def test_train_model_is_seeded_and_has_no_constant_parameters():
    a, b = v6.train_model("csp_repvgg"), v6.train_model("csp_repvgg")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = v6.train_model("csp_repvgg", seed=5).state_dict().values()
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), other))
    for name, p in a.named_parameters():
        if p.numel() > 1 and name != "detect.proj" and "proj_conv" not in name:
            assert float(p.detach().std()) > 0, name
    alphas = [p for n, p in a.named_parameters() if n.endswith(".alpha")]
    assert alphas and all(p.item() != 1.0 for p in alphas)
    for bn in batch_norms(a):
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("stripped", [False, True])
def test_checkpoint_like_yolov6_trainer(tmp_path, stripped):
    train = v6.train_model("qarepvggv2")
    path = tmp_path / "last_ckpt.pt"
    v6.save_like_yolov6(train, path, stripped=stripped)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert set(ckpt) == {"model", "ema", "updates", "optimizer", "scheduler", "epoch", "results"}
    if stripped:
        assert ckpt["ema"] is None and ckpt["optimizer"] is None and ckpt["updates"] is None
    model = ckpt["ema"] if ckpt.get("ema") else ckpt["model"]  # as load_checkpoint picks it
    assert isinstance(model, v6.Model)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert all(v.dtype in (torch.float16, torch.int64) for v in model.state_dict().values())
    # load_checkpoint: .float(), fuse_model, eval; then the deploy loop. Checked against the train
    # model holding the same fp16-rounded weights.
    rounded = copy.deepcopy(train)
    rounded.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    rounded64 = copy.deepcopy(rounded).double()
    deployed = v6.upstream_deploy(copy.deepcopy(model).double())
    assert rel_err(outputs(rounded64), outputs(deployed)) <= 1e-9
    assert rel_err(outputs(train, torch.float32), outputs(rounded, torch.float32)) <= 4e-2  # fp16 rounding alone

    v6.save_like_yolov6(train, tmp_path / "sd.pt", state_dict=True, stripped=stripped)
    plain = torch.load(tmp_path / "sd.pt", map_location="cpu", weights_only=True)
    state = plain["model"]
    assert list(state) == list(train.state_dict())
    assert all(v.dtype in (torch.float16, torch.int64) for v in state.values())
    assert plain["ema"] is None if stripped else list(plain["ema"]) == list(state)
    fresh = v6.train_model("qarepvggv2", seed=1)
    fresh.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    assert rel_err(outputs(rounded64), outputs(fresh.double())) == 0.0


def test_fused_forward_survives_pickling(tmp_path):
    deployed = v6.upstream_deploy(v6.train_model("repvgg"))
    torch.save(deployed, tmp_path / "deploy.pt")
    loaded = torch.load(tmp_path / "deploy.pt", weights_only=False)
    module = loaded.neck.reduce_layer0.block
    assert module.__dict__["forward"].__self__ is module and not hasattr(module, "bn")
    assert rel_err(outputs(deployed, torch.float32), outputs(loaded, torch.float32)) == 0.0

"""The YOLOv7 test model (tests/family_zoo/yolov7_model.py) against its rewrite of ``Model.fuse()``.

Checks the fixture before family tests rely on it: the train form and what YOLOv7's fuse makes of
it agree (float64 and float32), the fused state dict loads strictly into ``deploy_model()``, the
numbered-layer keys are YOLOv7's, every BN has eps 1e-3 / momentum 0.03, YOLOv7's own identity
fold is wrong for grouped RepConv, and the checkpoint YOLOv7's ``train.py`` saves.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tests import zoo
from tests.family_zoo import yolov7_model as v7


def rel_err(reference: Tensor, candidate: Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).abs().max() / reference.abs().max())


def outputs(model: nn.Module, dtype: torch.dtype = torch.float64, shape=v7.INPUT_SHAPE, seed: int = 0) -> Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        return model.eval()(x.to(dtype))


def batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_upstream_fuse_matches_train_in_float64_and_float32():
    train = v7.train_model()
    train64 = copy.deepcopy(train).double()
    reference = outputs(train64)
    assert reference.shape == (2, 3 * (v7.NUM_CLASSES + 5), 32 * 32 + 8 * 8)
    assert float(reference.std()) > 0.1
    assert rel_err(reference, outputs(v7.upstream_deploy(train64))) <= 1e-9
    assert rel_err(outputs(train, torch.float32), outputs(v7.upstream_deploy(train), torch.float32)) <= 1e-5
    assert hasattr(train.model[9], "rbr_dense") and hasattr(train.model[0], "bn")  # the copy was fused


def test_fused_form_and_strict_load_into_deploy_model():
    train = v7.train_model().double()
    fused = v7.upstream_deploy(train)
    repconvs = [m for m in fused.modules() if isinstance(m, v7.RepConv)]
    assert len(repconvs) == 3
    for block in repconvs:
        assert block.deploy and isinstance(block.rbr_reparam, nn.Conv2d) and block.rbr_reparam.bias is not None
        assert block.rbr_dense is None and block.rbr_1x1 is None and block.rbr_identity is None
    assert fused.model[10].rbr_reparam.groups == 2 and fused.model[11].rbr_reparam.stride == (2, 2)
    convs = [m for m in fused.modules() if type(m) is v7.Conv]
    assert len(convs) == 13 and all(not hasattr(m, "bn") and m.conv.bias is not None for m in convs)
    assert all(m.__dict__["forward"].__func__ is v7.Conv.fuseforward for m in convs)
    head = fused.model[12]
    assert head.__dict__["forward"].__func__ is v7.IDetect.fuseforward
    assert not batch_norms(fused)

    state = fused.state_dict()
    target = v7.deploy_model().double()
    target.load_state_dict(state, strict=True)
    assert rel_err(outputs(fused), outputs(target)) <= 1e-12
    assert rel_err(outputs(train), outputs(target)) <= 1e-9


def test_rep_only_deploy_model_takes_train_layers_and_fused_repconvs():
    train = v7.train_model().double()
    fused = v7.upstream_deploy(train).state_dict()
    trained = train.state_dict()
    target = v7.deploy_model(rep_only=True).double()
    assert len(batch_norms(target)) == 13 and target.model[12].__dict__.get("forward") is None
    state = {k: trained[k] if k in trained else fused[k] for k in target.state_dict()}
    assert {k for k in state if k not in trained} == {f"model.{i}.rbr_reparam.{p}" for i in (9, 10, 11)
                                                      for p in ("weight", "bias")}
    target.load_state_dict(state, strict=True)
    assert rel_err(outputs(train), outputs(target)) <= 1e-9


def test_key_layout_is_yolov7s():
    train = v7.train_model().state_dict()
    for key in (
        "model.0.conv.weight",
        "model.0.bn.running_var",
        "model.4.conv.weight",
        "model.8.cv1.conv.weight",
        "model.8.cv7.bn.bias",
        "model.9.rbr_identity.running_mean",
        "model.9.rbr_dense.0.weight",
        "model.9.rbr_dense.1.running_var",
        "model.9.rbr_1x1.0.weight",
        "model.9.rbr_1x1.1.bias",
        "model.10.rbr_dense.0.weight",
        "model.12.anchors",
        "model.12.anchor_grid",
        "model.12.m.0.weight",
        "model.12.m.1.bias",
        "model.12.ia.0.implicit",
        "model.12.im.1.implicit",
    ):
        assert key in train, key
    assert not any(k.startswith(("model.5.", "model.7.")) for k in train)  # Concat, MP: no tensors
    assert "model.10.rbr_identity.weight" not in train and "model.11.rbr_identity.weight" not in train
    assert train["model.10.rbr_dense.0.weight"].shape == (24, 8, 3, 3)  # grouped, g=2

    fused = v7.upstream_deploy(v7.train_model()).state_dict()
    for key in ("model.0.conv.bias", "model.8.cv4.conv.weight", "model.9.rbr_reparam.weight",
                "model.11.rbr_reparam.bias", "model.12.m.0.weight", "model.12.ia.0.implicit", "model.12.anchors"):
        assert key in fused, key
    assert not any(part in k for k in fused for part in (".bn.", "rbr_dense", "rbr_1x1", "rbr_identity"))
    assert all(k.replace(".weight", ".bias") in fused for k in fused if k.endswith(".conv.weight"))
    # 20 BNs (5 tensors each) go, 13 Conv biases come, RepConv's 6 branch weights become 3 weights + 3 biases.
    assert len(fused) == len(train) - 5 * 20 + 13


def test_every_batch_norm_has_yolov7_eps_and_momentum():
    train = v7.train_model()
    norms = batch_norms(train)
    assert len(norms) == 13 + 3 * 2 + 1
    assert all(bn.eps == 1e-3 and bn.momentum == 0.03 for bn in norms)
    for bn in norms:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    wrong = copy.deepcopy(train).double()
    for bn in batch_norms(wrong):
        bn.eps = 1e-5
    assert rel_err(outputs(train.double()), outputs(v7.upstream_deploy(wrong))) > 1e-4


def test_implicits_matter_and_are_folded():
    train = v7.train_model().double()
    plain = copy.deepcopy(train)
    for m in plain.modules():
        if isinstance(m, (v7.ImplicitA, v7.ImplicitM)):
            nn.init.constant_(m.implicit, 0.0 if isinstance(m, v7.ImplicitA) else 1.0)
    assert rel_err(outputs(train), outputs(plain)) > 1e-2
    fused = v7.upstream_deploy(train)
    assert not torch.equal(fused.model[12].m[0].bias, train.model[12].m[0].bias)


def test_upstream_identity_fold_is_wrong_for_grouped_repconv():
    """YOLOv7's fuse_repvgg_block builds the identity with fill_diagonal_ on a (c2, c1/g) matrix."""
    block = zoo.randomize_bn(v7.RepConv(8, 8, g=2), seed=3).eval().double()
    shape = (2, 8, 9, 9)
    fused = copy.deepcopy(block)
    fused.fuse_repvgg_block()
    assert rel_err(outputs(block, shape=shape), outputs(fused, shape=shape)) > 1e-2
    # Its older path (get_equivalent_kernel_bias, identity at [i, i % (c1/g)]) is right.
    kernel, bias = block.get_equivalent_kernel_bias()
    right = v7.RepConv(8, 8, g=2, deploy=True).double()
    right.rbr_reparam.weight.data, right.rbr_reparam.bias.data = kernel, bias
    assert rel_err(outputs(block, shape=shape), outputs(right, shape=shape)) <= 1e-9
    # Without groups the two agree.
    plain = zoo.randomize_bn(v7.RepConv(8, 8), seed=4).eval().double()
    fused = copy.deepcopy(plain)
    fused.fuse_repvgg_block()
    assert rel_err(outputs(plain, shape=shape), outputs(fused, shape=shape)) <= 1e-9


@pytest.mark.parametrize("stripped", [False, True])
def test_checkpoint_like_yolov7_train_py(tmp_path, stripped):
    train = v7.train_model()
    path = tmp_path / "last.pt"
    v7.save_like_yolov7(train, path, stripped=stripped)
    with pytest.raises(Exception):
        torch.load(path, map_location="cpu", weights_only=True)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert set(ckpt) == {"epoch", "best_fitness", "training_results", "model", "ema", "updates", "optimizer", "wandb_id"}
    assert isinstance(ckpt["best_fitness"], np.ndarray)
    assert (ckpt["epoch"] == -1 and ckpt["ema"] is None) if stripped else isinstance(ckpt["ema"], v7.Model)
    model = ckpt["ema"] if ckpt.get("ema") else ckpt["model"]  # as attempt_load picks it
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert not any(p.requires_grad for p in model.parameters())
    rounded = copy.deepcopy(train)
    rounded.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    fused = v7.upstream_deploy(copy.deepcopy(model).double())
    assert rel_err(outputs(copy.deepcopy(rounded).double()), outputs(fused)) <= 1e-9

    v7.save_like_yolov7(train, tmp_path / "sd.pt", state_dict=True, stripped=stripped)
    plain = torch.load(tmp_path / "sd.pt", map_location="cpu", weights_only=True)
    assert list(plain["model"]) == list(train.state_dict())
    assert all(v.dtype == torch.float16 for v in plain["model"].values() if v.is_floating_point())


def test_fuseforward_survives_pickling(tmp_path):
    fused = v7.upstream_deploy(v7.train_model())
    torch.save(fused, tmp_path / "fused.pt")
    loaded = torch.load(tmp_path / "fused.pt", weights_only=False)
    conv = loaded.model[8].cv3
    assert conv.__dict__["forward"].__self__ is conv
    assert rel_err(outputs(fused, torch.float32), outputs(loaded, torch.float32)) == 0.0

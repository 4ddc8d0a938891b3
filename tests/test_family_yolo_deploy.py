"""The deploy forms YOLO users load, through the CLI (issue 12: YOLOv6, YOLOv7, ultralytics).

- YOLOv6 (tests/family_zoo/yolov6.py): a state dict converts into what YOLOv6's own deploy path
  leaves (``fuse_model`` then ``switch_to_deploy``): every RepVGGBlock / QARepVGG(V2) block fused
  and every ConvModule's conv+BN folded (family ``yolov6_convmodule``, on only inside a model
  recognised as YOLOv6). Key tree and pickled module tree strict-load into the full upstream deploy
  model (``deploy_model(variant)``, not ``rep_only``) and match the train model; fp16 training
  containers (``save_like_yolov6``) convert.
- YOLOv7 (tests/family_zoo/yolov7_model.py): the module tree with ``--fuse-conv-bn`` does what
  ``Model.fuse()`` does to RepConv and ``Conv`` (BN folded, ``forward = fuseforward``); IDetect's
  implicits are left for YOLOv7's own loader (``attempt_load`` calls ``fuse()``, which folds them
  without checking whether they already were), and the key tree never folds them.
- ultralytics: an fp16 training checkpoint converted with ``--dtype float32``.

Every BN in these models has eps 1e-3 (the projects' ``initialize_weights``); BN statistics, head
biases/weights, BottleRep ``alpha`` and YOLOv7's implicits are randomised by the fixtures.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

from repvgg_cli.families import find_blocks
from tests.family_zoo import ultralytics_repconv as rc_zoo
from tests.family_zoo import yolov6 as v6
from tests.family_zoo import yolov7_model as v7
from tests.helpers import invoke

FP32_RTOL = 1e-5
FP16_RTOL = 4e-3
V6_VARIANTS = list(v6.VARIANTS)


def rel_err(reference: Tensor, candidate: Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).abs().max() / reference.abs().max())


def run(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model.eval()(x)


def probe(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tensors_only(state) -> OrderedDict:
    return OrderedDict((k, v) for k, v in state.items() if isinstance(v, Tensor))


def batch_norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def convert(*args) -> str:
    result = invoke("convert", *args)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def qa_flags(variant: str) -> tuple[str, ...]:
    # The key tree cannot tell QARepVGGBlock from QARepVGGBlockV2 (the avg pool has no keys): say which.
    if "qarepvggv2" in variant:
        return ("--qa-variant", "v2")
    return ("--qa-variant", "v1") if "qarepvgg" in variant else ()


def conv_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m) is v6.ConvModule]


def assert_yolov6_deploy_form(model: nn.Module, dtype: torch.dtype) -> None:
    """What fuse_model + switch_to_deploy leave: no ConvModule BN, forward_fuse, blocks deployed."""
    for name, m in conv_modules(model):
        assert not hasattr(m, "bn"), name
        assert m.conv.bias is not None and m.conv.weight.dtype == dtype, name
        assert m.__dict__["forward"].__func__ is v6.ConvModule.forward_fuse, name
        assert m.__dict__["forward"].__self__ is m, name
    for name, m in model.named_modules():
        if isinstance(m, v6.RepVGGBlock):
            assert hasattr(m, "rbr_reparam") and not hasattr(m, "rbr_dense") and m.deploy is True, name
    # Only QARepVGG's post-sum BN stays (upstream's switch_to_deploy keeps it).
    assert all(n.endswith(".bn") and isinstance(model.get_submodule(n[:-3]), v6.QARepVGGBlock)
               for n in batch_norms(model))


# -- YOLOv6: key tree -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", V6_VARIANTS)
def test_yolov6_key_tree_strict_loads_into_the_full_upstream_deploy_model(tmp_path, variant):
    train = v6.train_model(variant)
    assert {m.eps for m in train.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}
    source, output = tmp_path / "train.pt", tmp_path / "deploy.pt"
    torch.save(train.state_dict(), source)
    stdout = convert(source, output, *qa_flags(variant))
    assert "yolov6_convmodule" in stdout and "BatchNorm eps: 0.001 (from yolov6 default; source: family)" in stdout
    state = tensors_only(torch.load(output, map_location="cpu", weights_only=True))
    assert not any(".block.bn." in k or "rbr_dense" in k or "rbr_1x1" in k or "rbr_identity" in k for k in state)

    deploy = v6.deploy_model(variant)
    deploy.load_state_dict(state, strict=True)
    x = probe(v6.INPUT_SHAPE)
    err = rel_err(run(train, x), run(deploy, x))
    assert err <= FP32_RTOL, err

    # Tensor by tensor, what YOLOv6's own deploy path computes (eps 1e-3 and all).
    upstream = v6.upstream_deploy(train).state_dict()
    assert set(upstream) == set(deploy.state_dict())  # QARepVGG: upstream registers bn before rbr_reparam
    worst = max(rel_err(upstream[k], state[k]) for k in upstream if upstream[k].is_floating_point())
    assert worst <= FP32_RTOL, worst
    print(f"yolov6 {variant}: key tree -> full deploy form, output rel err {err:.1e}, tensors {worst:.1e}")


def test_yolov6_key_tree_with_the_wrong_eps_is_wrong(tmp_path):
    """The ConvModules take the architecture's eps 1e-3: with 1e-5 the same file is visibly wrong."""
    train = v6.train_model("repvgg")
    torch.save(train.state_dict(), tmp_path / "train.pt")
    convert(tmp_path / "train.pt", tmp_path / "wrong.pt", "--bn-eps", "1e-5")
    deploy = v6.deploy_model("repvgg")
    deploy.load_state_dict(tensors_only(torch.load(tmp_path / "wrong.pt", weights_only=True)), strict=True)
    x = probe(v6.INPUT_SHAPE)
    assert rel_err(run(train, x), run(deploy, x)) > 1e-4


def test_yolov6_deployed_state_dict_is_not_claimed():
    """A state dict YOLOv6's deploy path already wrote: folded ConvModules (``block.conv.bias``, no
    ``bn``) and deployed rep blocks are no block of any family (nothing to fuse twice)."""
    deployed = v6.upstream_deploy(v6.train_model("csp_repvgg")).state_dict()
    assert sum(k.endswith(".block.conv.bias") for k in deployed) > 0
    assert find_blocks(deployed) == []


def test_yolov6_convmodule_is_on_only_inside_yolov6():
    state = v6.train_model("repvgg").state_dict()
    families = {b.family for b in find_blocks(state)}
    assert families == {"official", "yolov6_convmodule"}
    # The same keys under other top-level names: not recognised as YOLOv6, nothing is a ConvModule.
    renamed = OrderedDict((k.replace("backbone.", "encoder.", 1), v) for k, v in state.items())
    assert {b.family for b in find_blocks(renamed)} == {"official"}
    # Inside YOLOv6, the ConvModules that are RepVGGBlock branches are the blocks' (rbr_dense/rbr_1x1).
    names = {b.name for b in find_blocks(state) if b.family == "yolov6_convmodule"}
    assert names and all(n.endswith(".block") for n in names)
    assert len(names) == len(conv_modules(v6.train_model("repvgg"))) - 2 * sum(
        isinstance(m, v6.RepVGGBlock) for m in v6.train_model("repvgg").modules())


def test_yolov6_convmodule_module_tree_look_alikes():
    from repvgg_cli.families import family_by_name

    family = family_by_name("yolov6_convmodule")
    # ultralytics' and YOLOv7's Conv have conv/bn and a fused forward too: not YOLOv6's class.
    assert not any(family.matches_module(m) for m in rc_zoo.train_model().modules())
    assert not any(family.matches_module(m) for m in v7.train_model().modules())
    train = v6.train_model("repvgg")
    assert all(family.matches_module(m) for _, m in conv_modules(train))
    assert not any(family.matches_module(m) for _, m in conv_modules(v6.fuse_model(train)))  # folded already


# -- YOLOv6: module tree --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", V6_VARIANTS)
def test_yolov6_pickled_model_strict_loads_into_the_full_upstream_deploy_model(tmp_path, variant):
    train = v6.train_model(variant)
    source, output = tmp_path / "model.pt", tmp_path / "deploy.pt"
    torch.save(train, source)
    convert(source, output, "--allow-pickle", "--fuse-conv-bn")
    model = torch.load(output, map_location="cpu", weights_only=False)
    assert isinstance(model, v6.Model)
    assert_yolov6_deploy_form(model, torch.float32)
    deploy = v6.deploy_model(variant)
    deploy.load_state_dict(tensors_only(model.state_dict()), strict=True)
    x = probe(v6.INPUT_SHAPE)
    reference = run(train, x)
    assert rel_err(reference, run(model, x)) <= FP32_RTOL
    assert rel_err(reference, run(deploy, x)) <= FP32_RTOL
    # YOLOv6's own loader (fuse_model + switch_to_deploy) finds nothing left to do.
    again = v6.upstream_deploy(model)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert list(again.state_dict()) == list(model.state_dict())


def test_yolov6_module_tree_folds_conv_modules_without_the_flag_too(tmp_path):
    """The family folds ConvModules in the module tree as the key tree does; --fuse-conv-bn changes
    nothing for YOLOv6 (no conv+BN pair is left outside the blocks)."""
    train = v6.train_model("qarepvgg")
    torch.save(train, tmp_path / "model.pt")
    plain = convert(tmp_path / "model.pt", tmp_path / "plain.pt", "--allow-pickle")
    flagged = convert(tmp_path / "model.pt", tmp_path / "flagged.pt", "--allow-pickle", "--fuse-conv-bn")
    assert "conv+bn" not in plain and "conv+bn" not in flagged
    a = torch.load(tmp_path / "plain.pt", weights_only=False).state_dict()
    b = torch.load(tmp_path / "flagged.pt", weights_only=False).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("variant", "stripped"), [("repvgg", False), ("csp_qarepvggv2", True)])
def test_yolov6_fp16_training_checkpoint_pickled(tmp_path, variant, stripped):
    train = v6.train_model(variant)
    source, output = tmp_path / "ckpt.pt", tmp_path / "deploy.pt"
    v6.save_like_yolov6(train, source, stripped=stripped)
    convert(source, output, "--allow-pickle", "--fuse-conv-bn")
    saved = torch.load(output, map_location="cpu", weights_only=False)
    entry = "model" if stripped else "ema"
    model = saved[entry]
    assert isinstance(model, v6.Model) and saved["epoch"] == 9
    assert all(t.dtype == torch.float16 for t in model.state_dict().values() if t.is_floating_point())
    assert_yolov6_deploy_form(model, torch.float16)
    deploy = v6.deploy_model(variant)
    deploy.load_state_dict(tensors_only(model.state_dict()), strict=True)
    x = probe(v6.INPUT_SHAPE)
    reference = run(copy.deepcopy(train).half().float(), x)
    assert rel_err(reference, run(model.float(), x)) <= FP16_RTOL


@pytest.mark.parametrize("variant", ["repvgg_cspsppf", "qarepvggv2"])
def test_yolov6_fp16_training_checkpoint_state_dicts(tmp_path, variant):
    train = v6.train_model(variant)
    source, output = tmp_path / "ckpt.pt", tmp_path / "deploy.pt"
    v6.save_like_yolov6(train, source, state_dict=True)
    convert(source, output, *qa_flags(variant))
    saved = torch.load(output, map_location="cpu", weights_only=True)
    state = tensors_only(saved["ema"])
    assert all(t.dtype == torch.float16 for t in state.values() if t.is_floating_point())
    assert not any(".block.bn." in k for k in state)
    deploy = v6.deploy_model(variant)
    deploy.load_state_dict(state, strict=True)
    x = probe(v6.INPUT_SHAPE)
    assert rel_err(run(copy.deepcopy(train).half().float(), x), run(deploy, x)) <= FP16_RTOL


# -- YOLOv7 ---------------------------------------------------------------------------------------


def assert_model_fuse_form(model: nn.Module, train: nn.Module) -> None:
    """RepConv and every Conv as Model.fuse() leaves them; IDetect untouched (its implicits unfolded)."""
    assert batch_norms(model) == []
    convs = [(n, m) for n, m in model.named_modules() if type(m) is v7.Conv]
    assert len(convs) == 13
    for name, m in convs:
        assert not hasattr(m, "bn") and m.conv.bias is not None, name
        assert m.__dict__["forward"].__func__ is v7.Conv.fuseforward and m.__dict__["forward"].__self__ is m, name
    for m in model.modules():
        if isinstance(m, v7.RepConv):
            assert m.deploy is True and m.rbr_dense is None and isinstance(m.rbr_reparam, nn.Conv2d)
    head, trained = model.model[-1], train.model[-1]
    assert "forward" not in head.__dict__
    for key, value in trained.state_dict().items():
        assert torch.equal(head.state_dict()[key], value.to(head.state_dict()[key].dtype)), key


def test_yolov7_pickled_model_fuse_conv_bn_is_model_fuse(tmp_path):
    train = v7.train_model()
    source, output = tmp_path / "model.pt", tmp_path / "deploy.pt"
    torch.save(train, source)
    before = len(batch_norms(train))
    convert(source, output, "--allow-pickle", "--fuse-conv-bn")
    model = torch.load(output, map_location="cpu", weights_only=False)
    assert_model_fuse_form(model, train)
    print(f"yolov7: {before} BN layers -> {len(batch_norms(model))} (Model.fuse() leaves 0)")
    x = probe(v7.INPUT_SHAPE)
    reference = run(train, x)
    assert rel_err(reference, run(model, x)) <= FP32_RTOL

    # The key layout is Model.fuse()'s, and every tensor but IDetect's is what it computes.
    upstream = v7.upstream_deploy(train).state_dict()
    state = model.state_dict()
    assert list(state) == list(upstream)
    head = "model.12."
    worst = max(rel_err(upstream[k], state[k]) for k in upstream
                if not k.startswith(head) and upstream[k].is_floating_point())
    assert worst <= FP32_RTOL, worst

    # YOLOv7's loader (attempt_load: .fuse()) then folds the implicits, once, and nothing else.
    loaded = copy.deepcopy(model).fuse().eval()
    assert rel_err(reference, run(loaded, x)) <= FP32_RTOL
    fused = loaded.state_dict()
    assert max(rel_err(upstream[k], fused[k]) for k in upstream if upstream[k].is_floating_point()) <= FP32_RTOL

    # The state dict strict-loads into the fused model's layout; its IDetect must run the implicits.
    deploy = v7.deploy_model()
    deploy.load_state_dict(tensors_only(state), strict=True)
    del deploy.model[-1].__dict__["forward"]  # IDetect.forward: implicits applied, not folded
    assert rel_err(reference, run(deploy, x)) <= FP32_RTOL


def test_yolov7_fp16_training_checkpoint(tmp_path):
    """train.py's container: pickled fp16 'model' and 'ema', a numpy 'best_fitness'; 'ema' is used."""
    train = v7.train_model()
    source, output = tmp_path / "ckpt.pt", tmp_path / "deploy.pt"
    v7.save_like_yolov7(train, source)
    convert(source, output, "--allow-pickle", "--fuse-conv-bn")
    saved = torch.load(output, map_location="cpu", weights_only=False)
    model = saved["ema"]
    assert all(t.dtype == torch.float16 for t in model.state_dict().values() if t.is_floating_point())
    assert_model_fuse_form(model, copy.deepcopy(train).half())
    x = probe(v7.INPUT_SHAPE)
    reference = run(copy.deepcopy(train).half().float(), x)
    assert rel_err(reference, run(model.float(), x)) <= FP16_RTOL
    assert rel_err(reference, run(copy.deepcopy(model).float().fuse(), x)) <= FP16_RTOL  # attempt_load


def test_yolov7_key_tree_never_folds_implicits(tmp_path):
    """A state dict cannot say whether IDetect's implicits were folded (fuse() keeps ia/im): the key
    tree passes IDetect through, and the result is YOLOv7's RepConv-only deploy form."""
    train = v7.train_model()
    source = train.state_dict()
    torch.save(source, tmp_path / "train.pt")
    convert(tmp_path / "train.pt", tmp_path / "deploy.pt")
    state = tensors_only(torch.load(tmp_path / "deploy.pt", weights_only=True))
    head = [k for k in source if k.startswith("model.12.")]
    assert any(".ia." in k for k in head) and any(".im." in k for k in head)
    assert all(torch.equal(state[k], source[k]) for k in head)
    deploy = v7.deploy_model(rep_only=True)
    deploy.load_state_dict(state, strict=True)
    x = probe(v7.INPUT_SHAPE)
    assert rel_err(run(train, x), run(deploy, x)) <= FP32_RTOL


# -- ultralytics ----------------------------------------------------------------------------------


def test_ultralytics_fp16_training_checkpoint_to_float32(tmp_path):
    """ultralytics' trainer saves ``{'model': None, 'ema': deepcopy(ema).half(), ...}``; with
    ``--dtype float32`` the deploy model comes out in float32, matching the fp16 weights upcast."""
    train = rc_zoo.train_model()
    source, output = tmp_path / "last.pt", tmp_path / "deploy.pt"
    torch.save({"epoch": 3, "best_fitness": 0.5, "model": None, "ema": copy.deepcopy(train).half(),
                "updates": 100, "optimizer": None, "train_args": {"imgsz": 16}, "date": "2024-01-01",
                "version": "8.1.0"}, source)
    convert(source, output, "--allow-pickle", "--dtype", "float32")
    saved = torch.load(output, map_location="cpu", weights_only=False)
    deploy = saved["ema"]
    assert isinstance(deploy, rc_zoo.TinyRepConvNet)
    assert all(t.dtype == torch.float32 for t in deploy.state_dict().values() if t.is_floating_point())
    assert not batch_norms(deploy.rep)
    x = probe(rc_zoo.INPUT_SHAPE)
    assert rel_err(run(copy.deepcopy(train).half().float(), x), run(deploy, x)) <= FP32_RTOL

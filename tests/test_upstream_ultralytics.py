"""The real ultralytics package (PyPI ``ultralytics``) through the CLI, checked against its own fuse.

Models come from ultralytics' own yaml configs (no weight download): ``yolov9t.yaml`` (the smallest
stock config with ``RepConv``: 42 of them, in RepNCSPELAN4's RepBottlenecks), ``yolov10n.yaml``
(one ``RepVGGDW``, in its last C2fCIB) and ``yolov8n.yaml`` (plain ``Conv`` + BN only). Every BN's
affine parameters and every conv bias (the head's start constant) are random, every BN's running
statistics measured on random images and perturbed, all seeded; the models are in eval mode, with
ultralytics' BN eps 1e-3.

- Pickled, as ultralytics' trainer saves (``{'model': None, 'ema': deepcopy(ema).half(), ...}``) and
  in float32: ``convert --allow-pickle --fuse-conv-bn`` (``--dtype float32`` for the fp16 one) gives a
  model whose outputs match ultralytics' own ``model.fuse()`` of the same weights, with no BN left,
  every Conv / RepConv / RepVGGDW in the form ``fuse()`` leaves, and which ultralytics' own loader
  (``load_checkpoint``, with and without its ``fuse``) loads.
- State dict: ``convert`` finds the rep blocks with eps 1e-3 from the family (no ``--bn-eps``); the
  key tree fuses only the rep blocks, so the output's keys are those of the train model with only
  ``RepConv.fuse_convs()`` / ``RepVGGDW.fuse()`` applied (the Conv+BN pairs ``fuse()`` also folds stay);
  it strict-loads there and matches both the train model and ``fuse()``. A plain YOLOv8 state dict is
  refused (exit 2).

Upstream (github.com/ultralytics/ultralytics, package 8.4.190): ultralytics/nn/tasks.py
(``DetectionModel``, ``BaseModel.fuse``/``is_fused``, ``load_checkpoint``), ultralytics/nn/modules/conv.py
(``Conv``, ``RepConv.fuse_convs``), ultralytics/nn/modules/block.py (``RepVGGDW.fuse``),
ultralytics/nn/modules/head.py (``Detect.fuse``), ultralytics/engine/trainer.py
(``BaseTrainer.save_model``), ultralytics/utils/torch_utils.py (``initialize_weights``: eps 1e-3),
ultralytics/utils/__init__.py (``YOLO_OFFLINE``, ``YOLO_CONFIG_DIR``, ``YOLO_VERBOSE``).
"""

from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
import tempfile
import warnings

# ultralytics reads these once, at import: no DNS probe (``is_online``), settings in a temporary
# folder (not ~/.config/Ultralytics), no model summaries printed.
_CONFIG_DIR = tempfile.mkdtemp(prefix="repvgg-ultralytics-")
atexit.register(shutil.rmtree, _CONFIG_DIR, True)
os.environ["YOLO_OFFLINE"] = "1"
os.environ["YOLO_CONFIG_DIR"] = _CONFIG_DIR
os.environ["YOLO_VERBOSE"] = "False"

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from tests.helpers import error_lines, invoke


def _import_ultralytics():
    """``pytest.importorskip``, then undo what importing ultralytics changes for the rest of the
    session (it runs at collection, before every other test): torch's and numpy's print options,
    warning filters, environment variables other than the YOLO_* ones above."""
    import numpy as np

    torch_print, numpy_print = dict(vars(torch._tensor_str.PRINT_OPTS)), np.get_printoptions()
    environ = dict(os.environ)
    try:
        with warnings.catch_warnings():
            module = pytest.importorskip("ultralytics")
            import ultralytics.nn.tasks  # noqa: F401  (the rest of what is used below)
    finally:
        torch.set_printoptions(**torch_print)
        np.set_printoptions(**numpy_print)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
    return module


ultralytics = _import_ultralytics()

from ultralytics.nn.modules.block import RepVGGDW
from ultralytics.nn.modules.conv import Conv, RepConv
from ultralytics.nn.tasks import DetectionModel, load_checkpoint

FP32_RTOL = 1e-5
INPUT_SHAPE = (1, 3, 64, 64)
# name: (config, rep block class, rep blocks in it, the family the CLI should name)
MODELS = {
    "repconv": ("yolov9t.yaml", RepConv, 42, "ultralytics_repconv"),
    "repvggdw": ("yolov10n.yaml", RepVGGDW, 1, "ultralytics_repvggdw"),
    "plain": ("yolov8n.yaml", None, 0, None),
}
_BUILT: dict[str, DetectionModel] = {}


def randomise(model: DetectionModel, seed: int) -> None:
    """Seeded random BN affine parameters and conv biases (the head's start constant), then BN running
    statistics measured in train mode on random images and perturbed (so eval is not train mode).

    Statistics drawn independently of the signal would let it fade within a few layers (PyTorch's
    default conv init shrinks it), leaving the outputs blind to errors in all but the last layers;
    measured ones keep every layer's activations near unit scale, as in a trained model.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(t: Tensor, low: float, high: float) -> Tensor:
        return torch.rand(t.shape, generator=generator) * (high - low) + low

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                module.bias.copy_(draw(module.bias, -0.3, 0.3))
        for bn in bns:
            bn.weight.copy_(draw(bn.weight, 0.5, 1.5))
            bn.bias.copy_(draw(bn.bias, -0.3, 0.3))
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the batches below
        model.train()
        for _ in range(2):
            model(torch.randn(8, *INPUT_SHAPE[1:], generator=generator))
        model.eval()
        for bn in bns:
            bn.momentum = 0.03  # initialize_weights'
            bn.running_var.clamp_(min=1e-2)  # no near-dead channel amplifying fp32 rounding 30x
            bn.running_mean.add_(draw(bn.running_mean, -0.1, 0.1) * bn.running_var.sqrt())
            bn.running_var.mul_(draw(bn.running_var, 0.8, 1.25))


def train_model(name: str) -> DetectionModel:
    """A fresh copy of the randomised eval model built from ultralytics' own config."""
    if name not in _BUILT:
        seed = sorted(MODELS).index(name)
        with torch.random.fork_rng():  # the conv weights' init draws from the global generator
            torch.manual_seed(seed)
            model = DetectionModel(MODELS[name][0], ch=3, nc=80, verbose=False)
        randomise(model, seed)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(m.eps == 1e-3 for m in bns)  # initialize_weights
        _BUILT[name] = model.eval()
    return copy.deepcopy(_BUILT[name])


def rep_block_names(model: nn.Module, name: str) -> list[str]:
    kind = MODELS[name][1]
    return [n for n, m in model.named_modules() if kind is not None and isinstance(m, kind)]


def outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The eval outputs, flattened: the inference tensor, then the head's dict (boxes, scores, feats).

    Computed in float64 from the model's (float32) weights: float32 arithmetic alone moves the
    outputs of this 42-RepConv model by 1e-4 (train model in float32 against float64, with
    ultralytics' own ``fuse()`` the same), which would hide a fusion error of that size; in float64
    what is left is the fused weights' own float32 rounding.

    A YOLOv10 head returns both ``one2many`` and ``one2one``; ``Detect.fuse()`` keeps only the one its
    ``end2end`` selects for inference (in 8.4.190, a model built from ``yolov10n.yaml`` has
    ``end2end`` False until someone sets it: one2many), so that one is compared.
    """
    with torch.no_grad():
        inference, preds = copy.deepcopy(model).double().eval()(x.double())
    if "one2one" in preds:
        preds = preds["one2one" if model.model[-1].end2end else "one2many"]
    assert sorted(preds) == ["boxes", "feats", "scores"]
    return [inference, preds["boxes"], preds["scores"], *preds["feats"]]


def rel_err(reference: list[Tensor], candidate: list[Tensor]) -> float:
    assert [t.shape for t in reference] == [t.shape for t in candidate]
    return max(float((r.double() - c.double()).abs().max() / r.double().abs().max())
               for r, c in zip(reference, candidate))


def tolerance(upstream_err: float) -> float:
    """How far from the train model a fused model of ours may be: as far as ultralytics' own fusion of
    the same weights is, twice over, or float32 rounding (1e-5), whichever is more.

    Both store fused weights in float32, and 42 RepConvs deep the rounding of those weights alone
    moves the float64 outputs by up to 1e-4 (ultralytics' ``fuse()`` of the yolov9t model: 9.0e-5);
    a fusion error (a wrong eps, a missed branch) moves them by far more.
    """
    return max(2 * upstream_err, FP32_RTOL)


def probe() -> Tensor:
    return torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(7))


def batch_norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def fused_forms(model: nn.Module) -> dict[str, tuple]:
    """For each Conv / RepConv / RepVGGDW: its class, child modules, instance forward and leftovers."""
    forms = {}
    for name, module in model.named_modules():
        if isinstance(module, (Conv, RepConv, RepVGGDW)):
            forward = module.__dict__.get("forward")
            forms[name] = (
                type(module).__name__,
                sorted(k for k, v in module._modules.items() if v is not None),
                type(getattr(module, "conv", None)).__name__,
                getattr(getattr(forward, "__func__", None), "__name__", None),
                hasattr(module, "bn"), hasattr(module, "conv1"), hasattr(module, "conv2"),
                hasattr(module, "id_tensor"),
            )
    return forms


def save_like_trainer(model: nn.Module, path) -> dict:
    """``BaseTrainer.save_model``'s dict (no optimizer or scaler state: there was no training)."""
    checkpoint = {
        "epoch": 9,
        "best_fitness": 0.25,
        "stopper": {"best_fitness": 0.25, "best_epoch": 7},
        "model": None,
        "ema": model,
        "updates": 1234,
        "modelopt": None,
        "optimizer": None,
        "scaler": {},
        "train_args": {"model": "yolo.yaml", "imgsz": 64, "epochs": 10},
        "train_metrics": {"fitness": 0.25},
        "train_results": {},
        "date": "2026-01-01T00:00:00+00:00",
        "version": ultralytics.__version__,
        "git": {"root": None, "branch": None, "commit": None, "message": None, "origin": None},
        "license": "AGPL-3.0 (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
    }
    torch.save(checkpoint, path)
    return checkpoint


# -- pickled training checkpoints, module tree ------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_trainer_checkpoint_with_fuse_conv_bn_is_ultralytics_fuse(tmp_path, name, dtype):
    train = train_model(name)
    half = dtype == "float16"
    # The half model upcast to float32 is what both sides start from.
    start = copy.deepcopy(train).half() if half else copy.deepcopy(train)
    source, output = tmp_path / "last.pt", tmp_path / "deploy.pt"
    checkpoint = save_like_trainer(copy.deepcopy(start), source)

    args = ["convert", source, output, "--allow-pickle", "--fuse-conv-bn"] + (["--dtype", "float32"] if half else [])
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    saved = torch.load(output, map_location="cpu", weights_only=False)
    deploy = saved["ema"]
    assert type(deploy) is DetectionModel
    assert all(t.dtype == torch.float32 for t in deploy.state_dict().values() if t.is_floating_point())
    # The training metadata ultralytics reads back is kept; "model": None and "optimizer" are not.
    for key in ("epoch", "best_fitness", "updates", "train_args", "date", "version", "license"):
        assert saved[key] == checkpoint[key], key
    assert "model" not in saved and "optimizer" not in saved

    reference = copy.deepcopy(start).float().fuse(verbose=False)
    assert batch_norms(reference) == [] and batch_norms(deploy) == []
    ours, theirs = fused_forms(deploy), fused_forms(reference)
    assert theirs and {n: ours[n] for n in theirs} == theirs
    for name_, form in ours.items():  # YOLOv10's head that Detect.fuse() drops: fused too
        assert form[3] == "forward_fuse" and not form[4] and not form[5], name_
    rep_blocks = rep_block_names(deploy, name)
    assert len(rep_blocks) == MODELS[name][2]
    for block in rep_blocks:
        assert ours[block][1] == ["act", "conv"] and ours[block][2] == "Conv2d"

    x = probe()
    # The train model (fp16 weights upcast) is the truth; ultralytics' fuse() sets the bar.
    truth, expected = outputs(copy.deepcopy(start).float(), x), outputs(reference, x)
    bound = tolerance(rel_err(truth, expected))
    assert rel_err(truth, outputs(deploy, x)) <= bound
    assert rel_err(expected, outputs(deploy, x)) <= bound

    # ultralytics' own loader takes the file; its fuse() (run by YOLO() on load) has nothing left to
    # fold, only YOLOv10's unused head to drop, and the outputs stay.
    for fuse in (False, True):
        loaded, _ = load_checkpoint(output, fuse=fuse)
        assert batch_norms(loaded) == []
        assert rel_err(expected, outputs(loaded, x)) <= bound
    assert loaded.is_fused()


# -- state dicts, key tree ------------------------------------------------------------------------------


def rep_only_fused(train: DetectionModel) -> DetectionModel:
    """The train model with only its rep blocks switched by ultralytics' own code (as ``fuse()`` does)."""
    model = copy.deepcopy(train)
    for module in model.modules():
        if isinstance(module, RepConv):
            module.fuse_convs()
            module.forward = module.forward_fuse
        elif isinstance(module, RepVGGDW):
            module.fuse()
            module.forward = module.forward_fuse
    return model


@pytest.mark.parametrize("name", ["repconv", "repvggdw"])
def test_state_dict_fuses_the_rep_blocks_with_the_family_eps(tmp_path, name):
    train = train_model(name)
    source, output = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(copy.deepcopy(train).float().state_dict(), source)

    result = invoke("convert", source, output, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mode"] == "key tree"
    # No --bn-eps needed: the family's 1e-3, named as such.
    assert report["bn_eps"]["values"] == [1e-3] and report["bn_eps"]["source"] == ["family"]
    family = MODELS[name][3]
    expected_blocks = {n: family for n in rep_block_names(train, name)}
    assert len(expected_blocks) == MODELS[name][2]
    assert {b["name"]: b["family"] for b in report["blocks"]} == expected_blocks
    assert all(b["bn_eps"] == [1e-3] and b["eps_source"] == "family" for b in report["blocks"])
    inspected = invoke("inspect", source, "--json")
    assert inspected.exit_code == 0, inspected.stderr
    assert {b["name"]: b["family"] for b in json.loads(inspected.stdout)["blocks"]} == expected_blocks

    state = load_file(output)
    rep_only = rep_only_fused(train)
    full = copy.deepcopy(train).fuse(verbose=False)
    # The key tree folds the rep blocks only: the Conv+BN pairs fuse() also folds keep their BN.
    assert set(state) == set(rep_only.state_dict())
    only_ours, only_full = set(state) - set(full.state_dict()), set(full.state_dict()) - set(state)
    # ... and of YOLOv10's two heads, the one Detect.fuse() drops (one2one, as end2end is False) is kept.
    head = f"model.{len(train.model) - 1}"
    unused_head = {k for k in only_ours if k.startswith(f"{head}.one2one_")}
    assert bool(unused_head) == (name == "repvggdw") and not train.model[-1].end2end
    assert only_ours - unused_head and all(".bn." in k for k in only_ours - unused_head)
    assert only_full and all(k.endswith(".conv.bias") for k in only_full)

    x = probe()
    truth = outputs(train, x)
    bound = tolerance(rel_err(truth, outputs(rep_only, x)))  # ultralytics' own switch of the same blocks
    rep_only.load_state_dict(state, strict=True)
    assert rel_err(truth, outputs(rep_only, x)) <= bound
    assert rel_err(outputs(full, x), outputs(rep_only, x)) <= tolerance(rel_err(truth, outputs(full, x)))

    # The eps matters: told PyTorch's default, the same file converts "fine" and its fused weights are
    # off by far more than fp32 rounding (the whole model's outputs move less: the boxes dominate).
    wrong = invoke("convert", source, tmp_path / "wrong.safetensors", "--bn-eps", "1e-5")
    assert wrong.exit_code == 0, wrong.stderr
    wrong_state = load_file(tmp_path / "wrong.safetensors")
    fused_keys = [f"{block}.conv.{p}" for block in expected_blocks for p in ("weight", "bias")]
    assert rel_err([state[k] for k in fused_keys], [wrong_state[k] for k in fused_keys]) > 10 * FP32_RTOL


def test_plain_yolov8_state_dict_is_refused(tmp_path):
    source, output = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(train_model("plain").state_dict(), source)
    result = invoke("convert", source, output)
    assert result.exit_code == 2
    assert len(error_lines(result)) == 1 and "no re-parameterizable block" in result.stderr
    assert not output.exists()

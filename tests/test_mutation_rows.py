"""One named test for each change that issue 15's mutation run found no test for.

Each test was checked by making the change by hand in a scratch copy and running it there: it
fails under the change and passes on the real code. The tests go through public behaviour only
(``load_checkpoint``, ``SafetensorsStream``, ``repvgg_cli.api``, the CLI),
so they outlive the reorganisation of the modules the changes were made in.

Row by row, the change and the test that fails under it:

1. ``weights_only`` not passed for files named ``*.safetensors``:
   test_row1_hostile_pickle_named_safetensors_is_refused_even_when_the_environment_forces_unsafe_loads
2. the probe window's column taken from the kernel's row count (window extent, window offset,
   CentreProbe's kernel, block_probe's width): test_row2_correct_non_square_blocks_pass_every_check,
   test_row2_a_corrupted_edge_tap_of_a_non_square_kernel_fails_verification
3. the data moved up first chunk first when the metadata outgrows its room:
   test_row3_metadata_outgrowing_its_room_moves_more_than_16_mib_of_data_intact
4. dropped ``*_aux*`` keys not recorded in the metadata:
   test_row4_dropped_aux_keys_are_recorded_so_verify_against_accepts_them
5. ``reparameterize`` without ``model.eval()``: test_row5_reparameterize_returns_the_deploy_model_in_eval_mode
6. half-precision fusion without its NaN/Inf check:
   test_row6_half_precision_nan_in_a_branch_weight_is_an_error_naming_the_branch (module tree)
7. the deploy-file NaN/Inf check skipping the bias: test_row7_nan_or_inf_in_a_deploy_tensor_is_reported_as_such

The last two tests keep ``scripts/mutation_equivalents.txt`` readable by ``scripts/mutate.py``.
"""

from __future__ import annotations

import copy
import math
import os
import pathlib
import re
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tests import zoo
from repvgg_cli.api import convert_file, convert_state_dict, reparameterize, verify_file
from repvgg_cli.errors import InputError, PickleRefusedError
from repvgg_cli.io.read import load_checkpoint
from repvgg_cli.io.safetensors_file import SafetensorsStream
from tests.helpers import error_lines, invoke

F64 = torch.float64
FORCE_UNSAFE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def plain_net(seed: int, dtype: torch.dtype = F64) -> nn.Module:
    """The tutorial-block network with random BN statistics and affine parameters, in ``dtype``."""
    torch.manual_seed(seed)
    return zoo.randomize_bn(zoo.PlainNet(), seed=seed).to(dtype).eval()


# -- row 1: a hostile pickle named *.safetensors ---------------------------------------------------


class RunsOnLoad:
    """Unpickling this creates ``marker``: the proof that code from the file ran."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os-system":
            return (os.system, (f"touch '{self.marker}'",))
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _hostile_named_safetensors(tmp_path: Path, how: str) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    path = tmp_path / "x.safetensors"  # a torch pickle by its bytes, a safetensors file by its name
    torch.save({"state_dict": plain_net(1).state_dict(), "extra": RunsOnLoad(marker, how)}, path)
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("how", ["path-touch", "os-system"])
def test_row1_hostile_pickle_named_safetensors_is_refused_even_when_the_environment_forces_unsafe_loads(
        tmp_path: Path, monkeypatch, how: str) -> None:
    monkeypatch.setenv(FORCE_UNSAFE, "1")  # torch's default turns to weights_only=False
    path, marker = _hostile_named_safetensors(tmp_path, how)
    with pytest.raises(PickleRefusedError) as info:
        load_checkpoint(path)
    assert info.value.message.startswith(f"{path} holds ")
    assert not marker.exists()
    result = invoke("inspect", path)
    assert result.exit_code == 2
    assert len(error_lines(result)) == 1 and str(path) in error_lines(result)[0]
    assert not marker.exists()


@pytest.mark.filterwarnings(f"ignore:Environment variable {FORCE_UNSAFE}")
def test_row1_control_the_payload_is_live(tmp_path: Path, monkeypatch) -> None:
    # Without this control the test above could pass on a payload that never runs.
    path, marker = _hostile_named_safetensors(tmp_path, "path-touch")
    loaded = load_checkpoint(path, allow_pickle=True)
    assert marker.exists() and loaded.entry == "state_dict"
    marker.unlink()
    monkeypatch.setenv(FORCE_UNSAFE, "1")
    with open(path, "rb") as handle:  # what torch does by default with the variable set
        torch.load(handle, map_location="cpu")
    assert marker.exists()


# -- row 2: the probe window of non-square kernels -------------------------------------------------


def _bn_state(prefix: str, channels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(channels, generator=generator, dtype=F64) + 0.5,
        f"{prefix}.bias": torch.randn(channels, generator=generator, dtype=F64),
        f"{prefix}.running_mean": torch.randn(channels, generator=generator, dtype=F64),
        f"{prefix}.running_var": torch.rand(channels, generator=generator, dtype=F64) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(7),
    }


def non_square_block(kernel: tuple[int, int], seed: int, channels: int = 4) -> OrderedDict[str, torch.Tensor]:
    """A tutorial block (key tree) whose main kernel is ``kernel``, with 1x1 and identity branches."""
    generator = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    state["block.conv3x3.weight"] = torch.randn(channels, channels, *kernel, generator=generator, dtype=F64)
    state.update(_bn_state("block.bn3x3", channels, generator))
    state["block.conv1x1.weight"] = torch.randn(channels, channels, 1, 1, generator=generator, dtype=F64)
    state.update(_bn_state("block.bn1x1", channels, generator))
    state.update(_bn_state("block.identity", channels, generator))
    state["head.weight"] = torch.randn(3, channels, generator=generator, dtype=F64)
    return state


KERNELS = [(3, 5), (5, 3), (1, 3), (3, 1), (1, 5), (5, 1)]


def _edge_taps(kernel: tuple[int, int]) -> list[tuple[int, int]]:
    """The taps at the kernel's corners and the middle of each edge."""
    kh, kw = kernel
    return sorted({(r, c) for r in (0, kh // 2, kh - 1) for c in (0, kw // 2, kw - 1) if r in (0, kh - 1) or c in (0, kw - 1)})


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k[0]}x{k[1]}")
def test_row2_correct_non_square_blocks_pass_every_check(tmp_path: Path, kernel: tuple[int, int]) -> None:
    state = non_square_block(kernel, seed=10 * kernel[0] + kernel[1])
    result = convert_state_dict(state)
    assert [r.block.name for r in result.blocks] == ["block"]
    assert result.ok and result.blocks[0].check.rel_err <= 1e-12
    fused = result.blocks[0].fused
    assert tuple(fused.weight.shape[2:]) == kernel and fused.padding == (kernel[0] // 2, kernel[1] // 2)
    # The fused conv computes what the train-form block computes, on an input of another shape.
    x = torch.randn(2, 4, 7, 9, generator=torch.Generator().manual_seed(3), dtype=F64)
    prefix = "block."

    def bn(y, name):
        return torch.nn.functional.batch_norm(
            y, state[f"{prefix}{name}.running_mean"], state[f"{prefix}{name}.running_var"],
            state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.bias"], training=False, eps=1e-5)

    padding = (kernel[0] // 2, kernel[1] // 2)
    reference = (bn(torch.nn.functional.conv2d(x, state["block.conv3x3.weight"], padding=padding), "bn3x3")
                 + bn(torch.nn.functional.conv2d(x, state["block.conv1x1.weight"]), "bn1x1") + bn(x, "identity"))
    deploy = torch.nn.functional.conv2d(x, fused.weight, fused.bias, padding=fused.padding)
    assert float((deploy - reference).abs().max()) <= 1e-12 * float(reference.abs().max())
    # Written, then re-checked on its own and against its source.
    torch.save(state, tmp_path / "train.pt")
    outcome = convert_file(tmp_path / "train.pt", tmp_path / "deploy.safetensors")
    assert outcome.written
    alone = verify_file(tmp_path / "deploy.safetensors")
    against = verify_file(tmp_path / "deploy.safetensors", against=tmp_path / "train.pt")
    for report in (alone, against):
        assert report.ok, report
        assert [b.name for b in report.blocks] == ["block"] and report.blocks[0].rel_err <= 1e-12


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k[0]}x{k[1]}")
def test_row2_a_corrupted_edge_tap_of_a_non_square_kernel_fails_verification(tmp_path: Path,
                                                                             kernel: tuple[int, int]) -> None:
    state = non_square_block(kernel, seed=100 + 10 * kernel[0] + kernel[1])
    torch.save(state, tmp_path / "train.pt")
    deploy = tmp_path / "deploy.safetensors"
    assert convert_file(tmp_path / "train.pt", deploy).written
    with safe_open(str(deploy), "pt") as handle:
        metadata = handle.metadata()
    clean = load_file(str(deploy))
    scale = float(clean["block.weight"].abs().max())
    for tap in _edge_taps(kernel):
        corrupted = dict(clean)
        weight = clean["block.weight"].clone()
        weight[1, 2, tap[0], tap[1]] += scale
        corrupted["block.weight"] = weight
        save_file(corrupted, str(deploy), metadata=metadata)
        report = verify_file(deploy, against=tmp_path / "train.pt")
        assert not report.ok, tap
        assert report.blocks[0].problem is None, tap  # found by the numbers, not by a file check
        assert report.blocks[0].rel_err > 1e-3, tap
        alone = verify_file(deploy)
        assert not alone.ok, tap


# -- row 3: moving the data up when the metadata outgrows its reserved room ------------------------


def test_row3_metadata_outgrowing_its_room_moves_more_than_16_mib_of_data_intact(tmp_path: Path) -> None:
    # More than one 16 MiB chunk of data, moved up by far less than a chunk: the source and the
    # destination of the move overlap, so copying the chunks in the wrong order corrupts them.
    big = torch.arange(4_500_001, dtype=torch.float32)  # 18 MB, every 4-byte word distinct
    small = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    tail = torch.arange(-7, 0, dtype=torch.int64)
    layout = OrderedDict([("small", (small.dtype, tuple(small.shape))), ("big", (big.dtype, tuple(big.shape))),
                          ("tail", (tail.dtype, tuple(tail.shape)))])
    path = tmp_path / "moved.safetensors"
    path.write_bytes(b"")
    metadata = {"format": "pt", "notes": "n" * 50_000}  # far more than the room reserved (0 bytes asked)
    with SafetensorsStream(path, layout, reserve=0) as stream:
        for key, tensor in (("big", big), ("tail", tail), ("small", small)):
            stream.put(key, tensor).result()
        stream.finish(metadata)
    loaded = load_file(str(path))
    assert set(loaded) == {"small", "big", "tail"}
    assert torch.equal(loaded["big"], big)
    assert torch.equal(loaded["small"], small) and loaded["small"].dtype == F64
    assert torch.equal(loaded["tail"], tail)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == metadata
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header + big.numel() * 4 + small.numel() * 8 + tail.numel() * 8


# -- row 4: dropped keys recorded in the metadata --------------------------------------------------


AUX_KEYS = ("stage2_aux.0.weight", "stage3_first_aux.linear.bias")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_row4_dropped_aux_keys_are_recorded_so_verify_against_accepts_them(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(4)
    state = zoo.randomize_bn(zoo.repvgg("tiny"), seed=4).state_dict()
    generator = torch.Generator().manual_seed(5)
    state[AUX_KEYS[0]] = torch.randn(4, 8, 3, 3, generator=generator)
    state[AUX_KEYS[1]] = torch.randn(10, generator=generator)
    train, deploy = tmp_path / "train.pt", tmp_path / f"deploy{suffix}"
    torch.save(state, train)
    converted = invoke("convert", train, deploy)
    assert converted.exit_code == 0, converted.stderr
    verified = invoke("verify", deploy, "--against", train)
    assert verified.exit_code == 0, verified.stdout + verified.stderr
    assert verify_file(deploy, against=train).problems == ()
    loaded = load_checkpoint(deploy)
    assert loaded.metadata is not None and loaded.metadata["dropped_keys"] == list(AUX_KEYS)
    assert not any("_aux" in key for key in loaded.state_dict)


# -- row 5: reparameterize puts the model in eval mode ---------------------------------------------


def test_row5_reparameterize_returns_the_deploy_model_in_eval_mode(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = zoo.randomize_bn(nn.Sequential(zoo.PlainBlock(3, 8), nn.BatchNorm2d(8), nn.Dropout(0.5),
                                           zoo.PlainBlock(8, 8)), seed=6).to(F64)
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(7), dtype=F64)
    with torch.no_grad():
        reference = copy.deepcopy(model).eval()(x)
    model.train()  # as a training script leaves it
    result = reparameterize(model)
    assert result.ok and [r.block.name for r in result.blocks] == ["0", "3"]
    deploy = result.model
    assert deploy.training is False
    assert not any(m.training for m in deploy.modules() if isinstance(m, (nn.BatchNorm2d, nn.Dropout)))
    # The model as returned computes the train form's eval output, run as it is (no .eval() here).
    with torch.no_grad():
        out = deploy(x)
    assert float((out - reference).abs().max()) <= 1e-12 * float(reference.abs().max())


# -- row 6: half precision, NaN/Inf in a branch weight -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("tree", ["module", "key"])
def test_row6_half_precision_nan_in_a_branch_weight_is_an_error_naming_the_branch(
        tree: str, value: float, dtype: torch.dtype) -> None:
    model = plain_net(8, dtype)
    with torch.no_grad():
        model.features[2].conv1x1.weight[3, 1, 0, 0] = value
    # the module tree names the branch; the key tree may name the key itself
    branch = "branch 1 weight" if tree == "module" else r"(branch 1 weight|features\.2\.conv1x1\.weight)"
    with pytest.raises(InputError, match=rf"^block features\.2: {branch} holds NaN or Inf"):
        if tree == "module":
            reparameterize(model)
        else:
            convert_state_dict(model.state_dict())


def test_row6_half_precision_nan_through_the_cli(tmp_path: Path) -> None:
    model = plain_net(9, torch.float16)
    state = model.state_dict()
    state["features.4.conv3x3.weight"][0, 0, 1, 2] = math.nan
    torch.save(state, tmp_path / "half.pt")
    for output in ("out.safetensors", "out.pt"):
        result = invoke("convert", tmp_path / "half.pt", tmp_path / output)
        assert result.exit_code == 2, result.stdout + result.stderr
        assert re.search(r"block features\.4: (branch 0 weight|features\.4\.conv3x3\.weight) holds NaN or Inf",
                         error_lines(result)[0])
        assert not (tmp_path / output).exists()


# -- row 7: a NaN/Inf bias in a deploy file ----------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("part", ["bias", "weight"])
def test_row7_nan_or_inf_in_a_deploy_tensor_is_reported_as_such(tmp_path: Path, part: str, value: float) -> None:
    train, deploy = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(plain_net(11).state_dict(), train)
    assert convert_file(train, deploy).written
    with safe_open(str(deploy), "pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(deploy))
    tensor = state[f"features.2.{part}"].clone()
    tensor.view(-1)[1] = value
    state[f"features.2.{part}"] = tensor
    save_file(state, str(deploy), metadata=metadata)
    for report in (verify_file(deploy), verify_file(deploy, against=train)):
        assert not report.ok
        problems = {b.name: b.problem for b in report.blocks}
        assert problems == {"features.0": None, "features.2": "features.2 holds NaN or Inf",
                            "features.4": None, "features.6": None}
    result = invoke("verify", deploy)
    assert result.exit_code == 1
    assert "features.2 holds NaN or Inf" in result.stdout


# -- the mutation run's list of equivalent mutants ---------------------------------------------------------


def _mutate_script():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "mutate.py"
    spec = importlib.util.spec_from_file_location("repvgg_mutate_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_documented_equivalent_mutant_has_a_fingerprint_and_a_reason() -> None:
    script = _mutate_script()
    lines = [line for line in script.EQUIVALENTS.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    entries = script.read_equivalents(script.EQUIVALENTS)
    assert len(entries) == len(lines)  # one entry per line, no fingerprint twice
    for fp, entry in entries.items():
        assert re.fullmatch(r"[0-9a-f]{12}", fp) and "__mutmut_" in entry.mutant
        assert entry.mutant.startswith("repvgg_cli.") and len(entry.reason) >= 20


def test_a_mutant_fingerprint_follows_the_changed_lines_not_the_mutant_number(tmp_path: Path) -> None:
    script = _mutate_script()
    diff = ("--- repvgg_cli/io/containers.py\n+++ repvgg_cli/io/containers.py\n@@ -3,7 +3,7 @@\n"
            "     keys = list(state.keys())\n-        changed = False\n+        changed = None\n")
    fp = script.fingerprint("repvgg_cli.io.containers.x_strip_prefixes__mutmut_7", diff)
    assert fp == script.fingerprint("repvgg_cli.io.containers.x_strip_prefixes__mutmut_9", diff.replace("-3,7 +3,7", "-4,7 +4,7"))
    assert fp != script.fingerprint("repvgg_cli.io.containers.x_strip_prefixes__mutmut_7", diff.replace("None", "True"))
    assert fp != script.fingerprint("repvgg_cli.io.containers.x_pick_entry__mutmut_7", diff)
    bad = tmp_path / "equivalents.txt"
    bad.write_text(f"{fp}  repvgg_cli.io.containers.x_strip_prefixes__mutmut_7\n")  # no reason
    with pytest.raises(SystemExit, match="expected 'FINGERPRINT MUTANT -- reason'"):
        script.read_equivalents(bad)


def test_a_sample_is_seeded_and_its_interval_is_wilsons(capsys) -> None:
    script = _mutate_script()
    names = [f"repvgg_cli.m.x_f__mutmut_{i}" for i in range(1, 101)]
    chosen = script.draw_sample(list(reversed(names)), 10, seed=4)
    assert chosen == script.draw_sample(names, 10, seed=4) == sorted(chosen)  # the order given does not matter
    assert len(set(chosen)) == 10 and set(chosen) <= set(names)
    assert chosen != script.draw_sample(names, 10, seed=5)
    assert script.draw_sample(names[:3], 10, seed=4) == sorted(names[:3])
    # Wilson's 95% interval (z = 1.96): 95 of 100 -> 88.8-97.8%; all of 50 -> 92.9-100%
    low, high = script.wilson_interval(95, 100)
    assert round(low, 1) == 88.8 and round(high, 1) == 97.8
    low, high = script.wilson_interval(50, 50)
    assert round(low, 1) == 92.9 and high == pytest.approx(100.0)
    assert script.wilson_interval(0, 0) == (0.0, 100.0)
    # a sampled target is reported with its interval and scaled up in the total
    result = script.TargetResult("t", ["f.py"], ["tests/t.py"], sample={"seed": 4, "size": 4, "of": 40})
    result.statuses = {names[0]: "killed", names[1]: "killed", names[2]: "killed", names[3]: "timeout",
                       **{n: "not checked" for n in names[4:40]}}
    full = script.TargetResult("u", ["g.py"], ["tests/u.py"])
    full.statuses = {f"repvgg_cli.g.x_h__mutmut_{i}": "killed" for i in range(1, 11)}
    full.statuses["repvgg_cli.g.x_h__mutmut_11"] = "survived"
    full.diffs = {"repvgg_cli.g.x_h__mutmut_11": "-a\n+b\n"}
    total = script.report([result, full], {})
    out = capsys.readouterr().out
    assert "sampled: 4 of 40 mutants (seed 4); the whole target's score is 51.0-100.0% (95% Wilson interval)" in out
    assert (total.killed, total.scored) == (14, 15)
    # 40 * 4/4 killed + 10 of 11 -> 50/51
    assert "about 98.0% of about 51 scored mutants" in out

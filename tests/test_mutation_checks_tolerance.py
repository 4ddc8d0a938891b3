"""repvgg_cli.checks.tolerance, to the letter (issue 15: mutation score of the checks).

The default tolerances per dtype, pass/fail at the exact boundary ``atol + rtol * scale``, the
relative error with and without a scale, :func:`compare` on shapes, NaN/Inf and empty tensors,
and the exact base64 round trip of recorded probe outputs.
"""

from __future__ import annotations

import base64
import math

import pytest
import torch

from repvgg_cli.checks.tolerance import (
    DEFAULT_RTOL,
    FLOAT64,
    BlockCheck,
    ModelCheck,
    Tolerance,
    compare,
    decode_tensor,
    default_rtol,
    encode_tensor,
)


def test_defaults_by_dtype() -> None:
    assert FLOAT64 is torch.float64
    assert DEFAULT_RTOL == {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
    assert default_rtol(torch.float16) == 4e-3 and default_rtol(torch.int8) == 1e-5
    assert Tolerance().rtol is None and Tolerance().atol == 0.0
    assert Tolerance().rtol_for(torch.bfloat16) == 3e-2
    assert Tolerance(rtol=0.5).rtol_for(torch.float64) == 0.5
    assert Tolerance(rtol=0.0).rtol_for(torch.float64) == 0.0  # an explicit 0 is not "by dtype"


@pytest.mark.parametrize("cls", [BlockCheck, ModelCheck])
def test_pass_exactly_at_the_boundary(cls) -> None:
    def check(err, scale, rtol, atol, problem=None):
        if cls is BlockCheck:
            return BlockCheck("b", err, scale, rtol, atol, problem=problem)
        return ModelCheck((1, 3, 8, 8), "float64", err, scale, rtol, atol, problem=problem)

    assert check(0.75, 2.0, 0.25, 0.25).ok  # 0.25 + 0.25 * 2
    assert not check(0.75 + 1e-12, 2.0, 0.25, 0.25).ok
    assert check(0.0, 0.0, 0.0, 0.0).ok
    assert not check(0.0, 0.0, 0.0, 0.0, problem="missing").ok
    assert not check(math.inf, 1.0, 1.0, 1.0).ok
    assert check(0.5, 4.0, 0.0, 0.5).ok and not check(0.5, 4.0, 0.0, 0.25).ok
    assert check(1.0, 4.0, 0.25, 0.0).ok and not check(1.0, 4.0, 0.2, 0.0).ok


@pytest.mark.parametrize("cls", [BlockCheck, ModelCheck])
def test_relative_error(cls) -> None:
    def check(err, scale):
        if cls is BlockCheck:
            return BlockCheck("b", err, scale, 0.0, 0.0)
        return ModelCheck((1,), "float32", err, scale, 0.0, 0.0)

    assert check(1.0, 4.0).rel_err == 0.25
    assert check(1.5, 0.0).rel_err == 1.5  # no scale: the absolute error
    assert check(1.5, -1.0).rel_err == 1.5


def test_check_defaults() -> None:
    block = BlockCheck("b", 0.0, 1.0, 1e-9, 0.0)
    assert block.cast_abs_err == 0.0 and block.problem is None and block.reference is None
    assert BlockCheck("b", 0.0, 1.0, 1e-9, 0.0, reference=torch.ones(1)) == block  # reference not compared
    assert "reference" not in repr(BlockCheck("b", 0.0, 1.0, 1e-9, 0.0, reference=torch.ones(1)))
    model = ModelCheck((1, 3), "float64", 0.0, 1.0, 1e-9, 0.0)
    assert model.outputs == 1 and model.problem is None


def test_compare() -> None:
    reference = torch.tensor([[1.0, -4.0], [2.0, 0.5]], dtype=torch.float64)
    candidate = torch.tensor([[1.5, -4.0], [2.0, 0.25]], dtype=torch.float32)
    assert compare(reference, candidate) == (0.5, 4.0)
    assert compare(candidate.to(torch.float64), reference.to(torch.float16)) == (0.5, 4.0)
    assert compare(torch.zeros(0), torch.zeros(0)) == (0.0, 0.0)
    assert compare(torch.tensor([0.0]), torch.tensor([0.0])) == (0.0, 0.0)
    nan = torch.tensor([1.0, float("nan")])
    assert compare(torch.tensor([1.0, 2.0]), nan) == (math.inf, 2.0)
    assert compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("-inf")]))[0] == math.inf
    small = torch.tensor([1.0 + 1e-12], dtype=torch.float64)
    assert compare(torch.tensor([1.0], dtype=torch.float64), small)[0] == pytest.approx(1e-12, rel=1e-3)
    with pytest.raises(ValueError) as info:
        compare(torch.zeros(2, 3), torch.zeros(3, 2))
    assert str(info.value) == "shapes differ: (2, 3) vs (3, 2)"


def test_compare_measures_in_float64() -> None:
    reference = torch.tensor([16777216.0], dtype=torch.float64)  # 2**24
    candidate = torch.tensor([16777217.0], dtype=torch.float64)
    assert compare(reference.to(torch.float32), candidate) == (1.0, 16777216.0)


def test_encode_and_decode_are_exact() -> None:
    t = torch.tensor([[1.0 / 3.0, -2.5e-300, 7.0]], dtype=torch.float64)
    text = encode_tensor(t)
    assert base64.b64decode(text) == t.numpy().astype("<f8").tobytes()
    back = decode_tensor(text, [1, 3])
    assert back.dtype == torch.float64 and back.shape == (1, 3) and torch.equal(back, t)
    back[0, 0] = 9.0  # a writable copy, not a view of the decoded bytes
    assert encode_tensor(torch.tensor([1.5], dtype=torch.float32)) == base64.b64encode(
        torch.tensor([1.5], dtype=torch.float64).numpy().tobytes()).decode("ascii")
    g = torch.ones(2, requires_grad=True) * 2
    assert torch.equal(decode_tensor(encode_tensor(g), (2,)), torch.full((2,), 2.0, dtype=torch.float64))
    nc = torch.arange(6, dtype=torch.float64).reshape(2, 3).t()
    assert torch.equal(decode_tensor(encode_tensor(nc), (3, 2)), nc)

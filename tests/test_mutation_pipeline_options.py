"""repvgg_cli.pipeline.options, to the letter (issue 15: mutation score of the pipeline): the
defaults, the dtype each tensor is written in, the refusal of an unknown dtype, and the family
options handed on.
"""

from __future__ import annotations

import pytest
import torch

from repvgg_cli.checks.tolerance import Tolerance
from repvgg_cli.errors import InputError
from repvgg_cli.pipeline.options import DTYPES, ConvertOptions


def test_defaults() -> None:
    o = ConvertOptions()
    assert (o.bn_eps, o.tolerance, o.seed, o.input_shape, o.fold_post_bn, o.no_identity, o.avg_branch) == (
        None, Tolerance(), 0, None, False, (), ())
    assert (o.fuse_conv_bn, o.fsync, o.passthrough, o.qa_variant, o.dtype, o.max_output_bytes) == (
        False, False, (), None, "keep", None)
    assert DTYPES == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                      "float64": torch.float64}


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "float64"])
def test_each_dtype(name: str) -> None:
    o = ConvertOptions(dtype=name)
    assert o.target_dtype is DTYPES[name]
    assert o.written_dtype(torch.float64) is DTYPES[name] and o.written_dtype(torch.int64) is torch.int64
    assert o.written_dtype(torch.bool) is torch.bool
    t = torch.arange(3, dtype=torch.float64) / 3
    assert o.written(t).dtype is DTYPES[name] and torch.equal(o.written(t), t.to(DTYPES[name]))
    i = torch.arange(3)
    assert o.written(i) is i


def test_keep() -> None:
    o = ConvertOptions()
    assert o.target_dtype is None and o.written_dtype(torch.float16) is torch.float16
    t = torch.zeros(2, dtype=torch.bfloat16)
    assert o.written(t) is t
    same = ConvertOptions(dtype="float32")
    f = torch.zeros(2)
    assert same.written(f) is f  # already the target: the tensor itself, no copy


def test_an_unknown_dtype_is_refused_in_words() -> None:
    with pytest.raises(InputError) as info:
        ConvertOptions(dtype="int8").target_dtype
    assert info.value.message == "dtype 'int8': use keep, float32, float16 or bfloat16"


def test_family_options_are_handed_on() -> None:
    o = ConvertOptions(bn_eps=1e-3, fold_post_bn=True, no_identity=("a.*",), avg_branch=("b",), qa_variant="v2")
    f = o.family_options
    assert (f.bn_eps, f.fold_post_bn, f.no_identity, f.avg_branch, f.qa_variant) == (1e-3, True, ("a.*",), ("b",), "v2")
    g = ConvertOptions().family_options
    assert (g.bn_eps, g.fold_post_bn, g.no_identity, g.avg_branch, g.qa_variant) == (None, False, (), (), None)

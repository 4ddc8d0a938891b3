"""repvgg_cli.io.contents, to the letter (issue 15: mutation score of the io layer).

Each kind of tensor repvgg refuses, in its exact words; the refusal message and hint; what
:func:`walk` finds (tensors, depth, the entry of the deepest nesting) in containers, modules,
shared objects and cycles; and the nesting limit at its boundary.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from repvgg_cli.errors import InputError
from repvgg_cli.io.contents import MAX_NESTING, READABLE_DTYPES, check_nesting, check_tensors, tensor_problem, walk
from repvgg_cli.io import contents


def test_constants() -> None:
    assert MAX_NESTING == 100
    assert READABLE_DTYPES == {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
                               torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64,
                               torch.bool}


@pytest.mark.parametrize("dtype", sorted(READABLE_DTYPES, key=str))
def test_every_readable_dtype_passes(dtype: torch.dtype) -> None:
    assert tensor_problem(torch.zeros(2, dtype=dtype)) is None


@pytest.mark.parametrize(("tensor", "said"), [
    (torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]), "a nested tensor"),
    (torch.zeros(2, 2).to_sparse(), "a sparse tensor (layout sparse_coo)"),
    (torch.zeros(2, 2).to_sparse_csr(), "a sparse tensor (layout sparse_csr)"),
    (torch.zeros(2, device="meta"), "a meta tensor (a shape without data)"),
    (torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8), "a quantized tensor (qint8)"),
    (torch.zeros(2, dtype=torch.complex64), "a complex64 tensor"),
    (torch.zeros(2, dtype=torch.float8_e4m3fn), "a float8_e4m3fn tensor"),
])
def test_each_unreadable_tensor_in_words(tensor: torch.Tensor, said: str) -> None:
    assert tensor_problem(tensor) == said


def test_a_tensor_on_another_device_is_named(monkeypatch) -> None:
    class Fake:
        is_nested = False
        layout = torch.strided
        device = torch.device("cuda", 1)
        is_quantized = False
        dtype = torch.float32

    assert tensor_problem(Fake()) == "a tensor on cuda:1"


def test_check_tensors_names_the_first_bad_key(tmp_path: Path) -> None:
    state = OrderedDict([("ok", torch.zeros(1)), ("c", torch.zeros(1, dtype=torch.complex64)),
                         ("m", torch.zeros(1, device="meta"))])
    with pytest.raises(InputError) as info:
        check_tensors(tmp_path / "x.pt", state, where="entry 'ema': ")
    assert info.value.message == (f"{tmp_path / 'x.pt'}: entry 'ema': key c holds a complex64 tensor; repvgg reads "
                                  "dense CPU tensors of real floating-point, integer or bool dtypes")
    assert info.value.hint == "convert or drop that tensor before saving the checkpoint"
    with pytest.raises(InputError) as info:
        check_tensors(tmp_path / "x.pt", {"m": torch.zeros(1, device="meta")})
    assert info.value.message.startswith(f"{tmp_path / 'x.pt'}: key m holds a meta tensor")
    check_tensors(tmp_path / "x.pt", {"a": torch.zeros(1), "b": torch.zeros(1, dtype=torch.int8)})


def test_walk_finds_every_tensor_and_the_depth() -> None:
    a, b, c, d, e = (torch.full((1,), float(i)) for i in range(5))
    raw = {"state_dict": OrderedDict([("w", a)]), "nested": [{"x": (b, {c})}], "t": d,
           "module": nn.Linear(1, 1, bias=False), "n": 3, "s": "text", "fs": frozenset({e})}
    found = walk(raw)
    ids = {id(t) for t in found.tensors}
    assert {id(a), id(b), id(c), id(d), id(e), id(raw["module"].weight)} == ids
    assert len(found.tensors) == 6
    assert found.depth == 5 and found.deepest_entry == "nested"  # dict > list > dict > tuple > set


def test_walk_of_a_bare_tensor_module_and_scalar() -> None:
    t = torch.zeros(2)
    assert (walk(t).tensors, walk(t).depth, walk(t).deepest_entry) == ([t], 0, None)
    m = nn.BatchNorm2d(2)
    found = walk(m)
    assert len(found.tensors) == 5 and found.depth == 0  # weight, bias, running mean/var, count
    assert walk(5).tensors == [] and walk(5).depth == 0


def test_walk_keeps_the_parameters_of_a_module() -> None:
    m = nn.Linear(2, 1)
    found = walk([m])
    assert found.tensors[0] is m.weight and found.tensors[1] is m.bias  # keep_vars: the parameters themselves
    assert found.depth == 1 and found.deepest_entry is None


def test_walk_visits_a_shared_container_once_and_survives_a_cycle() -> None:
    t = torch.zeros(1)
    shared = [t]
    cycle: list = [shared]
    cycle.append(cycle)
    found = walk({"a": shared, "b": shared, "c": cycle})
    assert len(found.tensors) == 1 and found.depth == 3 and found.deepest_entry == "c"


def test_the_deepest_entry_is_the_first_to_reach_the_depth() -> None:
    found = walk({"a": [[1]], "b": [[2]]})
    assert found.depth == 3 and found.deepest_entry in ("a", "b")
    found = walk({"a": [1], "b": [[2]]})
    assert found.depth == 3 and found.deepest_entry == "b"
    found = walk([[[1]]])  # a top-level list: entries are indices
    assert found.depth == 3 and found.deepest_entry == 0
    found = walk({"top": 1})
    assert found.depth == 1 and found.deepest_entry is None


def test_children_of_each_container() -> None:
    assert contents._children({"a": 1}) == [("a", 1)]
    assert contents._children([5, 6]) == [(0, 5), (1, 6)]
    assert contents._children((7,)) == [(0, 7)]
    assert contents._children({8}) == [(None, 8)] and contents._children(frozenset({9})) == [(None, 9)]
    assert contents._children("text") is None and contents._children(3) is None


def _nested(depth: int) -> dict:
    value: object = torch.zeros(1)
    for _ in range(depth - 1):
        value = [value]
    return {"deep": value}


def test_the_nesting_limit_at_its_boundary(tmp_path: Path) -> None:
    ok = walk(_nested(MAX_NESTING))
    assert ok.depth == MAX_NESTING
    check_nesting(tmp_path / "x.pt", ok)
    deep = walk(_nested(MAX_NESTING + 1))
    assert deep.depth == MAX_NESTING + 1
    with pytest.raises(InputError) as info:
        check_nesting(tmp_path / "x.pt", deep)
    assert info.value.message == (f"{tmp_path / 'x.pt'}: entry 'deep' holds containers nested 101 deep, more than "
                                  "the 100 repvgg reads")
    assert info.value.hint == "save the weights on their own: torch.save(model.state_dict(), path)"


def test_a_deep_top_level_list_is_the_file(tmp_path: Path) -> None:
    value: object = 1
    for _ in range(MAX_NESTING + 1):
        value = [value]
    found = walk(value)
    found.deepest_entry = None
    with pytest.raises(InputError) as info:
        check_nesting(tmp_path / "x.pt", found)
    assert info.value.message.startswith(f"{tmp_path / 'x.pt'}: the file holds containers nested 101 deep")


def test_of_entries_equally_deep_the_one_walked_first_is_named() -> None:
    # the walk is a stack: the last key is walked first, and a later entry as deep does not replace it
    found = walk({"a": [[1]], "b": [[2]]})
    assert found.depth == 3 and found.deepest_entry == "b"
    found = walk({"b": [[1]], "a": [[2]], "c": [3]})
    assert found.depth == 3 and found.deepest_entry == "a"

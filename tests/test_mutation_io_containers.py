"""repvgg_cli.io.containers, to the letter (issue 15: mutation score of the io layer).

Which container entry holds the weights (and the note that says so), each refusal in its words,
what counts as a state dict, and which key prefixes are stripped.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from repvgg_cli.errors import InputError
from repvgg_cli.io.containers import (
    CONTAINER_ENTRIES,
    EMA_ENTRIES,
    PLAIN_ENTRIES,
    STRIPPABLE_PREFIXES,
    is_state_dict,
    pick_entry,
    prefix_notes,
    strip_prefixes,
    type_name,
    why_not_state_dict,
)

P = Path("ck.pt")
SD = {"w": torch.zeros(1)}


def test_constants() -> None:
    assert EMA_ENTRIES == ("ema", "model_ema", "state_dict_ema")
    assert PLAIN_ENTRIES == ("state_dict", "model")
    assert CONTAINER_ENTRIES == EMA_ENTRIES + PLAIN_ENTRIES
    assert STRIPPABLE_PREFIXES == ("module.", "_orig_mod.")


def test_is_state_dict() -> None:
    assert is_state_dict({"a": torch.zeros(1)}) and is_state_dict(OrderedDict(b=torch.zeros(0)))
    assert not is_state_dict({}) and not is_state_dict([torch.zeros(1)])
    assert not is_state_dict({"a": torch.zeros(1), 1: torch.zeros(1)})
    assert not is_state_dict({"a": torch.zeros(1), "b": 1})


def test_type_name() -> None:
    assert type_name(None) == "None" and type_name(3) == "a int" and type_name([]) == "a list"


def test_why_not_state_dict() -> None:
    assert why_not_state_dict({"a": 1}) is None  # no tensor at all: not a would-be state dict
    assert why_not_state_dict([torch.zeros(1)]) is None
    assert why_not_state_dict({"a": torch.zeros(1)}) is None
    assert why_not_state_dict({"a": torch.zeros(1), 3: torch.zeros(1)}) == "its key 3 is a int, not a string"
    assert why_not_state_dict({"a": torch.zeros(1), "b": None}) == "key b holds None, not a tensor"
    assert why_not_state_dict({"b": [1], "a": torch.zeros(1)}) == "key b holds a list, not a tensor"
    assert why_not_state_dict({("t",): torch.zeros(1)}) == "its key ('t',) is a tuple, not a string"


@pytest.mark.parametrize("entry", CONTAINER_ENTRIES)
def test_each_entry_is_found(entry: str) -> None:
    chosen, value, notes = pick_entry({"epoch": 1, entry: SD}, None, P)
    assert (chosen, value, notes) == (entry, SD, (f"used entry {entry!r}",))


def test_ema_comes_first_and_the_note_names_the_plain_weights() -> None:
    raw = {"state_dict": SD, "model": SD, "model_ema": SD}
    assert pick_entry(raw, None, P)[0] == "model_ema"
    assert pick_entry(raw, None, P)[2] == ("used EMA weights from 'model_ema' (also present: 'state_dict'; "
                                           "pick it with --entry state_dict)",)
    raw = {"model": SD, "ema": SD, "state_dict_ema": SD}
    assert pick_entry(raw, None, P)[2] == ("used EMA weights from 'ema' (also present: 'model'; pick it with "
                                           "--entry model)",)
    raw = {"ema": SD, "state_dict_ema": SD}  # EMA only: the plain note
    assert pick_entry(raw, None, P) == ("ema", SD, ("used entry 'ema'",))
    raw = {"state_dict": SD, "model": SD}  # plain first: no EMA note
    assert pick_entry(raw, None, P) == ("state_dict", SD, ("used entry 'state_dict'",))


def test_a_module_entry_is_usable() -> None:
    module = nn.Linear(1, 1)
    assert pick_entry({"model": module, "state_dict": {"x": 1}}, None, P)[:2] == ("model", module)


def test_unusable_entries_are_skipped() -> None:
    assert pick_entry({"ema": {}, "state_dict": SD}, None, P)[0] == "state_dict"
    assert pick_entry({"ema": None, "model": SD}, None, P)[0] == "model"


def test_an_explicit_entry() -> None:
    raw = {"ema": SD, "weights": {"x": 1}}
    assert pick_entry(raw, "weights", P) == ("weights", {"x": 1}, ("used entry 'weights' (--entry)",))
    with pytest.raises(InputError) as info:
        pick_entry(raw, "nope", P)
    assert info.value.message == "ck.pt has no entry 'nope'; it has: ema, weights"
    with pytest.raises(InputError) as info:
        pick_entry({"ema": None, 5: 1}, "ema", P)
    assert info.value.message == "ck.pt: entry 'ema' is None"
    with pytest.raises(InputError) as info:
        pick_entry({5: 1}, "x", P)
    assert info.value.message == "ck.pt has no entry 'x'; it has: 5"


def test_no_usable_entry_in_words() -> None:
    with pytest.raises(InputError) as info:
        pick_entry({"w": torch.zeros(1), "n": 3}, None, P)
    assert info.value.message == "ck.pt: the file is not a state dict: key n holds a int, not a tensor"
    with pytest.raises(InputError) as info:
        pick_entry({"epoch": 1, "model": {"w": torch.zeros(1), 7: torch.zeros(1)}}, None, P)
    assert info.value.message == "ck.pt: entry 'model' is not a state dict: its key 7 is a int, not a string"
    with pytest.raises(InputError) as info:
        pick_entry({"epoch": 1, "ema": {"a": 1}, "state_dict": {"w": torch.zeros(1), "b": "x"}}, None, P)
    assert info.value.message == "ck.pt: entry 'state_dict' is not a state dict: key b holds a str, not a tensor"
    with pytest.raises(InputError) as info:
        pick_entry({}, None, P)
    assert info.value.message == "ck.pt holds an empty dict: no weights"
    keys = {f"k{i}": i for i in range(14)}
    with pytest.raises(InputError) as info:
        pick_entry(keys, None, P)
    assert info.value.message == "ck.pt holds no state dict: top-level keys are " + ", ".join(f"k{i}" for i in range(12))
    assert info.value.hint == "pass --entry NAME to pick the entry that holds the weights"
    with pytest.raises(InputError) as info:
        pick_entry({1: "a"}, None, P)
    assert info.value.message == "ck.pt holds no state dict: top-level keys are 1"


def test_strip_prefixes() -> None:
    t1, t2 = torch.zeros(1), torch.ones(1)
    state, stripped = strip_prefixes(OrderedDict([("module.a", t1), ("module.b", t2)]))
    assert list(state) == ["a", "b"] and state["a"] is t1 and stripped == ("module.",)
    state, stripped = strip_prefixes({"module._orig_mod.module.x": t1, "module._orig_mod.module.y": t2})
    assert list(state) == ["x", "y"] and stripped == ("module.", "_orig_mod.", "module.")
    state, stripped = strip_prefixes({"_orig_mod.x": t1})
    assert list(state) == ["x"] and stripped == ("_orig_mod.",)


def test_prefixes_that_not_every_key_has_or_that_would_empty_a_key_stay() -> None:
    t = torch.zeros(1)
    state, stripped = strip_prefixes(OrderedDict([("module.a", t), ("b", t)]))
    assert list(state) == ["module.a", "b"] and stripped == ()
    assert type(state) is OrderedDict
    state, stripped = strip_prefixes({"module.": t, "module.b": t})
    assert list(state) == ["module.", "module.b"] and stripped == ()
    state, stripped = strip_prefixes({"module.module.": t})
    assert list(state) == ["module."] and stripped == ("module.",)
    assert strip_prefixes({}) == (OrderedDict(), ())


def test_prefix_notes() -> None:
    assert prefix_notes(("module.", "_orig_mod.")) == ("stripped key prefix 'module.'",
                                                       "stripped key prefix '_orig_mod.'")
    assert prefix_notes(()) == ()

"""repvgg_cli.io.unpickle, to the letter (issue 15: mutation score of the io layer).

What the pickle sniffers say about each kind of stream, each refusal in its words (the CLI's
one-line errors), how torch's errors are described, the safe_globals list set aside and put
back, and which ``torch.load`` call each kind of file gets.
"""

from __future__ import annotations

import pickle
import pickletools
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from repvgg_cli.errors import InputError, PickleRefusedError
from repvgg_cli.io import unpickle as up
from repvgg_cli.io.unpickle import (
    TORCH_MAGIC,
    PickleStart,
    first_pickle,
    old_protocol_error,
    pickle_stream_protocol,
    torch_load,
    warnings_as_notes,
)


def test_the_magic_number() -> None:
    assert TORCH_MAGIC == 0x1950A86A20F9469CFC6C == 119547037146038801333356


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_first_pickle_of_torchs_magic_number(protocol: int) -> None:
    data = pickle.dumps(TORCH_MAGIC, protocol=protocol)
    start = first_pickle(data + b"more")
    expected = protocol if protocol >= 2 else 0  # protocol 1 writes a long int with LONG, a protocol 0 opcode
    assert start == PickleStart(expected, True, len(data))


@pytest.mark.parametrize("protocol", [0, 1, 2, 4])
def test_first_pickle_of_other_values(protocol: int) -> None:
    for value in (TORCH_MAGIC + 1, [TORCH_MAGIC], "x", (TORCH_MAGIC, 1)):
        start = first_pickle(pickle.dumps(value, protocol=protocol))
        assert start is not None and start.torch_magic is False, value
        assert start.protocol == protocol or protocol == 1 and start.protocol == 0, value


def test_first_pickle_of_a_small_int_magic_check_uses_the_value() -> None:
    assert first_pickle(pickle.dumps(5, protocol=2)).torch_magic is False
    assert first_pickle(b"I119547037146038801333356\n.").torch_magic is True  # INT opcode, protocol 0
    assert first_pickle(b"I119547037146038801333356\n.").protocol == 0


def test_first_pickle_protocol_without_proto_is_what_the_opcodes_need() -> None:
    assert first_pickle(b"N.").protocol == 0  # NONE: protocol 0
    assert first_pickle(b"K\x05.").protocol == 1  # BININT1: protocol 1
    assert first_pickle(b"\x88.") .protocol == 1  # NEWTRUE is protocol 2, counted as 1 without PROTO
    assert first_pickle(b"\x80\x03\x88.").protocol == 3


def test_memo_opcodes_do_not_count_as_values() -> None:
    data = b"\x80\x02\x8a\x0a" + TORCH_MAGIC.to_bytes(10, "little") + b"q\x00."  # LONG1 then BINPUT 0
    assert first_pickle(data) == PickleStart(2, True, len(data))
    data = b"\x80\x02\x8a\x0a" + TORCH_MAGIC.to_bytes(10, "little") + b"r\x00\x00\x00\x00."  # LONG_BINPUT
    assert first_pickle(data).torch_magic is True
    data = b"\x80\x04\x95\x0c\x00\x00\x00\x00\x00\x00\x00\x8a\x0a" + TORCH_MAGIC.to_bytes(10, "little") + b"\x94."
    assert first_pickle(data).torch_magic is True  # FRAME and MEMOIZE
    data = b"\x80\x02\x8a\x0a" + TORCH_MAGIC.to_bytes(10, "little") + b"p0\n."  # PUT
    assert first_pickle(data).torch_magic is True


@pytest.mark.parametrize("data", [b"", b"hello world", b"\x80", b"\x80\x02", pickle.dumps([1, 2, 3])[:-3],
                                  b"\xff\xfe", b"S'unterminated"])
def test_first_pickle_of_what_is_no_whole_pickle(data: bytes) -> None:
    assert first_pickle(data) is None


def test_pickle_stream_protocol() -> None:
    assert pickle_stream_protocol(b"\x80\x05rest") == 5
    assert pickle_stream_protocol(b"\x80\x02") == 2
    assert pickle_stream_protocol(b"(dp0\nS'a'\np1\nI1\ns.") == 0
    assert pickle_stream_protocol(b"}q\x00(X\x01\x00\x00\x00aK\x01u.") == 1
    assert pickle_stream_protocol(b"N.K\x01.") == 0  # up to the first STOP
    assert pickle_stream_protocol(b"NK\x01") == 1  # no STOP: to the end
    assert pickle_stream_protocol(b"N") == 0
    assert pickle_stream_protocol(b"") is None
    assert pickle_stream_protocol(b"\x80") is None  # a PROTO without its argument
    assert pickle_stream_protocol(b"\xff") is None


def test_old_protocol_errors_in_words(tmp_path: Path) -> None:
    p = tmp_path / "old.pt"
    assert old_protocol_error(p, 2, False) is None and old_protocol_error(p, 5, True) is None
    zero = old_protocol_error(p, 0, True)
    assert type(zero) is InputError
    assert zero.message == (f"{p} was written with pickle protocol 0 (torch.save(..., pickle_protocol=0)), which "
                            "torch.load cannot read back, not even with full unpickling")
    assert zero.hint == ("re-save the weights from the code that wrote them with torch.save's default protocol, "
                         "or as safetensors")
    assert old_protocol_error(p, 0, False).message == zero.message
    assert old_protocol_error(p, 1, True) is None
    one = old_protocol_error(p, 1, False)
    assert type(one) is PickleRefusedError
    assert one.message == (f"{p} was written with pickle protocol 1 (torch.save(..., pickle_protocol=1)); torch's "
                           "safe loader reads protocol 2 and later only")
    assert one.hint == ("re-save it with torch.save's default protocol, or, if you trust this file, pass "
                        "--allow-pickle (it is then fully unpickled)")


def test_warnings_become_notes_once_each_in_order() -> None:
    notes = ["earlier"]
    with warnings_as_notes(notes):
        warnings.warn("first line\nsecond line", UserWarning)
        warnings.warn("again", DeprecationWarning)
        warnings.warn("first line\nsecond line", UserWarning)
    assert notes == ["earlier", "while loading: UserWarning: first line",
                     "while loading: DeprecationWarning: again"]


def test_warnings_are_collected_even_when_the_block_raises() -> None:
    notes: list[str] = []
    with pytest.raises(ValueError):
        with warnings_as_notes(notes):
            warnings.warn("w", RuntimeWarning)
            raise ValueError("x")
    assert notes == ["while loading: RuntimeWarning: w"]


def test_ignored_warnings_stay_ignored_and_errors_still_raise() -> None:
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with warnings_as_notes(notes):
            warnings.warn("quiet", UserWarning)
    assert notes == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(UserWarning):
            with warnings_as_notes(notes):
                warnings.warn("loud", UserWarning)


@pytest.mark.parametrize(("text", "said"), [
    ("Weights only load failed. Unsupported global: GLOBAL os.system was not an allowed global.",
     "a pickled object of type os.system"),
    ("Unsupported global: builtins.eval, more", "a pickled object of type builtins.eval"),
    ("Trying to load GLOBAL mod.Thing.", "a pickled object of type mod.Thing"),
    ("Weights only load failed. blah\nWeightsUnpickler error: \n  Unsupported operand 73\nmore",
     "pickled data the safe loader refuses (Unsupported operand 73)"),
    ("plain reason", "pickled data the safe loader refuses (plain reason)"),
    ("", "pickled data the safe loader refuses (UnpicklingError)"),
    ("x" * 200, "pickled data the safe loader refuses (" + "x" * 120 + ")"),
])
def test_describe_unpickling_failure(text: str, said: str) -> None:
    assert up._describe_unpickling_failure(pickle.UnpicklingError(text)) == said


def test_unsupported_opcode() -> None:
    frame = up._unsupported_opcode(pickle.UnpicklingError("WeightsUnpickler error: Unsupported operand 149."))
    assert frame is not None and frame.name == "FRAME" and frame.proto == 4
    assert up._unsupported_opcode(pickle.UnpicklingError("Unsupported operand 73 x")).name == "INT"
    assert up._unsupported_opcode(pickle.UnpicklingError("Unsupported operand 255")) is None  # no such opcode
    assert up._unsupported_opcode(pickle.UnpicklingError("Unsupported operand 256")) is None
    assert up._unsupported_opcode(pickle.UnpicklingError("Unsupported operand abc")) is None
    assert up._unsupported_opcode(pickle.UnpicklingError("something else")) is None
    assert up._unsupported_opcode(pickle.UnpicklingError("Unsupported operand 0")) is None
    assert [op.name for op in pickletools.opcodes if ord(op.code) == 40] == ["MARK"]
    assert up._unsupported_opcode(pickle.UnpicklingError("Unsupported operand 40,")).name == "MARK"


class _Allowed:
    pass


def test_safe_globals_are_set_aside_and_put_back(tmp_path: Path) -> None:
    serialization = torch.serialization
    serialization.add_safe_globals([_Allowed])
    try:
        with up._user_safe_globals_ignored(tmp_path / "x.pt"):
            assert serialization.get_safe_globals() == []
        assert _Allowed in serialization.get_safe_globals()
        with pytest.raises(RuntimeError):
            with up._user_safe_globals_ignored(tmp_path / "x.pt"):
                raise RuntimeError("load failed")
        assert _Allowed in serialization.get_safe_globals()
    finally:
        serialization.clear_safe_globals()
    with up._user_safe_globals_ignored(tmp_path / "x.pt"):
        pass
    assert serialization.get_safe_globals() == []


def test_a_list_that_cannot_be_emptied_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.serialization, "clear_safe_globals", lambda: None)
    monkeypatch.setattr(torch.serialization, "get_safe_globals", lambda: [_Allowed])
    added = []
    monkeypatch.setattr(torch.serialization, "add_safe_globals", lambda values: added.append(values))
    with pytest.raises(InputError) as info:
        with up._user_safe_globals_ignored(tmp_path / "x.pt"):
            pytest.fail("the load must not run")
    assert info.value.message == (f"{tmp_path / 'x.pt'} was not read: torch's safe_globals allow-list could not be "
                                  "emptied for a safe load")
    assert added == [[_Allowed]]


def test_without_safe_globals_support_the_load_just_runs(tmp_path: Path, monkeypatch) -> None:
    for name in ("get_safe_globals", "clear_safe_globals", "add_safe_globals"):
        with monkeypatch.context() as patch:
            patch.delattr(torch.serialization, name)
            ran = []
            with up._user_safe_globals_ignored(tmp_path / "x.pt"):
                ran.append(True)
            assert ran == [True]


# -- which torch.load -------------------------------------------------------------------------------


def _spy(monkeypatch) -> list:
    calls = []
    real = torch.load

    def load(f, **kwargs):
        calls.append((type(f).__name__, kwargs))
        return real(f, **kwargs)

    monkeypatch.setattr(up.torch, "load", load)
    return calls


def test_each_kind_of_file_gets_its_load(tmp_path: Path, monkeypatch) -> None:
    state = {"w": torch.arange(3.0)}
    named = tmp_path / "x.safetensors"
    torch.save(state, named)
    plain = tmp_path / "x.pt"
    torch.save(state, plain)
    calls = _spy(monkeypatch)
    assert torch.equal(up._load_torch_file(named, weights_only=True, mmap=True)["w"], state["w"])
    assert calls[-1] == ("BufferedReader", {"map_location": "cpu", "weights_only": True, "mmap": False})
    up._load_torch_file(plain, weights_only=False, mmap=False)
    assert calls[-1] == ("str", {"map_location": "cpu", "weights_only": False, "mmap": False})
    up._load_torch_file(plain, weights_only=True, mmap=True)
    assert calls[-1] == ("str", {"map_location": "cpu", "weights_only": True, "mmap": True})


def test_a_mapped_load_is_private(tmp_path: Path, monkeypatch) -> None:
    plain = tmp_path / "x.pt"
    torch.save({"w": torch.arange(3.0)}, plain)
    seen = []
    real = torch.serialization.set_default_mmap_options

    def options(flags):
        seen.append(flags)
        return real(flags)

    monkeypatch.setattr(torch.serialization, "set_default_mmap_options", options)
    up._load_torch_file(plain, weights_only=True, mmap=True)
    import mmap

    assert seen == [mmap.MAP_PRIVATE]
    up._load_torch_file(plain, weights_only=True, mmap=False)
    assert seen == [mmap.MAP_PRIVATE]
    monkeypatch.delattr(torch.serialization, "set_default_mmap_options")
    assert up._load_torch_file(plain, weights_only=True, mmap=True)["w"].shape == (3,)


def test_torch_load_safe_and_allowed(tmp_path: Path, monkeypatch) -> None:
    state = OrderedDict(w=torch.arange(3.0))
    path = tmp_path / "x.pt"
    torch.save(state, path)
    calls = _spy(monkeypatch)
    value, pickled = torch_load(path, allow_pickle=True, mmap=True)
    assert pickled is False and torch.equal(value["w"], state["w"])
    assert calls == [("str", {"map_location": "cpu", "weights_only": True, "mmap": True})]
    torch_load(path, allow_pickle=False)
    assert calls[-1][1]["mmap"] is False


class Payload:
    def __init__(self) -> None:
        self.x = 1


def test_a_pickled_object_is_refused_then_loaded_when_allowed(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "obj.pt"
    torch.save({"p": Payload()}, path)
    with pytest.raises(PickleRefusedError) as info:
        torch_load(path, allow_pickle=False)
    assert info.value.message == (f"{path} holds a pickled object of type {__name__}.Payload; loading it would "
                                  "run code from the file")
    assert info.value.hint == "if you trust this file, pass --allow-pickle (see README: Safety)"
    assert info.value.__suppress_context__
    calls = _spy(monkeypatch)
    value, pickled = torch_load(path, allow_pickle=True, mmap=True)
    assert pickled is True and value["p"].x == 1
    assert calls[-1] == ("str", {"map_location": "cpu", "weights_only": False, "mmap": True})


def test_an_unsupported_opcode_is_named_unless_allowed(tmp_path: Path) -> None:
    path = tmp_path / "p4.pt"
    torch.save({"w": torch.zeros(1)}, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    try:
        torch_load(path, allow_pickle=False)
    except PickleRefusedError as error:
        assert error.message == (f"{path} uses pickle opcode FRAME (pickle protocol 4 and later), which torch's "
                                 "safe loader does not read")
        assert error.hint == ("re-save it with torch.save's default pickle protocol, or, if you trust this file, "
                              "pass --allow-pickle (it is then fully unpickled)")
        assert error.__suppress_context__
    else:  # a torch whose safe loader reads FRAME: nothing to name
        pass
    value, _ = torch_load(path, allow_pickle=True)
    assert torch.equal(value["w"], torch.zeros(1))


def test_other_load_errors_in_words(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(InputError) as info:
        torch_load(path, allow_pickle=False)
    assert type(info.value) is InputError and info.value.message.startswith(f"{path} is not a readable torch checkpoint: ")
    assert info.value.__suppress_context__

    def refuse(p, weights_only, mmap):
        raise InputError("inner")

    monkeypatch.setattr(up, "_load_torch_file", refuse)
    with pytest.raises(InputError) as info:
        torch_load(path, allow_pickle=False)
    assert info.value.message == "inner"


def test_a_failed_allowed_unpickle_in_words(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "x.pt"

    def load(p, weights_only, mmap):
        if weights_only:
            raise pickle.UnpicklingError("Unsupported global: GLOBAL evil.thing")
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(up, "_load_torch_file", load)
    with pytest.raises(InputError) as info:
        torch_load(path, allow_pickle=True)
    assert type(info.value) is InputError and info.value.message == f"{path}: unpickling failed: boom"
    assert info.value.__suppress_context__


# -- more of the same, to the letter ---------------------------------------------------------------------


def test_the_magic_number_in_a_long4_is_torchs() -> None:
    # LONG4 (a 4-byte length) holds any long; pickle writes the magic number with LONG1, a crafted file may not
    data = b"\x80\x02\x8b\x0a\x00\x00\x00" + TORCH_MAGIC.to_bytes(10, "little") + b"."
    assert first_pickle(data) == PickleStart(2, True, len(data))


def test_a_stream_without_proto_counts_a_protocol_2_opcode_as_1() -> None:
    assert pickle_stream_protocol(b"\x88.") == 1  # NEWTRUE (protocol 2) without PROTO: "binary", i.e. 1
    assert pickle_stream_protocol(b"N\x89.") == 1  # NEWFALSE after NONE


@pytest.mark.parametrize(("text", "said"), [
    # the name is the word right after the first marker, whatever follows it
    ("Unsupported global: GLOBAL Unsupported global: GLOBAL x.y", "a pickled object of type Unsupported"),
    ("GLOBAL GLOBAL x.y", "a pickled object of type GLOBAL"),
    ("Unsupported global: GLOBAL a.b was not allowed; Unsupported global: GLOBAL c.d",
     "a pickled object of type a.b"),
    # only dots and commas are trimmed from the name
    ("Unsupported global: GLOBAL mod.BOX.", "a pickled object of type mod.BOX"),
    ("Unsupported global: GLOBAL mod.X, more", "a pickled object of type mod.X"),
    # the reason is what follows the first "WeightsUnpickler error:"
    ("Weights only load failed.\nWeightsUnpickler error: first WeightsUnpickler error: second",
     "pickled data the safe loader refuses (first WeightsUnpickler error: second)"),
])
def test_describe_unpickling_failure_takes_the_first_marker(text: str, said: str) -> None:
    assert up._describe_unpickling_failure(pickle.UnpicklingError(text)) == said


def test_unsupported_opcode_is_the_word_after_the_first_marker() -> None:
    assert up._unsupported_opcode(pickle.UnpicklingError("Unsupported operand Unsupported operand 73")) is None
    assert up._unsupported_opcode(pickle.UnpicklingError("Unsupported operand 73 and Unsupported operand 149")).name == "INT"
    assert up._unsupported_opcode(pickle.UnpicklingError("Unsupported operand 73X")) is None  # not a number
    assert up._unsupported_opcode(pickle.UnpicklingError("Unsupported operand 149.,")).name == "FRAME"


def test_a_list_that_cannot_be_emptied_names_the_file_in_torch_load(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(1)}, path)
    monkeypatch.setattr(torch.serialization, "clear_safe_globals", lambda: None)
    monkeypatch.setattr(torch.serialization, "get_safe_globals", lambda: [_Allowed])
    monkeypatch.setattr(torch.serialization, "add_safe_globals", lambda values: None)
    with pytest.raises(InputError) as info:
        torch_load(path, allow_pickle=False)
    assert info.value.message == (f"{path} was not read: torch's safe_globals allow-list could not be emptied for a "
                                  "safe load")


def test_an_unreadable_torch_file_names_the_reason(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "bad.pt"

    def broken(p, weights_only, mmap):
        raise RuntimeError("PytorchStreamReader failed\nsecond line")

    monkeypatch.setattr(up, "_load_torch_file", broken)
    with pytest.raises(InputError) as info:
        torch_load(path, allow_pickle=False)
    assert info.value.message == f"{path} is not a readable torch checkpoint: PytorchStreamReader failed"

"""Broken checkpoints, fuzzed: every one must fail cleanly, name what is wrong, and lose nothing.

More than 500 broken inputs are made from the bundled samples (seeded, so the same ones every run):
truncations, byte flips, files that are not checkpoints, hand-written safetensors headers,
containers holding the wrong things, tensors of the wrong rank, dtype or value, blocks with branches
that disagree, half a block, two families under one prefix, and deploy files whose recorded
metadata is malformed. Each goes through the library entry points (``load_checkpoint`` +
``summarize``, ``convert_file``, ``verify_file``); a sample of 40 goes through the CLI as well.

The contract checked for every input:
- a failure is a :class:`RepvggError` with exit code 2 or 3 (never another exception type), its
  message is one line and names the file, and - where there is one - the block and the key;
- a failed convert leaves no output and no temporary file in the folder;
- the source's bytes (sha256) never change;
- the CLI exits with the library's code and prints exactly the library's message as its one
  ``Error:`` line, with no traceback.

Some byte flips leave a file that is still a valid checkpoint (a flipped mantissa bit is just
another weight): those may convert, and then the output must verify.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import struct
import zipfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save

from repvgg_cli.api import convert_file, verify_file
from repvgg_cli.io.metadata import METADATA_KEY
from repvgg_cli.io.read import load_checkpoint
from repvgg_cli.errors import RepvggError
from repvgg_cli.inspection import summarize
from tests.helpers import invoke, SAMPLES

SAMPLE_FILES = ["plain_net.pt", "plain_net_train.pt", "plain_net.safetensors",
                "repvgg_tiny.pt", "repvgg_tiny_train.pt", "repvgg_tiny.safetensors"]
SEED = 20250607


@dataclass(frozen=True)
class Case:
    """One broken input.

    Attributes:
        category: what kind of damage (the report counts by it).
        label: a unique, readable name.
        filename: the name the file gets (its suffix matters to nobody but humans).
        data: the file's bytes.
        must_fail: False where the damage may leave a valid checkpoint (random byte flips).
        may_convert: the damage is only in what ``verify`` reads (a deploy file's metadata missing a
            field): inspect and convert may still read the file, verify must refuse it.
        names: what every error message about it must name besides the file (block, key).
        base: the sample whose deploy file ``verify --against`` this input is checked with.
    """

    category: str
    label: str
    filename: str
    data: bytes
    must_fail: bool = True
    names: tuple[str, ...] = ()
    base: str | None = None
    may_convert: bool = False


# -- building blocks ---------------------------------------------------------------------------


def torch_bytes(obj: object, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def safetensors_bytes(state) -> bytes:
    return safetensors_save({k: v.contiguous() for k, v in state.items()})


def raw_safetensors(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file with a hand-written header (a dict/list is JSON-encoded; bytes are kept)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def safetensors_header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def sample_state(name: str) -> "OrderedDict[str, torch.Tensor]":
    return torch.load(SAMPLES / f"{name}.pt", map_location="cpu", weights_only=True)


ROLES = {
    # sample -> (block anchor, {role: local module name})
    "plain_net": ("conv3x3.weight", {"dense": "conv3x3", "point": "conv1x1", "dense_bn": "bn3x3",
                                     "point_bn": "bn1x1", "id": "identity"}),
    "repvgg_tiny": ("rbr_dense.conv.weight", {"dense": "rbr_dense.conv", "point": "rbr_1x1.conv",
                                              "dense_bn": "rbr_dense.bn", "point_bn": "rbr_1x1.bn",
                                              "id": "rbr_identity"}),
}


def blocks_of(sample: str, state) -> list[str]:
    anchor = "." + ROLES[sample][0]
    return [k[: -len(anchor)] for k in state if k.endswith(anchor)]


def has_identity(state, block: str, sample: str) -> bool:
    return f"{block}.{ROLES[sample][1]['id']}.running_var" in state


def in_layout(sample: str, state, layout: str) -> tuple[str, bytes]:
    """The state written as a bare ``.pt``, a training container with ``module.``, or safetensors."""
    if layout == "pt":
        return f"{sample}.pt", torch_bytes(state)
    if layout == "train":
        model = OrderedDict((f"module.{k}", v) for k, v in state.items())
        return f"{sample}_train.pt", torch_bytes({"model": model, "optimizer": {"state": {}}, "epoch": 7})
    return f"{sample}.safetensors", safetensors_bytes(state)


# -- categories --------------------------------------------------------------------------------


def truncation_cases(rng: random.Random, sources: dict[str, bytes]) -> list[Case]:
    cases = []
    for name, data in sources.items():
        n = len(data)
        offsets = {1, 4, 7, 8, 9, 16, 64, 100, 512, n // 4, n // 2, 3 * n // 4, n - 100, n - 22, n - 8, n - 1}
        if name.endswith(".safetensors"):
            end = 8 + safetensors_header_length(data)
            offsets |= {end - 1, end, end + 1, end + 4}
        offsets |= {rng.randrange(1, n) for _ in range(8)}
        for cut in sorted(o for o in offsets if 0 < o < n):
            cases.append(Case("truncated", f"{name}[:{cut}]", name, data[:cut]))
    return cases


def header_range(name: str, data: bytes) -> list[tuple[int, int]]:
    """Where a format keeps its structure: safetensors' JSON header; a zip's pickle, directory."""
    if name.endswith(".safetensors"):
        return [(0, 8 + safetensors_header_length(data))]
    if data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pkl = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
        start = pkl.header_offset
        directory = data.rfind(b"PK\x01\x02", 0, len(data))  # last central directory record
        return [(start, start + 30 + len(pkl.filename) + pkl.file_size), (directory - 2000, len(data))]
    return [(0, min(len(data), 4096))]  # legacy: the pickles come first


def data_range(name: str, data: bytes) -> tuple[int, int]:
    if name.endswith(".safetensors"):
        return 8 + safetensors_header_length(data), len(data)
    head = header_range(name, data)
    return head[0][1], (head[-1][0] if data[:2] == b"PK" else len(data))


def flip_cases(rng: random.Random, sources: dict[str, bytes]) -> list[Case]:
    cases = []
    for name, data in sources.items():
        if name == "repvgg_tiny_train.pt":
            continue  # the largest sample: flips in it find nothing its .pt sibling does not, slowly
        ranges = header_range(name, data)
        for i in range(10):
            start, stop = ranges[i % len(ranges)]
            at = rng.randrange(max(start, 0), stop)
            flipped = bytearray(data)
            flipped[at] ^= rng.randrange(1, 256)
            cases.append(Case("flipped-header", f"{name}@{at}^{i}", name, bytes(flipped), must_fail=False))
        start, stop = data_range(name, data)
        for i in range(4):
            flipped = bytearray(data)
            for at in rng.sample(range(start, stop), 3):
                flipped[at] ^= rng.randrange(1, 256)
            cases.append(Case("flipped-data", f"{name}@data{i}", name, bytes(flipped), must_fail=False))
    return cases


def not_checkpoint_cases(rng: random.Random, sources: dict[str, bytes]) -> list[Case]:
    def zipped(files: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, content in files.items():
                archive.writestr(name, content)
        return buffer.getvalue()

    png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(rng.randrange(256) for _ in range(200))
    entries = [
        ("empty.pt", b""),
        ("one-byte.pt", b"\x80"),
        ("csv.pt", b"epoch,loss\n1,0.53\n2,0.41\n"),
        ("readme.safetensors", b"# not a checkpoint\n" * 20),
        ("json.pt", json.dumps({"state_dict": {"w": [1, 2, 3]}}).encode()),
        ("yaml.pth", b"model:\n  depth: 3\n  width: [1, 2]\n"),
        ("nul.pt", b"\x00" * 4096),
        ("png.pt", png),
        ("png.safetensors", png),
        ("gzip.pt", b"\x1f\x8b\x08\x00" + bytes(rng.randrange(256) for _ in range(300))),
        ("elf.bin", b"\x7fELF\x02\x01\x01" + bytes(rng.randrange(256) for _ in range(500))),
        ("zip-text.pt", zipped({"hello.txt": b"hello"})),
        ("zip-png.pt", zipped({"images/a.png": png, "images/b.png": png})),
        ("zip-fake-pkl.pt", zipped({"archive/data.pkl": b"\x80\x02}q\x00.", "archive/version": b"3\n"})),
        ("zip-int-pkl.pt", zipped({"archive/data.pkl": b"\x80\x02K\x07.", "archive/version": b"3\n",
                                   "archive/byteorder": b"little"})),
        ("zip-garbage-pkl.pt", zipped({"archive/data.pkl": b"\x80\x02" + bytes(range(256)),
                                       "archive/version": b"3\n"})),
        ("pickle-int.pt", b"\x80\x02K\x07."),
        ("pickle-garbage.pt", b"\x80\x04\x95" + bytes(rng.randrange(256) for _ in range(64))),
        ("pickle-stop.pt", b"\x80\x02."),
        ("eight-bytes.safetensors", struct.pack("<Q", 2)),
    ]
    for i in range(6):
        data = bytearray(rng.randbytes(2048))
        if data[8] == ord("{"):
            data[8] = 0
        entries.append((f"random-{i}.pt", bytes(data)))
    # a safetensors sample's bytes with a torch suffix, and a torch sample's with a safetensors one
    entries.append(("plain_net-as.safetensors", sources["plain_net.pt"][: len(sources["plain_net.pt"]) // 3]))
    return [Case("not-a-checkpoint", name, name, data) for name, data in entries]


def safetensors_header_cases() -> list[Case]:
    f32 = lambda shape, start, stop: {"dtype": "F32", "shape": shape, "data_offsets": [start, stop]}  # noqa: E731
    data = bytes(64)
    entries: list[tuple[str, bytes]] = [
        ("huge-shape", raw_safetensors({"w": f32([2**40, 2**40], 0, 64)}, data)),
        ("overflowing-shape", raw_safetensors({"w": f32([2**62, 2**62, 16], 0, 64)}, data)),
        ("shape-and-size-disagree", raw_safetensors({"w": f32([4, 4], 0, 32)}, data[:32])),
        ("offset-past-the-end", raw_safetensors({"w": f32([16], 0, 10**9)}, data)),
        ("offsets-overlap", raw_safetensors({"a": f32([8], 0, 32), "b": f32([8], 16, 48)}, data[:48])),
        ("offsets-reversed", raw_safetensors({"w": f32([8], 32, 0)}, data[:32])),
        ("negative-offset", raw_safetensors({"w": f32([4], -16, 0)}, data[:16])),
        ("negative-shape", raw_safetensors({"w": f32([-1, 4], 0, 16)}, data[:16])),
        ("float-shape", raw_safetensors({"w": f32([2.5, 4], 0, 40)}, data[:40])),
        ("unknown-dtype", raw_safetensors({"w": {"dtype": "F17", "shape": [4], "data_offsets": [0, 16]}},
                                          data[:16])),
        ("dtype-missing", raw_safetensors({"w": {"shape": [4], "data_offsets": [0, 16]}}, data[:16])),
        ("shape-is-text", raw_safetensors({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}},
                                          data[:16])),
        ("offsets-too-short", raw_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0]}},
                                              data[:16])),
        ("entry-is-a-number", raw_safetensors({"w": 5})),
        ("not-json", raw_safetensors(b"{this is not json]")),
        ("truncated-json", raw_safetensors(b'{"w": {"dtype": "F32", "shape": [4], "data_of')),
        ("invalid-utf8", raw_safetensors(b'{"w\xff\xfe": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
                                         data[:16])),
        ("header-is-a-string", raw_safetensors(b'"{just a string}"    ')),
        ("header-longer-than-file", raw_safetensors({"w": f32([4], 0, 16)}, data[:16], length=4096)),
        ("header-length-huge", raw_safetensors({"w": f32([4], 0, 16)}, data[:16], length=2**63 - 1)),
        ("header-length-zero", raw_safetensors({"w": f32([4], 0, 16)}, data[:16], length=0)),
        ("header-length-odd", raw_safetensors({"w": f32([4], 0, 16)}, data[:16], length=37)),
        ("metadata-not-strings", raw_safetensors({"__metadata__": {"repvgg_cli": 5}, "w": f32([4], 0, 16)},
                                                 data[:16])),
        ("metadata-is-a-list", raw_safetensors({"__metadata__": ["a"], "w": f32([4], 0, 16)}, data[:16])),
        ("no-tensors", raw_safetensors({})),
        ("only-metadata", raw_safetensors({"__metadata__": {"format": "pt"}})),
        ("gap-before-data", raw_safetensors({"w": f32([4], 16, 32)}, data[:32])),
        ("trailing-bytes", raw_safetensors({"w": f32([4], 0, 16)}, data[:48])),
        ("data-missing", raw_safetensors({"w": f32([4], 0, 16)}, b"")),
        ("zero-size-with-data", raw_safetensors({"w": f32([0], 0, 16)}, data[:16])),
    ]
    return [Case("safetensors-header", name, f"{name}.safetensors", blob) for name, blob in entries]


def non_tensor_cases(states: dict[str, OrderedDict]) -> list[Case]:
    cases = []
    values = {"str": "weights", "list": [1.0, 2.0], "none": None, "int": 3, "float": 0.5, "dict": {"w": 1},
              "tuple": (torch.ones(2),), "bytes": b"\x00\x01"}
    for sample, state in states.items():
        block = blocks_of(sample, state)[1]
        roles = ROLES[sample][1]
        for i, (kind, value) in enumerate(list(values.items())[: 8 if sample == "plain_net" else 4]):
            key = f"{block}.{roles['dense' if i % 2 else 'point_bn']}.{'weight' if i % 2 else 'running_var'}"
            broken = OrderedDict(state)
            broken[key] = value
            cases.append(Case("non-tensor", f"{sample}:{key}={kind}", f"{sample}.pt", torch_bytes(broken),
                              names=(key,)))
            container = {"model": OrderedDict((f"module.{k}", v) for k, v in broken.items()), "epoch": 1}
            cases.append(Case("non-tensor", f"{sample}:train:{key}={kind}", f"{sample}_train.pt",
                              torch_bytes(container), names=(f"module.{key}",)))
    state = states["plain_net"]
    tensors = list(state.values())
    wrong_tops = {
        "list": tensors[:4], "tuple": tuple(tensors[:4]), "int": 7, "str": "plain_net", "none": None,
        "tensor": tensors[0], "empty-dict": {}, "int-keys": {i: t for i, t in enumerate(tensors[:4])},
        "mixed-keys": {**dict(list(state.items())[:3]), 5: tensors[0]},
        "model-none": {"model": None, "epoch": 3}, "model-str": {"model": "resnet50", "epoch": 3},
        "model-list": {"model": tensors[:3]}, "model-int": {"model": 12},
        "state_dict-empty": {"state_dict": {}, "epoch": 1}, "ema-none": {"ema": None, "model": None},
        "state_dict-nested": {"state_dict": {"model": {"w": "x"}}},
        "optimizer-only": {"optimizer": {"lr": 0.1}, "epoch": 2},
        "top-level-epoch": {**state, "epoch": 12},
    }
    for kind, value in wrong_tops.items():
        cases.append(Case("non-tensor", f"top:{kind}", f"{kind}.pt", torch_bytes(value)))
    return cases


def mutate(state, key: str, value: torch.Tensor) -> OrderedDict:
    broken = OrderedDict(state)
    broken[key] = value
    return broken


def block_tensor_cases(rng: random.Random, states: dict[str, OrderedDict]) -> list[Case]:
    """Wrong rank, wrong dtype, NaN/Inf, negative variance, disagreeing shapes, half blocks, two families."""
    cases: list[Case] = []
    layouts = ["st", "pt", "st", "train"]  # safetensors loads fastest; every layout is well represented

    def add(category: str, sample: str, label: str, broken, names: tuple[str, ...], st_ok: bool = True) -> None:
        layout = layouts[len(cases) % 4] if st_ok else ["pt", "train"][len(cases) % 2]
        filename, data = in_layout(sample, broken, layout)
        cases.append(Case(category, f"{sample}:{layout}:{label}", filename, data, names=names, base=sample))

    for sample, state in states.items():
        roles = ROLES[sample][1]
        blocks = blocks_of(sample, state)
        pick = lambda: rng.choice(blocks)  # noqa: E731
        # wrong rank of a conv weight or a BN vector
        for role, reshape in [("dense", lambda w: w.reshape(w.shape[0], -1)), ("point", lambda w: w[0, 0, 0, 0]),
                              ("dense", lambda w: w[..., None]), ("point", lambda w: w.reshape(-1)),
                              ("dense", lambda w: w[0])]:
            block = pick()
            key = f"{block}.{roles[role]}.weight"
            broken = mutate(state, key, reshape(state[key]).contiguous())
            add("wrong-rank", sample, f"{key}{tuple(broken[key].shape)}", broken, (block, key))
        for role, stat, reshape in [("dense_bn", "running_var", lambda v: v[None, :]),
                                    ("point_bn", "running_mean", lambda v: v[0]),
                                    ("dense_bn", "weight", lambda v: v.reshape(-1, 1, 1, 1)),
                                    ("point_bn", "bias", lambda v: v.reshape(2, -1))]:
            block = pick()
            key = f"{block}.{roles[role]}.{stat}"
            broken = mutate(state, key, reshape(state[key]).contiguous())
            add("wrong-rank", sample, f"{key}{tuple(broken[key].shape)}", broken, (block, key))
        # wrong dtype
        for role, part, dtype in [("dense", "weight", torch.int64), ("point", "weight", torch.int32),
                                  ("dense", "weight", torch.bool), ("point", "weight", torch.uint8),
                                  ("dense", "weight", torch.complex64), ("dense_bn", "running_var", torch.int64),
                                  ("point_bn", "running_mean", torch.bool), ("dense_bn", "weight", torch.complex64),
                                  ("point_bn", "bias", torch.int16), ("dense", "weight", torch.int8),
                                  ("point_bn", "running_var", torch.uint8)]:
            block = pick()
            key = f"{block}.{roles[role]}.{part}"
            value = state[key] * 10
            broken = mutate(state, key, value.to(dtype) if dtype != torch.bool else value > 0)
            add("wrong-dtype", sample, f"{key}:{dtype}", broken, (block, key), st_ok=dtype != torch.complex64)
        # NaN / Inf in weights and BN statistics
        for role, part in [("dense", "weight"), ("point", "weight"), ("dense_bn", "weight"), ("dense_bn", "bias"),
                           ("point_bn", "running_mean"), ("point_bn", "running_var"), ("dense_bn", "running_var"),
                           ("point_bn", "weight")]:
            for bad in (float("nan"), float("inf"), float("-inf"))[: 3 if sample == "plain_net" else 1]:
                block = pick()
                key = f"{block}.{roles[role]}.{part}"
                value = state[key].clone()
                value.view(-1)[rng.randrange(value.numel())] = bad
                add("nan-inf", sample, f"{key}={bad}", mutate(state, key, value), (block, key))
        identity_blocks = [b for b in blocks if has_identity(state, b, sample)]
        for block in identity_blocks:
            key = f"{block}.{roles['id']}.running_var"
            value = state[key].clone()
            value[rng.randrange(value.numel())] = float("nan")
            add("nan-inf", sample, f"{key}=nan", mutate(state, key, value), (block, key))
        # negative running variance
        for i, role in enumerate(["dense_bn", "point_bn", "dense_bn", "point_bn"] + ["id"] * len(identity_blocks)):
            block = identity_blocks[i - 4] if role == "id" else pick()
            key = f"{block}.{roles[role]}.running_var"
            value = state[key].clone()
            value[rng.randrange(value.numel())] = -abs(float(value[0])) - 0.25 * (i + 1)
            add("negative-variance", sample, key, mutate(state, key, value), (block, key))
        # branches whose shapes disagree
        for block in blocks[:2]:
            point, point_bn, dense = (f"{block}.{roles[r]}" for r in ("point", "point_bn", "dense"))
            w = state[f"{point}.weight"]
            more_out = OrderedDict(state)
            more_out[f"{point}.weight"] = torch.cat([w, w[:1]])
            for stat in ("weight", "bias", "running_mean", "running_var"):
                vector = state[f"{point_bn}.{stat}"]
                more_out[f"{point_bn}.{stat}"] = torch.cat([vector, vector[:1]])
            add("shape-mismatch", sample, f"{point}.weight:+1 out", more_out, (block, f"{point}.weight"))
            add("shape-mismatch", sample, f"{point}.weight:+1 out, BN not",
                mutate(state, f"{point}.weight", torch.cat([w, w[:1]])), (block, f"{point}.weight"))
            add("shape-mismatch", sample, f"{point}.weight:+1 in",
                mutate(state, f"{point}.weight", torch.cat([w, w[:, :1]], dim=1)), (block, f"{point}.weight"))
            add("shape-mismatch", sample, f"{point_bn}.running_mean:-1",
                mutate(state, f"{point_bn}.running_mean", state[f"{point_bn}.running_mean"][:-1].clone()),
                (block, f"{point_bn}.running_mean"))
            add("shape-mismatch", sample, f"{point}.weight:2x2",
                mutate(state, f"{point}.weight", w.repeat(1, 1, 2, 2)), (block,))
            add("shape-mismatch", sample, f"{dense}.weight:4x4",
                mutate(state, f"{dense}.weight", torch.nn.functional.pad(state[f"{dense}.weight"], (0, 1, 0, 1))),
                (block,))
            add("shape-mismatch", sample, f"{dense}.bias:wrong length",
                mutate(state, f"{dense}.bias", torch.zeros(w.shape[0] + 2)), (block, f"{dense}.bias"))
        for block in identity_blocks:
            key = f"{block}.{roles['id']}.running_var"
            broken = OrderedDict(state)
            for stat in ("weight", "bias", "running_mean", "running_var"):
                full = f"{block}.{roles['id']}.{stat}"
                broken[full] = torch.cat([state[full], state[full][:2]])
            add("shape-mismatch", sample, f"{block}.{roles['id']}:+2", broken, (block, f"{block}.{roles['id']}"))
        # half a block
        for i, block in enumerate(blocks[:3]):
            point_bn, dense_bn = f"{block}.{roles['point_bn']}", f"{block}.{roles['dense_bn']}"
            without_bn = OrderedDict((k, v) for k, v in state.items() if not k.startswith(point_bn + "."))
            add("half-block", sample, f"{point_bn} removed", without_bn, (block, point_bn))
            for stat in ("running_var", "running_mean", "weight", "bias"):
                bn = dense_bn if i % 2 else point_bn
                gone = f"{bn}.{stat}"
                add("half-block", sample, f"{gone} removed",
                    OrderedDict((k, v) for k, v in state.items() if k != gone), (block, gone))
        for block in identity_blocks:
            ident = f"{block}.{roles['id']}"
            only_var = OrderedDict((k, v) for k, v in state.items()
                                   if not k.startswith(ident + ".") or k.endswith("running_var"))
            add("half-block", sample, f"{ident}: only running_var", only_var, (block, f"{ident}.running_mean"))
        # two families under one prefix, and a half-converted block
        block = blocks[1]
        other = "repvgg_tiny" if sample == "plain_net" else "plain_net"
        other_roles = ROLES[other][1]
        both = OrderedDict(state)
        for role in ("dense", "point"):
            both[f"{block}.{other_roles[role]}.weight"] = state[f"{block}.{roles[role]}.weight"].clone()
        for role in ("dense_bn", "point_bn"):
            for stat in ("weight", "bias", "running_mean", "running_var"):
                both[f"{block}.{other_roles[role]}.{stat}"] = state[f"{block}.{roles[role]}.{stat}"].clone()
        add("two-families", sample, f"{block}: {sample} + {other} keys", both, (block,))
        half = OrderedDict(state)
        deploy_key = f"{block}.{'rbr_reparam.weight' if sample == 'repvgg_tiny' else 'weight'}"
        half[deploy_key] = state[f"{block}.{roles['dense']}.weight"].clone()
        add("two-families", sample, f"{block}: train + deploy keys", half, (block,))
        timm_too = OrderedDict(state)
        for timm, role in (("conv_kxk", "dense"), ("conv_1x1", "point")):
            timm_too[f"{block}.{timm}.conv.weight"] = state[f"{block}.{roles[role]}.weight"].clone()
            for stat in ("weight", "bias", "running_mean", "running_var"):
                timm_too[f"{block}.{timm}.bn.{stat}"] = state[f"{block}.{roles[role + '_bn']}.{stat}"].clone()
        add("two-families", sample, f"{block}: + timm conv_kxk/conv_1x1 keys", timm_too, (block,))
    return cases


def metadata_cases(deploys: dict[str, bytes]) -> list[Case]:
    """Deploy files whose recorded metadata is malformed (types, missing fields, bad probes)."""
    data = deploys["plain_net.safetensors"]
    length = safetensors_header_length(data)
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    original = json.loads(header["__metadata__"][METADATA_KEY])

    def with_metadata(edit) -> bytes:
        metadata = json.loads(json.dumps(original))
        edit(metadata)
        new = dict(header)
        new["__metadata__"] = {**header["__metadata__"], METADATA_KEY: json.dumps(metadata)}
        return raw_safetensors(new, body)

    def block(field, value):
        def edit(m):
            m["blocks"][1][field] = value
        return edit

    def drop(field):
        def edit(m):
            del m["blocks"][1][field]
        return edit

    def probe(field, value):
        def edit(m):
            m["blocks"][1]["probe"][field] = value
        return edit

    def top(field, value):
        def edit(m):
            m[field] = value
        return edit

    edits = {
        "blocks-is-a-dict": top("blocks", {"features.0": {}}),
        "blocks-is-a-string": top("blocks", "features.0"),
        "block-is-a-list": top("blocks", [[1, 2, 3]]),
        "tensors-is-a-list": top("tensors", ["features.0.weight"]),
        "tensors-hash-is-a-number": lambda m: m["tensors"].update({"features.0.weight": 5}),
        "options-is-a-string": top("options", "fast"),
        "bn_eps-is-a-string": lambda m: m["options"].update({"bn_eps": "1e-5"}),
        "no_identity-is-a-string": lambda m: m["options"].update({"no_identity": "stage*"}),
        "dropped_keys-is-a-dict": top("dropped_keys", {"a": 1}),
        "source-is-a-list": top("source", ["plain_net.pt"]),
        "deploy_prefix-missing": drop("deploy_prefix"),
        "name-missing": drop("name"),
        "out_channels-missing": drop("out_channels"),
        "probe-missing": drop("probe"),
        "kernel-missing": drop("kernel"),
        "name-is-a-number": block("name", 17),
        "out_channels-is-text": block("out_channels", "16"),
        "out_channels-is-bool": block("out_channels", True),
        "in_per_group-negative": block("in_per_group", -16),
        "kernel-is-text": block("kernel", "3x3"),
        "kernel-one-number": block("kernel", [3]),
        "padding-negative": block("padding", [-5, -5]),
        "dilation-zero": block("dilation", [0, 0]),
        "stride-zero": block("stride", [0, 0]),
        "groups-does-not-divide": block("groups", 3),
        "groups-zero-text": block("groups", "0"),
        "padding_mode-unknown": block("padding_mode", "mirror"),
        "branches-is-a-number": block("branches", 4),
        "rel_err-is-text": block("rel_err", "small"),
        "probe-is-a-string": block("probe", "seeded"),
        "probe-reference-not-base64": probe("reference", "%%% not base64 %%%"),
        "probe-reference-too-short": probe("reference", base64.b64encode(b"\x00" * 8).decode()),
        "probe-shape-wrong": probe("shape", [2, 3]),
        "probe-shape-negative": probe("shape", [-1, 16]),
        "probe-seed-is-text": probe("seed", "zero"),
        "probe-seed-is-float": probe("seed", 1.5),
    }
    return [Case("deploy-metadata", name, "deploy.safetensors", with_metadata(edit), names=("metadata",),
                 may_convert=name.endswith("-missing")) for name, edit in edits.items()]


# -- the corpus --------------------------------------------------------------------------------

EXPECTED_COUNTS = {
    "truncated": 176, "flipped-header": 60, "flipped-data": 24, "not-a-checkpoint": 27, "safetensors-header": 30,
    "non-tensor": 42, "wrong-rank": 18, "wrong-dtype": 22, "nan-inf": 36, "negative-variance": 12,
    "shape-mismatch": 32, "half-block": 34, "two-families": 6, "deploy-metadata": 36,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Every broken input, the deploy files ``verify --against`` compares with, and the seed's state."""
    rng = random.Random(SEED)
    sources = {name: (SAMPLES / name).read_bytes() for name in SAMPLE_FILES}
    sources["plain_net-legacy.pt"] = torch_bytes(sample_state("plain_net"), legacy=True)
    states = {name: sample_state(name) for name in ("plain_net", "repvgg_tiny")}
    folder = tmp_path_factory.mktemp("deploys")
    deploys = {}
    for name in states:
        convert_file(SAMPLES / f"{name}.pt", folder / f"{name}.safetensors")
        deploys[f"{name}.safetensors"] = (folder / f"{name}.safetensors").read_bytes()
    cases = (truncation_cases(rng, sources) + flip_cases(rng, sources) + not_checkpoint_cases(rng, sources)
             + safetensors_header_cases() + non_tensor_cases(states) + block_tensor_cases(rng, states)
             + metadata_cases(deploys))
    assert len({c.label for c in cases}) == len(cases), "labels must be unique"
    return {"cases": cases, "deploys": {name: folder / f"{name}.safetensors" for name in states}, "outcomes": {}}


# -- running one case --------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def error_problems(error: RepvggError, case: Case, path: Path, where: str) -> list[str]:
    """What is wrong with an error message; [] when it is what the contract asks for."""
    problems = []
    if error.exit_code not in (2, 3):
        problems.append(f"exit code {error.exit_code}")
    if "\n" in error.message or (error.hint and "\n" in error.hint):
        problems.append("more than one line")
    if str(path) not in error.message:
        problems.append("does not name the file")
    # a train-form file has no metadata for verify to check on its own: that message names no block
    names = case.names if case.base is None or where in ("convert", "verify --against") else ()
    for name in names:
        if name not in error.message:
            problems.append(f"does not name {name!r}")
    if not 0 < len(error.message) <= 600:
        problems.append(f"{len(error.message)} characters")
    return [f"{case.label}: {where}: {p}: {error.message!r}" for p in problems]


def run_library(case: Case, folder: Path, deploys: dict[str, Path], index: int) -> tuple[dict, list[str]]:
    """Run one case through every library entry point; return the outcomes and the contract breaches."""
    folder.mkdir()
    source = folder / case.filename
    source.write_bytes(case.data)
    digest = sha256(source)
    output = folder / ("out.safetensors" if index % 2 else "out.pt")
    outcome: dict[str, object] = {"source": source}
    bugs: list[str] = []

    def attempt(where: str, call):
        try:
            return call()
        except RepvggError as error:
            outcome[where] = error
            bugs.extend(error_problems(error, case, source, where))
        except Exception as error:  # noqa: BLE001 - anything else is the bug this test looks for
            outcome[where] = error
            bugs.append(f"{case.label}: {where}: {type(error).__name__}: {str(error)[:300]!r}")
        return None

    summary = attempt("inspect", lambda: summarize(load_checkpoint(source)))
    if summary is not None:
        outcome["inspect"] = summary
        bugs.extend(f"{case.label}: inspect problem is not one line: {p!r}" for p in summary.problems if "\n" in p)
    converted = attempt("convert", lambda: convert_file(source, output))
    if converted is not None:
        outcome["convert"] = converted
        if converted.written:
            if case.must_fail and not case.may_convert:
                bugs.append(f"{case.label}: convert accepted a broken input and wrote {output.name}")
            elif not verify_file(output).ok:
                bugs.append(f"{case.label}: convert wrote an output that does not verify")
        elif converted.result.ok:
            bugs.append(f"{case.label}: convert wrote nothing but reported success")
    if not (converted is not None and converted.written) and output.exists():
        bugs.append(f"{case.label}: a failed convert left {output.name}")
    expected_files = sorted([source.name] + ([output.name] if output.exists() else []))
    if sorted(os.listdir(folder)) != expected_files:
        bugs.append(f"{case.label}: files left behind: {sorted(os.listdir(folder))}")
    # verify on its own needs a deploy file's metadata: for a broken train-form file (base set) that
    # is a known "no metadata" refusal, so only files that stand for anything are checked on their own
    report = attempt("verify", lambda: verify_file(source)) if case.base is None else None
    if report is not None:
        outcome["verify"] = report
        if case.must_fail and report.ok:
            bugs.append(f"{case.label}: verify passed a broken input")
    if case.base is not None:
        against = attempt("verify --against", lambda: verify_file(deploys[case.base], against=source))
        if against is not None:
            outcome["verify --against"] = against
            if against.ok:
                bugs.append(f"{case.label}: verify --against passed a broken source")
    if sha256(source) != digest:
        bugs.append(f"{case.label}: the source changed")
    return outcome, bugs


# -- the tests ---------------------------------------------------------------------------------


def test_the_corpus_is_large_deterministic_and_covers_every_category(corpus) -> None:
    cases = corpus["cases"]
    counts = Counter(c.category for c in cases)
    print("\nfuzz corpus:", dict(counts), "total", len(cases))
    assert dict(counts) == EXPECTED_COUNTS
    assert len(cases) >= 500
    assert hashlib.sha256(b"".join(c.data for c in cases[:50])).hexdigest() == hashlib.sha256(
        b"".join(c.data for c in cases[:50])).hexdigest()


CATEGORIES = list(EXPECTED_COUNTS)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # a garbage pickle says it is protocol 4
@pytest.mark.parametrize("category", CATEGORIES)
def test_every_broken_input_fails_cleanly_through_the_library(corpus, tmp_path: Path, category: str) -> None:
    cases = [c for c in corpus["cases"] if c.category == category]
    bugs: list[str] = []
    outcomes: Counter = Counter()
    for index, case in enumerate(cases):
        outcome, found = run_library(case, tmp_path / f"case{index}", corpus["deploys"], index)
        corpus["outcomes"][case.label] = outcome
        bugs.extend(found)
        converted = outcome.get("convert")
        outcomes["written" if getattr(converted, "written", False) else
                 f"exit {getattr(converted, 'exit_code', 1)}"] += 1
    print(f"\n{category}: {len(cases)} inputs, convert outcomes {dict(outcomes)}")
    assert bugs == []


# -- the same through the command line ---------------------------------------------------------

CLI_CASES = 40


def cli_sample(cases: list[Case]) -> list[Case]:
    """40 cases, taken round-robin over the categories (seeded), so every category is in it."""
    rng = random.Random(SEED + 1)
    pools = {category: rng.sample([c for c in cases if c.category == category],
                                  k=sum(c.category == category for c in cases)) for category in CATEGORIES}
    picked: list[Case] = []
    while len(picked) < CLI_CASES:
        for category in CATEGORIES:
            if pools[category] and len(picked) < CLI_CASES:
                picked.append(pools[category].pop())
    return picked


def cli_problems(case: Case, command: str, result, library: object, renamed: tuple[str, str]) -> list[str]:
    """How the CLI's answer differs from what the library said about the same input.

    ``renamed``: (the source's path when the library read it, its path now) for comparing messages.
    """
    problems = []
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    if "Traceback" in result.stdout + result.stderr:
        problems.append("printed a traceback")
    if isinstance(library, RepvggError):
        if result.exit_code != library.exit_code:
            problems.append(f"exit {result.exit_code}, the library said {library.exit_code}")
        expected = f"Error: {library.message.replace(*renamed)}"
        if errors != [expected]:
            problems.append(f"error lines {errors!r}, the library said {expected!r}")
    elif isinstance(library, Exception):
        problems.append(f"the library raised {type(library).__name__}")
    else:
        ok = getattr(library, "ok", getattr(getattr(library, "result", None), "ok", True))
        if result.exit_code != (0 if ok else 1):
            problems.append(f"exit {result.exit_code} where the library's result was ok={ok}")
    return [f"{case.label}: repvgg {command}: {p}" for p in problems]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_sample_of_broken_inputs_fails_the_same_way_through_the_cli(corpus, tmp_path: Path) -> None:
    sample = cli_sample(corpus["cases"])
    assert len(sample) == CLI_CASES and {c.category for c in sample} == set(CATEGORIES)
    bugs: list[str] = []
    exits: Counter = Counter()
    for index, case in enumerate(sample):
        folder = tmp_path / f"case{index}"
        outcome = corpus["outcomes"].get(case.label)  # what the library test saw, when it ran first
        if outcome is None:
            outcome, found = run_library(case, folder, corpus["deploys"], index)
            bugs.extend(found)
        else:
            folder.mkdir()
            (folder / case.filename).write_bytes(case.data)
        source = folder / case.filename
        digest = sha256(source)
        before = sorted(os.listdir(folder))
        output = folder / "cli-out.safetensors"
        commands = [("convert", ["convert", source, output])]
        if index % 2 == 0:
            commands.append(("inspect", ["inspect", source]))
        elif case.base is None:
            commands.append(("verify", ["verify", source]))
        else:
            commands.append(("verify --against", ["verify", corpus["deploys"][case.base], "--against", source]))
        for where, args in commands:
            result = invoke(*args)
            exits[result.exit_code] += 1
            bugs.extend(cli_problems(case, where, result, outcome.get(where), (str(outcome["source"]), str(source))))
        written = getattr(outcome.get("convert"), "written", False)
        after = sorted(os.listdir(folder))
        if after != sorted(before + ([output.name] if written else [])):
            bugs.append(f"{case.label}: the CLI left {sorted(set(after) - set(before))} (library wrote: {written})")
        if sha256(source) != digest:
            bugs.append(f"{case.label}: the CLI changed the source")
    print(f"\nCLI: {len(sample)} inputs, {sum(exits.values())} commands, exit codes {dict(sorted(exits.items()))}")
    assert bugs == []
    assert exits[2] + exits[3] >= 50  # most of the sample is refused, the rest is inspected or converted


# -- nothing lost when writing fails -----------------------------------------------------------


def pickled_plain_net(folder: Path) -> Path:
    """A trusted pickled train-form model (the module tree; its .pt output is a pickled model)."""
    from tests import zoo

    torch.manual_seed(0)
    source = folder / "model.pt"
    torch.save({"model": zoo.randomize_bn(zoo.PlainNet()).eval(), "epoch": 3}, source)
    return source


@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "existing-output"])
def test_a_write_that_fails_half_way_leaves_no_partial_output(tmp_path: Path, existing: bool) -> None:
    import resource
    import signal

    source = pickled_plain_net(tmp_path)
    full = tmp_path / "full" / "deploy.pt"
    full.parent.mkdir()
    assert convert_file(source, full, allow_pickle=True).written
    size = full.stat().st_size
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "deploy.pt"
    old = b"the deploy file of yesterday\x00" * 10
    if existing:
        output.write_bytes(old)
    digest = sha256(source)
    # The process may then write files of at most half the output: the write fails in its middle.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))
    try:
        with pytest.raises(Exception) as info:
            convert_file(source, output, allow_pickle=True, force=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert not isinstance(info.value, RepvggError)  # the disk failed, not the input
    assert 1000 < size // 2 < size
    assert os.listdir(folder) == (["deploy.pt"] if existing else [])
    if existing:
        assert output.read_bytes() == old
    assert sha256(source) == digest
    # the same conversion with room to write gives the full file, byte for byte
    assert convert_file(source, output, allow_pickle=True, force=True).written
    assert output.read_bytes() == full.read_bytes()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_failed_rename_keeps_the_existing_output(tmp_path: Path, monkeypatch, suffix: str) -> None:
    source = pickled_plain_net(tmp_path)
    output = tmp_path / f"deploy{suffix}"
    output.write_bytes(b"previous artifact")
    renames: list[tuple[str, str]] = []

    def failing_replace(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="cross-device"):
        convert_file(source, output, allow_pickle=True, force=True)
    monkeypatch.undo()
    assert len(renames) == 1 and renames[0][1] == output.name and renames[0][0].startswith(f".{output.name}.")
    assert sorted(os.listdir(tmp_path)) == sorted(["model.pt", output.name])
    assert output.read_bytes() == b"previous artifact"


def test_force_replaces_the_output_by_rename_not_in_place(tmp_path: Path) -> None:
    source = SAMPLES / "plain_net.safetensors"
    output = tmp_path / "deploy.pt"
    output.write_bytes(b"yesterday's deploy file")
    os.chmod(output, 0o640)
    link = tmp_path / "yesterday.pt"
    os.link(output, link)  # a second name for the old file: in-place writing would change it too
    inode = output.stat().st_ino
    result = invoke("convert", source, output)
    assert result.exit_code == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("Error:")] == [f"Error: {output} exists"]
    result = invoke("convert", source, output, "--force")
    assert result.exit_code == 0, result.stderr
    assert f"wrote {output}" in result.stdout
    assert link.read_bytes() == b"yesterday's deploy file"
    assert output.stat().st_ino != inode
    assert output.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["deploy.pt", "yesterday.pt"]
    assert verify_file(output).ok

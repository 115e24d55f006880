"""The validating mmap reader (soupkern.io.reader / format) against the safetensors library,
hand-built malformed files, sharded checkpoints and folders."""

from __future__ import annotations

import json
import os
import random
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(__file__))

import soupkern  # noqa: E402
from soupkern.io import SafetensorsFile, open_checkpoint  # noqa: E402
from soupkern.io.format import MAX_HEADER_BYTES  # noqa: E402
from helpers_io import (  # noqa: E402
    TORCH_OF,
    entry,
    random_tensor,
    raw_bytes,
    save,
    write_raw,
    write_sharded,
)

HeaderError, InputError = soupkern.HeaderError, soupkern.InputError


def assert_names(exc: BaseException, path, tensor: str | None = None) -> None:
    """The error carries and names the file (and the tensor where there is one)."""
    path = os.fspath(path)
    assert isinstance(exc, InputError)
    assert exc.path == path, (exc.path, path)
    assert path in str(exc), str(exc)
    if tensor is not None:
        assert exc.tensor == tensor, (exc.tensor, tensor)
        assert f"'{tensor}'" in str(exc), str(exc)


def check_against_library(path: Path, ck) -> None:
    """Every tensor of `ck` has the dtype, shape and exact bytes the safetensors library reads."""
    with safe_open(os.fspath(path), framework="pt") as lib:
        assert set(lib.keys()) == set(ck.tensors)
        for name in lib.keys():
            f, info = ck.tensors[name]
            sl = lib.get_slice(name)
            assert info.dtype == sl.get_dtype(), name
            assert list(info.shape) == list(sl.get_shape()), name
            t = lib.get_tensor(name)
            v = f.view(info)
            assert isinstance(v, memoryview) and v.format == "B" and v.ndim == 1
            assert v.nbytes == info.nbytes == t.numel() * t.element_size(), name
            assert v.tobytes() == raw_bytes(t), name
            assert v.readonly


# ---------------------------------------------------------------------------------------------
# 1. against files written by the safetensors library

ALL_DTYPES = sorted(TORCH_OF)
SHAPES = [(), (0,), (3, 0), (1,), (7,), (5, 3), (2, 3, 5), (1, 1, 1, 9), (13, 1, 7)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_dtype_and_shape_matches_library(tmp_path, dtype):
    gen = torch.Generator().manual_seed(sum(map(ord, dtype)))  # hash() is salted per process
    tensors = {f"t{i}.{'x'.join(map(str, s)) or 'scalar'}": random_tensor(s, dtype, gen) for i, s in enumerate(SHAPES)}
    path = save(tmp_path / "m.safetensors", tensors)
    with open_checkpoint(path) as ck:
        check_against_library(path, ck)
        for name, t in tensors.items():
            f, info = ck.tensors[name]
            assert info.shape == tuple(t.shape)
            assert info.numel == t.numel()
            assert f.view(info).tobytes() == raw_bytes(t)


def test_mixed_dtypes_in_one_file_and_metadata(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(ALL_DTYPES):
        tensors[f"layer.{i}.weight"] = random_tensor((i % 4 + 1, 2 * i + 1), dtype, gen)
        tensors[f"layer.{i}.scalar"] = random_tensor((), dtype, gen)
        tensors[f"layer.{i}.empty"] = random_tensor((3, 0), dtype, gen)
    meta = {"format": "pt", "note": "héllo ✓", "empty": ""}
    path = save(tmp_path / "mixed.safetensors", tensors, metadata=meta)
    with open_checkpoint(path) as ck:
        assert ck.metadata == meta
        assert ck.files[0].metadata == meta
        assert ck.path == os.fspath(path)
        check_against_library(path, ck)
        assert ck.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_unicode_and_odd_names(tmp_path):
    tensors = {"ä.weight": torch.ones(2), "a b/c": torch.zeros(1, dtype=torch.int8), "": torch.arange(3.0)}
    path = save(tmp_path / "u.safetensors", tensors)
    with open_checkpoint(path) as ck:
        check_against_library(path, ck)


def test_views_are_zero_copy_over_the_mapping(tmp_path):
    path = save(tmp_path / "m.safetensors", {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(7)})
    f = SafetensorsFile(path)
    try:
        info = f.tensors["a"]
        v = f.view(info)
        assert np.frombuffer(v, np.uint8).ctypes.data == f.address(info)  # a view over the mmap, not a fresh buffer
        part = f.view(info, 8, 24)
        assert part.tobytes() == raw_bytes(torch.arange(1000, dtype=torch.float32))[8:24]
        with pytest.raises(TypeError):
            v[0] = 1  # read-only
        del v, part
    finally:
        f.close()


def test_hand_built_valid_files(tmp_path):
    # header padded with spaces, tensors stored in a different order than the header lists them
    data = struct.pack("<2f", 1.0, 2.0) + struct.pack("<h", -5)
    hdr = {"__metadata__": {"k": "v"}, "b": entry("I16", [1], 8, 10), "a": entry("F32", [2], 0, 8)}
    p = write_raw(tmp_path / "h.safetensors", hdr, data, pad=True)
    f = SafetensorsFile(p)
    assert f.metadata == {"k": "v"}
    assert f.view(f.tensors["a"]).tobytes() == data[:8]
    assert f.view(f.tensors["b"]).tobytes() == data[8:]
    assert f.tensors["a"].begin == 8 + len(p.read_bytes()) - 8 - len(data)
    f.close()
    # no tensors at all, with and without metadata; a file of only 0-element tensors
    for i, hdr in enumerate([{}, {"__metadata__": {}}, {"e": entry("F32", [0], 0, 0), "g": entry("I8", [2, 0], 0, 0)}]):
        f = SafetensorsFile(write_raw(tmp_path / f"e{i}.safetensors", hdr))
        assert all(f.view(info).nbytes == 0 for info in f.tensors.values())
        f.close()


# ---------------------------------------------------------------------------------------------
# 3. header validation: every rule, the exception type, a distinctive message, file and tensor

F32x2 = struct.pack("<2f", 1.0, 2.0)


def _h(**entries) -> dict:
    return dict(entries)


HEADER_CASES = [
    # id, header, data, message fragment, tensor
    ("invalid-utf8", b'{"\xff\xfe": 1}', b"", "not valid UTF-8", None),
    ("invalid-json", b'{"w": {"dtype": "F32",', b"", "not valid JSON", None),
    ("invalid-json-trailing-garbage", b'{} x', b"", "not valid JSON", None),
    ("json-array", b"[]", b"", "not an object", None),
    ("json-string", b'"abc"', b"", "not an object", None),
    ("json-null", b"null", b"", "not an object", None),
    ("json-number", b"12", b"", "not an object", None),
    ("duplicate-tensor", b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                         b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2, "duplicate key 'w'", None),
    ("duplicate-field", b'{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2,
     "duplicate key 'dtype'", None),
    ("duplicate-metadata", b'{"__metadata__":{"a":"1","a":"2"}}', b"", "duplicate key 'a'", None),
    ("metadata-int-value", {"__metadata__": {"a": 1}}, b"", "__metadata__ must map strings to strings", None),
    ("metadata-nested", {"__metadata__": {"a": {"b": "c"}}}, b"", "__metadata__ must map strings to strings", None),
    ("metadata-string", {"__metadata__": "abc"}, b"", "__metadata__ must map strings to strings", None),
    ("metadata-list", {"__metadata__": ["a", "b"]}, b"", "__metadata__ must map strings to strings", None),
    ("entry-not-object", {"w": 5}, b"", "exactly dtype, shape and data_offsets", "w"),
    ("entry-list", {"w": ["F32", [2], [0, 8]]}, F32x2, "exactly dtype, shape and data_offsets", "w"),
    ("entry-missing-offsets", {"w": {"dtype": "F32", "shape": [2]}}, F32x2, "exactly dtype, shape and data_offsets", "w"),
    ("entry-missing-dtype", {"w": {"shape": [2], "data_offsets": [0, 8]}}, F32x2, "exactly dtype, shape and data_offsets", "w"),
    ("entry-extra-key", {"w": {**entry("F32", [2], 0, 8), "extra": 1}}, F32x2, "exactly dtype, shape and data_offsets", "w"),
    ("unknown-dtype", {"w": entry("F128", [2], 0, 8)}, F32x2, "unknown dtype 'F128'", "w"),
    ("lowercase-dtype", {"w": entry("f32", [2], 0, 8)}, F32x2, "unknown dtype 'f32'", "w"),
    ("dtype-not-string", {"w": entry(4, [2], 0, 8)}, F32x2, "unknown dtype 4", "w"),
    ("negative-shape", {"w": entry("F32", [-2], 0, 8)}, F32x2, "shape must be a list of non-negative integers", "w"),
    ("float-shape", {"w": entry("F32", [2.0], 0, 8)}, F32x2, "shape must be a list of non-negative integers", "w"),
    ("string-shape", {"w": entry("F32", ["2"], 0, 8)}, F32x2, "shape must be a list of non-negative integers", "w"),
    ("bool-shape", {"w": entry("F32", [True, True], 0, 4)}, F32x2[:4], "shape must be a list of non-negative integers", "w"),
    ("shape-not-list", {"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, F32x2,
     "shape must be a list of non-negative integers", "w"),
    ("offsets-one", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, F32x2, "data_offsets must be [begin, end]", "w"),
    ("offsets-three", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, F32x2,
     "data_offsets must be [begin, end]", "w"),
    ("offsets-not-list", {"w": {"dtype": "F32", "shape": [2], "data_offsets": 8}}, F32x2, "data_offsets must be [begin, end]", "w"),
    ("offsets-reversed", {"w": entry("F32", [2], 8, 0)}, F32x2, "data_offsets must be [begin, end]", "w"),
    ("offsets-negative", {"w": entry("F32", [2], -8, 0)}, F32x2, "data_offsets must be [begin, end]", "w"),
    ("offsets-float", {"w": entry("F32", [2], 0.0, 8.0)}, F32x2, "data_offsets must be [begin, end]", "w"),
    ("length-too-short", {"w": entry("F32", [3], 0, 8)}, F32x2, "byte length 8 does not match", "w"),
    ("length-too-long", {"w": entry("F16", [2], 0, 8)}, F32x2, "byte length 8 does not match", "w"),
    ("length-empty-shape", {"w": entry("F32", [0], 0, 8)}, F32x2, "byte length 8 does not match", "w"),
    ("offsets-past-data", {"w": entry("F32", [2], 8, 16)}, F32x2, "run past the end of the data region", "w"),
    ("offsets-past-data-partly", {"w": entry("F32", [2], 4, 12)}, F32x2, "run past the end of the data region", "w"),
    ("empty-tensor-past-data", {"w": entry("F32", [2], 0, 8), "e": entry("F32", [0], 12, 12)}, F32x2,
     "run past the end of the data region", "e"),
    ("overlap", {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, F32x2 + F32x2[:4], "overlaps tensor 'a'", "b"),
    ("same-range", {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}, F32x2, "overlaps tensor", None),
    ("hole-between", {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}, F32x2 + b"\0" * 4 + F32x2,
     "hole of 4 bytes", "b"),
    ("hole-at-start", {"a": entry("F32", [2], 4, 12)}, b"\0" * 4 + F32x2, "hole of 4 bytes", "a"),
    ("trailing-bytes", {"a": entry("F32", [2], 0, 8)}, F32x2 + b"\0\0\0\0", "trailing bytes", None),
    ("data-without-tensors", {}, b"\0" * 16, "trailing bytes", None),
]


@pytest.mark.parametrize("header,data,fragment,tensor", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_header_validation(tmp_path, header, data, fragment, tensor):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(HeaderError) as ei:
        SafetensorsFile(path)
    assert fragment in str(ei.value), str(ei.value)
    assert_names(ei.value, path, tensor)
    # the same through the public entry point
    with pytest.raises(HeaderError) as ei2:
        open_checkpoint(path)
    assert str(ei2.value) == str(ei.value)


def test_same_range_names_both_tensors(tmp_path):
    path = write_raw(tmp_path / "bad.safetensors", {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}, F32x2)
    with pytest.raises(HeaderError) as ei:
        SafetensorsFile(path)
    assert ei.value.tensor in ("a", "b")
    other = "a" if ei.value.tensor == "b" else "b"
    assert f"overlaps tensor '{other}'" in str(ei.value)


@pytest.mark.parametrize("content", [b"", b"\x01", b"\x08\0\0\0\0\0\0"], ids=["empty", "1-byte", "7-byte"])
def test_file_shorter_than_8_bytes(tmp_path, content):
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    with pytest.raises(HeaderError) as ei:
        open_checkpoint(path)
    assert "fewer than the 8-byte header length" in str(ei.value)
    assert f"file has {len(content)} bytes" in str(ei.value)
    assert_names(ei.value, path)


@pytest.mark.parametrize("n", [MAX_HEADER_BYTES + 1, 2**63, 2**64 - 1])
def test_header_length_over_limit(tmp_path, n):
    path = write_raw(tmp_path / "big.safetensors", b"{}", length=n)
    with pytest.raises(HeaderError) as ei:
        open_checkpoint(path)
    assert f"header length {n} exceeds" in str(ei.value)
    assert_names(ei.value, path)


@pytest.mark.parametrize("n", [3, 100, MAX_HEADER_BYTES])
def test_header_length_past_end_of_file(tmp_path, n):
    path = write_raw(tmp_path / "trunc.safetensors", b"{}", length=n)
    with pytest.raises(HeaderError) as ei:
        open_checkpoint(path)
    assert f"header length {n} runs past the end of the {8 + 2}-byte file" in str(ei.value)
    assert_names(ei.value, path)


def test_truncated_library_file(tmp_path):
    path = save(tmp_path / "m.safetensors", {"a": torch.ones(100), "b": torch.zeros(10, dtype=torch.int64)})
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    with pytest.raises(HeaderError) as ei:
        open_checkpoint(path)
    assert "run past the end of the data region" in str(ei.value)
    assert_names(ei.value, path)


def test_header_error_is_input_error_and_value_error():
    assert issubclass(HeaderError, InputError)
    assert issubclass(soupkern.MismatchError, InputError)
    assert issubclass(InputError, ValueError)


# ---------------------------------------------------------------------------------------------
# fuzz: random byte mutations of a valid header

def _fuzz_base(tmp_path) -> bytes:
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "a": random_tensor((3, 5), "F32", gen),
        "b.bias": random_tensor((7,), "BF16", gen),
        "c": random_tensor((), "I64", gen),
        "d": random_tensor((2, 0), "F16", gen),
        "e": random_tensor((4,), "U8", gen),
    }
    path = save(tmp_path / "base.safetensors", tensors, metadata={"format": "pt", "x": "12"})
    return path.read_bytes()


def test_fuzz_header_mutations(tmp_path):
    base = _fuzz_base(tmp_path)
    (n,) = struct.unpack("<Q", base[:8])
    rng = random.Random(20240607)
    interesting = b'{}[]",:-.0123456789eE \x00\xff' + b"FIUBD_"
    opened = 0
    path = tmp_path / "fuzz.safetensors"
    for i in range(400):
        buf = bytearray(base)
        for _ in range(rng.choice([1, 1, 2, 3, 5])):
            # mostly the JSON, sometimes the 8 length bytes
            pos = rng.randrange(0, 8) if rng.random() < 0.1 else rng.randrange(8, 8 + n)
            if rng.random() < 0.5:
                buf[pos] = rng.randrange(256)
            else:
                buf[pos] = interesting[rng.randrange(len(interesting))]
        if rng.random() < 0.1:  # also truncate or extend the file
            buf = buf[: rng.randrange(len(buf) + 1)] if rng.random() < 0.5 else buf + bytes(rng.randrange(1, 9))
        path.write_bytes(bytes(buf))
        try:
            f = SafetensorsFile(path)
        except InputError:  # HeaderError included
            continue
        except Exception as e:  # pragma: no cover - reported with the mutated bytes
            pytest.fail(f"mutation {i}: {type(e).__name__}: {e}\nheader: {bytes(buf[:8 + n])!r}")
        opened += 1
        try:
            (m,) = struct.unpack("<Q", bytes(buf[:8]))
            spans = []
            for name, info in f.tensors.items():
                assert 8 + m <= info.begin <= info.end <= len(buf), (i, name, info)
                assert info.nbytes == info.numel * soupkern.io.dtype_itemsize(info.dtype)
                v = f.view(info)
                assert v.nbytes == info.nbytes
                assert v.tobytes() == bytes(buf[info.begin:info.end])
                spans.append((info.begin, info.end))
                del v
            spans.sort()
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), (i, spans)
        finally:
            f.close()
    # the mutations that keep a valid file (e.g. digits of metadata values) do get opened
    assert opened > 0


# ---------------------------------------------------------------------------------------------
# 2. sharded checkpoints

def _two_shards(folder: Path, **kw) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    s1 = {"embed.weight": random_tensor((10, 4), "F32", gen), "layer.0.w": random_tensor((4, 4), "BF16", gen)}
    s2 = {"layer.1.w": random_tensor((4, 4), "BF16", gen), "lm_head.weight": random_tensor((4, 10), "F32", gen),
          "steps": random_tensor((), "I64", gen)}
    index = write_sharded(folder, {"model-00001-of-00002.safetensors": s1, "model-00002-of-00002.safetensors": s2}, **kw)
    return index, {**s1, **s2}


@pytest.mark.parametrize("via", ["folder", "index"])
def test_sharded_checkpoint(tmp_path, via):
    index, tensors = _two_shards(tmp_path / "ck", index_extra={"metadata": {"total_size": 123, "note": "x"}})
    ck = open_checkpoint(tmp_path / "ck" if via == "folder" else index)
    with ck:
        assert ck.path == os.fspath(index)
        assert set(ck.tensors) == set(tensors)
        assert len(ck.files) == 2
        for name, t in tensors.items():
            f, info = ck.tensors[name]
            want = "model-00001-of-00002.safetensors" if name in ("embed.weight", "layer.0.w") else "model-00002-of-00002.safetensors"
            assert Path(f.path).name == want
            assert f.view(info).tobytes() == raw_bytes(t)
            assert info.shape == tuple(t.shape)
        assert ck.metadata.get("total_size") == "123"
        assert ck.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in sorted((tmp_path / "ck").glob("*.safetensors")):
        with safe_open(os.fspath(shard), "pt") as lib:
            for name in lib.keys():
                assert raw_bytes(lib.get_tensor(name)) == raw_bytes(tensors[name])


def test_sharded_index_in_subfolder_and_index_named_directly(tmp_path):
    gen = torch.Generator().manual_seed(4)
    a, b = random_tensor((3,), "F32", gen), random_tensor((2, 2), "F16", gen)
    folder = tmp_path / "ck"
    (folder / "shards").mkdir(parents=True)
    save(folder / "shards" / "one.safetensors", {"a": a})
    save(folder / "shards" / "two.safetensors", {"b": b})
    idx = folder / "custom.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": "shards/one.safetensors", "b": "shards/two.safetensors"}}))
    with open_checkpoint(idx) as ck:
        assert ck.tensors["a"][0].view(ck.tensors["a"][1]).tobytes() == raw_bytes(a)
        assert ck.tensors["b"][0].view(ck.tensors["b"][1]).tobytes() == raw_bytes(b)


def test_sharded_tensor_in_wrong_shard(tmp_path):
    folder = tmp_path / "ck"
    index, _ = _two_shards(folder)
    wm = json.loads(index.read_text())["weight_map"]
    wm["layer.0.w"] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(InputError) as ei:
        open_checkpoint(folder)
    assert "index places it in 'model-00002-of-00002.safetensors'" in str(ei.value)
    assert_names(ei.value, folder / "model-00001-of-00002.safetensors", "layer.0.w")


def test_sharded_tensor_missing_from_weight_map(tmp_path):
    folder = tmp_path / "ck"
    index, _ = _two_shards(folder)
    wm = json.loads(index.read_text())["weight_map"]
    del wm["steps"]
    index.write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(InputError) as ei:
        open_checkpoint(index)
    assert "not in the index's weight_map" in str(ei.value)
    assert_names(ei.value, folder / "model-00002-of-00002.safetensors", "steps")


def test_sharded_index_names_missing_tensor(tmp_path):
    folder = tmp_path / "ck"
    index, _ = _two_shards(folder)
    wm = json.loads(index.read_text())["weight_map"]
    wm["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(InputError) as ei:
        open_checkpoint(folder)
    assert "which does not contain it" in str(ei.value)
    assert_names(ei.value, index, "ghost.weight")


def test_sharded_index_names_missing_shard_file(tmp_path):
    folder = tmp_path / "ck"
    index, _ = _two_shards(folder)
    wm = json.loads(index.read_text())["weight_map"]
    wm["ghost.weight"] = "model-00003-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(InputError) as ei:
        open_checkpoint(folder)
    assert "cannot open" in str(ei.value)
    assert_names(ei.value, folder / "model-00003-of-00002.safetensors")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABS"])
def test_sharded_shard_outside_folder(tmp_path, shard):
    folder = tmp_path / "ck"
    folder.mkdir()
    save(tmp_path / "outside.safetensors", {"a": torch.ones(2)})
    if shard == "ABS":
        shard = os.fspath(tmp_path / "outside.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(InputError) as ei:
        open_checkpoint(folder)
    assert "outside the checkpoint folder" in str(ei.value)
    assert shard in str(ei.value)
    assert_names(ei.value, index)


@pytest.mark.parametrize(
    "content,fragment",
    [
        (b'{"weight_map": {"a": "x.safetensors"', "cannot read sharded-checkpoint index"),
        (b"\xff\xfe\x00garbage", "cannot read sharded-checkpoint index"),
        (b"", "cannot read sharded-checkpoint index"),
        (b"[]", "no 'weight_map'"),
        (b'{"metadata": {}}', "no 'weight_map'"),
        (b'{"weight_map": ["a"]}', "no 'weight_map'"),
        (b'{"weight_map": {"a": 3}}', "no 'weight_map'"),
    ],
    ids=["truncated-json", "not-utf8", "empty", "array", "no-weight-map", "weight-map-list", "weight-map-int"],
)
def test_sharded_invalid_index(tmp_path, content, fragment):
    folder = tmp_path / "ck"
    _two_shards(folder)
    index = folder / "model.safetensors.index.json"
    index.write_bytes(content)
    for target in (folder, index):
        with pytest.raises(InputError) as ei:
            open_checkpoint(target)
        assert fragment in str(ei.value), str(ei.value)
        assert_names(ei.value, index)


def test_sharded_missing_index_file(tmp_path):
    index = tmp_path / "nothing" / "model.safetensors.index.json"
    with pytest.raises(InputError) as ei:
        open_checkpoint(index)
    assert_names(ei.value, index)


def test_sharded_bad_shard_header_names_shard(tmp_path):
    folder = tmp_path / "ck"
    _two_shards(folder)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(HeaderError) as ei:
        open_checkpoint(folder)
    assert "trailing bytes" in str(ei.value)
    assert_names(ei.value, shard)


def test_sharded_shard_is_a_folder(tmp_path):
    """A weight_map entry naming a folder is a bad input, reported as InputError naming it."""
    folder = tmp_path / "ck"
    (folder / "sub.safetensors").mkdir(parents=True)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "sub.safetensors"}}))
    with pytest.raises(InputError) as ei:
        open_checkpoint(folder)
    assert os.fspath(folder / "sub.safetensors") in str(ei.value)


# ---------------------------------------------------------------------------------------------
# 4. folders and paths

def test_folder_with_model_safetensors(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    p = save(folder / "model.safetensors", {"a": torch.arange(4.0)})
    save(folder / "other.safetensors", {"b": torch.ones(1)})  # ignored: model.safetensors wins
    with open_checkpoint(folder) as ck:
        assert ck.path == os.fspath(p)
        assert set(ck.tensors) == {"a"}


def test_folder_with_one_safetensors_file(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    p = save(folder / "pytorch_weights.safetensors", {"a": torch.arange(4.0)})
    (folder / "config.json").write_text("{}")
    with open_checkpoint(folder) as ck:
        assert ck.path == os.fspath(p)
        assert set(ck.tensors) == {"a"}
        check_against_library(p, ck)


def test_folder_index_wins_over_model_safetensors(tmp_path):
    folder = tmp_path / "ck"
    index, tensors = _two_shards(folder)
    save(folder / "model.safetensors", {"other": torch.ones(1)})
    with open_checkpoint(folder) as ck:
        assert set(ck.tensors) == set(tensors)


@pytest.mark.parametrize("count", [0, 2, 3])
def test_folder_ambiguous_or_empty(tmp_path, count):
    folder = tmp_path / "ck"
    folder.mkdir()
    for i in range(count):
        save(folder / f"part{i}.safetensors", {"a": torch.ones(1)})
    with pytest.raises(InputError) as ei:
        open_checkpoint(folder)
    assert f"{count} *.safetensors files" in str(ei.value)
    assert_names(ei.value, folder)


@pytest.mark.parametrize("name", ["missing.safetensors", "missing_dir", "model.safetensors.index.json"])
def test_missing_path(tmp_path, name):
    with pytest.raises(InputError) as ei:
        open_checkpoint(tmp_path / name)
    assert_names(ei.value, tmp_path / name)


def test_path_types(tmp_path):
    p = save(tmp_path / "m.safetensors", {"a": torch.ones(3)})
    for arg in (p, os.fspath(p), os.fsencode(p).decode()):
        with open_checkpoint(arg) as ck:
            assert set(ck.tensors) == {"a"}


# ---------------------------------------------------------------------------------------------
# parity: headers the safetensors library refuses must not be accepted (the output of a soup
# of such a file would be unreadable, or the soup crashes later with a non-soupkern error)

PARITY_CASES = [
    # a tensor name that is not valid Unicode (lone surrogate escape): the writer later fails
    # with UnicodeEncodeError when it re-encodes the name
    ("lone-surrogate-name", b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2),
    # a dimension that does not fit in 64 bits (0 elements, so the byte length check passes):
    # a soup writes it back and safetensors cannot read the output
    ("dimension-over-u64", b'{"a":{"dtype":"F32","shape":[18446744073709551616,0],"data_offsets":[0,0]},'
                           b'"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2),
]


@pytest.mark.parametrize("header,data", [c[1:] for c in PARITY_CASES], ids=[c[0] for c in PARITY_CASES])
def test_rejects_what_the_library_rejects(tmp_path, header, data):
    path = write_raw(tmp_path / "odd.safetensors", header, data)
    with pytest.raises(Exception):
        with safe_open(os.fspath(path), "pt") as lib:
            [lib.get_tensor(k) for k in lib.keys()]
    with pytest.raises(HeaderError) as ei:
        SafetensorsFile(path)
    assert_names(ei.value, path)

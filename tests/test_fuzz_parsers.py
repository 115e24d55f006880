"""Property-based tests (hypothesis) of the two parsers of soupkern.io.format: parse_header (a
safetensors header) and parse_index (a sharded checkpoint's model.safetensors.index.json).

- Whatever the bytes, they raise nothing but HeaderError / InputError, naming the file.
- Valid headers, written by the safetensors library or built by hand from random tensor lists
  (every dtype, zero-size and 0-d shapes, metadata, any header order), parse to exactly what was
  written and to what the library reads from the same file.
- Mutated headers (bytes flipped, inserted or deleted; offsets moved; data cut or extended)
  either raise HeaderError or parse to something the safetensors library also accepts, equally.
- Deep nesting and tensor counts around MAX_TENSORS are refused with a short message.
- Valid indexes round-trip; unsafe shard names are refused naming the tensor.

Deterministic (derandomize=True, no example database), a few seconds in all.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from soupkern.errors import HeaderError, InputError  # noqa: E402
from soupkern.io import format as fmt  # noqa: E402
from soupkern.io.format import DTYPES, MAX_TENSORS, parse_header, parse_index  # noqa: E402
from helpers_io import TORCH_OF, raw_bytes  # noqa: E402

PATH = "/ckpt/model.safetensors"
INDEX = "/ckpt/model.safetensors.index.json"

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def small(n: int) -> settings:
    return settings(FUZZ, max_examples=n)


_TMP = tempfile.TemporaryDirectory(prefix="soupkern-fuzz-")


def check_error(exc: InputError, path: str) -> None:
    """Names the file; one short line, apart from what the tensor's own name brings."""
    assert exc.path == path
    msg = str(exc)
    assert msg.startswith(path + ": ")
    rest = msg.replace(f"tensor '{exc.tensor}'", "") if exc.tensor is not None else msg
    assert "\n" not in rest and "\r" not in rest, msg
    assert len(rest) < 1000, msg[:2000]


def reason(exc: InputError) -> str:
    """The check that refused an input, for hypothesis's statistics (--hypothesis-show-statistics)."""
    rest = str(exc)[len(exc.path or "") + 2 :]
    if exc.tensor is not None:
        rest = rest[len(f"tensor '{exc.tensor}': ") :]
    return rest.split(" (")[0].split(", got")[0].split(" [")[0].split(" {")[0][:50]


def header_of(buf: bytes) -> tuple[bytes, int]:
    """(header bytes, data length) of a whole file."""
    (n,) = struct.unpack("<Q", buf[:8])
    return buf[8 : 8 + n], len(buf) - 8 - n


def ours(buf: bytes) -> tuple[dict[str, fmt.TensorInfo], dict[str, str]]:
    raw, data_len = header_of(buf)
    return parse_header(raw, data_len, PATH)


def library(buf: bytes) -> tuple[dict[str, tuple[str, list[int], bytes]], dict[str, str]]:
    """What the safetensors library reads from the file: name -> (dtype, shape, bytes), metadata.
    Raises whatever the library raises for a file it refuses."""
    path = os.path.join(_TMP.name, "lib.safetensors")
    with open(path, "wb") as f:
        f.write(buf)
    out = {}
    with safe_open(path, framework="pt") as lib:
        for name in lib.keys():
            sl = lib.get_slice(name)
            shape = list(sl.get_shape())
            # no torch tensor for a 0-element shape with dimensions beyond int64; its bytes are none
            data = b"" if 0 in shape else raw_bytes(lib.get_tensor(name))
            out[name] = (sl.get_dtype(), shape, data)
        return out, dict(lib.metadata() or {})


def assert_agrees_with_library(buf: bytes) -> dict[str, fmt.TensorInfo]:
    """Our parse of a file we accept matches the library's reading of it, bytes included."""
    tensors, metadata = ours(buf)
    lib_tensors, lib_meta = library(buf)
    assert set(tensors) == set(lib_tensors)
    assert metadata == lib_meta
    for name, info in tensors.items():
        dtype, shape, data = lib_tensors[name]
        assert (info.name, info.dtype, list(info.shape)) == (name, dtype, shape)
        assert buf[info.begin : info.end] == data, name
        assert info.nbytes == info.numel * DTYPES[info.dtype]
    return tensors


# ---------------------------------------------------------------------------------------------
# strategies

LIB_DTYPES = sorted(d for d in DTYPES if d in TORCH_OF)  # what torch can hand the library and read back
names = st.text(max_size=12).filter(lambda s: s != fmt.METADATA_KEY)
shapes = st.lists(st.integers(0, 5), max_size=4)
metadatas = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3)
tensor_lists = st.lists(st.tuples(names, st.sampled_from(LIB_DTYPES), shapes), unique_by=lambda t: t[0], max_size=6)


def library_file(tensors: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None,
                 seed: int) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A file written by the safetensors library (random bytes in each tensor), and its tensors."""
    gen = torch.Generator().manual_seed(seed)
    made = {}
    for name, dtype, shape in tensors:
        numel = 1
        for d in shape:
            numel *= d
        data = torch.randint(0, 256 if dtype != "BOOL" else 2, (numel * DTYPES[dtype],), dtype=torch.uint8, generator=gen)
        made[name] = data.view(TORCH_OF[dtype]).reshape(shape) if numel else torch.empty(shape, dtype=TORCH_OF[dtype])
    return st_save(made, metadata=metadata), made


@st.composite
def hand_built(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str, tuple[int, ...], int, int]], dict[str, str]]:
    """A valid file built by hand: data in one random order, header entries in another, metadata
    anywhere, huge dimensions next to a zero, compact or spaced JSON, optional padding. Returns
    the file, its tensors (name, dtype, shape, begin, end) in header order, and its metadata."""
    entries = draw(st.lists(
        st.tuples(names, st.sampled_from(LIB_DTYPES),
                  shapes | st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=3).map(lambda s: [0, *s])),
        unique_by=lambda t: t[0], max_size=8))
    data_order = draw(st.permutations(range(len(entries))))
    header_order = draw(st.permutations(range(len(entries))))
    expected, offsets, data, cursor = [], {}, b"", 0
    for i in data_order:
        name, dtype, shape = entries[i]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPES[dtype]
        offsets[i] = (cursor, cursor + nbytes)
        data += draw(st.binary(min_size=nbytes, max_size=nbytes))
        cursor += nbytes
    items = [(entries[i][0], {"dtype": entries[i][1], "shape": entries[i][2], "data_offsets": list(offsets[i])})
             for i in header_order]
    metadata = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3))
    if metadata or draw(st.booleans()):
        items.insert(draw(st.integers(0, len(items))), (fmt.METADATA_KEY, metadata))
    spaced, ascii_only = draw(st.booleans()), draw(st.booleans())
    raw = json.dumps(dict(items), separators=(", ", ": ") if spaced else (",", ":"), ensure_ascii=ascii_only).encode()
    raw += b" " * draw(st.integers(0, 9))
    base = 8 + len(raw)
    for i in header_order:
        name, dtype, shape = entries[i]
        expected.append((name, dtype, tuple(shape), base + offsets[i][0], base + offsets[i][1]))
    return struct.pack("<Q", len(raw)) + raw + data, expected, metadata


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
JSON_BYTES = b'{}[]",:-0123456789eE .\\ntrufalsNIy'


# ---------------------------------------------------------------------------------------------
# parse_header: anything in, HeaderError or a valid result out


def _header_or_error(raw: bytes, data_len: int) -> None:
    try:
        tensors, metadata = parse_header(raw, data_len, PATH)
    except HeaderError as e:
        check_error(e, PATH)
        event(reason(e))
        return
    event("accepted")
    assert all(type(v) is str for v in metadata.values())
    cover = sum(info.nbytes for info in tensors.values())
    assert cover == data_len
    for name, info in tensors.items():
        assert info.name == name and 8 + len(raw) <= info.begin <= info.end <= 8 + len(raw) + data_len


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 64))
def test_header_arbitrary_bytes(raw: bytes, data_len: int) -> None:
    _header_or_error(raw, data_len)


@FUZZ
@given(st.lists(st.sampled_from([bytes([b]) for b in JSON_BYTES] + [b'"F32"', b'"dtype"', b'"shape"', b'"data_offsets"',
                                 b'"__metadata__"', b"\\ud800", b"-0"]), max_size=60).map(b"".join),
       st.integers(0, 16))
def test_header_json_token_soup(raw: bytes, data_len: int) -> None:
    _header_or_error(raw, data_len)


entry_like = st.fixed_dictionaries({
    "dtype": st.sampled_from(sorted(DTYPES)) | json_values,
    "shape": st.lists(st.integers(-1, 5) | st.sampled_from([2**63, 2**64 - 1, 2**64]), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-1, 20), max_size=3) | json_values,
})


@FUZZ
@given(json_values | st.dictionaries(names, json_values, max_size=4)
       | st.dictionaries(names | st.just(fmt.METADATA_KEY), entry_like | json_values, max_size=3),
       st.integers(0, 16))
def test_header_arbitrary_json(value: object, data_len: int) -> None:
    _header_or_error(json.dumps(value).encode(), data_len)


# ---------------------------------------------------------------------------------------------
# valid headers: exactly what was written, and what the library reads


@small(100)
@given(tensor_lists, metadatas, st.integers(0, 2**31))
def test_library_written_files(tensors: list, metadata: dict | None, seed: int) -> None:
    buf, made = library_file(tensors, metadata, seed)
    try:
        library(buf)
    except Exception:
        # safetensors 0.8 writes no tensors with metadata {} as the invalid '{},"__metadata__":{}}'
        # and cannot read that back; neither can we
        with pytest.raises(HeaderError):
            ours(buf)
        return
    parsed = assert_agrees_with_library(buf)
    raw, _ = header_of(buf)
    written = json.loads(raw)
    assert set(parsed) == set(made)
    for name, t in made.items():
        info = parsed[name]
        assert info.shape == tuple(t.shape) and TORCH_OF[info.dtype] == t.dtype
        assert [info.begin - 8 - len(raw), info.end - 8 - len(raw)] == written[name]["data_offsets"]
        assert buf[info.begin : info.end] == raw_bytes(t)


@small(150)
@given(hand_built())
def test_hand_built_files(case: tuple) -> None:
    buf, expected, metadata = case
    tensors, meta = ours(buf)
    assert meta == metadata
    assert [(i.name, i.dtype, i.shape, i.begin, i.end) for i in tensors.values()] == expected  # header order kept
    assert_agrees_with_library(buf)


# ---------------------------------------------------------------------------------------------
# mutations of valid headers: HeaderError, or something the library also accepts


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    buf, _ = library_file(draw(tensor_lists), draw(metadatas), draw(st.integers(0, 2**31)))
    raw, data_len = header_of(buf)
    data = buf[8 + len(raw):]
    header = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "offset", "data"]))
        pos = draw(st.integers(0, max(len(header) - 1, 0)))
        byte = draw(st.sampled_from(list(JSON_BYTES) + [0, 0x80, 0xFF]) | st.integers(0, 255))
        if kind == "flip" and header:
            header[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and header:
            header[pos] = byte
        elif kind == "insert":
            header[pos:pos] = bytes([byte])
        elif kind == "delete" and header:
            del header[pos]
        elif kind == "offset":
            try:
                obj = json.loads(bytes(header))
                tensor_names = sorted(k for k, v in obj.items() if k != fmt.METADATA_KEY and isinstance(v, dict)
                                      and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
                                      and all(type(o) is int for o in v["data_offsets"]))
            except (ValueError, AttributeError):  # no longer JSON, or not an object: leave it
                tensor_names = []
            if tensor_names:
                name = draw(st.sampled_from(tensor_names))
                obj[name]["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-9, 9))
                header = bytearray(json.dumps(obj, separators=(",", ":")).encode())
        elif kind == "data":
            cut = draw(st.integers(-3, 3))
            data = data[:cut] if cut < 0 else data + bytes(cut)
    return struct.pack("<Q", len(header)) + bytes(header) + data


@small(300)
@given(mutated())
def test_header_mutations(buf: bytes) -> None:
    try:
        ours(buf)
    except HeaderError as e:
        check_error(e, PATH)
        event("refused")
        return
    event("accepted")
    assert_agrees_with_library(buf)  # we accepted it: so must the library, with the same reading


@pytest.mark.parametrize("header,data", [
    # "-0" is an integer to Python but a float to the library: refused as a shape or offset
    (b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', b""),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', bytes(8)),
    # the element count overflows 64 bits before a later zero makes it 0
    (b'{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', b""),
    # the bit count overflows 64 bits
    (b'{"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}}', b""),
], ids=["minus-zero-shape", "minus-zero-offset", "element-count-overflow", "bit-count-overflow"])
def test_refuses_what_the_library_refuses(header: bytes, data: bytes) -> None:
    buf = struct.pack("<Q", len(header)) + header + data
    with pytest.raises(Exception):
        library(buf)
    with pytest.raises(HeaderError) as ei:
        ours(buf)
    check_error(ei.value, PATH)


def test_accepts_a_zero_before_huge_dimensions_like_the_library() -> None:
    header = b'{"a":{"dtype":"F32","shape":[0,9223372036854775808,9223372036854775808],"data_offsets":[0,0]}}'
    buf = struct.pack("<Q", len(header)) + header
    assert ours(buf)[0]["a"].shape == (0, 2**63, 2**63)
    assert_agrees_with_library(buf)


# ---------------------------------------------------------------------------------------------
# deep nesting and huge tensor counts

DEEP = 100_000  # past any recursion limit: the JSON parser itself gives up
MEDIUM = 400  # parsed; refused by the checks, whose messages must not recurse or grow


@pytest.mark.parametrize("depth", [DEEP, MEDIUM])
@pytest.mark.parametrize("where", ["top", "object", "dtype", "shape", "dim", "offsets", "metadata", "metadata-key"])
def test_header_deep_nesting(where: str, depth: int) -> None:
    nest = "[" * depth + "]" * depth
    raw = {
        "top": nest,
        "object": '{"a":' * depth + "1" + "}" * depth,
        "dtype": f'{{"a":{{"dtype":{nest},"shape":[0],"data_offsets":[0,0]}}}}',
        "shape": f'{{"a":{{"dtype":"F32","shape":{nest},"data_offsets":[0,0]}}}}',
        "dim": f'{{"a":{{"dtype":"F32","shape":[1,{nest}],"data_offsets":[0,4]}}}}',
        "offsets": f'{{"a":{{"dtype":"F32","shape":[0],"data_offsets":[0,{nest}]}}}}',
        "metadata": f'{{"__metadata__":{{"k":{nest}}}}}',
        "metadata-key": f'{{"__metadata__":{{"k":"v"}},"a":{{"x":{nest}}}}}',
    }[where].encode()
    with pytest.raises(HeaderError) as ei:
        parse_header(raw, 4, PATH)
    check_error(ei.value, PATH)
    if depth == DEEP:
        assert "nested too deeply" in str(ei.value)


def _many(count: int, *, metadata: bool = False) -> bytes:
    entry = '{"dtype":"U8","shape":[0],"data_offsets":[0,0]}'
    head = '{"__metadata__":{"format":"pt"},' if metadata else "{"
    return (head + ",".join(f'"t{i}":{entry}' for i in range(count)) + "}").encode()


@small(40)
@given(st.integers(-3, 3), st.booleans(), st.integers(1, 50))
def test_tensor_count_limit(delta: int, metadata: bool, limit: int) -> None:
    """At a small limit (the check reads MAX_TENSORS at call time): up to it is accepted, one more
    is refused with a message stating the limit, with or without __metadata__."""
    count = max(limit + delta, 0)
    saved = fmt.MAX_TENSORS
    fmt.MAX_TENSORS = limit
    try:
        if count <= limit:
            tensors, _ = parse_header(_many(count, metadata=metadata), 0, PATH)
            assert len(tensors) == count
        else:
            with pytest.raises(HeaderError) as ei:
                parse_header(_many(count, metadata=metadata), 0, PATH)
            assert f"more than {limit} tensors" in str(ei.value)
            check_error(ei.value, PATH)
    finally:
        fmt.MAX_TENSORS = saved


def test_tensor_count_just_above_max_tensors() -> None:
    raw = _many(MAX_TENSORS + 1)
    assert len(raw) <= fmt.MAX_HEADER_BYTES  # fits the header limit: only the count refuses it
    with pytest.raises(HeaderError) as ei:
        parse_header(raw, 0, PATH)
    assert f"more than {MAX_TENSORS} tensors" in str(ei.value)
    check_error(ei.value, PATH)


@pytest.mark.slow
def test_tensor_count_at_max_tensors() -> None:
    tensors, _ = parse_header(_many(MAX_TENSORS, metadata=True), 0, PATH)
    assert len(tensors) == MAX_TENSORS


# ---------------------------------------------------------------------------------------------
# parse_index


def _index_or_error(raw: bytes) -> None:
    try:
        weight_map, metadata = parse_index(raw, INDEX)
    except InputError as e:
        check_error(e, INDEX)
        event(reason(e))
        return
    event("accepted")
    assert weight_map and all(type(k) is str and type(v) is str for k, v in weight_map.items())
    for shard in weight_map.values():
        assert fmt._shard_problem(shard) is None
        shard.encode("utf-8")
    for key, value in metadata.items():
        assert type(value) is str
        (key + value).encode("utf-8")  # valid Unicode: a safetensors header can hold it


@FUZZ
@given(st.binary(max_size=300))
def test_index_arbitrary_bytes(raw: bytes) -> None:
    _index_or_error(raw)


shard_names = st.text(max_size=12) | st.sampled_from(["../x", "/abs", "\\abs", "C:x", "a/../b", "a\\..\\b", "", "a\0b"])


@FUZZ
@given(json_values
       | st.fixed_dictionaries({"weight_map": json_values | st.dictionaries(st.text(max_size=8), json_values | shard_names)},
                               optional={"metadata": json_values}))
def test_index_arbitrary_json(value: object) -> None:
    _index_or_error(json.dumps(value).encode())
    _index_or_error(json.dumps(value, ensure_ascii=False, indent=1).encode("utf-8", "surrogatepass"))


safe_segments = st.text(st.characters(blacklist_characters="/\\\0", blacklist_categories=("Cs",)), min_size=1, max_size=8)
safe_shards = st.lists(safe_segments.filter(lambda s: s != ".."), min_size=1, max_size=3).map("/".join).filter(
    lambda s: not (len(s) >= 2 and s[1] == ":" and s[0].isascii() and s[0].isalpha()))


@FUZZ
@given(st.dictionaries(st.text(max_size=10), safe_shards, min_size=1, max_size=6),
       st.none() | st.dictionaries(st.text(max_size=8), json_values.filter(
           lambda v: "NaN" not in json.dumps(v) and "Infinity" not in json.dumps(v)), max_size=4),
       st.booleans())
def test_index_round_trip(weight_map: dict, metadata: dict | None, pretty: bool) -> None:
    index = {"weight_map": weight_map} if metadata is None else {"metadata": metadata, "weight_map": weight_map}
    raw = json.dumps(index, indent=2 if pretty else None, ensure_ascii=not pretty).encode()
    got_map, got_meta = parse_index(raw, INDEX)
    assert got_map == weight_map
    want_meta = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in (metadata or {}).items()}
    assert got_meta == want_meta
    for k, v in got_meta.items():
        if not isinstance((metadata or {})[k], str):
            assert json.loads(v) == (metadata or {})[k]  # strict JSON text of the value


@pytest.mark.parametrize("shard,fragment", [
    ("../outside.safetensors", "outside the checkpoint folder"),
    ("sub/../../outside.safetensors", "outside the checkpoint folder"),
    ("sub\\..\\..\\outside.safetensors", "outside the checkpoint folder"),
    ("/abs/model.safetensors", "outside the checkpoint folder"),
    ("\\\\server\\share\\m.safetensors", "outside the checkpoint folder"),
    ("C:\\m.safetensors", "outside the checkpoint folder"),
    ("", "is empty"),
    ("a\0b.safetensors", "NUL"),
    ("x\ud800.safetensors", "not valid Unicode"),
    (3, "not a string"),
    (None, "not a string"),
    (["a"], "not a string"),
])
def test_index_bad_shard_names_the_tensor(shard: object, fragment: str) -> None:
    raw = json.dumps({"weight_map": {"ok": "model-1.safetensors", "layer.0.w": shard}}).encode()
    with pytest.raises(InputError) as ei:
        parse_index(raw, INDEX)
    assert fragment in str(ei.value) and ei.value.tensor == "layer.0.w"
    check_error(ei.value, INDEX)


@pytest.mark.parametrize("shard", ["model.safetensors", "a..b.safetensors", "sub/dir/x.safetensors", "./x.safetensors",
                                   "..x", "x..", "ä ✓.safetensors"])
def test_index_good_shard_names(shard: str) -> None:
    assert parse_index(json.dumps({"weight_map": {"w": shard}}).encode(), INDEX) == ({"w": shard}, {})


@pytest.mark.parametrize("raw,fragment", [
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"weight_map": {"a": "x"}', "not valid JSON"),
    (b"", "not valid JSON"),
    (b'{"weight_map": {"a": "x", "a": "y"}}', "duplicate key 'a'"),
    (b'{"weight_map": {"a": "x"}, "weight_map": {"a": "x"}}', "duplicate key 'weight_map'"),
    (b'{"weight_map": {"a": "x"}, "metadata": {"n": NaN}}', "NaN is not valid JSON"),
    (b'{"weight_map": {"a": "x"}, "metadata": {"n": -Infinity}}', "-Infinity is not valid JSON"),
    (b"[" * DEEP, "nested too deeply"),
    (b'{"weight_map": {"a": "x"}, "metadata": {"n": ' + b"[" * DEEP + b"]" * DEEP + b"}}", "nested too deeply"),
    (b'[{"weight_map": {"a": "x"}}]', "its top level is an array"),
    (b'{"metadata": {}}', "'weight_map' is missing"),
    (b'{"weight_map": ["a"]}', "'weight_map' is an array"),
    (b'{"weight_map": null}', "'weight_map' is null"),
    (b'{"weight_map": {}}', "weight_map is empty"),
    (b'{"weight_map": {"\\udc00": "x"}}', "not valid Unicode"),
    (b'{"weight_map": {"a": "x"}, "metadata": {"k": "\\ud800"}}', "not valid Unicode"),
    (b'{"weight_map": {"a": "x"}, "metadata": {"k": ["\\ud800"]}}', "not valid Unicode"),
])
def test_index_errors(raw: bytes, fragment: str) -> None:
    with pytest.raises(InputError) as ei:
        parse_index(raw, INDEX)
    assert fragment in str(ei.value), str(ei.value)
    assert "cannot read sharded-checkpoint index" in str(ei.value) or "weight_map" in str(ei.value) \
        or "not valid Unicode" in str(ei.value)
    check_error(ei.value, INDEX)


def test_index_metadata_values_become_json_text() -> None:
    raw = json.dumps({"metadata": {"total_size": 123, "s": "x", "b": True, "n": None, "f": 1.5, "l": [1, "ä"],
                                   "o": {"k": 1}}, "weight_map": {"w": "m.safetensors"}}).encode()
    _, meta = parse_index(raw, INDEX)
    assert meta == {"total_size": "123", "s": "x", "b": "true", "n": "null", "f": "1.5", "l": '[1, "ä"]', "o": '{"k": 1}'}
    # a "metadata" that is not an object is ignored, as before
    assert parse_index(b'{"metadata": [1], "weight_map": {"w": "m"}}', INDEX) == ({"w": "m"}, {})


def test_index_size_limit() -> None:
    with pytest.raises(InputError) as ei:
        parse_index(b" " * (fmt.MAX_HEADER_BYTES + 1), INDEX)
    assert f"exceeds the {fmt.MAX_HEADER_BYTES}-byte limit" in str(ei.value)
    check_error(ei.value, INDEX)


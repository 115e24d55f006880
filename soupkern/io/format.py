"""safetensors format constants and header / index parsing and validation (pure Python, no I/O)."""

from __future__ import annotations

import gc
import json
import math
import re
import reprlib
from dataclasses import dataclass
from typing import Any, Callable

from soupkern.errors import HeaderError, InputError

# dtype name -> item size in bytes (the byte-sized dtypes of the safetensors library; the sub-byte
# and complex ones it also knows, such as F4, F6_E2M3 or C64, are refused as unknown)
DTYPES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# dtypes that are averaged; everything else is passed through when identical in every ingredient
FLOAT_DTYPES: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16"})
# The safetensors library's own header limit; the reader also caps an index file at this size.
MAX_HEADER_BYTES = 100_000_000
# Most tensors one file's header may list. Public checkpoints hold a few hundred to a few thousand
# tensors per file, and even the largest MoE models (DeepSeek-V3, Kimi K2: 10^5 to 2 * 10^5 tensors
# with their quantization scales) hold fewer in all their shards together than 2^20; so no real
# file comes near the limit, whose cost is still moderate: parsing 2^20 tiny tensors takes about
# 4 s of CPU and 0.4 GB here (the safetensors library itself: 3.6 s and 0.9 GB for 10^6). Without
# it a 100 MB header could list 1.8 million tensors (25 s and 1.6 GB before this parser's rework);
# with it such a header is refused after 2^20 of them, in about 2.5 s.
MAX_TENSORS = 1 << 20
_U64 = 2**64
METADATA_KEY = "__metadata__"
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
# dtype name -> (the one str object for it, shared by all tensors; item size)
_DTYPE_INFO = {name: (name, size) for name, size in DTYPES.items()}
_U64_BITS = 2**61  # byte counts from here on overflow a 64-bit bit count
_UNICODE_ESCAPE_OF_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_NEGATIVE_ZERO = re.compile(r"-0(?![0-9.eE])")

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict = 2, 8, 8, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = 80, 80, 40


def _r(value: Any) -> str:
    """A short, one-line, non-recursive repr of a value from a file, for an error message."""
    return _repr.repr(value)


def _q(text: str) -> str:
    """A name or key from a file quoted for an error message: 'text' as is when it is printable
    and short, else a truncated repr (escapes control characters, so the message stays one line)."""
    return f"'{text}'" if len(text) <= 200 and text.isprintable() else _r(text)


def dtype_itemsize(dtype: str) -> int:
    return DTYPES[dtype]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a file: byte range [begin, end) relative to the start of the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _tensor_info_factory() -> Callable[[str, str, tuple[int, ...], int, int], TensorInfo]:
    """TensorInfo(name, dtype, shape, begin, end) at half the cost of the frozen dataclass's
    __init__ (which sets each field through object.__setattr__): the slots' own descriptors."""
    new = object.__new__
    set_name, set_dtype, set_shape, set_begin, set_end = (
        TensorInfo.__dict__[f].__set__ for f in ("name", "dtype", "shape", "begin", "end")
    )

    def make(name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> TensorInfo:
        info = new(TensorInfo)
        set_name(info, name)
        set_dtype(info, dtype)
        set_shape(info, shape)
        set_begin(info, begin)
        set_end(info, end)
        return info

    return make


_new_tensor_info = _tensor_info_factory()


class _TooManyObjects(Exception):
    pass


def _object_hook(limit: int | None, check_entries: bool) -> Callable[[list[tuple[str, Any]]], Any]:
    """json object_pairs_hook: refuses duplicate keys, and (with a limit) stops the parse as soon as
    more than `limit` objects were read, so an oversized header costs no more than a legal one.

    With check_entries, an object that is a valid tensor entry with its keys in the usual order
    ({"dtype", "shape", "data_offsets"}, as the safetensors library and soupkern write them) comes
    back as the tuple (dtype, shape, begin, end) instead of a dict: checked while its values are
    fresh in the cache, and four times smaller. Anything else stays a dict, checked later."""
    count = 0
    dtypes, u64, max_bytes = _DTYPE_INFO, _U64, _U64_BITS

    def hook(pairs: list[tuple[str, Any]]) -> Any:
        nonlocal count
        count += 1
        if limit is not None and count > limit:
            raise _TooManyObjects
        if check_entries and len(pairs) == 3:
            (k0, dtype), (k1, shape), (k2, offsets) = pairs
            if (
                k0 == "dtype" and k1 == "shape" and k2 == "data_offsets" and type(dtype) is str
                and type(shape) is list and type(offsets) is list and len(offsets) == 2
            ):
                known = dtypes.get(dtype)
                begin, end = offsets
                if known is not None and type(begin) is int and type(end) is int and 0 <= begin <= end:
                    numel = 1
                    for d in shape:
                        if type(d) is not int or d < 0 or d >= u64:
                            break
                        numel *= d
                        if numel >= u64:
                            break
                    else:
                        nbytes = numel * known[1]
                        if end - begin == nbytes and nbytes < max_bytes:
                            return (known[0], (*shape,), begin, end)
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise ValueError(f"duplicate key {_q(key)}")
                seen.add(key)
        return out

    return hook


class _NegativeZero(float):
    """JSON's "-0": an integer to Python but a float to the safetensors library, which refuses it
    as a shape or offset; parsed as this float, the type checks here refuse it too."""

    def __repr__(self) -> str:
        return "-0"


def _parse_int_no_negative_zero(text: str) -> int | float:
    return _NegativeZero(-0.0) if text == "-0" else int(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str, *, limit: int | None = None, check_entries: bool = False, strict_constants: bool = False) -> Any:
    """json.loads with the hooks above and the cyclic GC paused (a parse allocates millions of
    containers it never frees, and the collections that triggers cost more than the parse; it
    is only re-enabled if it was enabled, so overlapping calls from threads leave it enabled)."""
    kwargs: dict[str, Any] = {"object_pairs_hook": _object_hook(limit, check_entries)}
    if _NEGATIVE_ZERO.search(text):
        kwargs["parse_int"] = _parse_int_no_negative_zero
    if strict_constants:
        kwargs["parse_constant"] = _refuse_constant
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(text, **kwargs)
    finally:
        if was_enabled:
            gc.enable()


def _is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate, which JSON escapes can spell and UTF-8 cannot
    encode (and the safetensors library refuses)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _may_hold_surrogates(text: str) -> bool:
    """Whether parsing `text` can have produced a lone surrogate: only a \\uD800-\\uDFFF escape
    spells one (strict UTF-8 decoding refuses encoded ones), so most texts need no per-string check."""
    return _UNICODE_ESCAPE_OF_SURROGATE.search(text) is not None


_JSON_KIND = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def parse_header(
    raw: bytes, data_len: int, path: str
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and fully validate a header; offsets are returned relative to the file start.

    `raw` is the N header bytes, `data_len` the size of the data region after them. Raises
    HeaderError naming `path` (and the tensor) on any violation: bad UTF-8/JSON (duplicate keys and
    nesting too deep for the parser included), more than MAX_TENSORS tensors, unknown dtype, bad
    shape, byte length != numel * itemsize, offsets outside the data region, overlapping tensors or
    holes between them. Everything accepted is also accepted by the safetensors library.

    Cost: linear in the header size, bounded by MAX_HEADER_BYTES (checked by the caller) and
    MAX_TENSORS: 10^6 tiny tensors (a 60 MB header) take about 4 s of CPU and 0.45 GB on top of
    the header bytes, 10^5 a tenth; invalid headers are parsed twice (see below).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"header is not valid UTF-8 ({e})", path=path) from None
    obj = _load_header(text, path, check_entries=True)
    may_hold_surrogates = _may_hold_surrogates(text)
    del text
    try:
        return _check_header(obj, raw, data_len, path, may_hold_surrogates)
    except HeaderError:
        pass
    # Invalid: parse again without checking entries in the JSON hook, so that the error is found
    # the same way and quotes the file's own values (only invalid headers pay for this).
    del obj
    obj = _load_header(raw.decode("utf-8"), path, check_entries=False)
    _check_header(obj, raw, data_len, path, may_hold_surrogates)
    raise AssertionError("a header failed its check once but not twice")  # pragma: no cover


def _load_header(text: str, path: str, *, check_entries: bool) -> dict[str, Any]:
    too_many = f"header lists more than {MAX_TENSORS} tensors, the limit for one file (MAX_TENSORS)"
    try:
        # a valid header is one object per tensor, the __metadata__ object and the header itself
        obj = _loads(text, limit=MAX_TENSORS + 2, check_entries=check_entries)
    except _TooManyObjects:
        raise HeaderError(too_many, path=path) from None
    except RecursionError:
        raise HeaderError("header JSON is nested too deeply", path=path) from None
    except ValueError as e:
        raise HeaderError(f"header is not valid JSON ({e})", path=path) from None
    if type(obj) is tuple:  # the whole header looked like one tensor entry
        return _load_header(text, path, check_entries=False)
    if not isinstance(obj, dict):
        raise HeaderError("header JSON is not an object", path=path)
    if len(obj) - (METADATA_KEY in obj) > MAX_TENSORS:
        raise HeaderError(too_many, path=path)
    return obj


def _check_entry(entry: Any, name: str, path: str) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of a tensor entry the JSON hook did not check, or HeaderError."""
    if type(entry) is not dict or entry.keys() != _ENTRY_KEYS:
        raise HeaderError("entry must be an object with exactly dtype, shape and data_offsets", path=path, tensor=name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    known = _DTYPE_INFO.get(dtype) if type(dtype) is str else None
    if known is None:
        raise HeaderError(f"unknown dtype {_r(dtype)}", path=path, tensor=name)
    dtype, itemsize = known
    if type(shape) is not list or not all(type(d) is int and 0 <= d < _U64 for d in shape):
        raise HeaderError(f"shape must be a list of non-negative integers below 2^64, got {_r(shape)}", path=path, tensor=name)
    if (
        type(offsets) is not list or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]
    ):
        raise HeaderError(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {_r(offsets)}", path=path, tensor=name)
    begin, end = offsets
    numel, overflow = 1, False
    for d in shape:
        numel *= d
        overflow = overflow or numel >= _U64  # as the library counts: elements, left to right, in 64 bits
    expected = numel * itemsize
    if overflow or expected >= _U64_BITS:  # ... and then bits, also in 64 bits
        raise HeaderError(f"shape {_r(shape)} overflows a 64-bit byte count", path=path, tensor=name)
    if end - begin != expected:
        raise HeaderError(
            f"byte length {end - begin} does not match shape {_r(shape)} x {itemsize} bytes ({dtype}) = {expected}",
            path=path, tensor=name,
        )
    return dtype, (*shape,), begin, end


def _check_header(
    obj: dict[str, Any], raw: bytes, data_len: int, path: str, may_hold_surrogates: bool
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    metadata: dict[str, str] = {}
    meta = obj.pop(METADATA_KEY, None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(type(v) is str for v in meta.values()):
            raise HeaderError("__metadata__ must map strings to strings", path=path)
        metadata = meta
    if may_hold_surrogates:
        for item in (*obj, *metadata, *metadata.values()):
            if not _is_unicode(item):
                raise HeaderError(f"name or metadata {_r(item)} is not valid Unicode", path=path)

    base = 8 + len(raw)
    tensors: dict[str, TensorInfo] = {}
    cursor = 0  # while the tensors, in header order, tile the data region from its start
    in_order = True
    new_info = _new_tensor_info
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        # Entries are popped as they are used, so the parsed JSON shrinks as the result grows.
        pop = obj.pop
        for name in list(obj):
            entry = pop(name)
            dtype, shape, begin, end = entry if type(entry) is tuple else _check_entry(entry, name, path)
            if end > data_len:
                raise HeaderError(f"data_offsets [{begin}, {end}] run past the end of the data region ({data_len} bytes)",
                                  path=path, tensor=name)
            if begin == cursor:
                cursor = end
            else:
                in_order = False
            tensors[name] = new_info(name, dtype, shape, base + begin, base + end)
    finally:
        obj.clear()
        if was_enabled:
            gc.enable()

    # Tensors must tile [0, data_len) exactly, as the safetensors library requires. Headers list
    # them in data order (the library and soupkern write them so); only other orders are sorted.
    if not in_order:
        spans = sorted((info.begin - base, info.end - base, name) for name, info in tensors.items())
        cursor, prev = 0, None
        for begin, end, name in spans:
            if begin < cursor:
                raise HeaderError(f"data overlaps tensor {_q(prev or '')}", path=path, tensor=name)
            if begin > cursor:
                raise HeaderError(f"hole of {begin - cursor} bytes before this tensor's data", path=path, tensor=name)
            cursor, prev = end, name
    if cursor != data_len:
        raise HeaderError(f"tensors cover {cursor} bytes but the data region has {data_len} (trailing bytes)", path=path)
    return tensors, metadata


def _shard_problem(shard: str) -> str | None:
    """Why a weight_map shard name is refused, or None. Names are relative to the index's folder;
    '/' and '\\' both count as separators, so a name is judged the same on every platform."""
    if not shard:
        return "is empty"
    if "\0" in shard:
        return "contains a NUL character"
    if shard[0] in "/\\" or (len(shard) >= 2 and shard[1] == ":" and shard[0].isascii() and shard[0].isalpha()):
        return "is outside the checkpoint folder (an absolute or drive path)"
    if ".." in shard.replace("\\", "/").split("/"):
        return "is outside the checkpoint folder (a '..' component)"
    return None


def parse_index(raw: bytes, path: str) -> tuple[dict[str, str], dict[str, str]]:
    """Parse and validate a sharded checkpoint's index (model.safetensors.index.json).

    Returns (weight_map: tensor name -> shard file name relative to the index's folder, metadata).
    Metadata values that are not strings are stored as their JSON text (json.dumps), so every
    value is valid Unicode that a safetensors header can hold; a "metadata" that is not an object
    is ignored. Raises InputError naming `path` (and the tensor where there is one) on: a file
    over MAX_HEADER_BYTES, bad UTF-8, bad or non-standard JSON (NaN, Infinity), nesting too deep,
    duplicate keys, a top level that is not an object, a missing, non-object or empty weight_map,
    a shard name that is not a string, is empty, or is absolute or leads outside the folder
    through '..', and names or metadata that are not valid Unicode (lone surrogate escapes).
    """
    if len(raw) > MAX_HEADER_BYTES:
        raise InputError(f"index of {len(raw)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit", path=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"cannot read sharded-checkpoint index (not valid UTF-8: {e})", path=path) from None
    try:
        index = _loads(text, strict_constants=True)
    except RecursionError:
        raise InputError("cannot read sharded-checkpoint index (JSON nested too deeply)", path=path) from None
    except ValueError as e:
        raise InputError(f"cannot read sharded-checkpoint index (not valid JSON: {e})", path=path) from None
    no_map = "index has no 'weight_map' of tensor name -> shard file"
    if not isinstance(index, dict):
        raise InputError(f"{no_map} (its top level is {_JSON_KIND.get(type(index), 'not an object')})", path=path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        got = "missing" if "weight_map" not in index else _JSON_KIND.get(type(weight_map), "not an object")
        raise InputError(f"{no_map} ('weight_map' is {got})", path=path)
    if not weight_map:
        raise InputError("index's weight_map is empty", path=path)
    check_unicode = _may_hold_surrogates(text)
    for name, shard in weight_map.items():
        if check_unicode and not _is_unicode(name):
            raise InputError(f"tensor name {_r(name)} in the weight_map is not valid Unicode", path=path)
        if type(shard) is not str:
            raise InputError(f"{no_map} (the shard of this tensor is {_r(shard)}, not a string)", path=path, tensor=name)
        if check_unicode and not _is_unicode(shard):
            raise InputError(f"shard {_r(shard)} is not valid Unicode", path=path, tensor=name)
        problem = _shard_problem(shard)
        if problem is not None:
            raise InputError(f"shard {_q(shard)} {problem}", path=path, tensor=name)

    metadata: dict[str, str] = {}
    meta = index.get("metadata")
    if isinstance(meta, dict):
        for key, value in meta.items():
            try:
                text_value = value if type(value) is str else json.dumps(value, ensure_ascii=False)
            except RecursionError:
                raise InputError(f"metadata {_q(key)} is nested too deeply", path=path) from None
            if check_unicode and not (_is_unicode(key) and _is_unicode(text_value)):
                raise InputError(f"metadata {_r(key)} is not valid Unicode", path=path)
            metadata[key] = text_value
    return dict(weight_map), metadata

"""safetensors format constants and header parsing/validation (pure Python, no I/O)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from soupkern.errors import HeaderError

# dtype name -> item size in bytes (every dtype the safetensors library knows)
DTYPES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# dtypes that are averaged; everything else is passed through when identical in every ingredient
FLOAT_DTYPES: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16"})
MAX_HEADER_BYTES = 100_000_000
_U64 = 2**64
METADATA_KEY = "__metadata__"


def dtype_itemsize(dtype: str) -> int:
    return DTYPES[dtype]


@dataclass(frozen=True)
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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


def parse_header(
    raw: bytes, data_len: int, path: str
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and fully validate a header; offsets are returned relative to the file start.

    `raw` is the N header bytes, `data_len` the size of the data region after them. Raises
    HeaderError naming `path` (and the tensor) on any violation: bad UTF-8/JSON, unknown
    dtype, bad shape, byte length != numel * itemsize, offsets outside the data region,
    overlapping tensors or holes between them.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"header is not valid UTF-8 ({e})", path=path) from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise HeaderError(f"header is not valid JSON ({e})", path=path) from None
    if not isinstance(obj, dict):
        raise HeaderError("header JSON is not an object", path=path)

    metadata: dict[str, str] = {}
    meta = obj.pop(METADATA_KEY, None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise HeaderError("__metadata__ must map strings to strings", path=path)
        metadata = meta

    for key, value in [*obj.items(), *metadata.items()]:
        for text in (key, value) if isinstance(value, str) else (key,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON escapes can spell lone surrogates, which UTF-8 cannot
                raise HeaderError(f"name or metadata {text!r} is not valid Unicode", path=path) from None

    base = 8 + len(raw)
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in obj.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError("entry must be an object with exactly dtype, shape and data_offsets", path=path, tensor=name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise HeaderError(f"unknown dtype {dtype!r}", path=path, tensor=name)
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < _U64 for d in shape):
            raise HeaderError(f"shape must be a list of non-negative integers below 2^64, got {shape!r}", path=path, tensor=name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise HeaderError(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}", path=path, tensor=name)
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype]
        if any(math.prod(shape[: i + 1]) * DTYPES[dtype] >= _U64 for i in range(len(shape))) and expected:
            raise HeaderError(f"shape {shape} overflows a 64-bit byte count", path=path, tensor=name)
        if end - begin != expected:
            raise HeaderError(
                f"byte length {end - begin} does not match shape {shape} x {DTYPES[dtype]} bytes ({dtype}) = {expected}",
                path=path, tensor=name,
            )
        if end > data_len:
            raise HeaderError(f"data_offsets {offsets} run past the end of the data region ({data_len} bytes)", path=path, tensor=name)
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), base + begin, base + end)

    # Tensors must tile [0, data_len) exactly, as the safetensors library requires.
    spans.sort()
    cursor, prev = 0, None
    for begin, end, name in spans:
        if begin < cursor:
            raise HeaderError(f"data overlaps tensor '{prev}'", path=path, tensor=name)
        if begin > cursor:
            raise HeaderError(f"hole of {begin - cursor} bytes before this tensor's data", path=path, tensor=name)
        cursor, prev = end, name
    if cursor != data_len:
        raise HeaderError(f"tensors cover {cursor} bytes but the data region has {data_len} (trailing bytes)", path=path)
    return tensors, metadata

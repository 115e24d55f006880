"""Helpers shared by the io tests: hand-built safetensors files, checkpoints, file fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# safetensors dtype name -> torch dtype, for every dtype this torch can make
TORCH_OF: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in [("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")]:
    if hasattr(torch, _attr):
        TORCH_OF[_name] = getattr(torch, _attr)

FLOATS = ("F64", "F32", "F16", "BF16")


def random_tensor(shape: tuple[int, ...], dtype: str, gen: torch.Generator) -> torch.Tensor:
    """Random values of `dtype` (any safetensors dtype torch knows)."""
    td = TORCH_OF[dtype]
    if dtype in FLOATS or dtype.startswith("F8"):
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(td)
    if dtype == "BOOL":
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    hi = {"I8": 127, "U8": 255, "I16": 32767}.get(dtype, 1 << 30)
    lo = 0 if dtype.startswith("U") else -hi
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(td)


def raw_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes safetensors stores for `t`."""
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return bytes(t.view(torch.uint8).numpy().tobytes())


def header_bytes(header: Any) -> bytes:
    if isinstance(header, bytes):
        return header
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def write_raw(path: Path, header: Any, data: bytes = b"", *, length: int | None = None, pad: bool = False) -> Path:
    """Write 8-byte little-endian length + header (a JSON-able object or raw bytes) + data."""
    raw = header_bytes(header)
    if pad:
        raw += b" " * (-len(raw) % 8)
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path), metadata=metadata)
    return path


def write_sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str] | None = None,
                  index_extra: dict | None = None) -> Path:
    """Write shard files and an HF-style model.safetensors.index.json; returns the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    wm: dict[str, str] = {}
    total = 0
    for fname, tensors in shards.items():
        save(folder / fname, tensors)
        for k, v in tensors.items():
            wm[k] = fname
            total += v.numel() * v.element_size()
    if weight_map is not None:
        wm = weight_map
    index = {"metadata": {"total_size": total}, "weight_map": wm, **(index_extra or {})}
    p = folder / "model.safetensors.index.json"
    p.write_text(json.dumps(index, indent=2))
    return p


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fingerprint(path: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return sha256(path), st.st_mtime_ns, st.st_size


def listing(folder: Path) -> list[str]:
    """Every entry of a folder, hidden ones included, sorted."""
    return sorted(os.listdir(folder))

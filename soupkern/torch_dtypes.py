"""safetensors dtype name -> torch dtype, and torch views of raw bytes (imported only where torch is used)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from soupkern.io.buffers import Bytes

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def byte_tensor(raw: Bytes) -> torch.Tensor:
    """Zero-copy 1-d uint8 CPU tensor over the bytes of `raw` (a memoryview or uint8 array).
    Mapped input bytes are read-only: never write through the tensor."""
    with warnings.catch_warnings():  # torch warns that a read-only buffer is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8))


def torch_view(raw: Bytes, dtype: str) -> torch.Tensor:
    """Zero-copy 1-d view of bytes `raw` as `dtype` (read-only for mapped bytes, as byte_tensor)."""
    return byte_tensor(raw).view(TORCH_DTYPES[dtype])

"""safetensors dtype name -> torch dtype, and torch views of raw bytes (imported only where torch is used)."""

import warnings

import numpy as np
import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def torch_view(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """Zero-copy 1-d view of uint8 bytes `raw` as `dtype`. Mapped input bytes are read-only:
    never write through the view."""
    with warnings.catch_warnings():  # torch warns that a read-only array is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw).view(TORCH_DTYPES[dtype])

"""The only layer that knows checkpoint formats: a validating mmap reader of safetensors, the other
tensor sources (PyTorch pickles, DCP folders, in-memory state dicts: sources.py), and a streaming
safetensors writer."""

from soupkern.io.format import DTYPES, FLOAT_DTYPES, TensorInfo, dtype_itemsize
from soupkern.io.reader import Checkpoint, SafetensorsFile, open_checkpoint
from soupkern.io.writer import OutputTensor, SoupWriter, plan_output

__all__ = [
    "DTYPES",
    "FLOAT_DTYPES",
    "Checkpoint",
    "OutputTensor",
    "SafetensorsFile",
    "SoupWriter",
    "TensorInfo",
    "dtype_itemsize",
    "open_checkpoint",
    "plan_output",
]

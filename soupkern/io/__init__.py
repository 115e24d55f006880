"""The only layer that knows the safetensors format: a validating mmap reader and a streaming writer."""

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

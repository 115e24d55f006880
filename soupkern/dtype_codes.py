"""Dtype codes of csrc/soupkern.h's ``DType``: the one Python definition, used by the Triton
kernels' tables and compile-time codes and equal to the CUDA extension's constants (the C++
host kernel takes the same numbers)."""

F64 = 0
F32 = 1
F16 = 2
BF16 = 3

DTYPE_CODES: dict[str, int] = {"F64": F64, "F32": F32, "F16": F16, "BF16": BF16}  # safetensors name -> code

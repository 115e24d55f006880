"""The plain torch backend: the exact-arithmetic contract (csrc/soupkern.h) in ordinary torch ops.

fp64 accumulation in the same order, the same IEEE division and the same single rounding to the
output, so a uniform soup (weights 1, divisor K) is bit-identical to the C++ kernel. For other
weights, multiply and add are separate roundings (torch has no guaranteed fused multiply-add on
CPU): the fp64 accumulator may differ from the C++ one in its last bit, which changes the output
only where that straddles an output rounding boundary.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from soupkern.io import dtype_itemsize


class TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

    def _tensor(self, buf: np.ndarray, dtype: str, n: int):  # -> torch.Tensor
        with warnings.catch_warnings():  # read-only mmap views: we never write through them
            warnings.simplefilter("ignore", UserWarning)
            return self.torch.from_numpy(buf[: n * dtype_itemsize(dtype)]).view(self.dtypes[dtype])

    def weighted_sum(
        self,
        out: np.ndarray,
        out_dtype: str,
        inputs: Sequence[np.ndarray],
        in_dtypes: Sequence[str],
        weights: Sequence[float],
        n: int,
        divisor: float = 1.0,
    ) -> None:
        if n == 0:
            return
        torch = self.torch
        acc = None
        for buf, dt, w in zip(inputs, in_dtypes, weights):
            x = self._tensor(buf, dt, n).to(torch.float64)
            if acc is None:
                acc = x * float(w)  # out of place: x may be the (read-only) input itself
            elif w == 1.0:
                acc.add_(x)  # x * 1 is exact: this is the contract's fma exactly
            else:
                acc.add_(x * float(w))
        assert acc is not None
        if divisor != 1.0:
            acc.div_(torch.tensor(float(divisor), dtype=torch.float64))
        if out_dtype in ("F16", "BF16"):
            acc = f64_to_f32_odd(torch, acc)  # torch rounds fp64 -> half through fp32: twice
        self._tensor(out, out_dtype, n).copy_(acc)


def f64_to_f32_odd(torch, d):  # (module, torch.Tensor) -> torch.Tensor
    """fp64 -> fp32 rounded to odd (truncate toward zero, set the last bit if inexact); a second
    rounding to nearest-even F16/BF16 is then the correct single rounding of the fp64 value."""
    f = d.to(torch.float32)
    back = f.to(torch.float64)
    bits = f.view(torch.int32)
    inexact = (back != d) & ~torch.isnan(d)
    bits = torch.where(inexact & (back.abs() > d.abs()), bits - 1, bits)
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32)


def load() -> tuple[TorchBackend | None, str]:
    try:
        backend = TorchBackend()
    except ImportError as e:
        return None, f"torch is not installed ({e})"
    return backend, f"torch {backend.torch.__version__} on CPU"

"""The plain torch backend: same contract as the C++ kernel in ordinary torch ops.

fp32 (or fp64) accumulation in the same order, but multiply and add are separate roundings
(torch has no guaranteed fused multiply-add on CPU), so its results may differ from the C++
backend in the last bit of the accumulator; both stay within the same error bound.
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
    ) -> None:
        if n == 0:
            return
        wide = out_dtype == "F64" or "F64" in in_dtypes
        acc_dtype = self.torch.float64 if wide else self.torch.float32
        acc = None
        for buf, dt, w in zip(inputs, in_dtypes, weights):
            x = self._tensor(buf, dt, n).to(acc_dtype)
            w_acc = float(np.float64(w) if wide else np.float32(w))
            if acc is None:
                acc = x * w_acc  # out of place: x may be the (read-only) input itself
            else:
                acc.add_(x, alpha=w_acc)
        if wide and out_dtype in ("F16", "BF16"):
            acc = self._f64_to_f32_odd(acc)  # torch rounds fp64 -> half through fp32: twice
        self._tensor(out, out_dtype, n).copy_(acc)

    def _f64_to_f32_odd(self, d):  # (torch.Tensor) -> torch.Tensor
        """fp64 -> fp32 rounded to odd; a second rounding to F16/BF16 is then correct."""
        torch = self.torch
        f = d.to(torch.float32)
        back = f.to(torch.float64)
        bits = f.view(torch.int32)
        fix = (back != d) & ((bits & 1) == 0) & ~torch.isnan(d)
        step = torch.where((back < d) == (f > 0), 1, -1).to(torch.int32)
        return torch.where(fix, bits + step, bits).view(torch.float32)


def load() -> tuple[TorchBackend | None, str]:
    try:
        backend = TorchBackend()
    except ImportError as e:
        return None, f"torch is not installed ({e})"
    return backend, f"torch {backend.torch.__version__} on CPU"

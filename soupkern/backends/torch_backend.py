"""The plain torch backend: the exact-arithmetic contract (csrc/soupkern.h) in ordinary torch ops.

fp64 accumulation in the same order, the same IEEE division and the same single rounding to the
output, so a uniform soup (weights 1, divisor K) is bit-identical to the C++ kernel. For other
weights, multiply and add are separate roundings (torch has no guaranteed fused multiply-add on
CPU): the fp64 accumulator may differ from the C++ one in its last bit, which changes the output
only where that straddles an output rounding boundary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from soupkern.io import dtype_itemsize

if TYPE_CHECKING:
    from soupkern.io.buffers import Bytes


class TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        import torch

        from soupkern.torch_dtypes import byte_tensor

        self.torch = torch
        self._bytes = byte_tensor
        self.dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

    def _tensor(self, buf: Bytes, dtype: str, n: int):  # -> torch.Tensor
        return self._bytes(buf[: n * dtype_itemsize(dtype)]).view(self.dtypes[dtype])  # never written when read-only

    def weighted_sum(
        self,
        out: Bytes,
        out_dtype: str,
        inputs: Sequence[Bytes],
        in_dtypes: Sequence[str],
        weights: Sequence[float],
        n: int,
        divisor: float = 1.0,
    ) -> None:
        if n == 0:
            return
        xs = [self._tensor(buf, dt, n) for buf, dt in zip(inputs, in_dtypes)]
        out_t = self._tensor(out, out_dtype, n)
        out_t.copy_(round_f64(fp64_weighted_sum(xs, weights, divisor), out_t.dtype))


def fp64_weighted_sum(xs: Sequence[Any], weights: Sequence[float], divisor: float = 1.0) -> Any:
    """(sum_k w_k x_k) / divisor as a new fp64 tensor, k in order: the contract's accumulation in
    torch ops (an exact add where w_k = 1; otherwise multiply, then add), one IEEE division. The
    divisor is a 0-dim tensor: torch on CUDA turns division by a Python number into a
    multiplication by its rounded reciprocal."""
    import torch

    acc = None
    for x, w in zip(xs, weights):
        x64 = x.reshape(-1).to(torch.float64)
        if acc is None:
            acc = x64 * float(w)  # out of place: x may be the (read-only) input itself
        elif w == 1.0:
            acc.add_(x64)  # x * 1 is exact: this is the contract's fma exactly
        else:
            acc.add_(x64 * float(w))
    if acc is None:
        raise ValueError("a weighted sum needs at least one input")
    if divisor != 1.0:
        acc.div_(torch.full((), float(divisor), dtype=torch.float64, device=acc.device))
    return acc


def round_f64(acc: Any, dtype: Any) -> Any:
    """fp64 values rounded once to `dtype` (nearest even). torch converts fp64 to fp16/bf16 through
    fp32, rounding twice; round-to-odd fp32 first makes the second rounding the correct one."""
    import torch

    if dtype == torch.bfloat16:
        f = f64_to_f32_odd(torch, acc)
        # torch writes every NaN as 0xFFFF; the contract keeps sign and payload, quieted, as the
        # kernels do: the fp32 NaN's top 16 bits with the quiet bit set
        quiet = ((f.view(torch.int32) >> 16) | 0x40).to(torch.int16)
        return torch.where(torch.isnan(f), quiet, f.to(dtype).view(torch.int16)).view(dtype)
    if dtype == torch.float16:
        return f64_to_f32_odd(torch, acc).to(dtype)
    return acc.to(dtype)


def f64_to_f32_odd(torch: Any, d: Any) -> Any:
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

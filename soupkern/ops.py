"""soupkern's kernels as torch operators (`torch.library.custom_op`), so they compose with
`torch.compile`, `torch.func` tracing and `torch.library.opcheck`.

    soupkern::weighted_sum(Tensor[] inputs, float[] weights, float divisor, ScalarType? dtype) -> Tensor

returns round((Σ_k w_k · inputs[k]) / divisor) under the exact-arithmetic contract of
csrc/soupkern.h: fp64 accumulation in input order (fused multiply-adds), one IEEE division, one
rounding to `dtype` (default: inputs[0]'s). Inputs: same shape, fp32 / fp16 / bf16 / fp64, any
mix, on one device. On the CPU the C++ kernel computes it; on a GPU the device kernels
(soupkern.backends.device). It is a pure function (no aliasing, no mutation) and has no autograd
formula (souping is not differentiated; the learned soup differentiates its own mixing).
"""

from __future__ import annotations

from typing import Sequence

import torch

from soupkern.errors import InputError

_CODES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def _check(inputs: Sequence[torch.Tensor], weights: Sequence[float], divisor: float) -> None:
    if not inputs or len(inputs) != len(weights):
        raise InputError(f"weighted_sum: {len(inputs)} inputs and {len(weights)} weights (need K >= 1 of each)")
    shape, device = inputs[0].shape, inputs[0].device
    for i, x in enumerate(inputs):
        if x.dtype not in _CODES:
            raise InputError(f"weighted_sum: input {i} has dtype {x.dtype}; fp64, fp32, fp16 or bf16 are averaged")
        if x.shape != shape or x.device != device:
            raise InputError(f"weighted_sum: input {i} is {tuple(x.shape)} on {x.device}, input 0 {tuple(shape)} on {device}")
    if not divisor > 0 or divisor == float("inf"):
        raise InputError(f"weighted_sum: divisor must be a positive finite number, got {divisor}")


@torch.library.custom_op("soupkern::weighted_sum", mutates_args=())
def weighted_sum(inputs: list[torch.Tensor], weights: list[float], divisor: float = 1.0,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """round((Σ_k weights[k] · inputs[k]) / divisor) to `dtype` (default inputs[0]'s): see the
    module docstring."""
    _check(inputs, weights, divisor)
    out_dtype = dtype or inputs[0].dtype
    if out_dtype not in _CODES:
        raise InputError(f"weighted_sum: output dtype {out_dtype} is not fp64, fp32, fp16 or bf16")
    xs = [x.contiguous() for x in inputs]
    out = torch.empty(xs[0].shape, dtype=out_dtype, device=xs[0].device)
    if out.numel() == 0:
        return out
    if out.device.type == "cpu":
        from soupkern import _native  # type: ignore[attr-defined]

        _native.weighted_sum_many([out.data_ptr()], [_CODES[out_dtype]], [x.data_ptr() for x in xs],
                                  [_CODES[x.dtype] for x in xs], [out.numel()], [float(w) for w in weights],
                                  [float(divisor)], len(xs))
        return out
    if out_dtype == torch.float64 or any(x.dtype == torch.float64 for x in xs):  # the device kernels take no fp64
        from soupkern.backends.torch_backend import fp64_weighted_sum, round_f64

        return round_f64(fp64_weighted_sum(xs, weights, divisor), out_dtype).view(out.shape)
    from soupkern.backends.device import device_kernels

    device_kernels(out.device).weighted_sum(out, xs, [float(w) for w in weights], float(divisor))
    return out


@weighted_sum.register_fake
def _(inputs: list[torch.Tensor], weights: list[float], divisor: float = 1.0,
      dtype: torch.dtype | None = None) -> torch.Tensor:
    _check(inputs, weights, divisor)
    return inputs[0].new_empty(inputs[0].shape, dtype=dtype or inputs[0].dtype)

"""Kernels on torch tensors that live on a device (GPU, or CPU under the Triton interpreter).

Every implementation (torch, Triton, CUDA) follows the contracts below; Triton and CUDA are
bit-identical to each other and to the C++ host kernel (fused multiply-add in the same order).

weighted_sum(out, inputs, weights):
    acc = w_0 * x_0; acc = fma(w_k, x_k, acc) for k = 1..K-1, in fp32 (weights rounded to fp32
    first); out = acc rounded once to out's dtype (round to nearest even; NaN stays NaN).
    Inputs and output fp32 / fp16 / bf16, contiguous, same number of elements.
    Bytes moved: sum of input bytes + output bytes.
multi_weighted_sum(outs, inputs, weights):
    the same for many tensors at once: inputs[t][k] is ingredient k's copy of tensor t and
    outs[t] receives it. One launch for the whole table where the backend supports it.
greedy_candidate(outs, sums, xs, n):
    outs[t] = round(((sums[t] + float(xs[t])) / (n + 1))): fp32 add, IEEE fp32 division, one
    rounding to outs[t]'s dtype. sums are fp32 running sums of n ingredients.
    Bytes moved: 4 + x itemsize + out itemsize per element.
greedy_accept(sums, xs):
    sums[t] += float(xs[t]) in fp32. Bytes moved: 8 + x itemsize per element.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import torch


class DeviceKernels(Protocol):
    name: str

    def weighted_sum(self, out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float]) -> None: ...

    def multi_weighted_sum(self, outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                           weights: Sequence[float]) -> None: ...

    def greedy_candidate(self, outs: Sequence[torch.Tensor], sums: Sequence[torch.Tensor],
                         xs: Sequence[torch.Tensor], n: int) -> None: ...

    def greedy_accept(self, sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> None: ...


class TorchDeviceKernels:
    """The contracts in plain torch ops, on any device.

    greedy_candidate / greedy_accept are bit-identical to the fused kernels (add and division
    are single IEEE operations). weighted_sum rounds the product and the sum separately (no
    guaranteed fma), so it may differ from the fused kernels in the accumulator's last bit.
    """

    name = "torch"

    def weighted_sum(self, out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
        import numpy as np
        import torch

        acc = None
        for x, w in zip(inputs, weights):
            w32 = float(np.float32(w))
            if acc is None:
                acc = x.to(torch.float32) * w32
            else:
                acc.add_(x.to(torch.float32), alpha=w32)
        if acc is not None:
            out.copy_(acc.view(out.shape))

    def multi_weighted_sum(self, outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                           weights: Sequence[float]) -> None:
        for out, xs in zip(outs, inputs):
            self.weighted_sum(out, xs, weights)

    def greedy_candidate(self, outs: Sequence[torch.Tensor], sums: Sequence[torch.Tensor],
                         xs: Sequence[torch.Tensor], n: int) -> None:
        import torch

        for out, s, x in zip(outs, sums, xs):
            out.copy_((s + x.to(torch.float32)).div_(float(n + 1)).view(out.shape))

    def greedy_accept(self, sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> None:
        import torch

        for s, x in zip(sums, xs):
            s.add_(x.to(torch.float32).view(s.shape))

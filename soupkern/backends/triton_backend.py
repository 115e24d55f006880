"""The Triton backend: soupkern/kernels/{weighted_sum,multi_weighted_sum,greedy_update}.py.

`TritonKernels` implements the DeviceKernels protocol (soupkern/backends/device.py) on CUDA
tensors, bit-identical to the C++ kernel; under TRITON_INTERPRET=1 the same kernels run on CPU
tensors in Triton's interpreter (slow; for tests). It also implements the host `Backend`
protocol (byte buffers in, byte buffers out) by copying to the device, running the kernel and
copying back: correct, but not the fast path (the overlapped host-to-device pipeline is built on
the device methods). F64 buffers, which the GPU kernels do not take, are computed on the host by
the torch backend (fp64 accumulator, the contract for F64).

`load()` never raises and touches no GPU: it imports triton and the kernels and asks
torch.cuda.is_available(). TRITON_INTERPRET must be set before the kernel modules are first
imported (Triton decides interpreter or compiler when a kernel is defined).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence, overload

import numpy as np

from soupkern.backends.torch_backend import TorchBackend
from soupkern.io import dtype_itemsize

if TYPE_CHECKING:
    import torch

GPU_DTYPES = ("F32", "F16", "BF16")


class TritonKernels:
    name = "triton"

    def __init__(self) -> None:
        import torch

        from soupkern.kernels import greedy_update, multi_weighted_sum, weighted_sum

        self._ws = weighted_sum
        self._mws = multi_weighted_sum
        self._greedy = greedy_update
        self._host = TorchBackend()  # byte views -> tensors, and the F64 path
        self.interpreted = weighted_sum.interpreted()  # CPU interpreter: correct but slow
        self.device = torch.device("cpu" if self.interpreted else "cuda")

    # weighted_sum serves both protocols, told apart by the type of `out`
    @overload
    def weighted_sum(self, out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float],
                     divisor: float = 1.0) -> None: ...

    @overload
    def weighted_sum(self, out: np.ndarray, out_dtype: str, inputs: Sequence[np.ndarray], in_dtypes: Sequence[str],
                     weights: Sequence[float], n: int, divisor: float = 1.0) -> None: ...

    def weighted_sum(self, out: Any, *args: Any, **kwargs: Any) -> None:
        """DeviceKernels.weighted_sum(out, inputs, weights, divisor) on device tensors, or
        Backend.weighted_sum(out, out_dtype, inputs, in_dtypes, weights, n, divisor) on host bytes."""
        if isinstance(out, np.ndarray):
            self.weighted_sum_bytes(out, *args, **kwargs)
        else:
            self._ws.weighted_sum(out, *args, **kwargs)

    # DeviceKernels: torch tensors on the device

    def multi_weighted_sum(self, outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                           weights: Sequence[float], divisor: float = 1.0) -> None:
        self._mws.multi_weighted_sum(outs, inputs, weights, divisor)

    def greedy_candidate(self, outs: Sequence[torch.Tensor], sums: Sequence[torch.Tensor],
                         xs: Sequence[torch.Tensor], n: int) -> None:
        self._greedy.greedy_candidate(outs, sums, xs, n)

    def greedy_accept(self, sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> None:
        self._greedy.greedy_accept(sums, xs)

    # Backend: raw little-endian byte buffers on the host (see soupkern/backends/__init__.py)
    def weighted_sum_bytes(
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
        if out_dtype not in GPU_DTYPES or any(d not in GPU_DTYPES for d in in_dtypes):
            self._host.weighted_sum(out, out_dtype, inputs, in_dtypes, weights, n, divisor)
            return
        xs = [self._host._tensor(buf, dt, n).to(self.device) for buf, dt in zip(inputs, in_dtypes)]
        host_out = self._host._tensor(out[: n * dtype_itemsize(out_dtype)], out_dtype, n)
        if host_out.device == self.device:  # interpreter: write in place
            self._ws.weighted_sum(host_out, xs, weights, divisor)
        else:
            host_out.copy_(self._ws.weighted_sum(host_out.new_empty(n, device=self.device), xs, weights, divisor))


def load() -> tuple[TritonKernels | None, str]:
    try:
        import triton
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to report
        return None, f"triton is not importable ({type(e).__name__}: {e})"
    try:
        import torch

        from soupkern.kernels.weighted_sum import interpreted

        if not interpreted() and not torch.cuda.is_available():
            return None, ("no CUDA GPU (torch.cuda.is_available() is False); set TRITON_INTERPRET=1 to run the "
                          "Triton kernels in the CPU interpreter (slow, for tests)")
        backend = TritonKernels()
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"
    where = "the CPU interpreter (TRITON_INTERPRET=1)" if interpreted() else "CUDA"
    return backend, f"triton {triton.__version__} on {where}"


if TYPE_CHECKING:  # TritonKernels satisfies both protocols (checked by mypy)
    from soupkern.backends import Backend
    from soupkern.backends.device import DeviceKernels

    def _protocols(k: TritonKernels) -> tuple[DeviceKernels, Backend]:
        return k, k

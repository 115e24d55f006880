"""The Triton backend: soupkern/kernels/{weighted_sum,multi_weighted_sum,greedy_update}.py.

`TritonKernels` implements the DeviceKernels protocol (soupkern/backends/device.py) on CUDA
tensors, bit-identical to the C++ kernel; under TRITON_INTERPRET=1 the same kernels run on CPU
tensors in Triton's interpreter (slow; for tests). Host byte buffers reach them through
`soupkern.backends.device.HostAdapter` (`get_backend("triton")`), which copies to the device,
runs the kernel and copies back: correct, but not the fast path (the overlapped host-to-device
pipeline is built on the device methods).

`load()` never raises and touches no GPU: it imports triton and the kernels and asks
torch.cuda.is_available(). TRITON_INTERPRET must be set before the kernel modules are first
imported (Triton decides interpreter or compiler when a kernel is defined).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

class TritonKernels:
    name = "triton"

    def __init__(self) -> None:
        import torch

        from soupkern.kernels import greedy_update, multi_weighted_sum, weighted_sum

        self._ws = weighted_sum
        self._mws = multi_weighted_sum
        self._greedy = greedy_update
        self.interpreted = weighted_sum.interpreted()  # CPU interpreter: correct but slow
        self.device = torch.device("cpu" if self.interpreted else "cuda")

    def weighted_sum(self, out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float],
                     divisor: float = 1.0) -> None:
        self._ws.weighted_sum(out, inputs, weights, divisor)

    def multi_weighted_sum(self, outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                           weights: Sequence[float], divisor: float = 1.0) -> None:
        self._mws.multi_weighted_sum(outs, inputs, weights, divisor)

    def greedy_candidate(self, outs: Sequence[torch.Tensor], sums: Sequence[torch.Tensor],
                         xs: Sequence[torch.Tensor], n: int) -> None:
        self._greedy.greedy_candidate(outs, sums, xs, n)

    def greedy_accept(self, sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> None:
        self._greedy.greedy_accept(sums, xs)


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

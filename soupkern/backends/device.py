"""Kernels on torch tensors that live on a device (GPU, or CPU under the Triton interpreter).

Every implementation (torch, Triton, CUDA) follows the contracts below; Triton and CUDA are
bit-identical to each other and to the C++ host kernel (fused multiply-add in the same order).

weighted_sum(out, inputs, weights, divisor=1.0):
    the exact-arithmetic contract of csrc/soupkern.h: acc = w_0 * x_0; acc = fma(w_k, x_k, acc)
    for k = 1..K-1 in fp64 (fp64 weights); acc / divisor by one IEEE division when divisor != 1;
    out = acc rounded once to out's dtype (nearest even; NaN stays NaN). Inputs and output
    fp32 / fp16 / bf16, contiguous, same number of elements.
    Bytes moved: sum of input bytes + output bytes.
multi_weighted_sum(outs, inputs, weights, divisor=1.0):
    the same for many tensors at once: inputs[t][k] is ingredient k's copy of tensor t and
    outs[t] receives it. One launch for the whole table where the backend supports it.
greedy_candidate(outs, sums, xs, n):
    outs[t] = round((sums[t] + float64(xs[t])) / (n + 1)): fp64 add, IEEE fp64 division, one
    rounding to outs[t]'s dtype. sums are fp64 running sums of n ingredients (the uniform
    contract's accumulator over the kept ingredients in order), so the candidate is bit for bit
    the uniform soup of those n + 1 ingredients; 0 <= n and n + 1 <= 2^53.
    Bytes moved: 8 + x itemsize + out itemsize per element.
greedy_accept(sums, xs):
    sums[t] += float64(xs[t]) (the first accept into zeros gives x exactly). Bytes moved:
    16 + x itemsize per element.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence

from soupkern.backends.torch_backend import fp64_weighted_sum, round_f64
from soupkern.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import torch


class DeviceKernels(Protocol):
    name: str

    def weighted_sum(self, out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float],
                     divisor: float = 1.0) -> None: ...

    def multi_weighted_sum(self, outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                           weights: Sequence[float], divisor: float = 1.0) -> None: ...

    def greedy_candidate(self, outs: Sequence[torch.Tensor], sums: Sequence[torch.Tensor],
                         xs: Sequence[torch.Tensor], n: int) -> None: ...

    def greedy_accept(self, sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> None: ...


class TorchDeviceKernels:
    """The contracts in plain torch ops, on any device.

    greedy_candidate / greedy_accept are bit-identical to the fused kernels (add and division
    are single IEEE operations; the divisor is a 0-dim tensor on the sums' device, because torch
    on CUDA turns division by a Python number into multiplication by its rounded reciprocal,
    which can differ in the last bit). weighted_sum rounds the product and the sum separately (no
    guaranteed fma), so it may differ from the fused kernels in the accumulator's last bit.
    """

    name = "torch"

    def weighted_sum(self, out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float],
                     divisor: float = 1.0) -> None:
        _check_operands(out, inputs, weights)
        out.copy_(round_f64(fp64_weighted_sum(inputs, weights, divisor), out.dtype).view(out.shape))

    def multi_weighted_sum(self, outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                           weights: Sequence[float], divisor: float = 1.0) -> None:
        if len(outs) != len(inputs):
            raise InputError(f"multi_weighted_sum: {len(outs)} outputs for {len(inputs)} input rows")
        for out, xs in zip(outs, inputs):
            self.weighted_sum(out, xs, weights, divisor)

    def greedy_candidate(self, outs: Sequence[torch.Tensor], sums: Sequence[torch.Tensor],
                         xs: Sequence[torch.Tensor], n: int) -> None:
        _check_n(n)
        if not len(outs) == len(sums) == len(xs):
            raise InputError(f"greedy_candidate: {len(outs)} outputs, {len(sums)} sums, {len(xs)} ingredients")
        for out, s, x in zip(outs, sums, xs):  # (1·s + x) / (n + 1): s * 1 and the add are exact
            out.copy_(round_f64(fp64_weighted_sum([s, x], [1.0, 1.0], n + 1), out.dtype).view(out.shape))

    def greedy_accept(self, sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> None:
        import torch

        for s, x in zip(sums, xs):
            s.add_(x.to(torch.float64).view(s.shape))


class HostAdapter:
    """The host `Backend` protocol (byte buffers; soupkern/backends/__init__.py) over device
    kernels: the inputs are copied to the kernels' device, one kernel call, the result copied
    back (in place under the Triton interpreter, whose device is the CPU). F64 buffers, which
    the device kernels do not take, are computed on the host by the torch backend (the contract
    for F64). Correct, not fast: the streaming pipeline (soupkern/gpu_engine.py) is the fast path."""

    def __init__(self, kernels: DeviceKernels, device: torch.device):
        from soupkern.backends.torch_backend import TorchBackend

        self.kernels = kernels
        self.name = kernels.name
        self.device = device
        self._host = TorchBackend()  # byte views -> tensors, and the F64 path

    def weighted_sum(self, out: np.ndarray, out_dtype: str, inputs: Sequence[np.ndarray], in_dtypes: Sequence[str],
                     weights: Sequence[float], n: int, divisor: float = 1.0) -> None:
        from soupkern.io import dtype_itemsize

        if n == 0:
            return
        if out_dtype == "F64" or "F64" in in_dtypes:
            self._host.weighted_sum(out, out_dtype, inputs, in_dtypes, weights, n, divisor)
            return
        xs = [self._host._tensor(buf, dt, n).to(self.device) for buf, dt in zip(inputs, in_dtypes)]
        host_out = self._host._tensor(out[: n * dtype_itemsize(out_dtype)], out_dtype, n)
        if host_out.device == self.device:
            self.kernels.weighted_sum(host_out, xs, weights, divisor)
        else:
            result = host_out.new_empty(n, device=self.device)
            self.kernels.weighted_sum(result, xs, weights, divisor)
            host_out.copy_(result)


def _check_n(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n + 1 > 1 << 53:
        raise InputError(f"n must be an int with 0 <= n and n + 1 <= 2^53 (exact in fp64), got {n!r}")


def _check_operands(out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    import torch

    supported = (torch.float32, torch.float16, torch.bfloat16)
    if not inputs or len(inputs) != len(weights):
        raise InputError(f"weighted_sum: {len(inputs)} inputs and {len(weights)} weights (need K >= 1 of each)")
    for i, t in enumerate([out, *inputs]):
        role = "out" if i == 0 else f"input {i - 1}"
        if t.dtype not in supported:
            raise InputError(f"weighted_sum: {role} has dtype {t.dtype}; device kernels take fp32, fp16, bf16")
        if t.numel() != out.numel():
            raise InputError(f"weighted_sum: {role} has {t.numel()} elements, out has {out.numel()}")


# ---------------------------------------------------------------------------------------------
# choosing device kernels

_choice: dict[str, str] = {}  # device key -> name of the measured fastest device backend


def device_kernels(device: object, name: str | None = None) -> DeviceKernels:
    """Kernels for torch tensors on `device`.

    `name` ("cuda", "triton", "torch"), else $SOUPKERN_BACKEND when it names one of those, else
    automatic: on a CUDA device the faster of the available CUDA and Triton kernels (measured
    once per device and process by `measure`; both give the same bits), else the torch kernels;
    on a CPU device the torch kernels. Triton runs on CPU tensors only under TRITON_INTERPRET=1
    and only when asked for by name. A backend asked for by name that cannot run raises
    BackendUnavailableError with the reason.
    """
    import torch

    from soupkern.backends import DEVICE_BACKENDS, load_backend, log, requested_backend
    from soupkern.errors import BackendUnavailableError

    dev = torch.device(device)  # type: ignore[call-overload]
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    explicit = name is not None
    requested = requested_backend(name)
    if requested == "cpp":
        if explicit:
            raise BackendUnavailableError("backend 'cpp' runs on host buffers, not device tensors")
        requested = None
    if requested == "torch":
        return TorchDeviceKernels()
    if requested is not None:
        kernels: Any = load_backend(requested)
        runs_on = torch.device(getattr(kernels, "device", "cuda")).type  # Triton: cpu when interpreted
        if runs_on == dev.type:
            return kernels  # type: ignore[no-any-return]
        if explicit:
            raise BackendUnavailableError(f"backend '{requested}' runs on {runs_on} tensors here, not on {dev}")
        log.debug("SOUPKERN_BACKEND=%s does not run on %s; choosing automatically", requested, dev)
    if dev.type != "cuda":
        return TorchDeviceKernels()
    usable: dict[str, Any] = {}
    for candidate in DEVICE_BACKENDS:
        try:
            k = load_backend(candidate)
        except BackendUnavailableError as e:
            log.debug("%s", e)
            continue
        if getattr(k, "interpreted", False):
            continue
        usable[candidate] = k
    if not usable:
        log.debug("no CUDA or Triton kernels on %s; using the torch kernels", dev)
        return TorchDeviceKernels()
    key = str(dev)
    if key not in _choice:
        times = measure(dev, usable) if len(usable) > 1 else {next(iter(usable)): 0.0}
        _choice[key] = min(times, key=lambda n: (times[n], n))
        log.debug("device kernels on %s: %s (measured seconds %s)", dev, _choice[key], times)
    return usable[_choice[key]]  # type: ignore[no-any-return]


def measure(device: torch.device, candidates: dict[str, object], repeats: int = 5) -> dict[str, float]:
    """Median seconds per candidate for one soup step: a weighted sum of K = 4 bf16 inputs of
    2^23 elements into bf16 (84 MB moved), plus one multi-tensor launch over 256 tensors of 1664
    elements (bias/norm-sized). Each candidate runs once untimed first (compiles Triton)."""
    import torch

    with torch.cuda.device(device):  # events and launches on `device`, not the current device
        return _measure(torch, device, candidates, repeats)


def _measure(torch: Any, device: torch.device, candidates: dict[str, object], repeats: int) -> dict[str, float]:
    n, small, k = 1 << 23, 1664, 4
    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(n, generator=g, device=device).to(torch.bfloat16) for _ in range(k)]
    out = torch.empty(n, dtype=torch.bfloat16, device=device)
    flat = [torch.randn(256 * small, generator=g, device=device).to(torch.bfloat16) for _ in range(k)]
    outs = list(torch.empty(256 * small, dtype=torch.bfloat16, device=device).split(small))
    rows = [[x[i * small:(i + 1) * small] for x in flat] for i in range(256)]
    w = [0.25] * k
    times = {}
    for name, kern in candidates.items():
        step: DeviceKernels = kern  # type: ignore[assignment]
        samples = []
        for r in range(repeats + 1):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step.weighted_sum(out, xs, w)
            step.multi_weighted_sum(outs, rows, w)
            stop.record()
            stop.synchronize()
            if r:
                samples.append(start.elapsed_time(stop) / 1e3)
        times[name] = sorted(samples)[len(samples) // 2]
    return times

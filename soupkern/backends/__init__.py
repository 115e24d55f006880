"""One dispatch point for the kernels.

Four backends: "cpp" (C++/OpenMP, soupkern._native), "torch" (plain torch ops), "cuda"
(soupkern._cuda) and "triton" (soupkern/kernels). Host kernels implement the contract in
csrc/soupkern.h on raw byte buffers: `weighted_sum(out, out_dtype, inputs, in_dtypes, weights, n, divisor=1.0)`
with `out` writable bytes and each input bytes (`soupkern.io.buffers.Bytes`: flat uint8
memoryviews on the file path, which imports no numpy or torch), dtypes named as in safetensors
(F64, F32, F16, BF16); `get_backend` returns one. Device kernels (device.py's DeviceKernels:
CUDA, Triton, torch) work on torch tensors on a GPU; `device_kernels` returns one, and
file-to-file or to-device soups reach them through the streaming pipeline
(soupkern/gpu_engine.py) when a device backend is asked for. The two protocols are two
registries keyed by where the data lives, and no object implements both: on host buffers the
host backends themselves, and device kernels (Triton under its interpreter, for tests) through a
`device.HostAdapter`; on device tensors `device_kernels`.

Choice: the `backend=` argument, else $SOUPKERN_BACKEND, else automatic. Automatic on host
buffers: the first available of `PREFERENCE` (cpp, torch): a file-to-file soup is bound by
reading its inputs in host memory, which the C++ kernel does at the read floor
(benchmarks/results/kernel_cpu.md), while a GPU adds a pinned copy and a PCIe transfer; the GPU
pipeline is used when asked for by name or given a device. Automatic on a CUDA device: the
faster of cuda and triton, measured once per device and process (device.py); both give the same
bits, so the choice never changes a result. A backend asked for by name that cannot run raises
BackendUnavailableError with the reason; the automatic choice falls back and logs why at debug
level. $SOUPKERN_BACKEND naming a backend of the other kind (a device backend for host buffers,
or the reverse) is ignored there.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from soupkern.errors import BackendUnavailableError

log = logging.getLogger("soupkern")

PREFERENCE = ("cpp", "torch")  # automatic choice for host buffers
DEVICE_BACKENDS = ("cuda", "triton")  # kernels on GPU tensors (Triton also on CPU under TRITON_INTERPRET=1)
ALL_BACKENDS = ("cpp", "torch", "cuda", "triton")
_MODULES = {
    "cpp": "soupkern.backends.cpp",
    "torch": "soupkern.backends.torch_backend",
    "cuda": "soupkern.backends.cuda",
    "triton": "soupkern.backends.triton_backend",
}


class Backend(Protocol):
    name: str

    def weighted_sum(
        self,
        out: Bytes,
        out_dtype: str,
        inputs: Sequence[Bytes],
        in_dtypes: Sequence[str],
        weights: Sequence[float],
        n: int,
        divisor: float = 1.0,
    ) -> None: ...


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


def _probe(name: str) -> tuple[Any, str]:
    try:
        module = importlib.import_module(_MODULES[name])
        return module.load()
    except Exception as e:  # noqa: BLE001 - any failure to load is a reason to report
        return None, f"{type(e).__name__}: {e}"


def available_backends() -> dict[str, BackendStatus]:
    """Every known backend, whether it can run on this machine, and why (not).

    Probing imports torch (and triton, soupkern._cuda) and asks the CUDA driver for a device
    count; it creates no CUDA context and runs no kernel.
    """
    out = {}
    for name in ALL_BACKENDS:
        backend, reason = _probe(name)
        out[name] = BackendStatus(name, backend is not None, reason)
    return out


def requested_backend(name: str | None = None) -> str | None:
    """`name`, else $SOUPKERN_BACKEND, lower-cased and checked to be known; None for automatic."""
    requested = name or os.environ.get("SOUPKERN_BACKEND") or None
    if requested is None:
        return None
    requested = requested.strip().lower()
    if requested not in _MODULES:
        raise BackendUnavailableError(f"unknown backend '{requested}' (known: {', '.join(ALL_BACKENDS)})")
    return requested


def load_backend(name: str) -> object:
    """The loaded backend object `name` (cached); BackendUnavailableError with the reason if it
    cannot run here."""
    if name not in _cache:
        backend, reason = _probe(name)
        if backend is None:
            raise BackendUnavailableError(f"backend '{name}' cannot run here: {reason}")
        _cache[name] = backend
    return _cache[name]


_cache: dict[str, Any] = {}


def get_backend(name: str | None = None) -> Backend:
    """The host kernel `name`, or $SOUPKERN_BACKEND's, or the best available one.

    "cuda" works on GPU tensors only: asking for it here raises (use `device_kernels`, or a
    soup with backend="cuda", which streams through the GPU); $SOUPKERN_BACKEND=cuda is
    ignored here (automatic host choice).
    """
    requested = requested_backend(name)
    if requested == "cuda":
        if name:
            raise BackendUnavailableError(
                "backend 'cuda' runs on GPU tensors, not host buffers: use weighted_soup(..., backend='cuda') "
                "(streams through the GPU), device='cuda' for a state dict, or soupkern.backends.device_kernels")
        log.debug("SOUPKERN_BACKEND=cuda does not apply to host buffers; choosing automatically")
        requested = None
    if requested is not None:
        return _host_form(requested)
    for candidate in PREFERENCE:
        try:
            return _host_form(candidate)
        except BackendUnavailableError as e:
            log.debug("%s; trying the next one", e)
    raise BackendUnavailableError("no backend can run here: " + "; ".join(f"{s.name}: {s.reason}" for s in available_backends().values()))


def _host_form(name: str) -> Backend:
    """Backend `name` on host buffers: the host backends themselves; device kernels (Triton)
    through a `device.HostAdapter` (cached like the backends)."""
    backend = load_backend(name)
    if name not in DEVICE_BACKENDS:
        return backend  # type: ignore[return-value]
    key = f"{name}:host"
    if key not in _cache:
        import torch

        from soupkern.backends.device import HostAdapter

        _cache[key] = HostAdapter(backend, torch.device(getattr(backend, "device", "cuda")))  # type: ignore[arg-type]
    return _cache[key]  # type: ignore[no-any-return]


def device_kernels(device: object, name: str | None = None) -> DeviceKernels:
    """Kernels on torch tensors of `device` (see device.py); `name` or $SOUPKERN_BACKEND picks."""
    from soupkern.backends.device import device_kernels as choose

    return choose(device, name)


if TYPE_CHECKING:
    from soupkern.backends.device import DeviceKernels
    from soupkern.io.buffers import Bytes

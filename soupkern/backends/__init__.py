"""One dispatch point for the weighted-sum kernel.

Every backend implements the contract in csrc/soupkern.h on raw byte buffers:
`weighted_sum(out, out_dtype, inputs, in_dtypes, weights, n)` with `out` a writable uint8 array
and each input a uint8 array, dtypes named as in safetensors (F64, F32, F16, BF16).
Choice: the `backend=` argument, else $SOUPKERN_BACKEND, else the first available of
`PREFERENCE`. A backend asked for by name that cannot run raises BackendUnavailableError with
the reason; the automatic choice falls back and logs why at debug level.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from soupkern.errors import BackendUnavailableError

log = logging.getLogger("soupkern")

PREFERENCE = ("cpp", "torch")
_MODULES = {"cpp": "soupkern.backends.cpp", "torch": "soupkern.backends.torch_backend"}


class Backend(Protocol):
    name: str

    def weighted_sum(
        self,
        out: np.ndarray,
        out_dtype: str,
        inputs: Sequence[np.ndarray],
        in_dtypes: Sequence[str],
        weights: Sequence[float],
        n: int,
    ) -> None: ...


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


def _probe(name: str) -> tuple[Backend | None, str]:
    try:
        module = importlib.import_module(_MODULES[name])
        return module.load()
    except Exception as e:  # noqa: BLE001 - any failure to load is a reason to report
        return None, f"{type(e).__name__}: {e}"


def available_backends() -> dict[str, BackendStatus]:
    """Every known backend, whether it can run on this machine, and why (not)."""
    out = {}
    for name in PREFERENCE:
        backend, reason = _probe(name)
        out[name] = BackendStatus(name, backend is not None, reason)
    return out


_cache: dict[str, Backend] = {}


def get_backend(name: str | None = None) -> Backend:
    """The backend `name`, or $SOUPKERN_BACKEND, or the best available one."""
    requested = name or os.environ.get("SOUPKERN_BACKEND") or None
    if requested is not None:
        requested = requested.lower()
        if requested not in _MODULES:
            raise BackendUnavailableError(f"unknown backend '{requested}' (known: {', '.join(PREFERENCE)})")
        if requested not in _cache:
            backend, reason = _probe(requested)
            if backend is None:
                raise BackendUnavailableError(f"backend '{requested}' cannot run here: {reason}")
            _cache[requested] = backend
        return _cache[requested]
    for candidate in PREFERENCE:
        if candidate in _cache:
            return _cache[candidate]
        backend, reason = _probe(candidate)
        if backend is not None:
            _cache[candidate] = backend
            return backend
        log.debug("backend %s unavailable (%s); trying the next one", candidate, reason)
    raise BackendUnavailableError("no backend can run here: " + "; ".join(f"{s.name}: {s.reason}" for s in available_backends().values()))

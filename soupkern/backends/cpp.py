"""The C++/OpenMP backend (soupkern._native): AVX-512 / AVX2 / portable code chosen at run time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from soupkern.io.buffers import Bytes


class CppBackend:
    name = "cpp"

    def __init__(self, threads: int = 0):
        from soupkern import _native  # type: ignore[attr-defined]  # compiled extension

        self._native = _native
        self.threads = threads
        self.isa = _native.isa

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
        self._native.weighted_sum(out, out_dtype, list(inputs), list(in_dtypes), [float(w) for w in weights], n,
                                  self.threads, divisor=float(divisor))

    def weighted_sum_many(self, outs: Sequence[int], out_dtypes: Sequence[int], inputs: Sequence[int],
                          in_dtypes: Sequence[int], numels: Sequence[int], weights: Sequence[float],
                          divisors: Sequence[float], k: int) -> None:
        """weighted_sum for a table of tensors given by address (soupkern.engine.fill_many keeps
        them alive): tensor t reads inputs[t*k:(t+1)*k] with weights[t*k:(t+1)*k]."""
        self._native.weighted_sum_many(outs, out_dtypes, inputs, in_dtypes, numels, weights, divisors, k,
                                       self.threads)


def load() -> tuple[CppBackend | None, str]:
    try:
        backend = CppBackend()
    except ImportError as e:
        return None, f"the C++ extension is not built ({e}); reinstall with `pip install -e .`"
    return backend, f"C++ extension, {backend.isa} code, {backend._native.max_threads()} OpenMP threads"

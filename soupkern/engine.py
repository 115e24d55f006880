"""The streaming core: for each chunk, K zero-copy input views -> backend.weighted_sum -> output.

Working memory is bounded by `budget_bytes` whatever the model size: a chunk's mapped input
pages plus the writer's staging window fit in it, and input pages are unmapped (they stay in the
page cache) as soon as their chunk is done.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping

import numpy as np

from soupkern.backends import Backend
from soupkern.io import SoupWriter, dtype_itemsize
from soupkern.options import MIN_BUDGET_BYTES
from soupkern.plan import SoupPlan, TensorPlan

__all__ = ["DEFAULT_BUDGET_BYTES", "MIN_BUDGET_BYTES", "execute", "fill_many", "fill_tensor", "staging_bytes_for"]

DEFAULT_BUDGET_BYTES = 64 << 20
Progress = Callable[[int], None]


def staging_bytes_for(budget_bytes: int) -> int:
    """The writer's share of the budget: a quarter of it, at most 8 MiB (measured: larger windows
    are no faster, see benchmarks/README.md)."""
    return max(min(budget_bytes // 4, 8 << 20), 4096)


def _chunks(numel: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, step):
        yield start, min(step, numel - start)


def _average(tp: TensorPlan, coeffs: tuple[float, ...], divisor: float, writer: SoupWriter, backend: Backend,
             budget_bytes: int, progress: Progress | None) -> None:
    out_size = dtype_itemsize(tp.out.dtype)
    in_sizes = [dtype_itemsize(info.dtype) for _, info in tp.sources]
    in_dtypes = [info.dtype for _, info in tp.sources]
    staging = writer.staging_bytes
    step = min((budget_bytes - staging) // sum(in_sizes), staging // out_size)
    step = max(step - step % 1024, 1024) if step >= 1024 else max(step, 1)
    for start, m in _chunks(tp.numel, step):
        views = []
        for (f, info), size in zip(tp.sources, in_sizes):
            f.prefetch(info.begin + start * size, info.begin + (start + m) * size)
            views.append(f.view(info, start * size, (start + m) * size))
        out = writer.reserve(tp.out.name, start * out_size, m * out_size)
        backend.weighted_sum(out, tp.out.dtype, views, in_dtypes, coeffs, m, divisor)
        del views
        for (f, info), size in zip(tp.sources, in_sizes):
            f.release(info.begin + start * size, info.begin + (start + m) * size)
        if progress is not None:
            progress(m * (out_size + sum(in_sizes)))


def _copy(tp: TensorPlan, writer: SoupWriter, progress: Progress | None) -> None:
    f, info = tp.sources[0]
    step = writer.staging_bytes
    for start in range(0, info.nbytes, step):
        stop = min(start + step, info.nbytes)
        np.copyto(writer.reserve(tp.out.name, start, stop - start), f.view(info, start, stop))
        f.release(info.begin + start, info.begin + stop)
        if progress is not None:
            progress(2 * (stop - start))


def execute(plan: SoupPlan, writer: SoupWriter, backend: Backend, *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
            progress: Progress | None = None) -> None:
    """Compute every tensor of `plan` into `writer`, in output-file order (sequential writes)."""
    by_name = {tp.out.name: tp for tp in plan.tensors}
    order = sorted(by_name, key=lambda n: writer.layout.where[n])
    for name in order:
        tp = by_name[name]
        if tp.average:
            _average(tp, plan.coefficients_for(name), plan.divisor_for(name), writer, backend, budget_bytes, progress)
        else:
            _copy(tp, writer, progress)
    writer.flush()


def fill_tensor(tp: TensorPlan, coeffs: tuple[float, ...], out: np.ndarray, backend: Backend,
                divisor: float = 1.0) -> None:
    """Compute one whole tensor into `out` (a writable uint8 array of its output bytes)."""
    if tp.average:
        views = [f.view(info) for f, info in tp.sources]
        backend.weighted_sum(out, tp.out.dtype, views, [i.dtype for _, i in tp.sources], coeffs,
                             math.prod(tp.out.shape), divisor)
        del views
    else:
        f, info = tp.sources[0]
        np.copyto(out, f.view(info))
    for f, info in tp.sources:
        f.release(info.begin, info.end)


DTYPE_CODES = {"F64": 0, "F32": 1, "F16": 2, "BF16": 3}  # csrc/soupkern.h's DType
MANY_BATCH_BYTES = 256 << 20


def fill_many(plan: SoupPlan, targets: Mapping[str, tuple[int, Callable[[], np.ndarray]]], backend: Backend,
              *, batch_bytes: int = MANY_BATCH_BYTES) -> None:
    """Compute every tensor of `plan` into host memory: targets[name] = (address of the output
    bytes, a function returning them as a writable uint8 array).

    Averaged tensors whose sources expose addresses (memory-mapped files, in-memory tensors) go
    to the backend's multi-tensor entry point, when it has one, in batches of about
    `batch_bytes` of input (one call, one thread team for hundreds of small tensors); the rest
    tensor by tensor through `fill_tensor`. Sources are released after each batch."""
    many = getattr(backend, "weighted_sum_many", None)
    codes = DTYPE_CODES
    # the arguments of one multi-tensor call, grown tensor by tensor (hundreds of small tensors
    # make per-tensor Python work the cost here, so it is kept flat)
    outs: list[int] = []
    out_dtypes: list[int] = []
    inputs: list[int] = []
    in_dtypes: list[int] = []
    numels: list[int] = []
    weights: list[float] = []
    divisors: list[float] = []
    batch: list[TensorPlan] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if not batch:
            return
        many(outs, out_dtypes, inputs, in_dtypes, numels, weights, divisors, len(batch[0].sources))  # type: ignore[misc]
        for tp in batch:
            for f, info in tp.sources:
                f.release(info.begin, info.end)
        for args in (outs, out_dtypes, inputs, in_dtypes, numels, weights, divisors, batch):
            args.clear()
        size = 0

    for tp in plan.tensors:
        name = tp.out.name
        address, view = targets[name]
        ptrs = [f.address(info) for f, info in tp.sources] if many is not None and tp.average else None
        if ptrs is None or None in ptrs:
            fill_tensor(tp, plan.coefficients_for(name), view(), backend, plan.divisor_for(name))
            continue
        batch.append(tp)
        outs.append(address)
        out_dtypes.append(codes[tp.out.dtype])
        inputs += ptrs
        for _, info in tp.sources:
            in_dtypes.append(codes[info.dtype])
            size += info.nbytes
        numels.append(tp.numel)
        weights += plan.coefficients_for(name)
        divisors.append(plan.divisor_for(name))
        if size >= batch_bytes:
            flush()
    flush()

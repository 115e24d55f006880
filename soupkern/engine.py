"""One streaming protocol for every tensor walk: work items, one executor, ops.

- A `WorkItem` is elements [start, start + count) of one tensor plan, read from `sources` (by
  default the plan's inputs: every source of an averaged tensor, the first of a copied one), with
  the coefficients and divisor an averaging op needs. `tensor_items` cuts one tensor into items
  of at most `step` elements, `plan_items` every tensor of a plan under a step rule.
- `run` executes items in order: it maps each item's byte range in every source (`prefetch`),
  takes zero-copy views of them, calls `op(item, views)`, unmaps the pages (they stay in the page
  cache) and reports progress. An op returning False stops the run early. With a `CopyReader`,
  mapped files are read with pread into buffers instead, one item ahead on worker threads: what
  `execute` does when the inputs' missing pages exceed the free memory, where faulting in
  mapped pages is the slow way to read (benchmarks/README.md, bench_io_regimes).
- Ops: `weighted_sum_op` (backend.weighted_sum into an output), `copy_op`, and, built on `run`
  elsewhere, byte equality (plan._identical), the fp64 Gram reduction (analysis.delta_gram), the
  fp64 dot reduction (recipes.learned) and greedy's per-tensor reads (recipes.greedy).
- The device streamer (soupkern/gpu_engine.py) is the other executor: it packs a plan's items
  into pinned slots (filled through `run`) and runs the device kernels on them, each item with
  its own coefficients and divisor.

`execute` streams a whole plan into a writer: working memory is bounded by `budget_bytes`
whatever the model size (an item's mapped input pages plus the writer's staging window fit in
it). `fill_tensor` computes one whole tensor into host memory; `fill_many` many small ones
through the backend's multi-tensor entry point.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from soupkern.dtype_codes import DTYPE_CODES
from soupkern.io import SoupWriter, TensorInfo, dtype_itemsize
from soupkern.io.buffers import Bytes, aligned_bytes
from soupkern.io.reader import MappedFile, reads_may_evict
from soupkern.options import MIN_BUDGET_BYTES, reads_mode

if TYPE_CHECKING:
    from soupkern.backends import Backend
    from soupkern.plan import SoupPlan, TensorPlan

__all__ = ["DEFAULT_BUDGET_BYTES", "MIN_BUDGET_BYTES", "CopyReader", "WorkItem", "copy_op", "execute", "fill_many",
           "fill_tensor", "plan_items", "run", "staging_bytes_for", "tensor_items", "weighted_sum_op"]

log = logging.getLogger("soupkern")
DEFAULT_BUDGET_BYTES = 64 << 20
Progress = Callable[[int], None]


class Holder(Protocol):
    """What the executor reads a tensor through (a mapped file, an in-memory tensor, ...); byte
    offsets of prefetch/release are the file's (`info.begin` + offset in the tensor)."""

    def view(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> Bytes: ...
    def prefetch(self, begin: int, end: int) -> None: ...
    def release(self, begin: int, end: int) -> None: ...


Source = tuple[Holder, TensorInfo]


@dataclass(frozen=True)
class WorkItem:
    """Elements [start, start + count) of `tensor`, read from `sources`."""

    tensor: TensorPlan
    sources: tuple[Source, ...]
    start: int
    count: int
    coefficients: tuple[float, ...] = ()
    divisor: float = 1.0

    def span(self, dtype: str) -> tuple[int, int]:
        """The item's bytes [lo, hi) within a tensor of `dtype` (relative to its first byte)."""
        size = dtype_itemsize(dtype)
        return self.start * size, (self.start + self.count) * size

    @property
    def nbytes_read(self) -> int:
        return self.count * sum(dtype_itemsize(info.dtype) for _, info in self.sources)


Op = Callable[[WorkItem, list[Bytes]], object]


def tensor_items(tp: TensorPlan, step: int, *, sources: Sequence[Source] | None = None,
                 coefficients: tuple[float, ...] = (), divisor: float = 1.0) -> Iterator[WorkItem]:
    """The items of one tensor, `step` >= 1 elements each (the last may be shorter; none for an
    empty tensor), in element order, covering every element once. `sources`: default tp.inputs."""
    srcs = tp.inputs if sources is None else tuple(sources)
    for start in range(0, tp.numel, step):
        yield WorkItem(tp, srcs, start, min(step, tp.numel - start), coefficients, divisor)


def plan_items(plan: SoupPlan, step: Callable[[TensorPlan], int],
               order: Iterable[TensorPlan] | None = None) -> Iterator[WorkItem]:
    """The items of every tensor of `plan` (in `order`, default the plan's), `step(tp)` elements
    each, with the tensor's coefficients and divisor."""
    for tp in plan.tensors if order is None else order:
        name = tp.out.name
        yield from tensor_items(tp, step(tp), coefficients=plan.coefficients_for(name), divisor=plan.divisor_for(name))


Range = tuple[Holder, TensorInfo, int, int]  # a source, its tensor, and the item's bytes [lo, hi) in it


class CopyReader:
    """Reads items' bytes with copies (pread) instead of mapped views, for the sources that can
    (`read_into`: mapped files), several sources at once on `workers` threads (pread releases
    the GIL), into two reusable arenas in turn: `run` starts reading the next item while the op
    runs on this one. Each file is read through one descriptor kept open (up to `max_open`, the
    least recently used closed beyond), so a file's permissions changing mid-run do not matter,
    as with a mapping. A context manager; `close` waits for reads in flight, closes the
    descriptors and ends the threads. `copied`: bytes read."""

    ALIGN = 64

    def __init__(self, workers: int, max_open: int | None = None):
        self._pool = ThreadPoolExecutor(max(workers, 1), thread_name_prefix="soupkern-read")
        self._arenas = [aligned_bytes(0), aligned_bytes(0)]
        self._turn = 0
        self._inflight: list[Future[None]] = []
        self._fds: OrderedDict[int, tuple[object, int]] = OrderedDict()
        self._max_open = max_open if max_open is not None else _descriptor_allowance()
        self.copied = 0

    def drain(self) -> None:
        """Wait for the reads in flight; their errors are dropped (whoever wanted the bytes has
        stopped waiting for them)."""
        for fut in self._inflight:
            try:
                fut.result()
            except Exception:  # noqa: BLE001 - an abandoned read's failure concerns no one
                pass
        self._inflight = []

    def _descriptor(self, f: object, held: set[int]) -> int | None:
        """f's kept descriptor (opened on first use), or None (read_into then opens its own) when
        every kept one is in use by the current item and no more may be opened."""
        key = id(f)
        if key in self._fds:
            self._fds.move_to_end(key)
            return self._fds[key][1]
        if len(self._fds) >= self._max_open:
            victim = next((k for k in self._fds if k not in held), None)
            if victim is None:
                return None
            os.close(self._fds.pop(victim)[1])
        fd = f.open_for_reads()  # type: ignore[attr-defined]
        self._fds[key] = (f, fd)  # the file object is kept too, so its id is not reused
        return fd

    def start(self, ranges: Sequence[Range]) -> Callable[[], dict[int, Bytes]]:
        """Start copying every range whose source has `read_into` (after the reads still in
        flight end); returns a wait() that gives {index in `ranges`: its bytes}, valid until the
        second start() after this one."""
        self.drain()
        jobs, size, held = [], 0, set()
        for i, (f, info, lo, hi) in enumerate(ranges):
            if getattr(f, "read_into", None) is not None:
                fd = self._descriptor(f, held)
                held.add(id(f))
                jobs.append((i, f, fd, info.begin + lo, size, hi - lo))
                size += -(-(hi - lo) // self.ALIGN) * self.ALIGN
        arena = self._arenas[self._turn]
        if size > arena.nbytes:
            arena = self._arenas[self._turn] = aligned_bytes(size)
        self._turn ^= 1
        out = {i: arena[at:at + n] for i, _, _, _, at, n in jobs}
        futures = [self._pool.submit(f.read_into, begin, out[i], fd) for i, f, fd, begin, _, _ in jobs]
        self._inflight = futures
        self.copied += sum(n for *_, n in jobs)

        def wait() -> dict[int, Bytes]:
            for fut in futures:
                fut.result()
            return out
        return wait

    def read(self, ranges: Sequence[Range]) -> dict[int, Bytes]:
        """start(ranges)() in one step."""
        return self.start(ranges)()

    def close(self) -> None:
        self.drain()
        self._pool.shutdown(wait=True)
        for _, fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._arenas = [aligned_bytes(0), aligned_bytes(0)]

    def __enter__(self) -> CopyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _descriptor_allowance() -> int:
    """How many descriptors a CopyReader keeps open: a quarter of the soft RLIMIT_NOFILE, 16 to 1024."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 16
    if soft == getattr(resource, "RLIM_INFINITY", -1) or soft < 0:
        return 1024
    return max(16, min(soft // 4, 1024))


def _ranges(item: WorkItem) -> list[Range]:
    return [(f, info, *item.span(info.dtype)) for f, info in item.sources]


def run(items: Iterable[WorkItem], op: Op, progress: Callable[[WorkItem], None] | None = None, *,
        reader: CopyReader | None = None) -> bool:
    """For each item in order: prefetch its byte range in every source, view them (zero-copy, in
    `item.sources` order), `op(item, views)`, release the ranges, `progress(item)`. With a
    `reader`, the sources it can read are copied into its buffers instead, the next item's while
    the op runs on this one. Stops after the first op that returns False and returns False; True
    when every item ran. An op must not keep the views: their pages are unmapped, or their
    buffers reused, once it returns."""
    it = iter(items)
    item = next(it, None)
    pending = reader.start(_ranges(item)) if reader is not None and item is not None else None
    try:
        while item is not None:
            ranges = _ranges(item)
            copied = pending() if pending is not None else {}
            following = next(it, None)
            pending = reader.start(_ranges(following)) if reader is not None and following is not None else None
            mapped = [r for i, r in enumerate(ranges) if i not in copied]
            for f, info, lo, hi in mapped:
                f.prefetch(info.begin + lo, info.begin + hi)
            views = [copied[i] if i in copied else f.view(info, lo, hi) for i, (f, info, lo, hi) in enumerate(ranges)]
            result = op(item, views)
            del views
            for f, info, lo, hi in mapped:
                f.release(info.begin + lo, info.begin + hi)
            if progress is not None:
                progress(item)
            if result is False:
                return False
            item = following
        return True
    finally:
        if reader is not None:
            reader.drain()  # a read ahead must not land in a buffer after the run returns


Output = Callable[[WorkItem], Bytes]  # the writable output bytes of an item


def weighted_sum_op(output: Output, backend: Backend) -> Op:
    """out = round((Σ_k c_k x_k) / divisor) in the tensor's output dtype, exact and independent of
    the item boundaries (the backend's contract)."""
    def op(item: WorkItem, views: list[Bytes]) -> None:
        tp = item.tensor
        backend.weighted_sum(output(item), tp.out.dtype, views, [info.dtype for _, info in item.sources],
                             item.coefficients, item.count, item.divisor)
    return op


def copy_op(output: Output) -> Op:
    """out = the first source's bytes."""
    def op(item: WorkItem, views: list[Bytes]) -> None:
        output(item)[:] = views[0]
    return op


def _make_op(output: Output, backend: Backend) -> Op:
    """The weighted sum for averaged tensors, the copy for the others."""
    average, copy = weighted_sum_op(output, backend), copy_op(output)
    return lambda item, views: (average if item.tensor.average else copy)(item, views)


def staging_bytes_for(budget_bytes: int) -> int:
    """The writer's share of the budget: a quarter of it, at most 8 MiB (measured: larger windows
    are no faster, see benchmarks/README.md)."""
    return max(min(budget_bytes // 4, 8 << 20), 4096)


def _write_step(tp: TensorPlan, budget_bytes: int, staging: int) -> int:
    """Elements per item when streaming into a writer with a `staging`-byte window: an averaged
    item's inputs fit in the rest of the budget (a multiple of 1024 elements where possible), a
    copied item fills the window."""
    out_size = dtype_itemsize(tp.out.dtype)
    if not tp.average:
        return max(staging // out_size, 1)
    step = min((budget_bytes - staging) // sum(dtype_itemsize(i.dtype) for _, i in tp.sources), staging // out_size)
    return max(step - step % 1024, 1024) if step >= 1024 else max(step, 1)


def _copy_reader(plan: SoupPlan, reads: str | None) -> CopyReader | None:
    """The reader `execute` copies the mapped input files with, or None to map them: "map",
    "copy", or "auto" = copy when the bytes the plan reads from them that are not in the page
    cache may not fit in free memory (reads_may_evict)."""
    mode = reads_mode(reads)
    if mode == "map":
        return None
    needs: dict[MappedFile, int] = {}
    for tp in plan.tensors:
        for f, info in tp.sources if tp.average else tp.sources[:1]:
            if isinstance(f, MappedFile):
                needs[f] = needs.get(f, 0) + info.nbytes
    if not needs or (mode == "auto" and not reads_may_evict(needs)):
        return None
    return CopyReader(min(len(needs), max(2, _usable_cpus())))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def execute(plan: SoupPlan, writer: SoupWriter, backend: Backend, *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
            progress: Progress | None = None, reads: str | None = None) -> None:
    """Compute every tensor of `plan` into `writer`, in output-file order (sequential writes);
    `progress(bytes read + bytes written)` after every item. `reads`: how mapped input files are
    read, "map" (zero-copy views of mapped pages), "copy" (pread into a buffer of one item, on
    several threads, reading one item ahead) or "auto" (default; $SOUPKERN_READS sets it): copy
    when the inputs' pages not in the page cache may not fit in free memory. Same bytes out
    either way."""
    staging = writer.staging_bytes
    order = sorted(plan.tensors, key=lambda tp: writer.layout.where[tp.out.name])

    def output(item: WorkItem) -> Bytes:
        lo, hi = item.span(item.tensor.out.dtype)
        return writer.reserve(item.tensor.out.name, lo, hi - lo)

    done = None if progress is None else (
        lambda item: progress(item.nbytes_read + item.count * dtype_itemsize(item.tensor.out.dtype)))
    reader = _copy_reader(plan, reads)
    # two items' copies are held at once (one read ahead): each gets half of the inputs' share
    step_budget = budget_bytes if reader is None else staging + (budget_bytes - staging) // 2
    try:
        run(plan_items(plan, lambda tp: _write_step(tp, step_budget, staging), order), _make_op(output, backend), done,
            reader=reader)
    finally:
        if reader is not None:
            reader.close()
            log.debug("reads: %d bytes copied", reader.copied)
    writer.flush()


def fill_tensor(tp: TensorPlan, coeffs: tuple[float, ...], out: Bytes, backend: Backend,
                divisor: float = 1.0) -> None:
    """Compute one whole tensor into `out` (a writable uint8 array of its output bytes), as one item."""
    run(tensor_items(tp, max(tp.numel, 1), coefficients=coeffs, divisor=divisor), _make_op(lambda item: out, backend))


MANY_BATCH_BYTES = 256 << 20


def fill_many(plan: SoupPlan, targets: Mapping[str, tuple[int, Callable[[], Bytes]]], backend: Backend,
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
